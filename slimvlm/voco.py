"""VoCo-LLaMA: the attention-mask rule, the compressed-image cache, prompt layout and training helpers.

Method (Ye et al., CVPR 2025; specs/voco.md): K copies of one `<voco>` token follow the image, and every
token after the last VoCo token may only attend to keys from the first VoCo token onward. The VoCo
tokens' per-layer K/V therefore *are* the compressed image (`VoCoCache`).

Shipped with checkpoints: imports only torch, transformers, safetensors. Pure tensor code that knows
nothing about a particular VLM family; the family module calls it at its place.

Use (a model trained with VoCo, `compression={"method": "voco", "num_voco_tokens": K}`):

    inputs = processor(text=["<image>\\n"], images=[image], return_tensors="pt")  # [BOS][image]["\\n"][<voco> x K]
    cache = model.voco_compress(**inputs)            # once per image: K tokens' K/V per layer
    cache.save("image.voco.safetensors")             # VoCoCache.load(path, model=model) checks the weights
    text = processor.tokenizer([build_voco_text_prompt(question)], add_special_tokens=False, return_tensors="pt")
    answer = model.generate(**text, voco_cache=cache, max_new_tokens=32)

Training: `add_voco_token(model, processor)` once, `freeze_vision_tower(model)`, then `model(**batch)`
with batches from `VoCoDataCollator` (labels on answers and `</s>` only) runs under the VoCo mask, so
`transformers.Trainer` works as is (set `remove_unused_columns=False`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .compat import causal_mask, layer_keys


VOCO_TOKEN = "<voco>"
# The official system prompt is a variant of vicuna_v1's ("... assistant of the image."); kept for parity.
VOCO_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant of the image. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IGNORE_INDEX = -100
# Backends whose mask creation honours a custom mask function. FlashAttention only sees the 2-D
# padding mask, so the VoCo rule would be silently dropped there.
MASK_BACKENDS = ("sdpa", "eager", "flex_attention")
# RoPE variants whose frequencies do not depend on the sequence length: R(p + d) = R(d) R(p) holds, so
# cached keys can be moved by re-rotation.
RELOCATABLE_ROPE_TYPES = ("default", "linear", "llama3")
CACHE_FORMAT = "slimvlm-voco-cache"
CACHE_FORMAT_VERSION = "1"


# ----------------------------------------------------------------------------------------------------
# 1. The attention-mask rule (spec §3)
# ----------------------------------------------------------------------------------------------------


@dataclass
class VoCoBounds:
    """Where the VoCo group sits in each padded row.

    first: [B] index of the first VoCo token (L when the row has none).
    last: [B] index of the last VoCo token (-1 when the row has none).
    has_voco: [B] bool.
    """

    first: torch.Tensor
    last: torch.Tensor
    has_voco: torch.Tensor

    def to(self, device: torch.device | str) -> "VoCoBounds":
        return VoCoBounds(self.first.to(device), self.last.to(device), self.has_voco.to(device))

    def mask_function(self) -> Callable:
        return voco_and_mask_function(self)

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] positions of the rows (per sample, cumsum - 1, as `generate()` computes them)."""
        return positions_from_padding(attention_mask, attention_mask.shape[1])


def voco_bounds(voco_token_mask: torch.Tensor) -> VoCoBounds:
    """First/last VoCo index per row from a [B, L] bool mask of VoCo positions (padded, image-expanded row)."""
    if voco_token_mask.dim() != 2:
        raise ValueError(f"voco_token_mask must be [batch, length], got shape {tuple(voco_token_mask.shape)}")
    mask = voco_token_mask.bool()
    length = mask.shape[1]
    index = torch.arange(length, device=mask.device).expand_as(mask)
    first = torch.where(mask, index, torch.full_like(index, length)).amin(dim=1)
    last = torch.where(mask, index, torch.full_like(index, -1)).amax(dim=1)
    return VoCoBounds(first=first, last=last, has_voco=mask.any(dim=1))


def voco_and_mask_function(bounds: VoCoBounds) -> Callable:
    """The VoCo rule as an `and_mask_function` for `transformers.masking_utils.create_causal_mask`.

    allowed(b, q, kv) = not has_voco[b] or q <= last[b] or kv >= first[b]; causality and padding are
    added by `create_causal_mask`. Index-only tensor ops, because mask creation runs it under `vmap`.
    Indices are absolute (cache offset included), so the same function serves decode steps as long as
    `bounds` were computed on the full padded row.
    """
    first, last, has_voco = bounds.first, bounds.last, bounds.has_voco

    def voco_rule(batch_idx, head_idx, q_idx, kv_idx):
        return (~has_voco[batch_idx]) | (q_idx <= last[batch_idx]) | (kv_idx >= first[batch_idx])

    return voco_rule


def voco_reference_mask(voco_token_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Dense [B, L, L] bool mask of spec §3.1 (pad query rows all True), for documentation and tests."""
    bounds = voco_bounds(voco_token_mask)
    length = voco_token_mask.shape[1]
    i = torch.arange(length, device=voco_token_mask.device)[None, :, None]
    j = torch.arange(length, device=voco_token_mask.device)[None, None, :]
    real = attention_mask.bool()
    allowed = (j <= i) & real[:, None, :]
    voco_rule = (i <= bounds.last[:, None, None]) | (j >= bounds.first[:, None, None])
    allowed = allowed & (voco_rule | ~bounds.has_voco[:, None, None])
    return allowed | ~real[:, :, None]


def check_mask_backend(attn_implementation: str | None, needs_voco_mask: bool | torch.Tensor = True) -> None:
    """Raise when the VoCo mask would be silently ignored (FlashAttention only reads the padding mask).

    needs_voco_mask: a bool, or a [B] bool tensor (rows with VoCo), read only when the backend ignores custom
    masks (reading it is a data-dependent branch that torch.compile cannot trace)."""
    if attn_implementation in MASK_BACKENDS:
        return
    if isinstance(needs_voco_mask, torch.Tensor):
        needs_voco_mask = bool(needs_voco_mask.any())
    if needs_voco_mask:
        raise ValueError(
            f"VoCo full-mask mode needs an attention backend that applies custom masks; "
            f"attn_implementation={attn_implementation!r}, allowed: {list(MASK_BACKENDS)}. "
            "Use the cached path (model.voco_compress + voco_cache=...), which runs plain causal attention on any backend, "
            "or load the model with attn_implementation='sdpa'."
        )


def unmask_padding_queries(mask: Any, query_is_real: torch.Tensor) -> Any:
    """Let pad query rows attend everywhere (official behaviour) so no row is fully masked.

    A fully masked row can give NaN in SDPA; the NaN enters that position's V and, through 0 x NaN,
    every real row of the next layer. Real rows never attend to pad keys, so this changes nothing real.

    mask: [B, 1, q, kv] bool (sdpa: True = attend) or additive float (eager: 0 = attend); other
        objects (flex BlockMask) are returned unchanged.
    query_is_real: [B, q] bool.
    """
    if not isinstance(mask, torch.Tensor):
        return mask
    pad_rows = ~query_is_real.bool().to(mask.device)[:, None, :, None]
    if mask.dtype == torch.bool:
        return mask | pad_rows
    return mask.masked_fill(pad_rows, 0.0)


def positions_from_padding(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Per-sample positions of the last `query_length` columns, as `generate()` computes them.

    attention_mask: [B, past + q] 2-D padding mask. Returns [B, q] int64 (pads get position 0).
    """
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -query_length:]


def build_voco_attention_mask(
    text_config,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    bounds: "VoCoBounds | VoCoSegments",
    cache=None,
    position_ids: torch.Tensor | None = None,
) -> Any:
    """The full VoCo mask in the format the language model's backend expects.

    bounds: `VoCoBounds` (the image rule, §3) or `VoCoSegments` (the shifted-segments video rule, §7).

    inputs_embeds: [B, q, *] (only batch, length, dtype and device are read).
    attention_mask: [B, past + q] 2-D padding mask (always given: without it, positions could be read
        as packed sequences).
    Returns a [B, 1, q, past + q] bool (sdpa) / additive (eager) tensor, or a flex BlockMask.
    """
    check_mask_backend(getattr(text_config, "_attn_implementation", None), bounds.has_voco)
    bounds = bounds.to(inputs_embeds.device)
    mask = causal_mask(text_config, inputs_embeds, attention_mask, cache, position_ids=position_ids,
                       and_mask_function=bounds.mask_function())
    return unmask_padding_queries(mask, attention_mask[:, -inputs_embeds.shape[1] :].bool())


def check_voco_groups(voco_token_mask: torch.Tensor, num_voco_tokens: int) -> None:
    """Each row holds no VoCo token (text-only) or exactly one contiguous group of K (one image).

    The rule uses a row's first and last VoCo token, so two groups (two images) would silently merge.
    """
    counts = voco_token_mask.sum(dim=1)
    bounds = voco_bounds(voco_token_mask)
    ok = (counts == 0) | ((counts == num_voco_tokens) & (bounds.last - bounds.first + 1 == num_voco_tokens))
    if not bool(ok.all()):
        raise ValueError(
            f"each row needs 0 or one contiguous group of num_voco_tokens={num_voco_tokens} <voco> tokens (one image "
            f"per row; several images per row are not supported); got counts {counts.tolist()}"
        )


def voco_group_indices(voco_token_mask: torch.Tensor, num_voco_tokens: int) -> torch.Tensor:
    """[B, K] indices of each row's VoCo group; raises unless every row has exactly K contiguous VoCo tokens."""
    counts = voco_token_mask.sum(dim=1)
    if not bool((counts == num_voco_tokens).all()):
        raise ValueError(
            f"every row must contain exactly num_voco_tokens={num_voco_tokens} <voco> tokens (one image per row, "
            f"written by the processor); got counts {counts.tolist()}"
        )
    bounds = voco_bounds(voco_token_mask)
    if not bool((bounds.last - bounds.first + 1 == num_voco_tokens).all()):
        raise ValueError("the <voco> tokens of a row must be contiguous (one VoCo group per image)")
    return bounds.first[:, None] + torch.arange(num_voco_tokens, device=voco_token_mask.device)[None, :]


# ----------------------------------------------------------------------------------------------------
# 1b. Video: "shifted segments" (spec §7; our design, not the paper's code)
# ----------------------------------------------------------------------------------------------------

# Segment id of the tokens after the last VoCo group (the text); the prefix before the first frame is -1.
TEXT_SEGMENT = 1 << 30


@dataclass
class VoCoSegments:
    """The segment of every token of the padded, expanded rows (spec §7).

    segment: [B, L] int64: -1 for the prefix (BOS, anything before the first visual token), t for segment t
        (frame t's tokens and the VoCo group that follows them), TEXT_SEGMENT after the last VoCo group. A row
        without VoCo is all prefix (plain causal attention); a row with one group (an image) obeys exactly the
        image rule of §3.
    is_voco: [B, L] bool.
    num_segments: [B] VoCo groups per row.
    """

    segment: torch.Tensor
    is_voco: torch.Tensor
    num_segments: torch.Tensor

    @property
    def has_voco(self) -> torch.Tensor:
        return self.num_segments > 0

    def to(self, device: torch.device | str) -> "VoCoSegments":
        return VoCoSegments(self.segment.to(device), self.is_voco.to(device), self.num_segments.to(device))

    def mask_function(self) -> Callable:
        return voco_segment_mask_function(self)

    def positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] shifted-segment positions of the rows (`segment_positions`)."""
        return segment_positions(self, attention_mask)


def voco_segments(voco_token_mask: torch.Tensor, visual_token_mask: torch.Tensor, num_voco_tokens: int) -> VoCoSegments:
    """Segments of rows laid out `[prefix][frame_1][VoCo_1 x K] ... [frame_T][VoCo_T x K] text` (spec §7).

    voco_token_mask, visual_token_mask: [B, L] bool (`<voco>` positions; frame / image placeholder positions).
    Segment t runs from the token after VoCo group t - 1 (for t = 0: the first visual token) through the last
    token of group t. Raises ValueError unless every group is K contiguous `<voco>` tokens.
    """
    is_voco = voco_token_mask.bool()
    batch, length = is_voco.shape
    following = torch.cat([is_voco[:, 1:], torch.zeros_like(is_voco[:, :1])], 1)
    group_end = is_voco & ~following
    preceding = torch.cat([torch.zeros_like(is_voco[:, :1]), is_voco[:, :-1]], 1)
    group_start = is_voco & ~preceding
    num_segments = group_end.sum(1)
    group = (group_start.long().cumsum(1) - 1).clamp(min=0)  # each <voco> token's group
    sizes = torch.zeros(batch, length + 1, dtype=torch.long, device=is_voco.device)
    sizes.scatter_add_(1, group, is_voco.long())
    index = torch.arange(length, device=is_voco.device).expand(batch, -1)
    used = index < num_segments[:, None]
    if not bool((sizes[:, :length][used] == num_voco_tokens).all()):
        raise ValueError(
            f"every VoCo group must be num_voco_tokens={num_voco_tokens} contiguous <voco> tokens (one group per frame "
            f"or image); got {is_voco.sum(1).tolist()} <voco> tokens in {num_segments.tolist()} groups per row"
        )
    segment = group_end.long().cumsum(1) - group_end.long()  # groups that ended strictly before the token
    segment = torch.where(segment >= num_segments[:, None], torch.full_like(segment, TEXT_SEGMENT), segment)
    first_visual = torch.where(visual_token_mask.bool(), index, torch.full_like(index, length)).amin(1)
    segment = torch.where(index < first_visual[:, None], torch.full_like(segment, -1), segment)
    return VoCoSegments(segment=segment, is_voco=is_voco, num_segments=num_segments)


def voco_segment_mask_function(segments: VoCoSegments) -> Callable:
    """The §7 rule as an `and_mask_function` (causality and padding come from `create_causal_mask`):

    - a prefix token sees the causal prefix;
    - a token of segment t sees the prefix and segment t;
    - a token after the last VoCo sees every VoCo token and the tokens after the last VoCo.
    Index-only tensor ops (mask creation runs it under `vmap`); indices are absolute, so the segments must
    be computed on the full rows (they are, at every decode step). A static cache asks about key slots past the
    rows (its whole length): they are read as the last token, and causality masks them anyway.
    """
    segment, is_voco = segments.segment, segments.is_voco
    last = segment.shape[1] - 1

    def segment_rule(batch_idx, head_idx, q_idx, kv_idx):
        kv_idx = kv_idx.clamp(max=last)
        query, key = segment[batch_idx, q_idx], segment[batch_idx, kv_idx]
        in_segment = (query >= 0) & (query != TEXT_SEGMENT)
        text = query == TEXT_SEGMENT
        return ((query < 0) | (in_segment & ((key < 0) | (key == query)))
                | (text & (is_voco[batch_idx, kv_idx] | (key == TEXT_SEGMENT))))

    return segment_rule


def segment_positions(segments: VoCoSegments, attention_mask: torch.Tensor) -> torch.Tensor:
    """Shifted-segment positions [B, L] (spec §7): segment t takes the positions an image sample would take,
    shifted by t·K, and the text continues after the last VoCo group (for one image: the plain positions).

    Every token's plain position (cumsum - 1) minus the non-VoCo tokens of the segments before its own (the
    text counts as the last segment); pads get 0. Frames of n tokens and groups of K give frame t the
    positions 1 + t·K ..., VoCo_t n + 1 + t·K ... and the text n + 1 + T·K ....
    """
    real = attention_mask.bool()
    plain = attention_mask.long().cumsum(-1) - 1
    segment = segments.segment
    last = (segments.num_segments - 1).clamp(min=0)[:, None]
    own = torch.where(segment == TEXT_SEGMENT, last, segment.clamp(min=0))  # [B, L]
    width = int(segments.num_segments.max()) + 1 if segment.numel() else 1
    counted = real & (segment >= 0) & (segment != TEXT_SEGMENT) & ~segments.is_voco
    per_segment = torch.zeros(segment.shape[0], width, dtype=torch.long, device=segment.device)
    per_segment.scatter_add_(1, torch.where(counted, segment, torch.zeros_like(segment)).clamp(max=width - 1),
                             counted.long())
    before = per_segment.cumsum(1) - per_segment  # non-VoCo tokens of the segments before t
    positions = plain - torch.gather(before, 1, own)
    return positions.masked_fill(~real, 0)


def segment_rows(segments: VoCoSegments, attention_mask: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per sample, per segment t: the indices of the stage-1 row of frame t, i.e. the real prefix tokens followed
    by segment t's tokens (what a token of segment t may attend to). [B][T] of 1-D int64 tensors."""
    real = attention_mask.bool()
    rows = []
    for b in range(segments.segment.shape[0]):
        prefix = ((segments.segment[b] < 0) & real[b]).nonzero().flatten()
        rows.append([torch.cat([prefix, ((segments.segment[b] == t) & real[b]).nonzero().flatten()])
                     for t in range(int(segments.num_segments[b]))])
    return rows


# ----------------------------------------------------------------------------------------------------
# 2. The compressed image: per-layer K/V of the VoCo tokens (spec §5, §6)
# ----------------------------------------------------------------------------------------------------


class VoCoDynamicCache(DynamicCache):
    """A `DynamicCache` whose first K entries are VoCo tokens: nothing before the VoCo group is in it,
    so decoding on top of it needs only a plain causal mask (any attention backend)."""


def rotate_half_of(language_model) -> Callable:
    """The language model's own rotate-half convention (Llama: cat(-x2, x1))."""
    module = sys.modules.get(type(language_model).__module__)
    fn = getattr(module, "rotate_half", None)
    if fn is not None:
        return fn

    def rotate_half(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    return rotate_half


def rerotate_keys(
    keys: torch.Tensor, delta: torch.Tensor, rotary_emb: torch.nn.Module, rotate_half: Callable
) -> torch.Tensor:
    """Move RoPE-rotated keys by `delta` positions: R(p + d) k = R(d) R(p) k, exact for fixed frequencies.

    keys: [B, layers, kv_heads, K, head_dim]; delta: [B, K] int64. Uses the model's own rotary module
    (same theta and scaling); cos/sin are float32 as transformers computes them.
    """
    dummy = torch.zeros((), dtype=torch.float32, device=keys.device)
    cos, sin = rotary_emb(dummy, delta.to(keys.device))  # [B, K, head_dim]
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    cos, sin = (cos / scale)[:, None, None], (sin / scale)[:, None, None]
    compute = keys.to(torch.float64 if keys.dtype == torch.float64 else torch.float32)
    moved = compute * cos.to(compute.dtype) + rotate_half(compute) * sin.to(compute.dtype)
    return moved.to(keys.dtype)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, quantised storage included)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def weights_fingerprint(voco_embedding_row: torch.Tensor, layer0_k_proj_weight: torch.Tensor) -> str:
    """Identifies the weights a cache came from: sha256 over the `<voco>` row and layer-0 k_proj."""
    digest = hashlib.sha256()
    digest.update(tensor_sha256(voco_embedding_row).encode())
    digest.update(tensor_sha256(layer0_k_proj_weight).encode())
    return digest.hexdigest()


def rope_settings(text_config) -> tuple[float, str]:
    """(rope_theta, rope_type) of a text config (transformers 5: `rope_parameters`)."""
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0))
    return float(theta), str(params.get("rope_type", "default"))


def kv_layout(text_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of a text config."""
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return text_config.num_hidden_layers, kv_heads, head_dim


def cache_bytes_per_token(text_config, dtype: torch.dtype = torch.float16) -> int:
    """K + V bytes of one cached token over all layers: 2 x layers x kv_heads x head_dim x bytes.

    Vicuna-7B in fp16: 2 x 32 x 32 x 128 x 2 = 524,288 B (the paper's 0.524 MB per VoCo token).
    """
    layers, kv_heads, head_dim = kv_layout(text_config)
    return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


# Metadata fields compared on load: a cache belongs to the exact weights and shapes that produced it.
_CHECKED_FIELDS = ("weights_fingerprint", "num_layers", "num_kv_heads", "head_dim", "rope_theta", "rope_type", "quantization")


@dataclass
class VoCoCache:
    """Compressed images: the VoCo tokens' per-layer K/V, ready to answer any number of prompts.

    keys, values: [B, layers, kv_heads, K, head_dim] (keys already RoPE-rotated to `positions`).
    positions: [B, K] int64 positions the keys are rotated to (compact mode: 0..K-1).
    metadata: str -> str (spec §6), filled by the model that made the cache.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    # -- shape ---------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def num_voco_tokens(self) -> int:
        return self.keys.shape[3]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[1]

    @property
    def next_position(self) -> torch.Tensor:
        """[B] position of the first text token after the VoCo group."""
        return self.positions[:, -1] + 1

    @property
    def position_mode(self) -> str:
        compact = torch.arange(self.num_voco_tokens, device=self.positions.device).expand_as(self.positions)
        return "compact" if torch.equal(self.positions, compact) else "original"

    @property
    def nbytes(self) -> int:
        """Bytes of K + V (what a stored image costs)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index: int | slice) -> "VoCoCache":
        """Images `index` as a new cache (views; use `clone()` to detach storage)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        metadata = dict(self.metadata)
        if "image_sha256" in metadata:
            metadata["image_sha256"] = json.dumps(json.loads(metadata["image_sha256"])[index])
        return replace(self, keys=self.keys[index], values=self.values[index], positions=self.positions[index],
                       metadata=metadata)

    def clone(self) -> "VoCoCache":
        return replace(self, keys=self.keys.clone(), values=self.values.clone(), positions=self.positions.clone(),
                       metadata=dict(self.metadata))

    @classmethod
    def cat(cls, caches: Sequence["VoCoCache"]) -> "VoCoCache":
        """Stack caches of several images into one batch (same K, same model)."""
        metadata = dict(caches[0].metadata)
        if all("image_sha256" in c.metadata for c in caches):
            metadata["image_sha256"] = json.dumps([h for c in caches for h in json.loads(c.metadata["image_sha256"])])
        else:
            metadata.pop("image_sha256", None)
        return cls(
            keys=torch.cat([c.keys for c in caches]),
            values=torch.cat([c.values for c in caches]),
            positions=torch.cat([c.positions for c in caches]),
            metadata=metadata,
        )

    def repeat_interleave(self, repeats: int) -> "VoCoCache":
        """Each image `repeats` times in a row (one cache row per question); differentiable."""
        return replace(self, keys=self.keys.repeat_interleave(repeats, 0),
                       values=self.values.repeat_interleave(repeats, 0),
                       positions=self.positions.repeat_interleave(repeats, 0))

    def expand_to(self, batch_size: int) -> "VoCoCache":
        """One image for `batch_size` prompts (B = 1 broadcasts); otherwise B must match."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise ValueError(f"voco_cache holds {self.batch_size} images but the prompts have batch size {batch_size}; "
                             "give one cache per prompt or a single-image cache")
        return replace(self, keys=self.keys.expand(batch_size, *self.keys.shape[1:]),
                       values=self.values.expand(batch_size, *self.values.shape[1:]),
                       positions=self.positions.expand(batch_size, -1))

    # -- use -----------------------------------------------------------------------------------------
    def to_dynamic_cache(self, layer_devices: Sequence[torch.device] | None = None,
                         dtype: torch.dtype | None = None) -> VoCoDynamicCache:
        """A fresh `VoCoDynamicCache` (copies: the stored tensors never change when it grows).

        layer_devices: device of each decoder layer (device_map); dtype: the model's compute dtype.
        """
        cache = VoCoDynamicCache()
        for layer in range(self.num_layers):
            device = layer_devices[layer] if layer_devices is not None else self.keys.device
            k = self.keys[:, layer].to(device=device, dtype=dtype or self.keys.dtype, copy=True).contiguous()
            v = self.values[:, layer].to(device=device, dtype=dtype or self.values.dtype, copy=True).contiguous()
            cache.update(k, v, layer)
        return cache

    def relocate(self, rotary_emb: torch.nn.Module, rotate_half: Callable, first_position: int = 0,
                 rope_type: str = "default") -> "VoCoCache":
        """Re-rotate the keys so the VoCo tokens sit at first_position .. first_position + K - 1 (values unchanged)."""
        if rope_type not in RELOCATABLE_ROPE_TYPES:
            raise ValueError(f"cannot relocate a VoCo cache under rope_type={rope_type!r}: its frequencies depend on "
                             f"the sequence length; allowed: {list(RELOCATABLE_ROPE_TYPES)} (use position_mode='original')")
        target = first_position + torch.arange(self.num_voco_tokens, device=self.positions.device)
        target = target.expand_as(self.positions)
        keys = rerotate_keys(self.keys, target - self.positions, rotary_emb, rotate_half)
        metadata = dict(self.metadata, position_mode="compact" if first_position == 0 else "original",
                        first_position=str(first_position), next_position=str(first_position + self.num_voco_tokens))
        return replace(self, keys=keys, values=self.values.clone(), positions=target.clone(), metadata=metadata)

    def check_compatible(self, expected: dict[str, str], allow_mismatch: bool = False) -> None:
        """Raise ValueError listing every field of `expected` (a model's cache metadata) this cache contradicts."""
        wrong = [
            f"{name}: cache {self.metadata.get(name)!r} vs model {expected[name]!r}"
            for name in _CHECKED_FIELDS
            if name in expected and self.metadata.get(name) != expected[name]
        ]
        if wrong and not allow_mismatch:
            raise ValueError(
                "this VoCo cache was made by a different model and would give wrong answers (" + "; ".join(wrong)
                + "). Recompress the image with this model, or pass allow_mismatch=True to use it anyway."
            )

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one safetensors file (atomic: a temporary file in the same folder, then a rename).

        Tensors `keys`/`values` are [layers, kv_heads, K, head_dim] for one image, with a leading [B]
        otherwise; `positions` likewise [K] or [B, K]. Metadata: spec §6.
        """
        single = self.batch_size == 1
        tensors = {
            "keys": (self.keys[0] if single else self.keys).contiguous(),
            "values": (self.values[0] if single else self.values).contiguous(),
            "positions": (self.positions[0] if single else self.positions).contiguous(),
        }
        metadata = dict(self.metadata)
        metadata.update(
            format=CACHE_FORMAT,
            format_version=CACHE_FORMAT_VERSION,
            voco_num=str(self.num_voco_tokens),
            num_layers=str(self.num_layers),
            num_kv_heads=str(self.keys.shape[2]),
            head_dim=str(self.keys.shape[4]),
            position_mode=self.position_mode,
            first_position=json.dumps(self.positions[:, 0].tolist() if not single else int(self.positions[0, 0])),
            next_position=json.dumps(self.next_position.tolist() if not single else int(self.next_position[0])),
            dtype=str(self.keys.dtype).replace("torch.", ""),
            batch_size=str(self.batch_size),
        )
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".voco_cache_", suffix=".tmp", dir=folder)
        os.close(handle)
        try:
            save_file({k: v.detach().to("cpu") for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, allow_mismatch: bool = False,
             device: torch.device | str = "cpu") -> "VoCoCache":
        """Read a cache file; with `model`, refuse one made by other weights/shapes unless `allow_mismatch`.

        The tensors keep their stored dtype (bit-exact round trip); `to_dynamic_cache` casts them to the
        model's dtype and each layer's device when they are used.
        """
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            if metadata.get("format") != CACHE_FORMAT:
                raise ValueError(f"{path} is not a VoCo cache file (format={metadata.get('format')!r}, "
                                 f"expected {CACHE_FORMAT!r})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        keys, values, positions = tensors["keys"], tensors["values"], tensors["positions"]
        if keys.dim() == 4:  # one image
            keys, values, positions = keys[None], values[None], positions[None]
        cache = cls(keys=keys, values=values, positions=positions, metadata=metadata)
        if model is not None:
            cache.check_compatible(model.voco_cache_metadata(), allow_mismatch=allow_mismatch)
        return cache


def cache_metadata(
    text_config,
    voco_token_id: int,
    num_voco_tokens: int,
    fingerprint: str,
    dtype: torch.dtype,
    quantization: str = "none",
    model_name_or_path: str = "",
    model_revision: str = "",
) -> dict[str, str]:
    """The model-side fields of a cache's metadata (spec §6); all values are strings."""
    layers, kv_heads, head_dim = kv_layout(text_config)
    theta, rope_type = rope_settings(text_config)
    return {
        "format": CACHE_FORMAT,
        "format_version": CACHE_FORMAT_VERSION,
        "model_name_or_path": model_name_or_path or "",
        "model_revision": model_revision or "",
        "weights_fingerprint": fingerprint,
        "voco_token_id": str(voco_token_id),
        "voco_num": str(num_voco_tokens),
        "num_layers": str(layers),
        "num_kv_heads": str(kv_heads),
        "head_dim": str(head_dim),
        "rope_theta": repr(theta),
        "rope_type": rope_type,
        "dtype": str(dtype).replace("torch.", ""),
        "quantization": quantization,
    }


def gather_voco_kv(
    cache, group_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the VoCo tokens of a stage-1 cache.

    cache: a cache whose `layers[i].keys/values` are [B, kv_heads, S, head_dim].
    group_indices: [B, K] sequence indices of each row's VoCo group.
    Returns keys, values: [B, layers, kv_heads, K, head_dim] (on layer 0's device).
    """
    keys, values = [], []
    for layer in range(len(cache.layers)):
        k, v = layer_keys(cache, layer)
        index = group_indices.to(k.device)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        keys.append(torch.gather(k, 2, index))
        values.append(torch.gather(v, 2, index))
    device = keys[0].device
    return torch.stack([k.to(device) for k in keys], 1), torch.stack([v.to(device) for v in values], 1)


# ----------------------------------------------------------------------------------------------------
# 3. Prompt layout (spec §2): [BOS][image x N]["\n"][<voco> x K]["\n"][system] USER: q ASSISTANT: a</s>...
# ----------------------------------------------------------------------------------------------------


def voco_prompt_segments(
    turns: Sequence[tuple[str, str | None]],
    has_image: bool = True,
    system_prompt: str = VOCO_SYSTEM_PROMPT,
    strip_newlines: bool = True,
    image_token: str = "<image>",
) -> list[tuple[str, bool]]:
    """The conversation as (text, supervised) pieces in vicuna_v1 format with the image first.

    turns: [(user, assistant or None), ...]; a final None answer leaves the prompt open after "ASSISTANT:".
    The image marker is `"<image>\\n"`; the processor expands it to the image tokens followed by
    `"\\n" + "<voco>" * K`, which gives the spec layout. `strip_newlines` removes every "\\n" from the
    conversation text, as the official preprocessing does. Supervised pieces: each answer and its `</s>`.
    """
    def clean(text: str) -> str:
        return text.replace("\n", "") if strip_newlines else text

    segments: list[tuple[str, bool]] = []
    prefix = f"{image_token}\n" if has_image else ""
    prefix += clean(system_prompt) + " " if system_prompt else ""
    for index, (user, answer) in enumerate(turns):
        segments.append((prefix + f"USER: {clean(user)} ASSISTANT:", False))
        prefix = ""
        if answer is None:
            if index != len(turns) - 1:
                raise ValueError(f"only the last turn may lack an answer; turn {index} has answer None")
            break
        segments.append((f" {clean(answer)}</s>", True))
    return segments


def build_voco_prompt(
    turns: Sequence[tuple[str, str | None]] | str,
    has_image: bool = True,
    system_prompt: str = VOCO_SYSTEM_PROMPT,
    strip_newlines: bool = True,
) -> str:
    """The VoCo prompt text (use instead of llava-hf's chat template, which puts "USER: " before the image).

    >>> build_voco_prompt("What shape is it?")
    '<image>\\nA chat between ... USER: What shape is it? ASSISTANT:'
    """
    if isinstance(turns, str):
        turns = [(turns, None)]
    return "".join(text for text, _ in voco_prompt_segments(turns, has_image, system_prompt, strip_newlines))


def build_voco_text_prompt(
    turns: Sequence[tuple[str, str | None]] | str,
    system_prompt: str = VOCO_SYSTEM_PROMPT,
    strip_newlines: bool = True,
) -> str:
    """The text that follows a cached VoCo group (stage 2): the second "\\n", the system prompt and the turns.

    Tokenise it with `add_special_tokens=False`: BOS belongs to the compressed prefix, not to the text.
    """
    return "\n" + build_voco_prompt(turns, False, system_prompt, strip_newlines)


# A chat template emitting the same layout as `build_voco_prompt`, for `processor.apply_chat_template`.
VOCO_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='" + VOCO_SYSTEM_PROMPT.replace("'", "\\'") + "', image='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] if message['content'] is string "
    "else message['content'][0]['text'] %}{% endif %}"
    "{% if message['content'] is not string %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{% set ns.image = '<image>\\n' %}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{{ ns.image }}{% if ns.system %}{{ ns.system + ' ' }}{% endif %}"
    "{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ')) %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + text + ' ASSISTANT:' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + text + '</s>' }}{% endif %}"
    "{% endfor %}"
)


def voco_group_text(num_voco_tokens: int) -> str:
    """What follows each image's placeholders under VoCo: "\\n" then K `<voco>` (spec §2)."""
    return "\n" + VOCO_TOKEN * num_voco_tokens


def voco_video_text(frame_placeholders: str, num_frames: int, num_voco_tokens: int) -> str:
    """A video under VoCo (spec §7): every frame's placeholders directly followed by its own K `<voco>`."""
    return (frame_placeholders + VOCO_TOKEN * num_voco_tokens) * num_frames


# ----------------------------------------------------------------------------------------------------
# 4. Training helpers (spec §4)
# ----------------------------------------------------------------------------------------------------


def add_voco_token(model, tokenizer, seed: int | None = None, reinit: bool | None = None) -> int:
    """Make sure `<voco>` exists in the tokenizer and the embeddings; returns its id.

    When the tokenizer lacks it, it is added as a special token, the embeddings (and lm_head) grow if
    needed, and the new `<voco>` row of both is drawn from N(0, initializer_range), as the official
    recipe's resize did (transformers 5's mean-resizing is *not* used, for parity). `reinit=True`
    redraws the row even when the token already existed (e.g. an untrained placeholder row). The id
    is written to `model.config.voco_token_id`; `<voco>` and the image token join
    `generation_config.suppress_tokens` (recommended by the spec, not in the official code: neither is
    ever a correct answer token).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
    added = VOCO_TOKEN not in tokenizer.get_vocab()
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": [VOCO_TOKEN]}, replace_extra_special_tokens=False)
    voco_id = tokenizer.convert_tokens_to_ids(VOCO_TOKEN)
    embeddings = model.get_input_embeddings()
    if voco_id >= embeddings.weight.shape[0]:
        model.resize_token_embeddings(voco_id + 1, mean_resizing=False)
        embeddings = model.get_input_embeddings()
        added = True
    if added if reinit is None else reinit:
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for weight in (embeddings.weight, model.get_output_embeddings().weight):
                row = torch.randn(weight.shape[1], generator=generator, dtype=torch.float32) * std
                weight[voco_id] = row.to(weight.dtype)
    model.config.voco_token_id = voco_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        image_id = getattr(model.config, "image_token_id", None)
        suppress = list(generation_config.suppress_tokens or [])
        generation_config.suppress_tokens = suppress + [t for t in (voco_id, image_id) if t is not None and t not in suppress]
    return voco_id


VISION_MODULE_NAMES = ("vision_tower", "image_tower", "video_tower", "vision_tower_aux")


def freeze_vision_tower(model) -> list[str]:
    """VoCo recipe: freeze the vision encoder(s); the LLM (with `<voco>` row, lm_head) and projector train.

    Returns the names of the frozen modules.
    """
    model.requires_grad_(True)
    frozen = []
    for name, module in model.named_modules():
        if name.split(".")[-1] in VISION_MODULE_NAMES:
            module.requires_grad_(False)
            frozen.append(name)
    return frozen


class VoCoDataCollator:
    """Batches {"image": PIL | None, "conversation": [(user, answer), ...]} examples for `Trainer`; with a
    video-capable processor, examples may carry {"video": frames} instead (one VoCo group per frame, spec §7).

    Labels are -100 everywhere except the assistant answers and their `</s>` (LLaVA v1). Each piece of
    the conversation is tokenised separately and concatenated, so the labels line up exactly; the first
    piece goes through the processor, which expands the image and writes the VoCo group.
    Text-only examples get no VoCo tokens. Padding side follows `padding_side`.
    """

    def __init__(self, processor, system_prompt: str = VOCO_SYSTEM_PROMPT, strip_newlines: bool = True,
                 padding_side: str = "right", max_length: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.system_prompt = system_prompt
        self.strip_newlines = strip_newlines
        self.padding_side = padding_side
        self.max_length = max_length

    # What the processor returns for an image, passed on to the model (LLaVA-NeXT adds the anyres `image_sizes`).
    IMAGE_KEYS = ("pixel_values", "image_sizes", "pixel_values_videos")

    def encode(self, example: dict) -> dict[str, torch.Tensor]:
        """One example -> input_ids [L], labels [L] and, with an image, the processor's image tensors
        (pixel_values [1, 3, H, W], or [1, views, 3, H, W] and image_sizes [1, 2] for LLaVA-NeXT)."""
        image, video = example.get("image"), example.get("video")
        if image is not None and video is not None:
            raise ValueError("a VoCo example holds an image or a video, not both")
        media = {"images": [image]} if image is not None else {"videos": [video]} if video is not None else {}
        marker = getattr(self.processor, "video_token", "<video>") if video is not None else "<image>"
        segments = voco_prompt_segments(example["conversation"], bool(media), self.system_prompt,
                                        self.strip_newlines, image_token=marker)
        first = self.processor(text=segments[0][0], return_tensors="pt", **media)
        ids = [first["input_ids"][0]]
        labels = [torch.full_like(ids[0], IGNORE_INDEX)]
        for text, supervised in segments[1:]:
            piece = torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(piece)
            labels.append(piece.clone() if supervised else torch.full_like(piece, IGNORE_INDEX))
        out = {"input_ids": torch.cat(ids), "labels": torch.cat(labels)}
        if self.max_length is not None:  # right truncation never cuts the image: it comes first
            out = {k: v[: self.max_length] for k, v in out.items()}
        if media:
            out.update({key: first[key] for key in self.IMAGE_KEYS if key in first})
        return out

    def __call__(self, examples: Iterable[dict]) -> dict[str, torch.Tensor]:
        encoded = [self.encode(example) for example in examples]
        length = max(e["input_ids"].shape[0] for e in encoded)
        pad_id = self.tokenizer.pad_token_id
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for e in encoded:
            n = length - e["input_ids"].shape[0]
            pieces = {
                "input_ids": (e["input_ids"], torch.full((n,), pad_id, dtype=torch.long)),
                "attention_mask": (torch.ones_like(e["input_ids"]), torch.zeros(n, dtype=torch.long)),
                "labels": (e["labels"], torch.full((n,), IGNORE_INDEX, dtype=torch.long)),
            }
            for key, (real, pad) in pieces.items():
                batch[key].append(torch.cat([real, pad] if self.padding_side == "right" else [pad, real]))
        out = {key: torch.stack(value) for key, value in batch.items()}
        for key in self.IMAGE_KEYS:
            tensors = [e[key] for e in encoded if key in e]
            if tensors:
                out[key] = cat_padded(tensors)
        return out


def cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding dim 1 to the longest (anyres images have different view counts;
    the model reads each image's real views from `image_sizes`, as for the stock processor's batches)."""
    if tensors[0].dim() < 5:
        return torch.cat(tensors)
    views = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, views - t.shape[1])) for t in tensors])


__all__ = [
    "IGNORE_INDEX",
    "MASK_BACKENDS",
    "VOCO_CHAT_TEMPLATE",
    "VOCO_SYSTEM_PROMPT",
    "VOCO_TOKEN",
    "VoCoBounds",
    "VoCoCache",
    "VoCoDataCollator",
    "VoCoDynamicCache",
    "VoCoSegments",
    "add_voco_token",
    "build_voco_attention_mask",
    "build_voco_prompt",
    "build_voco_text_prompt",
    "cache_bytes_per_token",
    "cache_metadata",
    "check_mask_backend",
    "check_voco_groups",
    "freeze_vision_tower",
    "gather_voco_kv",
    "positions_from_padding",
    "rerotate_keys",
    "rotate_half_of",
    "segment_positions",
    "segment_rows",
    "unmask_padding_queries",
    "voco_and_mask_function",
    "voco_bounds",
    "voco_group_text",
    "voco_video_text",
    "voco_group_indices",
    "voco_prompt_segments",
    "voco_reference_mask",
    "voco_segment_mask_function",
    "voco_segments",
    "weights_fingerprint",
]
