"""Qwen3-VL with visual-token compression built in (specs/modern_families.md §1.2, §3).

`SlimQwen3VLForConditionalGeneration` is `Qwen3VLForConditionalGeneration` with `compression`. Shipped with
checkpoints: imports only torch, transformers and flat siblings. VisionZip as for Qwen2.5-VL (`modeling_qwen2_5_vl`'s
shared Qwen mixins): scored in the last vision block (full attention per temporal step, no windows), and the same
keep mask and contextual merge applied to every DeepStack feature, so the DeepStack rows still line up with the
kept placeholder rows they are added to.
"""

from __future__ import annotations

import torch
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel

from .configuration_qwen_vl import SlimQwen3VLConfig
from .modeling_qwen2_5_vl import QWEN_MODEL_OUTPUT, QwenGenerationMixin, QwenVisionZipMixin, register_stock_weight_names
from .modeling_slimvlm import SlimGenerationMixin, SlimModelMixin, slim_forward


class SlimQwen3VLModel(QwenVisionZipMixin, SlimModelMixin, Qwen3VLModel):
    """`Qwen3VLModel` whose image/video features are compressed under VisionZip (DeepStack rows included) and whose
    prefill recomputes the kept tokens' M-RoPE positions."""

    config: SlimQwen3VLConfig
    config_class = SlimQwen3VLConfig
    output_class = QWEN_MODEL_OUTPUT
    forward = slim_forward(Qwen3VLModel)
    video_group_per_step = True

    def _unit_order(self, grid_thw: torch.Tensor):
        return None  # no windows: rows are in raster order

    def _run_tower(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs):
        output = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw, return_dict=True, **kwargs)
        return output, output.pooler_output, list(output.deepstack_features)

    def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, visionzip_keep=None, **kwargs):
        """Stock `get_rope_index`; under VisionZip for compressed groups (as Qwen2.5-VL's, one group per frame)."""
        if self.config.compression["method"] != "visionzip":
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                          video_grid_thw=video_grid_thw, attention_mask=attention_mask, **kwargs)
        return self._compressed_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, None,
                                           attention_mask, visionzip_keep)


class SlimQwen3VLForConditionalGeneration(QwenGenerationMixin, SlimGenerationMixin, Qwen3VLForConditionalGeneration):
    """Qwen3-VL with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm", ...}); loads stock Qwen3-VL checkpoints,
    and `{"method": "none"}` is the stock model."""

    config: SlimQwen3VLConfig
    config_class = SlimQwen3VLConfig
    base_model_class = SlimQwen3VLModel


register_stock_weight_names(SlimQwen3VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
register_stock_weight_names(SlimQwen3VLModel, Qwen3VLModel)

SlimQwen3VLConfig.register_for_auto_class()
SlimQwen3VLModel.register_for_auto_class("AutoModel")
SlimQwen3VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimQwen3VLModel", "SlimQwen3VLForConditionalGeneration"]
