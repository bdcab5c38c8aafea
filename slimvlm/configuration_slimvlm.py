"""Compression config schema and the Slim<Family>Config classes.

Shipped with checkpoints: imports only torch/transformers and flat siblings.

`config.compression` is a plain dict (so it is plain JSON in config.json). It is normalised and
validated whenever it is assigned, including by `from_pretrained(..., compression=...)`, which sets it
after the config is built. Invalid values raise `ValueError`/`TypeError` naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import AutoConfig, LlavaConfig, LlavaNextConfig, PreTrainedConfig, VideoLlavaConfig
from transformers.configuration_utils import SubConfigSpec

from .compat import TESTED_RANGE  # noqa: F401  (importing compat warns once outside the tested range)


METHODS = ("none", "visionzip", "sparsevlm", "voco", "cdpruner", "divprune")
# Select K of a view's projected tokens before the LLM (specs/cdpruner.md).
PRUNER_METHODS = ("cdpruner", "divprune")
PRUNER_SCOPES = ("view", "image")
CDPRUNER_RELEVANCE = ("clip", "llm_embeddings")
# DivPrune's official ratio (SUBSET_RATIO): 56 of LLaVA-1.5's 576 tokens.
DIVPRUNE_RATIO = 0.098

# SparseVLM budget tables (specs/sparsevlm.md §4): preset -> budgets at the prune steps.
SPARSEVLM_LAYERS = (2, 6, 15)
SPARSEVLM_BUDGETS = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
SPARSEVLM_VERSIONS = tuple(SPARSEVLM_BUDGETS)
SPARSEVLM_PRIORITY_HEADS = 14
# The tables are for LLaVA-1.5's 576 visual tokens; other counts scale them (specs/sparsevlm.md §9).
SPARSEVLM_REFERENCE_TOKENS = 576

# Mapping of the LLaVA-1.5 weight names used by most published checkpoints to the in-memory layout.
LEGACY_LLAVA_RENAMES = {
    r"^language_model.lm_head": "lm_head",
    r"^language_model.model": "model.language_model",
    r"^vision_tower": "model.vision_tower",
    r"^multi_modal_projector": "model.multi_modal_projector",
}
# LLaVA-NeXT's legacy layout (llava-hf/llava-v1.6-mistral-7b-hf, -vicuna-7b-hf) adds the top-level newline row.
LEGACY_LLAVA_NEXT_RENAMES = {**LEGACY_LLAVA_RENAMES, r"^image_newline": "model.image_newline"}
# Video-LLaVA's legacy layout (LanguageBind/Video-LLaVA-7B-hf) has two towers at the top level instead of one.
LEGACY_VIDEO_LLAVA_RENAMES = {
    **{source: target for source, target in LEGACY_LLAVA_RENAMES.items() if "vision_tower" not in source},
    r"^image_tower": "model.image_tower",
    r"^video_tower": "model.video_tower",
}
# VisionZip per video frame (specs/visionzip.md §7.3): 14 + 3 = 17 tokens, 136 for Video-LLaVA's 8 frames.
VISIONZIP_VIDEO_SPLIT = (14, 3)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CompressionTypeError(TypeError, ValueError):
    """A compression count that is not an integer: a TypeError, and a ValueError as specs/visionzip.md A1 asks."""


def _require_int(method: str, field: str, value: Any, minimum: int = 1) -> int:
    if not _is_int(value):
        raise CompressionTypeError(
            f"compression[{field!r}] for method {method!r} must be an integer >= {minimum}, "
            f"got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"compression[{field!r}] for method {method!r} must be >= {minimum}, got {value}")
    return value


def _check_keys(compression: dict, method: str, allowed: set[str]) -> None:
    unknown = sorted(set(compression) - allowed - {"method"})
    if unknown:
        raise ValueError(
            f"compression has unknown key(s) {unknown} for method {method!r}; allowed: {sorted(allowed)}"
        )


def split_visionzip_tokens(total: int) -> tuple[int, int]:
    """The paper's dominant/contextual split for a total of K tokens per view: d = floor(27K/32 + 1/2).

    Reproduces every official split: 64 -> 54/10, 128 -> 108/20, 192 -> 162/30, 32 -> 27/5, 17 -> 14/3.
    """
    dominant = math.floor(27 * total / 32 + 0.5)
    return dominant, total - dominant


def _visionzip_split(compression: dict, prefix: str, tokens_per_view: int | None) -> tuple[int, int]:
    """(dominant, contextual) from `{prefix}tokens` or `{prefix}dominant` + `{prefix}contextual`, validated."""
    tokens, dominant_key, contextual_key = f"{prefix}tokens", f"{prefix}dominant", f"{prefix}contextual"
    if tokens in compression:
        if dominant_key in compression or contextual_key in compression:
            raise ValueError(
                f"compression for method 'visionzip' takes either {tokens!r} or {dominant_key!r} + {contextual_key!r}, "
                f"not both; got {compression}"
            )
        dominant, contextual = split_visionzip_tokens(_require_int("visionzip", tokens, compression[tokens], minimum=2))
    else:
        missing = [key for key in (dominant_key, contextual_key) if key not in compression]
        if missing:
            raise ValueError(
                f"compression for method 'visionzip' is missing {missing}; give {dominant_key!r} and {contextual_key!r} "
                f"(e.g. 54 and 10) or {tokens!r} (e.g. 64); got {compression}"
            )
        dominant, contextual = compression[dominant_key], compression[contextual_key]
    dominant = _require_int("visionzip", dominant_key, dominant, minimum=1)
    contextual = _require_int("visionzip", contextual_key, contextual, minimum=1)
    if tokens_per_view is not None and dominant + contextual > tokens_per_view:
        raise ValueError(
            f"compression {dominant_key} + {contextual_key} = {dominant} + {contextual} = {dominant + contextual} "
            f"exceeds the {tokens_per_view} tokens (CLS + patches, or patches alone without CLS) a view of this vision tower has"
        )
    return dominant, contextual


VIDEO_VISIONZIP_KEYS = {"video_dominant", "video_contextual", "video_tokens"}


def _normalize_visionzip(compression: dict, tokens_per_view: int | None, vision_feature_layer=None,
                         video: bool | tuple[int, int] = False) -> dict:
    """Image counts `dominant`/`contextual` (or `tokens`); on video-capable configs also the per-frame
    `video_dominant`/`video_contextual` (or `video_tokens`), default 14/3 (specs/visionzip.md §7.3) or the
    family's default split when `video` is a (dominant, contextual) pair (LLaVA-OneVision: 54/10)."""
    allowed = {"dominant", "contextual", "tokens"} | (VIDEO_VISIONZIP_KEYS if video else set())
    video_keys = sorted(VIDEO_VISIONZIP_KEYS & set(compression))
    if video_keys and not video:
        raise ValueError(
            f"compression keys {video_keys} set per-frame VisionZip counts, which only video-capable models "
            f"(Video-LLaVA) have; allowed for this model: {sorted(allowed)}"
        )
    _check_keys(compression, "visionzip", allowed)
    if isinstance(vision_feature_layer, (list, tuple)) and len(vision_feature_layer) != 1:
        raise ValueError(
            f"compression method 'visionzip' needs a single vision_feature_layer (an int, or a one-element list), "
            f"got vision_feature_layer={list(vision_feature_layer)}: VisionZip scores with the CLS attention of one "
            "layer, and multi-layer feature concatenation has no single CLS row; set e.g. vision_feature_layer=-2"
        )
    dominant, contextual = _visionzip_split(compression, "", tokens_per_view)
    out = {"method": "visionzip", "dominant": dominant, "contextual": contextual}
    if video:
        default = tuple(video) if isinstance(video, tuple) else VISIONZIP_VIDEO_SPLIT
        split = _visionzip_split(compression, "video_", tokens_per_view) if video_keys else default
        if tokens_per_view is not None and sum(split) > tokens_per_view:
            raise ValueError(
                f"the default per-frame VisionZip split {split[0]} + {split[1]} exceeds the {tokens_per_view} tokens a "
                "view of this vision tower has; give 'video_tokens' (or 'video_dominant' + 'video_contextual')"
            )
        out["video_dominant"], out["video_contextual"] = split
    return out


def sparsevlm_setting(num_text_layers: int, preset: int, version: str = "1.5") -> dict:
    """A SparseVLM `retained_tokens` preset for a language model of `num_text_layers` layers.

    The presets are defined for 32-layer models (prune layers 2, 6, 15): there the preset itself is returned;
    on other depths, the same schedule with its prune layers scaled to the depth (strictly increasing, below
    the depth) and the preset's budgets given explicitly.
    """
    if num_text_layers == 32:
        return {"method": "sparsevlm", "version": version, "retained_tokens": preset}
    layers: list[int] = []
    for layer in SPARSEVLM_LAYERS:
        scaled = min(max(1, round(layer * num_text_layers / 32)), num_text_layers - 1)
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    layers = [layer for layer in layers if layer < num_text_layers]
    budgets = list(SPARSEVLM_BUDGETS[version][preset][: len(layers)])
    return {"method": "sparsevlm", "version": version, "layers": layers, "budgets": budgets}


def _normalize_sparsevlm(compression: dict, num_layers: int | None) -> dict:
    allowed = {"version", "retained_tokens", "layers", "budgets", "budget_fractions", "num_priority_heads", "seed"}
    _check_keys(compression, "sparsevlm", allowed)
    version = str(compression.get("version", "1.5"))
    if version not in SPARSEVLM_VERSIONS:
        raise ValueError(f"compression['version'] for 'sparsevlm' must be one of {SPARSEVLM_VERSIONS}, got {version!r}")
    out: dict[str, Any] = {"method": "sparsevlm", "version": version}
    layers = compression.get("layers")
    budgets = compression.get("budgets")
    fractions = compression.get("budget_fractions")
    preset = compression.get("retained_tokens")
    given = [name for name, value in (("retained_tokens", preset), ("budgets", budgets), ("budget_fractions", fractions)) if value is not None]
    if len(given) != 1:
        raise ValueError(
            "compression for 'sparsevlm' needs exactly one of 'retained_tokens' (a preset: "
            f"{sorted(SPARSEVLM_BUDGETS[version])}), 'budgets' or 'budget_fractions'; got {given or 'none'}"
        )
    if preset is not None:
        preset = _require_int("sparsevlm", "retained_tokens", preset)
        if preset not in SPARSEVLM_BUDGETS[version]:
            raise ValueError(
                f"compression['retained_tokens'] = {preset} is not a SparseVLM v{version} preset; "
                f"allowed: {sorted(SPARSEVLM_BUDGETS[version])} (or give explicit 'layers' + 'budgets')"
            )
        out["retained_tokens"] = preset
    # A preset on another depth: say so, and show an explicit schedule that fits (instead of blaming
    # `layers` the user never gave).
    # (A normalised preset carries the default layers: re-validating it against the model must say the same.)
    default_layers = layers is None or list(layers) == list(SPARSEVLM_LAYERS)
    preset_elsewhere = preset is not None and default_layers and num_layers not in (None, 32)
    if preset_elsewhere:
        fitting = sparsevlm_setting(num_layers, preset, version)
        fitting_hint = (
            f"SparseVLM presets are defined for 32-layer language models (prune layers {list(SPARSEVLM_LAYERS)}); "
            f"give explicit 'layers' and 'budgets' that fit this {num_layers}-layer model instead, e.g. "
            f"{{\"method\": \"sparsevlm\", \"version\": \"{version}\", \"layers\": {fitting['layers']}, "
            f"\"budgets\": {fitting['budgets']}}}"
        )
        if SPARSEVLM_LAYERS[-1] >= num_layers:
            raise ValueError(f"compression['retained_tokens'] = {preset} cannot be used as is: {fitting_hint}")
    layers = SPARSEVLM_LAYERS if layers is None else layers
    if not isinstance(layers, (list, tuple)) or not layers or not all(_is_int(x) for x in layers):
        raise TypeError(f"compression['layers'] for 'sparsevlm' must be a non-empty list of integers, got {layers!r}")
    if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"compression['layers'] for 'sparsevlm' must be >= 0 and strictly increasing, got {list(layers)}")
    if num_layers is not None and layers[-1] >= num_layers:
        raise ValueError(
            f"compression['layers'] = {list(layers)} has a prune layer beyond the language model's depth "
            f"({num_layers} layers: allowed 0..{num_layers - 1})"
        )
    out["layers"] = list(layers)
    steps = len(layers)
    if preset is not None and num_layers is not None and preset * num_layers < layers[0] * SPARSEVLM_REFERENCE_TOKENS:
        # Layers before the first prune keep all V tokens, so ET >= layers[0]·V/N_L (specs/sparsevlm.md §9).
        raise ValueError(
            f"compression['retained_tokens'] = {preset} is infeasible with prune layers {list(layers)} on a "
            f"{num_layers}-layer language model: the {layers[0]} layer(s) before the first prune keep all "
            f"{SPARSEVLM_REFERENCE_TOKENS} tokens, "
            f"so the equal-token count is at least {layers[0] * SPARSEVLM_REFERENCE_TOKENS / num_layers:g}; "
            + (fitting_hint if preset_elsewhere else "prune earlier or choose a larger preset")
        )
    if preset is not None and steps != len(SPARSEVLM_BUDGETS[version][preset]):
        raise ValueError(
            f"compression['layers'] has {steps} prune layers but preset {preset} has "
            f"{len(SPARSEVLM_BUDGETS[version][preset])} budgets; give explicit 'budgets' for other schedules"
        )
    # Explicit `budgets` are read like a preset row: budgets at V = 576, scaled for other visual counts
    # (sparsevlm.scaled_budgets); `budget_fractions` are fractions of each sample's V.
    if budgets is not None:
        if not isinstance(budgets, (list, tuple)) or not all(_is_int(b) for b in budgets):
            raise TypeError(f"compression['budgets'] for 'sparsevlm' must be a list of integers, got {budgets!r}")
        if len(budgets) != steps:
            raise ValueError(f"compression['budgets'] has {len(budgets)} entries for {steps} prune layers {list(layers)}")
        if any(b <= 0 for b in budgets):
            raise ValueError(f"compression['budgets'] must all be > 0, got {list(budgets)}")
        if any(b2 > b1 for b1, b2 in zip(budgets, budgets[1:])):
            raise ValueError(f"compression['budgets'] must not increase from one prune layer to the next, got {list(budgets)}")
        out["budgets"] = list(budgets)
    if fractions is not None:
        if not isinstance(fractions, (list, tuple)) or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in fractions):
            raise TypeError(f"compression['budget_fractions'] for 'sparsevlm' must be a list of numbers, got {fractions!r}")
        if len(fractions) != steps:
            raise ValueError(f"compression['budget_fractions'] has {len(fractions)} entries for {steps} prune layers")
        if any(not 0 < f <= 1 for f in fractions):
            raise ValueError(f"compression['budget_fractions'] must lie in (0, 1], got {list(fractions)}")
        if any(f2 > f1 for f1, f2 in zip(fractions, fractions[1:])):
            raise ValueError(f"compression['budget_fractions'] must not increase, got {list(fractions)}")
        out["budget_fractions"] = [float(f) for f in fractions]
    heads = compression.get("num_priority_heads", SPARSEVLM_PRIORITY_HEADS)
    out["num_priority_heads"] = _require_int("sparsevlm", "num_priority_heads", heads)
    out["seed"] = _require_int("sparsevlm", "seed", compression.get("seed", 0), minimum=0)
    return out


def _normalize_pruner(compression: dict, tokens_per_view: int | None, vision_feature_layer, default_scope: str,
                      relevance_encoder: bool | None, view_has_cls: bool = True) -> dict:
    """CDPruner / DivPrune (specs/cdpruner.md §11): `tokens` (or DivPrune's `ratio`), `scope`; CDPruner also
    `theta` and `relevance` ("clip" needs the relevance encoder stored in the checkpoint)."""
    method = compression["method"]
    allowed = {"tokens", "scope"} | ({"theta", "relevance"} if method == "cdpruner" else {"ratio"})
    _check_keys(compression, method, allowed)
    out: dict[str, Any] = {"method": method}
    if method == "divprune" and ("tokens" in compression) == ("ratio" in compression):
        raise ValueError(f"compression for 'divprune' takes exactly one of 'tokens' (e.g. 64) or 'ratio' (e.g. "
                         f"{DIVPRUNE_RATIO}); got {compression}")
    if "ratio" in compression:
        ratio = compression["ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"compression['ratio'] for 'divprune' must be a number in (0, 1], got {ratio!r}")
        out["ratio"] = float(ratio)
    else:
        if "tokens" not in compression:
            raise ValueError(f"compression for {method!r} is missing 'tokens' (kept tokens per view, e.g. 64); got {compression}")
        tokens = _require_int(method, "tokens", compression["tokens"])
        candidates = None if tokens_per_view is None else tokens_per_view - (1 if view_has_cls else 0)
        if candidates is not None and tokens > candidates:
            raise ValueError(f"compression['tokens'] = {tokens} for {method!r} exceeds the {candidates} patch tokens "
                             "a view of this vision tower has")
        out["tokens"] = tokens
    scope = compression.get("scope", "view" if method == "cdpruner" else default_scope)
    if scope not in PRUNER_SCOPES:
        raise ValueError(f"compression['scope'] for {method!r} must be one of {list(PRUNER_SCOPES)}, got {scope!r}")
    out["scope"] = scope
    if method == "divprune":
        return out
    theta = compression.get("theta")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 <= theta < 1):
        raise ValueError(f"compression['theta'] for 'cdpruner' must be None or a number in [0, 1), got {theta!r}")
    out["theta"] = None if theta is None else float(theta)
    relevance = compression.get("relevance", "clip" if relevance_encoder else "llm_embeddings")
    # relevance_encoder None: not known here (a processor); "clip" is then checked where it is used.
    if relevance not in CDPRUNER_RELEVANCE:
        raise ValueError(f"compression['relevance'] for 'cdpruner' must be one of {list(CDPRUNER_RELEVANCE)}, got {relevance!r}")
    if relevance == "clip" and relevance_encoder is False:
        raise ValueError(
            "compression['relevance'] = 'clip' needs the CLIP relevance encoder inside the checkpoint, and this one has "
            "none; add it once with slimvlm.conversion.relevance.attach_relevance_encoder(model, clip_id, processor) (or "
            "`slimvlm convert --relevance-encoder ID`), or use relevance 'llm_embeddings'"
        )
    if relevance == "clip" and isinstance(vision_feature_layer, (list, tuple)) and len(vision_feature_layer) != 1:
        raise ValueError(f"compression['relevance'] = 'clip' needs a single vision_feature_layer, got "
                         f"vision_feature_layer={list(vision_feature_layer)}")
    out["relevance"] = relevance
    return out


def pruned_count(compression: dict, candidates: int) -> int:
    """Tokens CDPruner / DivPrune keep of `candidates`: `tokens`, or round(ratio·candidates) (Python's round)."""
    if "ratio" in compression:
        return max(1, round(compression["ratio"] * candidates))
    return compression["tokens"]


def _normalize_voco(compression: dict) -> dict:
    _check_keys(compression, "voco", {"num_voco_tokens"})
    count = _require_int("voco", "num_voco_tokens", compression.get("num_voco_tokens", 1))
    return {"method": "voco", "num_voco_tokens": count}


VISIONZIP_CONTEXTUAL_RATIO = 0.05  # the official Qwen2.5-VL split: retain r = (r - 0.05) dominant + 0.05 contextual
VISIONZIP_DEFAULT_RETAIN_RATIO = 0.5


def _ratio(field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CompressionTypeError(f"compression[{field!r}] for method 'visionzip' must be a number in (0, 1], "
                                   f"got {value!r} ({type(value).__name__})")
    if not 0 < value <= 1:
        raise ValueError(f"compression[{field!r}] for method 'visionzip' must lie in (0, 1], got {value}")
    return float(value)


def _normalize_visionzip_ratios(compression: dict) -> dict:
    """VisionZip counts as fractions of each image's merged tokens (variable-size families: Qwen2.5-VL, Qwen3-VL):
    `dominant_ratio` + `contextual_ratio`, or `retain_ratio` r = (r - 0.05, 0.05); default r = 0.5."""
    _check_keys(compression, "visionzip", {"dominant_ratio", "contextual_ratio", "retain_ratio"})
    if "retain_ratio" in compression:
        if "dominant_ratio" in compression or "contextual_ratio" in compression:
            raise ValueError("compression for method 'visionzip' takes either 'retain_ratio' or 'dominant_ratio' + "
                             f"'contextual_ratio', not both; got {compression}")
        retain = _ratio("retain_ratio", compression["retain_ratio"])
        if retain <= VISIONZIP_CONTEXTUAL_RATIO:
            raise ValueError(f"compression['retain_ratio'] must exceed the contextual share {VISIONZIP_CONTEXTUAL_RATIO}, "
                             f"got {retain}")
        # round() so that e.g. 0.7 gives exactly the official 0.65 (0.7 - 0.05 is 0.6499999999999999 in floats).
        dominant, contextual = round(retain - VISIONZIP_CONTEXTUAL_RATIO, 12), VISIONZIP_CONTEXTUAL_RATIO
    elif "dominant_ratio" in compression or "contextual_ratio" in compression:
        missing = [key for key in ("dominant_ratio", "contextual_ratio") if key not in compression]
        if missing:
            raise ValueError(f"compression for method 'visionzip' is missing {missing}; give 'dominant_ratio' and "
                             f"'contextual_ratio' (e.g. 0.45 and 0.05) or 'retain_ratio' (e.g. 0.5); got {compression}")
        dominant = _ratio("dominant_ratio", compression["dominant_ratio"])
        contextual = _ratio("contextual_ratio", compression["contextual_ratio"])
    else:
        dominant = round(VISIONZIP_DEFAULT_RETAIN_RATIO - VISIONZIP_CONTEXTUAL_RATIO, 12)
        contextual = VISIONZIP_CONTEXTUAL_RATIO
    if dominant + contextual > 1 + 1e-12:
        raise ValueError(f"compression dominant_ratio + contextual_ratio = {dominant} + {contextual} = "
                         f"{dominant + contextual} exceeds 1 (they are fractions of each image's tokens)")
    return {"method": "visionzip", "dominant_ratio": dominant, "contextual_ratio": contextual}


def normalize_compression(
    compression: dict | None,
    tokens_per_view: int | None = None,
    num_text_layers: int | None = None,
    vision_feature_layer: int | list[int] | None = None,
    video: bool | tuple[int, int] = False,
    default_scope: str = "view",
    relevance_encoder: bool | None = False,
    ratios: bool = False,
    view_has_cls: bool = True,
) -> dict:
    """Validate a compression dict and return its canonical form (a new dict).

    Args:
        compression: e.g. `{"method": "visionzip", "dominant": 54, "contextual": 10}`; `None` means no compression.
        tokens_per_view: CLS + patches of one vision-tower view, to bound VisionZip's `dominant + contextual`.
        num_text_layers: language-model depth, to bound SparseVLM's prune layers.
        vision_feature_layer: the config's feature layer(s); VisionZip needs exactly one.
        video: the model also takes videos (Video-LLaVA): VisionZip then has per-frame counts too; a
            (dominant, contextual) pair is the family's default per-frame split (LLaVA-OneVision: (54, 10)).
        default_scope: DivPrune's scope when not given ("image" on LLaVA-NeXT, the official global block).
        relevance_encoder: the checkpoint holds CDPruner's CLIP relevance encoder (then `relevance` defaults to "clip");
            None: unknown (processors), "clip" is then allowed but not the default.
        ratios: VisionZip counts are fractions of each image's tokens (Qwen-VL families; `_normalize_visionzip_ratios`).
        view_has_cls: False when `tokens_per_view` counts patches only (SigLIP): then every one is a CDPruner /
            DivPrune candidate (with CLS, `tokens` is bounded by the patches, tokens_per_view - 1).
    """
    if compression is None:
        return {"method": "none"}
    if not isinstance(compression, dict):
        raise TypeError(f"compression must be a dict such as {{'method': 'none'}}, got {type(compression).__name__}: {compression!r}")
    method = compression.get("method")
    if method not in METHODS:
        raise ValueError(f"compression['method'] must be one of {list(METHODS)}, got {method!r}")
    if method == "none":
        _check_keys(compression, "none", set())
        return {"method": "none"}
    if method == "visionzip" and ratios:
        return _normalize_visionzip_ratios(compression)
    if method == "visionzip":
        return _normalize_visionzip(compression, tokens_per_view, vision_feature_layer, video)
    if method == "sparsevlm":
        return _normalize_sparsevlm(compression, num_text_layers)
    if method in PRUNER_METHODS:
        return _normalize_pruner(compression, tokens_per_view, vision_feature_layer, default_scope, relevance_encoder,
                                 view_has_cls)
    return _normalize_voco(compression)


def vision_tokens_per_view(vision_config) -> int | None:
    """CLS + patches of one view of a ViT tower config (None when the config does not say)."""
    image_size = getattr(vision_config, "image_size", None)
    patch_size = getattr(vision_config, "patch_size", None)
    if not image_size or not patch_size:
        return None
    return (image_size // patch_size) ** 2 + 1


def image_token_count(compression: dict, uncompressed_count: int) -> int:
    """Visual tokens one view becomes in the language model under `compression`.

    Shared by the processor (placeholders it writes) and the model (features it scatters), so the two
    can never disagree. `uncompressed_count` is the stock count (e.g. 576 for LLaVA-1.5). SparseVLM prunes
    inside the LLM, so its placeholders stay at the full count; VoCo keeps the image tokens in the
    sequence (its `<voco>` tokens come after them).
    """
    if compression["method"] == "visionzip":
        return compression["dominant"] + compression["contextual"]
    if compression["method"] in PRUNER_METHODS:
        return pruned_count(compression, uncompressed_count)
    return uncompressed_count


class SlimCompressionMixin:
    """Validates `compression` on every assignment (constructor, from_pretrained kwargs, set_compression)."""

    # Whether the family takes videos (per-frame VisionZip counts are then part of the schema).
    takes_videos = False
    # DivPrune's default scope for the family (specs/cdpruner.md §11).
    pruner_default_scope = "view"

    # Whether VisionZip counts are ratios of each image's tokens (variable-size families).
    visionzip_ratios = False
    # Methods the family does not run (yet): setting one raises instead of silently running the stock model.
    unsupported_methods: tuple[str, ...] = ()

    def _compression_options(self) -> dict:
        return {"video": self.takes_videos, "default_scope": self.pruner_default_scope,
                "relevance_encoder": self.__dict__.get("relevance_encoder_config") is not None,
                "ratios": self.visionzip_ratios}

    def _check_compression(self, compression: dict) -> None:
        """Family rules on a normalised `compression` (before it is set): the methods it does not run yet."""
        if compression["method"] in self.unsupported_methods:
            supported = [method for method in METHODS if method not in self.unsupported_methods]
            raise ValueError(f"compression method {compression['method']!r} is not available for {type(self).__name__} "
                             f"yet; use one of {supported}")

    def _compression_bounds(self) -> tuple[int | None, int | None, Any]:
        vision_config = self.__dict__.get("vision_config")
        text_config = self.__dict__.get("text_config")
        tokens = vision_tokens_per_view(vision_config) if vision_config is not None and not isinstance(vision_config, dict) else None
        layers = getattr(text_config, "num_hidden_layers", None) if text_config is not None and not isinstance(text_config, dict) else None
        return tokens, layers, self.__dict__.get("vision_feature_layer")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # A stock config.json carries the stock model_type ("llava", "llava_next"); the class attribute must win
        # so that a saved checkpoint maps back to the Slim class through AutoConfig.
        self.__dict__.pop("model_type", None)
        # Re-validate now that the sub-configs exist (the bounds depend on them).
        self.compression = self.compression

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "compression":
            value = normalize_compression(value, *self._compression_bounds(), **self._compression_options())
            self._check_compression(value)
        elif name == "vision_feature_layer" and self.__dict__.get("compression") is not None:
            # A multi-layer feature list is refused under VisionZip whichever of the two is set last.
            normalize_compression(self.__dict__["compression"], *self._compression_bounds()[:2], value,
                                  **self._compression_options())
        super().__setattr__(name, value)


class SlimLlavaConfig(SlimCompressionMixin, LlavaConfig):
    """`LlavaConfig` plus `compression`; a stock LLaVA-1.5 config.json loads into it unchanged.

    Example:
        >>> config = SlimLlavaConfig.from_pretrained("llava-hf/llava-1.5-7b-hf",
        ...     compression={"method": "visionzip", "dominant": 54, "contextual": 10})
    """

    model_type = "slim_llava"
    # CDPruner's CLIP relevance encoder (specs/cdpruner.md §10): source CLIPTextConfig, widths, source id.
    relevance_encoder_config: dict | None = None
    compression: dict | None = None
    # Id of the `<voco>` token (VoCo-LLaMA); set by `slimvlm.voco.add_voco_token` or the conversion.
    voco_token_id: int | None = None


class SlimLlavaNextConfig(SlimCompressionMixin, LlavaNextConfig):
    """`LlavaNextConfig` plus `compression`; a stock LLaVA-NeXT config.json loads into it unchanged.

    VisionZip's counts are per view (the base view and every anyres crop): `{"method": "visionzip", "tokens": 64}`
    gives an image of a 2x2 grid (1 + 4) x 64 = 320 tokens (specs/visionzip.md §7.2).
    """

    model_type = "slim_llava_next"
    pruner_default_scope = "image"
    # CDPruner's CLIP relevance encoder (specs/cdpruner.md §10): source CLIPTextConfig, widths, source id.
    relevance_encoder_config: dict | None = None
    compression: dict | None = None
    voco_token_id: int | None = None


class SlimVideoLlavaConfig(SlimCompressionMixin, VideoLlavaConfig):
    """`VideoLlavaConfig` plus `compression`; a stock Video-LLaVA config.json loads into it unchanged.

    VisionZip has two splits: `dominant`/`contextual` (or `tokens`) per image on the image tower, and
    `video_dominant`/`video_contextual` (or `video_tokens`) per frame on the video tower, default 14/3: 8 frames
    become 136 tokens, the paper's setting (specs/visionzip.md §7.3).
    """

    model_type = "slim_video_llava"
    takes_videos = True
    # CDPruner's CLIP relevance encoder (specs/cdpruner.md §10): source CLIPTextConfig, widths, source id.
    relevance_encoder_config: dict | None = None
    compression: dict | None = None
    voco_token_id: int | None = None


def video_token_count(compression: dict, tokens_per_frame: int, num_frames: int) -> int:
    """Visual tokens one video of `num_frames` frames becomes in the language model (VoCo groups excluded).

    Shared by the processor (placeholders) and the model (features). `tokens_per_frame` is the stock count
    (Video-LLaVA keeps CLS: 257); VisionZip makes it `video_dominant + video_contextual` per frame.
    """
    if compression["method"] == "visionzip":
        return num_frames * (compression["video_dominant"] + compression["video_contextual"])
    if compression["method"] in PRUNER_METHODS:
        return views_pruned_count(compression, tokens_per_frame, num_frames)
    return num_frames * tokens_per_frame


def views_pruned_count(compression: dict, candidates_per_view: int, views: int) -> int:
    """CDPruner / DivPrune tokens of an image (or video) of a fixed number of views (Video-LLaVA frames, Mini-Gemini
    views): views·K with `tokens` under either scope (scope "image" spends the same budget over all views);
    with `ratio`, per view (scope "view") or of all views' candidates (scope "image")."""
    if "ratio" in compression and compression["scope"] == "image":
        return pruned_count(compression, views * candidates_per_view)
    return views * pruned_count(compression, candidates_per_view)


def anyres_visionzip_token_count(compression: dict, grid: tuple[int, int], candidates_per_view: int | None = None,
                                 stock_count: int | None = None) -> int:
    """Tokens of one LLaVA-NeXT image under a vision-side method.

    VisionZip's official layout: (1 + gh·gw) views of K = d + c tokens (specs/visionzip.md §7.2). CDPruner /
    DivPrune (specs/cdpruner.md §8): scope "view" keeps K of each view's `candidates_per_view` patches,
    (1 + gh·gw)·K; scope "image" selects K (or round(ratio·V)) of the image's stock packed block of
    `stock_count` = V tokens. Shared by the processor (placeholders) and the model (features).
    """
    views = 1 + grid[0] * grid[1]
    if compression["method"] in PRUNER_METHODS:
        if compression["scope"] == "image":
            return pruned_count(compression, stock_count)
        return views * pruned_count(compression, candidates_per_view)
    return views * (compression["dominant"] + compression["contextual"])


# The high-resolution ConvNeXt of every Mini-Gemini release: open_clip convnext_large_d_320 (timm convnext_large).
MINI_GEMINI_CONVNEXT = {"hidden_sizes": [192, 384, 768, 1536], "depths": [3, 3, 27, 3], "patch_size": 4,
                        "hidden_act": "gelu", "layer_scale_init_value": 1e-6, "drop_path_rate": 0.0}


class SlimMiniGeminiConfig(SlimCompressionMixin, LlavaConfig):
    """Mini-Gemini (MGM, MGM-HD; specs/mini_gemini.md §10): LLaVA-1.5 plus a high-resolution ConvNeXt tower.

    vision_config: the low-resolution CLIP tower (336 px, 24x24 patches per view).
    vision_config_aux: the high-resolution `ConvNextConfig`; its stage widths sum to the mined width C'.
    image_size_aux: side of the ConvNeXt input (768 for MGM, 1536 for MGM-HD).
    image_grid: CLIP views per side (1, or 2 for HD); image_global: HD adds a global CLIP view.
    An image becomes `views` x 576 tokens (views = image_grid² + image_global) in the order [global, crops
    row-major]; VisionZip counts are per view.
    """

    model_type = "slim_mini_gemini"
    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "vision_config_aux": SubConfigSpec(config_class=AutoConfig, model_type="convnext", init_kwargs=MINI_GEMINI_CONVNEXT),
    }

    vision_config_aux: dict | PreTrainedConfig | None = None
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    # CDPruner's CLIP relevance encoder (specs/cdpruner.md §10): source CLIPTextConfig, widths, source id.
    relevance_encoder_config: dict | None = None
    compression: dict | None = None
    voco_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for field, value in (("image_grid", self.image_grid), ("image_size_aux", self.image_size_aux)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"SlimMiniGeminiConfig.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.image_global, bool):
            raise TypeError(f"SlimMiniGeminiConfig.image_global must be True or False, got {self.image_global!r}")
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "SlimMiniGeminiConfig.vision_feature_select_strategy must be 'default' (patch mining needs the square "
                f"patch grid without CLS), got {self.vision_feature_select_strategy!r}"
            )

    @property
    def views_per_image(self) -> int:
        """CLIP views one image becomes: image_grid² crops, plus the global view under HD."""
        return self.image_grid**2 + int(self.image_global)


def mini_gemini_token_count(compression: dict, patches_per_view: int, views: int) -> int:
    """Tokens one Mini-Gemini image becomes: `views` x (576, or d + c under VisionZip).

    Shared by the processor (placeholders) and the model (features).
    """
    if compression["method"] in PRUNER_METHODS:
        return views_pruned_count(compression, patches_per_view, views)
    return views * image_token_count(compression, patches_per_view)
