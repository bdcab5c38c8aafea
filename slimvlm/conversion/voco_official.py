"""Convert checkpoints trained with the official VoCo-LLaMA code to slimvlm (specs/voco.md §8).

The official `LlavaLlamaForCausalLM` checkpoints (transformers 4.37 layout) have `<voco>` as the only
added token, at the row right after the base vocabulary (32000 for Vicuna). llava-hf uses that id for
`<image>` and the next for `<pad>`, so `<voco>` moves to base + 2, in `embed_tokens` and `lm_head` alike:

    rows 0 .. base-1   kept
    base, base + 1     `<image>`, `<pad>` (llava-hf's rows when given, else zeros: the image row is
                       overwritten by features and pad is never predicted in practice)
    base + 2           the official `<voco>` row
"""

from __future__ import annotations

import re

import torch

# (pattern, replacement) in order; the first match wins. None drops the key.
OFFICIAL_KEY_MAP: tuple[tuple[str, str | None], ...] = (
    (r".*rotary_emb\.inv_freq$", None),
    (r"^model\.image_newline$", None),
    (r".*embeddings\.position_ids$", None),
    (r"^model\.embed_tokens\.weight$", "model.language_model.embed_tokens.weight"),
    (r"^model\.layers\.(\d+)\.(.+)$", r"model.language_model.layers.\1.\2"),
    (r"^model\.norm\.weight$", "model.language_model.norm.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"model.multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"model.multi_modal_projector.linear_2.\1"),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.(.+)$", r"model.vision_tower.\1"),
)


def map_official_key(key: str, key_map: tuple[tuple[str, str | None], ...] = OFFICIAL_KEY_MAP,
                     layout: str = "official VoCo-LLaMA") -> str | None:
    """The slimvlm name of a weight of the original LLaVA-code layout (None when it is dropped), by the first
    matching pattern of `key_map`; raises ValueError on an unknown key."""
    for pattern, replacement in key_map:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise ValueError(f"{layout} weight {key!r} has no slimvlm mapping; known patterns: {[p for p, _ in key_map]}")


def remap_vocab_rows(matrix: torch.Tensor, official_voco_id: int, base_rows: torch.Tensor | None = None,
                     vocab_size: int | None = None) -> torch.Tensor:
    """[official_vocab, H] -> [vocab_size, H] with `<voco>` moved to official_voco_id + 2.

    base_rows: [2, H] llava-hf rows for `<image>` and `<pad>` (zeros when None). vocab_size defaults
    to official_voco_id + 3; larger sizes (llava-hf pads to 32064) get zero rows.
    """
    hidden = matrix.shape[1]
    size = vocab_size or official_voco_id + 3
    if size < official_voco_id + 3:
        raise ValueError(f"vocab_size={size} leaves no room for <voco> at {official_voco_id + 2}")
    out = matrix.new_zeros(size, hidden)
    out[:official_voco_id] = matrix[:official_voco_id]
    if base_rows is not None:
        out[official_voco_id : official_voco_id + 2] = base_rows.to(matrix.dtype)
    out[official_voco_id + 2] = matrix[official_voco_id]
    return out


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor],
    official_voco_id: int | None = None,
    base_embed_rows: torch.Tensor | None = None,
    base_lm_head_rows: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Official VoCo-LLaMA state dict -> `SlimLlavaForConditionalGeneration` state dict (v5 layout).

    official_voco_id: the `<voco>` row in the official matrices (default: the last row).
    The result's `<voco>` id is official_voco_id + 2; `<image>` = official_voco_id, `<pad>` = + 1.
    """
    embed = state_dict["model.embed_tokens.weight"]
    voco = embed.shape[0] - 1 if official_voco_id is None else official_voco_id
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        new_key = map_official_key(key)
        if new_key is None:
            continue
        if key == "model.embed_tokens.weight":
            tensor = remap_vocab_rows(tensor, voco, base_embed_rows, vocab_size)
        elif key == "lm_head.weight":
            tensor = remap_vocab_rows(tensor, voco, base_lm_head_rows, vocab_size)
        out[new_key] = tensor
    return out


def official_token_ids(official_voco_id: int) -> dict[str, int]:
    """Config ids after conversion: image_token_index, pad_token_id, voco_token_id."""
    return {"image_token_index": official_voco_id, "pad_token_id": official_voco_id + 1,
            "voco_token_id": official_voco_id + 2}


# CLIP ViT-L/14-336, the official vision tower (used when the checkpoint does not carry its config).
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
TEXT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "hidden_act",
               "initializer_range", "bos_token_id", "eos_token_id")


def convert_official_config(official: dict, num_voco_tokens: int, vision_config: dict | None = None,
                            official_voco_id: int | None = None, vocab_size: int | None = None):
    """Official `llava_llama` config.json dict -> `SlimLlavaConfig` with VoCo compression (§8 "Resulting config")."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from ..configuration_slimvlm import SlimLlavaConfig

    if official.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {official.get('mm_projector_type')!r} is not supported; allowed: ['mlp2x_gelu']")
    voco = official["vocab_size"] - 1 if official_voco_id is None else official_voco_id
    ids = official_token_ids(voco)
    text = LlamaConfig(vocab_size=vocab_size or voco + 3, pad_token_id=ids["pad_token_id"], tie_word_embeddings=False,
                       **{k: official[k] for k in TEXT_FIELDS if official.get(k) is not None})
    vision = CLIPVisionConfig(**(vision_config or CLIP_L_336))
    config = SlimLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=ids["image_token_index"], vision_feature_layer=official.get("mm_vision_select_layer", -2),
                             vision_feature_select_strategy="default", projector_hidden_act="gelu", image_seq_length=576,
                             tie_word_embeddings=False, compression={"method": "voco", "num_voco_tokens": num_voco_tokens})
    config.voco_token_id = ids["voco_token_id"]
    config.pad_token_id = ids["pad_token_id"]
    return config


__all__ = ["OFFICIAL_KEY_MAP", "convert_official_config", "convert_official_state_dict", "map_official_key", "official_token_ids",
           "remap_vocab_rows"]
