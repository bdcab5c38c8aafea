"""What each recipe trains, its compression rule, and its defaults (with their sources).

Every parameter a recipe does not train has `requires_grad=False`, so DDP needs no `find_unused_parameters` and
FSDP / ZeRO see a fixed trainable set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

RECIPES = ("projector", "lora", "voco", "voco-lora")
# Methods that act inside the language model or its mask: the projector / LoRA recipes tune a model whose visual
# tokens are fixed before the LLM (vision side), and VoCo has recipes of its own.
LM_SIDE_METHODS = {"sparsevlm": "SparseVLM runs dense in training mode", "voco": "use the voco / voco-lora recipes"}
PROJECTOR = "multi_modal_projector"
VISION_MODULES = ("vision_tower", "image_tower", "video_tower", "vision_tower_aux")


@dataclass(frozen=True)
class Defaults:
    """Hyper-parameters a recipe uses unless the command line says otherwise; `source` says where they come from."""

    learning_rate: float
    global_batch_size: int
    warmup_ratio: float
    weight_decay: float
    epochs: float
    scheduler: str
    source: str
    projector_learning_rate: float | None = None
    lora: dict = field(default_factory=dict)


LLAVA_FINETUNE = ("LLaVA-1.5 scripts/v1_5/finetune.sh: lr 2e-5, global batch 128, cosine, warmup ratio 0.03, "
                  "weight decay 0, 1 epoch, model_max_length 2048")
DEFAULTS = {
    "projector": Defaults(
        2e-5, 128, 0.03, 0.0, 1.0, "cosine",
        "VisionZip (CVPR 2025) Sec. 'Efficient tuning' (the '‡' rows): only the projector is tuned, with VisionZip on, "
        "on 1/10 of LLaVA-1.5's instruction data; the paper gives no optimiser settings, so the schedule is "
        + LLAVA_FINETUNE),
    "lora": Defaults(
        2e-4, 128, 0.03, 0.0, 1.0, "cosine",
        "LLaVA-1.5 scripts/v1_5/finetune_lora.sh: LoRA r 128, alpha 256, dropout 0.05 on every linear layer of the "
        "LLM, lr 2e-4, projector lr 2e-5, global batch 128, cosine, warmup ratio 0.03, weight decay 0, 1 epoch",
        projector_learning_rate=2e-5, lora={"r": 128, "alpha": 256, "dropout": 0.05}),
    "voco": Defaults(
        2e-5, 128, 0.03, 0.0, 2.0, "cosine",
        "VoCo-LLaMA scripts/finetune_voco_llama.sh and paper Sec. 3.5 (specs/voco.md §4): LLM + projector trained, "
        "CLIP frozen, lr 2e-5, global batch 128, cosine, warmup ratio 0.03, weight decay 0, 2 epochs, K = 1"),
    "voco-lora": Defaults(
        2e-4, 128, 0.03, 0.0, 2.0, "cosine",
        "not a paper recipe (VoCo-LLaMA trains the whole LLM): LLaVA-1.5's LoRA settings (finetune_lora.sh) on "
        "VoCo-LLaMA's schedule (2 epochs); the <voco> rows of embed_tokens and lm_head train (specs/voco.md §4)",
        projector_learning_rate=2e-5, lora={"r": 128, "alpha": 256, "dropout": 0.05}),
}


def check_compression(recipe: str, compression: dict) -> None:
    """Refuse a compression the recipe cannot train under, in one line."""
    method = compression.get("method")
    if recipe in ("voco", "voco-lora"):
        if method != "voco":
            raise ValueError(f"recipe {recipe} trains VoCo-LLaMA: --compression must be "
                             f"{{\"method\": \"voco\", \"num_voco_tokens\": K}} (or omitted), got {compression}")
        return
    if method in LM_SIDE_METHODS:
        raise ValueError(f"recipe {recipe} tunes under a vision-side compression (none, visionzip, ...); "
                         f"{method} is not one: {LM_SIDE_METHODS[method]}")


def freeze_all_but_projector(model: nn.Module) -> list[str]:
    """`projector` recipe (VisionZip‡; LLaVA's `tune_mm_mlp_adapter`): only the projector trains."""
    model.requires_grad_(False)
    trained = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == PROJECTOR:
            module.requires_grad_(True)
            trained.append(name)
    if not trained:
        raise ValueError(f"{type(model).__name__} has no {PROJECTOR} module to train")
    return trained


def language_model_linears(model: nn.Module) -> list[str]:
    """Names of every nn.Linear of the language model (LLaVA's find_all_linear_names: not the tower, the
    projector or lm_head)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and ".language_model." in f".{name}" and not any(v in name for v in VISION_MODULES + (PROJECTOR,))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no language_model linear layers for LoRA")
    return names


def add_lora(model: nn.Module, r: int, alpha: int, dropout: float, voco_token_id: int | None = None):
    """Wrap `model` in peft LoRA on the LLM's linear layers; the projector trains whole (`modules_to_save`, so
    Trainer checkpoints and the saved adapter carry it); with `voco_token_id`, that row of embed_tokens and of
    lm_head trains too (peft TrainableTokens). Everything else is frozen by peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("the lora recipes need peft: pip install 'slimvlm[train]'") from None

    extra = {}
    if voco_token_id is not None:
        extra["trainable_token_indices"] = {"embed_tokens": [voco_token_id], "lm_head": [voco_token_id]}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=language_model_linears(model),
                        modules_to_save=[PROJECTOR], bias="none", **extra)
    return get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
