"""Prefill time, peak memory and KV-cache bytes vs retained visual tokens, against the uncompressed model.

Model: LLaVA-1.5-7B shapes — CLIP ViT-L/14-336 tower (24 layers, 1024 wide, 577 tokens), 2-layer MLP
projector, a Llama language model 4096 wide (32 heads, FFN 11008, vocab 32064) with fewer layers so it
fits this machine — random weights, CPU, batch 1, a 40-token question. Every setting runs in the same
process against `{"method": "none"}`.

    python benchmarks/bench_speed.py [--text-layers 4] [--dtypes float32 bfloat16] [--repeats 3]

Reported per setting:
- prefill seconds (median of --repeats, after one warm-up): vision tower + compression + LLM forward;
- ideal speedup: the ratio of prefill FLOPs (analytic count below), and the measured speedup next to it;
- the vision tower alone for the uncompressed setting: its share of prefill time next to its share of prefill
  FLOPs (what compression cannot shrink; where the two differ, the FLOP ratio overstates the ideal);
- compression step: seconds of the method's own work (VisionZip: CLS row + selection + merge) as a share of
  the compressed prefill;
- peak memory: growth of the process's peak RSS during the prefill (Linux VmHWM, reset before each run; the
  script re-executes itself with MALLOC_MMAP_THRESHOLD_ set so freed tensors go back to the OS and each
  run's peak is its own, not the allocator's cache);
- KV-cache bytes after prefill (sum over layers of K and V).
Writes results/speed.json and results/speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402
from slimvlm.visionzip import cls_attention_and_keys, visionzip_select  # noqa: E402
from slimvlm.compat import output_cache  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from flops import llm_layer_flops, vit_flops  # noqa: E402, F401  (the shared FLOP model; re-exported)
from flops import prefill_flops as shared_prefill_flops  # noqa: E402

PROMPT_TOKENS = 40  # text tokens around the image (system-free LLaVA-1.5 prompt + a question)


def llava_7b_shaped_config(text_layers: int) -> SlimLlavaConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=32001)
    return SlimLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000)


# ----------------------------------------------------------------------------- FLOPs (benchmarks/flops.py)

def prefill_flops(config: SlimLlavaConfig, compression: dict, visual: int, text: int, schedule: list[int] | None = None) -> float:
    """Vision tower + projector + every decoder layer, for one image and `text` text tokens."""
    vision = config.vision_config
    # Stock LLaVA runs the whole tower; VisionZip stops after layer L-2 (layer L-1 is never used).
    tower_layers = vision.num_hidden_layers - (1 if compression["method"] == "visionzip" else 0)
    lengths = schedule or [visual + text] * config.text_config.num_hidden_layers
    return shared_prefill_flops(vision, config.text_config, views=1, tokens_per_view=(vision.image_size // vision.patch_size) ** 2 + 1,
                                tower_layers=tower_layers, projected=visual, lengths=lengths)


# ----------------------------------------------------------------------------- measurement

def reset_peak_rss() -> int:
    """Reset Linux's peak-RSS counter and return the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def inputs_for(model, visual: int, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    text = torch.randint(3, 32000, (PROMPT_TOKENS,), generator=generator)
    image = torch.full((visual,), model.config.image_token_id)
    ids = torch.cat([text[:5], image, text[5:]]).unsqueeze(0)
    assert ids.max() < vocab
    pixels = torch.randn(1, 3, 336, 336, generator=generator).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


@torch.inference_mode()
def measure(model, inputs: dict, repeats: int, warmup: bool = True) -> dict:
    if warmup:
        model(**inputs, use_cache=True, logits_to_keep=1)
    times, peaks = [], []
    for _ in range(repeats):
        before = reset_peak_rss()
        start = time.perf_counter()
        outputs = model(**inputs, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
        peaks.append(rss("VmHWM") - before)
    return {"prefill_s": statistics.median(times), "prefill_all_s": times, "peak_rss_growth_bytes": max(peaks),
            "kv_cache_bytes": kv_bytes(output_cache(outputs)), "outputs": outputs}


@torch.inference_mode()
def visionzip_step_seconds(model, pixel_values: torch.Tensor, compression: dict, repeats: int) -> float:
    """Time of VisionZip's own work (CLS row + selection + merge) on the real layer-(L-2) tensors."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in layers[: len(layers) - 2]:
        hidden = layer(hidden, None)
    features = layers[len(layers) - 2](hidden, None)

    def step() -> None:
        scores, keys = cls_attention_and_keys(layers[len(layers) - 2], hidden)
        visionzip_select(features, scores, keys, compression["dominant"], compression["contextual"])

    return median_seconds(step, repeats)


@torch.inference_mode()
def tower_seconds(model, pixel_values: torch.Tensor, repeats: int) -> float:
    """Time of the whole vision tower alone (the part no method shrinks), as the stock model runs it."""
    return median_seconds(lambda: model.model.vision_tower(pixel_values, output_hidden_states=True), repeats)


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `repeats` calls of `run()`, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def settings(text_layers: int) -> list[tuple[str, int, dict]]:
    rows = [("none", 576, {"method": "none"})]
    rows += [("visionzip", k, {"method": "visionzip", "tokens": k}) for k in (192, 128, 64)]
    rows += [("sparsevlm", k, sparsevlm_setting(text_layers, k)) for k in (192, 128, 64)]
    return rows


def run_dtype(model, dtype: torch.dtype, args, progress) -> list[dict]:
    model.to(dtype)
    rows = []
    config = model.config
    for method, tokens, compression in settings(config.text_config.num_hidden_layers):
        try:
            model.set_compression(compression)
        except (ValueError, TypeError) as error:
            progress.write(f"skip {method} {tokens}: {error}")
            progress.update(1)
            continue
        visual = model.image_token_count()
        inputs = inputs_for(model, visual, dtype)
        try:
            result = measure(model, inputs, args.repeats)
        except NotImplementedError as error:
            progress.write(f"skip {method} {tokens}: {error}")
            progress.update(1)
            continue
        outputs = result.pop("outputs")
        text = inputs["input_ids"].shape[1] - visual
        schedule = None
        if method == "sparsevlm":
            # Sequence length each decoder layer ran on: text + the visual tokens it processed.
            report = model.sparsevlm_report
            schedule = [text + count for count in report.processed_counts[0]]
            result["equal_tokens"] = report.equal_tokens[0]
        flops = prefill_flops(config, model.config.compression, visual, text, schedule)
        row = {"dtype": str(dtype).split(".")[-1], "method": method, "tokens": tokens, "visual_tokens_in": visual,
               "compression": model.config.compression, "prefill_flops": flops, **result}
        if method == "none":
            # Where the time goes that compression cannot remove: the tower's share of prefill time next
            # to its share of prefill FLOPs (the ideal speedup assumes the two are equal).
            vision = config.vision_config
            row["tower_s"] = tower_seconds(model, inputs["pixel_values"], args.repeats)
            row["tower_time_share"] = row["tower_s"] / row["prefill_s"]
            row["tower_flop_share"] = vit_flops(vision, (vision.image_size // vision.patch_size) ** 2 + 1,
                                                vision.num_hidden_layers) / flops
        if method == "visionzip":
            row["compression_step_s"] = visionzip_step_seconds(model, inputs["pixel_values"], model.config.compression, args.repeats)
        rows.append(row)
        progress.write(f"{row['dtype']:>8} {method:>9} {tokens:>4}: {row['prefill_s'] * 1e3:8.1f} ms  "
                       f"peak +{row['peak_rss_growth_bytes'] / 2**20:7.1f} MiB  kv {row['kv_cache_bytes'] / 2**20:6.1f} MiB")
        progress.update(1)
    dense = rows[0]
    for row in rows:
        row["measured_speedup"] = dense["prefill_s"] / row["prefill_s"]
        row["ideal_speedup"] = dense["prefill_flops"] / row["prefill_flops"]
        row["share_of_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
        row["kv_ratio"] = row["kv_cache_bytes"] / dense["kv_cache_bytes"]
        row["peak_ratio"] = row["peak_rss_growth_bytes"] / dense["peak_rss_growth_bytes"] if dense["peak_rss_growth_bytes"] else None
        if "compression_step_s" in row:
            row["compression_step_share"] = row["compression_step_s"] / row["prefill_s"]
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for method, style in (("visionzip", "o-"), ("sparsevlm", "s-")):
            points = sorted((r["tokens"], r["measured_speedup"], r["ideal_speedup"]) for r in rows if r["dtype"] == dtype and r["method"] == method)
            if points:
                tokens, measured, ideal = zip(*points)
                line, = ax.plot(tokens, measured, style, label=f"{method} measured")
                ax.plot(tokens, ideal, style.replace("-", ":"), color=line.get_color(), alpha=0.6, label=f"{method} ideal (FLOPs)")
        ax.axhline(1, color="gray", linestyle=":")
        ax.set_xlabel("visual tokens per image")
        ax.set_ylabel("prefill speedup vs uncompressed")
        ax.set_title(f"LLaVA-1.5-7B shapes, {dtype}, CPU")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    from tqdm import tqdm

    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Large blocks via mmap are returned to the OS on free, so peak RSS measures each run alone.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = llava_7b_shaped_config(args.text_layers)
    config.vision_config._attn_implementation = "sdpa"
    model = SlimLlavaForConditionalGeneration(config).eval()
    rows = []
    with tqdm(total=len(args.dtypes) * len(settings(args.text_layers)), desc="settings") as progress:
        for name in args.dtypes:
            rows += run_dtype(model, getattr(torch, name), args, progress)
    result = {
        "model": f"LLaVA-1.5-7B shapes: CLIP ViT-L/14-336 + Llama 4096 x {args.text_layers} layers, random weights",
        "device": "cpu", "threads": torch.get_num_threads(), "prompt_text_tokens": PROMPT_TOKENS, "repeats": args.repeats,
        "rows": rows,
    }
    (args.out / "speed.json").write_text(json.dumps(result, indent=2, default=str))
    plot(rows, args.out / "speed.png")
    print(f"wrote {args.out / 'speed.json'} and speed.png")


if __name__ == "__main__":
    main()
