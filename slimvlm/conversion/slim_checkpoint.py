"""Stock checkpoint of a supported family (LLaVA-1.5, LLaVA-NeXT, ...) -> slim checkpoint: safetensors in the current layout, remote code, processor, card.

The output appears whole or not at all: everything is written to a temporary folder beside it and moved
into place at the end.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..hub_cards import card_for_model, hub_model_id, write_model_card
from .atomic import atomic_folder, refuse_existing
from .llava_original import convert_original_llava, is_original_llava_folder
from .mini_gemini_original import convert_original_mgm, is_original_mgm_folder


def convert_to_slim(
    source: str | os.PathLike,
    output: str | os.PathLike,
    compression: dict | None,
    base_model: str | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    vision_tower: str | os.PathLike | None = None,
    vision_tower_aux: str | os.PathLike | None = None,
    relevance_encoder: str | os.PathLike | None = None,
) -> Path:
    """Load `source` (hub id or folder, current or legacy llava-hf layout, or a folder of the original LLaVA
    code's layout) with `compression` and save a slim checkpoint.

    Everything that can be checked without the weights is checked before they load: the output folder, the
    card's base model (`base_model`, default `source`: a Hub id), the compression against the model's config,
    and for VoCo a `<voco>` token in the tokenizer (its id becomes `config.voco_token_id` when the config has none).
    progress: called with a short description when each step begins.
    vision_tower: for an original-layout source, the CLIP tower (`llava_original.convert_original_llava`).
    vision_tower_aux: for an original Mini-Gemini folder, the open_clip ConvNeXt used when the checkpoint has no
        aux tower weights (`mini_gemini_original.convert_original_mgm`).
    relevance_encoder: CDPruner's CLIP (Hub id or folder): its text tower, projections and tokenizer are fetched
        once here and stored inside the checkpoint (`relevance.attach_relevance_encoder`); stock layouts only.

    Raises:
        FileExistsError: `output` exists and `overwrite` is False.
        ValueError: `compression` is invalid for this model, `base_model` is no Hub id, VoCo without a `<voco>`
            token, or a weight of the model was not found in `source`.
    """
    from ..auto import family_of

    step = progress or (lambda description: None)
    output = Path(output)
    refuse_existing(output, overwrite)
    if (compression or {}).get("method") == "voco":  # every layout: before the original converters load weights
        from transformers import AutoTokenizer

        check_voco_token(AutoTokenizer.from_pretrained(source))
    if is_original_mgm_folder(source):
        return convert_original_mgm(source, output, compression, base_model=hub_model_id(base_model) if base_model else None,
                                    vision_tower=vision_tower, vision_tower_aux=vision_tower_aux, overwrite=overwrite,
                                    progress=step)
    base_model = hub_model_id(base_model or source)
    if is_original_llava_folder(source):
        if relevance_encoder is not None:
            raise ValueError("relevance_encoder needs a stock-layout source; convert the original folder first")
        return convert_original_to_slim(source, output, compression, base_model, overwrite, step, vision_tower)
    step(f"reading the config and processor of {source}")
    family = family_of(source)
    if relevance_encoder is not None:
        from ..configuration_slimvlm import normalize_compression

        normalize_compression(compression, relevance_encoder=True)  # the schema, before any weights load
        config = family.config.from_pretrained(source)
    else:
        config = family.config.from_pretrained(source, compression=compression)
    if config.compression["method"] == "voco":
        from transformers import AutoTokenizer

        config.voco_token_id = checked_voco_token_id(config, AutoTokenizer.from_pretrained(source))
    processor = family.processor.from_pretrained(source, compression=config.compression)
    step(f"loading the weights of {source}")
    model, info = family.generation.from_pretrained(source, config=config, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{source} does not provide every weight of {family.generation.__name__}: "
            f"missing {sorted(info['missing_keys'])[:10]}, mismatched {sorted(info['mismatched_keys'])[:10]}"
        )
    if relevance_encoder is not None:
        from .relevance import attach_relevance_encoder

        step(f"adding the relevance encoder from {relevance_encoder}")
        attach_relevance_encoder(model, relevance_encoder, processor=processor)
        model.set_compression(compression)
        processor.set_compression(model.config.compression)

    step(f"writing {output}")
    with atomic_folder(output) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        write_model_card(staging, card_for_model(model, base_model=base_model))
    return output


def convert_original_to_slim(source, output: Path, compression: dict | None, base_model: str, overwrite: bool,
                             progress: Callable[[str], None], vision_tower=None) -> Path:
    """An original-layout LLaVA-1.5 or 1.6 folder -> stock LLaVA / LLaVA-NeXT checkpoint (in a temporary folder)
    -> slim checkpoint."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slimvlm-original-") as stock:
        stock = convert_original_llava(source, Path(stock) / "stock", vision_tower=vision_tower, progress=progress)
        return convert_to_slim(stock, output, compression, base_model=base_model, overwrite=overwrite, progress=progress)


VOCO_FIX = "add it with slimvlm.voco.add_voco_token(model, processor) and train the model for VoCo first"


def check_voco_token(tokenizer) -> None:
    """ValueError unless the tokenizer has the `<voco>` token (compression method 'voco' needs it)."""
    from ..voco import VOCO_TOKEN

    if VOCO_TOKEN not in tokenizer.get_vocab():
        raise ValueError(f"compression method 'voco' needs a {VOCO_TOKEN} token, and this checkpoint's tokenizer has "
                         f"none; {VOCO_FIX}")


def checked_voco_token_id(config, tokenizer) -> int:
    """The id of `<voco>` for a VoCo checkpoint: the tokenizer's, which must have an embedding row and agree with
    `config.voco_token_id` when that is set; ValueError otherwise."""
    from ..voco import VOCO_TOKEN

    fix = VOCO_FIX
    check_voco_token(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    vocab_size = config.get_text_config().vocab_size
    if token_id >= vocab_size:
        raise ValueError(f"the tokenizer's {VOCO_TOKEN} id {token_id} has no embedding row (vocab_size {vocab_size}); {fix}")
    if config.voco_token_id not in (None, token_id):
        raise ValueError(f"config.voco_token_id = {config.voco_token_id} but the tokenizer maps {VOCO_TOKEN} to {token_id}")
    return token_id
