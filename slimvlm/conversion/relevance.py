"""Put CDPruner's CLIP relevance encoder inside a slim model, once, at conversion (specs/cdpruner.md §10).

Not shipped: the checkpoint then carries the three parts (`model.relevance_encoder.*` in its safetensors,
`config.relevance_encoder_config`) and its processor the CLIP tokenizer (`relevance_tokenizer/`), so loading
never needs a second model id or the network.
"""

from __future__ import annotations

import os

import torch
from transformers import CLIPModel
from transformers.utils import logging

from ..modeling_slimvlm import build_relevance_encoder

logger = logging.get_logger(__name__)


def attach_relevance_encoder(model, clip, processor=None, tokenizer=None, source: str | None = None,
                             revision: str | None = None):
    """Copy CLIP's text transformer, text_projection and visual_projection into `model.model.relevance_encoder`
    (float32, like the tower) and record them in `model.config.relevance_encoder_config`.

    clip: a `CLIPModel`, or a Hub id / folder to load one from (e.g. "openai/clip-vit-large-patch14-336").
    processor: a Slim processor that gets the CLIP tokenizer as `relevance_tokenizer` (saved in
        `relevance_tokenizer/`); `tokenizer` overrides the one loaded from `clip`'s id or folder.
    Warns when the model's vision tower differs from CLIP's (expected for fine-tuned towers; the official code
    pairs such towers with the original CLIP heads all the same). Returns `model`.
    """
    if isinstance(clip, (str, os.PathLike)):
        source = source or str(clip)
        if processor is not None and tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(clip, revision=revision)
        clip = CLIPModel.from_pretrained(clip, revision=revision, dtype=torch.float32)
    base = model.model
    vision_tower = base.vision_tower if hasattr(base, "vision_tower") else base.image_tower  # Video-LLaVA: two towers
    if vision_tower.config.hidden_size != clip.config.vision_config.hidden_size:
        raise ValueError(f"the CLIP model's vision width {clip.config.vision_config.hidden_size} differs from this "
                         f"model's vision tower ({vision_tower.config.hidden_size}): its visual_projection cannot apply")
    encoder_config = {
        "text_config": clip.config.text_config.to_dict(),
        "projection_dim": clip.config.projection_dim,
        "vision_hidden_size": clip.config.vision_config.hidden_size,
        "source": source,
        "revision": revision,
    }
    encoder = build_relevance_encoder(encoder_config)
    encoder.text_model.load_state_dict(clip.text_model.state_dict())
    encoder.text_projection.load_state_dict(clip.text_projection.state_dict())
    encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    ours, theirs = vision_tower.state_dict(), clip.vision_model.state_dict()
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k].float().cpu(), theirs[k].float().cpu()) for k in ours)
    if not same:
        logger.warning("the model's vision tower differs from the CLIP vision tower of %s; CDPruner pairs it with that "
                       "CLIP's text tower and projections all the same (as the official code does)", source or "the given CLIP")
    device = next(vision_tower.parameters()).device
    model.model.relevance_encoder = encoder.to(device=device, dtype=torch.float32).eval()
    model.config.relevance_encoder_config = encoder_config
    if processor is not None:
        if tokenizer is None:
            raise ValueError("give the CLIP tokenizer (tokenizer=...) or a CLIP id / folder to load it from")
        processor.relevance_tokenizer = tokenizer
        processor.set_compression(processor.compression)
    return model
