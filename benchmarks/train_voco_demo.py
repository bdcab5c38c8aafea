"""VoCo-LLaMA fine-tuning demonstration on the bundled tiny shapes-VQA model (CPU, not part of the tests).

    python benchmarks/train_voco_demo.py [--model slimvlm/demo/assets/tiny-shapes-llava] [--num-voco 2]
        [--steps 400] [--minutes 15] [--out benchmarks/results/voco_demo.json] [--save-to DIR]

The bundled VoCo companion (`slimvlm demo`'s VoCo row) is this script's output:
    python benchmarks/train_voco_demo.py --threads 1 --save-to slimvlm/demo/assets/tiny-shapes-llava-voco

1. Evaluates the uncompressed demo model (576 image tokens, its own prompt) on held-out questions.
2. Switches it to VoCo (K `<voco>` tokens after the image, image-first prompt, spec §2), redraws the
   `<voco>` row from N(0, initializer_range) and evaluates it *before* fine-tuning (the mask alone
   destroys the answers: the text can no longer see the image).
3. Fine-tunes LLM + projector (vision tower frozen, spec §4) with plain causal-LM loss on the answer
   and `</s>` under the VoCo rule, then evaluates from cached VoCo K/V (two-stage inference) and, on a
   subset, in full-mask mode (the two must agree).

Training path. By default each image's prefix [BOS, image x 576, <voco> x K] runs once with autograd
(`voco_compress(enable_grad=True)`) and all its questions are trained on top of the VoCo K/V
(`model(..., voco_cache=..., labels=...)`). Post-VoCo text sees only keys from the first VoCo token on,
so this *is* the full-sequence forward under the VoCo mask (tests/test_voco.py checks the logits to
1e-5), with the same gradients, at a fraction of the CPU cost. `--full-mask` trains on the full
sequences through `model(**batch, labels=...)` instead (what `transformers.Trainer` does).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: do not busy-wait

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor  # noqa: E402
from slimvlm.demo import shapes  # noqa: E402
from slimvlm.demo.voco_shapes import evaluate_voco, pad, text_pieces, voco_prefix  # noqa: E402
from slimvlm.voco import IGNORE_INDEX, add_voco_token, freeze_vision_tower  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "slimvlm" / "demo" / "assets" / "tiny-shapes-llava"


def training_batch(processor, seed: int, start: int, images: int, questions: int, rng: np.random.Generator):
    """`images` new training scenes with `questions` questions each (question types sampled uniformly)."""
    pictures, rows, labels = [], [], []
    for index in range(start, start + images):
        _, image, _, candidates = shapes.make_scene_batch("train", seed, index)
        pictures.append(image)
        by_type: dict[str, list] = {}
        for candidate in candidates:
            by_type.setdefault(candidate[0], []).append(candidate)
        types = sorted(by_type)
        for _ in range(questions):
            options = by_type[types[rng.integers(len(types))]]
            _, question, answer = options[rng.integers(len(options))]
            ids, lab = text_pieces(processor.tokenizer, question, answer)
            rows.append(ids)
            labels.append(lab)
    prefix = voco_prefix(processor, pictures, processor.tokenizer.convert_tokens_to_ids("<voco>"))
    pad_id = processor.tokenizer.pad_token_id
    text = {"input_ids": pad(rows, pad_id, "right"), "labels": pad(labels, IGNORE_INDEX, "right")}
    text["attention_mask"] = (text["labels"] != IGNORE_INDEX) | (pad([[1] * len(r) for r in rows], 0, "right") == 1)
    text["attention_mask"] = text["attention_mask"].long()
    return prefix, text, pictures


def two_stage_loss(model, prefix, text, questions: int) -> torch.Tensor:
    cache = model.voco_compress(**prefix, enable_grad=True).repeat_interleave(questions)
    return model(**text, voco_cache=cache).loss


def full_mask_loss(model, processor, pictures, text, questions: int) -> torch.Tensor:
    """The same batch as full sequences [BOS, image, VoCo, text] through model(**batch, labels=...)."""
    collator_rows = []
    tokenizer = processor.tokenizer
    for i, image in enumerate(pictures):
        for j in range(questions):
            row = i * questions + j
            real = text["attention_mask"][row].bool()
            collator_rows.append((image, text["input_ids"][row][real].tolist(), text["labels"][row][real].tolist()))
    prefix = voco_prefix(processor, [r[0] for r in collator_rows], model.config.voco_token_id)
    ids = [p.tolist() + r[1] for p, r in zip(prefix["input_ids"], collator_rows)]
    labels = [[IGNORE_INDEX] * prefix["input_ids"].shape[1] + r[2] for r in collator_rows]
    batch = {"input_ids": pad(ids, tokenizer.pad_token_id, "right"), "labels": pad(labels, IGNORE_INDEX, "right"),
             "attention_mask": pad([[1] * len(r) for r in ids], 0, "right"), "pixel_values": prefix["pixel_values"]}
    return model(**batch).loss


def per_type(samples, predictions) -> dict[str, float]:
    table: dict[str, list[int]] = {}
    for sample, prediction in zip(samples, predictions):
        table.setdefault(sample.qtype, []).append(int(prediction == sample.answer))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(table.items())}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


BUNDLED_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                 "tokenizer.json", "tokenizer_config.json")


def save_companion(model, processor, folder: Path) -> None:
    """Write the fine-tuned model as the bundled VoCo companion (slimvlm/demo/assets/tiny-shapes-llava-voco):
    weights, config, tokenizer and processor config, without the remote-code copies and `auto_map` (the
    installed package provides the classes). Written to a staging folder and moved into place whole."""
    import shutil
    import tempfile

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "companion"
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in ("config.json", "processor_config.json"):
            config = json.loads((staging / name).read_text())
            config.pop("auto_map", None)
            if isinstance(config.get("image_processor"), dict):
                config["image_processor"].pop("auto_map", None)
            (staging / name).write_text(json.dumps(config, indent=2) + "\n")
        final = Path(tmp) / "final"
        final.mkdir()
        for name in BUNDLED_FILES:
            shutil.copy2(staging / name, final / name)
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(final), str(folder))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--num-voco", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--minutes", type=float, default=15.0, help="stop training after this long")
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--questions-per-image", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--full-mask-eval-samples", type=int, default=50)
    parser.add_argument("--full-mask", action="store_true", help="train on full sequences via model(**batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "voco_demo.json")
    parser.add_argument("--save-to", type=Path, default=None,
                        help="also save the fine-tuned model as the bundled VoCo companion here "
                             "(slimvlm/demo/assets/tiny-shapes-llava-voco; run with --threads 1 to reproduce it bit for bit)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").exists():
        raise SystemExit(f"no demo model at {args.model}; train it with `python -m slimvlm.demo.train --out {args.model}` "
                         "or pass --model")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    compression = {"method": "voco", "num_voco_tokens": args.num_voco}
    samples = shapes.make_samples("heldout", args.eval_samples, seed=args.seed)

    base = SlimLlavaForConditionalGeneration.from_pretrained(args.model).eval()
    base_processor = SlimLlavaProcessor.from_pretrained(args.model)
    baseline, baseline_predictions = shapes.evaluate(base, base_processor, samples, return_predictions=True)
    print(f"uncompressed ({base.image_token_count()} image tokens): {baseline:.3f} ({time.time() - t0:.0f}s)", flush=True)

    model = copy.deepcopy(base).set_compression(compression)
    processor = SlimLlavaProcessor.from_pretrained(args.model, compression=compression)
    voco_id = add_voco_token(model, processor, seed=args.seed, reinit=True)
    before, _ = evaluate_voco(model, processor, samples)
    print(f"VoCo K={args.num_voco} before fine-tuning: {before:.3f} ({time.time() - t0:.0f}s)", flush=True)

    freeze_vision_tower(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    history, t_train, step = [], time.time(), 0
    for step in range(args.steps):
        if time.time() - t_train > args.minutes * 60:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        prefix, text, pictures = training_batch(processor, 10_000 + args.seed, step * args.images_per_step,
                                                args.images_per_step, args.questions_per_image, rng)
        if args.full_mask:
            loss = full_mask_loss(model, processor, pictures, text, args.questions_per_image)
        else:
            loss = two_stage_loss(model, prefix, text, args.questions_per_image)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append((step, round(loss.item(), 4)))
        if step % 20 == 0:
            print(f"[voco] step {step} loss {loss.item():.4f} ({time.time() - t_train:.0f}s)", flush=True)
    steps_done = len(history)
    model.eval()

    after, predictions = evaluate_voco(model, processor, samples)
    subset = samples[: args.full_mask_eval_samples]
    full_mask_acc, full_predictions = evaluate_voco(model, processor, subset, full_mask=True)
    agreement = sum(a == b for a, b in zip(full_predictions, predictions)) / max(len(subset), 1)
    print(f"VoCo K={args.num_voco} after {steps_done} steps: {after:.3f} (cached); full-mask on {len(subset)}: "
          f"{full_mask_acc:.3f}, agreement {agreement:.3f}", flush=True)

    result = {
        "model": str(args.model),
        "num_voco_tokens": args.num_voco,
        "image_tokens_uncompressed": base.image_token_count(),
        "eval_samples": len(samples),
        "accuracy": {
            "uncompressed": baseline,
            "voco_before_finetuning": before,
            "voco_after_finetuning_cached": after,
            f"voco_after_finetuning_full_mask_first_{len(subset)}": full_mask_acc,
        },
        "retention_vs_uncompressed": after / baseline if baseline else None,
        "cached_vs_full_mask_prediction_agreement": agreement,
        "per_type": {"uncompressed": per_type(samples, baseline_predictions), "voco": per_type(samples, predictions)},
        "training": {"steps": steps_done, "images_per_step": args.images_per_step,
                     "questions_per_image": args.questions_per_image, "lr": args.lr, "warmup": args.warmup,
                     "path": "full-mask" if args.full_mask else "two-stage (exact decomposition of the VoCo mask)",
                     "frozen": "vision tower", "seconds": round(time.time() - t_train, 1),
                     "loss_history": history[::10] + history[-1:]},
        "voco_token_id": voco_id,
        "seconds_total": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "threads": args.threads,
        "note": "Uncompressed = the bundled model as trained (no VoCo tokens, its own prompt); it is not the paper's "
                "'upper bound' (a model trained with VoCo tokens but no mask).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    if args.save_to is not None:
        save_companion(model, processor, args.save_to)
    print(json.dumps(result["accuracy"], indent=2))
    return result


if __name__ == "__main__":
    main()
