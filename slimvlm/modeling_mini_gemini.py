"""Mini-Gemini (MGM and MGM-HD, specs/mini_gemini.md) with visual-token compression built in.

Shipped with checkpoints: imports only torch, transformers and flat siblings. transformers has no Mini-Gemini,
so the base model is assembled from `CLIPVisionModel` (low resolution), `ConvNextModel` (high resolution),
patch-info mining, the LLaVA projector and `AutoModel` (the LLM). The method wiring is shared by every family
(`modeling_slimvlm.py`); this module says how an image becomes tokens:

    pixel_values [B, 3, 336, 336] (HD: [B, 5, 3, 336, 336] = c00, c01, c10, c11, global)
    pixel_values_aux [B, 3, S_aux, S_aux]  (both written by `SlimMiniGeminiProcessor`)
    X_L = CLIP hidden_states[-2] per view; X_H = ConvNeXt stages, upsampled to stage 0 and concatenated
    X = X_L + Mine(X_L, cells of X_H)           per view, before the projector
    image tokens = Projector(X) in the order [global, c00, c01, c10, c11]: views x 576

VisionZip (slimvlm's design, specs/visionzip.md §7.4) mines all patches first, then selects on
[CLS (unmined); mined patches] with the CLS attention and keys of CLIP layer L-2, per view: views x (d + c).
SparseVLM and VoCo-LLaMA act on the whole image block inside the language model, as for LLaVA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast, LlavaMultiModalProjector, LlavaPreTrainedModel

from .compat import cache_keyword, call_with_cache, can_return_tuple, with_cache_argument, with_stock_deprecations
from .configuration_slimvlm import SlimMiniGeminiConfig, mini_gemini_token_count, vision_tokens_per_view
from .modeling_slimvlm import RELEVANCE_KEYS, VISION_SIDE_METHODS, SlimGenerationMixin, SlimImageFeaturesOutput, SlimModelMixin

# The original code's placeholder id for <image> in input_ids (not a vocabulary id).
ORIGINAL_IMAGE_TOKEN_INDEX = -200


def concat_stage_features(stages: list[torch.Tensor]) -> torch.Tensor:
    """ConvNeXt stage outputs [B, C_s, H_s, W_s] -> [B, ΣC_s, H_0, W_0] (specs/mini_gemini.md §4).

    Every stage is resized to stage 0's size with bilinear interpolation (align_corners=False) computed in
    float32 and cast back, then the stages are concatenated on channels in stage order.
    """
    size = stages[0].shape[-2:]
    return torch.cat(
        [F.interpolate(stage.float(), size=size, mode="bilinear", align_corners=False).to(stage.dtype) for stage in stages],
        dim=1,
    )


class PatchInfoMining(nn.Module):
    """Patch-info mining (specs/mini_gemini.md §5): each low-resolution token attends to the high-resolution
    vectors of its own cell; returns the mined residual m (the caller adds it: X = X_L + m).

    Single-head attention without output projection: q = Linear(LN(X_L)), k = Linear(LN(cell)),
    v = Linear(LN(cell)), m_n = softmax(q_n · k_nᵀ / √C) · v_n, computed in the input dtype.
    """

    def __init__(self, hidden_size: int, aux_hidden_size: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(hidden_size)
        self.query_proj = nn.Linear(hidden_size, hidden_size)
        self.key_norm = nn.LayerNorm(aux_hidden_size)
        self.key_proj = nn.Linear(aux_hidden_size, hidden_size)
        self.value_norm = nn.LayerNorm(aux_hidden_size)
        self.value_proj = nn.Linear(aux_hidden_size, hidden_size)

    def forward(self, patches: torch.Tensor, high_resolution: torch.Tensor) -> torch.Tensor:
        """
        Args:
            patches: [B, N, C] low-resolution patch tokens of one view each, N a square (24² for CLIP-L/14-336).
            high_resolution: [B, C', H, W] the view's high-resolution map, H = W a multiple of √N.
        Returns:
            [B, N, C] mined residual.
        """
        batch, tokens, _ = patches.shape
        side = math.isqrt(tokens)
        height, width = high_resolution.shape[-2:]
        if side * side != tokens or height != width or height % side:
            raise ValueError(
                f"patch-info mining needs a square token grid and a square high-resolution map whose side is a multiple "
                f"of the grid's; got {tokens} tokens and a {height}x{width} map"
            )
        cell = height // side
        high_resolution = high_resolution.to(self.key_proj.weight.device)
        # [B, C', H, W] -> [B, N, cell², C']: the cell under token n, both levels in row-major order.
        cells = high_resolution.permute(0, 2, 3, 1).reshape(batch, side, cell, side, cell, -1)
        cells = cells.permute(0, 1, 3, 2, 4, 5).reshape(batch, tokens, cell * cell, -1)
        query = self.query_proj(self.query_norm(patches))  # [B, N, C]
        keys = self.key_proj(self.key_norm(cells))  # [B, N, cell², C]
        values = self.value_proj(self.value_norm(cells))
        logits = query[:, :, None] @ (keys.transpose(-1, -2) / keys.shape[-1] ** 0.5)  # [B, N, 1, cell²]
        return (logits.nan_to_num().softmax(dim=-1) @ values)[:, :, 0]


class SlimMiniGeminiModel(SlimModelMixin, LlavaModel):
    """Mini-Gemini base model: CLIP + ConvNeXt + patch-info mining + projector + language model.

    `get_image_features(pixel_values, pixel_values_aux)` applies mining and VisionZip, so `generate()`'s
    pre-encoding (which routes `pixel_values_aux` because it is a named parameter there) does too.
    """

    config: SlimMiniGeminiConfig
    config_class = SlimMiniGeminiConfig
    output_class = LlavaModelOutputWithPast

    def __init__(self, config: SlimMiniGeminiConfig):
        LlavaPreTrainedModel.__init__(self, config)  # LlavaModel.__init__ would finish before the extra towers exist
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower_aux = AutoModel.from_config(config.vision_config_aux)
        self.patch_mining = PatchInfoMining(config.vision_config.hidden_size, sum(config.vision_config_aux.hidden_sizes))
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    # ---- vision side -------------------------------------------------------------------------------------

    def high_resolution_map(self, pixel_values_aux: torch.Tensor) -> torch.Tensor:
        """[B, 3, S_aux, S_aux] -> X_H [B, C', S_aux/4, S_aux/4]: the ConvNeXt stem and stages (its pooler is unused)."""
        tower = self.vision_tower_aux
        hidden = tower.embeddings(pixel_values_aux.to(tower.embeddings.patch_embeddings.weight.dtype))
        stages = []
        for stage in tower.encoder.stages:
            hidden = stage(hidden)
            stages.append(hidden)
        return concat_stage_features(stages)

    def clip_views(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP input in MGM's order: every image's grid crops (row-major), then every image's global view."""
        config = self.config
        crops = config.image_grid**2
        if pixel_values.dim() == 4 and config.views_per_image == 1:
            return pixel_values
        if pixel_values.dim() != 5 or pixel_values.shape[1] != config.views_per_image:
            raise ValueError(
                f"pixel_values must be [images, {config.views_per_image}, 3, H, W] (views c00.. then global) for "
                f"image_grid={config.image_grid}, image_global={config.image_global}; got {tuple(pixel_values.shape)}"
            )
        return torch.cat([pixel_values[:, :crops].flatten(0, 1), pixel_values[:, crops:].flatten(0, 1)])

    def mine(self, patches: torch.Tensor, high_resolution: torch.Tensor) -> torch.Tensor:
        """X = X_L + Mine(X_L, X_H) for views in CLIP order ([B·g² crops; B globals]), [V, N, C] -> [V, N, C].

        Crop (r, c) of an image mines the (r, c) sub-map of its X_H; the global view mines X_H resized by 1/g.
        """
        config = self.config
        grid, images = config.image_grid, high_resolution.shape[0]
        high_resolution = high_resolution.to(patches.dtype)
        crop_maps = high_resolution
        if grid > 1:
            batch, channels, height, width = high_resolution.shape
            crop_maps = high_resolution.reshape(batch, channels, grid, height // grid, grid, width // grid)
            crop_maps = crop_maps.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        crops = images * grid * grid
        mined = [patches[:crops] + self.patch_mining(patches[:crops], crop_maps)]
        if config.image_global:
            global_map = F.interpolate(high_resolution.float(), scale_factor=1 / grid, mode="bilinear",
                                       align_corners=False).to(high_resolution.dtype)
            mined.append(patches[crops:] + self.patch_mining(patches[crops:], global_map))
        return torch.cat(mined)

    def image_layout(self, views: torch.Tensor, images: int) -> torch.Tensor:
        """[V, K, C] views in CLIP order -> [images, views·K, C] in MGM's token order [global, c00, c01, c10, c11]."""
        crops = images * self.config.image_grid**2
        per_image = views[:crops].reshape(images, -1, views.shape[-1])
        if self.config.image_global:
            per_image = torch.cat([views[crops:], per_image], dim=1)
        return per_image

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        pixel_values_aux: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        relevance_input_ids: torch.Tensor | None = None,
        relevance_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | tuple:
        """Projected image features: `pooler_output` is a list with one [views·K, D] tensor per image
        (K = 576 patches, or d + c under VisionZip), in the order [global, c00, c01, c10, c11].

        pixel_values: [B, 3, 336, 336] (HD: [B, views, 3, 336, 336]); pixel_values_aux: [B, 3, S_aux, S_aux].
        """
        if pixel_values_aux is None:
            raise ValueError("Mini-Gemini needs pixel_values_aux (the high-resolution image) with pixel_values; "
                             "SlimMiniGeminiProcessor writes both")
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"vision_feature_select_strategy must be 'default' for Mini-Gemini, got {strategy!r}")
        kwargs.pop("image_sizes", None)
        kwargs.pop("return_dict", None)
        images = pixel_values_aux.shape[0]
        clip_input = self.clip_views(pixel_values)
        high_resolution = self.high_resolution_map(pixel_values_aux)

        if self.config.compression["method"] in VISION_SIDE_METHODS:
            def mine_patches(hidden: torch.Tensor) -> torch.Tensor:  # CLS has no cell: it stays as CLIP gave it
                return torch.cat([hidden[:, :1], self.mine(hidden[:, 1:], high_resolution)], dim=1)

            crops = self.config.image_grid**2
            # Each image's views in MGM's token order [global, c00, c01, ...] (CLIP order: all crops, then all globals).
            groups = [([images * crops + image] if self.config.image_global else []) + list(range(image * crops, (image + 1) * crops))
                      for image in range(images)]
            views = self._compress_views(clip_input, vision_feature_layer, transform=mine_patches, groups=groups,
                                         relevance_input_ids=relevance_input_ids,
                                         relevance_attention_mask=relevance_attention_mask, **kwargs)
            if views.images is not None:
                return self._vision_output(views)
            return self._vision_output(views, list(self.image_layout(views.projected, images)))

        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"Mini-Gemini mines one CLIP layer: vision_feature_layer must be an int, got {layer!r}")
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        tower = self.vision_tower(clip_input, output_hidden_states=True, return_dict=True, **kwargs)
        mined = self.image_layout(self.mine(tower.hidden_states[layer][:, 1:], high_resolution), images)
        features = self.multi_modal_projector(mined)
        return SlimImageFeaturesOutput(last_hidden_state=mined, pooler_output=list(features),
                                       hidden_states=tower.hidden_states if output_hidden_states else None,
                                       attentions=tower.attentions)

    # ---- forward -----------------------------------------------------------------------------------------

    @can_return_tuple
    @with_stock_deprecations(LlavaModel.forward)  # past_key_values= warns as stock does
    @with_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaModelOutputWithPast | tuple:
        """`LlavaModel.forward` plus `pixel_values_aux`; SparseVLM and VoCo change what happens inside the language
        model, and VoCo also takes `voco_cache`, `voco_bounds` and `voco_token_mask`."""
        return self._slim_forward(
            cache=cache, input_ids=input_ids, pixel_values=pixel_values, pixel_values_aux=pixel_values_aux,
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )

    def _encode_images_first(self, inputs: dict) -> dict:
        """Turn `pixel_values` + `pixel_values_aux` into `mm_encoder_outputs["image"]` (what `generate()` does before
        prefill), so every method path below sees the stock LLaVA inputs."""
        input_ids = inputs.get("input_ids")
        # (not inside torch.compile: a data-dependent branch; decoding steps carry only new tokens)
        if input_ids is not None and not torch.compiler.is_compiling() and bool((input_ids == ORIGINAL_IMAGE_TOKEN_INDEX).any()):
            raise ValueError(
                f"input_ids contain {ORIGINAL_IMAGE_TOKEN_INDEX}, the original Mini-Gemini code's <image> index; this model "
                f"uses the real token id {self.config.image_token_id}: build inputs with SlimMiniGeminiProcessor"
            )
        pixel_values, pixel_values_aux = inputs.pop("pixel_values", None), inputs.pop("pixel_values_aux", None)
        inputs.pop("image_sizes", None)
        relevance = {key: inputs.pop(key, None) for key in RELEVANCE_KEYS}
        if pixel_values is None:
            return inputs
        encoded = dict(inputs.get("mm_encoder_outputs") or {})
        if encoded.get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        encoded["image"] = self.get_image_features(
            pixel_values=pixel_values, pixel_values_aux=pixel_values_aux,
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"), return_dict=True, **relevance,
        )
        inputs["mm_encoder_outputs"] = encoded
        return inputs

    def _slim_forward(self, cache=None, **inputs):
        if inputs.get("voco_cache") is None:  # with a VoCo cache the image is already in it (pixels there raise)
            inputs = self._encode_images_first(inputs)
        return super()._slim_forward(cache=cache, **inputs)

    def _stock_forward(self, cache=None, **inputs):
        """The plain LLaVA forward on pre-encoded Mini-Gemini image features."""
        return super()._stock_forward(cache=cache, **self._encode_images_first(inputs))


# Read once, not inside a torch.compile'd forward (reading a signature there breaks the graph).
_STOCK_CACHE_KEYWORD = cache_keyword(LlavaForConditionalGeneration.forward)


class SlimMiniGeminiForConditionalGeneration(SlimGenerationMixin, LlavaForConditionalGeneration):
    """Mini-Gemini with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Converted checkpoints come from `slimvlm.conversion.mini_gemini_original` (`slimvlm convert` on an original
    MGM folder); `{"method": "none"}` is the original model.
    """

    config: SlimMiniGeminiConfig
    config_class = SlimMiniGeminiConfig

    base_model_class = SlimMiniGeminiModel

    @with_stock_deprecations(LlavaForConditionalGeneration.forward)
    @with_cache_argument
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_aux: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        """`LlavaForConditionalGeneration.forward` plus `pixel_values_aux` [B, 3, S_aux, S_aux]."""
        return call_with_cache(
            super().forward, cache=cache, keyword=_STOCK_CACHE_KEYWORD, input_ids=input_ids, pixel_values=pixel_values, pixel_values_aux=pixel_values_aux,
            attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
            logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )

    def image_token_count(self) -> int:
        """Visual tokens per image that reach the language model: views x (576, or d + c under VisionZip)."""
        patches = vision_tokens_per_view(self.config.vision_config) - 1
        return mini_gemini_token_count(self.config.compression, patches, self.config.views_per_image)

    def image_tokens_summary(self) -> str:
        """The visual tokens per image, in words (model cards)."""
        views = self.config.views_per_image
        per_view = self.image_token_count() // views
        return str(per_view) if views == 1 else f"{self.image_token_count()} ({views} views x {per_view}: global, then the crops)"


SlimMiniGeminiConfig.register_for_auto_class()
SlimMiniGeminiModel.register_for_auto_class("AutoModel")
SlimMiniGeminiForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["PatchInfoMining", "SlimMiniGeminiForConditionalGeneration", "SlimMiniGeminiModel", "concat_stage_features"]
