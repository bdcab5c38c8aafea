"""CDPruner (Zhang et al., NeurIPS 2025) and DivPrune (Ranjbar Alvar et al., CVPR 2025): select K of a view's N
projected visual tokens, before the language model.

Pure tensor code; knows nothing about LLaVA. Shipped with checkpoints (imports torch only; the CLIP text
tower is passed in). Follows specs/cdpruner.md:

- CDPruner (§2-§3): a DPP kernel L = diag(r)·S·diag(r) over the cosine similarity S of the projected tokens,
  weighted by each token's relevance r to the instruction, and the fast greedy MAP (incremental Cholesky).
- DivPrune (§4): max-min diversity over the cosine distance 1 - S, without the text.

Both keep the K picks in ascending order. All selection math runs in float32 (§7).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Below this the DPP gain (a Schur complement) has run out of numerical rank (specs/cdpruner.md §3).
DEGENERATE_GAIN = 1e-12
# CLIP's text context: instructions longer than this are split into rows of this many tokens (§2.3).
CLIP_CONTEXT = 77


def normalized_rows(features: torch.Tensor) -> torch.Tensor:
    """[..., N, D] -> float32 rows of unit L2 norm (upcast before normalising, norms clamped at 1e-12)."""
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    """S = X̂X̂ᵀ: [V, N, D] -> [V, N, N] in float32."""
    unit = normalized_rows(features)
    return unit @ unit.transpose(-1, -2)


def minmax_relevance(rho: torch.Tensor, theta: float | None = None) -> torch.Tensor:
    """§2.5-2.6: r = (ρ - min ρ + 1e-6) / (max ρ - min ρ) over ALL of `rho` (one image: [views, N]).

    The epsilon is in the numerator only, as officially; a constant ρ gives r ≡ 1 (slimvlm's guard).
    theta: None (the released code: plain r) or θ in [0, 1): r <- exp(α·r), α = θ / (2(1 - θ)).
    """
    rho = rho.float()
    low, high = rho.min(), rho.max()
    if bool(high == low):
        weights = torch.ones_like(rho)
    else:
        weights = (rho - low + 1e-6) / (high - low)
    if theta is not None:
        weights = torch.exp(theta / (2 * (1 - theta)) * weights)
    return weights


def dpp_greedy_map(features: torch.Tensor, relevance: torch.Tensor, tokens: int) -> torch.Tensor:
    """CDPruner's greedy MAP (specs/cdpruner.md §3) for a batch of independent views.

    Args:
        features: [V, N, D] projected tokens of each view.
        relevance: [V, N] per-token weights r (after min-max, and θ if set).
        tokens: K picks per view, 1 <= K <= N.
    Returns:
        [V, K] kept positions, ascending.

    d2 holds each candidate's gain det(L_{Y∪j}) / det(L_Y); each step takes the first argmax, extends the
    incremental Cholesky rows C and lowers every gain by e². Once the best gain is <= 1e-12 (rank exhausted),
    the remaining picks are the unselected tokens by descending r (lower index on ties), so K distinct
    tokens always come back.
    """
    views, length, _ = features.shape
    check_tokens(tokens, length)
    relevance = relevance.float()
    # In place: the N x N kernel is the only N x N matrix held (L_ij = (r_i·S_ij)·r_j).
    kernel = cosine_similarity_matrix(features).mul_(relevance[:, :, None]).mul_(relevance[:, None, :])
    gains = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    cholesky = kernel.new_zeros(views, tokens, length)
    picked = torch.zeros(views, length, dtype=torch.bool, device=kernel.device)
    picks = torch.empty(views, tokens, dtype=torch.long, device=kernel.device)
    rows = torch.arange(views, device=kernel.device)
    for step in range(tokens):
        masked = gains.masked_fill(picked, -math.inf)
        best, choice = masked.max(dim=1)
        degenerate = best <= DEGENERATE_GAIN
        if bool(degenerate.any()):
            fallback = relevance.masked_fill(picked, -math.inf).argmax(dim=1)
            choice = torch.where(degenerate, fallback, choice)
        projection = torch.einsum("vt,vtn->vn", cholesky[rows, :step, choice], cholesky[:, :step])
        update = (kernel[rows, choice] - projection) / best.clamp_min(DEGENERATE_GAIN).sqrt()[:, None]
        update = update.masked_fill(degenerate[:, None], 0.0)
        cholesky[:, step] = update
        gains = gains - update**2
        picked[rows, choice] = True
        picks[:, step] = choice
    return picks.sort(dim=1).values


def divprune_select(features: torch.Tensor, tokens: int) -> torch.Tensor:
    """DivPrune's max-min diversity selection (specs/cdpruner.md §4) for a batch of independent views.

    Args:
        features: [V, N, D] tokens of each view (or of each image's whole block, scope "image").
        tokens: K picks per view, 1 <= K <= N.
    Returns:
        [V, K] kept positions, ascending.

    Δ = 1 - X̂X̂ᵀ. The first pick is the token farthest from its nearest neighbour (the largest second-smallest
    entry of its column of Δ); then each step picks argmax_j min_{t} Δ[s_t, j] over the unpicked tokens, with a
    running minimum (O(K·N)); ties go to the first index.
    """
    views, length, _ = features.shape
    check_tokens(tokens, length)
    distance = cosine_similarity_matrix(features).neg_().add_(1)  # Δ = 1 - S, in place (one N x N matrix)
    rows = torch.arange(views, device=distance.device)
    if length == 1:
        return torch.zeros(views, 1, dtype=torch.long, device=distance.device)
    second_smallest = distance.topk(2, dim=1, largest=False).values[:, 1]  # [V, N]: per column j
    choice = second_smallest.argmax(dim=1)
    picked = torch.zeros(views, length, dtype=torch.bool, device=distance.device)
    picks = torch.empty(views, tokens, dtype=torch.long, device=distance.device)
    nearest = distance[rows, choice]  # [V, N]: min over the picks so far of Δ[s_t, j]
    for step in range(tokens):
        if step:
            choice = nearest.masked_fill(picked, -math.inf).argmax(dim=1)
            nearest = torch.minimum(nearest, distance[rows, choice])
        picked[rows, choice] = True
        picks[:, step] = choice
    return picks.sort(dim=1).values


def check_tokens(tokens: int, candidates: int) -> None:
    if not 1 <= tokens <= candidates:
        raise ValueError(
            f"compression['tokens'] = {tokens} must lie in 1..{candidates}: a view (or, with scope 'image', an "
            f"image) has {candidates} candidate tokens here"
        )


def gather_rows(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[V, N, D] rows `index` [V, K] -> [V, K, D] (the kept tokens are bitwise rows of the full projection)."""
    return features.gather(1, index.to(features.device).unsqueeze(-1).expand(-1, -1, features.shape[-1]))


# ---- relevance (specs/cdpruner.md §2.2-2.4, §8) --------------------------------------------------------


def clip_text_rows(token_ids: list[int], bos_id: int, eos_id: int, context: int = CLIP_CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """§2.3: BOS + tokens + EOS, no truncation, right-padded with id 0 / mask 0 to M·77, reshaped row-major.

    Returns (ids, mask), both [M, 77] long; later rows have no BOS and only the last row holds EOS.
    """
    ids = [bos_id, *token_ids, eos_id]
    rows = -(-len(ids) // context)
    padded = torch.zeros(rows * context, dtype=torch.long)
    mask = torch.zeros(rows * context, dtype=torch.long)
    padded[: len(ids)] = torch.tensor(ids)
    mask[: len(ids)] = 1
    return padded.view(rows, context), mask.view(rows, context)


def clip_text_embeddings(text_model: nn.Module, text_projection: nn.Module, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
    """T̂ [M, P]: each row through the CLIP text transformer (causal + padding mask, final LN), pooled at the
    row's largest input id (first on ties; the legacy pooling), projected and normalised.

    text_model: a `CLIPTextModel` (CLIPModel.text_model); input_ids / attention_mask: [M, 77].
    """
    hidden = text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    position = input_ids.argmax(dim=-1)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), position.to(hidden.device)]
    return normalized_rows(text_projection(pooled))


def clip_relevance(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """§2.4: ρ_n = -(1/M)·Σ_m ⟨Ê_n, T̂_m⟩ (negated, as officially). image_embeds [V, N, P], text_embeds [M, P] -> [V, N]."""
    return -(normalized_rows(image_embeds) @ normalized_rows(text_embeds).T).mean(dim=-1)


def embedding_relevance(features: torch.Tensor, instruction_embeds: torch.Tensor) -> torch.Tensor:
    """§8 `llm_embeddings`: ρ_n = +cos(X_n, ê), ê the mean LLM input embedding of the instruction tokens.

    features [V, N, D]; instruction_embeds [T, D] (the instruction's rows of embed_tokens) -> [V, N].
    """
    mean = instruction_embeds.float().mean(dim=0)
    return normalized_rows(features) @ normalized_rows(mean)


class RelevanceEncoder(nn.Module):
    """The three CLIP parts CDPruner's `clip` relevance needs (specs/cdpruner.md §10), stored inside the slim
    checkpoint: the text transformer, text_projection (bias-free, width -> P) and visual_projection (bias-free,
    vision width -> P). The vision side reuses the model's own tower (its post_layernorm, layer -2 input)."""

    def __init__(self, text_config, projection_dim: int, vision_hidden_size: int):
        super().__init__()
        from transformers import CLIPTextModel

        self.text_model = CLIPTextModel._from_config(text_config)
        self.text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        self.visual_projection = nn.Linear(vision_hidden_size, projection_dim, bias=False)

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[M, 77] rows of one instruction (all-zero mask rows dropped) -> T̂ [M, P]."""
        valid = attention_mask.bool().any(dim=-1)
        return clip_text_embeddings(self.text_model, self.text_projection, input_ids[valid], attention_mask[valid])

    def image_embeddings(self, post_layernorm: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """E = visual_projection(post_layernorm(H)) for layer -2 patch states H [V, N, C] -> [V, N, P]."""
        weight = self.visual_projection.weight
        return self.visual_projection(post_layernorm(patches.to(weight.device)).to(weight.dtype))
