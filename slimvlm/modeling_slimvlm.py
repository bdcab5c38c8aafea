"""What every Slim family shares: the method wiring, written once.

Shipped with checkpoints: imports only torch, transformers and flat siblings. A family module (e.g.
`modeling_llava.py`) composes these mixins with the stock transformers classes and states only how pixels
become per-view encoder tokens (its `get_image_features`), how the compressed views are laid out, and how
many placeholders an image needs. Everything a method does inside the language model (SparseVLM), in the
attention mask or the KV cache (VoCo-LLaMA), and in loading/saving/generation lives here.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.utils import logging

from .configuration_slimvlm import pruned_count, views_pruned_count
from .modelcard_slimvlm import push_to_hub_with_card, write_card_unless_present
from .compat import (cache_keyword, can_return_tuple, call_with_cache, generate_with_cache, generation_cache, model_output, pop_cache,
                     with_cache_argument, with_stock_deprecations)
from .cdpruner import (
    RelevanceEncoder,
    clip_relevance,
    divprune_select,
    dpp_greedy_map,
    embedding_relevance,
    gather_rows,
    minmax_relevance,
)
from .sparsevlm import SparseVLMCache, sparsevlm_decode, sparsevlm_prefill
from .visionzip import encode_with_visionzip, resolve_feature_layer, visionzip_from_hidden_states
from .voco import (
    VoCoBounds,
    VoCoCache,
    VoCoDynamicCache,
    VoCoSegments,
    build_voco_attention_mask,
    cache_metadata,
    check_voco_groups,
    gather_voco_kv,
    kv_layout,
    positions_from_padding,
    rope_settings,
    rotate_half_of,
    segment_rows,
    tensor_sha256,
    voco_group_indices,
    weights_fingerprint,
)
from .voco import voco_bounds as compute_voco_bounds


logger = logging.get_logger(__name__)

# Modules bitsandbytes must leave in full precision by default: VisionZip scores come from the vision
# tower, and the projector and lm_head are small. Any list replaces transformers' defaults, so lm_head
# is listed too. Users who set `llm_int8_skip_modules` themselves keep their own list.
DEFAULT_QUANTIZATION_SKIP_MODULES = [
    "model.vision_tower",
    "model.image_tower",
    "model.video_tower",
    "model.vision_tower_aux",
    "model.patch_mining",
    "model.relevance_encoder",
    "model.multi_modal_projector",
    "lm_head",
]


def register_legacy_weight_names(model_class_name: str, base_class_name: str, renames: dict[str, str]) -> None:
    """Let `from_pretrained` read the legacy llava-hf key layout into our classes.

    transformers renames legacy keys only for its own classes; custom classes need a mapping registered
    under their class name (registering is idempotent, and touches no other model).
    """
    register_checkpoint_conversion_mapping(
        model_class_name, [WeightRenaming(source_patterns=s, target_patterns=t) for s, t in renames.items()], overwrite=True
    )
    # The head-less base model (AutoModel) sees the same keys without the `model.` prefix.
    register_checkpoint_conversion_mapping(
        base_class_name,
        [WeightRenaming(source_patterns=r"^language_model.model", target_patterns="language_model")],
        overwrite=True,
    )


def apply_default_quantization_skips(kwargs: dict) -> None:
    """Keep vision-side modules in full precision unless the user chose a skip list."""
    quantization_config = kwargs.get("quantization_config")
    if quantization_config is None:
        return
    if isinstance(quantization_config, dict):
        quantization_config.setdefault("llm_int8_skip_modules", list(DEFAULT_QUANTIZATION_SKIP_MODULES))
    elif getattr(quantization_config, "llm_int8_skip_modules", "absent") is None:
        quantization_config.llm_int8_skip_modules = list(DEFAULT_QUANTIZATION_SKIP_MODULES)


def build_relevance_encoder(encoder_config: dict) -> RelevanceEncoder:
    """The `RelevanceEncoder` described by `config.relevance_encoder_config` (weights come from the checkpoint)."""
    from transformers import CLIPTextConfig

    text_config = CLIPTextConfig(**encoder_config["text_config"])
    return RelevanceEncoder(text_config, encoder_config["projection_dim"], encoder_config["vision_hidden_size"])


@dataclass
class SlimImageFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features` output. `pooler_output` is a list of [K, D] projected features, one per image.

    dominant_indices: [num_images, d] VisionZip's kept token indices (official order: CLS, then by score);
        None when VisionZip is off.
    kept_indices: CDPruner / DivPrune: one 1-D tensor per view (scope "image": per image), ascending, of the
        candidate positions kept (patch indices within the view, CLS excluded under the "default" strategy).
    """

    dominant_indices: torch.Tensor | None = None
    kept_indices: list[torch.Tensor] | None = None


# Methods that act at the vision-side plug point: after the tower, before the language model; the processor
# writes their token count. Families route `get_image_features` through `SlimModelMixin._compress_views` for these.
VISION_SIDE_METHODS = ("visionzip", "cdpruner", "divprune")
# Processor outputs that carry CDPruner's instruction, one row per image (video) so that `generate()`'s
# pre-encoding, which runs before the beams are expanded and before any sample mapping, can use them as is.
RELEVANCE_KEYS = ("relevance_input_ids", "relevance_attention_mask")
VIDEO_RELEVANCE_KEYS = ("relevance_video_input_ids", "relevance_video_attention_mask")


@dataclass
class VisionViews:
    """What a vision-side method made of a batch of V independent views (each view in its own token order).

    projected: [V, K, D] the kept (or merged) tokens after the projector.
    tokens: [V, K, C] the same tokens before the projector.
    tower: the tower's full outputs when the caller asked for hidden states or attentions, else None.
    dominant_indices: [V, d] VisionZip's kept token indices (official order: CLS, then by score), else None.
    kept_indices: CDPruner / DivPrune: [V, K] kept candidate positions per view (ascending), else None.
    images: CDPruner / DivPrune with scope "image": one [K_i, D] tensor per image (its views' candidates
        concatenated in the order of `groups`, then selected), and `projected` / `kept_indices` are None.
    """

    projected: torch.Tensor | None
    tokens: torch.Tensor | list[torch.Tensor]
    tower: object = None
    dominant_indices: torch.Tensor | None = None
    kept_indices: torch.Tensor | list[torch.Tensor] | None = None
    images: list[torch.Tensor] | None = None


def anyres_visionzip_layout(views: torch.Tensor, dominant_indices: torch.Tensor, grid: tuple[int, int], side: int,
                            dominant: int, cls: bool = True) -> torch.Tensor:
    """One anyres image's VisionZip tokens in the official LLaVA-NeXT order (specs/visionzip.md §7.2), shared by
    LLaVA-NeXT (CLIP, CLS) and LLaVA-OneVision (SigLIP, no CLS: the same order minus the CLS block,
    specs/modern_families.md §4).

    Args:
        views: [1 + n, K, D] compressed views (base first, then the n = gh·gw crops row-major), each laid out
            [CLS, d - 1 dominant patches in ascending position, c contextual] ([d dominant patches, c contextual]
            without CLS).
        dominant_indices: [1 + n, d] each view's kept token indices (with CLS: 0 = CLS and patch p is token
            p + 1; without: patch indices).
        grid: (gh, gw) crops per column and per row of the anyres grid.
        side: patches per side of one view (24 for CLIP-L/14-336, 27 for SigLIP-384/14).
        dominant: d (CLS included when there is one).
        cls: whether the views carry a CLS token.
    Returns:
        [(1 + n)·K, D]: base, then all crops' dominant patches in raster order of the (gh·side) x (gw·side)
        global patch grid, then (with CLS) the crops' CLS tokens, then their contextual tokens crop by crop.
    """
    base, crops = views[0], views[1:]
    if crops.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"an image with a {grid[0]}x{grid[1]} anyres grid needs {grid[0] * grid[1]} crops, got {crops.shape[0]}")
    if crops.shape[0] == 0:
        return base
    offset = 1 if cls else 0
    patches = dominant_indices[1:].sort(dim=1).values[:, offset:] - offset  # [n, d - offset], ascending = token order
    order = global_raster_order(patches, grid, side)
    width = crops.shape[-1]
    dominant_tokens = crops[:, offset:dominant].reshape(-1, width)[order.to(crops.device)]
    cls_tokens = [crops[:, 0]] if cls else []
    return torch.cat([base, dominant_tokens, *cls_tokens, crops[:, dominant:].reshape(-1, width)])


def anyres_pruned_layout(views: torch.Tensor, kept_indices: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """One image's CDPruner / DivPrune tokens (scope "view") in the official LLaVA-NeXT order (specs/cdpruner.md §5.3),
    shared by LLaVA-NeXT (CLIP, CLS dropped) and LLaVA-OneVision (SigLIP, every patch a candidate).

    views: [1 + n, K, D] kept tokens of the base view and the n = gh·gw crops (row-major), each ascending;
    kept_indices: [1 + n, K] their patch indices. Returns [(1 + n)·K, D]: the base's tokens, then all crops'
    tokens in raster order of the global grid; no unpadding and no newline.
    """
    base, crops = views[0], views[1:]
    if crops.shape[0] != grid[0] * grid[1]:
        raise ValueError(f"an image with a {grid[0]}x{grid[1]} anyres grid needs {grid[0] * grid[1]} crops, got {crops.shape[0]}")
    if crops.shape[0] == 0:
        return base
    order = global_raster_order(kept_indices[1:], grid, side).to(crops.device)
    return torch.cat([base, crops.reshape(-1, crops.shape[-1])[order]])


def global_raster_order(patches: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """The order that sorts the crops' kept patches [n, k] (each crop's row ascending; crops row-major) into
    raster order of the (gh·side) x (gw·side) global patch grid: a permutation of n·k."""
    crop = torch.arange(patches.shape[0], device=patches.device)[:, None]
    row = (crop // grid[1]) * side + patches // side
    column = (crop % grid[1]) * side + patches % side
    return (row * grid[1] * side + column).flatten().argsort()


def flatten_views(pixel_values: torch.Tensor, views_per_image: list[int]) -> torch.Tensor:
    """[V, 3, H, W] views of a batch of anyres images: a 5-D [images, max views, 3, H, W] input loses its padding
    views (never encoded); a 4-D input is already flat."""
    if pixel_values.dim() == 5:
        return torch.cat([views[:count] for views, count in zip(pixel_values, views_per_image)])
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [images, views, 3, H, W] or [views, 3, H, W], got {tuple(pixel_values.shape)}")
    return pixel_values


class AnyresMixin:
    """The anyres grid of a LLaVA-NeXT-style base model (`config.image_grid_pinpoints`, square tower views)."""

    def anyres_grid(self, image_size) -> tuple[int, int]:
        """(gh, gw) anyres crops of an image of `image_size` (height, width), as the image processor chose them."""
        return tuple(get_anyres_image_grid_shape(image_size, self.config.image_grid_pinpoints,
                                                 self.config.vision_config.image_size))

    def anyres_views(self, image_size) -> int:
        """Views the tower encodes for an image of `image_size`: the base view and the gh x gw crops."""
        return image_size_to_num_patches(image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)


def freeze_after_loading(loaded):
    """`from_pretrained`'s result (a model, or (model, info)) with the parameters its compression never uses
    frozen again: loading replaces the parameters that `post_init` froze."""
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    base = model if isinstance(model, SlimModelMixin) else getattr(model, "model", None)
    if isinstance(base, SlimModelMixin):
        base.freeze_unused_parameters()
    return loaded


class StockInitMixin:
    """Slim classes initialise and load like the stock classes they extend.

    transformers treats classes defined outside the library as custom code and, for those, skips any module
    without parameters of its own when it initialises weights missing from a checkpoint (CLIPAttention,
    CLIPMLP): their Linear children then keep the generic std instead of the tower's own init, so
    `from_pretrained` of a checkpoint without tower weights would disagree with `__init__`. Our `_init_weights`
    are the stock ones, so the library's own path applies.
    """

    @classmethod
    def is_custom_code(cls) -> bool:
        return False


def slim_forward(stock_class) -> callable:
    """A base-model `forward` with exactly `stock_class.forward`'s signature that routes by compression method.

    Positional and keyword arguments bind as for the stock forward; the cache is taken under either
    keyword (`cache` from transformers 5.24, `past_key_values` before); `return_dict=False` gives a tuple.
    """
    signature = inspect.signature(stock_class.forward)
    parameters = list(signature.parameters.values())[1:]  # without self
    # Bound here once: `Signature.bind` inside the forward breaks torch.compile's graph (fullgraph=True fails).
    positional = tuple(p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    named = frozenset(p.name for p in parameters if p.kind is not p.VAR_POSITIONAL)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)

    def forward(self, *args, **kwargs):
        if len(args) > len(positional):
            raise TypeError(f"{stock_class.__name__}.forward takes {len(positional)} positional arguments after self, "
                            f"got {len(args)}")
        for name, value in zip(positional, args):
            if name in kwargs:
                raise TypeError(f"{stock_class.__name__}.forward got multiple values for argument '{name}'")
            kwargs[name] = value
        if not takes_any:
            unknown = sorted(set(kwargs) - named)
            if unknown:
                raise TypeError(f"{stock_class.__name__}.forward got unexpected keyword arguments {unknown}")
        cache = pop_cache(kwargs)
        return self._slim_forward(cache=cache, **kwargs)

    forward.__signature__ = signature
    forward.__doc__ = (f"`{stock_class.__name__}.forward` (same signature); SparseVLM and VoCo change what happens "
                       "inside the language model, and VoCo also takes `voco_cache`, `voco_bounds` and `voco_token_mask`.")
    # The stock deprecated keywords (past_key_values= from 5.24; Video-LLaVA's pixel_values_images=) as stock takes them.
    return can_return_tuple(with_stock_deprecations(stock_class.forward)(forward))


class SlimModelMixin(StockInitMixin):
    """Behaviour every Slim base model shares: the routing of a forward by compression method, VisionZip over
    a batch of views, the SparseVLM and VoCo paths inside the language model, and a placeholder check that
    explains itself. A family sets `output_class` and `forward = slim_forward(StockModel)`, and writes its
    `get_image_features`."""

    @property
    def compression(self) -> dict:
        return self.config.compression

    def get_placeholder_mask(self, input_ids, inputs_embeds, **features):
        try:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, **features)
        except ValueError as error:
            raise ValueError(
                f"{error}. The model's compression is {self.config.compression}; build the processor with the "
                "same compression (e.g. SlimLlavaProcessor.from_pretrained(path, compression=model.config.compression)) "
                "so it writes as many image placeholders as the model produces."
            ) from None

    def _placeholder_mask(self, modality: str, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        """[B, L, D] bool mask of `modality`'s placeholders ("image"; video families add "video"), checked
        against `features` [N, D]. Families with videos return (image mask, video mask) from the stock method."""
        masks = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, **{f"{modality}_features": features})
        if isinstance(masks, tuple):
            return masks[0] if modality == "image" else masks[1]
        return masks

    # The family's `*ModelOutputWithPast` class (set by each family).
    output_class = None

    # Parameters a compression method never uses, by method (LLaVA-NeXT: `image_newline` under VisionZip). They are
    # frozen (requires_grad False) while that method is on, so training under DDP needs no
    # find_unused_parameters=True, and get their own requires_grad back when `set_compression` switches away.
    unused_parameters: dict[str, tuple[str, ...]] = {}

    def post_init(self):
        """Adds CDPruner's relevance encoder when the config describes one (specs/cdpruner.md §10), and freezes
        the parameters the compression method leaves unused."""
        encoder_config = getattr(self.config, "relevance_encoder_config", None)
        if encoder_config and getattr(self, "relevance_encoder", None) is None:
            self.relevance_encoder = build_relevance_encoder(encoder_config)
        super().post_init()
        self.freeze_unused_parameters()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return freeze_after_loading(super().from_pretrained(*args, **kwargs))

    def freeze_unused_parameters(self) -> None:
        """Apply `unused_parameters` to the current compression (called on init, load and `set_compression`)."""
        unused = set(self.unused_parameters.get(self.config.compression["method"], ()))
        frozen = self.__dict__.setdefault("_frozen_by_compression", {})  # name -> requires_grad before freezing
        for name in sorted({name for names in self.unused_parameters.values() for name in names}):
            parameter = self.get_parameter(name)
            if name in unused:  # (again after loading, which replaces the parameters)
                frozen.setdefault(name, parameter.requires_grad)
                parameter.requires_grad_(False)
            elif name not in unused and name in frozen:
                parameter.requires_grad_(frozen.pop(name))

    # ---- vision side: VisionZip, CDPruner, DivPrune (one plug point, after the tower, before the LLM) ----

    def _compress_views(self, pixel_values: torch.Tensor, vision_feature_layer, vision_tower=None,
                        split: tuple[int, int] | None = None, transform=None, cls: bool = True,
                        **kwargs) -> VisionViews:
        """The vision-side method of `config.compression` on a batch of independent views [V, 3, H, W].

        The method module only selects (or merges) tokens of a view; this does the rest once for every family:
        running the tower, the projector, the gather and the tower outputs the caller asked for.

        vision_tower: the tower to run (default `self.vision_tower`; Video-LLaVA passes its image or video tower).
        split: VisionZip's (dominant, contextual) (default the image split of `config.compression`).
        transform: optional [V, 1 + N, C] -> [V, 1 + N, C] on the feature layer's output (CLS first) before
            selection (Mini-Gemini's patch mining); VisionZip's scores and CDPruner's CLIP relevance stay the
            CLIP layer's.
        cls: False for a tower without CLS (SigLIP): VisionZip scores by attention received at the feature
            layer and d counts patches.
        CDPruner / DivPrune also take (in kwargs) `groups` (the views of each image, in the family's token order;
        default one view per image), `select_strategy` ("default" drops CLS from the candidates, "full" keeps
        it) and the relevance inputs (`RELEVANCE_KEYS`, one row per image).
        Returns the views in each view's own token order (`VisionViews`); the family lays them out per image.
        """
        compression = self.config.compression
        vision_tower = self.vision_tower if vision_tower is None else vision_tower
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        output_hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        if compression["method"] != "visionzip":
            kwargs = {key: value for key, value in kwargs.items() if key not in ("output_hidden_states", "output_attentions")}
            return self._pruned_views(pixel_values, layer, vision_tower, transform, output_hidden_states,
                                      output_attentions, **kwargs)
        feature_layer = resolve_feature_layer(layer, len(vision_tower.encoder.layers))
        dominant, contextual = split or (compression["dominant"], compression["contextual"])
        tower = None
        if not (output_hidden_states or output_attentions):
            # The tower stops at the scoring layer, whose output is all VisionZip needs.
            selection = encode_with_visionzip(vision_tower, pixel_values, feature_layer, dominant, contextual, transform,
                                              cls=cls)
        else:
            # As in the stock classes, the tower then runs to the end.
            tower = vision_tower(pixel_values, output_hidden_states=True, output_attentions=bool(output_attentions),
                                 return_dict=True)
            selection = visionzip_from_hidden_states(vision_tower, tower.hidden_states, feature_layer, dominant,
                                                     contextual, transform, cls=cls)
            tower.hidden_states = tower.hidden_states if output_hidden_states else None
            tower.attentions = tower.attentions if output_attentions else None
        return VisionViews(projected=self.multi_modal_projector(selection.tokens), tokens=selection.tokens,
                           tower=tower, dominant_indices=selection.dominant_indices)

    def _pruned_views(self, pixel_values, layer, vision_tower, transform, output_hidden_states, output_attentions,
                      groups: list[list[int]] | None = None, select_strategy: str | None = None,
                      relevance_input_ids=None, relevance_attention_mask=None, **kwargs) -> VisionViews:
        """CDPruner / DivPrune (specs/cdpruner.md): all N candidates of every view are projected and K kept rows
        gathered (scope "view"), or K of each image's concatenated views (scope "image")."""
        compression = self.config.compression
        strategy = select_strategy or self.config.vision_feature_select_strategy
        tower = vision_tower(pixel_values, output_hidden_states=True, output_attentions=bool(output_attentions),
                             return_dict=True)
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        hidden = torch.cat([tower.hidden_states[index] for index in layers], dim=-1)  # [V, 1 + N, C]
        mined = hidden if transform is None else transform(hidden)
        candidates = mined[:, 1:] if strategy == "default" else mined
        projected = self.multi_modal_projector(candidates)  # [V, N, D]
        groups = [[view] for view in range(projected.shape[0])] if groups is None else groups
        weights = None
        if compression["method"] == "cdpruner":
            rho = self._relevance(projected, hidden[:, 1:] if strategy == "default" else hidden, vision_tower,
                                  groups, relevance_input_ids, relevance_attention_mask)
            weights = torch.empty_like(rho)
            for group in groups:
                weights[group] = minmax_relevance(rho[group], compression["theta"])  # one min-max per image
        per_view = pruned_count(compression, projected.shape[1])
        tower.hidden_states = tower.hidden_states if output_hidden_states else None
        tower.attentions = tower.attentions if output_attentions else None
        if compression["scope"] == "view":
            kept = self._select(projected, weights, per_view)
            return VisionViews(projected=gather_rows(projected, kept), tokens=gather_rows(candidates, kept),
                               tower=tower if (output_hidden_states or output_attentions) else None,
                               kept_indices=kept)
        images, tokens, kept_indices = [], [], []
        for group in groups:
            block = projected[group].flatten(0, 1)[None]
            per_image = views_pruned_count(compression, projected.shape[1], len(group))
            kept = self._select(block, None if weights is None else weights[group].flatten()[None], per_image)
            images.append(gather_rows(block, kept)[0])
            tokens.append(gather_rows(candidates[group].flatten(0, 1)[None], kept)[0])
            kept_indices.append(kept[0])
        return VisionViews(projected=None, tokens=tokens, images=images, kept_indices=kept_indices,
                           tower=tower if (output_hidden_states or output_attentions) else None)

    def _prune_blocks(self, blocks: list[torch.Tensor], relevance_input_ids=None, relevance_attention_mask=None
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """CDPruner / DivPrune over whole per-image blocks [V_i, D] (LLaVA-NeXT scope "image": the stock packed
        block): K (or round(ratio·V_i)) of each. Returns (kept rows, kept positions) per image."""
        compression = self.config.compression
        if compression["method"] == "cdpruner" and compression["relevance"] == "clip":
            raise ValueError("CDPruner scope 'image' on a packed block has no per-patch CLIP relevance; use scope 'view' "
                             "(the official layout) or relevance 'llm_embeddings'")
        if compression["method"] == "cdpruner" and relevance_input_ids is not None and relevance_input_ids.shape[0] != len(blocks):
            raise ValueError(f"relevance_input_ids has {relevance_input_ids.shape[0]} rows but there are {len(blocks)} "
                             "images: the processor writes one row per image")
        features, kept_indices = [], []
        for image, block in enumerate(blocks):
            weights = None
            if compression["method"] == "cdpruner":
                mask = None if relevance_attention_mask is None else relevance_attention_mask[image: image + 1]
                ids = None if relevance_input_ids is None else relevance_input_ids[image: image + 1]
                weights = minmax_relevance(self._relevance(block[None], None, None, [[0]], ids, mask), compression["theta"])
            kept = self._select(block[None], weights, pruned_count(compression, block.shape[0]))
            features.append(gather_rows(block[None], kept)[0])
            kept_indices.append(kept[0])
        return features, kept_indices

    def _encode_pruned_first(self, inputs: dict) -> dict:
        """Under CDPruner / DivPrune, encode pixels here with the relevance inputs (which the stock forward would
        hand on to the language model) and pass the features on as `mm_encoder_outputs`; other methods just
        drop the relevance inputs."""
        relevance = {key: inputs.pop(key, None) for key in RELEVANCE_KEYS + VIDEO_RELEVANCE_KEYS}
        if self.config.compression["method"] not in ("cdpruner", "divprune"):
            return inputs
        encoded = dict(inputs.get("mm_encoder_outputs") or {})
        for modality, pixels, keys in (("image", "pixel_values", RELEVANCE_KEYS), ("video", "pixel_values_videos", VIDEO_RELEVANCE_KEYS)):
            if inputs.get(pixels) is None:
                inputs.pop(pixels, None)
                continue
            encoder = getattr(self, f"get_{modality}_features")
            parameters = inspect.signature(encoder).parameters
            extra = {key: inputs[key] for key in ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                                                 "batch_num_images", "vision_aspect_ratio")
                     if key in parameters and inputs.get(key) is not None}
            encoded[modality] = encoder(**{pixels: inputs.pop(pixels)}, **extra, return_dict=True,
                                        **{key: relevance[key] for key in keys})
        if encoded:
            inputs["mm_encoder_outputs"] = encoded
        return inputs

    def _select(self, features: torch.Tensor, weights: torch.Tensor | None, tokens: int) -> torch.Tensor:
        """[G, N, D] -> [G, K] ascending kept positions under the configured method."""
        if self.config.compression["method"] == "cdpruner":
            return dpp_greedy_map(features, weights, tokens)
        return divprune_select(features, tokens)

    def _relevance(self, projected, patches, vision_tower, groups, input_ids, attention_mask) -> torch.Tensor:
        """ρ [V, N] of every view's candidates for its image's instruction (specs/cdpruner.md §2.2-2.4, §8).

        input_ids / attention_mask: one row per image (in the order of `groups`): [I, R, 77] CLIP ids under
        `relevance: "clip"`, [I, T] LLM-vocabulary ids under `"llm_embeddings"`.
        """
        if input_ids is None:
            raise ValueError(
                "CDPruner selects visual tokens by their relevance to the instruction, but no relevance_input_ids were "
                "given; build inputs with the Slim processor of the same compression (it writes them from "
                "`instructions=`, the chat messages' last user turn or the prompt), or use method 'divprune'"
            )
        if input_ids.shape[0] != len(groups):
            raise ValueError(f"relevance_input_ids has {input_ids.shape[0]} rows but there are {len(groups)} images: "
                             "the processor writes one row per image (video)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        rho = projected.new_empty(projected.shape[:2], dtype=torch.float32)
        if self.config.compression["relevance"] == "clip":
            encoder = self.relevance_encoder
            image_embeds = encoder.image_embeddings(vision_tower.post_layernorm, patches)
            for image, group in enumerate(groups):
                text = encoder.text_embeddings(input_ids[image].to(encoder.text_projection.weight.device),
                                               attention_mask[image].to(encoder.text_projection.weight.device))
                rho[group] = clip_relevance(image_embeds[group], text).to(rho.device)
            return rho
        embeddings = self.get_input_embeddings()
        for image, group in enumerate(groups):
            ids = input_ids[image][attention_mask[image].bool()].to(embeddings.weight.device)
            if ids.numel() == 0:
                rho[group] = 0.0  # no instruction: constant relevance (r = 1 after min-max), DivPrune-like DPP
                continue
            rho[group] = embedding_relevance(projected[group], embeddings(ids)).to(rho.device)
        return rho

    @staticmethod
    def _vision_output(views: VisionViews, features: list[torch.Tensor] | None = None) -> SlimImageFeaturesOutput:
        """`get_image_features`' output under a vision-side method: `features` (one [N_i, D] tensor per image,
        in the family's layout) as `pooler_output`, the views' tokens before the projector, the kept indices
        and the tower's outputs if asked for."""
        tower = views.tower
        if features is None:  # each view is an image, or scope "image" selected per image
            features = views.images if views.images is not None else list(views.projected)
        return SlimImageFeaturesOutput(
            last_hidden_state=views.tokens,
            pooler_output=features,
            hidden_states=tower.hidden_states if tower is not None else None,
            attentions=tower.attentions if tower is not None else None,
            dominant_indices=views.dominant_indices,
            kept_indices=None if views.kept_indices is None else list(views.kept_indices),
        )

    def _slim_forward(self, cache=None, **inputs):
        """Route a forward by compression method (SparseVLM and VoCo change what happens inside the LM)."""
        inputs = self._encode_pruned_first(inputs)
        method = self.config.compression["method"]
        if method == "sparsevlm":
            return self._forward_sparsevlm(cache=cache, **inputs)
        if method == "voco":
            return self._forward_voco(cache=cache, **inputs)
        return self._stock_forward(cache=cache, **inputs)

    # The keyword the stock family forward takes the cache under (read once per class, not in a compiled forward).
    _stock_cache_keyword = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._stock_cache_keyword = cache_keyword(super(SlimModelMixin, cls).forward)

    def _stock_forward(self, cache=None, **kwargs):
        """The stock family forward (e.g. `LlavaModel.forward`), the cache under the keyword it declares."""
        return call_with_cache(super(SlimModelMixin, self).forward, cache=cache, keyword=self._stock_cache_keyword, **kwargs)

    # ---- SparseVLM (specs/sparsevlm.md; the math and the decoder loop live in sparsevlm.py) ----

    # Test hook (instance attribute; None = the seeded default): DPC-KNN noise (step, sample, n) -> [n].
    sparsevlm_noise = None
    # Set by every SparseVLM prefill: a `sparsevlm.SparseVLMReport`.
    sparsevlm_report = None

    def _forward_sparsevlm(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        mm_encoder_outputs=None,
        use_cache: bool | None = None,
        sparsevlm_plan=None,
        pixel_values_videos: torch.Tensor | None = None,
        **kwargs,
    ):
        """`LlavaModel.forward` with SparseVLM pruning inside the language model.

        The visual span is each sample's image block or, for video families, its video block (one per sample).
        Prefill (no cache or an empty one) prunes; a `SparseVLMCache` from a prefill is continued without
        pruning. The output `last_hidden_state` is [B, S_last, C], left-padded: shorter than the input, its
        last slot is each sample's last token. What was kept is in `self.sparsevlm_report` (and
        `cache.report`): per-layer visual counts, ET, processed mean, raters and prune steps.
        `sparsevlm_plan` (a report's `steps`) replays a plan instead of scoring (cache-free reference loops).
        """
        if self.training:
            if not getattr(self, "_sparsevlm_warned", False):
                logger.warning("SparseVLM runs dense in training mode (pruning is inference-only)")
                self._sparsevlm_warned = True
            media = {"image_sizes": image_sizes} if image_sizes is not None else {}
            if pixel_values_videos is not None:
                media["pixel_values_videos"] = pixel_values_videos
            return self._stock_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                                       vision_feature_layer=vision_feature_layer,
                                       vision_feature_select_strategy=vision_feature_select_strategy,
                                       mm_encoder_outputs=mm_encoder_outputs, use_cache=use_cache, **media, **kwargs)
        decoding = self._sparsevlm_checks(cache, kwargs)
        inputs_embeds, visual_mask, encoded = self._merged_embeddings(
            input_ids, pixel_values, inputs_embeds, vision_feature_layer, vision_feature_select_strategy,
            image_sizes, mm_encoder_outputs, pixel_values_videos,
        )
        return self._sparsevlm_language_model(inputs_embeds, visual_mask, encoded, attention_mask, position_ids, cache,
                                              decoding, use_cache, sparsevlm_plan, **kwargs)

    def _sparsevlm_checks(self, cache, kwargs: dict) -> bool:
        """Refuse what SparseVLM cannot do (a non-Llama decoder, a static cache, a foreign non-empty cache,
        per-layer outputs); returns whether this forward continues a SparseVLM prefill (decoding)."""
        language_model = self.language_model
        if getattr(language_model, "rotary_emb", None) is None or not hasattr(language_model.layers[0].self_attn, "q_proj"):
            raise ValueError(
                f"SparseVLM supports Llama-family decoders (rotary_emb, self_attn.q_proj); got {type(language_model).__name__}"
            )
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(
                f"SparseVLM leaves different KV lengths in different layers and needs a dynamic cache; got "
                f"{type(cache).__name__}. Do not request a static cache (cache_implementation='static')."
            )
        decoding = cache is not None and cache.get_seq_length() > 0
        if decoding and not isinstance(cache, SparseVLMCache):
            raise ValueError(
                "SparseVLM can only continue a cache that its own prefill filled (a SparseVLMCache); got a "
                f"non-empty {type(cache).__name__}"
            )
        for flag in ("output_hidden_states", "output_attentions"):
            if kwargs.get(flag, getattr(self.config, flag, False)):
                raise ValueError(
                    f"{flag}=True is not supported under SparseVLM: pruning makes every layer's sequence shorter, so "
                    "there is no per-layer tensor to return; use compression {'method': 'none'} to inspect them"
                )
        return decoding

    def _sparsevlm_language_model(self, inputs_embeds, visual_mask, encoded: dict, attention_mask, position_ids, cache,
                                  decoding: bool, use_cache, sparsevlm_plan=None, visual_injections=None, **kwargs):
        """The language model under SparseVLM on the merged embeddings: a pruning prefill, or a decode step on its
        cache. `position_ids`: [B, L], or M-RoPE [3, B, L] / [4, B, L] (Qwen-VL); `visual_injections`: DeepStack
        rows per layer (Qwen3-VL, `sparsevlm.sparsevlm_prefill`)."""
        kwargs.pop("return_dict", None)
        if decoding:
            hidden = sparsevlm_decode(self.language_model, inputs_embeds, cache, attention_mask,
                                      position_ids, **kwargs)
        else:
            hidden, cache, report = sparsevlm_prefill(
                self.language_model, inputs_embeds, visual_mask, self.config.compression, attention_mask,
                position_ids, plan=sparsevlm_plan, noise=self.sparsevlm_noise, visual_injections=visual_injections,
                **kwargs,
            )
            self.sparsevlm_report = report
        return model_output(self.output_class, last_hidden_state=hidden,
                            cache=cache if use_cache is not False else None, **encoded)

    def _embeddings_and_encoded(self, input_ids, inputs_embeds, pixel_values, pixel_values_videos, mm_encoder_outputs):
        """The stock forward's input checks; returns (inputs_embeds, a copy of `mm_encoder_outputs` as a dict)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if (pixel_values is not None or pixel_values_videos is not None) and mm_encoder_outputs:
            raise ValueError("You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        return inputs_embeds, dict(mm_encoder_outputs or {})

    def _merged_embeddings(self, input_ids, pixel_values, inputs_embeds, vision_feature_layer,
                           vision_feature_select_strategy, image_sizes, mm_encoder_outputs, pixel_values_videos=None):
        """Decoder input with the image (and video) features scattered in, as the stock forward builds it.

        Returns (inputs_embeds [B, L, C], visual_mask [B, L] bool at every image/video placeholder, encoder
        outputs as `model_output` fields: {"image_outputs": ..., and "video_outputs": ... when a video was given}).
        """
        inputs_embeds, encoded = self._embeddings_and_encoded(input_ids, inputs_embeds, pixel_values, pixel_values_videos,
                                                              mm_encoder_outputs)
        if encoded.get("image") is None and pixel_values is not None:
            media = {"image_sizes": image_sizes} if image_sizes is not None else {}
            encoded["image"] = self.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy, return_dict=True, **media,
            )
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos=pixel_values_videos,
                                                       vision_feature_layer=vision_feature_layer, return_dict=True)
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        for modality, outputs in encoded.items():
            if outputs is None:
                continue
            features = list(outputs.pooler_output)
            items = len(features)
            features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self._placeholder_mask(modality, input_ids, inputs_embeds, features)
            visual_mask = visual_mask | mask[..., 0]
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)
            if modality == "image" and items > int(mask[..., 0].any(dim=1).sum()):
                raise ValueError(
                    f"SparseVLM supports one image per sample; got {items} images for "
                    f"{int(mask[..., 0].any(dim=1).sum())} samples with image tokens"
                )
        fields = {"image_outputs": encoded.get("image")}
        if encoded.get("video") is not None:
            fields["video_outputs"] = encoded["video"]
        return inputs_embeds, visual_mask, fields

    # ---- VoCo-LLaMA (specs/voco.md; the rule and the cache live in voco.py) ----

    def _voco_token_id(self) -> int:
        token_id = getattr(self.config, "voco_token_id", None)
        if token_id is None:
            raise ValueError(
                "compression method 'voco' needs config.voco_token_id (the id of '<voco>'), got None; call "
                "slimvlm.voco.add_voco_token(model, processor) once on a base checkpoint"
            )
        return token_id

    def _voco_layout(self, voco_token_mask: torch.Tensor, input_ids: torch.Tensor | None) -> VoCoBounds:
        """Where the VoCo rule applies in each full row: one VoCo group per row (an image, specs/voco.md §3).
        Video families return `VoCoSegments` (one group per frame, §7)."""
        check_voco_groups(voco_token_mask, self.config.compression["num_voco_tokens"])
        return compute_voco_bounds(voco_token_mask)

    def _voco_prefix_positions(self, input_ids, attention_mask, positions, kwargs: dict):
        """(positions of the stage-1 prefix forward, 1-D positions [B, L] the VoCo tokens are cached at, the
        forward's remaining kwargs) for `voco_compress`: the cumsum `positions` twice here; M-RoPE families give
        their 3-D ids and, for the text-typed VoCo tokens, the row those ids share."""
        return positions, positions, kwargs

    def _voco_layer_devices(self) -> list[torch.device]:
        return [next(layer.parameters()).device for layer in self.language_model.layers]

    def _forward_voco(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        voco_cache: VoCoCache | None = None,
        voco_bounds: VoCoBounds | None = None,
        voco_token_mask: torch.Tensor | None = None,
        **kwargs,
    ):
        """`LlavaModel.forward` under VoCo-LLaMA.

        - `voco_cache` given: stage 2, text on top of the compressed images, plain causal attention.
        - otherwise: the full sequence under the VoCo mask (training, or full-mask inference). The VoCo
          positions come from `voco_bounds` (set by `generate()` from the full rows), else from
          `input_ids` (or `voco_token_mask` [B, L] when only `inputs_embeds` is given).
        attention_mask: 2-D [B, past + L] padding mask; positions are per sample (cumsum - 1). A 4-D mask is
            used as given, with the `position_ids` that must come with it: it must already apply the VoCo rule
            (`generate()` builds it so for a static cache, `prepare_inputs_for_generation`).
        """
        if voco_cache is not None:
            return self._forward_voco_cached(voco_cache, input_ids, pixel_values, attention_mask, position_ids,
                                             cache, inputs_embeds, **kwargs)
        if attention_mask is not None and attention_mask.dim() == 4:
            if position_ids is None:
                raise ValueError("VoCo with a 4-D attention_mask needs position_ids (the mask says nothing about padding "
                                 "positions); or pass the 2-D padding mask and let the VoCo mask be built")
            return self._stock_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=reference.device)
        if voco_bounds is None and isinstance(cache, VoCoDynamicCache):
            # Continuing on a VoCo cache: nothing before the VoCo group is cached, so plain causal is exact.
            if position_ids is None:
                position_ids = positions_from_padding(attention_mask, length)
            return self._stock_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)
        if voco_bounds is None:
            if past_length > 0:
                raise ValueError(
                    "VoCo full-mask decoding with a KV cache needs voco_bounds computed on the full rows "
                    "(model.model._voco_layout(full_input_ids == config.voco_token_id, full_input_ids)); "
                    "generate() passes them itself"
                )
            if voco_token_mask is None:
                if input_ids is None:
                    raise ValueError("VoCo with inputs_embeds needs voco_token_mask ([batch, length] bool, True at <voco>)")
                voco_token_mask = input_ids == self._voco_token_id()
            voco_bounds = self._voco_layout(voco_token_mask, input_ids)
        if position_ids is None:
            position_ids = voco_bounds.positions(attention_mask)[:, -length:]
        shape_only = torch.empty((batch, length, 0), dtype=self.get_input_embeddings().weight.dtype, device=reference.device)
        mask = build_voco_attention_mask(self.language_model.config, shape_only, attention_mask, voco_bounds,
                                         cache, position_ids)
        return self._stock_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask,
                                   position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, **kwargs)

    def _forward_voco_cached(self, voco_cache: VoCoCache, input_ids, pixel_values, attention_mask, position_ids,
                             cache, inputs_embeds, **kwargs):
        """Stage 2: the text [B, T] attends to a fresh copy of the cached VoCo K/V (the stored cache never changes)."""
        if pixel_values is not None or (cache is not None and cache.get_seq_length() > 0):
            raise ValueError("voco_cache replaces the image and any KV cache: pass neither pixel_values nor a "
                             "non-empty cache with it")
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        cache = voco_cache.expand_to(batch)
        expected = kv_layout(self.language_model.config)
        found = (cache.num_layers, cache.keys.shape[2], cache.keys.shape[4])
        if found != expected:
            raise ValueError(f"voco_cache has (layers, kv_heads, head_dim) = {found}, this model {expected}")
        device = reference.device
        text_mask = attention_mask if attention_mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        if text_mask.shape[1] != length:
            raise ValueError(f"with voco_cache, attention_mask covers the text only: expected {length} columns, "
                             f"got {text_mask.shape[1]}")
        full_mask = torch.cat([torch.ones(batch, cache.num_voco_tokens, dtype=text_mask.dtype, device=device), text_mask], 1)
        if position_ids is None:
            position_ids = cache.next_position.to(device)[:, None] + positions_from_padding(text_mask, length)
        past = cache.to_dynamic_cache(self._voco_layer_devices(), dtype=self.get_input_embeddings().weight.dtype)
        return self._stock_forward(input_ids=input_ids, attention_mask=full_mask, position_ids=position_ids,
                                   cache=past, inputs_embeds=inputs_embeds, **kwargs)


class SlimGenerationMixin(StockInitMixin):
    """Loading, saving, reconfiguring and VoCo inference shared by every Slim*ForConditionalGeneration."""

    # The family's Slim base model class (set by each family).
    base_model_class = None

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # the stock __init__ would build the stock base model
        self.model = self.base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus `compression=` and full-precision vision modules under bitsandbytes.

        `compression` is forwarded to the config (validated there). With a bitsandbytes
        `quantization_config` whose `llm_int8_skip_modules` is unset, the vision tower, projector and lm_head
        stay unquantised (`DEFAULT_QUANTIZATION_SKIP_MODULES`); set the list yourself to choose otherwise.
        """
        apply_default_quantization_skips(kwargs)
        return freeze_after_loading(super().from_pretrained(*args, **kwargs))

    def set_compression(self, compression: dict | None):
        """Switch compression on a loaded model (validated against this model's shapes); returns self."""
        self.config.compression = compression
        self.model.freeze_unused_parameters()
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config, the remote code with an `auto_map` that also covers AutoModel,
        and a model card (README.md) unless the folder has one."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self.model).__module__.split('.')[-1]}.{type(self.model).__name__}")
        self.config.auto_map = auto_map
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        write_card_unless_present(self, save_directory)
        return saved

    # Code, weights, processor and card in one commit (transformers' own would replace the card).
    push_to_hub = push_to_hub_with_card


    @property
    def sparsevlm_report(self):
        """What the last SparseVLM prefill kept (`sparsevlm.SparseVLMReport`: per-sample per-layer visual counts,
        `equal_tokens`, `processed_mean`, raters, prune steps, KV lengths); None before the first one."""
        return getattr(self.model, "sparsevlm_report", None)

    # ---- VoCo-LLaMA: two-stage inference (specs/voco.md §5, §6) ----

    def voco_cache_metadata(self) -> dict[str, str]:
        """What a `VoCoCache` from this model records, and what a loaded cache is checked against."""
        voco_id = self.model._voco_token_id()
        row = self.get_input_embeddings().weight[voco_id]
        k_proj = self.model.language_model.layers[0].self_attn.k_proj.weight
        # Hashing k_proj costs ~50 ms on 7B: reuse it while neither tensor has changed (in-place updates bump _version).
        key = (row.data_ptr(), row._version, k_proj.data_ptr(), k_proj._version)
        if getattr(self, "_voco_fingerprint", (None, None))[0] != key:
            self._voco_fingerprint = (key, weights_fingerprint(row, k_proj))
        quantization = getattr(self.config, "quantization_config", None)
        quantization = quantization.to_dict() if hasattr(quantization, "to_dict") else (quantization or {})
        quant = "bnb-4bit" if quantization.get("load_in_4bit") else "bnb-8bit" if quantization.get("load_in_8bit") else "none"
        return cache_metadata(
            self.config.text_config, voco_id, self.config.compression.get("num_voco_tokens", 1),
            self._voco_fingerprint[1], self.get_input_embeddings().weight.dtype, quant,
            getattr(self.config, "_name_or_path", ""), getattr(self.config, "_commit_hash", None) or "",
        )

    def voco_compress(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_mode: str = "compact",
        enable_grad: bool = False,
        **kwargs,
    ) -> VoCoCache:
        """Stage 1: run each row's prefix up to its VoCo group once and keep only the VoCo tokens' K/V.

        input_ids: [B, L] processor output with one image and K `<voco>` per row (any padding side; text
            after the VoCo group is ignored). pixel_values: [B, 3, H, W].
        position_mode: "compact" (default) re-rotates the keys to positions 0..K-1 so stock `generate()`
            can continue from them; "original" keeps the positions they had in the full sequence.
        enable_grad: keep the autograd graph (training through the cache: stage 2 on top of it is the
            full masked forward, spec §5, at a fraction of the cost when an image has several questions).
        Returns a `VoCoCache` with keys/values [B, layers, kv_heads, K, head_dim].
        """
        with torch.set_grad_enabled(enable_grad):
            return self._voco_compress(input_ids, pixel_values, attention_mask, position_mode, **kwargs)

    def _voco_compress(self, input_ids, pixel_values, attention_mask, position_mode, **kwargs) -> VoCoCache:
        if self.config.compression["method"] != "voco":
            raise ValueError(f"voco_compress needs compression method 'voco', the model has {self.config.compression}")
        if position_mode not in ("compact", "original"):
            raise ValueError(f"position_mode must be 'compact' or 'original', got {position_mode!r}")
        num_voco = self.config.compression["num_voco_tokens"]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        layout = self.model._voco_layout(input_ids == self.model._voco_token_id(), input_ids)
        if isinstance(layout, VoCoSegments) and bool((layout.num_segments > 1).any()):
            cache = self._voco_compress_segments(input_ids, pixel_values, attention_mask, layout, **kwargs)
            return self._voco_finish(cache, position_mode)
        group = voco_group_indices(input_ids == self.model._voco_token_id(), num_voco)  # [B, K]
        stop = int(group[:, -1].max()) + 1
        input_ids, attention_mask = input_ids[:, :stop], attention_mask[:, :stop]
        positions = positions_from_padding(attention_mask, stop)
        forward_positions, positions, kwargs = self.model._voco_prefix_positions(input_ids, attention_mask, positions,
                                                                                 kwargs)
        past = DynamicCache(config=self.config.text_config)
        # On the prefix the VoCo rule equals causal attention: any backend works here, FlashAttention included.
        self.model._stock_forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                  position_ids=forward_positions, cache=past, use_cache=True, **kwargs)
        keys, values = gather_voco_kv(past, group)
        metadata = self.voco_cache_metadata()
        if pixel_values is not None and pixel_values.shape[0] == keys.shape[0]:
            metadata["image_sha256"] = json.dumps([tensor_sha256(image) for image in pixel_values])
        return self._voco_finish(VoCoCache(keys, values, torch.gather(positions, 1, group), metadata=metadata), position_mode)

    def _voco_finish(self, cache: VoCoCache, position_mode: str) -> VoCoCache:
        """Compact mode: one uniform re-rotation puts the (contiguous) VoCo positions at 0 .. K - 1."""
        if position_mode == "compact":
            language_model = self.model.language_model
            cache = cache.relocate(language_model.rotary_emb, rotate_half_of(language_model), 0,
                                   rope_settings(self.config.text_config)[1])
        return cache

    def _voco_compress_segments(self, input_ids, pixel_values, attention_mask, layout: VoCoSegments,
                                pixel_values_videos=None, **kwargs) -> VoCoCache:
        """Stage 1 for videos (specs/voco.md §7): every frame of every sample is one row [prefix, frame_t, VoCo_t]
        at its shifted-segment positions, all rows in one batched causal forward; each sample's VoCo K/V are
        concatenated in frame order (T·K tokens at contiguous positions)."""
        frames = layout.num_segments
        if not bool((frames == frames[0]).all()):
            raise ValueError(f"voco_compress needs the same number of VoCo groups (frames) in every row of a batch; "
                             f"got {frames.tolist()}: compress videos of different lengths (or images) separately")
        num_frames, count = int(frames[0]), self.config.compression["num_voco_tokens"]
        embeds, _, _ = self.model._merged_embeddings(input_ids, pixel_values, None, kwargs.pop("vision_feature_layer", None),
                                                      None, None, None, pixel_values_videos)
        positions = layout.positions(attention_mask)
        rows = [(b, index) for b, sample in enumerate(segment_rows(layout, attention_mask)) for index in sample]
        width = max(index.numel() for _, index in rows)
        row_embeds = embeds.new_zeros(len(rows), width, embeds.shape[-1])
        row_mask = torch.zeros(len(rows), width, dtype=attention_mask.dtype, device=attention_mask.device)
        row_positions = torch.zeros(len(rows), width, dtype=torch.long, device=positions.device)
        for r, (b, index) in enumerate(rows):  # left padding: each row ends with its VoCo group
            row_embeds[r, width - index.numel():] = embeds[b, index]
            row_mask[r, width - index.numel():] = 1
            row_positions[r, width - index.numel():] = positions[b, index]
        past = DynamicCache(config=self.config.text_config)
        call_with_cache(self.model.language_model.forward, inputs_embeds=row_embeds, attention_mask=row_mask,
                        position_ids=row_positions, cache=past, use_cache=True, **kwargs)
        group = torch.arange(width - count, width, device=row_mask.device).expand(len(rows), -1)
        keys, values = gather_voco_kv(past, group)  # [B·T, layers, kv_heads, K, head_dim]

        def per_sample(tensor):  # -> [B, layers, kv_heads, T·K, head_dim], frames in order
            batch = tensor.shape[0] // num_frames
            tensor = tensor.reshape(batch, num_frames, *tensor.shape[1:]).permute(0, 2, 3, 1, 4, 5)
            return tensor.reshape(batch, tensor.shape[1], tensor.shape[2], num_frames * count, tensor.shape[-1])

        voco_positions = torch.gather(row_positions, 1, group).reshape(-1, num_frames * count)
        metadata = dict(self.voco_cache_metadata(), num_frames=str(num_frames))
        return VoCoCache(per_sample(keys), per_sample(values), voco_positions, metadata=metadata)

    def generate(self, *args, voco_cache: VoCoCache | None = None, **kwargs):
        """`GenerationMixin.generate`; with `voco_cache`, answer the text prompts from compressed images.

        `input_ids`/`attention_mask` then hold only the text after the VoCo group ([B, T], left padding);
        the returned sequences are those ids followed by the new tokens. The cache is copied, never changed.
        """
        if voco_cache is None:
            return super().generate(*args, **kwargs)
        return self._voco_generate(voco_cache, *args, **kwargs)

    def _voco_generate(self, voco_cache: VoCoCache, input_ids=None, attention_mask=None, **kwargs):
        if kwargs.get("pixel_values") is not None or pop_cache(kwargs) is not None:
            raise ValueError("voco_cache replaces the image: pass neither pixel_values nor a KV cache with it")
        if input_ids is None:
            raise ValueError("generate(voco_cache=...) needs input_ids with the text after the VoCo group")
        batch, length = input_ids.shape
        cache = voco_cache.expand_to(batch)
        count, device = cache.num_voco_tokens, input_ids.device
        text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        # Layout [<voco> x K][pads][text]: the K ids count as cached and are never embedded; explicit
        # positions serve both position modes (compact: the cumsum positions K.., original: next_position..).
        voco_ids = torch.full((batch, count), self.model._voco_token_id(), dtype=input_ids.dtype, device=device)
        positions = torch.cat([cache.positions.to(device),
                               cache.next_position.to(device)[:, None] + positions_from_padding(text_mask, length)], 1)
        past = cache.to_dynamic_cache(self.model._voco_layer_devices(), dtype=self.get_input_embeddings().weight.dtype)
        output = generate_with_cache(
            super().generate,
            past,
            input_ids=torch.cat([voco_ids, input_ids], 1),
            attention_mask=torch.cat([torch.ones_like(voco_ids), text_mask], 1),
            position_ids=positions,
            **kwargs,
        )
        if isinstance(output, torch.Tensor):
            return output[:, count:]
        output.sequences = output.sequences[:, count:]
        return output

    @with_cache_argument
    def prepare_inputs_for_generation(self, input_ids, *args, cache=None, attention_mask=None,
                                      inputs_embeds=None, relevance_input_ids=None, relevance_attention_mask=None,
                                      relevance_video_input_ids=None, relevance_video_attention_mask=None, **kwargs):
        """Stock inputs; under VoCo full-mask decoding also the VoCo bounds of the *full* rows, so the
        VoCo positions never drift between steps (the official decode bugs, spec §11).

        `inputs_embeds` is named in the signature: `generate()` inspects it to allow `inputs_embeds`. The
        cache goes to the stock method under the keyword it declares (no deprecation warning per step).

        CDPruner's relevance inputs are named so that `generate()` accepts them; its pre-encoding of the images
        consumes them, and otherwise they go with the pixels of the first step."""
        model_inputs = call_with_cache(
            super().prepare_inputs_for_generation, input_ids, *args, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, **kwargs)
        relevance = dict(zip(RELEVANCE_KEYS + VIDEO_RELEVANCE_KEYS, (relevance_input_ids, relevance_attention_mask,
                                                                     relevance_video_input_ids, relevance_video_attention_mask)))
        for pixels, keys in (("pixel_values", RELEVANCE_KEYS), ("pixel_values_videos", VIDEO_RELEVANCE_KEYS)):
            if model_inputs.get(pixels) is not None:
                model_inputs.update({key: relevance[key] for key in keys if relevance[key] is not None})
        if (
            self.config.compression["method"] == "voco"
            and not isinstance(generation_cache(model_inputs), VoCoDynamicCache)
            and input_ids is not None
            and input_ids.shape[1] > 0
            and getattr(self.config, "voco_token_id", None) is not None
        ):
            layout = self.model._voco_layout(input_ids == self.config.voco_token_id, input_ids)
            model_inputs["voco_bounds"] = layout
            full_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            step = model_inputs.get("input_ids")
            step_length = step.shape[1] if step is not None else model_inputs["inputs_embeds"].shape[1]
            if isinstance(layout, VoCoSegments):
                # Shifted-segment positions are not the cumsum positions generate() would use (specs/voco.md §7),
                # also for an unpadded batch, for which generate() passes no attention_mask.
                model_inputs["position_ids"] = layout.positions(full_mask)[:, -step_length:]
            step_mask = model_inputs.get("attention_mask")
            if isinstance(step_mask, torch.Tensor) and step_mask.dim() == 4:
                # A compileable (static) cache: generate() built the plain causal 4-D mask here, outside the compiled
                # forward. Build the VoCo mask instead, here as well (the forward uses a 4-D mask as given).
                if model_inputs.get("position_ids") is None:
                    model_inputs["position_ids"] = layout.positions(full_mask)[:, -step_length:]
                shape_only = torch.empty((full_mask.shape[0], step_length, 0), dtype=self.dtype, device=full_mask.device)
                model_inputs["attention_mask"] = build_voco_attention_mask(
                    self.model.language_model.config, shape_only, full_mask, layout, generation_cache(model_inputs),
                    model_inputs["position_ids"])
        return model_inputs
