"""Stock LLaVA-1.5 checkpoint -> slim checkpoint: safetensors in the current layout, remote code, processor, card.

The output appears whole or not at all: everything is written to a temporary folder beside it and moved
into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..hub_cards import card_for_model, hub_model_id, write_model_card
from .atomic import atomic_folder, refuse_existing


def convert_to_slim(
    source: str | os.PathLike,
    output: str | os.PathLike,
    compression: dict | None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Load `source` (hub id or folder, current or legacy llava-hf layout) with `compression` and save a slim checkpoint.

    Raises:
        FileExistsError: `output` exists and `overwrite` is False.
        ValueError: `base_model` (default `source`) is no Hub id, `compression` is invalid, or a weight of the model was not found in `source`.
    """
    from .. import SlimLlavaForConditionalGeneration, SlimLlavaProcessor

    output = Path(output)
    refuse_existing(output, overwrite)
    base_model = hub_model_id(base_model or source)
    model, info = SlimLlavaForConditionalGeneration.from_pretrained(source, compression=compression, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{source} does not provide every weight of SlimLlavaForConditionalGeneration: "
            f"missing {sorted(info['missing_keys'])[:10]}, mismatched {sorted(info['mismatched_keys'])[:10]}"
        )
    processor = SlimLlavaProcessor.from_pretrained(source, compression=model.config.compression)

    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_model_card(staging, card_for_model(model, base_model=base_model))
    return output
