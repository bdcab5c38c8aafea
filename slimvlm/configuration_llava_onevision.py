"""LLaVA-OneVision's Slim config and its token counts (specs/modern_families.md §1.3, §4).

Shipped with checkpoints: imports only transformers and flat siblings. The count functions are shared by the
processor (placeholders it writes) and the model (features it scatters), so the two can never disagree.
"""

from __future__ import annotations

from transformers import LlavaOnevisionConfig

from .configuration_slimvlm import PRUNER_METHODS, SlimCompressionMixin, pruned_count, split_visionzip_tokens

# VisionZip per video frame on OneVision: K_f = 64 (54 + 10), replacing the stock 2x2 pooling (196 per frame).
ONEVISION_VIDEO_SPLIT = split_visionzip_tokens(64)


def onevision_patches_per_view(vision_config) -> int:
    """Patches of one SigLIP view (no CLS): 27 x 27 = 729 for OneVision's 384-px, patch-14 tower."""
    return (vision_config.image_size // vision_config.patch_size) ** 2


def onevision_tokens_per_view(compression: dict, patches: int) -> int:
    """Tokens one SigLIP view becomes under a vision-side method: d + c (VisionZip), or K (or round(ratio·N)) of
    its N = `patches` candidates (CDPruner / DivPrune; no CLS, every patch is a candidate)."""
    if compression["method"] in PRUNER_METHODS:
        return pruned_count(compression, patches)
    return compression["dominant"] + compression["contextual"]


def onevision_visionzip_image_tokens(compression: dict, grid: tuple[int, int] | None, patches: int | None = None) -> int:
    """Tokens of one image under VisionZip, CDPruner or DivPrune (`patches`: N per view, needed by the pruners):
    (1 + gh·gw)·K for a single image (base + crops, no unpadding, no anyres_max interpolation, no newlines);
    K + 1 (base view and one newline) for an image of a multi-image sample (`grid` None)."""
    per_view = onevision_tokens_per_view(compression, patches)
    if grid is None:
        return per_view + 1
    return (1 + grid[0] * grid[1]) * per_view


def check_onevision_pruner(compression: dict) -> None:
    """What CDPruner / DivPrune on LLaVA-OneVision refuse (config and processor alike): CLIP relevance (SigLIP has
    no CLIP text tower), scope "image" (not wired: OneVision runs them per view)."""
    if compression["method"] not in PRUNER_METHODS:
        return
    if compression.get("relevance") == "clip":
        raise ValueError("compression['relevance'] = 'clip' is not available on LLaVA-OneVision (SigLIP has no CLIP "
                         "text tower); use relevance 'llm_embeddings'")
    if compression["scope"] != "view":
        raise ValueError(f"compression['scope'] = {compression['scope']!r} for {compression['method']!r} is not available "
                         "on LLaVA-OneVision yet; use scope 'view' (K per SigLIP view)")


def onevision_visionzip_video_tokens(compression: dict, num_frames: int, patches: int | None = None) -> int:
    """Tokens of one video under VisionZip, CDPruner or DivPrune: F·K_f + 1 (every frame compressed on its own,
    one newline per video); K_f = video_dominant + video_contextual (VisionZip), or the K (round(ratio·N)) of a
    view's N = `patches` candidates (CDPruner / DivPrune)."""
    if compression["method"] in PRUNER_METHODS:
        return num_frames * pruned_count(compression, patches) + 1
    return num_frames * (compression["video_dominant"] + compression["video_contextual"]) + 1


class SlimLlavaOnevisionConfig(SlimCompressionMixin, LlavaOnevisionConfig):
    """`LlavaOnevisionConfig` plus `compression`; a stock llava-hf OneVision config.json loads into it unchanged.

    VisionZip counts are per SigLIP view and count patches only (SigLIP has no CLS): `{"method": "visionzip",
    "tokens": 64}` is 54 dominant + 10 contextual per view, so a single image with a 2x2 grid becomes
    (1 + 4) x 64 = 320 tokens, an image of a multi-image sample 64 + 1, and a video of F frames F x K_f + 1,
    with `video_dominant`/`video_contextual` (or `video_tokens`) per frame, default 54/10.

    CDPruner / DivPrune (scope "view", CDPruner with relevance "llm_embeddings"): K of each view's or frame's
    729 patches (every patch is a candidate), laid out as VisionZip's counts: (1 + gh·gw)·K per single image,
    K + 1 per image of a multi-image sample, F·K + 1 per video (instead of the pooling).
    """

    model_type = "slim_llava_onevision"
    takes_videos = ONEVISION_VIDEO_SPLIT
    compression: dict | None = None
    voco_token_id: int | None = None

    def _compression_options(self) -> dict:
        # No CLIP relevance encoder on SigLIP: "clip" is refused by `check_onevision_pruner`, with its own message.
        return {**super()._compression_options(), "relevance_encoder": None, "view_has_cls": False}

    def _check_compression(self, compression: dict) -> None:
        super()._check_compression(compression)
        check_onevision_pruner(compression)

    def _compression_bounds(self):
        tokens, layers, feature_layer = super()._compression_bounds()
        vision_config = self.__dict__.get("vision_config")
        if tokens is not None:  # SigLIP views have no CLS: d + c is bounded by the patches
            tokens = onevision_patches_per_view(vision_config)
        return tokens, layers, feature_layer


__all__ = ["SlimLlavaOnevisionConfig", "check_onevision_pruner", "onevision_tokens_per_view",
           "onevision_visionzip_image_tokens", "onevision_visionzip_video_tokens"]
