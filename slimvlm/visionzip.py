"""VisionZip (Yang et al., CVPR 2025): dominant + contextual visual tokens, before the projector.

Pure tensor code; knows nothing about LLaVA. Shipped with checkpoints (imports torch only).
Follows specs/visionzip.md: score = CLS attention row of encoder layer L-2 summed over heads;
keep CLS + the (d-1) best patches; merge the rest into c contextual tokens by key similarity.
Towers without a CLS token (SigLIP; specs/modern_families.md §4): score = the attention each patch
*receives*, head-averaged, at the layer whose output becomes the features (`attention_received`); d then
counts patches only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionZipSelection:
    """What VisionZip kept for a batch of views.

    tokens: [B, d + c, C] — CLS, dominant patches (ascending position), contextual tokens (target order).
    dominant_indices: [B, d] — token indices in the official order: 0 (CLS), then patches by descending score.
    target_indices: [B, c] — token indices of the contextual merge targets (ascending).
    """

    tokens: torch.Tensor
    dominant_indices: torch.Tensor
    target_indices: torch.Tensor


def cls_attention_and_keys(layer: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS attention row and head-averaged keys of one CLIP encoder layer, without its attention map.

    Calls the layer's own `layer_norm1`, `q_proj` and `k_proj`, so it works on any attention backend and
    with quantised weights; only the CLS query row is computed (O(H·N), not O(H·N²)).

    Args:
        layer: a CLIP-style encoder layer (`layer_norm1`, `self_attn.{q_proj,k_proj,num_heads,head_dim,scale}`).
        hidden_states: [B, N, C] input of that layer, CLS at index 0.
    Returns:
        scores: [B, N - 1] CLS attention to each patch, summed over heads (softmax over all N keys).
        mean_keys: [B, N, Dh] keys averaged over heads (with bias, before scaling).
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    normed = layer.layer_norm1(hidden_states)
    query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, Dh]
    keys = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)  # [B, H, N, Dh]
    logits = torch.matmul(query, keys.transpose(2, 3)) * attention.scale  # [B, H, 1, N]
    # Same numerics as transformers' eager attention: softmax in fp32, then back to the compute dtype.
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    scores = probs.sum(dim=1)[:, 0, 1:]
    return scores, keys.mean(dim=1)


# Bytes of one chunk of attention probabilities in `attention_received` (specs/modern_families.md §5).
ATTENTION_CHUNK_BYTES = 256 * 2**20


def attention_received_sum(query: torch.Tensor, key: torch.Tensor, scale: float,
                           chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> torch.Tensor:
    """Σ_h Σ_i softmax_j(q·kᵀ·scale)[i, j]: the softmax columns summed over heads and queries, in fp32.

    Streams query chunks against all keys, so no [H, N, N] map is ever held (chunk: at most `chunk_bytes` of
    probabilities, and at least 64 queries); no attention mask (the given tokens attend to each other whole).

    Args:
        query, key: [B, H, N, Dh] queries and keys (before scaling).
        scale: the attention's logit scale (Dh^-1/2).
    Returns:
        [B, N] fp32 sums.
    """
    query, key = query.float(), key.float().transpose(2, 3)
    batch, heads, length, _ = query.shape
    chunk = max(64, chunk_bytes // (4 * batch * heads * length))
    received = torch.zeros(batch, length, dtype=torch.float32, device=query.device)
    for start in range(0, length, chunk):
        probs = torch.matmul(query[:, :, start:start + chunk], key).mul_(scale)  # [B, H, C, N] logits
        probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()  # the softmax in place: one chunk buffer
        probs.div_(probs.sum(dim=-1, keepdim=True))
        received += probs.sum(dim=(1, 2))
    return received


def attention_received(query: torch.Tensor, key: torch.Tensor, scale: float,
                       chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> torch.Tensor:
    """Attention each token receives, averaged over heads and queries: s_j = (1/(H·N)) Σ_h Σ_i softmax_j(q·kᵀ·scale)[i, j].

    The score of a tower without a CLS token (specs/modern_families.md §4), chunked (`attention_received_sum`).

    Args:
        query, key: [B, H, N, Dh] the layer's queries and keys (before scaling).
        scale: the attention's logit scale (Dh^-1/2).
    Returns:
        [B, N] fp32 scores; each row sums to 1.
    """
    heads, length = query.shape[1], query.shape[2]
    return attention_received_sum(query, key, scale, chunk_bytes) / (heads * length)


def received_attention_and_keys(layer: nn.Module, hidden_states: torch.Tensor,
                                chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_received` and head-averaged keys of one ViT encoder layer without a CLS token (SigLIP).

    Calls the layer's own `layer_norm1`, `q_proj` and `k_proj` (biases included), so it works on any
    attention backend and never asks the tower for `output_attentions`.

    Args:
        layer: a CLIP/SigLIP-style encoder layer (`layer_norm1`, `self_attn.{q_proj,k_proj,num_heads,head_dim,scale}`).
        hidden_states: [B, N, C] input of that layer (patches only).
    Returns:
        scores: [B, N] fp32 attention received per patch; mean_keys: [B, N, Dh] keys averaged over heads.
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    normed = layer.layer_norm1(hidden_states)
    query = attention.q_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    keys = attention.k_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    return attention_received(query, keys, attention.scale, chunk_bytes), keys.mean(dim=1)


def visionzip_select(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int,
    cls: bool = True,
) -> VisionZipSelection:
    """Steps 1–3 of specs/visionzip.md §3 for a batch of independent views.

    Args:
        features: [B, N, C] output of the scoring layer (CLS at 0, unless `cls` is False).
        scores: [B, N - 1] patch scores (CLS attention, heads summed); [B, N] when `cls` is False.
        keys: [B, N, Dh] head-averaged keys of the scoring layer.
        dominant: d, dominant tokens including CLS (>= 1); patches only when `cls` is False.
        contextual: c, merged tokens (>= 1); d + c <= N.
        cls: token 0 is a CLS token, always kept (False: a tower without CLS, every token is a patch and
            `dominant_indices` are the top-d patches).
    """
    batch, length, width = features.shape
    if not 1 <= dominant or not 1 <= contextual or dominant + contextual > length:
        raise ValueError(
            f"VisionZip needs dominant >= 1, contextual >= 1 and dominant + contextual <= {length} tokens per view; "
            f"got dominant={dominant}, contextual={contextual}"
        )
    device = features.device
    if cls:
        top = torch.topk(scores, dominant - 1, dim=1).indices + 1  # torch.topk order, as the official op
        dominant_indices = torch.cat([torch.zeros(batch, 1, dtype=top.dtype, device=device), top], dim=1)
    else:
        dominant_indices = torch.topk(scores, dominant, dim=1).indices

    is_dominant = torch.zeros(batch, length, dtype=torch.bool, device=device)
    is_dominant.scatter_(1, dominant_indices, True)
    # A stable sort of the flags lists the kept positions after the others, each group in ascending order:
    # no host sync, no ragged nonzero().
    order = torch.argsort(is_dominant.to(torch.int8), dim=1, stable=True)
    remaining = length - dominant
    rest_positions, dominant_positions = order[:, :remaining], order[:, remaining:]  # R, D (both ascending)

    def gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return source.gather(1, index.unsqueeze(-1).expand(-1, -1, source.shape[-1]))

    dominant_tokens = gather(features, dominant_positions)

    # Targets are a stride over the ORDER of R (not over the 2-D grid); the rest merge into them.
    step = max(1, remaining // contextual)
    target_ranks = torch.arange(0, remaining, step, device=device)[:contextual]
    is_target = torch.zeros(remaining, dtype=torch.bool, device=device)
    is_target[target_ranks] = True
    merge_ranks = torch.nonzero(~is_target).squeeze(1)

    rest_keys = gather(keys, rest_positions)
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)  # plain division, as the official code
    rest_features = gather(features, rest_positions)
    target_keys, merge_keys = rest_keys[:, target_ranks], rest_keys[:, merge_ranks]
    target_features, merge_features = rest_features[:, target_ranks], rest_features[:, merge_ranks]

    assignment = torch.bmm(merge_keys, target_keys.transpose(1, 2)).argmax(dim=2)  # first maximum wins ties
    # One-hot counts and a batched matmul in the feature dtype, as the official merge (equal to gather/index_add
    # up to rounding); a target nobody joins stays as it is.
    one_hot = torch.zeros(batch, merge_ranks.numel(), contextual, dtype=features.dtype, device=device)
    one_hot.scatter_(2, assignment.unsqueeze(-1), 1)
    counts = one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)  # [B, c, 1]
    contextual_tokens = target_features + torch.bmm(one_hot.transpose(1, 2), merge_features) / counts

    tokens = torch.cat([dominant_tokens, contextual_tokens], dim=1).to(features.dtype)
    return VisionZipSelection(tokens, dominant_indices, rest_positions[:, target_ranks])


def single_feature_layer(vision_feature_layer):
    """The one layer index VisionZip scores at: an int, or a one-element list (`[-2]`) as the stock classes accept.

    A list of several layers raises ValueError (stock LLaVA concatenates them; there is no single CLS row).
    """
    if isinstance(vision_feature_layer, (list, tuple)) and len(vision_feature_layer) == 1:
        return vision_feature_layer[0]
    if isinstance(vision_feature_layer, (list, tuple)):
        raise ValueError(
            f"VisionZip needs a single vision_feature_layer, got the list {list(vision_feature_layer)}; "
            "multi-layer feature concatenation has no single CLS attention row to score with"
        )
    return vision_feature_layer


def resolve_feature_layer(vision_feature_layer, num_layers: int) -> int:
    """0-based encoder layer whose output is `hidden_states[vision_feature_layer]` (-2 -> layer L-2)."""
    vision_feature_layer = single_feature_layer(vision_feature_layer)
    if num_layers < 2:
        raise ValueError(f"VisionZip needs a vision encoder with at least 2 layers, this one has {num_layers}")
    if not -(num_layers + 1) <= vision_feature_layer <= num_layers:
        # hidden_states has num_layers + 1 entries; a modulo would silently pick some other layer.
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} is out of range for a vision encoder with {num_layers} layers "
            f"(allowed {-(num_layers + 1)}..{num_layers}, as indices into its hidden_states)"
        )
    index = vision_feature_layer % (num_layers + 1)
    if index == 0:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} selects the embeddings, which have no attention to score with"
        )
    return index - 1


def encode_with_visionzip(
    vision_tower: nn.Module, pixel_values: torch.Tensor, feature_layer: int, dominant: int, contextual: int,
    transform=None, cls: bool = True,
) -> VisionZipSelection:
    """Run a CLIP vision tower up to `feature_layer` (0-based) and apply VisionZip to its output.

    The tower's own embeddings, pre-layernorm and encoder layers run on their configured attention
    backend; layers after `feature_layer` are skipped (their output is never used).
    transform: optional [B, N, C] -> [B, N, C] applied to the layer's output before selection (Mini-Gemini mines
        high-resolution detail into the patches there); the scores and keys stay the CLIP layer's.
    cls: False for a tower without CLS (SigLIP): scores are `received_attention_and_keys` of `feature_layer`
        itself (the layer whose output becomes the features), and d counts patches.
    """
    embeddings = getattr(vision_tower, "embeddings", None)
    if cls and getattr(embeddings, "class_embedding", None) is None:
        raise ValueError(
            f"VisionZip scores patches by CLS attention, but the vision tower {type(vision_tower).__name__} "
            "has no CLS token at index 0 (e.g. SigLIP); use a CLIP-style tower or another method"
        )
    hidden_states = embeddings(pixel_values)
    if getattr(vision_tower, "pre_layrnorm", None) is not None:
        hidden_states = vision_tower.pre_layrnorm(hidden_states)
    score = cls_attention_and_keys if cls else received_attention_and_keys
    for index, layer in enumerate(vision_tower.encoder.layers[: feature_layer + 1]):
        if index == feature_layer:
            scores, keys = score(layer, hidden_states)
        hidden_states = layer(hidden_states, None)
    if transform is not None:
        hidden_states = transform(hidden_states)
    return visionzip_select(hidden_states, scores, keys, dominant, contextual, cls=cls)


def visionzip_from_hidden_states(
    vision_tower: nn.Module, hidden_states: tuple[torch.Tensor, ...], feature_layer: int, dominant: int, contextual: int,
    transform=None, cls: bool = True,
) -> VisionZipSelection:
    """VisionZip on a full tower run's `hidden_states` (embeddings output, then each layer's output).

    Same numbers as `encode_with_visionzip`; used when the caller asked for the tower's hidden states or
    attentions, so the whole tower runs anyway. `transform`, `cls`: as in `encode_with_visionzip`.
    """
    score = cls_attention_and_keys if cls else received_attention_and_keys
    scores, keys = score(vision_tower.encoder.layers[feature_layer], hidden_states[feature_layer])
    features = hidden_states[feature_layer + 1]
    if transform is not None:
        features = transform(features)
    return visionzip_select(features, scores, keys, dominant, contextual, cls=cls)


# ---- Variable-size, no-CLS towers with a merger (Qwen2.5-VL, Qwen3-VL; specs/modern_families.md §3, §5) ----
#
# A view (one image, or one temporal step of a video) is n merge units of 4 patches each. The score of a patch is
# the attention it *receives* in the scoring block (head-averaged, summed over queries, softmax per segment), a
# unit's score is the mean of its 4 patches, and the selection runs on the merged (post-merger) rows.

def visionzip_counts(units: int, dominant_ratio: float, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) kept for a view of `units` merged tokens, as the official Qwen2.5-VL code counts them.

    d = max(1, int(ρ_d·n)), c = max(1, int(ρ_c·n)) in Python floats; when d + c >= n every unit is kept,
    returned as (n, 0). Shared by the processor (placeholders) and the model (features).
    """
    dominant = max(1, int(dominant_ratio * units))
    contextual = max(1, int(contextual_ratio * units))
    if dominant + contextual >= units:
        return units, 0
    return dominant, contextual


def segmented_attention_received(query: torch.Tensor, key: torch.Tensor, cu_seqlens,
                                 chunk_bytes: int = ATTENTION_CHUNK_BYTES) -> torch.Tensor:
    """Attention each token receives, averaged over heads: s_j = (1/H) Σ_h Σ_i softmax_j(q_h·k_hᵀ/√Dh)[i, j].

    The softmax runs within each segment `cu_seqlens[s]:cu_seqlens[s+1]` (no attention across segments), in fp32,
    over query chunks of at most `chunk_bytes` ([H, C, N_seg] at a time; `attention_received_sum`): the N x N map
    is never materialised.

    Args:
        query, key: [N, H, Dh] (after RoPE), any dtype.
        cu_seqlens: [S + 1] segment boundaries (tensor or list), 0 ... N.
    Returns:
        [N] fp32 scores.
    """
    heads, head_dim = query.shape[1], query.shape[2]
    q = query.transpose(0, 1)[None]  # [1, H, N, Dh]
    k = key.transpose(0, 1)[None]
    received = torch.zeros(q.shape[2], dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            received[start:end] = attention_received_sum(q[:, :, start:end], k[:, :, start:end], head_dim**-0.5,
                                                         chunk_bytes)[0]
    return received / heads


def unit_scores_and_keys(received: torch.Tensor, keys: torch.Tensor, unit_order: torch.Tensor | None = None,
                         patches_per_unit: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per merge unit: the mean score of its patches and its head-averaged mean key, in raster unit order.

    Args:
        received: [P] patch scores (`attention_received`), P = 4n, the 4 patches of a unit contiguous.
        keys: [P, H, Dh] the scoring block's keys (after RoPE).
        unit_order: [n] the tower's unit permutation (`hidden = units[unit_order]`, Qwen2.5's window index), or
            None when rows are already in raster order; it is undone here.
    Returns:
        scores [n] (fp32), keys [n, Dh].
    """
    scores = received.view(-1, patches_per_unit).mean(dim=-1)
    unit_keys = keys.reshape(-1, patches_per_unit, *keys.shape[1:]).mean(dim=1)  # [n, H, Dh]
    if unit_order is not None:
        raster = torch.argsort(unit_order.to(scores.device))
        scores, unit_keys = scores[raster], unit_keys[raster.to(unit_keys.device)]
    return scores, unit_keys.mean(dim=1)


@dataclass
class UnitSelection:
    """What VisionZip kept of one view of n merged units (specs/modern_families.md §2.1, §3).

    keep: [K] ascending unit indices (dominant ∪ targets); dominant: [d] in torch.topk order; targets: [c]
    ascending; merged: [M - c] the other non-dominant units (ascending); assignment: [M - c] the target rank each
    of them joins. contextual == 0 means the view is kept whole.
    """

    keep: torch.Tensor
    dominant: torch.Tensor
    targets: torch.Tensor
    merged: torch.Tensor
    assignment: torch.Tensor

    def apply(self, features: torch.Tensor) -> torch.Tensor:
        """[n, D] -> [K, D]: the kept rows in ascending unit order, each target row replaced by its contextual token
        (target + mean of the rows assigned to it; a target nobody joins stays as it is). Used for the merged
        features and, with the same assignment, for every DeepStack feature."""
        out = features[self.keep]
        if self.targets.numel() == 0:
            return out
        one_hot = torch.zeros(self.merged.numel(), self.targets.numel(), dtype=features.dtype, device=features.device)
        one_hot.scatter_(1, self.assignment.unsqueeze(1), 1)
        counts = one_hot.sum(dim=0).clamp(min=1).unsqueeze(1)
        contextual = features[self.targets] + (one_hot.transpose(0, 1) @ features[self.merged]) / counts
        slots = torch.searchsorted(self.keep, self.targets)
        out[slots] = contextual.to(out.dtype)
        return out


def select_units(scores: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int) -> UnitSelection:
    """VisionZip's selection on one view of n units without CLS (the official Qwen2.5-VL rule).

    D = topk(scores, d); R = the other units ascending (M of them); targets T = R at ranks 0, s, 2s, ... (first c,
    s = max(1, M // c)); every other unit of R joins the target of highest cosine key similarity (first maximum).
    contextual == 0: the view is kept whole.
    """
    units = scores.shape[0]
    device = scores.device
    if contextual == 0:
        every = torch.arange(units, device=device)
        empty = every[:0]
        return UnitSelection(every, every, empty, empty, empty)
    if dominant < 1 or contextual < 1 or dominant + contextual >= units:
        raise ValueError(f"VisionZip needs 1 <= dominant, 1 <= contextual and dominant + contextual < {units} units; "
                         f"got dominant={dominant}, contextual={contextual}")
    top = torch.topk(scores, dominant).indices
    is_dominant = torch.zeros(units, dtype=torch.bool, device=device)
    is_dominant[top] = True
    rest = torch.nonzero(~is_dominant).squeeze(1)
    step = max(1, rest.numel() // contextual)
    target_ranks = torch.arange(0, rest.numel(), step, device=device)[:contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
    is_target[target_ranks] = True
    rest_keys = keys[rest.to(keys.device)]
    rest_keys = rest_keys / rest_keys.norm(dim=-1, keepdim=True)  # no eps, as the official code
    similarity = rest_keys[~is_target.to(keys.device)] @ rest_keys[target_ranks.to(keys.device)].transpose(0, 1)
    assignment = similarity.argmax(dim=1).to(device)
    targets = rest[target_ranks]
    keep = torch.sort(torch.cat([top, targets])).values
    return UnitSelection(keep, top, targets, rest[~is_target], assignment)
