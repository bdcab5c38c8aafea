"""LLaVA-NeXT (LLaVA-1.6) with visual-token compression built in.

Shipped with checkpoints: imports only torch, transformers and flat siblings. The method wiring is shared by
every family (`modeling_slimvlm.py`); this module says how an anyres image becomes tokens:

- none / SparseVLM / VoCo: the stock layout (base view, unpadded crops, one newline per row); SparseVLM's
  visual span and VoCo's image block are that whole block.
- VisionZip: every 24x24 view (base and each anyres crop) is compressed on its own to K = d + c tokens and
  laid out as the official code does (specs/visionzip.md §7.2): [base ; crops' dominant patches in raster
  order of the global grid ; crops' CLS ; crops' contextual tokens], (1 + crops)·K tokens, no unpadding and
  no newline.
"""

from __future__ import annotations

import torch
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import LlavaNextModelOutputWithPast

from .compat import can_return_tuple
from .configuration_slimvlm import LEGACY_LLAVA_NEXT_RENAMES, SlimLlavaNextConfig, anyres_visionzip_token_count
from .modeling_slimvlm import (
    VISION_SIDE_METHODS,
    AnyresMixin,
    SlimGenerationMixin,
    SlimImageFeaturesOutput,
    SlimModelMixin,
    anyres_pruned_layout,
    anyres_visionzip_layout,
    flatten_views,
    register_legacy_weight_names,
    slim_forward,
)


class SlimLlavaNextModel(AnyresMixin, SlimModelMixin, LlavaNextModel):
    """`LlavaNextModel` whose `get_image_features` applies VisionZip per view (so `generate()`'s pre-encoding does too)."""

    config: SlimLlavaNextConfig
    config_class = SlimLlavaNextConfig
    output_class = LlavaNextModelOutputWithPast
    forward = slim_forward(LlavaNextModel)
    # The official VisionZip layout has no newline token (specs/visionzip.md §7.2): frozen under VisionZip.
    unused_parameters = {"visionzip": ("image_newline",)}

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        relevance_input_ids: torch.Tensor | None = None,
        relevance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected image features (`pooler_output`: one [N_i, D] tensor per image), compressed when
        `config.compression` says so. Padding views of a batched 5-D `pixel_values` are never encoded.

        CDPruner / DivPrune, scope "view": K of each view's patches, one min-max per image, the official layout
        (`anyres_pruned_layout`); scope "image": K of the stock packed block (base, unpadded crops, newlines)."""
        compression = self.config.compression
        if compression["method"] not in VISION_SIDE_METHODS:
            return super().get_image_features(pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              return_dict=True, **kwargs)
        if compression["method"] != "visionzip" and compression["scope"] == "image":
            stock = super().get_image_features(pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                                               vision_feature_select_strategy=vision_feature_select_strategy,
                                               return_dict=True, **kwargs)
            features, kept = self._prune_blocks(list(stock.pooler_output), relevance_input_ids, relevance_attention_mask)
            return SlimImageFeaturesOutput(last_hidden_state=stock.last_hidden_state, pooler_output=features,
                                           hidden_states=stock.hidden_states, attentions=stock.attentions,
                                           kept_indices=kept)
        views_per_image = [self.anyres_views(size) for size in image_sizes]
        pixel_values = flatten_views(pixel_values, views_per_image)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if compression["method"] != "visionzip":
            starts = [sum(views_per_image[:image]) for image in range(len(views_per_image))]
            groups = [list(range(start, start + count)) for start, count in zip(starts, views_per_image)]
            views = self._compress_views(pixel_values, vision_feature_layer, groups=groups,
                                         select_strategy=vision_feature_select_strategy,
                                         relevance_input_ids=relevance_input_ids,
                                         relevance_attention_mask=relevance_attention_mask, **kwargs)
            features = [anyres_pruned_layout(image_views, kept, self.anyres_grid(size), side)
                        for image_views, kept, size in zip(views.projected.split(views_per_image),
                                                           views.kept_indices.split(views_per_image), image_sizes)]
            return self._vision_output(views, features)
        # CLS is always kept under VisionZip, so vision_feature_select_strategy does not apply.
        views = self._compress_views(pixel_values, vision_feature_layer, **kwargs)
        dominant = self.config.compression["dominant"]
        features = [
            anyres_visionzip_layout(image_views, indices, self.anyres_grid(size), side, dominant)
            for image_views, indices, size in zip(views.projected.split(views_per_image),
                                                  views.dominant_indices.split(views_per_image), image_sizes)
        ]
        return self._vision_output(views, features)


class SlimLlavaNextForConditionalGeneration(SlimGenerationMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Loads stock llava-hf checkpoints (current and legacy weight layouts); `{"method": "none"}` is the stock model.
    """

    config: SlimLlavaNextConfig
    config_class = SlimLlavaNextConfig

    base_model_class = SlimLlavaNextModel

    def image_tokens_summary(self) -> str:
        """The visual tokens per image, in words (model cards): they depend on the image's anyres grid."""
        compression = self.config.compression
        if compression["method"] in ("cdpruner", "divprune"):
            if compression["scope"] == "image":
                kept = compression.get("tokens") or f"round({compression['ratio']} x the stock count)"
                return f"{kept} of the stock block (base view + unpadded crops + one newline per row)"
            per_view = compression.get("tokens") or f"round({compression['ratio']} x patches)"
            return f"(1 + anyres crops) x {per_view}"
        if compression["method"] != "visionzip":
            return "the stock LLaVA-NeXT count (base view + unpadded crops + one newline per row)"
        per_view = compression["dominant"] + compression["contextual"]
        return f"(1 + anyres crops) x {per_view} ({5 * per_view} for a 2x2 grid)"

    def visionzip_token_count(self, image_size) -> int:
        """Tokens an image of `image_size` (height, width) becomes under VisionZip: (1 + gh·gw)·K."""
        if self.config.compression["method"] != "visionzip":
            raise ValueError(f"visionzip_token_count needs compression method 'visionzip', the model has {self.config.compression}")
        return anyres_visionzip_token_count(self.config.compression, self.model.anyres_grid(image_size))

    def pruned_token_count(self, image_size) -> int:
        """Tokens an image of `image_size` (height, width) becomes under CDPruner / DivPrune scope "view":
        (1 + gh·gw)·K (scope "image" keeps K, or round(ratio·V), of the stock block)."""
        if self.config.compression["method"] not in ("cdpruner", "divprune") or self.config.compression["scope"] != "view":
            raise ValueError(f"pruned_token_count needs CDPruner / DivPrune with scope 'view', the model has {self.config.compression}")
        patches = (self.config.vision_config.image_size // self.config.vision_config.patch_size) ** 2
        return anyres_visionzip_token_count(self.config.compression, self.model.anyres_grid(image_size), patches)


register_legacy_weight_names("SlimLlavaNextForConditionalGeneration", "SlimLlavaNextModel", LEGACY_LLAVA_NEXT_RENAMES)

SlimLlavaNextConfig.register_for_auto_class()
SlimLlavaNextModel.register_for_auto_class("AutoModel")
SlimLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimLlavaNextModel", "SlimLlavaNextForConditionalGeneration", "anyres_pruned_layout", "anyres_visionzip_layout"]
