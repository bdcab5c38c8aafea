"""Train the tiny LLaVA-1.5-architecture demo model on the procedural shapes VQA task (CPU).

    python -m slimvlm.demo.train --out slimvlm/demo/assets/tiny-shapes-llava [--seed 0]

Stage 1 pre-trains the CLIP vision tower alone.  The main objective reads the CLS token at the
layer LLaVA uses (``vision_feature_layer=-2``, after ``post_layernorm``) and predicts the colour and
shape of every grid cell, so the CLS token must *attend* to the objects: its attention in the
last layers becomes informative the way real CLIP's is (what VisionZip relies on).  Auxiliary
dense heads make each patch feature predict what covers it and what its grid cell contains,
which gives the LM linearly readable patch features (real CLIP patch features are also rich).
The heads are thrown away afterwards.

Stage 2 freezes the tower and trains projector + Llama LM on VQA with the loss on the answer
and ``</s>`` only.  To make 576-token sequences affordable on a CPU, each image is encoded once
and its prefix (``<s> USER :`` + 576 image embeddings) goes through the LM once; the KV cache is
then repeated for ``--questions-per-image`` questions (mathematically identical to running the
full sequences, since attention is causal and the prefix is identical).

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
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                         tokenizer.pad_token_id)
    return model


def build_processor(tokenizer: Any) -> Any:
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=shapes.IMAGE_TOKEN)


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
    return {"present": present, "count": torch.tensor(len(objects) - 1),
            "patch_col": obj_col[centre], "patch_shp": obj_shp[centre],
            "patch_cell_col": cell_col[patch_cell], "patch_cell_shp": cell_shp[patch_cell]}


class VisionHeads(nn.Module):
    """Throw-away heads for stage 1: CLS -> global attributes, patch -> local + cell attributes."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls = nn.Linear(dim, N_COL * N_SHP + N_COL + N_SHP + shapes.MAX_OBJECTS)
        self.patch = nn.Linear(dim, 2 * (N_COL + 1 + N_SHP + 1))

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
        # Logged: whole-image exact match of the CLS presence readout, count accuracy.
        exact = ((c[:, :n] > 0).float() == t["present"]).all(-1).float().mean().item()
        count = (c[:, n:].argmax(-1) == t["count"]).float().mean().item()
        stats = {"cls": cls_loss.item(), "patch": patch_loss.item(), "cls_exact": exact, "cls_count": count}
        return cls_loss + patch_loss, stats


def vision_batch(processor: Any, seed: int, start: int, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, targets = [], []
    for i in range(start, start + n):
        objects, image, mask, _ = shapes.make_scene_batch("train", seed, i)
        images.append(image)
        targets.append(vision_targets(objects, mask))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def train_vision(model: Any, processor: Any, args: argparse.Namespace, log: dict) -> None:
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)  # flattened in transformers v5
    heads = VisionHeads(model.config.vision_config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01)
    t0, hist = time.time(), []
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.vision_steps, args.vision_lr, args.warmup)
        pixels, t = vision_batch(processor, args.seed, step * args.vision_batch, args.vision_batch)
        out = tower(pixel_values=pixels, output_hidden_states=True)
        # The layer LLaVA feeds to the LM (vision_feature_layer=-2); post_layernorm like CLIP's pooler.
        h = vm.post_layernorm(out.hidden_states[-2])
        loss, st = heads(h[:, 0], h[:, 1:], t)
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
                     "history": hist[::5] + [hist[-1]]}


# ----------------------------------------------------------------------------- stage 2


def vqa_batch(tokenizer: Any, processor: Any, seed: int, start: int, n_img: int, q_per_img: int,
              step_rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels (n_img), suffix ids (n_img*q, L, right-padded) and (position, target) pairs."""
    image_id = tokenizer.convert_tokens_to_ids(shapes.IMAGE_TOKEN)
    images, suffixes = [], []
    for i in range(start, start + n_img):
        _, image, _, cands = shapes.make_scene_batch("train", seed, i)
        images.append(image)
        # Sample question types uniformly first (so rare types are not starved), then a question.
        by_type: dict[str, list] = {}
        for c in cands:
            by_type.setdefault(c[0], []).append(c)
        types = sorted(by_type)
        for _ in range(q_per_img):
            _, q, a = by_type[types[step_rng.integers(len(types))]][0]
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


def vqa_loss(model: Any, pre_ids: list[int], pixels: torch.Tensor, suffix: torch.Tensor, pos: torch.Tensor,
             target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Loss on answer + </s>, sharing each image's prefix across its questions via the KV cache."""
    lm = model.model.language_model
    n_img = pixels.shape[0]
    q = suffix.shape[0] // n_img
    with torch.no_grad():  # frozen tower
        feats = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
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
    logits = model.lm_head(h)
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    acc = (logits[:, 0].argmax(-1) == target[:, 0]).float().mean().item()
    return loss, acc


def train_vqa(model: Any, tokenizer: Any, processor: Any, args: argparse.Namespace, log: dict) -> None:
    model.model.vision_tower.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters()) \
        + list(model.lm_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lm_lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    pre_ids = prefix_ids(tokenizer)
    # Stage-2 images use indices after those of stage 1, so they are new pictures.
    base = args.vision_steps * args.vision_batch
    t0, hist, ema = time.time(), [], None
    model.train()
    for step in range(args.lm_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lm_steps, args.lm_lr, args.warmup)
        batch = vqa_batch(tokenizer, processor, args.seed, base + step * args.images_per_step, args.images_per_step,
                          args.questions_per_image, rng)
        loss, acc = vqa_loss(model, pre_ids, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = acc if ema is None else 0.95 * ema + 0.05 * acc
        hist.append((step, round(loss.item(), 4), round(acc, 4)))
        if step % 25 == 0 or step == args.lm_steps - 1:
            print(f"[vqa] step {step} loss {loss.item():.4f} acc(ema) {ema:.3f} ({time.time() - t0:.0f}s)", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.lm_steps:
            # Intermediate checkpoints, so an interrupted run still leaves a usable model.
            save(model, processor, args.out, {**log, "partial_stage2_steps": step + 1})
    model.eval()
    log["stage2"] = {"steps": args.lm_steps, "images_per_step": args.images_per_step,
                     "questions_per_image": args.questions_per_image, "lr": args.lm_lr,
                     "seconds": round(time.time() - t0, 1), "history": hist[::5] + [hist[-1]]}


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
    ap.add_argument("--lm-layers", type=int, default=16)
    ap.add_argument("--vision-steps", type=int, default=400)
    ap.add_argument("--vision-batch", type=int, default=16)
    ap.add_argument("--vision-lr", type=float, default=1e-3)
    ap.add_argument("--lm-steps", type=int, default=1000)
    ap.add_argument("--images-per-step", type=int, default=4)
    ap.add_argument("--questions-per-image", type=int, default=8)
    ap.add_argument("--lm-lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--save-every", type=int, default=250, help="stage-2 steps between interim checkpoints")
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
        train_vision(model, processor, args, log)
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
