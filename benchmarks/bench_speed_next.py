"""Prefill time, peak memory and KV cache at LLaVA-NeXT-7B shapes, against the uncompressed model in the same run.

Model: CLIP ViT-L/14-336 (24 layers), a Llama language model 4096 wide (fewer layers so it fits this machine),
random weights, CPU, batch 1, one 672x672 image (a 2x2 anyres grid: the base view + 4 crops = 5 views of 577
tokens) and a 40-token question. Stock LLaVA-NeXT feeds 2,928 visual tokens for it (576 base + 48x48 unpadded
crop patches + 48 newlines); VisionZip's official layout (1 + 4)·K (640 / 320 / 160 for K = 128 / 64 / 32);
SparseVLM prunes the 2,928-token block inside the LLM with budgets scaled to it.

    python benchmarks/bench_speed_next.py [--text-layers 4] [--dtypes float32] [--repeats 2] [--threads N]

Reported per setting (as bench_speed.py): prefill seconds (median of --repeats after a warm-up), the ideal
speedup (ratio of prefill FLOPs) and the measured one, the share of ideal, KV-cache bytes and peak-RSS growth,
each also as a ratio to the uncompressed model. Writes results/speed_next.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import measure  # noqa: E402
from flops import prefill_flops as shared_prefill_flops  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from slimvlm import SlimLlavaNextConfig, SlimLlavaNextForConditionalGeneration  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402

PROMPT_TOKENS = 40
IMAGE_SIZE = (672, 672)  # a 2x2 grid among llava-hf's pinpoints
VIEWS = 5


def next_7b_shaped_config(text_layers: int) -> SlimLlavaNextConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=8192, pad_token_id=32001)
    return SlimLlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                               image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def prefill_flops(config, compression: dict, visual: int, text: int, schedule: list[int] | None = None) -> float:
    """Vision tower over every view + projector + every decoder layer."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    tower_layers = vision.num_hidden_layers - (1 if compression["method"] == "visionzip" else 0)
    projected = visual if compression["method"] == "visionzip" else VIEWS * patches
    lengths = schedule or [visual + text] * config.text_config.num_hidden_layers
    return shared_prefill_flops(vision, config.text_config, views=VIEWS, tokens_per_view=patches + 1,
                                tower_layers=tower_layers, projected=projected, lengths=lengths)


def settings(text_layers: int) -> list[tuple[str, int, dict]]:
    rows = [("none", 2928, {"method": "none"})]
    rows += [("visionzip", 5 * k, {"method": "visionzip", "tokens": k}) for k in (128, 64, 32)]
    rows += [("sparsevlm", k, sparsevlm_setting(text_layers, k)) for k in (128, 64)]
    return rows


def inputs_for(model, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, VIEWS, 3, 336, 336, generator=generator).to(dtype)
    sizes = torch.tensor([IMAGE_SIZE])
    with torch.inference_mode():
        visual = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes).pooler_output[0].shape[0]
    text = torch.randint(3, 32000, (PROMPT_TOKENS,), generator=generator)
    ids = torch.cat([text[:5], torch.full((visual,), model.config.image_token_id), text[5:]]).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}


def compare_settings(model, config, dtype_name: str, rows_of: list[tuple[str, int, dict]], inputs_for, prefill_flops,
                     visual_token_id: int, repeats: int, warmup: bool = True, dense: dict | None = None) -> list[dict]:
    """Measure every (method, tokens, compression) setting against the first (uncompressed) one in the same run, or
    against `dense` (a row this function returned earlier in the run)."""
    dtype = getattr(torch, dtype_name)
    model.to(dtype)
    rows = []
    for method, tokens, compression in rows_of:
        model.set_compression(compression)
        inputs = inputs_for(model, dtype)
        visual = int((inputs["input_ids"] == visual_token_id).sum())
        result = measure(model, inputs, repeats, warmup)
        result.pop("outputs")
        text = inputs["input_ids"].shape[1] - visual
        schedule = None
        if method == "sparsevlm":
            report = model.sparsevlm_report
            schedule = [text + count for count in report.processed_counts[0]]
            result["equal_tokens"] = report.equal_tokens[0]
        row = {"dtype": dtype_name, "method": method, "tokens": tokens, "visual_tokens_in": visual,
               "compression": model.config.compression,
               "prefill_flops": prefill_flops(config, model.config.compression, visual, text, schedule), **result}
        dense = dense or row
        row["measured_speedup"] = dense["prefill_s"] / row["prefill_s"]
        row["ideal_speedup"] = dense["prefill_flops"] / row["prefill_flops"]
        row["share_of_ideal"] = row["measured_speedup"] / row["ideal_speedup"]
        row["kv_ratio"] = row["kv_cache_bytes"] / dense["kv_cache_bytes"]
        row["peak_ratio"] = row["peak_rss_growth_bytes"] / dense["peak_rss_growth_bytes"]
        rows.append(row)
        print(f"{dtype_name:>8} {method:>9} {tokens:>5}: {row['prefill_s']:7.2f} s  x{row['measured_speedup']:.2f} "
              f"(ideal x{row['ideal_speedup']:.2f}, {row['share_of_ideal']:.0%})  kv {row['kv_ratio']:.2f}  "
              f"peak {row['peak_ratio']:.2f}", flush=True)
    return rows


def parse_args(doc: str, out: Path, extra=()) -> argparse.Namespace:
    """The shared command line of the family speed benchmarks (re-executes with glibc's mmap threshold set, so
    peak RSS reflects freed activations). extra: (flag, add_argument kwargs) pairs of a benchmark's own options."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=out)
    for flag, options in extra:
        parser.add_argument(flag, **options)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def main() -> None:
    args = parse_args(__doc__, ROOT / "benchmarks" / "results" / "speed_next.json")
    config = next_7b_shaped_config(args.text_layers)
    model = SlimLlavaNextForConditionalGeneration(config).eval()
    rows = []
    for name in args.dtypes:
        rows += compare_settings(model, config, name, settings(args.text_layers), inputs_for, prefill_flops,
                                 config.image_token_id, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": f"LLaVA-NeXT-7B shapes: CLIP ViT-L/14-336 x 5 views + Llama 4096 x {args.text_layers} layers, random weights",
        "image_size": IMAGE_SIZE, "device": "cpu", "threads": torch.get_num_threads(), "repeats": args.repeats,
        "prompt_text_tokens": PROMPT_TOKENS, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
