"""Processors that write exactly as many image placeholders as the compressed model consumes.

Shipped with checkpoints: imports only transformers and flat siblings.
"""

from __future__ import annotations

from transformers import LlavaNextProcessor, LlavaProcessor
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, to_numpy_array
from transformers.processing_utils import MultiModalData

from .configuration_slimvlm import anyres_visionzip_token_count, image_token_count, normalize_compression
from .voco import VOCO_CHAT_TEMPLATE, voco_group_text


class SlimProcessorMixin:
    """`compression` handling shared by every Slim processor.

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
        self.compression = normalize_compression(compression, self._tokens_per_view())
        return self

    def _tokens_per_view(self) -> int | None:
        """CLS + patches of one processed view, to bound VisionZip's dominant + contextual as the model does."""
        crop_size = getattr(getattr(self, "image_processor", None), "crop_size", None)
        if not crop_size or not self.patch_size or not crop_size.get("height") or not crop_size.get("width"):
            return None
        return (crop_size["height"] // self.patch_size) * (crop_size["width"] // self.patch_size) + 1

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs):
        """Under VoCo, default to the VoCo template (image first, then "\\n", system and turns; specs/voco.md §2):
        llava-hf's template puts "USER: " before the image, which the cached VoCo path cannot reproduce."""
        if chat_template is None and self.compression["method"] == "voco":
            chat_template = VOCO_CHAT_TEMPLATE
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def _with_voco_group(self, placeholders: str) -> str:
        """VoCo layout (specs/voco.md §2): image, "\\n", K <voco>; write prompts with build_voco_prompt
        ("<image>\\n" first) so the group is followed by the second "\\n" and the text."""
        if self.compression["method"] == "voco":
            placeholders += voco_group_text(self.compression["num_voco_tokens"])
        return placeholders


class SlimLlavaProcessor(SlimProcessorMixin, LlavaProcessor):
    """`LlavaProcessor` whose placeholder count follows `compression` (the model's `config.compression`)."""

    def _tokens_per_image(self, height: int, width: int) -> int:
        # The stock LlavaProcessor count, then the compression's.
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            count -= 1
        return image_token_count(self.compression, count)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        height, width = get_image_size(to_numpy_array(image_inputs["pixel_values"][image_idx]))
        return self._with_voco_group(self.image_token * self._tokens_per_image(height, width))

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        if image_sizes is None:
            return MultiModalData()
        images_kwargs = self._merge_kwargs(**kwargs)["images_kwargs"]
        crop_size = images_kwargs.get("crop_size", None) or self.image_processor.crop_size
        count = self._tokens_per_image(crop_size["height"], crop_size["width"])
        return MultiModalData(num_image_tokens=[count] * len(image_sizes), num_image_patches=[1] * len(image_sizes))


class SlimLlavaNextProcessor(SlimProcessorMixin, LlavaNextProcessor):
    """`LlavaNextProcessor` whose placeholder count follows `compression`.

    Under VisionZip an image becomes (1 + gh·gw)·K tokens: the base view and each of the gh x gw anyres crops
    compressed to K = d + c, in the official layout without unpadding or newlines (specs/visionzip.md §7.2).
    Other methods keep the stock count (base + unpadded crops + one newline per row).
    """

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        if self.compression["method"] != "visionzip":
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        best_height, best_width = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        count = anyres_visionzip_token_count(self.compression, (best_height // height, best_width // width))
        # Both stock callers (replace_image_token, _get_num_multimodal_tokens) subtract the CLS of the base view
        # under the "default" strategy; VisionZip keeps every view's CLS, so it is counted back here.
        return count + (1 if self.vision_feature_select_strategy == "default" else 0)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self._with_voco_group(super().replace_image_token(image_inputs, image_idx, **kwargs))


SlimLlavaProcessor.register_for_auto_class("AutoProcessor")
SlimLlavaNextProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["SlimLlavaNextProcessor", "SlimLlavaProcessor"]
