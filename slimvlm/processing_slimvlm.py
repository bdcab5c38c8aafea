"""Processors that write exactly as many image placeholders as the compressed model consumes.

Shipped with checkpoints: imports only transformers and flat siblings.
"""

from __future__ import annotations

from transformers import LlavaProcessor
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.processing_utils import MultiModalData

from .configuration_slimvlm import image_token_count, normalize_compression


class SlimLlavaProcessor(LlavaProcessor):
    """`LlavaProcessor` whose placeholder count follows `compression` (the model's `config.compression`).

    `compression` is a named init argument, so it is saved in processor_config.json and restored on load:
        processor = SlimLlavaProcessor.from_pretrained(path, compression=model.config.compression)
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        compression: dict | None = None,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        self.set_compression(compression)

    def set_compression(self, compression: dict | None):
        """Switch compression (must match the model's); returns self."""
        self.compression = normalize_compression(compression)
        return self

    def _tokens_per_image(self, height: int, width: int) -> int:
        # The stock LlavaProcessor count, then the compression's.
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            count -= 1
        return image_token_count(self.compression, count)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self.image_token * self._tokens_per_image(height, width)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(**kwargs)["images_kwargs"]
        crop_size = images_kwargs.get("crop_size", None) or self.image_processor.crop_size
        count = self._tokens_per_image(crop_size["height"], crop_size["width"])
        return MultiModalData(num_image_tokens=[count] * len(image_sizes), num_image_patches=[1] * len(image_sizes))


SlimLlavaProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["SlimLlavaProcessor"]
