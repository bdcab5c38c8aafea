"""LLaVA-1.5 with visual-token compression built in.

`SlimLlavaForConditionalGeneration` is `LlavaForConditionalGeneration` with one extra config field,
`compression`. Shipped with checkpoints: imports only torch, transformers and flat siblings. The method
wiring is shared by every family (`modeling_slimvlm.py`); this module says how an image becomes tokens.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

from .compat import can_return_tuple
from .configuration_slimvlm import LEGACY_LLAVA_RENAMES, SlimLlavaConfig, image_token_count, vision_tokens_per_view
from .modeling_slimvlm import (
    DEFAULT_QUANTIZATION_SKIP_MODULES,
    SlimGenerationMixin,
    SlimImageFeaturesOutput,
    VISION_SIDE_METHODS,
    SlimModelMixin,
    register_legacy_weight_names,
    slim_forward,
)


class SlimLlavaModel(SlimModelMixin, LlavaModel):
    """`LlavaModel` whose `get_image_features` applies VisionZip (so `generate()`'s pre-encoding does too)."""

    config: SlimLlavaConfig
    config_class = SlimLlavaConfig
    output_class = LlavaModelOutputWithPast
    forward = slim_forward(LlavaModel)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        relevance_input_ids: torch.Tensor | None = None,
        relevance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected image features, compressed when `config.compression` says so.

        Returns `pooler_output`: a list with one [K, D] tensor per image, K = `image_token_count(...)`. As the
        stock method: `return_dict=False` gives a tuple, and `output_hidden_states` / `output_attentions`
        return the vision tower's (under VisionZip the whole tower then runs; otherwise it stops at the
        feature layer, whose output is all VisionZip needs). CDPruner takes the instruction as
        `relevance_input_ids` / `relevance_attention_mask` (one row per image, written by the processor).
        """
        if self.config.compression["method"] not in VISION_SIDE_METHODS:
            return super().get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        # CLS is always kept under VisionZip, so vision_feature_select_strategy does not apply to it.
        views = self._compress_views(pixel_values, vision_feature_layer, select_strategy=vision_feature_select_strategy,
                                     relevance_input_ids=relevance_input_ids,
                                     relevance_attention_mask=relevance_attention_mask, **kwargs)
        return self._vision_output(views)


class SlimLlavaForConditionalGeneration(SlimGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Loads stock llava-hf checkpoints (current and legacy weight layouts); `{"method": "none"}` is the stock model.
    """

    config: SlimLlavaConfig
    config_class = SlimLlavaConfig

    base_model_class = SlimLlavaModel

    def image_tokens_summary(self) -> str:
        """The visual tokens per image, in words (model cards)."""
        return str(self.image_token_count())

    def image_token_count(self) -> int:
        """Visual tokens per image that reach the language model under the current compression."""
        tokens = vision_tokens_per_view(self.config.vision_config)
        uncompressed = tokens - (1 if self.config.vision_feature_select_strategy == "default" else 0)
        return image_token_count(self.config.compression, uncompressed)


register_legacy_weight_names("SlimLlavaForConditionalGeneration", "SlimLlavaModel", LEGACY_LLAVA_RENAMES)

SlimLlavaConfig.register_for_auto_class()
SlimLlavaModel.register_for_auto_class("AutoModel")
SlimLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimLlavaModel", "SlimLlavaForConditionalGeneration", "DEFAULT_QUANTIZATION_SKIP_MODULES"]
