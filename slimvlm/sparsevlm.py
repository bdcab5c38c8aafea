"""SparseVLM (Zhang et al., ICML 2025) and SparseVLM+ (v2.0): text-guided visual-token pruning inside the LLM.

Shipped with checkpoints: imports only torch and transformers. Knows nothing about LLaVA: a family module
passes the language model (a Llama-family decoder: `embed_tokens`, `layers`, `norm`, `rotary_emb`), the
decoder input embeddings and the per-sample visual-token mask. Follows specs/sparsevlm.md:

- §2 raters: text tokens whose mean attention from the visual embeddings exceeds the mean (strict '>').
- §3-4 at each prune layer, score visual tokens by the attention of the rater rows (only those rows are
  computed, from that layer's own Q and K), keep the top b_i.
- §5 v1.5 recycles the best 30 % + 1 of the deleted tokens into ⌊n_rec/10⌋ + 1 DPC-KNN cluster means.
- §6-7 the shorter sequence continues; v1.5 renumbers positions contiguously, v2.0 keeps original ids.
  The KV cache is ragged per layer segment (`SparseVLMCache`).

The first half of this file is pure math on small tensors; the second half is the decoder loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache

from .compat import causal_mask, layer_keys, require_attributes, run_decoder_layer
from .configuration_slimvlm import SPARSEVLM_BUDGETS, SPARSEVLM_REFERENCE_TOKENS

# Budget tables are defined for LLaVA-1.5's 576 visual tokens (spec §4); other counts are scaled (§9).
REFERENCE_VISUAL_TOKENS = SPARSEVLM_REFERENCE_TOKENS

NoiseFn = Callable[[int, int, int], torch.Tensor]  # (step, sample, n) -> [n] uniform noise in [0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Schedule arithmetic (spec §4, §5, §9)
# ----------------------------------------------------------------------------------------------------------------


def recycle_sizes(num_deleted: int) -> tuple[int, int]:
    """(n_rec, k): recycled tokens ⌊3·n_del/10⌋ + 1 and clusters ⌊n_rec/10⌋ + 1; (0, 0) when nothing is deleted."""
    if num_deleted <= 0:
        return 0, 0
    recycled = (3 * num_deleted) // 10 + 1
    return recycled, recycled // 10 + 1


def scaled_budgets(compression: dict, visual_tokens: int) -> list[int]:
    """Per-step budgets b_i for a sample with `visual_tokens` visual tokens.

    Table budgets (a preset or explicit `budgets`) are the official numbers at V = 576, scaled as
    max(1, ⌊b·V/576 + ½⌋) (integer arithmetic, so V = 576 reproduces the table exactly); `budget_fractions`
    give max(1, ⌊f·V + ½⌋).
    """
    if compression.get("budget_fractions") is not None:
        return [max(1, math.floor(f * visual_tokens + 0.5)) for f in compression["budget_fractions"]]
    if compression.get("budgets") is not None:
        table = compression["budgets"]
    else:
        table = SPARSEVLM_BUDGETS[compression["version"]][compression["retained_tokens"]]
    ref = REFERENCE_VISUAL_TOKENS
    return [max(1, (2 * b * visual_tokens + ref) // (2 * ref)) for b in table]


def step_counts(visual_tokens: int, budgets: list[int], version: str) -> list[int]:
    """Visual tokens after each prune step (kept + merged for v1.5; kept for v2.0)."""
    counts, current = [], visual_tokens
    for budget in budgets:
        kept = min(budget, current - 1)
        merged = recycle_sizes(current - kept)[1] if version == "1.5" else 0
        current = kept + merged
        counts.append(current)
    return counts


def layer_counts(visual_tokens: int, layers: list[int], counts: list[int], num_layers: int) -> tuple[list[int], list[int]]:
    """(after, processed) per decoder layer.

    after[l] is the number of visual tokens after layer l's step (the ET convention: a prune layer counts its
    post-prune number); processed[l] is the number layer l actually runs on.
    """
    after, processed, current, step = [], [], visual_tokens, 0
    for layer in range(num_layers):
        processed.append(current)
        if step < len(layers) and layer == layers[step]:
            current = counts[step]
            step += 1
        after.append(current)
    return after, processed


@dataclass
class SparseVLMSchedule:
    """The token schedule of one sample (spec §4). `equal_tokens` is the official "ET" metric."""

    visual_tokens: int
    budgets: list[int]
    counts: list[int]
    after: list[int]
    processed: list[int]

    @property
    def equal_tokens(self) -> float:
        return sum(self.after) / len(self.after)

    @property
    def processed_mean(self) -> float:
        return sum(self.processed) / len(self.processed)


def sparsevlm_schedule(compression: dict, visual_tokens: int, num_layers: int) -> SparseVLMSchedule:
    """The planned schedule for `visual_tokens` (V = 0 or unpruned samples: constant V)."""
    budgets = scaled_budgets(compression, visual_tokens) if visual_tokens > 0 else []
    counts = step_counts(visual_tokens, budgets, compression["version"]) if budgets else []
    layers = compression["layers"] if budgets else []
    after, processed = layer_counts(visual_tokens, layers, counts, num_layers)
    return SparseVLMSchedule(visual_tokens, budgets, counts, after, processed)


def sparsevlm_flops(processed_lengths: list[int], hidden_size: int, intermediate_size: int) -> int:
    """The official FLOPs formula summed over layers: 4nd² + 2n²d + 3ndm with n = tokens layer l processes."""
    d, m = hidden_size, intermediate_size
    return sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in processed_lengths)


# ----------------------------------------------------------------------------------------------------------------
# Raters (spec §2)
# ----------------------------------------------------------------------------------------------------------------


def rater_statistic(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """σ [T]: mean over the V visual rows of softmax over the T text columns of E_v·E_tᵀ (no scaling, fp32).

    Args:
        visual_embeds: [V, C] decoder-input embeddings of the visual span.
        text_embeds: [T, C] decoder-input embeddings of the text after it.
    """
    logits = visual_embeds.float() @ text_embeds.float().T  # [V, T]
    return torch.softmax(logits, dim=-1).mean(dim=0)


def raters_from_statistic(sigma: torch.Tensor) -> torch.Tensor:
    """Indices j with σ_j > mean(σ) (strict); all indices when that set is empty [design]."""
    raters = torch.nonzero(sigma > sigma.mean()).squeeze(1)
    if raters.numel() == 0:
        raters = torch.arange(sigma.numel(), device=sigma.device)
    return raters


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Rater indices [R] relative to the first text token."""
    return raters_from_statistic(rater_statistic(visual_embeds, text_embeds))


# ----------------------------------------------------------------------------------------------------------------
# Scoring (spec §4, §8)
# ----------------------------------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style RoPE: x [..., N, D] with cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def rater_row_attention(query: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities of the rater rows only, fp32, causal over one sample's real tokens.

    Memory is O(H·R·L) instead of the O(H·L²) of the full matrix.

    Args:
        query: [H, R, D] RoPE-rotated queries of the rater rows.
        keys: [H_kv, L, D] RoPE-rotated keys of all L real tokens (GQA: each key head serves H/H_kv query heads).
        rows: [R] index of each rater row among the L tokens (its causal limit).
        scaling: the attention module's scaling (D^-½).
    Returns:
        [H, R, L] softmax over keys ≤ row; later keys get exactly 0.
    """
    heads, kv_heads = query.shape[0], keys.shape[0]
    keys = keys.float().repeat_interleave(heads // kv_heads, dim=0)  # same head→group map as repeat_kv
    logits = torch.matmul(query.float(), keys.transpose(1, 2)) * scaling  # [H, R, L]
    future = torch.arange(keys.shape[1], device=keys.device)[None, :] > rows[:, None]  # [R, L]
    logits = logits.masked_fill(future[None], float("-inf"))
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def gravity_weights(cos_rows: torch.Tensor, sin_rows: torch.Tensor, cos_cols: torch.Tensor, sin_cols: torch.Tensor) -> torch.Tensor:
    """SparseVLM+ RoPE gravity W [R, V]: rotated all-ones query · rotated all-ones key / √D (spec §8.1).

    Args: cos/sin [R, D] at the rater rows' positions and [V, D] at the visual columns' positions.
    """
    dim = cos_rows.shape[-1]
    ones_rows = torch.ones_like(cos_rows, dtype=torch.float32)
    ones_cols = torch.ones_like(cos_cols, dtype=torch.float32)
    q = apply_rope(ones_rows, cos_rows.float(), sin_rows.float())
    k = apply_rope(ones_cols, cos_cols.float(), sin_cols.float())
    return (q @ k.T) / math.sqrt(dim)


# The rater-to-visual distances of LLaVA-1.5 prompts (576 visual tokens + the text), where the official v2.0
# was designed and evaluated: W is positive and well above zero there (>= 1.19 at head_dim 128, spec §8.1).
GRAVITY_REFERENCE_DISTANCE = 700
# The floor sits this far (relatively) below that minimum, so float32 rounding never clamps an equal value.
GRAVITY_FLOOR_MARGIN = 1e-3


@dataclass
class GravityRule:
    """How v2.0's division by the RoPE gravity W(Δ) is kept well defined on long prompts (our rule).

    W(Δ) = (2/√D)·Σᵢ cos(Δ·θᵢ) decays and oscillates with the rater-to-visual distance Δ; at head_dim 128 it first
    reaches ≤ 0 at Δ = 1707 (725 at head_dim 64), where the official division is undefined, and it oscillates
    around small values after that. LLaVA-NeXT and video prompts go that far. The rule: below `first_nonpositive`
    the official W is used unchanged (every prompt the official code can score keeps its exact scores); from that
    distance on, W is floored at `floor`, its minimum over the LLaVA-1.5 range Δ ≤ 700 (less a 0.1 % margin), so
    far tokens are corrected as much as the farthest ones the method was designed for, never more.

    first_nonpositive: the first Δ with W(Δ) ≤ 0 within the prompt's distances (None: none, nothing changes).
    floor: > 0, or ≤ 0 when the RoPE already reaches W ≤ 0 inside the LLaVA-1.5 range (then no floor exists and a
        W ≤ 0 that is used still raises, as in the official code).
    """

    first_nonpositive: int | None
    floor: float

    @classmethod
    def for_model(cls, rotary_emb, like: torch.Tensor, max_distance: int) -> "GravityRule":
        span = max(max_distance, GRAVITY_REFERENCE_DISTANCE)
        cos, sin = rotary_emb(like[:1, :1], torch.arange(span + 1, device=like.device)[None])
        table = gravity_weights(cos[0], sin[0], cos[0, :1], sin[0, :1])[:, 0]  # W(Δ), Δ = 0..span
        nonpositive = torch.nonzero(table[: max_distance + 1] <= 0)
        first = int(nonpositive[0]) if nonpositive.numel() else None
        floor = float(table[: GRAVITY_REFERENCE_DISTANCE + 1].min()) * (1 - GRAVITY_FLOOR_MARGIN)
        return cls(first, floor)

    def apply(self, gravity: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """W [R, V] at rater-to-visual `distances` [R, V] -> the W to divide by."""
        if self.first_nonpositive is None or self.floor <= 0:
            return gravity
        return torch.where(distances >= self.first_nonpositive, gravity.clamp(min=self.floor), gravity)


def visual_scores(
    probs: torch.Tensor, version: str, gravity: torch.Tensor | None = None, num_priority_heads: int = 14
) -> torch.Tensor:
    """Score [V] of each visual token from the rater rows × visual columns of the attention.

    v1.5: head mean first, then the mean over raters. v2.0: divide by the gravity W, keep the
    `num_priority_heads` heads with the largest summed attention, then head mean and rater mean.

    Args:
        probs: [H, R, V] attention probabilities (fp32).
        gravity: [R, V] W for v2.0 (must be > 0).
    """
    if version == "1.5":
        return probs.mean(dim=0).mean(dim=0)
    if gravity is None:
        raise ValueError("SparseVLM v2.0 scoring needs the RoPE gravity weights")
    if bool((gravity <= 0).any()):
        raise ValueError(
            "SparseVLM v2.0 RoPE gravity W <= 0 for some rater/visual distance, and this model's RoPE has no positive "
            f"floor over the LLaVA-1.5 distance range (min W = {gravity.min().item():.4f}); use compression version '1.5'"
        )
    corrected = probs / gravity[None]
    heads = min(num_priority_heads, probs.shape[0])
    top = torch.topk(corrected.sum(dim=(1, 2)), heads).indices.sort().values
    return corrected[top].mean(dim=0).mean(dim=0)


# ----------------------------------------------------------------------------------------------------------------
# Recycling: DPC-KNN (spec §5)
# ----------------------------------------------------------------------------------------------------------------


def dpc_knn(tokens: torch.Tensor, num_clusters: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density, as in TCFormer (fp32).

    Args:
        tokens: [n, C] recycled tokens.
        num_clusters: k (also the kNN size; the neighbourhood includes the token itself).
        noise: [n] uniform [0, 1) noise, scaled by 1e-6 to break density ties.
    Returns:
        centres: [k] indices into `tokens`, in descending ρ·δ order (the output order).
        assignment: [n] cluster id (0..k-1) of each token; each centre is assigned to itself.
    """
    y = tokens.float()
    n, width = y.shape
    # Exact pairwise distances (no matmul expansion): self distances are exactly 0, as in the literal formula.
    dist = torch.cdist(y[None], y[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / math.sqrt(width)
    nearest = torch.topk(dist, min(num_clusters, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1)) + noise.to(y.device, torch.float32) * 1e-6
    higher = density[None, :] > density[:, None]  # [i, j]: ρ_j > ρ_i
    dist_max = dist.max()
    delta = torch.where(higher, dist, dist_max).min(dim=-1).values
    centres = torch.topk(density * delta, num_clusters).indices
    assignment = dist[centres].argmin(dim=0)  # first centre wins ties
    assignment[centres] = torch.arange(num_clusters, device=y.device)
    return centres, assignment


def merge_clusters(tokens: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """[k, C] cluster means Σ y_i/(|c| + 1e-6) (each term scaled before summing, as the official code), fp32."""
    y = tokens.float()
    sizes = torch.zeros(num_clusters, device=y.device).index_add_(0, assignment, torch.ones_like(assignment, dtype=torch.float32))
    weights = 1.0 / (sizes[assignment] + 1e-6)
    return torch.zeros(num_clusters, y.shape[1], device=y.device).index_add_(0, assignment, y * weights[:, None])


# ----------------------------------------------------------------------------------------------------------------
# One prune step of one sample
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PruneStep:
    """What one prune step did to one sample. Indices are relative to that step's visual span.

    kept: [K] ascending. recycled: [n_rec] deleted tokens in descending score order (v1.5; empty for v2.0).
    centres: [k] indices into `recycled`, output order. assignment: [n_rec] cluster of each recycled token.
    scores: [V_cur] the visual scores (None when the step was replayed from a plan).
    """

    kept: torch.Tensor
    recycled: torch.Tensor
    centres: torch.Tensor
    assignment: torch.Tensor
    scores: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.kept.numel() + self.centres.numel()


def plan_step(scores: torch.Tensor, budget: int, version: str, visual_outputs: torch.Tensor, noise: torch.Tensor | Callable[[int], torch.Tensor]) -> PruneStep:
    """Choose kept, recycled and clustered tokens from the scores (spec §4-5).

    Args:
        scores: [V] visual scores. budget: b_i. visual_outputs: [V, C] the layer's output at the visual span.
        noise: [n_rec] noise, or a function n -> [n] noise.
    """
    count = scores.numel()
    keep = torch.topk(scores, min(budget, count - 1)).indices.sort().values
    empty = torch.zeros(0, dtype=torch.long, device=scores.device)
    if version != "1.5":
        return PruneStep(keep, empty, empty, empty, scores)
    deleted_mask = torch.ones(count, dtype=torch.bool, device=scores.device)
    deleted_mask[keep] = False
    deleted = torch.nonzero(deleted_mask).squeeze(1)  # ascending
    num_recycled, num_clusters = recycle_sizes(deleted.numel())
    if num_recycled == 0:
        return PruneStep(keep, empty, empty, empty, scores)
    recycled = deleted[torch.topk(scores[deleted], num_recycled).indices]  # descending score
    noise = noise(num_recycled) if callable(noise) else noise
    centres, assignment = dpc_knn(visual_outputs[recycled], num_clusters, noise)
    return PruneStep(keep, recycled, centres, assignment, scores)


# ----------------------------------------------------------------------------------------------------------------
# Ragged KV cache
# ----------------------------------------------------------------------------------------------------------------


class SparseVLMCache(DynamicCache):
    """A `DynamicCache` whose layer segments hold different (left-padded) lengths after pruning.

    Besides K/V it keeps, per segment, the 2-D padding mask of what that segment's layers have cached, so
    decoding can build per-segment masks and (v1.5) per-segment positions. Beam reordering and batch
    expansion apply to these masks too.

    Attributes:
        segment_starts: first decoder layer of each segment (segment s spans layers [starts[s], starts[s+1])).
        segment_masks: per segment a [B, S_s] bool mask (True = real token) of the cached slots.
        version: "1.5" (positions continue each segment's own count) or "2.0" (original positions).
        report: the `SparseVLMReport` of the prefill that filled this cache.
    """

    def __init__(self, config, segment_starts: list[int], version: str):
        super().__init__(config=config)
        self.segment_starts = list(segment_starts)
        self.segment_masks: list[torch.Tensor] = []
        self.version = version
        self.report: SparseVLMReport | None = None

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.segment_masks = [m.index_select(0, beam_idx.to(m.device)) for m in self.segment_masks]

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.segment_masks = [m.repeat_interleave(repeats, dim=0) for m in self.segment_masks]

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.segment_masks = [m[indices] for m in self.segment_masks]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SparseVLMCache cannot be cropped: its layer segments hold different token sets")


# ----------------------------------------------------------------------------------------------------------------
# The decoder loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SparseVLMReport:
    """What a SparseVLM prefill kept, per sample (lists indexed by batch position).

    visual_tokens: V per sample (0: no image, not pruned).
    layer_counts: per sample, visual tokens after each layer's step (ET convention).
    processed_counts: per sample, visual tokens each layer ran on.
    equal_tokens / processed_mean: per sample means of the two lists over the decoder depth.
    raters: per sample [R] rater indices relative to the first text token (None when not pruned).
    steps: per sample the `PruneStep` of each prune layer (empty when not pruned).
    kv_lengths: per decoder layer, the padded cache length; real_kv_lengths: per sample, per layer.
    """

    visual_tokens: list[int]
    layer_counts: list[list[int]]
    processed_counts: list[list[int]]
    raters: list[torch.Tensor | None]
    steps: list[list[PruneStep]]
    kv_lengths: list[int] = field(default_factory=list)
    real_kv_lengths: list[list[int]] = field(default_factory=list)

    @property
    def equal_tokens(self) -> list[float]:
        return [sum(c) / len(c) for c in self.layer_counts]

    @property
    def processed_mean(self) -> list[float]:
        return [sum(c) / len(c) for c in self.processed_counts]


def visual_spans(visual_mask: torch.Tensor, attention_mask: torch.Tensor) -> list[tuple[int, int] | None]:
    """Per sample (first, count) of the one contiguous visual span among its real tokens, or None.

    Args: visual_mask, attention_mask: [B, L] bool. Raises ValueError for a non-contiguous span.
    """
    spans = []
    for b in range(visual_mask.shape[0]):
        slots = torch.nonzero(visual_mask[b]).squeeze(1)
        if slots.numel() == 0:
            spans.append(None)
            continue
        first, last = int(slots[0]), int(slots[-1])
        if last - first + 1 != slots.numel() or not bool(attention_mask[b, first : last + 1].all()):
            raise ValueError(
                f"SparseVLM needs one contiguous visual span per sample; sample {b} has {slots.numel()} visual "
                f"tokens spread over slots {first}..{last} (more than one image, or padding inside the span). "
                "Use one image per prompt."
            )
        spans.append((first, slots.numel()))
    return spans


def _segment_starts(layers: list[int]) -> list[int]:
    return [0] + [layer + 1 for layer in layers]


def _segment_mask(language_model, hidden: torch.Tensor, mask2d: torch.Tensor, cache: DynamicCache, layer_idx: int):
    """The library's 4-D causal mask for one segment (sized from that segment's own cache layer)."""
    return causal_mask(language_model.config, hidden, mask2d, cache, position_ids=None, layer_idx=layer_idx)


def _run_layer(layer, hidden, mask, cos_sin, positions, cache, kwargs):
    # M-RoPE positions [3, B, L] live in cos/sin; the layer gets no 1-D position_ids then (as the stock Qwen-VL
    # text model passes none for 3-row positions).
    return run_decoder_layer(layer, hidden, cache=cache, attention_mask=mask,
                             position_ids=positions if positions.ndim == 2 else None,
                             position_embeddings=cos_sin, **kwargs)


def mrope_positions(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """[3, B, L] M-RoPE rows (t, h, w) of `position_ids` ([3, B, L], or generate's [4, B, L] with a leading text
    row), None for 1-D positions. Survivors keep their original 3-D ids (specs/modern_families.md §6.1)."""
    if position_ids is None or position_ids.ndim != 3:
        return None
    return position_ids[-3:]


def _rater_queries(layer, hidden_rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[H, R, D] RoPE-rotated queries of some rows of one sample, from the layer's own modules (any weights type)."""
    attention = layer.self_attn
    query = attention.q_proj(layer.input_layernorm(hidden_rows))
    query = query.view(hidden_rows.shape[0], -1, attention.head_dim)
    if getattr(attention, "q_norm", None) is not None:
        query = attention.q_norm(query)
    return apply_rope(query.transpose(0, 1), cos[None], sin[None])


def _pack_left(sequences: list[torch.Tensor], positions: list[torch.Tensor], like: torch.Tensor):
    """Left-pad per-sample [L_b, C] sequences to [B, S, C] with a [B, S] mask and [B, S] positions ([3, B, S]
    for M-RoPE positions [3, L_b])."""
    length = max(s.shape[0] for s in sequences)
    batch = len(sequences)
    hidden = like.new_zeros(batch, length, like.shape[-1])
    mask = torch.zeros(batch, length, dtype=torch.bool, device=like.device)
    pos = torch.zeros(*positions[0].shape[:-1], batch, length, dtype=torch.long, device=like.device)
    for b, (seq, p) in enumerate(zip(sequences, positions)):
        hidden[b, length - seq.shape[0] :] = seq
        mask[b, length - seq.shape[0] :] = True
        pos[..., b, length - seq.shape[0] :] = p
    return hidden, mask, pos


class VisualInjections:
    """Per-layer rows added to the visual tokens (DeepStack), followed through SparseVLM's pruning.

    Per sample, `maps[b]` [V_current, V_original] (None: the identity, nothing pruned yet) says which mix of the
    sample's original rows each current visual token carries; `slots[b]` are its visual slots in the current hidden.
    """

    def __init__(self, levels: list[torch.Tensor], visual_mask: torch.Tensor, mask2d: torch.Tensor):
        counts = visual_mask.sum(-1).tolist()
        offsets = [0]
        for count in counts:
            offsets.append(offsets[-1] + count)
        self.rows = [[level[offsets[b]: offsets[b + 1]] for b in range(len(counts))] for level in levels]
        self.slots = [torch.nonzero(visual_mask[b]).squeeze(1) for b in range(len(counts))]
        # Each sample's visual slots counted from its first real token (they move when a batch is re-packed).
        first_real = mask2d.long().argmax(dim=-1)
        self.offsets = [slots - first_real[b] for b, slots in enumerate(self.slots)]
        self.maps: list[torch.Tensor | None] = [None] * len(counts)

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """hidden after decoder layer `layer`, with that level's rows added at the visual slots (as stock)."""
        if layer >= len(self.rows):
            return hidden
        hidden = hidden.clone()
        for b, slots in enumerate(self.slots):
            if slots.numel() == 0:
                continue
            rows = self.rows[layer][b].to(hidden.device)
            if self.maps[b] is not None:
                rows = self.maps[b].to(rows.device) @ rows.float()
            hidden[b, slots] = hidden[b, slots] + rows.to(hidden.dtype)
        return hidden

    def prune(self, b: int, chosen: "PruneStep") -> None:
        """Sample b's visual tokens became [kept; recycled clusters]: so do their row mixes."""
        current = self.maps[b]
        if current is None:
            current = torch.eye(self.slots[b].numel(), device=chosen.kept.device)
        parts = [current[chosen.kept]]
        if chosen.centres.numel():
            parts.append(merge_clusters(current[chosen.recycled], chosen.assignment, chosen.centres.numel()))
        self.maps[b] = torch.cat(parts)

    def locate(self, mask2d: torch.Tensor, layout) -> None:
        """The visual slots after a left-packing: [prefix v0 | visual count | text] among each row's real tokens."""
        length = mask2d.shape[1]
        for b, entry in enumerate(layout):
            start = length - int(mask2d[b].sum())
            if self.maps[b] is None:  # not pruned (no span, or nothing to rate with): same slots, re-packed
                self.slots[b] = start + self.offsets[b]
                continue
            v0, count, _ = entry
            self.slots[b] = torch.arange(start + v0, start + v0 + count, device=mask2d.device)


def sparsevlm_prefill(
    language_model,
    inputs_embeds: torch.Tensor,
    visual_mask: torch.Tensor,
    compression: dict,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    plan: list[list[PruneStep]] | None = None,
    noise: NoiseFn | None = None,
    visual_injections: list[torch.Tensor] | None = None,
    **layer_kwargs,
) -> tuple[torch.Tensor, SparseVLMCache, SparseVLMReport]:
    """Run a Llama-family decoder over a prompt, pruning visual tokens after the configured layers.

    Uses the model's own `layers`, `norm` and `rotary_emb` on its configured attention backend. Per sample:
    the visual span comes from `visual_mask`; raters, scores, budgets and kept sets are independent.

    Args:
        language_model: e.g. `LlamaModel` (`layers`, `norm`, `rotary_emb`, `config`).
        inputs_embeds: [B, L, C] decoder input (visual features already scattered in).
        visual_mask: [B, L] bool, True at visual tokens (one contiguous span per sample, or none).
        compression: the normalised SparseVLM compression dict.
        attention_mask: [B, L] 2-D padding mask (1 = real); None = no padding.
        position_ids: [B, L]; default cumsum(mask) - 1 (left-padding safe). M-RoPE models (Qwen-VL): [3, B, L]
            (or [4, B, L] with a text row first); survivors, also under v1.5, keep their original 3-D ids and a
            recycled token takes its cluster centre's.
        plan: replay these steps (per sample) instead of scoring, e.g. for a cache-free reference loop.
        noise: (step, sample, n) -> [n] DPC-KNN noise; default: a generator seeded with
            `compression["seed"]` and the step (batch-position independent, the global RNG is untouched).
        visual_injections: DeepStack (Qwen3-VL): level j, [N_visual, C] rows in placeholder order over the batch,
            is added to the visual tokens' hidden states after decoder layer j, as the stock text model does. At a
            prune layer the add comes before the pruning (scores are that layer's attention, unaffected); later
            levels follow the survivors: a kept token keeps its row, a recycled cluster takes the same weighted
            mean of rows as its hidden state (specs/modern_families.md §6.1).
    Returns:
        hidden: [B, S_last, C] final-normed hidden states, left-padded (the last slot is each sample's last token).
        cache: the filled `SparseVLMCache`.
        report: `SparseVLMReport`.
    """
    require_attributes(language_model, ("layers", "norm", "rotary_emb", "config"), "SparseVLM")
    require_attributes(language_model.layers[0], ("input_layernorm", "self_attn.q_proj", "self_attn.head_dim",
                                                  "self_attn.scaling", "self_attn.layer_idx"), "SparseVLM")
    config = language_model.config
    num_layers = len(language_model.layers)
    layers = list(compression["layers"])
    version = compression["version"]
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if attention_mask is None:
        mask2d = torch.ones(batch, length, dtype=torch.bool, device=device)
    else:
        mask2d = attention_mask.to(device=device, dtype=torch.bool)
    if position_ids is None:
        position_ids = (mask2d.long().cumsum(-1) - 1).clamp(min=0)
    mrope = mrope_positions(position_ids)
    positions = mrope.to(device) if mrope is not None else position_ids.to(device).expand(batch, -1)
    visual_mask = visual_mask.to(device=device, dtype=torch.bool)
    spans = visual_spans(visual_mask, mask2d)
    starts = _segment_starts(layers)
    cache = SparseVLMCache(config, starts, version)

    if noise is None:
        seed = compression.get("seed", 0)

        def noise(step: int, sample: int, n: int) -> torch.Tensor:
            generator = torch.Generator(device="cpu").manual_seed(seed * 1009 + step)
            return torch.rand(n, generator=generator)

    # Per sample, in terms of its real tokens: [prefix v0 | visual V | text T].
    real_counts = mask2d.sum(-1).tolist()
    layout: list[tuple[int, int, int] | None] = []
    raters: list[torch.Tensor | None] = []
    for b, span in enumerate(spans):
        if span is None:
            layout.append(None)
            raters.append(None)
            continue
        first_real = int(mask2d[b, : span[0]].sum())
        v0, v = first_real, span[1]
        t = real_counts[b] - v0 - v
        if t <= 0:
            layout.append(None)  # no text after the image: nothing to rate with (spec §2)
            raters.append(None)
            continue
        real = inputs_embeds[b][mask2d[b]]
        layout.append((v0, v, t))
        raters.append(plan_raters(real, v0, v) if plan is None else None)
    budgets = [scaled_budgets(compression, lay[1]) if lay else [] for lay in layout]
    counts_per_step: list[list[int]] = [[] for _ in range(batch)]
    steps: list[list[PruneStep]] = [[] for _ in range(batch)]
    if version == "2.0" and plan is None:
        gravity_rule = GravityRule.for_model(language_model.rotary_emb, inputs_embeds, int(positions.max()))

    injections = VisualInjections(visual_injections, visual_mask, mask2d) if visual_injections else None
    hidden = inputs_embeds
    for segment, start in enumerate(starts):
        end = starts[segment + 1] if segment + 1 < len(starts) else num_layers
        cache.segment_masks.append(mask2d)
        if start < end:  # the segment after a prune at the last layer has no layers
            mask4d = _segment_mask(language_model, hidden, mask2d, cache, start)
            cos, sin = language_model.rotary_emb(hidden, positions)
        for index in range(start, end):
            layer = language_model.layers[index]
            layer_input = hidden
            hidden = _run_layer(layer, hidden, mask4d, (cos, sin), positions, cache, layer_kwargs)
            if injections is not None:
                hidden = injections.add(index, hidden)
        if segment + 1 == len(starts):
            break
        prune_layer = end - 1
        step = segment
        sequences, new_positions = [], []
        keys_all = layer_keys(cache, prune_layer)[0]  # [B, H_kv, S, D]: this layer's rotated keys, all current tokens
        for b in range(batch):
            real = mask2d[b]
            seq, pos = hidden[b][real], positions[..., b, :][..., real]  # pos [n] or [3, n]
            if layout[b] is None:
                sequences.append(seq)
                new_positions.append(pos)
                continue
            v0, v, t = layout[b]
            visual_out = seq[v0 : v0 + v]
            if plan is not None:
                chosen = plan[b][step]
            else:
                rows = v0 + v + raters[b]
                layer = language_model.layers[prune_layer]
                rc, rs = cos[b][real][rows], sin[b][real][rows]
                query = _rater_queries(layer, layer_input[b][real][rows], rc, rs)
                keys = keys_all[b][:, real]
                probs = rater_row_attention(query, keys, rows, layer.self_attn.scaling)[:, :, v0 : v0 + v]
                gravity = None
                if version == "2.0":
                    vc, vs = cos[b][real][v0 : v0 + v], sin[b][real][v0 : v0 + v]
                    distances = pos[..., rows, None] - pos[..., None, v0 : v0 + v]
                    distances = distances.amax(dim=0) if mrope is not None else distances  # the farthest axis
                    gravity = gravity_rule.apply(gravity_weights(rc, rs, vc, vs), distances)
                scores = visual_scores(probs, version, gravity, compression.get("num_priority_heads", 14))
                chosen = plan_step(scores, budgets[b][step], version, visual_out, lambda n, b=b: noise(step, b, n))
            steps[b].append(chosen)
            if injections is not None:
                injections.prune(b, chosen)
            parts = [seq[:v0], visual_out[chosen.kept]]
            if chosen.centres.numel():
                merged = merge_clusters(visual_out[chosen.recycled], chosen.assignment, chosen.centres.numel())
                parts.append(merged.to(seq.dtype))
            parts.append(seq[v0 + v :])
            new_seq = torch.cat(parts)
            if version == "1.5" and mrope is None:
                new_pos = torch.arange(new_seq.shape[0], device=device)
            else:
                visual_pos = pos[..., v0 : v0 + v]
                new_pos = torch.cat([pos[..., :v0], visual_pos[..., chosen.kept],
                                     visual_pos[..., chosen.recycled[chosen.centres]], pos[..., v0 + v :]], dim=-1)
            sequences.append(new_seq)
            new_positions.append(new_pos)
            layout[b] = (v0, chosen.count, t)
            counts_per_step[b].append(chosen.count)
        hidden, mask2d, positions = _pack_left(sequences, new_positions, hidden)
        if injections is not None:
            injections.locate(mask2d, layout)

    hidden = language_model.norm(hidden)
    report = _make_report(spans, layout, raters, steps, counts_per_step, layers, num_layers, cache)
    cache.report = report
    return hidden, cache, report


def plan_raters(real_embeds: torch.Tensor, v0: int, v: int) -> torch.Tensor:
    """Raters of one sample from its real-token embeddings [L, C] laid out [prefix v0 | visual v | text]."""
    return select_raters(real_embeds[v0 : v0 + v], real_embeds[v0 + v :])


def _make_report(spans, layout, raters, steps, counts_per_step, layers, num_layers, cache) -> SparseVLMReport:
    visual, after_all, processed_all, real_kv = [], [], [], []
    starts = cache.segment_starts
    for b, span in enumerate(spans):
        v = span[1] if span is not None else 0
        pruned = bool(counts_per_step[b])
        after, processed = layer_counts(v, layers if pruned else [], counts_per_step[b], num_layers)
        visual.append(v)
        after_all.append(after)
        processed_all.append(processed)
        per_segment = [int(m[b].sum()) for m in cache.segment_masks]
        real_kv.append([per_segment[_segment_of(layer, starts)] for layer in range(num_layers)])
    kv = [layer_keys(cache, layer)[0].shape[-2] for layer in range(num_layers)]
    return SparseVLMReport(visual, after_all, processed_all, raters, steps, kv, real_kv)


def _segment_of(layer: int, starts: list[int]) -> int:
    return sum(1 for s in starts if s <= layer) - 1


def sparsevlm_decode(
    language_model,
    inputs_embeds: torch.Tensor,
    cache: SparseVLMCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **layer_kwargs,
) -> torch.Tensor:
    """Continue after a SparseVLM prefill: new tokens attend to each segment's ragged cache. No pruning.

    Positions: v1.5 uses each segment's own count of cached real tokens per sample plus the offset of the new
    token (spec §7); v2.0 uses `position_ids` (the original numbering). No host synchronisation.

    Args:
        inputs_embeds: [B, q, C] new tokens. attention_mask: [B, past + q] (only its last q columns are read).
    Returns: [B, q, C] final-normed hidden states.
    """
    batch, q, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if attention_mask is None:
        new_mask = torch.ones(batch, q, dtype=torch.bool, device=device)
    else:
        new_mask = attention_mask[:, -q:].to(device=device, dtype=torch.bool)
    offsets = new_mask.long().cumsum(-1) - 1  # [B, q]
    mrope = mrope_positions(position_ids)  # M-RoPE: the given (original) positions in every segment
    if cache.version != "1.5" and position_ids is None:
        position_ids = (cache.segment_masks[0].long().sum(-1, keepdim=True) + offsets).clamp(min=0)
    starts = cache.segment_starts
    num_layers = len(language_model.layers)
    hidden = inputs_embeds
    for segment, start in enumerate(starts):
        end = starts[segment + 1] if segment + 1 < len(starts) else num_layers
        past_mask = cache.segment_masks[segment]
        mask2d = torch.cat([past_mask, new_mask], dim=-1)
        cache.segment_masks[segment] = mask2d
        if start >= end:
            continue
        if mrope is not None:
            positions = mrope.to(device)
        elif cache.version == "1.5":
            positions = (past_mask.long().sum(-1, keepdim=True) + offsets).clamp(min=0)
        else:
            positions = position_ids.to(device).expand(batch, -1)
        mask4d = _segment_mask(language_model, hidden, mask2d, cache, start)
        cos_sin = language_model.rotary_emb(hidden, positions)
        for index in range(start, end):
            hidden = _run_layer(language_model.layers[index], hidden, mask4d, cos_sin, positions, cache, layer_kwargs)
    return language_model.norm(hidden)
