"""Export a checkpoint's projector to one safetensors file, and build a checkpoint from a base and a projector.

`projector.safetensors` holds the projector of a checkpoint (`linear_1.*`, `linear_2.*`, and what is trained with
it: LLaVA-NeXT's `image_newline` vector, Mini-Gemini's patch-info mining module `patch_mining.*`) with metadata: format, family, activation, the vision and
text widths, and the source. `import_projector` accepts it, or the original LLaVA code's `mm_projector.bin`
(a stage-1 projector: `model.mm_projector.{0,2}.*`, GELU; read with `torch.load(weights_only=True)`), checks the
activation and every shape against the base, and writes a copy of the base with the projector replaced, whole or
not at all. Tensors are stored bit for bit (cast to the base's dtype when the dtypes differ).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, refuse_existing

PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_FORMAT = "slimvlm-projector"
# where the projector lives in a checkpoint: current layout first, then legacy llava-hf
PREFIXES = ("model.", "")
PARTS = ("multi_modal_projector.", "image_newline", "patch_mining.")
ORIGINAL_NAMES = {"model.mm_projector.0.": "multi_modal_projector.linear_1.",
                  "model.mm_projector.2.": "multi_modal_projector.linear_2.", "model.image_newline": "image_newline"}
FAMILIES = {"llava": "llava", "slim_llava": "llava", "llava_next": "llava-next", "slim_llava_next": "llava-next",
            "slim_mini_gemini": "mini-gemini", "llava_onevision": "llava-onevision",
            "slim_llava_onevision": "llava-onevision"}


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; give a transformers checkpoint folder")
    return files


def _checkpoint_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a checkpoint folder")
    config = json.loads(path.read_text())
    if config.get("model_type") not in FAMILIES:
        raise ValueError(f"model_type {config.get('model_type')!r} of {folder} has no projector export; "
                         f"allowed: {sorted(FAMILIES)}")
    return config


def _projector_name(key: str) -> str | None:
    """`model.multi_modal_projector.linear_1.weight` (or legacy / NeXT names) -> `multi_modal_projector.linear_1.weight`."""
    for prefix in PREFIXES:
        if key.startswith(prefix) and key[len(prefix):].startswith(PARTS):
            return key[len(prefix):]
    return None


def read_projector(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The projector tensors of a checkpoint folder, by their names inside the model (`multi_modal_projector.*`)."""
    tensors = {}
    for file in _weight_files(Path(folder)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                name = _projector_name(key)
                if name is not None:
                    tensors[name] = handle.get_tensor(key)
    if "multi_modal_projector.linear_1.weight" not in tensors:
        raise ValueError(f"{folder} has no multi_modal_projector weights")
    return tensors


def export_projector(model: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `output/projector.safetensors` from the checkpoint folder `model`; returns the file's path."""
    model, output = Path(model), Path(output)
    config = _checkpoint_config(model)
    refuse_existing(output, overwrite)
    tensors = read_projector(model)
    linear_1, linear_2 = tensors["multi_modal_projector.linear_1.weight"], tensors["multi_modal_projector.linear_2.weight"]
    metadata = {"format": PROJECTOR_FORMAT, "format_version": "1", "family": FAMILIES[config["model_type"]],
                "activation": str(config.get("projector_hidden_act", "gelu")), "vision_hidden_size": str(linear_1.shape[1]),
                "projector_hidden_size": str(linear_1.shape[0]), "text_hidden_size": str(linear_2.shape[0]),
                "source": str(config.get("_name_or_path") or model)}
    with atomic_folder(output) as staging:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, staging / PROJECTOR_FILE, metadata=metadata)
    return output / PROJECTOR_FILE


def load_projector(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors by name inside the model, metadata) from our projector.safetensors (or a folder holding it) or an
    original `mm_projector.bin` (activation: gelu, as the original mlp2x_gelu)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"projector {path} does not exist; give projector.safetensors or mm_projector.bin")
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != PROJECTOR_FORMAT:
            raise ValueError(f"{path} is not a projector export (format={metadata.get('format')!r}, allowed: {PROJECTOR_FORMAT!r})")
        return load_file(str(path)), metadata
    if path.suffix != ".bin":
        raise ValueError(f"projector {path} must be a .safetensors export or an original .bin, got suffix {path.suffix!r}")
    original = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {}
    for key, tensor in original.items():
        prefix = next((p for p in ORIGINAL_NAMES if key.startswith(p) or f"model.{key}".startswith(p)), None)
        if prefix is None:
            raise ValueError(f"original projector weight {key!r} has no slimvlm mapping; known: {sorted(ORIGINAL_NAMES)}")
        full = key if key.startswith(prefix) else f"model.{key}"
        tensors[ORIGINAL_NAMES[prefix] + full[len(prefix):]] = tensor
    return tensors, {"activation": "gelu", "source": str(path)}


def import_projector(base: str | os.PathLike, projector: str | os.PathLike, output: str | os.PathLike,
                     overwrite: bool = False) -> Path:
    """Copy the checkpoint folder `base` to `output` with its projector replaced by `projector`; returns `output`.

    Raises ValueError when the projector's activation differs from the base's `projector_hidden_act`, when a
    tensor is missing or has another shape than the base's, or when the projector has a tensor the base lacks.
    """
    base, output = Path(base), Path(output)
    config = _checkpoint_config(base)
    refuse_existing(output, overwrite)
    tensors, metadata = load_projector(projector)
    activation, expected = metadata.get("activation"), config.get("projector_hidden_act", "gelu")
    if activation is not None and activation != expected:
        raise ValueError(f"projector activation {activation!r} does not match the base's projector_hidden_act "
                         f"{expected!r}; give a projector trained for this architecture")
    base_tensors = read_projector(base)
    missing, extra = sorted(set(base_tensors) - set(tensors)), sorted(set(tensors) - set(base_tensors))
    if missing or extra:
        raise ValueError(f"projector {projector} does not fit {base}: missing {missing}, not in the base {extra}")
    for name, tensor in tensors.items():
        if tensor.shape != base_tensors[name].shape:
            raise ValueError(f"projector tensor {name} has shape {tuple(tensor.shape)}, the base's is "
                             f"{tuple(base_tensors[name].shape)}; the projector belongs to another model size")
    with atomic_folder(output) as staging:
        for item in base.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, staging / item.name)
        for file in _weight_files(base):
            with safe_open(str(file), framework="pt") as handle:
                file_metadata = handle.metadata()
            state = load_file(str(file))
            for key in state:
                name = _projector_name(key)
                if name is not None:
                    state[key] = tensors[name].to(state[key].dtype).contiguous()
            save_file(state, staging / file.name, metadata=file_metadata)
    return output


__all__ = ["PROJECTOR_FILE", "export_projector", "import_projector", "load_projector", "read_projector"]
