"""Export and re-import VoCo-LLaMA weights (specs/voco.md §9).

"VoCo weights" are the `<voco>` embedding row, its lm_head row and the projector. The recipe fine-tunes
the whole LLM, so these alone rebuild the model only when the LLM was frozen (or LoRA-trained);
`mode="full"` therefore also writes the whole fine-tuned model as a slim checkpoint.

Outputs appear whole or not at all: everything is written to a temporary folder beside the target and
moved into place at the end. Safetensors only; keys sorted and tensors contiguous, so exports are
deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_folder, refuse_existing

VOCO_WEIGHTS_FILE = "voco_weights.safetensors"
VOCO_WEIGHTS_FORMAT = "slimvlm-voco-weights"
DELTA_FILE = "delta.safetensors"
EXPORT_MODES = ("voco-only", "full", "delta")
# Wider dtype for deltas: a difference of two values of the weight dtype is exact in it (barring extreme
# exponent gaps, which export checks), so base + delta gives the fine-tuned tensor back bit for bit.
DELTA_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float64}
PROJECTOR_KEYS = tuple(f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias"))


def voco_weight_tensors(model) -> dict[str, torch.Tensor]:
    """The §9 tensors of a VoCo model: `voco.embed_tokens_row` [H], `voco.lm_head_row` [H], projector weights."""
    voco_id = getattr(model.config, "voco_token_id", None)
    if voco_id is None:
        raise ValueError("model.config.voco_token_id is None: this model has no <voco> token to export")
    tensors = {
        "voco.embed_tokens_row": model.get_input_embeddings().weight[voco_id],
        "voco.lm_head_row": model.get_output_embeddings().weight[voco_id],
    }
    projector = model.model.multi_modal_projector.state_dict()
    for key in PROJECTOR_KEYS:
        tensors[key] = projector[key.removeprefix("model.multi_modal_projector.")]
    return {key: tensors[key].detach().to("cpu").contiguous().clone() for key in sorted(tensors)}


def language_model_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LLM part of a slim state dict (what the VoCo recipe fine-tunes besides the projector)."""
    return {k: v for k, v in state_dict.items() if k.startswith("model.language_model.") or k == "lm_head.weight"}


def weight_delta(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tuned - base for every LLM tensor, in the wider dtype of DELTA_DTYPES; raises unless base + delta == tuned."""
    delta = {}
    for key in sorted(language_model_tensors(tuned)):
        if key not in base or base[key].shape != tuned[key].shape:
            raise ValueError(f"base has no tensor {key!r} of shape {tuple(tuned[key].shape)}; is it the right base model?")
        wide = DELTA_DTYPES.get(tuned[key].dtype, torch.float64)
        diff = tuned[key].detach().cpu().to(wide) - base[key].detach().cpu().to(wide)
        if not torch.equal(apply_delta_tensor(base[key].detach().cpu(), diff).to(tuned[key].dtype), tuned[key].detach().cpu()):
            raise ValueError(f"delta of {key!r} is not exact in {wide}; export mode 'full' instead")
        delta[key] = diff.contiguous()
    return delta


def apply_delta_tensor(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (base.to(delta.dtype) + delta).to(base.dtype)


def export_voco_weights(
    model,
    out_dir: str | os.PathLike,
    mode: str = "voco-only",
    base_model: str = "",
    processor=None,
    overwrite: bool = False,
    base_state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write VoCo weights to `out_dir` and return it.

    mode "voco-only": `voco_weights.safetensors` with `voco.embed_tokens_row`, `voco.lm_head_row` and
        `model.multi_modal_projector.linear_{1,2}.{weight,bias}`; metadata `voco_token_id`, `voco_num`,
        `base_model` (enough on its own only if the LLM was frozen).
    mode "full": the whole model (`save_pretrained`: sharded safetensors + remote code), the processor
        when given, and the same `voco_weights.safetensors`.
    mode "delta": `delta.safetensors` = fine-tuned - base for every LLM tensor (`base_state_dict`, e.g.
        the base checkpoint's `state_dict()`), plus `voco_weights.safetensors`; `apply_voco_delta`
        rebuilds the fine-tuned tensors bit for bit.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"mode must be one of {list(EXPORT_MODES)}, got {mode!r}")
    if (mode == "delta") != (base_state_dict is not None):
        raise ValueError("base_state_dict is required for mode 'delta' and only used there")
    out_dir = Path(out_dir)
    tensors = voco_weight_tensors(model)
    compression = getattr(model.config, "compression", None) or {}
    metadata = {
        "format": VOCO_WEIGHTS_FORMAT,
        "format_version": "1",
        "mode": mode,
        "voco_token_id": str(model.config.voco_token_id),
        "voco_num": str(compression.get("num_voco_tokens", 1)),
        "base_model": base_model or str(getattr(model.config, "_name_or_path", "") or ""),
        "hidden_size": str(tensors["voco.embed_tokens_row"].shape[0]),
        "vocab_size": str(model.get_input_embeddings().weight.shape[0]),
    }
    refuse_existing(out_dir, overwrite)
    with atomic_folder(out_dir) as staging:
        if mode == "full":
            model.save_pretrained(staging)
            if processor is not None:
                processor.save_pretrained(staging)
        if mode == "delta":
            save_file(weight_delta(model.state_dict(), base_state_dict), staging / DELTA_FILE, metadata=metadata)
        save_file(tensors, staging / VOCO_WEIGHTS_FILE, metadata=metadata)
    return out_dir


def load_voco_weights(base_model, path: str | os.PathLike, tokenizer=None):
    """Put exported VoCo weights into `base_model` (in place, bit-exact) and switch it to VoCo; returns it.

    path: an export folder or its `voco_weights.safetensors`. The `<voco>` rows go to the exported
    `voco_token_id` (the embeddings grow when they are too small); with `tokenizer` (or a processor),
    `<voco>` must map to that id. Sets `config.voco_token_id` and `compression = {"method": "voco",
    "num_voco_tokens": voco_num}`.
    """
    path = Path(path)
    file = path / VOCO_WEIGHTS_FILE if path.is_dir() else path
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != VOCO_WEIGHTS_FORMAT:
            raise ValueError(f"{file} is not a VoCo weights file (format={metadata.get('format')!r})")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    voco_id, voco_num = int(metadata["voco_token_id"]), int(metadata["voco_num"])
    if tokenizer is not None:
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        found = tokenizer.convert_tokens_to_ids("<voco>")
        if found != voco_id:
            raise ValueError(f"the tokenizer maps '<voco>' to {found}, the exported weights to {voco_id}")
    hidden = base_model.get_input_embeddings().weight.shape[1]
    if tensors["voco.embed_tokens_row"].shape != (hidden,):
        raise ValueError(f"exported rows have shape {tuple(tensors['voco.embed_tokens_row'].shape)}, "
                         f"the base model's hidden size is {hidden}")
    if voco_id >= base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(voco_id + 1, mean_resizing=False)
    projector = {key.removeprefix("model.multi_modal_projector."): tensors[key] for key in PROJECTOR_KEYS}
    with torch.no_grad():
        for weight, key in ((base_model.get_input_embeddings().weight, "voco.embed_tokens_row"),
                            (base_model.get_output_embeddings().weight, "voco.lm_head_row")):
            weight[voco_id] = tensors[key].to(weight.device, weight.dtype)
        base_model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    base_model.config.voco_token_id = voco_id
    base_model.config.compression = {"method": "voco", "num_voco_tokens": voco_num}
    return base_model


def apply_voco_delta(base_model, path: str | os.PathLike, tokenizer=None):
    """Rebuild a delta export on `base_model` (in place): LLM tensors += delta, then the VoCo weights; returns it."""
    path = Path(path)
    with safe_open(str(path / DELTA_FILE), framework="pt") as handle:
        delta = {key: handle.get_tensor(key) for key in handle.keys()}
    state = base_model.state_dict()
    missing = sorted(set(delta) - set(state))
    if missing:
        raise ValueError(f"the base model lacks {missing[:5]} that the delta changes")
    with torch.no_grad():
        for key, diff in delta.items():
            state[key].copy_(apply_delta_tensor(state[key].cpu(), diff).to(state[key].device))
    return load_voco_weights(base_model, path, tokenizer)


__all__ = ["EXPORT_MODES", "apply_voco_delta", "VOCO_WEIGHTS_FILE", "export_voco_weights", "load_voco_weights", "voco_weight_tensors"]
