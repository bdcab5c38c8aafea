"""The analytic FLOP model of every speed benchmark (multiply-add = 2 FLOPs), in one place.

`bench_speed.py`, `bench_speed_next.py`, `bench_speed_video.py` (CPU, shortened language models) and
`bench_gpu.py` (accelerator, full depth) all count prefill FLOPs with these functions, so their "ideal
speed-up" columns mean the same thing: the ratio of the uncompressed prefill's FLOPs to the compressed one's.
"""

from __future__ import annotations


def vit_flops(config, tokens: int, layers: int) -> float:
    """`layers` ViT encoder layers over `tokens` tokens (projections, MLP and full attention)."""
    width, ffn = config.hidden_size, config.intermediate_size
    per_layer = 2 * tokens * (4 * width * width + 2 * width * ffn) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def llm_layer_flops(config, tokens: int, context: int | None = None) -> float:
    """One decoder layer over `tokens` queries attending to `context` keys (causal prefill: about half)."""
    width, ffn = config.hidden_size, config.intermediate_size
    kv_width = config.num_key_value_heads * (width // config.num_attention_heads)
    projections = 2 * tokens * (2 * width * width + 2 * width * kv_width + 3 * width * ffn)
    context = tokens if context is None else context
    attention = 2 * 2 * tokens * context * width / (2 if context == tokens else 1)
    return projections + attention


def projector_flops(vision_width: int, text_width: int, tokens: int) -> float:
    """LLaVA's 2-layer MLP projector over `tokens` features."""
    return 2 * tokens * (vision_width * text_width + text_width**2)


def convnext_flops(config, side: int) -> float:
    """A ConvNeXt trunk (stem + stages; no pooler) on a `side` x `side` image (Mini-Gemini's high-resolution tower).

    Stem: patch_size² conv; each stage: a 2x2 stride-2 downsample (stages 1..), then blocks of a 7x7 depthwise
    conv and an MLP C -> 4C -> C. Norms, activations and layer scale are left out (a few % at most).
    """
    widths, depths, patch = config.hidden_sizes, config.depths, config.patch_size
    channels = getattr(config, "num_channels", 3)
    pixels = (side // patch) ** 2
    total = 2 * pixels * channels * widths[0] * patch * patch
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        if stage:
            pixels //= 4
            total += 2 * pixels * widths[stage - 1] * width * 4
        total += depth * 2 * pixels * (49 * width + 8 * width * width)
    return total


def mining_flops(width: int, aux_width: int, tokens: int, high_resolution_pixels: int) -> float:
    """Mini-Gemini's patch-info mining: a query per low-resolution token, keys and values for every
    high-resolution pixel it owns (`high_resolution_pixels` in all, over all views), single-head attention."""
    projections = 2 * tokens * width * width + 2 * 2 * high_resolution_pixels * aux_width * width
    cells = high_resolution_pixels / tokens
    return projections + 2 * 2 * tokens * cells * width


def prefill_flops(vision_config, text_config, *, views: int, tokens_per_view: int, tower_layers: int,
                  projected: int, lengths: list[int], extra: float = 0.0) -> float:
    """Vision tower over `views` views + projector over `projected` features + one decoder layer per entry of
    `lengths` (the sequence length each layer runs on) + `extra` (family-specific encoders, e.g. ConvNeXt)."""
    total = views * vit_flops(vision_config, tokens_per_view, tower_layers)
    total += projector_flops(vision_config.hidden_size, text_config.hidden_size, projected)
    return total + extra + sum(llm_layer_flops(text_config, n) for n in lengths)
