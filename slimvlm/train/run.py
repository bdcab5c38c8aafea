"""`slimvlm train RECIPE` / `python -m slimvlm.train RECIPE`: fine-tuning under compression on the stock
`transformers.Trainer`, so `torchrun` and `accelerate launch` (DDP, FSDP, DeepSpeed) run it unchanged.

    python -m slimvlm.train projector --model M --data data.json --image-folder images --output OUT \
        --compression '{"method": "visionzip", "tokens": 64}'
    torchrun --nproc_per_node 8 -m slimvlm.train lora --model M --data data.json --image-folder images --output OUT

OUT/checkpoint-N are `Trainer` checkpoints (`--resume` continues from the last one); when training ends, OUT holds
the model (safetensors + remote code + card, loads with trust_remote_code) and `training_summary.json`. The LoRA
recipes write the adapter to OUT/adapter (peft) next to the base with the tuned projector, or with `--merge` one
merged checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .recipes import DEFAULTS, RECIPES

SUMMARY_FILE = "training_summary.json"
ADAPTER_FOLDER = "adapter"


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of `slimvlm train` (also `python -m slimvlm.train`); `parser` is filled in when given."""
    parser = parser or argparse.ArgumentParser(prog="python -m slimvlm.train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=RECIPES, help="projector: VisionZip‡ (projector only); lora: projector + "
                        "LoRA on the LLM; voco: VoCo-LLaMA (LLM + projector); voco-lora: VoCo with LoRA")
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id (stock or slim)")
    parser.add_argument("--data", required=True, help="LLaVA instruction JSON (list of records) or a datasets folder")
    parser.add_argument("--image-folder", help="folder the records' image / video paths are relative to")
    parser.add_argument("--output", required=True, help="output folder (Trainer checkpoints, then the model)")
    parser.add_argument("--compression", help="JSON compression to train under, e.g. '{\"method\": \"visionzip\", "
                        "\"tokens\": 64}' (default: the checkpoint's own; voco recipes: K = 1 <voco> token)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (default: the recipe's epochs)")
    parser.add_argument("--epochs", type=float, help="epochs when --max-steps is not given (default: the recipe's)")
    parser.add_argument("--per-device-batch-size", type=int, default=16, help="default 16 (LLaVA-1.5: 16 x 8 GPUs)")
    parser.add_argument("--gradient-accumulation-steps", type=int,
                        help="default: what makes the recipe's global batch (128) with this batch and world size")
    parser.add_argument("--learning-rate", type=float, help="default: the recipe's (README, 'Fine-tuning')")
    parser.add_argument("--projector-learning-rate", type=float, help="lora recipes: the projector's rate "
                        "(default 2e-5, LLaVA-1.5 finetune_lora.sh)")
    parser.add_argument("--warmup-ratio", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-alpha", type=int)
    parser.add_argument("--lora-dropout", type=float)
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per sequence (LLaVA-1.5: 2048)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (weights stay fp32)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--resume", action="store_true", help="continue from the last OUT/checkpoint-N")
    parser.add_argument("--merge", action="store_true", help="lora recipes: write one merged checkpoint")
    parser.add_argument("--save-steps", type=int, default=500, help="write a Trainer checkpoint every N steps")
    parser.add_argument("--save-total-limit", type=int, default=2, help="keep this many checkpoints")
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--dataloader-workers", type=int, default=0)
    parser.add_argument("--base-model", help="Hub id of the base model for the card (default: --model if a Hub id)")
    parser.add_argument("--dataset-id", action="append", help="Hub id of the training data for the card's "
                        "`datasets` (repeatable), e.g. liuhaotian/LLaVA-Instruct-150K")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (README: ZeRO-2/3 examples)")
    parser.add_argument("--fsdp", help="FSDP options for TrainingArguments, e.g. 'full_shard auto_wrap'")
    parser.add_argument("--fsdp-config", help="FSDP JSON config for TrainingArguments")
    parser.add_argument("--report-to", default="none", help="Trainer integrations (default none)")
    return parser


def _resolve_defaults(args) -> None:
    defaults = DEFAULTS[args.recipe]
    if args.max_steps is not None and args.max_steps <= 0:
        raise ValueError(f"--max-steps must be a positive number of optimizer steps, got {args.max_steps}")
    for name in ("per_device_batch_size", "max_length", "save_steps", "logging_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps <= 0:
        raise ValueError(f"--gradient-accumulation-steps must be positive, got {args.gradient_accumulation_steps}")
    args.learning_rate = defaults.learning_rate if args.learning_rate is None else args.learning_rate
    args.warmup_ratio = defaults.warmup_ratio if args.warmup_ratio is None else args.warmup_ratio
    args.weight_decay = defaults.weight_decay if args.weight_decay is None else args.weight_decay
    args.epochs = defaults.epochs if args.epochs is None else args.epochs
    if args.recipe.endswith("lora"):
        args.projector_learning_rate = (defaults.projector_learning_rate if args.projector_learning_rate is None
                                        else args.projector_learning_rate)
        args.lora_r = defaults.lora["r"] if args.lora_r is None else args.lora_r
        args.lora_alpha = defaults.lora["alpha"] if args.lora_alpha is None else args.lora_alpha
        args.lora_dropout = defaults.lora["dropout"] if args.lora_dropout is None else args.lora_dropout
        if args.merge and (args.deepspeed or args.fsdp):
            raise ValueError("--merge works on one process's full weights: with --deepspeed / --fsdp, train without "
                             "it and merge OUT/adapter afterwards (peft merge_and_unload)")
    elif args.merge or args.projector_learning_rate is not None or args.lora_r is not None:
        raise ValueError(f"--merge, --projector-learning-rate and --lora-* are for the lora recipes, not {args.recipe}")
    if args.gradient_accumulation_steps is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        args.gradient_accumulation_steps = max(1, round(defaults.global_batch_size / (args.per_device_batch_size * world)))


def _compression(args) -> dict | None:
    from ..configuration_slimvlm import normalize_compression

    if args.compression is None:
        return {"method": "voco", "num_voco_tokens": 1} if args.recipe.startswith("voco") else None
    try:
        value = json.loads(args.compression)
    except json.JSONDecodeError as error:
        raise ValueError(f"--compression must be JSON such as '{{\"method\": \"visionzip\", \"tokens\": 64}}', "
                         f"got {args.compression!r} ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--compression must be a JSON object, got {args.compression!r}")
    normalize_compression(value)
    return value


def load_model(model_id: str, compression: dict | None):
    """The Slim model (fp32, train mode) and processor of a stock or slim checkpoint, under `compression`."""
    from ..auto import family_of

    family = family_of(model_id)
    overrides = {} if compression is None else {"compression": compression}
    config = family.config.from_pretrained(model_id, **overrides)
    model = family.generation.from_pretrained(model_id, config=config)
    processor = family.processor.from_pretrained(model_id, compression=model.config.compression)
    return model, processor, family


def _existing_checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def prepare(args):
    """Everything checked before a Trainer exists: arguments, output folder, data (every record), model."""
    from .data import ChatCollator, SupervisedDataset, VoCoChatCollator, check_records, read_records
    from .recipes import add_lora, check_compression, freeze_all_but_projector

    _resolve_defaults(args)
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} is a file; give a folder")
    checkpoints = _existing_checkpoints(output) if output.is_dir() else []
    if args.resume and not checkpoints:
        raise FileNotFoundError(f"--resume: {output} has no checkpoint-N folder to continue from")
    if not args.resume and output.is_dir() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} is not empty; choose another folder, or pass --resume to continue "
                              "its last checkpoint")
    if args.image_folder is not None and not Path(args.image_folder).is_dir():
        raise FileNotFoundError(f"--image-folder {args.image_folder} is not a folder")
    from ..auto import family_of

    compression = _compression(args)
    if compression is not None:
        check_compression(args.recipe, compression)
    family = family_of(args.model)
    examples = check_records(read_records(args.data), args.image_folder,
                             takes_videos=getattr(family.processor, "takes_videos", False))
    model, processor, family = load_model(args.model, compression)
    check_compression(args.recipe, model.config.compression)
    voco_token_id = None
    if args.recipe.startswith("voco"):
        from ..voco import add_voco_token

        voco_token_id = add_voco_token(model, processor, seed=args.seed)
        if args.recipe == "voco":
            from ..voco import freeze_vision_tower

            freeze_vision_tower(model)
    if args.recipe == "projector":
        freeze_all_but_projector(model)
    if args.recipe.endswith("lora"):
        model = add_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, voco_token_id)
    collator = (VoCoChatCollator if args.recipe.startswith("voco") else ChatCollator)(processor, args.max_length)
    return model, processor, SupervisedDataset(examples), collator


def training_arguments(args):
    import torch
    from transformers import TrainingArguments

    extra = {}
    if args.max_steps is not None:
        extra["max_steps"] = args.max_steps
    if not torch.cuda.is_available():
        extra["use_cpu"] = True  # bf16 autocast on CPU; several processes: accelerate's MULTI_CPU
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            extra["ddp_backend"] = "gloo"
    for name in ("deepspeed", "fsdp", "fsdp_config"):
        if getattr(args, name):
            extra[name] = getattr(args, name)
    return TrainingArguments(
        output_dir=args.output, per_device_train_batch_size=args.per_device_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_ratio, lr_scheduler_type=DEFAULTS[args.recipe].scheduler,
        num_train_epochs=args.epochs, seed=args.seed, data_seed=args.seed, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, report_to=args.report_to, remove_unused_columns=False,
        dataloader_num_workers=args.dataloader_workers, ddp_find_unused_parameters=False, **extra)


def make_trainer(args, model, dataset, collator, callbacks=None):
    from transformers import Trainer

    class SlimTrainer(Trainer):
        """The stock Trainer; the lora recipes give the projector its own learning rate (LLaVA's mm_projector_lr)."""

        def create_optimizer(self, model=None):
            if self.optimizer is not None or not args.recipe.endswith("lora") or self.is_deepspeed_enabled:
                return super().create_optimizer(model) if model is not None else super().create_optimizer()
            decay = set(self.get_decay_parameter_names(self.model))
            groups: dict[tuple[bool, bool], list] = {}
            for name, parameter in self.model.named_parameters():
                if parameter.requires_grad:
                    groups.setdefault(("multi_modal_projector" in name, name in decay), []).append(parameter)
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_class(
                [{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
                  **({"lr": args.projector_learning_rate} if projector else {})}
                 for (projector, decayed), params in sorted(groups.items())], **optimizer_kwargs)
            return self.optimizer

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # Our checkpoints are written by save_pretrained, which keeps the base checkpoint's key layout (the legacy
            # llava-hf names for the bundled model); Trainer's own resume loads the raw state dict without that
            # mapping, which would leave every weight at its start value. Reload through from_pretrained instead.
            model = model if model is not None else self.model
            if self.is_deepspeed_enabled or self.is_fsdp_enabled or hasattr(model, "peft_config"):
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            saved = type(model).from_pretrained(resume_from_checkpoint, config=model.config)
            model.load_state_dict(saved.state_dict())

    return SlimTrainer(model=model, args=training_arguments(args), train_dataset=dataset, data_collator=collator,
                       callbacks=callbacks)


def save_output(args, trainer, processor, data_size: int) -> Path:
    """Rank 0 writes the trained model (and the adapter) into OUT with a card and training_summary.json."""
    from .card import write_training_card

    output = Path(args.output)
    model = trainer.accelerator.unwrap_model(trainer.model)
    summary = {
        "recipe": args.recipe, "model": args.model, "compression": model.config.compression,
        "data": str(args.data), "data_size": data_size, "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4), "global_batch_size": args.per_device_batch_size
        * args.gradient_accumulation_steps * trainer.args.world_size, "learning_rate": args.learning_rate,
        "seed": args.seed, "bf16": args.bf16, "world_size": trainer.args.world_size,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    if args.recipe.endswith("lora"):
        summary.update(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                       projector_learning_rate=args.projector_learning_rate, merged=args.merge)
    lora = args.recipe.endswith("lora")
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:  # (untested: no GPU) Trainer gathers the sharded weights; every rank must call it
        trainer.save_model(str(output / ADAPTER_FOLDER if lora else output))
    if not trainer.is_world_process_zero():
        return output
    if lora and not sharded:
        if not args.merge:
            model.save_pretrained(str(output / ADAPTER_FOLDER))
        model = model.merge_and_unload() if args.merge else model.unload()
    if not sharded:
        model.save_pretrained(str(output))
    processor.save_pretrained(str(output))
    (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_training_card(model, output, summary, base_model=args.base_model, datasets=args.dataset_id)
    return output


def train(argv: list[str] | None = None, callbacks=None) -> Path:
    """Parse `argv`, check everything, train, save; returns the output folder (the CLI's and Python's entry point).

    callbacks: extra `transformers.TrainerCallback`s (Python use)."""
    args = build_parser().parse_args(argv)
    return run(args, callbacks=callbacks)


def run(args, callbacks=None) -> Path:
    import transformers

    transformers.set_seed(args.seed)  # before the model: LoRA's A matrices (and a new <voco> row) draw from it
    model, processor, dataset, collator = prepare(args)
    trainer = make_trainer(args, model, dataset, collator, callbacks)
    if trainer.is_world_process_zero():
        from .recipes import trainable_summary

        trainable, total = trainable_summary(model)
        print(f"slimvlm train {args.recipe}: {len(dataset)} records, compression {model.config.compression}; "
              f"training {trainable:,} of {total:,} parameters", file=sys.stderr, flush=True)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    return save_output(args, trainer, processor, len(dataset))


def main(argv: list[str] | None = None) -> int:
    """`python -m slimvlm.train`: bad input ends in one line on stderr and exit status 1 (--debug: traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        train(argv)
    except (ValueError, TypeError, OSError, ImportError) as error:
        if debug:
            raise
        print(f"slimvlm train: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


__all__ = ["build_parser", "load_model", "main", "prepare", "run", "train"]
