"""Train the tiny LLaVA-1.5-architecture demo model on the procedural shapes VQA task (CPU).

    python -m slimvlm.demo.train --out slimvlm/demo/assets/tiny-shapes-llava [--seed 0]

The defaults reproduce the shipped model (about 40 min on 2 CPU cores).

Stage 1 pre-trains the CLIP vision tower alone.  The main objective reads the CLS token at the
layer LLaVA uses (``vision_feature_layer=-2``, after ``post_layernorm``) and predicts which colour /
shape / colour-shape combinations are present and how many objects there are, so the CLS token
must *attend* to the objects: its attention in the last layers becomes informative the way real
CLIP's is (what VisionZip relies on).  Auxiliary dense heads make each patch feature predict what
covers it, which grid cell it lies in and what that cell contains, and the scene's per-colour /
per-shape counts, which gives the LM linearly readable patch features (real CLIP patch features
are also rich).  The tower's position embeddings start from a 2D sin-cos table (stock layout,
just a better initialisation), which made shape learning much faster.

Stage 2 trains projector + Llama LM on VQA with the loss on the answer and ``</s>`` only, end to
end: the tower is fine-tuned at a lower LR and keeps the stage-1 objectives as an auxiliary loss
(on the VQA images plus a few extra images per step).  To make 576-token sequences affordable on
a CPU, each image is encoded once and its prefix (``<s> USER :`` + 576 image embeddings) goes
through the LM once; the KV cache is then repeated for ``--questions-per-image`` questions
(mathematically identical to running the full sequences, since attention is causal and the
prefix is identical).  The heads are thrown away afterwards.

The output folder loads with stock ``LlavaForConditionalGeneration`` / ``LlavaProcessor``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

# Passive OpenMP waiting: with the default busy-wait, sharing 2 cores with any other process
# made training ~4x slower (measured); passive costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F
from torch import nn  # noqa: E402

from slimvlm.demo import shapes  # noqa: E402

PATCH = 4
GRID_PATCHES = shapes.IMAGE_SIZE // PATCH  # 24 -> 576 image tokens, like LLaVA-1.5


def build_model(tokenizer: Any, lm_layers: int = 16) -> "LlavaForConditionalGeneration":
    """Tiny LLaVA-1.5: CLIP ViT (96px, patch 4, 6 layers x 128) + 2-layer MLP projector + Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                              image_size=shapes.IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344,
                       num_hidden_layers=lm_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=GRID_PATCHES * GRID_PATCHES, projector_hidden_act="gelu")
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaForConditionalGeneration(config)
    init_position_embeddings(model)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    return model


def init_position_embeddings(model: Any, scale: float = 0.5) -> None:
    """Initialise the tower's (learned, stock-layout) position embeddings with a 2D sin-cos table.

    A from-scratch ViT with random position embeddings first has to discover the 2D layout of its
    24x24 patches, which is what made shape recognition so slow to learn on a CPU budget; a 2D
    sin-cos start (as in MAE) gives local attention from step 0.  The CLS position stays zero.
    """
    emb = model.model.vision_tower.vision_model.embeddings.position_embedding.weight \
        if hasattr(model.model.vision_tower, "vision_model") else model.model.vision_tower.embeddings.position_embedding.weight
    dim = emb.shape[1]
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(GRID_PATCHES, dtype=torch.float32),
                            torch.arange(GRID_PATCHES, dtype=torch.float32), indexing="ij")
    ay, ax = ys.flatten()[:, None] * omega, xs.flatten()[:, None] * omega
    table = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)
    with torch.no_grad():
        emb.zero_()
        emb[1:] = scale * table


def build_processor(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=shapes.IMAGE_TOKEN)


def autocast(args: argparse.Namespace) -> Any:
    """bf16 autocast for the stage-1 tower forward pass (~25% faster on an avx512_bf16 CPU; weights,
    optimiser state and the saved model stay float32); a no-op with ``--vision-bf16 0``."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(args.vision_bf16))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- stage 1


N_COL, N_SHP, N_CELL = len(shapes.COLORS), len(shapes.SHAPES), shapes.GRID * shapes.GRID
COLOR_IDX = {c: i + 1 for i, c in enumerate(shapes.COLORS)}  # 0 = empty / background
SHAPE_IDX = {s: i + 1 for i, s in enumerate(shapes.SHAPES)}


def vision_targets(objects: list[shapes.Obj], mask: np.ndarray) -> dict[str, torch.Tensor]:
    """Global targets (for CLS) and per-patch targets (class 0 = nothing) for one image."""
    # CLS: CLIP-like global semantics -- which colour/shape combinations, colours and shapes are
    # present, and how many objects there are.  Answering needs attention on the object patches.
    present = torch.zeros(N_COL * N_SHP + N_COL + N_SHP)
    cell_col = torch.zeros(N_CELL, dtype=torch.long)
    cell_shp = torch.zeros(N_CELL, dtype=torch.long)
    for o in objects:
        ci, si = COLOR_IDX[o.color] - 1, SHAPE_IDX[o.shape] - 1
        present[[ci * N_SHP + si, N_COL * N_SHP + ci, N_COL * N_SHP + N_COL + si]] = 1.0
        cell_col[o.cell], cell_shp[o.cell] = ci + 1, si + 1
    # What covers each patch: the object under the patch's centre pixel.
    centre = torch.from_numpy(mask[PATCH // 2::PATCH, PATCH // 2::PATCH].astype(np.int64)).flatten()
    obj_col = torch.tensor([0] + [COLOR_IDX[o.color] for o in objects])
    obj_shp = torch.tensor([0] + [SHAPE_IDX[o.shape] for o in objects])
    # Which grid cell each patch lies in (24 patches / 3 cells = 8 patches per cell side).
    rows = torch.arange(GRID_PATCHES) // (GRID_PATCHES // shapes.GRID)
    patch_cell = (rows[:, None] * shapes.GRID + rows[None, :]).flatten()
    # Scene-level counts (objects per colour, per shape), which every patch also learns to carry.
    counts = torch.zeros(N_COL + N_SHP, dtype=torch.long)
    for o in objects:
        counts[COLOR_IDX[o.color] - 1] += 1
        counts[N_COL + SHAPE_IDX[o.shape] - 1] += 1
    return {"present": present, "count": torch.tensor(len(objects) - 1), "counts": counts,
            "patch_col": obj_col[centre], "patch_shp": obj_shp[centre], "patch_cell": patch_cell,
            "patch_cell_col": cell_col[patch_cell], "patch_cell_shp": cell_shp[patch_cell],
            "scene_col": cell_col, "scene_shp": cell_shp}


class VisionHeads(nn.Module):
    """Heads for the tower objectives: CLS -> global attributes; patch -> what covers it, its grid
    cell (index, colour, shape of the cell's object) and the scene's per-colour/per-shape counts.

    Used in stage 1 and kept as an auxiliary loss in stage 2; thrown away afterwards."""

    N_COUNT = shapes.MAX_OBJECTS + 1

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls = nn.Linear(dim, N_COL * N_SHP + N_COL + N_SHP + shapes.MAX_OBJECTS)
        self.patch = nn.Linear(dim, 2 * (N_COL + 1 + N_SHP + 1) + N_CELL + (N_COL + N_SHP) * self.N_COUNT)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor,
                t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cls(cls)
        n = t["present"].shape[1]
        cls_loss = (F.binary_cross_entropy_with_logits(c[:, :n], t["present"], reduction="sum") / c.shape[0]
                    + F.cross_entropy(c[:, n:], t["count"]))
        p = self.patch(patches)
        k = N_COL + 1 + N_SHP + 1
        patch_loss = torch.zeros(())
        for off, col, shp in ((0, "patch_col", "patch_shp"), (k, "patch_cell_col", "patch_cell_shp")):
            patch_loss = patch_loss + F.cross_entropy(p[..., off:off + N_COL + 1].flatten(0, 1), t[col].flatten())
            patch_loss = patch_loss + F.cross_entropy(p[..., off + N_COL + 1:off + k].flatten(0, 1), t[shp].flatten())
        patch_loss = patch_loss + F.cross_entropy(p[..., 2 * k:2 * k + N_CELL].flatten(0, 1), t["patch_cell"].flatten())
        cnt = p[..., 2 * k + N_CELL:].unflatten(-1, (N_COL + N_SHP, self.N_COUNT))  # (B, P, 8, 5)
        cnt_t = t["counts"][:, None, :].expand(-1, cnt.shape[1], -1)
        count_loss = F.cross_entropy(cnt.flatten(0, 2), cnt_t.flatten())
        # Logged: whole-image exact match of the CLS presence readout, CLS count accuracy, and the
        # accuracy of the per-patch cell-shape / cell-colour / scene-count readouts.
        exact = ((c[:, :n] > 0).float() == t["present"]).all(-1).float().mean().item()
        count = (c[:, n:].argmax(-1) == t["count"]).float().mean().item()
        cshp = (p[..., k + N_COL + 1:2 * k].argmax(-1) == t["patch_cell_shp"]).float().mean().item()
        ccol = (p[..., k:k + N_COL + 1].argmax(-1) == t["patch_cell_col"]).float().mean().item()
        pcnt = (cnt.argmax(-1) == cnt_t).float().mean().item()
        stats = {"cls": cls_loss.item(), "patch": patch_loss.item(), "counts": count_loss.item(), "cls_exact": exact,
                 "cls_count": count, "cell_shp": cshp, "cell_col": ccol, "patch_counts": pcnt}
        return cls_loss + patch_loss + count_loss, stats


def vision_batch(processor: Any, seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, targets = [], []
    for i in range(start, start + n):
        objects, image, mask, _ = shapes.make_scene_batch("train", seed, i)
        images.append(image)
        targets.append(vision_targets(objects, mask))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def stage1_init(tokenizer: Any, seed: int) -> tuple[dict, VisionHeads]:
    """Initial tower weights and stage-1 heads, independent of ``--lm-layers``.

    Both are drawn from the RNG stream of a reference build with a 16-layer LM (the tower of the
    model that is actually trained is overwritten with this one), so stage 1 -- and a cached
    stage-1 tower -- is the same whatever the LM depth."""
    torch.manual_seed(seed)
    ref = build_model(tokenizer, 16)
    heads = VisionHeads(ref.config.vision_config.hidden_size)
    return ref.model.vision_tower.state_dict(), heads


def train_vision(model: Any, processor: Any, args: argparse.Namespace, log: dict, heads: VisionHeads) -> None:
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)  # flattened in transformers v5
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    t0, hist = time.time(), []
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, args.warmup)
        pixels, t = vision_batch(processor, args.seed, step * args.vision_batch, args.vision_batch)
        with autocast(args):
            out = tower(pixel_values=pixels, output_hidden_states=True)
            # The layer LLaVA feeds to the LM (vision_feature_layer=-2); post_layernorm like CLIP's pooler.
            h = vm.post_layernorm(out.hidden_states[-2])
        loss, st = heads(h[:, 0].float(), h[:, 1:].float(), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hist.append((step, *(round(v, 4) for v in st.values())))
        if step % 20 == 0 or step == args.vision_steps - 1:
            print(f"[vision] step {step} " + " ".join(f"{k} {v:.3f}" for k, v in st.items())
                  + f" ({time.time() - t0:.0f}s)", flush=True)
    log["stage1"] = {"steps": args.vision_steps, "batch": args.vision_batch, "lr": args.vision_lr,
                     "seconds": round(time.time() - t0, 1), "history_columns": ["step", *st],
                     "history": hist[::5] + hist[-1:]}


# ----------------------------------------------------------------------------- stage 2


def vqa_batch(tokenizer: Any, processor: Any, seed: int, start: int, n_img: int, q_per_img: int,
              step_rng: np.random.Generator, all_q: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (n_img), suffix ids (n_img*q, L, right-padded) and (position, target) pairs."""
    image_id = tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN)
    images, suffixes = [], []
    for i in range(start, start + n_img):
        objects, image, _, cands = shapes.make_scene_batch("train", seed, i)
        images.append(image)
        if all_q:
            cands = shapes.all_questions(objects)
        # Sample a question type uniformly (so rare types are not starved), then an answer value
        # uniformly (so e.g. "is there ...?" is yes/no balanced), then a question with that answer.
        by_type: dict[str, dict[str, list]] = {}
        for c in cands:
            by_type.setdefault(c[0], {}).setdefault(c[2], []).append(c)
        types = sorted(by_type)
        for _ in range(q_per_img):
            by_answer = by_type[types[step_rng.integers(len(types))]]
            if all_q:
                group = by_answer[sorted(by_answer)[step_rng.integers(len(by_answer))]]
            else:
                group = [c for v in by_answer.values() for c in v]
            _, q, a = group[step_rng.integers(len(group))]
            ids = tokenizer(shapes.build_prompt(q)).input_ids
            k = ids.index(image_id)
            suffixes.append(ids[k + 1:] + [tokenizer.convert_tokens_to_ids(a), tokenizer.eos_token_id])
    length = max(len(s) for s in suffixes)
    suffix = torch.full((len(suffixes), length), tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros(len(suffixes), 2, dtype=torch.long)
    for j, s in enumerate(suffixes):
        suffix[j, :len(s)] = torch.tensor(s)
        pos[j] = torch.tensor([len(s) - 3, len(s) - 2])  # positions whose next token is answer / </s>
    target = torch.gather(suffix, 1, pos + 1)
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, suffix, pos, target


def prefix_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer(shapes.build_prompt("x")).input_ids
    return ids[:ids.index(tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN))]


def vqa_loss(model: Any, pre_ids: list[int], feats: torch.Tensor, suffix: torch.Tensor, pos: torch.Tensor,
             target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Loss on answer + </s>, sharing each image's prefix across its questions via the KV cache.

    ``feats`` are the tower's layer -2 patch features (CLS dropped) of the batch's images."""
    lm = model.model.language_model
    n_img = feats.shape[0]
    q = suffix.shape[0] // n_img
    img = model.model.multi_modal_projector(feats)
    emb = lm.get_input_embeddings()
    pre = emb(torch.tensor(pre_ids)).unsqueeze(0).expand(n_img, -1, -1)
    prefix = torch.cat([pre, img], dim=1)
    out = lm(inputs_embeds=prefix, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(q)
    p_len = prefix.shape[1]
    position_ids = torch.arange(p_len, p_len + suffix.shape[1]).unsqueeze(0).expand(suffix.shape[0], -1)
    # Right padding needs no mask: pads come after the supervised positions in a causal model.
    h = lm(input_ids=suffix, past_key_values=cache, position_ids=position_ids, use_cache=True).last_hidden_state
    h = torch.gather(h, 1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    logits = model.lm_head(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    acc = (logits[:, 0].argmax(-1) == target[:, 0]).float().mean().item()
    return loss, acc


def train_vqa(model: Any, tokenizer: Any, processor: Any, args: argparse.Namespace, log: dict) -> None:
    """Stage 2, end to end: projector + LM at ``--lm-lr``, the tower at ``--tower-lr`` (same schedule).

    The tower keeps its stage-1 objectives (CLS + dense heads) as an auxiliary loss, on the VQA
    images plus ``--aux-images`` extra images per step, so it does not drift away from them."""
    # Re-seed: stage 2 must not depend on whether stage 1 ran here or was loaded from the cache.
    torch.manual_seed(args.seed + 1)
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    heads = VisionHeads(model.config.vision_config.hidden_size)
    # Stage-2-only dense head: every patch also learns the whole 3x3 scene (colour and shape of each
    # cell), so that image tokens carry scene context (as real CLIP patch tokens carry global context).
    scene = nn.Linear(model.config.vision_config.hidden_size, N_CELL * (N_COL + 1 + N_SHP + 1))
    lm_params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) \
        + list(model.lm_head.parameters())
    tower_params = list(tower.parameters())
    tower.requires_grad_(args.tower_lr > 0)
    groups = [{"params": lm_params, "peak": args.lm_lr},
              {"params": list(heads.parameters()) + list(scene.parameters()), "peak": args.lm_lr}]
    if args.tower_lr > 0:
        groups.append({"params": tower_params, "peak": args.tower_lr})
    opt = torch.optim.AdamW(groups, lr=args.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    pre_ids = prefix_ids(tokenizer)
    # Stage-2 images use indices after those of stage 1, so they are new pictures; the auxiliary
    # images come from a separate index range.
    base = args.vision_steps * args.vision_batch
    aux_base = 10_000_000
    t0, hist, ema = time.time(), [], None
    model.train()
    n = args.images_per_step
    for step in range(args.lm_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lm_steps, g["peak"], args.warmup)
        _, suffix, pos, target = vqa_batch(tokenizer, processor, args.seed, base + step * n, n,
                                           args.questions_per_image, rng, bool(args.all_questions))
        pixels, t = vision_batch(processor, args.seed, base + step * n, n)  # the same n images + targets
        if args.aux_images:
            px2, t2 = vision_batch(processor, args.seed, aux_base + step * args.aux_images, args.aux_images)
            pixels = torch.cat([pixels, px2])
            t = {k: torch.cat([t[k], t2[k]]) for k in t}
        with torch.set_grad_enabled(args.tower_lr > 0), autocast(args):
            hs = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            hn = vm.post_layernorm(hs)
        hs, hn = hs.float(), hn.float()
        aux_loss, st = heads(hn[:, 0], hn[:, 1:], t)
        if args.scene_weight:
            sc = scene(hn[:, 1:]).unflatten(-1, (N_CELL, N_COL + 1 + N_SHP + 1))  # (B, P, 9, 10)
            col_t = t["scene_col"][:, None, :].expand(-1, sc.shape[1], -1)
            shp_t = t["scene_shp"][:, None, :].expand(-1, sc.shape[1], -1)
            scene_loss = (F.cross_entropy(sc[..., :N_COL + 1].flatten(0, 2), col_t.flatten())
                          + F.cross_entropy(sc[..., N_COL + 1:].flatten(0, 2), shp_t.flatten()))
            st["scene"] = ((sc[..., N_COL + 1:].argmax(-1) == shp_t) & (sc[..., :N_COL + 1].argmax(-1) == col_t)) \
                .float().mean().item()
            aux_loss = aux_loss + args.scene_weight * scene_loss
        loss, acc = vqa_loss(model, pre_ids, hs[:n, 1:], suffix, pos, target)
        total = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        for g in groups:  # clip per group, so the (large) aux gradients do not shrink the LM's
            torch.nn.utils.clip_grad_norm_(g["params"], 1.0)
        opt.step()
        ema = acc if ema is None else 0.95 * ema + 0.05 * acc
        hist.append((step, round(loss.item(), 4), round(acc, 4), round(aux_loss.item(), 4), round(st["cell_shp"], 4)))
        if step % 25 == 0 or step == args.lm_steps - 1:
            print(f"[vqa] step {step} loss {loss.item():.4f} acc(ema) {ema:.3f} aux {aux_loss.item():.3f} "
                  f"cell_shp {st['cell_shp']:.3f} cell_col {st['cell_col']:.3f} counts {st['patch_counts']:.3f} "
                  f"scene {st.get('scene', 0):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.lm_steps:
            model.eval()
            te = time.time()
            ev = shapes.make_samples("heldout", 100, seed=args.seed, per_image=1, start=5000)
            a_ev, p_ev = shapes.evaluate(model, processor, ev, batch_size=25, return_predictions=True)
            log.setdefault("interim_eval", []).append({"step": step + 1, "accuracy": a_ev,
                                                       "per_type": per_type_accuracy(ev, p_ev)})
            print(f"[eval] step {step + 1} held-out(100, start=5000) {a_ev:.3f} {per_type_accuracy(ev, p_ev)} "
                  f"({time.time() - te:.0f}s)", flush=True)
            model.train()
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.lm_steps:
            # Intermediate checkpoints, so an interrupted run still leaves a usable model.
            save(model, processor, args.out, {**log, "partial_stage2_steps": step + 1})
    model.eval()
    log["stage2"] = {"steps": args.lm_steps, "images_per_step": args.images_per_step,
                     "questions_per_image": args.questions_per_image, "lr": args.lm_lr, "tower_lr": args.tower_lr,
                     "aux_images": args.aux_images, "aux_weight": args.aux_weight,
                     "seconds": round(time.time() - t0, 1),
                     "history_columns": ["step", "vqa_loss", "answer_acc", "aux_loss", "aux_cell_shape_acc"],
                     "history": hist[::5] + hist[-1:]}


# ----------------------------------------------------------------------------- main


def save(model: Any, processor: Any, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)  # also writes the tokenizer files
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")


def per_type_accuracy(samples: list[shapes.Sample], preds: list[str]) -> dict[str, float]:
    acc: dict[str, list[int]] = {}
    for s, p in zip(samples, preds):
        acc.setdefault(s.qtype, []).append(int(p == s.answer))
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(acc.items())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-lr", type=float, default=1.5e-3)
    ap.add_argument("--lm-steps", type=int, default=1600)
    ap.add_argument("--images-per-step", type=int, default=2)
    ap.add_argument("--questions-per-image", type=int, default=16)
    ap.add_argument("--lm-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--tower-lr", type=float, default=6e-4, help="stage-2 tower LR (0: frozen tower)")
    ap.add_argument("--aux-images", type=int, default=4, help="extra images per stage-2 step for the tower's aux loss")
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--scene-weight", type=float, default=2.0, help="weight of the stage-2 per-patch scene head")
    ap.add_argument("--all-questions", type=int, default=0, help="1: sample from every askable question")
    ap.add_argument("--vision-bf16", type=int, default=1, help="1: bf16 autocast for the stage-1 forward pass")
    ap.add_argument("--eval-every", type=int, default=400, help="stage-2 steps between interim held-out evaluations")
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=400, help="stage-2 steps between interim checkpoints")
    ap.add_argument("--stage1-cache", type=Path, default=None,
                    help="folder to save/reuse the stage-1 vision tower (for re-running stage 2 only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    tokenizer = shapes.build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args.lm_layers)
    model.config.use_cache = True
    log: dict[str, Any] = {"seed": args.seed, "args": {k: str(v) for k, v in vars(args).items()},
                           "torch": torch.__version__, "num_parameters": sum(p.numel() for p in model.parameters())}
    print(f"parameters: {log['num_parameters']:,}", flush=True)
    cache = args.stage1_cache
    if cache is not None and (cache / "tower.pt").exists():
        # Stage 2 only depends on the stage-1 weights (its data/RNG are seeded separately), so
        # reusing a cached tower gives the same result as a full run with the same arguments.
        model.model.vision_tower.load_state_dict(torch.load(cache / "tower.pt"))
        log["stage1"] = json.loads((cache / "stage1_log.json").read_text())
        log["stage1"]["loaded_from_cache"] = True
        print(f"loaded stage-1 tower from {cache}", flush=True)
    else:
        tower_init, heads = stage1_init(tokenizer, args.seed)
        model.model.vision_tower.load_state_dict(tower_init)
        train_vision(model, processor, args, log, heads)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(model.model.vision_tower.state_dict(), cache / "tower.pt")
            (cache / "stage1_log.json").write_text(json.dumps(log["stage1"]))
    train_vqa(model, tokenizer, processor, args, log)
    log["train_seconds"] = round(time.time() - t_start, 1)

    t_eval = time.time()
    heldout = shapes.make_samples("heldout", args.eval_samples, seed=args.seed, per_image=1)
    acc, preds = shapes.evaluate(model, processor, heldout, batch_size=25, return_predictions=True)
    log["heldout"] = {"samples": len(heldout), "seed": args.seed, "per_image": 1, "accuracy": round(acc, 4),
                      "per_type": per_type_accuracy(heldout, preds), "seconds": round(time.time() - t_eval, 1)}
    print(f"held-out accuracy {acc:.4f} {log['heldout']['per_type']}", flush=True)

    log["total_seconds"] = round(time.time() - t_start, 1)
    save(model, processor, args.out, log)
    return log


if __name__ == "__main__":
    main()
