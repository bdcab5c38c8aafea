"""Train the tiny LLaVA-1.5-architecture demo model on the procedural shapes VQA task (CPU).

    python -m slimvlm.demo.train --out slimvlm/demo/assets/tiny-shapes-llava [--seed 0]

The defaults reproduce the shipped model (one thread, deterministic; about 48 min on this machine).

Stage 1 pre-trains the CLIP vision tower alone (192 px, 8 px patches: a 24x24 grid).  The main
objective reads the CLS token at the layer LLaVA uses (``vision_feature_layer=-2``, after
``post_layernorm``) and predicts which colour / shape / colour-shape combinations are present and
how many objects there are, so the CLS token must *attend* to the few object patches: its attention
in the last layers becomes informative the way real CLIP's is (what VisionZip relies on).
Auxiliary dense heads make each patch feature say what it shows (colour and shape of the object
covering it, if any), which grid cell it lies in, and the scene's per-colour / per-shape counts;
per-object information stays local to the object's own ~4 patches.  The tower's position
embeddings start from a 2D sin-cos table (stock layout, just a better initialisation).

Stage 2 trains projector + Llama LM on VQA (loss on the answer and ``</s>`` only) with the tower
frozen, as LLaVA trains its projector and LM on a frozen CLIP.  The layer -2 patch features of a
pool of training images are computed once.  Each image's prefix (``<s> USER :`` + its image
embeddings) goes through the LM once and its KV cache is repeated for the image's questions
(identical to running the full sequences: attention is causal and the prefix is the same).  Phase
A feeds 64 of the 576 image tokens (those showing objects plus random others) at their original
position ids (a step ~8x cheaper); phase B the full 576-token sequences the model sees at
inference.  The LM is initialised with std 1/sqrt(width) instead of Llama's 0.02 (see
``init_language_weights``: with 0.02 the tiny LM did not learn to read the image on this budget).

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
from slimvlm.compat import call_with_cache, output_cache  # noqa: E402

PATCH = shapes.PATCH  # 8 px
GRID_PATCHES = shapes.GRID_PATCHES  # 24 -> 576 image tokens, like LLaVA-1.5


def build_model(tokenizer: Any, lm_layers: int = 16, lm_init_std: float | None = None) -> "LlavaForConditionalGeneration":
    """Tiny LLaVA-1.5: CLIP ViT (192 px, patch 8, 6 layers x 128) + 2-layer MLP projector + Llama (width 128)."""
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
    init_language_weights(model, lm_init_std)
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


def init_language_weights(model: Any, std: float | None = None) -> None:
    """Re-draw the LM, projector and lm_head weight matrices from N(0, std), std = hidden_size ** -0.5
    by default (0.088 at width 128); norms keep their ones, biases their zeros.

    Llama's default ``initializer_range`` of 0.02 is sized for 4096-wide models (~1/sqrt(4096)); at
    width 128 it starts the query-key products so close to zero that the LM learns to read the image
    very slowly.  Measured on this task with clean synthetic image features (48 image tokens, 4
    layers, lr 1e-3, 16 images x 8 questions per step): 0.68 answer accuracy after 1,500 steps with
    0.02, 0.96 after 1,100 steps with 1/sqrt(width).  The value is written to
    ``text_config.initializer_range`` so the config says what was used."""
    text = model.config.text_config
    std = text.hidden_size ** -0.5 if std is None else std
    text.initializer_range = std
    modules = [model.model.language_model, model.model.multi_modal_projector, model.lm_head]
    with torch.no_grad():
        for module in (m for root in modules for m in root.modules()):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def build_processor(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=shapes.IMAGE_TOKEN, chat_template=shapes.CHAT_TEMPLATE)


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
    for o in objects:
        ci, si = COLOR_IDX[o.color] - 1, SHAPE_IDX[o.shape] - 1
        present[[ci * N_SHP + si, N_COL * N_SHP + ci, N_COL * N_SHP + N_COL + si]] = 1.0
    # What each patch shows (local: only the object's own ~4 patches know about it).
    cover = torch.from_numpy(shapes.patch_cover(objects, mask))
    obj_col = torch.tensor([0] + [COLOR_IDX[o.color] for o in objects])
    obj_shp = torch.tensor([0] + [SHAPE_IDX[o.shape] for o in objects])
    # Which grid cell each patch lies in (24 patches / 3 cells = 8 patches per cell side).
    rows = torch.arange(GRID_PATCHES) // shapes.CELL_PATCHES
    patch_cell = (rows[:, None] * shapes.GRID + rows[None, :]).flatten()
    # Scene-level counts (objects per colour, per shape), which every patch also learns to carry.
    counts = torch.zeros(N_COL + N_SHP, dtype=torch.long)
    for o in objects:
        counts[COLOR_IDX[o.color] - 1] += 1
        counts[N_COL + SHAPE_IDX[o.shape] - 1] += 1
    return {"present": present, "count": torch.tensor(len(objects) - 1), "counts": counts,
            "patch_col": obj_col[cover], "patch_shp": obj_shp[cover], "patch_cell": patch_cell}


class VisionHeads(nn.Module):
    """Heads for the tower objectives: CLS -> global attributes; patch -> the colour and shape of
    the object it shows (if any), its grid cell, and the scene's per-colour/per-shape counts.

    Used in stage 1 only; thrown away afterwards."""

    N_COUNT = shapes.MAX_OBJECTS + 1

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls = nn.Linear(dim, N_COL * N_SHP + N_COL + N_SHP + shapes.MAX_OBJECTS)
        self.patch = nn.Linear(dim, N_COL + 1 + N_SHP + 1 + N_CELL + (N_COL + N_SHP) * self.N_COUNT)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor,
                t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.cls(cls)
        n = t["present"].shape[1]
        cls_loss = (F.binary_cross_entropy_with_logits(c[:, :n], t["present"], reduction="sum") / c.shape[0]
                    + F.cross_entropy(c[:, n:], t["count"]))
        p = self.patch(patches)
        col, shp = p[..., :N_COL + 1], p[..., N_COL + 1:N_COL + N_SHP + 2]
        obj = t["patch_col"] > 0  # ~10 of 576 patches: their own term, or background would swamp them
        patch_loss = (F.cross_entropy(col.flatten(0, 1), t["patch_col"].flatten())
                      + F.cross_entropy(shp.flatten(0, 1), t["patch_shp"].flatten())
                      + F.cross_entropy(col[obj], t["patch_col"][obj]) + F.cross_entropy(shp[obj], t["patch_shp"][obj]))
        off = N_COL + N_SHP + 2
        patch_loss = patch_loss + F.cross_entropy(p[..., off:off + N_CELL].flatten(0, 1), t["patch_cell"].flatten())
        cnt = p[..., off + N_CELL:].unflatten(-1, (N_COL + N_SHP, self.N_COUNT))  # (B, P, 8, 5)
        cnt_t = t["counts"][:, None, :].expand(-1, cnt.shape[1], -1)
        count_loss = F.cross_entropy(cnt.flatten(0, 2), cnt_t.flatten())
        # Logged: whole-image exact match of the CLS presence readout, CLS count accuracy, the
        # shape / colour accuracy on object patches and the accuracy of the per-patch scene counts.
        exact = ((c[:, :n] > 0).float() == t["present"]).all(-1).float().mean().item()
        count = (c[:, n:].argmax(-1) == t["count"]).float().mean().item()
        oshp = (shp[obj].argmax(-1) == t["patch_shp"][obj]).float().mean().item()
        ocol = (col[obj].argmax(-1) == t["patch_col"][obj]).float().mean().item()
        pcnt = (cnt.argmax(-1) == cnt_t).float().mean().item()
        stats = {"cls": cls_loss.item(), "patch": patch_loss.item(), "counts": count_loss.item(), "cls_exact": exact,
                 "cls_count": count, "obj_shp": oshp, "obj_col": ocol, "patch_counts": pcnt}
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


def encode_pool(model: Any, processor: Any, args: argparse.Namespace
                ) -> tuple[torch.Tensor, list[list[shapes.Obj]], list[torch.Tensor]]:
    """Layer -2 patch features (CLS dropped, float32, exactly what LLaVA feeds the projector) of
    ``--pool-images`` new training images, computed once with the frozen stage-1 tower, with each
    image's objects and the indices of the patches that show an object."""
    tower = model.model.vision_tower
    base = args.vision_steps * args.vision_batch  # after the stage-1 images: new pictures
    feats, scenes, shown = [], [], []
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, args.pool_images, 32):
            images = []
            for i in range(base + start, base + min(start + 32, args.pool_images)):
                objects, image, mask, _ = shapes.make_scene_batch("train", args.seed, i)
                images.append(image)
                scenes.append(objects)
                shown.append(torch.from_numpy(shapes.patch_cover(objects, mask).nonzero()[0]))
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            feats.append(tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
    print(f"[pool] {args.pool_images} images encoded ({time.time() - t0:.0f}s)", flush=True)
    return torch.cat(feats), scenes, shown


def token_subset(n_patch: int, k: int, shown: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``k`` of ``n_patch`` image tokens: the patches that show an object, then
    random others (so every question stays answerable from the subset)."""
    if k >= n_patch:
        return torch.arange(n_patch)
    rest = torch.ones(n_patch, dtype=torch.bool)
    rest[shown] = False
    others = torch.nonzero(rest).flatten()
    others = others[torch.randperm(len(others), generator=gen)[:k - len(shown)]]
    return torch.cat([shown, others]).sort().values


def question_batch(tokenizer: Any, scenes: list[list[shapes.Obj]], q_per_img: int,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """``q_per_img`` questions per scene: suffix ids (right-padded, everything after ``<image>``
    plus answer and ``</s>``), the positions whose next token is the answer / ``</s>``, the targets,
    and the question types.  A question type is drawn uniformly (rare types are not starved), then
    an answer value uniformly (so e.g. "is there ...?" is yes/no balanced), then a question."""
    image_id = tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN)
    suffixes, qtypes = [], []
    for objects in scenes:
        by_type: dict[str, dict[str, list]] = {}
        for c in shapes.all_questions(objects):
            by_type.setdefault(c[0], {}).setdefault(c[2], []).append(c)
        types = sorted(by_type)
        for _ in range(q_per_img):
            by_answer = by_type[types[rng.integers(len(types))]]
            group = by_answer[sorted(by_answer)[rng.integers(len(by_answer))]]
            qtype, q, a = group[rng.integers(len(group))]
            ids = tokenizer(shapes.build_prompt(q)).input_ids
            k = ids.index(image_id)
            suffixes.append(ids[k + 1:] + [tokenizer.convert_tokens_to_ids(a), tokenizer.eos_token_id])
            qtypes.append(qtype)
    length = max(len(s) for s in suffixes)
    suffix = torch.full((len(suffixes), length), tokenizer.pad_token_id, dtype=torch.long)
    pos = torch.zeros(len(suffixes), 2, dtype=torch.long)
    for j, s in enumerate(suffixes):
        suffix[j, :len(s)] = torch.tensor(s)
        pos[j] = torch.tensor([len(s) - 3, len(s) - 2])
    return suffix, pos, torch.gather(suffix, 1, pos + 1), qtypes


def prefix_ids(tokenizer: Any) -> list[int]:
    ids = tokenizer(shapes.build_prompt("x")).input_ids
    return ids[:ids.index(tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN))]


def vqa_loss(model: Any, pre_ids: list[int], feats: torch.Tensor, keep: torch.Tensor, suffix: torch.Tensor,
             pos: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss on answer + ``</s>``; each image's prefix goes through the LM once and its KV cache is
    repeated for the image's questions (identical to full per-question sequences: attention is
    causal and the prefix is the same).

    ``feats`` [n_img, 576, C] are layer -2 patch features; ``keep`` [n_img, k] (sorted) selects the
    image tokens that enter the sequence, each at its original position id, so a subset is the
    full sequence with the other image tokens left out (k = 576: the ordinary LLaVA sequence)."""
    lm = model.model.language_model
    n_img, n_patch = feats.shape[:2]
    q = suffix.shape[0] // n_img
    kept = feats.gather(1, keep.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    img = model.model.multi_modal_projector(kept)
    pre = lm.get_input_embeddings()(torch.tensor(pre_ids)).unsqueeze(0).expand(n_img, -1, -1)
    n_pre = len(pre_ids)
    prefix_pos = torch.cat([torch.arange(n_pre).expand(n_img, -1), n_pre + keep], dim=1)
    cache = output_cache(lm(inputs_embeds=torch.cat([pre, img], dim=1), position_ids=prefix_pos, use_cache=True))
    cache.batch_repeat_interleave(q)
    start = n_pre + n_patch
    position_ids = torch.arange(start, start + suffix.shape[1]).unsqueeze(0).expand(suffix.shape[0], -1)
    # Right padding needs no mask: pads come after the supervised positions in a causal model.
    h = call_with_cache(lm, keyword_of=type(lm).forward, cache=cache, input_ids=suffix, position_ids=position_ids,
                        use_cache=True).last_hidden_state
    h = torch.gather(h, 1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    logits = model.lm_head(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, logits[:, 0].argmax(-1) == target[:, 0]


def train_lm(model: Any, tokenizer: Any, processor: Any, args: argparse.Namespace, log: dict) -> None:
    """Stage 2: projector + LM on VQA with the tower frozen (LLaVA's own recipe also trains the
    projector and LM on features of a frozen CLIP).

    Phase A (``--subset-steps``) feeds each image as ``--subset-tokens`` of its 576 patch tokens (the
    ones showing objects plus random others, at their original positions), which makes a step ~8x
    cheaper; phase B (``--full-steps``) trains on the ordinary full 576-token sequences the model
    sees at inference.
    One warmup + cosine schedule spans both phases."""
    # Re-seed: stage 2 must not depend on whether stage 1 ran here or was loaded from the cache.
    torch.manual_seed(args.seed + 1)
    model.model.vision_tower.requires_grad_(False)
    feats, scenes, shown = encode_pool(model, processor, args)
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) \
        + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    pre_ids = prefix_ids(tokenizer)
    n_patch = feats.shape[1]
    total = args.subset_steps + args.full_steps
    t0, hist, recent = time.time(), [], []
    model.train()
    for step in range(total):
        subset = step < args.subset_steps
        n_img, q = (args.images_per_step, args.questions_per_image) if subset else \
            (args.full_images_per_step, args.full_questions_per_image)
        k = args.subset_tokens if subset else n_patch
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lm_lr, args.warmup)
        idx = torch.randint(len(scenes), (n_img,), generator=gen)
        keep = torch.stack([token_subset(n_patch, k, shown[i], gen) for i in idx.tolist()])
        suffix, pos, target, qtypes = question_batch(tokenizer, [scenes[i] for i in idx.tolist()], q, rng)
        loss, ok = vqa_loss(model, pre_ids, feats[idx], keep, suffix, pos, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + ok.tolist())[-800:]
        hist.append((step, k, round(loss.item(), 4), round(ok.float().mean().item(), 4)))
        if step % 50 == 0 or step == total - 1:
            print(f"[lm] step {step} tokens {k} loss {loss.item():.4f} answer acc (last 800) "
                  f"{sum(recent) / len(recent):.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    log["stage2"] = {"pool_images": args.pool_images, "subset_steps": args.subset_steps,
                     "subset_tokens": args.subset_tokens, "images_per_step": args.images_per_step,
                     "questions_per_image": args.questions_per_image, "full_steps": args.full_steps,
                     "full_images_per_step": args.full_images_per_step,
                     "full_questions_per_image": args.full_questions_per_image, "lr": args.lm_lr,
                     "seconds": round(time.time() - t0, 1),
                     "history_columns": ["step", "image_tokens", "vqa_loss", "answer_acc"],
                     "history": hist[::10] + hist[-1:]}


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--vision-steps", type=int, default=600)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-lr", type=float, default=1.5e-3)
    ap.add_argument("--vision-bf16", type=int, default=1, help="1: bf16 autocast for the stage-1 forward pass")
    ap.add_argument("--lm-init-std", type=float, default=None,
                    help="init std of the LM, projector and lm_head weights (default: hidden_size ** -0.5)")
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--pool-images", type=int, default=3000, help="stage-2 training images (features encoded once)")
    ap.add_argument("--subset-steps", type=int, default=6000, help="stage-2 phase A steps (image token subsets)")
    ap.add_argument("--subset-tokens", type=int, default=64, help="image tokens per image in phase A")
    ap.add_argument("--images-per-step", type=int, default=16)
    ap.add_argument("--questions-per-image", type=int, default=8)
    ap.add_argument("--full-steps", type=int, default=300, help="stage-2 phase B steps (all 576 image tokens)")
    ap.add_argument("--full-images-per-step", type=int, default=8)
    ap.add_argument("--full-questions-per-image", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--stage1-cache", type=Path, default=None,
                    help="folder to save/reuse the stage-1 vision tower (for re-running stage 2 only)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()
    tokenizer = shapes.build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args.lm_layers, args.lm_init_std)
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
    train_lm(model, tokenizer, processor, args, log)
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
