"""Slim configs of the Qwen-VL families (Qwen2.5-VL; Qwen3-VL): the stock configs plus `compression`.

Shipped with checkpoints: imports only transformers and flat siblings. VisionZip counts are fractions of each
image's merged tokens (specs/modern_families.md §3): `{"method": "visionzip", "dominant_ratio": 0.45,
"contextual_ratio": 0.05}` or the shorthand `{"method": "visionzip", "retain_ratio": 0.5}`.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from .configuration_slimvlm import SlimCompressionMixin
from .visionzip import visionzip_counts


def qwen_token_count(compression: dict, grid_thw, spatial_merge_size: int) -> int:
    """Tokens one image or video of grid (t, gh, gw) becomes in the language model under `compression`.

    Shared by the processor (placeholders) and the model (features): t·gh·gw/m² stock; under VisionZip every view
    (an image, or one temporal step of a video) of n = gh·gw/m² units keeps `sum(visionzip_counts(n, ρ_d, ρ_c))`.
    """
    steps, height, width = (int(x) for x in grid_thw)
    units = height * width // spatial_merge_size**2
    if compression["method"] != "visionzip":
        return steps * units
    return steps * sum(visionzip_counts(units, compression["dominant_ratio"], compression["contextual_ratio"]))


class QwenConfigMixin(SlimCompressionMixin):
    """Compression on the Qwen-VL configs: VisionZip counts are ratios; methods this family cannot run yet raise."""

    visionzip_ratios = True
    unsupported_methods = ("cdpruner", "divprune")


class SlimQwen2_5_VLConfig(QwenConfigMixin, Qwen2_5_VLConfig):
    """`Qwen2_5_VLConfig` plus `compression`; a stock Qwen2.5-VL config.json loads into it unchanged."""

    model_type = "slim_qwen2_5_vl"
    compression: dict | None = None
    voco_token_id: int | None = None


class SlimQwen3VLConfig(QwenConfigMixin, Qwen3VLConfig):
    """`Qwen3VLConfig` plus `compression`; a stock Qwen3-VL config.json loads into it unchanged.

    VisionZip applies the same keep mask and merge to every DeepStack feature; under SparseVLM the DeepStack rows
    follow the survivors (spec §6.1). VoCo is not implemented for Qwen3-VL yet and raises.
    """

    model_type = "slim_qwen3_vl"
    unsupported_methods = ("voco", "cdpruner", "divprune")
    compression: dict | None = None
    voco_token_id: int | None = None


__all__ = ["SlimQwen2_5_VLConfig", "SlimQwen3VLConfig", "qwen_token_count"]
