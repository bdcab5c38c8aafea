"""LLaVA-OneVision's Slim config and its token counts (specs/modern_families.md §1.3, §4).

Shipped with checkpoints: imports only transformers and flat siblings. The count functions are shared by the
processor (placeholders it writes) and the model (features it scatters), so the two can never disagree.
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig

from .configuration_slimvlm import SlimCompressionMixin, split_visionzip_tokens

# VisionZip per video frame on OneVision: K_f = 64 (54 + 10), replacing the stock 2x2 pooling (196 per frame).
ONEVISION_VIDEO_SPLIT = split_visionzip_tokens(64)


def onevision_patches_per_view(vision_config) -> int:
    """Patches of one SigLIP view (no CLS): 27 x 27 = 729 for OneVision's 384-px, patch-14 tower."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def onevision_visionzip_image_tokens(compression: dict, grid: tuple[int, int] | None) -> int:
    """Tokens of one image under VisionZip: (1 + gh·gw)·K for a single image (base + crops, no unpadding, no
    anyres_max interpolation, no newlines); K + 1 (base view and one newline) for an image of a multi-image
    sample (`grid` None)."""
    per_view = compression["dominant"] + compression["contextual"]
    if grid is None:
        return per_view + 1
    return (1 + grid[0] * grid[1]) * per_view


def onevision_visionzip_video_tokens(compression: dict, num_frames: int) -> int:
    """Tokens of one video under VisionZip: F·K_f + 1 (every frame compressed on its own, one newline per video)."""
    return num_frames * (compression["video_dominant"] + compression["video_contextual"]) + 1


class SlimLlavaOnevisionConfig(SlimCompressionMixin, LlavaOnevisionConfig):
    """`LlavaOnevisionConfig` plus `compression`; a stock llava-hf OneVision config.json loads into it unchanged.

    VisionZip counts are per SigLIP view and count patches only (SigLIP has no CLS): `{"method": "visionzip",
    "tokens": 64}` is 54 dominant + 10 contextual per view, so a single image with a 2x2 grid becomes
    (1 + 4) x 64 = 320 tokens, an image of a multi-image sample 64 + 1, and a video of F frames F x K_f + 1,
    with `video_dominant`/`video_contextual` (or `video_tokens`) per frame, default 54/10.
    """

    model_type = "slim_llava_onevision"
    takes_videos = ONEVISION_VIDEO_SPLIT
    unsupported_methods = ("cdpruner", "divprune")  # not wired for SigLIP views yet
    compression: dict | None = None
    voco_token_id: int | None = None

    def _compression_bounds(self):
        tokens, layers, feature_layer = super()._compression_bounds()
        vision_config = self.__dict__.get("vision_config")
        if tokens is not None:  # SigLIP views have no CLS: d + c is bounded by the patches
            tokens = onevision_patches_per_view(vision_config)
        return tokens, layers, feature_layer


__all__ = ["SlimLlavaOnevisionConfig", "onevision_visionzip_image_tokens", "onevision_visionzip_video_tokens"]
