"""The one place where SlimVLM reaches below transformers' public model API.

Shipped with checkpoints (imports only torch and transformers). A checkpoint's remote code runs under
whatever transformers its user has, so every internal we rely on is reached through this module, adapts
by feature detection (signatures, dataclass fields), and fails loudly (naming the installed version and
the tested range) when an assumption stops holding. Never a silent no-op, never a version check.

What we rely on, and how each is guarded:
- the keyword a decoder layer / `LlavaModel.forward` / `create_causal_mask` / `generate` /
  `prepare_inputs_for_generation` takes the KV cache under: `past_key_values` (<= 5.23) or `cache`
  (>= 5.24). Read from each callee's signature (`cache_keyword`): `cache` is preferred when a signature shows
  both (5.25 exposes the deprecated name too), neither name present raises (`CACHE_KEYWORDS`).
- a decoder-layer call writes its keys into the cache: `run_decoder_layer` checks the cache grew by the
  query length and raises otherwise (the 5.24 rename made a mis-named keyword a silent no-op).
- the model output dataclasses name the cache `past_key_values` or `cache`, and the image features
  `image_hidden_states` (<= 5.23) or `image_outputs` (>= 5.24): read from the dataclass fields.
- `prepare_inputs_for_generation` returns the cache under one of the two names: `generation_cache`.
- module attributes (decoder: `self_attn.q_proj`, `input_layernorm`, `rotary_emb`; CLIP: `embeddings`,
  `pre_layrnorm`, `encoder.layers`, `layer_norm1`; caches: `layers[i].keys/values`): `require_attributes`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import warnings
from typing import Callable

import torch
import transformers
from packaging import version as _version
from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

# The transformers releases the test suite runs on (CI tests both ends). Keep in step with pyproject.toml.
TESTED_TRANSFORMERS_MIN = "5.23.0"
TESTED_TRANSFORMERS_BELOW = "5.26"
TESTED_RANGE = f">={TESTED_TRANSFORMERS_MIN},<{TESTED_TRANSFORMERS_BELOW}"

# The two names of the KV-cache keyword, in order of preference. A signature may show both: from 5.25,
# `deprecate_kwarg(..., expose_in_signature=True)` adds the deprecated `past_key_values` next to `cache` (the mask
# helpers do so). The rule (`choose_cache_keyword`): `cache` whenever a signature has it, alone or next to
# `past_key_values`; else `past_key_values` (<= 5.23); neither raises. Output fields and
# `prepare_inputs_for_generation` results are read in the same order.
CACHE_KEYWORDS = ("cache", "past_key_values")

__all__ = [
    "TESTED_RANGE",
    "TransformersCompatError",
    "cache_keyword",
    "choose_cache_keyword",
    "call_with_cache",
    "can_return_tuple",
    "causal_mask",
    "generate_with_cache",
    "generation_cache",
    "model_output",
    "output_cache",
    "require_attributes",
    "run_decoder_layer",
    "warn_if_untested",
    "with_cache_argument",
    "with_stock_deprecations",
]


class TransformersCompatError(RuntimeError):
    """A transformers internal no longer behaves as SlimVLM relies on."""

    def __init__(self, message: str):
        super().__init__(
            f"{message} (transformers {transformers.__version__}; SlimVLM is tested with transformers {TESTED_RANGE}: "
            f"install a version in that range, e.g. pip install 'transformers{TESTED_RANGE}')"
        )


class UntestedTransformersWarning(UserWarning):
    """The installed transformers is outside the range SlimVLM's test suite runs on."""


def is_tested_version(installed: str | None = None) -> bool:
    installed = _version.parse(installed or transformers.__version__)
    return _version.parse(TESTED_TRANSFORMERS_MIN) <= installed < _version.parse(TESTED_TRANSFORMERS_BELOW)


# State shared by every copy of this module in the process: under trust_remote_code the config, the processor and
# the model each load their own copy of the shipped modules, and each copy runs `warn_if_untested()` on import.
_PROCESS_STATE = "_slimvlm_process_state"


def _process_state() -> types.ModuleType:
    return sys.modules.setdefault(_PROCESS_STATE, types.ModuleType(_PROCESS_STATE))


def warn_if_untested(installed: str | None = None) -> bool:
    """Warn once per process (whatever number of copies of this module are loaded) when the installed
    transformers is outside the tested range; True if it is.

    The warning is one line (`slimvlm:0: UntestedTransformersWarning: ...`), with no source line echoed after it."""
    installed = installed or transformers.__version__
    if is_tested_version(installed):
        return False
    warned = _process_state().__dict__.setdefault("untested_transformers_warned", set())
    if installed not in warned:
        warned.add(installed)
        message = (f"SlimVLM is tested with transformers {TESTED_RANGE}; transformers {installed} is installed. It may "
                   "work, and SlimVLM raises rather than return wrong numbers if an internal it uses has changed; for a "
                   f"tested set-up: pip install 'transformers{TESTED_RANGE}'")
        # Line 0 of a file named "slimvlm": the default format then shows no source line.
        warnings.warn_explicit(UntestedTransformersWarning(message), UntestedTransformersWarning, "slimvlm", 0,
                               module="slimvlm")
    return True


def _forget_untested_warning() -> None:
    """Let `warn_if_untested` warn again in this process (tests)."""
    _process_state().__dict__.pop("untested_transformers_warned", None)


# ---- the cache keyword ----------------------------------------------------------------------------------


def _parameters(fn: Callable) -> dict:
    return dict(inspect.signature(fn).parameters)  # follows __wrapped__ through transformers' decorators


def choose_cache_keyword(parameter_names, what: str = "the callee") -> str:
    """The cache keyword among a signature's parameter names, by the documented preference (`CACHE_KEYWORDS`):
    'cache' if present (also next to the deprecated 'past_key_values' a 5.25 signature exposes), else
    'past_key_values'; neither raises `TransformersCompatError`."""
    names = set(parameter_names)
    for name in CACHE_KEYWORDS:
        if name in names:
            return name
    raise TransformersCompatError(f"{what} takes its KV cache under neither of {list(CACHE_KEYWORDS)}")


@functools.lru_cache(maxsize=None)
def _cache_keyword_of(fn: Callable) -> str:
    return choose_cache_keyword(_parameters(fn), str(getattr(fn, "__qualname__", fn)))


def cache_keyword(fn: Callable) -> str:
    """The keyword `fn` takes the KV cache under ('cache' from transformers 5.24, 'past_key_values' before)."""
    return _cache_keyword_of(getattr(fn, "__func__", fn))


def call_with_cache(fn: Callable, *args, cache=None, keyword_of: Callable | None = None, keyword: str | None = None,
                    **kwargs):
    """Call `fn(*args, **kwargs)` with `cache` passed under the keyword `fn` (or `keyword_of`) declares.

    `keyword`: the keyword, resolved beforehand with `cache_keyword` (inside a torch.compile'd forward, where
    reading a signature breaks the graph)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            raise TypeError(f"pass the KV cache as cache=, not {name}= (call_with_cache)")
        kwargs.pop(name, None)
    return fn(*args, **{keyword or cache_keyword(keyword_of or fn): cache}, **kwargs)


def pop_cache(kwargs: dict, value=None):
    """The cache given under either keyword (removed from `kwargs`); both given raises."""
    given = {name: kwargs.pop(name) for name in CACHE_KEYWORDS if kwargs.get(name) is not None}
    if value is not None:
        given.setdefault("cache", value)
    if len(given) > 1:
        raise ValueError("give the KV cache once: as cache= (transformers >= 5.24) or past_key_values= (<= 5.23), not both")
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)
    return next(iter(given.values()), None)


# The keyword the installed LlavaModel.forward uses: our forward signatures show the same one.
def _installed_cache_keyword() -> str:
    from transformers import LlavaModel

    return cache_keyword(LlavaModel.forward)


def with_cache_argument(fn: Callable) -> Callable:
    """Decorate a forward written with a `cache` parameter so it takes the cache under either keyword and
    shows the installed transformers' keyword in its signature (as the stock forward it replaces does)."""
    signature = inspect.signature(fn)
    if "cache" not in signature.parameters:
        raise TypeError(f"{fn.__qualname__} must declare a `cache` parameter")
    shown = _installed_cache_keyword()
    parameters = [p.replace(name=shown) if p.name == "cache" else p for p in signature.parameters.values()]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs or "cache" in kwargs:
            kwargs["cache"] = pop_cache(kwargs)
        return fn(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)
    del wrapper.__wrapped__  # inspect must show the adapted signature, not fn's
    return wrapper


# ---- the stock deprecated keywords ----------------------------------------------------------------------------

# The code object of the wrapper `transformers.utils.deprecation.deprecate_kwarg` puts around a function.
_DEPRECATION_CODE = deprecate_kwarg("old", "0.0.1", new_name="new")(lambda new=None: new).__code__


def stock_deprecations(fn: Callable) -> list[Callable]:
    """The `deprecate_kwarg` wrappers of a stock method, outermost first (found along its `__wrapped__` chain)."""
    found, target = [], getattr(fn, "__func__", fn)
    while target is not None:
        if getattr(target, "__code__", None) is _DEPRECATION_CODE:
            found.append(target)
        target = getattr(target, "__wrapped__", None)
    return found


def with_stock_deprecations(stock_fn: Callable) -> Callable:
    """Decorate a method that replaces `stock_fn` so it takes and warns on the deprecated keywords exactly as the
    stock method does (e.g. `past_key_values=` -> `cache=` from 5.24, Video-LLaVA's `pixel_values_images=` ->
    `pixel_values=`): each stock `deprecate_kwarg` wrapper is re-run around `fn` (same code, same settings, same
    message, naming the Slim class). Versions whose stock method has none leave `fn` as it is."""

    def decorate(fn: Callable) -> Callable:
        for stock in reversed(stock_deprecations(stock_fn)):  # innermost first, so the outermost ends outside
            names = stock.__code__.co_freevars
            cells = tuple(types.CellType(fn) if name == "func" else cell for name, cell in zip(names, stock.__closure__))
            wrapped = types.FunctionType(stock.__code__, stock.__globals__, fn.__name__, stock.__defaults__, cells)
            fn = functools.update_wrapper(wrapped, fn)  # __wrapped__ = fn: inspect shows fn's signature
        return fn

    return decorate


# ---- decoder layers, masks, caches -------------------------------------------------------------------------


def cached_length(cache, layer_idx: int) -> int:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TransformersCompatError(f"{type(cache).__name__} has no per-layer `layers` list")
    if layer_idx >= len(layers):
        return 0
    return int(layers[layer_idx].get_seq_length())


def run_decoder_layer(layer, hidden_states: torch.Tensor, *, cache, attention_mask, position_ids,
                      position_embeddings, **kwargs) -> torch.Tensor:
    """One decoder layer on `hidden_states` [B, q, C], writing its K/V into `cache`; returns [B, q, C].

    Raises `TransformersCompatError` if the call left the cache unchanged (a keyword the layer no longer reads).
    """
    layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
    if layer_idx is None:
        raise TransformersCompatError(f"{type(layer).__name__} has no self_attn.layer_idx")
    before = cached_length(cache, layer_idx)
    forward = type(layer).forward
    out = call_with_cache(layer, hidden_states, cache=cache, keyword_of=forward, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=True, position_embeddings=position_embeddings, **kwargs)
    after = cached_length(cache, layer_idx)
    if after != before + hidden_states.shape[1]:
        raise TransformersCompatError(
            f"{type(layer).__name__}(…, {cache_keyword(forward)}=…) left the KV cache of layer {layer_idx} "
            f"at {after} tokens, expected {before} + {hidden_states.shape[1]}: the decoder layer no longer writes the cache "
            "it is given"
        )
    return out[0] if isinstance(out, tuple) else out


def _keyword_or_error(fn: Callable) -> str | TransformersCompatError:
    try:
        return cache_keyword(fn)
    except TransformersCompatError as error:  # raised when used, not on import
        return error


# Read once on import: a mask built inside a torch.compile'd decoding step must not read a signature.
_CAUSAL_MASK_KEYWORD = _keyword_or_error(_create_causal_mask)


def causal_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, cache, **kwargs):
    """`transformers.masking_utils.create_causal_mask` with the cache under the keyword it declares."""
    if isinstance(_CAUSAL_MASK_KEYWORD, TransformersCompatError):
        raise _CAUSAL_MASK_KEYWORD
    return call_with_cache(_create_causal_mask, config=config, inputs_embeds=inputs_embeds,
                           attention_mask=attention_mask, cache=cache, keyword=_CAUSAL_MASK_KEYWORD, **kwargs)


def layer_keys(cache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B, kv_heads, S, head_dim] of one layer of a dynamic cache."""
    layer = cache.layers[layer_idx]
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise TransformersCompatError(
            f"cache layer {layer_idx} ({type(layer).__name__}) holds no `keys`/`values` tensors"
        )
    return keys, values


# ---- outputs and generation ---------------------------------------------------------------------------------


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


MODALITIES = ("image", "video")


def model_output(output_class, *, last_hidden_state, cache=None, **fields):
    """An instance of a `*ModelOutputWithPast`-style class in the installed layout.

    fields may hold `image_outputs` / `video_outputs`: the `get_{image,video}_features` output (5.24 stores it
    whole; before, its `pooler_output` went into `image_hidden_states` / `video_hidden_states`).
    """
    names = _fields(output_class)
    cache_field = next((n for n in CACHE_KEYWORDS if n in names), None)
    if cache_field is None:
        raise TransformersCompatError(f"{output_class.__name__} has no cache field ({list(CACHE_KEYWORDS)})")
    values = {"last_hidden_state": last_hidden_state, cache_field: cache}
    for modality in MODALITIES:
        encoded = fields.pop(f"{modality}_outputs", None)
        if f"{modality}_outputs" in names:
            values[f"{modality}_outputs"] = encoded
        elif f"{modality}_hidden_states" in names:
            values[f"{modality}_hidden_states"] = None if encoded is None else encoded.pooler_output
        elif encoded is not None:
            raise TransformersCompatError(f"{output_class.__name__} has no field for {modality} features")
    return output_class(**values, **fields)


def output_cache(output):
    """The cache of a model output, whichever field name the installed transformers uses."""
    for name in CACHE_KEYWORDS:
        if name in _fields(type(output)):
            return getattr(output, name)
    raise TransformersCompatError(f"{type(output).__name__} has no cache field ({list(CACHE_KEYWORDS)})")


def generate_with_cache(generate: Callable, cache, **kwargs):
    """`generate(..., <cache keyword>=cache)`: `generate` forwards it to `prepare_inputs_for_generation`, whose
    signature names the keyword."""
    from transformers.generation.utils import GenerationMixin

    return call_with_cache(generate, cache=cache, keyword_of=GenerationMixin.prepare_inputs_for_generation, **kwargs)


def generation_cache(model_inputs: dict):
    """The cache in a `prepare_inputs_for_generation` result (key 'cache' from 5.24, 'past_key_values' before)."""
    for name in CACHE_KEYWORDS:
        if model_inputs.get(name) is not None:
            return model_inputs[name]
    return None


def require_attributes(module, paths: tuple[str, ...], what: str) -> None:
    """Raise when `module` lacks any dotted attribute path that `what` relies on."""
    missing = []
    for path in paths:
        target = module
        for part in path.split("."):
            target = getattr(target, part, None)
            if target is None:
                missing.append(path)
                break
    if missing:
        raise TransformersCompatError(f"{what} needs {type(module).__name__}.{{{', '.join(missing)}}}, which it lacks")


warn_if_untested()
