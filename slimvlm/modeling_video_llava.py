"""Video-LLaVA with visual-token compression built in.

Shipped with checkpoints: imports only torch, transformers and flat siblings. The method wiring is shared by
every family (`modeling_slimvlm.py`); this module says how images and videos become tokens:

- images go through the image tower (the LLaVA-1.5 path: VisionZip per image with `dominant`/`contextual`);
- videos go through the video tower frame by frame: VisionZip compresses every frame on its own (layer L-2,
  CLS kept as the stock video path keeps it) to `video_dominant + video_contextual` tokens, frames in temporal
  order, F·K tokens per video (specs/visionzip.md §7.3);
- SparseVLM's visual span is a sample's image block or video block; VoCo-LLaMA gives each frame its own
  group under the shifted-segments rule (specs/voco.md §7) and an image one group (the image rule).
"""

from __future__ import annotations

import torch
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.video_llava.modeling_video_llava import VideoLlavaModelOutputWithPast

from .compat import can_return_tuple, with_stock_deprecations
from .configuration_slimvlm import LEGACY_VIDEO_LLAVA_RENAMES, SlimVideoLlavaConfig, image_token_count, video_token_count, vision_tokens_per_view
from .modeling_slimvlm import VISION_SIDE_METHODS, SlimGenerationMixin, SlimImageFeaturesOutput, SlimModelMixin, register_legacy_weight_names, slim_forward
from .voco import VoCoSegments, voco_segments


class SlimVideoLlavaModel(SlimModelMixin, VideoLlavaModel):
    """`VideoLlavaModel` whose `get_image_features` / `get_video_features` apply VisionZip (so `generate()`'s
    pre-encoding does too)."""

    config: SlimVideoLlavaConfig
    config_class = SlimVideoLlavaConfig
    output_class = VideoLlavaModelOutputWithPast
    forward = slim_forward(VideoLlavaModel)

    @can_return_tuple
    @with_stock_deprecations(VideoLlavaModel.get_image_features)  # pixel_values_images= -> pixel_values=, as stock
    def get_image_features(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_values_images: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        relevance_input_ids: torch.Tensor | None = None,
        relevance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected image features [images, K, D] (`pooler_output`) from the image tower, compressed per image
        under VisionZip (K = dominant + contextual, CLS kept) or CDPruner / DivPrune (K of the 256 patches);
        otherwise the stock features. `pixel_values_images` is the stock deprecated name of `pixel_values` (named
        here, as in stock, so `generate()` pre-encodes it)."""
        if self.config.compression["method"] not in VISION_SIDE_METHODS:
            return super().get_image_features(pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              return_dict=True, **kwargs)
        views = self._compress_views(pixel_values, vision_feature_layer, vision_tower=self.image_tower,
                                     select_strategy=vision_feature_select_strategy,
                                     relevance_input_ids=relevance_input_ids,
                                     relevance_attention_mask=relevance_attention_mask, **kwargs)
        return self._vision_output(views, views.projected if views.images is None else torch.stack(views.images))

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        relevance_video_input_ids: torch.Tensor | None = None,
        relevance_video_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected frame features [videos·frames, K, D] (`pooler_output`, video-major, frames in temporal order)
        from the video tower. Under VisionZip every frame is compressed on its own to K = video_dominant +
        video_contextual tokens; under CDPruner / DivPrune K of each frame's 257 tokens (CLS is a candidate, as
        the stock video path keeps it), or with scope "image" F·K of the video's F·257 ([videos, F·K, D]);
        otherwise the stock 257 per frame."""
        compression = self.config.compression
        if compression["method"] not in VISION_SIDE_METHODS:
            return super().get_video_features(pixel_values_videos=pixel_values_videos,
                                              vision_feature_layer=vision_feature_layer, return_dict=True, **kwargs)
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be [videos, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        frames = pixel_values_videos.flatten(0, 1)  # frames are independent views, in (video, time) order
        if compression["method"] != "visionzip":
            count = pixel_values_videos.shape[1]
            groups = [list(range(video * count, (video + 1) * count)) for video in range(pixel_values_videos.shape[0])]
            views = self._compress_views(frames, vision_feature_layer, vision_tower=self.video_tower, groups=groups,
                                         select_strategy="full", relevance_input_ids=relevance_video_input_ids,
                                         relevance_attention_mask=relevance_video_attention_mask, **kwargs)
            return self._vision_output(views, views.projected if views.images is None else torch.stack(views.images))
        split = (compression["video_dominant"], compression["video_contextual"])
        views = self._compress_views(frames, vision_feature_layer, vision_tower=self.video_tower, split=split, **kwargs)
        return self._vision_output(views, views.projected)

    def _placeholder_mask(self, modality: str, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        # The stock check formats its message from a 3-D tensor's shape, so the [N, D] rows get a leading axis.
        image_mask, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds,
                                                           **{f"{modality}_features": features[None]})
        return image_mask if modality == "image" else video_mask

    def _voco_layout(self, voco_token_mask: torch.Tensor, input_ids: torch.Tensor | None) -> VoCoSegments:
        """Shifted segments (specs/voco.md §7): a video row has one VoCo group per frame; an image row has one
        group, where the segment rule is the image rule (§3)."""
        if input_ids is None:
            raise ValueError("VoCo on Video-LLaVA needs input_ids (the frame segments are read from the placeholders)")
        video = input_ids == self.config.video_token_id
        segments = voco_segments(voco_token_mask, video | (input_ids == self.config.image_token_id),
                                 self.config.compression["num_voco_tokens"])
        several = (segments.num_segments > 1) & ~video.any(1)
        if bool(several.any()):
            raise ValueError(f"rows {several.nonzero().flatten().tolist()} have several VoCo groups but no video: "
                             "one image per row (VoCo groups per frame are for videos only)")
        return segments


class SlimVideoLlavaForConditionalGeneration(SlimGenerationMixin, VideoLlavaForConditionalGeneration):
    """Video-LLaVA with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Loads stock checkpoints (current and legacy `LanguageBind/Video-LLaVA-7B-hf` layouts); `{"method": "none"}`
    is the stock model, for images, videos and batches mixing both.
    """

    config: SlimVideoLlavaConfig
    config_class = SlimVideoLlavaConfig

    base_model_class = SlimVideoLlavaModel

    def image_tokens_summary(self) -> str:
        """The visual tokens per image and per video frame, in words (model cards)."""
        return f"{self.image_token_count()} per image, {self.video_token_count(1)} per video frame"

    def image_token_count(self) -> int:
        """Visual tokens per image that reach the language model under the current compression."""
        tokens = vision_tokens_per_view(self.config.vision_config)
        uncompressed = tokens - (1 if self.config.vision_feature_select_strategy == "default" else 0)
        return image_token_count(self.config.compression, uncompressed)

    def video_token_count(self, num_frames: int = 8) -> int:
        """Visual tokens a video of `num_frames` frames becomes (VoCo groups excluded): 8 x 257 = 2056 stock,
        8 x 17 = 136 under the default VisionZip split."""
        return video_token_count(self.config.compression, vision_tokens_per_view(self.config.vision_config), num_frames)


register_legacy_weight_names("SlimVideoLlavaForConditionalGeneration", "SlimVideoLlavaModel", LEGACY_VIDEO_LLAVA_RENAMES)

SlimVideoLlavaConfig.register_for_auto_class()
SlimVideoLlavaModel.register_for_auto_class("AutoModel")
SlimVideoLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimVideoLlavaModel", "SlimVideoLlavaForConditionalGeneration"]
