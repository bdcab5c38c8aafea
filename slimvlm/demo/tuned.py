"""The demo's tuned VisionZip 64 rows: the bundled model's projector tuned under VisionZip 64 (VisionZip‡) and the
projector + LoRA adapter of `slimvlm train lora`, both written by benchmarks/tune_demo.py (bit for bit at one
thread) and shipped small: `assets/tuned-visionzip64/projector.safetensors` (export-projector format) and
`adapter_model.safetensors` + `adapter_config.json` (peft's files). Applying them needs neither peft nor a copy of
the model on disk: the projector is copied in, the LoRA factors are merged as peft merges them (W + B @ A * alpha / r).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

ASSETS = Path(__file__).parent / "assets" / "tuned-visionzip64"
COMPRESSION = {"method": "visionzip", "tokens": 64}
PEFT_PREFIX = "base_model.model."


def tuned_available() -> bool:
    return (ASSETS / "projector.safetensors").is_file() and (ASSETS / "adapter_model.safetensors").is_file()


def with_projector(model, folder: Path = ASSETS):
    """A copy of `model` under VisionZip 64 with the tuned projector."""
    from ..conversion.projector import load_projector

    tuned = copy.deepcopy(model).set_compression(COMPRESSION)
    tensors, _ = load_projector(folder / "projector.safetensors")
    projector = tuned.model.multi_modal_projector
    with torch.no_grad():
        for name, tensor in tensors.items():
            projector.get_parameter(name.removeprefix("multi_modal_projector.")).copy_(tensor)
    return tuned


def with_lora(model, folder: Path = ASSETS):
    """A copy of `model` under VisionZip 64 with the LoRA run's projector and its LoRA factors merged."""
    tuned = copy.deepcopy(model).set_compression(COMPRESSION)
    config = json.loads((folder / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    with torch.no_grad():
        for key, tensor in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            if ".lora_A." in name:
                module = tuned.get_submodule(name.split(".lora_A.")[0])
                up = tensors[key.replace(".lora_A.", ".lora_B.")]
                module.weight += (up @ tensor) * scaling
            elif "multi_modal_projector" in name and ".lora_B." not in name:
                tuned.get_parameter(name.replace(".modules_to_save.default", "")).copy_(tensor)
    return tuned
