"""LLaVA-OneVision with visual-token compression built in.

Shipped with checkpoints: imports only torch, transformers and flat siblings. The method wiring is shared by
every family (`modeling_slimvlm.py`); this module says how OneVision's images and videos become tokens
(specs/modern_families.md §1.3, §4):

- none / SparseVLM / VoCo: the stock layout. A single image is its base view + unpadded crops with one
  newline per row (anyres_max_9 interpolation above nine views' worth), an image of a multi-image sample is
  its base view + one newline, a video is 2x2-pooled frames (196 per 384-px frame) + one newline. SparseVLM's
  visual span and VoCo's image block are a sample's whole image or video block.
- VisionZip: SigLIP has no CLS, so a patch's score is the attention it *receives*, head-averaged, at the layer
  whose output becomes the features (`visionzip.attention_received`), and d counts patches. Every 729-patch
  view is compressed on its own to K = d + c before the projector. A single image becomes (1 + gh·gw)·K tokens
  in the LLaVA-NeXT order minus the CLS block [base ; crops' dominant patches in raster order of the global
  grid ; crops' contextual tokens], with no unpadding, no anyres_max interpolation and no newlines; an image of
  a multi-image sample becomes K + 1 (its base view and the newline); per-frame VisionZip replaces the
  pooling of a video: F·K_f + 1.
- CDPruner / DivPrune (images; specs/cdpruner.md): every one of a view's 729 patches is a candidate (no CLS),
  K kept per view with one relevance min-max per image (CDPruner, relevance "llm_embeddings": SigLIP has no
  CLIP text tower). A single image becomes (1 + gh·gw)·K tokens in LLaVA-NeXT's official per-view layout
  (`anyres_pruned_layout`: base, then the crops' kept patches in raster order of the global grid), an image
  of a multi-image sample K + 1 (its base view's K and the newline), a video F·K + 1 (K of each frame's 729
  patches instead of the pooling, one min-max per video, then the newline).
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

from .compat import can_return_tuple
from .configuration_llava_onevision import (
    SlimLlavaOnevisionConfig,
    onevision_patches_per_view,
    onevision_visionzip_image_tokens,
    onevision_visionzip_video_tokens,
)
from .configuration_slimvlm import LEGACY_LLAVA_NEXT_RENAMES
from .modeling_slimvlm import (
    AnyresMixin,
    SlimGenerationMixin,
    SlimImageFeaturesOutput,
    VISION_SIDE_METHODS,
    SlimModelMixin,
    anyres_pruned_layout,
    anyres_visionzip_layout,
    flatten_views,
    register_legacy_weight_names,
    slim_forward,
)


def single_image_flags(num_images: int, batch_num_images) -> list[bool]:
    """Per image: whether it is a sample's only image (anyres views) or one of several (its base view only),
    as the stock model reads `batch_num_images` (None: every image is a single image)."""
    if batch_num_images is None:
        return [True] * num_images
    return [int(n) == 1 for n in batch_num_images for _ in range(int(n))]


class SlimLlavaOnevisionModel(AnyresMixin, SlimModelMixin, LlavaOnevisionModel):
    """`LlavaOnevisionModel` whose `get_image_features` / `get_video_features` apply VisionZip (so `generate()`'s
    pre-encoding does too)."""

    config: SlimLlavaOnevisionConfig
    config_class = SlimLlavaOnevisionConfig
    output_class = LlavaOnevisionModelOutputWithPast
    forward = slim_forward(LlavaOnevisionModel)

    def _require_full_strategy(self, strategy: str | None) -> None:
        """Vision-side methods count SigLIP patches: every patch is a token (no CLS to drop)."""
        strategy = self.config.vision_feature_select_strategy if strategy is None else strategy
        if strategy != "full":
            name = {"visionzip": "VisionZip", "cdpruner": "CDPruner", "divprune": "DivPrune"}[self.config.compression["method"]]
            raise ValueError(
                f"{name} on LLaVA-OneVision needs vision_feature_select_strategy='full' (SigLIP has no CLS token to "
                f"drop), got {strategy!r}"
            )

    def _visionzip_split(self, strategy: str | None, key: str = "") -> tuple[int, int]:
        self._require_full_strategy(strategy)
        compression = self.config.compression
        return compression[f"{key}dominant"], compression[f"{key}contextual"]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        relevance_input_ids: torch.Tensor | None = None,
        relevance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected image features (`pooler_output`: one [N_i, D] tensor per image), compressed per SigLIP view when
        `config.compression` says so. Padding views of a batched 5-D `pixel_values` are never encoded.

        CDPruner / DivPrune: K of each view's patches (all candidates), one min-max per image (CDPruner; the
        relevance inputs have one row per image), a single image in the official per-view layout
        (`anyres_pruned_layout`), an image of a multi-image sample as its base view's K and the newline."""
        method = self.config.compression["method"]
        if method not in VISION_SIDE_METHODS:
            return super().get_image_features(pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              vision_aspect_ratio=vision_aspect_ratio, batch_num_images=batch_num_images,
                                              return_dict=True, **kwargs)
        self._require_full_strategy(vision_feature_select_strategy)
        single = single_image_flags(len(image_sizes), batch_num_images)
        views_per_image = [self.anyres_views(size) if alone else 1 for size, alone in zip(image_sizes, single)]
        pixel_values = flatten_views(pixel_values, views_per_image)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if method != "visionzip":
            starts = [sum(views_per_image[:image]) for image in range(len(views_per_image))]
            groups = [list(range(start, start + count)) for start, count in zip(starts, views_per_image)]
            views = self._compress_views(pixel_values, vision_feature_layer, groups=groups, select_strategy="full",
                                         relevance_input_ids=relevance_input_ids,
                                         relevance_attention_mask=relevance_attention_mask, **kwargs)
            features = []
            for image_views, kept, size, alone in zip(views.projected.split(views_per_image),
                                                      views.kept_indices.split(views_per_image), image_sizes, single):
                if alone:
                    features.append(anyres_pruned_layout(image_views, kept, self.anyres_grid(size), side))
                else:  # an image of a multi-image sample: its base view's K and the newline
                    features.append(torch.cat([image_views[0], self.image_newline[None].to(image_views)]))
            return self._vision_output(views, features)
        split = self._visionzip_split(vision_feature_select_strategy)
        views = self._compress_views(pixel_values, vision_feature_layer, split=split, cls=False, **kwargs)
        features = []
        for image_views, indices, size, alone in zip(views.projected.split(views_per_image),
                                                     views.dominant_indices.split(views_per_image), image_sizes, single):
            if alone:
                features.append(anyres_visionzip_layout(image_views, indices, self.anyres_grid(size), side, split[0],
                                                        cls=False))
            else:  # an image of a multi-image sample: its base view and the newline, as the stock layout
                features.append(torch.cat([image_views[0], self.image_newline[None].to(image_views)]))
        return self._vision_output(views, features)

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        relevance_video_input_ids: torch.Tensor | None = None,
        relevance_video_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected video features [videos, F·K + 1, D] (`pooler_output`): stock K = 196 pooled tokens per frame;
        under VisionZip every frame compressed on its own to K_f = video_dominant + video_contextual tokens
        instead of pooled, frames in temporal order, then one newline per video. CDPruner / DivPrune: K of each
        frame's patches instead of the pooling (all candidates; CDPruner: one min-max per video, the relevance
        inputs have one row per video), F·K + 1."""
        method = self.config.compression["method"]
        if method not in VISION_SIDE_METHODS:
            return super().get_video_features(pixel_values_videos, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              return_dict=True, **kwargs)
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be [videos, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        videos, frames = pixel_values_videos.shape[:2]
        if method == "visionzip":
            split = self._visionzip_split(vision_feature_select_strategy, "video_")
            views = self._compress_views(pixel_values_videos.flatten(0, 1), vision_feature_layer, split=split, cls=False,
                                         **kwargs)
        else:
            self._require_full_strategy(vision_feature_select_strategy)
            groups = [list(range(video * frames, (video + 1) * frames)) for video in range(videos)]
            views = self._compress_views(pixel_values_videos.flatten(0, 1), vision_feature_layer, groups=groups,
                                         select_strategy="full", relevance_input_ids=relevance_video_input_ids,
                                         relevance_attention_mask=relevance_video_attention_mask, **kwargs)
        projected = views.projected.reshape(videos, -1, views.projected.shape[-1])  # [videos, frames·K_f, D]
        newline = self.image_newline[None, None].expand(videos, 1, -1).to(projected)
        output = self._vision_output(views, [])
        output.pooler_output = torch.cat([projected, newline], dim=1)
        return output

    def _forward_sparsevlm(self, *args, batch_num_images=None, vision_aspect_ratio=None, image_sizes_videos=None,
                           **kwargs):
        """SparseVLM (shared wiring) over one image block or one video block per sample."""
        if batch_num_images is not None and any(int(n) > 1 for n in batch_num_images):
            raise ValueError(f"SparseVLM supports one image per sample; got batch_num_images={list(map(int, batch_num_images))}")
        if vision_aspect_ratio not in (None, self.config.vision_aspect_ratio):
            raise ValueError(f"under SparseVLM vision_aspect_ratio is the config's ({self.config.vision_aspect_ratio!r}); "
                             f"got {vision_aspect_ratio!r}")
        return super()._forward_sparsevlm(*args, **kwargs)


class SlimLlavaOnevisionForConditionalGeneration(SlimGenerationMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco" | "cdpruner" |
    "divprune", ...}).

    Loads stock llava-hf checkpoints (current and legacy weight layouts); `{"method": "none"}` is the stock model,
    for single images, multi-image samples, videos and batches mixing them.
    """

    config: SlimLlavaOnevisionConfig
    config_class = SlimLlavaOnevisionConfig

    base_model_class = SlimLlavaOnevisionModel

    def image_tokens_summary(self) -> str:
        """The visual tokens per image and per video, in words (model cards)."""
        compression = self.config.compression
        if compression["method"] in ("cdpruner", "divprune"):
            per_view = compression.get("tokens") or f"round({compression['ratio']} x patches)"
            return (f"(1 + anyres crops) x {per_view} per single image, {per_view} + 1 per image of a multi-image "
                    f"sample, {per_view} per video frame + 1")
        if compression["method"] != "visionzip":
            return ("the stock LLaVA-OneVision count (base view + unpadded crops + one newline per row, anyres_max_9; "
                    "196 per video frame + 1)")
        per_view = compression["dominant"] + compression["contextual"]
        return (f"(1 + anyres crops) x {per_view} per single image ({5 * per_view} for a 2x2 grid), {per_view + 1} per "
                f"image of a multi-image sample, {self.video_token_count(1) - 1} per video frame + 1")

    def visionzip_token_count(self, image_size=None) -> int:
        """Tokens an image becomes under VisionZip: (1 + gh·gw)·K for a single image of `image_size` (height, width),
        K + 1 for an image of a multi-image sample (`image_size` None)."""
        if self.config.compression["method"] != "visionzip":
            raise ValueError(f"visionzip_token_count needs compression method 'visionzip', the model has {self.config.compression}")
        grid = None if image_size is None else self.model.anyres_grid(image_size)
        return onevision_visionzip_image_tokens(self.config.compression, grid)

    def pruned_token_count(self, image_size=None) -> int:
        """Tokens an image becomes under CDPruner / DivPrune: (1 + gh·gw)·K for a single image of `image_size`
        (height, width), K + 1 for an image of a multi-image sample (`image_size` None)."""
        if self.config.compression["method"] not in ("cdpruner", "divprune"):
            raise ValueError(f"pruned_token_count needs CDPruner / DivPrune, the model has {self.config.compression}")
        grid = None if image_size is None else self.model.anyres_grid(image_size)
        return onevision_visionzip_image_tokens(self.config.compression, grid,
                                                onevision_patches_per_view(self.config.vision_config))

    def video_token_count(self, num_frames: int) -> int:
        """Tokens a video of `num_frames` frames becomes (VoCo groups excluded): F·196 + 1 stock (384-px frames),
        F·K_f + 1 under VisionZip, F·K + 1 under CDPruner / DivPrune."""
        if self.config.compression["method"] in VISION_SIDE_METHODS:
            return onevision_visionzip_video_tokens(self.config.compression, num_frames,
                                                    onevision_patches_per_view(self.config.vision_config))
        side = -(-(self.config.vision_config.image_size // self.config.vision_config.patch_size) // 2)
        return num_frames * side * side + 1


register_legacy_weight_names("SlimLlavaOnevisionForConditionalGeneration", "SlimLlavaOnevisionModel",
                             LEGACY_LLAVA_NEXT_RENAMES)

SlimLlavaOnevisionConfig.register_for_auto_class()
SlimLlavaOnevisionModel.register_for_auto_class("AutoModel")
SlimLlavaOnevisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimLlavaOnevisionModel", "SlimLlavaOnevisionForConditionalGeneration"]
