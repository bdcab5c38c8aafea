"""Processors of the Qwen-VL families that write exactly as many placeholders as the compressed model consumes.

Shipped with checkpoints: imports only torch, numpy, transformers and flat siblings.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import MultiModalData, ProcessorMixin

from .configuration_qwen_vl import qwen_token_count
from .configuration_slimvlm import normalize_compression
from .voco import voco_group_text


class QwenCompressionProcessorMixin:
    """`compression` (saved in processor_config.json) and the compressed placeholder counts."""

    def set_compression(self, compression: dict | None):
        """Switch compression (must match the model's); returns self."""
        self.compression = normalize_compression(compression, ratios=True)
        return self

    def _tokens(self, grid_thw) -> int:
        return qwen_token_count(self.compression, grid_thw, self.image_processor.merge_size)

    def _with_voco_group(self, placeholders: str) -> str:
        if self.compression["method"] == "voco":
            placeholders += voco_group_text(self.compression["num_voco_tokens"])
        return placeholders

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self._with_voco_group(self.image_token * self._tokens(image_inputs["image_grid_thw"][image_idx]))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self._tokens(video_inputs["video_grid_thw"][video_idx])

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        if self.compression["method"] != "visionzip":
            return data
        merge = self.image_processor.merge_size
        if image_sizes is not None:
            # An image's patches are t·gh·gw with t = 1 (the processor duplicates it over the temporal patch).
            images_kwargs = self.image_processor._merge_and_standardize_kwargs(
                **self._merge_kwargs(**kwargs).get("images_kwargs", {}))
            counts = []
            for height, width in image_sizes:
                grid_h, grid_w = self._image_grid(height, width, images_kwargs)
                counts.append(self._tokens((1, grid_h, grid_w)))
            data.num_image_tokens = counts
        if video_sizes is not None:
            raise NotImplementedError("_get_num_multimodal_tokens for videos under VisionZip")
        return data

    def _image_grid(self, height: int, width: int, images_kwargs: dict) -> tuple[int, int]:
        """(gh, gw) of an image of height x width: the image processor's smart_resize, in patches."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        patch, merge, size = images_kwargs["patch_size"], images_kwargs["merge_size"], images_kwargs["size"]
        resized_h, resized_w = smart_resize(height, width, patch * merge, min_pixels=size.shortest_edge,
                                            max_pixels=size.longest_edge)
        return resized_h // patch, resized_w // patch


class SlimQwen2_5_VLProcessor(QwenCompressionProcessorMixin, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` whose placeholder counts follow `compression` (the model's `config.compression`):
    under VisionZip an image of n merged tokens gets `sum(visionzip_counts(n, ρ_d, ρ_c))` placeholders, a video
    that per temporal step."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, compression: dict | None = None,
                 **kwargs):
        # The stock __init__ minus its `video_processor` sub-processor (transformers' video processors need
        # torchvision): videos go through `video_processor`, a torchvision-free frame preprocessing.
        kwargs.pop("video_processor", None)
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.set_compression(compression)


SlimQwen2_5_VLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["SlimQwen2_5_VLProcessor"]
