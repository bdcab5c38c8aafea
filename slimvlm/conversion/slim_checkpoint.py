"""Stock LLaVA-1.5 checkpoint -> slim checkpoint: safetensors in the current layout, remote code, processor, card.

The output appears whole or not at all: everything is written to a temporary folder beside it and moved
into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..hub_cards import card_for_model, hub_model_id, write_model_card
from .atomic import atomic_folder, refuse_existing


def convert_to_slim(
    source: str | os.PathLike,
    output: str | os.PathLike,
    compression: dict | None,
    base_model: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Load `source` (hub id or folder, current or legacy llava-hf layout) with `compression` and save a slim checkpoint.

    Everything that can be checked without the weights is checked before they load: the output folder, the
    card's base model (`base_model`, default `source`: a Hub id), the compression against the model's config,
    and for VoCo a `<voco>` token in the tokenizer (its id becomes `config.voco_token_id` when the config has none).
    progress: called with a short description when each step begins.

    Raises:
        FileExistsError: `output` exists and `overwrite` is False.
        ValueError: `compression` is invalid for this model, `base_model` is no Hub id, VoCo without a `<voco>`
            token, or a weight of the model was not found in `source`.
    """
    from .. import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaProcessor

    step = progress or (lambda description: None)
    output = Path(output)
    refuse_existing(output, overwrite)
    base_model = hub_model_id(base_model or source)
    step(f"reading the config and processor of {source}")
    config = SlimLlavaConfig.from_pretrained(source, compression=compression)
    if config.compression["method"] == "voco":
        from transformers import AutoTokenizer

        config.voco_token_id = checked_voco_token_id(config, AutoTokenizer.from_pretrained(source))
    processor = SlimLlavaProcessor.from_pretrained(source, compression=config.compression)
    step(f"loading the weights of {source}")
    model, info = SlimLlavaForConditionalGeneration.from_pretrained(source, config=config, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{source} does not provide every weight of SlimLlavaForConditionalGeneration: "
            f"missing {sorted(info['missing_keys'])[:10]}, mismatched {sorted(info['mismatched_keys'])[:10]}"
        )

    step(f"writing {output}")
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_model_card(staging, card_for_model(model, base_model=base_model))
    return output


def checked_voco_token_id(config, tokenizer) -> int:
    """The id of `<voco>` for a VoCo checkpoint: the tokenizer's, which must have an embedding row and agree with
    `config.voco_token_id` when that is set; ValueError otherwise."""
    from ..voco import VOCO_TOKEN

    fix = "add it with slimvlm.voco.add_voco_token(model, processor) and train the model for VoCo first"
    if VOCO_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"compression method 'voco' needs a {VOCO_TOKEN} token, and this checkpoint's tokenizer has none; {fix}")
    token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    vocab_size = config.get_text_config().vocab_size
    if token_id >= vocab_size:
        raise ValueError(f"the tokenizer's {VOCO_TOKEN} id {token_id} has no embedding row (vocab_size {vocab_size}); {fix}")
    if config.voco_token_id not in (None, token_id):
        raise ValueError(f"config.voco_token_id = {config.voco_token_id} but the tokenizer maps {VOCO_TOKEN} to {token_id}")
    return token_id
