"""Accuracy retention vs visual-token budget on the bundled shapes VQA model (held-out questions).

Methods: VisionZip, SparseVLM, CDPruner (instruction = the question, relevance from the LLM input
embeddings: the demo checkpoint has no CLIP text tower) and DivPrune (the library's), and two baselines any reviewer asks for, applied to
the same vision features before the projector: random token dropping and average pooling to the same
count. VoCo-LLaMA needs its own trained model; its result is merged from benchmarks/results/voco_demo.json
when that file exists, and the tuned VisionZip 64 rows (VisionZip‡ 64: projector tuned; VisionZip 64 + LoRA) from
benchmarks/results/tune_demo.json (benchmarks/tune_demo.py, the same held-out questions).

    python benchmarks/bench_retention.py [--questions 300] [--out benchmarks/results]

Writes retention.json and retention.png. Offline; random dropping is seeded per question.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor  # noqa: E402
from slimvlm.cli import BUNDLED_MODEL  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402
from slimvlm.demo import shapes  # noqa: E402

BUDGETS = (576, 192, 128, 64, 32, 16)
SPARSEVLM_PRESETS = (192, 128, 96, 64)


def pooled_grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tokens, as square as possible (64 -> 8x8, 128 -> 16x8)."""
    rows = max(r for r in range(1, int(math.isqrt(tokens)) + 1) if tokens % r == 0)
    return tokens // rows, rows


def reduce_patches(patches: torch.Tensor, tokens: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Baselines on [B, P, C] patch features: keep `tokens` random patches (raster order) or average-pool the grid."""
    batch, count, width = patches.shape
    if tokens >= count:
        return patches
    if mode == "random":
        keep = torch.stack([torch.randperm(count, generator=generator)[:tokens].sort().values for _ in range(batch)])
        return patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
    side = math.isqrt(count)
    grid = patches.transpose(1, 2).reshape(batch, width, side, side)
    return F.adaptive_avg_pool2d(grid, pooled_grid(tokens)).flatten(2).transpose(1, 2)


@torch.inference_mode()
def baseline_answers(model, processor, samples, tokens: int, mode: str, batch_size: int, seed: int) -> list[str]:
    """Greedy answers with the stock layer -2 patch features reduced by a baseline, fed as inputs_embeds."""
    generator = torch.Generator().manual_seed(seed)
    # The processor writes `tokens` placeholders per image (any VisionZip split with d + c = tokens does).
    processor.set_compression({"method": "visionzip", "dominant": tokens - 1, "contextual": 1} if tokens < 576 else {"method": "none"})
    language = model.model
    answers = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        inputs = processor(text=[shapes.build_prompt(s.question) for s in batch], images=[s.image for s in batch],
                           padding=True, return_tensors="pt")
        hidden = language.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        features = language.multi_modal_projector(reduce_patches(hidden[:, 1:], tokens, mode, generator))
        embeds = language.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
        out = model.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], max_new_tokens=3, do_sample=False)
        answers += [shapes.normalize_answer(t) for t in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
    return answers


def accuracy(answers: list[str], samples) -> float:
    return sum(a == s.answer for a, s in zip(answers, samples)) / len(samples)


@torch.inference_mode()
def cls_attention_on_objects(model, processor, images: int, seed: int, dominant: int = 53) -> dict:
    """How VisionZip's score sees the held-out images: the share of the CLS attention (layer of
    ``vision_feature_layer``, summed over heads) that lands on the patches showing an object, against
    those patches' share of the grid, and the share of object patches among the top-``dominant``
    patches (VisionZip's dominant tokens at 64 = CLS + 53)."""
    from slimvlm.visionzip import cls_attention_and_keys, resolve_feature_layer

    tower = model.model.vision_tower
    layers = tower.encoder.layers
    index = resolve_feature_layer(model.config.vision_feature_layer, len(layers))  # input: hidden_states[index]
    attention_share, patch_share, recall = [], [], []
    for start in range(0, images, 25):
        scenes = [shapes.make_scene_batch("heldout", seed, i) for i in range(start, min(start + 25, images))]
        pixels = processor.image_processor([s[1] for s in scenes], return_tensors="pt")["pixel_values"]
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        scores, _ = cls_attention_and_keys(layers[index], hidden[index])
        top = scores.topk(dominant, dim=-1).indices
        for row, (objects, _, mask, _) in enumerate(scenes):
            shown = torch.from_numpy(shapes.patch_cover(objects, mask) > 0)
            attention_share.append(float(scores[row][shown].sum() / scores[row].sum()))
            patch_share.append(float(shown.float().mean()))
            recall.append(float(shown[top[row]].sum() / shown.sum()))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"images": images, "layer": index, "object_patch_share": mean(patch_share),
            "cls_attention_on_object_patches": mean(attention_share),
            "times_fair_share": mean(attention_share) / mean(patch_share),
            f"object_patches_in_top_{dominant}": mean(recall)}


def run(args) -> dict:
    from tqdm import tqdm

    torch.manual_seed(0)
    model = SlimLlavaForConditionalGeneration.from_pretrained(args.model).eval()
    processor = SlimLlavaProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    samples = shapes.make_samples("heldout", args.questions, seed=args.seed, per_image=1)
    depth = model.config.text_config.num_hidden_layers
    attention = cls_attention_on_objects(model, processor, 100, args.seed)
    print(f"CLS attention on object patches: {attention}")

    jobs = [("none", 576, {"method": "none"})]
    jobs += [("visionzip", k, {"method": "visionzip", "tokens": k}) for k in BUDGETS if k < 576]
    jobs += [("sparsevlm", k, sparsevlm_setting(depth, k)) for k in SPARSEVLM_PRESETS]
    jobs += [("cdpruner", k, {"method": "cdpruner", "tokens": k, "relevance": "llm_embeddings"}) for k in BUDGETS if k < 576]
    jobs += [("divprune", k, {"method": "divprune", "tokens": k}) for k in BUDGETS if k < 576]
    jobs += [(mode, k, None) for mode in ("random", "avgpool") for k in BUDGETS if k < 576]

    rows = []
    for method, tokens, compression in tqdm(jobs, desc="settings"):
        start = time.perf_counter()
        if compression is None:
            model.set_compression({"method": "none"})
            answers = baseline_answers(model, processor, samples, tokens, method, args.batch_size, args.seed)
            score = accuracy(answers, samples)
        else:
            model.set_compression(compression)
            processor.set_compression(model.config.compression)
            score = shapes.evaluate(model, processor, samples, batch_size=args.batch_size)
        row = {"method": method, "tokens": tokens, "accuracy": score, "compression": compression, "seconds": round(time.perf_counter() - start, 1)}
        if method == "sparsevlm":
            # The budgets are the preset's; what they mean on this depth is the equal-token count (same for every
            # sample here: all have 576 visual tokens).
            equal_tokens = model.sparsevlm_report.equal_tokens
            row["equal_tokens"] = sum(equal_tokens) / len(equal_tokens)
        rows.append(row)
        tqdm.write(f"{method:>9} {tokens:>4}: {score:.3f}")

    dense = rows[0]["accuracy"]
    for row in rows:
        row["retention"] = row["accuracy"] / dense if dense else None
    voco = ROOT / "benchmarks" / "results" / "voco_demo.json"
    tuned = ROOT / "benchmarks" / "results" / "tune_demo.json"
    result = {
        "model": str(args.model),
        "questions": len(samples),
        "seed": args.seed,
        "text_layers": depth,
        "cls_attention": attention,
        "rows": rows,
        "voco": json.loads(voco.read_text()) if voco.exists() else None,
        "tuned": json.loads(tuned.read_text()) if tuned.exists() else None,
    }
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    dense = result["rows"][0]["accuracy"]
    for method, style in (("visionzip", "o-"), ("sparsevlm", "s-"), ("cdpruner", "^-"), ("divprune", "v-"),
                          ("random", "x--"), ("avgpool", "d--")):
        points = sorted((r["tokens"], r["accuracy"]) for r in result["rows"] if r["method"] == method)
        if points:
            ax.plot(*zip(*points), style, label=method)
    voco = result.get("voco")
    if voco:
        ax.plot([voco["num_voco_tokens"]], [voco["accuracy"]["voco_after_finetuning_cached"]], "*", markersize=12,
                label=f"VoCo-LLaMA (fine-tuned, {voco['eval_samples']} q)")
    for row in (result.get("tuned") or {}).get("rows", [])[2:]:
        ax.plot([64], [row["accuracy"]], "^" if "LoRA" in row["label"] else "v", markersize=9, label=row["label"])
    ax.axhline(dense, color="gray", linestyle=":", label=f"uncompressed (576): {dense:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per image")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"Bundled shapes VQA model, {result['questions']} held-out questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "retention.json").write_text(json.dumps(result, indent=2))
    plot(result, args.out / "retention.png")
    print(f"wrote {args.out / 'retention.json'} and retention.png")


if __name__ == "__main__":
    main()
