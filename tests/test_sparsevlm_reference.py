"""An independent, slow SparseVLM reference that follows specs/sparsevlm.md literally (helpers, no tests).

One sample at a time, explicit L×L eager attention in every layer, the Llama layer math written out from
the weights, DPC-KNN with Python loops. It shares no code with slimvlm.sparsevlm.
"""

from __future__ import annotations

import math

import torch


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rot(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_raters(embeds: torch.Tensor, v0: int, v: int) -> list[int]:
    m = embeds[v0 : v0 + v] @ embeds[v0 + v :].T
    sigma = torch.softmax(m, dim=-1).mean(0)
    raters = [j for j in range(sigma.numel()) if sigma[j] > sigma.mean()]
    return raters or list(range(sigma.numel()))


def reference_dpc_knn(y: torch.Tensor, k: int, noise: torch.Tensor):
    """Literal DPC-KNN (spec §5). Returns centres (list, output order) and assignment (list)."""
    n, c = y.shape
    d = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1).sqrt() / math.sqrt(c)  # d_ij = ‖y_i − y_j‖ / √C
    rho = (torch.exp(-(torch.sort(d, dim=1).values[:, :k] ** 2).mean(1)) + 1e-6 * noise).tolist()
    dl = d.tolist()
    dmax = max(max(row) for row in dl)
    delta = []
    for i in range(n):
        higher = [dl[i][j] for j in range(n) if rho[j] > rho[i]]
        delta.append(min(higher) if higher else dmax)
    # ρ·δ in fp32, as the tensors hold them; ties keep the lower index first.
    product = (torch.tensor(rho) * torch.tensor(delta)).tolist()
    centres = sorted(range(n), key=lambda i: -product[i])[:k]
    assignment = []
    for i in range(n):
        if i in centres:
            assignment.append(centres.index(i))
        else:
            dists = [dl[ci][i] for ci in centres]
            assignment.append(dists.index(min(dists)))
    return centres, assignment


def _layer(layer, h, cos, sin, cfg):
    """One Llama decoder layer from its weights; returns (output, attention probabilities [H, L, L])."""
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    L = h.shape[0]
    att = layer.self_attn
    x = _rms(h, layer.input_layernorm.weight, cfg.rms_norm_eps)
    q = (x @ att.q_proj.weight.T).view(L, H, D).transpose(0, 1)
    k = (x @ att.k_proj.weight.T).view(L, Hkv, D).transpose(0, 1)
    v = (x @ att.v_proj.weight.T).view(L, Hkv, D).transpose(0, 1)
    q, k = _rot(q, cos, sin), _rot(k, cos, sin)
    group = H // Hkv
    k = torch.stack([k[hh // group] for hh in range(H)])
    v = torch.stack([v[hh // group] for hh in range(H)])
    logits = q @ k.transpose(1, 2) / math.sqrt(D)
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ v).transpose(0, 1).reshape(L, H * D) @ att.o_proj.weight.T
    h = h + out
    x = _rms(h, layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
    mlp = layer.mlp
    h = h + (torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return h, probs


@torch.no_grad()
def reference_forward(model, embeds, v0, v, budgets, layers, version, noise, priority_heads=14, plan=None):
    """Run one sample [L, C] through the LLM per the spec. Returns logits [L_last, vocab] and a record.

    plan: replay a previous record's steps (kept / recycled / assignment) instead of scoring.
    """
    lm = model.model.language_model
    cfg = lm.config
    theta = cfg.rope_parameters["rope_theta"]
    D = cfg.head_dim
    h = embeds.clone()
    pos = torch.arange(h.shape[0])
    raters = reference_raters(embeds, v0, v) if plan is None else None
    record = {"raters": raters, "steps": [], "kv_lengths": []}
    vcur = v
    step = 0
    for index, layer in enumerate(lm.layers):
        cos, sin = _rope_tables(pos, D, theta)
        h_in_len = h.shape[0]
        h, probs = _layer(layer, h, cos, sin, cfg)
        record["kv_lengths"].append(h_in_len)
        if step < len(layers) and index == layers[step]:
            if plan is not None:
                kept, recycled, centres, assignment = plan[step]
            else:
                t0 = v0 + vcur
                rows = [t0 + j for j in raters]
                if version == "1.5":
                    mean = probs.mean(0)
                    score = mean[rows][:, v0 : v0 + vcur].mean(0)
                else:
                    ones = torch.ones(D)
                    qr = _rot(ones, cos[rows], sin[rows])
                    kr = _rot(ones, cos[v0 : v0 + vcur], sin[v0 : v0 + vcur])
                    w = qr @ kr.T / math.sqrt(D)
                    corrected = probs[:, rows][:, :, v0 : v0 + vcur] / w
                    head_sum = corrected.sum(dim=(1, 2))
                    top = sorted(torch.argsort(head_sum, descending=True)[: min(priority_heads, probs.shape[0])].tolist())
                    score = corrected[top].mean(0).mean(0)
                n_keep = min(budgets[step], vcur - 1)
                kept = sorted(torch.topk(score, n_keep).indices.tolist())
                recycled, centres, assignment = [], [], []
                if version == "1.5":
                    kept_set = set(kept)
                    deleted = [i for i in range(vcur) if i not in kept_set]
                    n_rec = (3 * len(deleted)) // 10 + 1  # int(0.3·n) + 1 in exact arithmetic
                    order = sorted(deleted, key=lambda i: -score[i].item())
                    recycled = order[:n_rec]
                    k = n_rec // 10 + 1
                    centres, assignment = reference_dpc_knn(h[[v0 + i for i in recycled]], k, noise(step, n_rec))
            visual = h[v0 : v0 + vcur]
            parts = [h[:v0], visual[kept]]
            if recycled:
                y = visual[recycled]
                k = len(centres)
                sizes = [assignment.count(c) for c in range(k)]
                merged = torch.zeros(k, h.shape[1])
                for i, c in enumerate(assignment):
                    merged[c] += y[i] / (sizes[c] + 1e-6)
                parts.append(merged)
            parts.append(h[v0 + vcur :])
            new_h = torch.cat(parts)
            if version == "1.5":
                pos = torch.arange(new_h.shape[0])
            else:
                pos = torch.cat([pos[:v0], pos[v0 : v0 + vcur][kept], pos[v0 + vcur :]])
            record["steps"].append((kept, recycled, centres, assignment))
            record.setdefault("positions", []).append(pos.clone())
            h = new_h
            vcur = len(kept) + len(centres)
            step += 1
    h = _rms(h, lm.norm.weight, cfg.rms_norm_eps)
    return h @ model.lm_head.weight.T, record
