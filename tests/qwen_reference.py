"""VisionZip on Qwen-VL recomputed the slow, obvious way (specs/modern_families.md M2): the stock tower (eager,
fp32), a pre-hook on the last block's input, per-segment per-head N x N softmax in loops, column sums, 4-patch
means, the window permutation built in a loop, the §2.1 selection per view; then the official-style LLM input
(the dense sequence with stock ids, contextual rows written into their targets, pruned by keep)."""

from __future__ import annotations

import math

import torch


def loop_window_index(grid_thw, window_units: int | None) -> list[int]:
    """The window permutation of merge units, built with loops: windows of window_units² units, window-major,
    raster inside, per temporal step (None: raster order, no windows)."""
    order, offset = [], 0
    for steps, gh, gw in grid_thw.tolist():
        h, w = gh // 2, gw // 2
        size_h, size_w = (window_units, window_units) if window_units else (h, w)
        for t in range(steps):
            for wy in range(0, h, size_h):
                for wx in range(0, w, size_w):
                    for y in range(wy, min(wy + size_h, h)):
                        for x in range(wx, min(wx + size_w, w)):
                            order.append(offset + t * h * w + y * w + x)
        offset += steps * h * w
    return order


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def select_view(score, key, features, ratios):
    """§2.1 on one view: returns (keep, dominant, targets, assignment, compressed rows)."""
    n = score.shape[0]
    d, c = max(1, int(ratios[0] * n)), max(1, int(ratios[1] * n))
    if d + c >= n:
        return list(range(n)), set(range(n)), [], {}, features
    dominant = set(torch.topk(score.float(), d).indices.tolist())
    rest = [u for u in range(n) if u not in dominant]
    step = max(1, len(rest) // c)
    targets = rest[::step][:c]
    assignment = {}
    for u in rest:
        if u in targets:
            continue
        similarities = [float(key[u] @ key[t] / (key[u].norm() * key[t].norm())) for t in targets]
        assignment[u] = targets[similarities.index(max(similarities))]
    keep = sorted(dominant | set(targets))
    rows = []
    for u in keep:
        joined = [v for v, t in assignment.items() if t == u]
        rows.append(features[u] + (torch.stack([features[v] for v in joined]).mean(0) if joined else 0))
    return keep, dominant, targets, assignment, torch.stack(rows)


def reference_visionzip(tower, pixel_values, grid_thw, ratios, window_units, merged_rows=None, extra_rows=()):
    """Per item: (keep over the item's dense tokens, compressed rows [K, D], compressed extra rows per level).

    tower: the stock vision tower; merged_rows: its merged output (default: `pooler_output` of a run here);
    extra_rows: further [Σ n, D] row sets (DeepStack) merged with the same keep and assignment."""
    captured = {}

    def hook(module, args, kwargs):
        if not captured:
            captured.update(hidden=args[0] if args else kwargs["hidden_states"], cu=kwargs["cu_seqlens"],
                            cos_sin=kwargs["position_embeddings"])

    handle = tower.blocks[-1].register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        output = tower(pixel_values, grid_thw=grid_thw)
    handle.remove()
    merged = output.pooler_output if merged_rows is None else merged_rows
    block = tower.blocks[-1]
    heads = block.attn.num_heads
    with torch.no_grad():
        qkv = block.attn.qkv(block.norm1(captured["hidden"])).reshape(captured["hidden"].shape[0], 3, heads, -1)
    cos, sin = (table.double() for table in captured["cos_sin"])
    q, k = rope(qkv[:, 0].double(), cos, sin), rope(qkv[:, 1].double(), cos, sin)
    received = torch.zeros(q.shape[0], dtype=torch.float64)
    bounds = captured["cu"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        for h in range(heads):
            probabilities = torch.softmax(q[start:end, h] @ k[start:end, h].T / math.sqrt(q.shape[-1]), dim=-1)
            for j in range(end - start):
                received[start + j] += probabilities[:, j].sum() / heads
    order = loop_window_index(grid_thw, window_units)
    units = q.shape[0] // 4
    scores = torch.zeros(units, dtype=torch.float64)
    keys = torch.zeros(units, k.shape[-1], dtype=torch.float64)
    for position, unit in enumerate(order):
        scores[unit] = received[4 * position: 4 * position + 4].mean()
        keys[unit] = k[4 * position: 4 * position + 4].mean(dim=0).mean(dim=0)
    items, start = [], 0
    for steps, gh, gw in grid_thw.tolist():
        n = gh * gw // 4
        keep, rows, extra = [], [], [[] for _ in extra_rows]
        for t in range(steps):
            view = slice(start + t * n, start + (t + 1) * n)
            kept, _, targets, assignment, compressed = select_view(scores[view], keys[view], merged[view].double(), ratios)
            keep += [t * n + u for u in kept]
            rows.append(compressed)
            for level, level_rows in enumerate(extra_rows):
                features = level_rows[view].double()
                extra[level].append(torch.stack([
                    features[u] + (torch.stack([features[v] for v, tt in assignment.items() if tt == u]).mean(0)
                                   if any(tt == u for tt in assignment.values()) else 0) for u in kept]))
        items.append((keep, torch.cat(rows), [torch.cat(level) for level in extra]))
        start += steps * n
    return items, merged


def pruned_dense_inputs(model, dense, items_by_modality, merged_by_modality, token_ids):
    """The official LLM input for a batch of one: (inputs_embeds, position_ids, attention_mask, kept columns).

    The dense sequence gets the stock merged rows, each kept row replaced by its compressed row, then only text
    and kept tokens remain, with their stock 3-D ids."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(dense["input_ids"])
        positions, _ = model.get_rope_index(dense["input_ids"], dense["mm_token_type_ids"],
                                            image_grid_thw=dense.get("image_grid_thw"),
                                            video_grid_thw=dense.get("video_grid_thw"),
                                            second_per_grid_ts=dense.get("second_per_grid_ts"),
                                            attention_mask=dense["attention_mask"])
    keep_columns = torch.ones_like(dense["input_ids"], dtype=torch.bool)
    for modality, items in items_by_modality.items():
        merged = merged_by_modality[modality]
        mask = dense["input_ids"] == token_ids[modality]
        kept, blocks, offset = [], [], 0
        sizes = [int(g.prod()) // 4 for g in dense[f"{modality}_grid_thw"]]
        for (keep, compressed, _), size in zip(items, sizes):
            block = merged[offset:offset + size].clone()
            flags = torch.zeros(size, dtype=torch.bool)
            flags[keep] = True
            for slot, u in enumerate(keep):
                block[u] = compressed[slot].to(block.dtype)
            blocks.append(block)
            kept.append(flags)
            offset += size
        embeds = embeds.masked_scatter(mask[..., None], torch.cat(blocks).to(embeds.dtype))
        keep_columns[mask] = torch.cat(kept)
    assert dense["input_ids"].shape[0] == 1
    columns = keep_columns[0]
    return embeds[:, columns], positions[:, :, columns], dense["attention_mask"][:, columns], columns


def assert_features_match(slim, inputs, items, modality: str = "image"):
    """The Slim model's compressed features equal the reference's (same kept units; rows, DeepStack rows within
    1e-5); returns the Slim model's logits on `inputs`."""
    encode = slim.model.get_image_features if modality == "image" else slim.model.get_video_features
    pixels = inputs["pixel_values"] if modality == "image" else inputs["pixel_values_videos"]
    with torch.no_grad():
        features = encode(pixels, inputs[f"{modality}_grid_thw"])
        logits = slim(**inputs).logits
    for index, (keep, rows, deep) in enumerate(items):
        assert features.visionzip_keep[index].tolist() == keep
        torch.testing.assert_close(features.pooler_output[index].double(), rows, rtol=1e-5, atol=1e-5)
        for level, expected in enumerate(deep):
            torch.testing.assert_close(features.deepstack_features[level][index].double(), expected, rtol=1e-5, atol=1e-5)
    return logits
