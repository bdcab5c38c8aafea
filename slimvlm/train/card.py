"""The model card of a trained output: SlimVLM's card plus what training used (recipe, data size, steps,
compression) as text and as a `slimvlm_training` metadata block; `datasets` and `base_model` where the Hub has
fields for them."""

from __future__ import annotations

import json
from pathlib import Path

from ..modelcard_slimvlm import card_for_model, hub_model_id, write_model_card

RELATIONS = {"projector": "finetune", "lora": "adapter", "voco": "finetune", "voco-lora": "adapter"}


def write_training_card(model, folder: str | Path, summary: dict, base_model: str | None = None,
                        datasets: list[str] | None = None) -> Path:
    """Write folder/README.md for a trained model; `base_model` (a Hub id) defaults to the trained-from model
    when that is a Hub id, and is left out for a local folder."""
    if base_model is None:
        try:
            base_model = hub_model_id(summary["model"])
        except ValueError:
            base_model = None
    card = card_for_model(model, base_model=base_model, datasets=datasets or None, tags=["fine-tuned"])
    if base_model is not None:
        card.data.base_model_relation = "finetune" if summary.get("merged") else RELATIONS[summary["recipe"]]
    keys = ("recipe", "compression", "data_size", "steps", "epochs", "global_batch_size", "learning_rate", "seed",
            "world_size", "bf16")
    card.data.slimvlm_training = {key: summary[key] for key in keys if key in summary}
    lines = ["", "## Training", "",
             f"Fine-tuned with `slimvlm train {summary['recipe']}` under compression "
             f"`{json.dumps(summary['compression'], sort_keys=True)}`: {summary['data_size']} records, "
             f"{summary['steps']} optimizer steps (global batch {summary['global_batch_size']}, learning rate "
             f"{summary['learning_rate']}, seed {summary['seed']}, {summary['world_size']} process(es)).", ""]
    if summary["recipe"].endswith("lora"):
        lines += ["The LoRA adapter was merged into these weights." if summary.get("merged") else
                  "The LoRA adapter is in `adapter/`: load this folder, then `model.load_adapter(\"<this repo>\", "
                  "subfolder=\"adapter\")` (peft).", ""]
    card.text = card.text.rstrip("\n") + "\n" + "\n".join(lines)
    return write_model_card(folder, card)
