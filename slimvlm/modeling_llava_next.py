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
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModelOutputWithPast,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from .compat import can_return_tuple
from .configuration_slimvlm import LEGACY_LLAVA_NEXT_RENAMES, SlimLlavaNextConfig, anyres_visionzip_token_count
from .modeling_slimvlm import SlimGenerationMixin, SlimImageFeaturesOutput, SlimModelMixin, register_legacy_weight_names, slim_forward


def anyres_visionzip_layout(views: torch.Tensor, dominant_indices: torch.Tensor, grid: tuple[int, int], side: int,
                            dominant: int) -> torch.Tensor:
    """One image's VisionZip tokens in the official LLaVA-NeXT order.

    Args:
        views: [1 + n, K, D] compressed views (base first, then the n = gh·gw crops row-major), each laid out
            [CLS, d - 1 dominant patches in ascending position, c contextual].
        dominant_indices: [1 + n, d] each view's kept token indices (0 = CLS; patch p is token p + 1).
        grid: (gh, gw) crops per column and per row of the anyres grid.
        side: patches per side of one view (24 for CLIP-L/14-336).
        dominant: d (CLS included).
    Returns:
        [(1 + n)·K, D]: base, then all crops' dominant patches in raster order of the (gh·side) x (gw·side)
        global patch grid, then the crops' CLS tokens, then their contextual tokens crop by crop.
    """
    base, crops = views[0], views[1:]
    if crops.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"an image with a {grid[0]}x{grid[1]} anyres grid needs {grid[0] * grid[1]} crops, got {crops.shape[0]}")
    if crops.shape[0] == 0:
        return base
    patches = dominant_indices[1:].sort(dim=1).values[:, 1:] - 1  # [n, d - 1], ascending = token order
    crop = torch.arange(crops.shape[0], device=patches.device)[:, None]
    row = (crop // grid[1]) * side + patches // side
    column = (crop % grid[1]) * side + patches % side
    order = (row * grid[1] * side + column).flatten().argsort()
    width = crops.shape[-1]
    dominant_tokens = crops[:, 1:dominant].reshape(-1, width)[order.to(crops.device)]
    return torch.cat([base, dominant_tokens, crops[:, 0], crops[:, dominant:].reshape(-1, width)])


class SlimLlavaNextModel(SlimModelMixin, LlavaNextModel):
    """`LlavaNextModel` whose `get_image_features` applies VisionZip per view (so `generate()`'s pre-encoding does too)."""

    config: SlimLlavaNextConfig
    config_class = SlimLlavaNextConfig
    output_class = LlavaNextModelOutputWithPast
    forward = slim_forward(LlavaNextModel)
    # The official VisionZip layout has no newline token (specs/visionzip.md §7.2): frozen under VisionZip.
    unused_parameters = {"visionzip": ("image_newline",)}

    def anyres_grid(self, image_size) -> tuple[int, int]:
        """(gh, gw) anyres crops of an image of `image_size` (height, width), as the image processor chose them."""
        return tuple(get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                                 self.config.vision_config.image_size))

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling | tuple:
        """Projected image features (`pooler_output`: one [N_i, D] tensor per image), compressed when
        `config.compression` says so. Padding views of a batched 5-D `pixel_values` are never encoded."""
        if self.config.compression["method"] != "visionzip":
            return super().get_image_features(pixel_values, image_sizes, vision_feature_layer=vision_feature_layer,
                                              vision_feature_select_strategy=vision_feature_select_strategy,
                                              return_dict=True, **kwargs)
        views_per_image = [image_size_to_num_patches(size, self.config.image_grid_pinpoints,
                                                     self.config.vision_config.image_size) for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([views[:count] for views, count in zip(pixel_values, views_per_image)])
        elif pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [images, views, 3, H, W] or [views, 3, H, W], got {tuple(pixel_values.shape)}")
        # CLS is always kept under VisionZip, so vision_feature_select_strategy does not apply.
        selection, tower = self._visionzip_views(pixel_values, vision_feature_layer, **kwargs)
        projected = self.multi_modal_projector(selection.tokens)  # [views, K, D]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        dominant = self.config.compression["dominant"]
        features = [
            anyres_visionzip_layout(views, indices, self.anyres_grid(size), side, dominant)
            for views, indices, size in zip(projected.split(views_per_image), selection.dominant_indices.split(views_per_image),
                                            image_sizes)
        ]
        return self._visionzip_output(selection, tower, features)


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
        if compression["method"] != "visionzip":
            return "the stock LLaVA-NeXT count (base view + unpadded crops + one newline per row)"
        per_view = compression["dominant"] + compression["contextual"]
        return f"(1 + anyres crops) x {per_view} ({5 * per_view} for a 2x2 grid)"

    def visionzip_token_count(self, image_size) -> int:
        """Tokens an image of `image_size` (height, width) becomes under VisionZip: (1 + gh·gw)·K."""
        if self.config.compression["method"] != "visionzip":
            raise ValueError(f"visionzip_token_count needs compression method 'visionzip', the model has {self.config.compression}")
        return anyres_visionzip_token_count(self.config.compression, self.model.anyres_grid(image_size))


register_legacy_weight_names("SlimLlavaNextForConditionalGeneration", "SlimLlavaNextModel", LEGACY_LLAVA_NEXT_RENAMES)

SlimLlavaNextConfig.register_for_auto_class()
SlimLlavaNextModel.register_for_auto_class("AutoModel")
SlimLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimLlavaNextModel", "SlimLlavaNextForConditionalGeneration", "anyres_visionzip_layout"]
