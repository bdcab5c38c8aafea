"""LLaVA-1.5 with visual-token compression built in.

`SlimLlavaForConditionalGeneration` is `LlavaForConditionalGeneration` with one extra config field,
`compression`. Shipped with checkpoints: imports only torch, transformers and flat siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from .configuration_slimvlm import LEGACY_LLAVA_RENAMES, SlimLlavaConfig, image_token_count, normalize_compression, vision_tokens_per_view
from .visionzip import encode_with_visionzip, resolve_feature_layer


# Modules bitsandbytes must leave in full precision by default: VisionZip scores come from the vision
# tower, and the projector and lm_head are small. Any list replaces transformers' defaults, so lm_head
# is listed too. Users who set `llm_int8_skip_modules` themselves keep their own list.
DEFAULT_QUANTIZATION_SKIP_MODULES = [
    "model.vision_tower",
    "model.image_tower",
    "model.video_tower",
    "model.vision_tower_aux",
    "model.patch_mining",
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


@dataclass
class SlimImageFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features` output. `pooler_output` is a list of [K, D] projected features, one per image.

    dominant_indices: [num_images, d] VisionZip's kept token indices (official order: CLS, then by score);
        None when VisionZip is off.
    """

    dominant_indices: torch.Tensor | None = None


class SlimModelMixin:
    """Behaviour every Slim base model shares: compression access and a placeholder check that explains itself."""

    @property
    def compression(self) -> dict:
        return self.config.compression

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        try:
            return super().get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
        except ValueError as error:
            raise ValueError(
                f"{error}. The model's compression is {self.config.compression}; build the processor with the "
                "same compression (e.g. SlimLlavaProcessor.from_pretrained(path, compression=model.config.compression)) "
                "so it writes as many image placeholders as the model produces."
            ) from None


class SlimLlavaModel(SlimModelMixin, LlavaModel):
    """`LlavaModel` whose `get_image_features` applies VisionZip (so `generate()`'s pre-encoding does too)."""

    config: SlimLlavaConfig
    config_class = SlimLlavaConfig

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> SlimImageFeaturesOutput | BaseModelOutputWithPooling:
        """Projected image features, compressed when `config.compression` says so.

        Returns `pooler_output`: a list with one [K, D] tensor per image, K = `image_token_count(...)`.
        """
        compression = self.config.compression
        if compression["method"] != "visionzip":
            return super().get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                **kwargs,
            )
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        feature_layer = resolve_feature_layer(layer, len(self.vision_tower.encoder.layers))
        # CLS is always kept under VisionZip, so vision_feature_select_strategy does not apply.
        selection = encode_with_visionzip(
            self.vision_tower, pixel_values, feature_layer, compression["dominant"], compression["contextual"]
        )
        features = self.multi_modal_projector(selection.tokens)
        return SlimImageFeaturesOutput(
            last_hidden_state=selection.tokens,
            pooler_output=list(features),
            dominant_indices=selection.dominant_indices,
        )

    def forward(self, *args, **kwargs):
        """`LlavaModel.forward`; SparseVLM and VoCo change what happens inside the language model."""
        method = self.config.compression["method"]
        if method == "sparsevlm":
            return self._forward_sparsevlm(*args, **kwargs)
        if method == "voco":
            return self._forward_voco(*args, **kwargs)
        return super().forward(*args, **kwargs)

    def _forward_sparsevlm(self, *args, **kwargs):
        raise NotImplementedError("SparseVLM inside the language model is not implemented yet")

    def _forward_voco(self, *args, **kwargs):
        raise NotImplementedError("VoCo-LLaMA masking is not implemented yet")


class SlimGenerationMixin:
    """Loading, saving and reconfiguring shared by every Slim*ForConditionalGeneration."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus `compression=` and full-precision vision modules under bitsandbytes.

        `compression` is forwarded to the config (validated there). With a bitsandbytes
        `quantization_config` whose `llm_int8_skip_modules` is unset, the vision tower, projector and lm_head
        stay unquantised (`DEFAULT_QUANTIZATION_SKIP_MODULES`); set the list yourself to choose otherwise.
        """
        apply_default_quantization_skips(kwargs)
        return super().from_pretrained(*args, **kwargs)

    def set_compression(self, compression: dict | None):
        """Switch compression on a loaded model (validated against this model's shapes); returns self."""
        self.config.compression = compression
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights (safetensors), config, and the remote code with an `auto_map` that also covers AutoModel."""
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self.model).__module__.split('.')[-1]}.{type(self.model).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)


class SlimLlavaForConditionalGeneration(SlimGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with `config.compression` ({"method": "none" | "visionzip" | "sparsevlm" | "voco", ...}).

    Loads stock llava-hf checkpoints (current and legacy weight layouts); `{"method": "none"}` is the stock model.
    """

    config: SlimLlavaConfig
    config_class = SlimLlavaConfig

    def __init__(self, config: SlimLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = SlimLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def image_token_count(self) -> int:
        """Visual tokens per image that reach the language model under the current compression."""
        tokens = vision_tokens_per_view(self.config.vision_config)
        uncompressed = tokens - (1 if self.config.vision_feature_select_strategy == "default" else 0)
        return image_token_count(self.config.compression, uncompressed)


register_legacy_weight_names("SlimLlavaForConditionalGeneration", "SlimLlavaModel", LEGACY_LLAVA_RENAMES)

SlimLlavaConfig.register_for_auto_class()
SlimLlavaModel.register_for_auto_class("AutoModel")
SlimLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["SlimLlavaModel", "SlimLlavaForConditionalGeneration", "DEFAULT_QUANTIZATION_SKIP_MODULES", "normalize_compression"]
