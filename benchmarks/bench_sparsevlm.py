"""SparseVLM prefill speed, memory and KV-cache size against the uncompressed model (not a test).

A random LLaVA-1.5-shaped model whose language model dominates the cost (Llama, hidden 2048, 16 layers,
so the default prune layers 2/6/15 apply; a tiny 1-layer CLIP giving 576 visual tokens), fp32, CPU, batch 1,
prompt [35 prefix | 576 image | 25 text] = 636 tokens, SDPA. Every configuration runs in the same process
on the same weights, after one warm-up.

Measured per configuration:
- prefill_s: median wall time of `model(..., use_cache=True)` under `torch.no_grad()` (includes the CLIP pass).
- decode_ms_per_token: median time of one cached decode step (8 steps).
- peak_rss_delta_mb: peak resident set size during prefill minus the RSS just before it, sampled every 2 ms
  from /proc/self/statm by a background thread (CPU has no allocator peak counter; includes the cache). The
  script re-executes itself with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors leave the RSS at once.
- kv_cache_bytes: bytes of all K/V tensors in the returned cache (SparseVLM's caches are ragged per layer).
- equal_tokens / processed_mean: SparseVLM's reported ET and mean visual tokens processed per layer.
- flops: the official formula 4nd² + 2n²d + 3ndm summed over layers (n = tokens processed by the layer).

Usage: python benchmarks/bench_sparsevlm.py [--layers 16 --hidden 2048 --reps 2 --out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from builders import IMAGE_TOKEN_ID, tiny_llava_config  # noqa: E402
from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration  # noqa: E402
from slimvlm.sparsevlm import sparsevlm_flops  # noqa: E402
from slimvlm.compat import call_with_cache, output_cache  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the resident set size in a thread; `.peak - .start` is the transient growth."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def cache_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)


def build(layers: int, hidden: int, intermediate: int, heads: int) -> SlimLlavaForConditionalGeneration:
    config = tiny_llava_config(vision_layers=1, text_layers=layers, text_hidden=hidden, heads=heads, kv_heads=heads,
                               vocab_size=1024).to_dict()
    config.pop("model_type", None)
    config["text_config"]["intermediate_size"] = intermediate
    torch.manual_seed(0)
    model = SlimLlavaForConditionalGeneration(SlimLlavaConfig(**config, compression={"method": "none"})).eval()
    model.set_attn_implementation("sdpa")
    return model


def run(model, compression, ids, pixels, reps):
    model.set_compression(compression)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixels, use_cache=True)  # warm-up
        times, peaks = [], []
        for _ in range(reps):
            with PeakRSS() as rss:
                start = time.perf_counter()
                out = model(input_ids=ids, pixel_values=pixels, use_cache=True)
                times.append(time.perf_counter() - start)
            peaks.append(rss.peak - rss.start)
        cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)
        kv = cache_bytes(cache)
        decode = []
        mask = torch.ones(1, ids.shape[1], dtype=torch.long)
        for _ in range(8):
            mask = torch.cat([mask, mask[:, :1]], 1)
            start = time.perf_counter()
            step = call_with_cache(model, keyword_of=type(model).forward, cache=cache, input_ids=token, attention_mask=mask,
                                   use_cache=True)
            decode.append(time.perf_counter() - start)
            cache, token = output_cache(step), step.logits[:, -1:].argmax(-1)
    text = model.config.text_config
    row = {
        "compression": compression,
        "prefill_s": statistics.median(times),
        "prefill_s_all": times,
        "decode_ms_per_token": 1000 * statistics.median(decode),
        "peak_rss_delta_mb": max(peaks) / 2**20,
        "kv_cache_bytes": kv,
    }
    visual, length = int((ids == IMAGE_TOKEN_ID).sum()), ids.shape[1]
    if compression["method"] == "sparsevlm":
        report = model.model.sparsevlm_report
        row["equal_tokens"] = report.equal_tokens[0]
        row["processed_mean"] = report.processed_mean[0]
        row["layer_counts"] = report.layer_counts[0]
        processed = [length - visual + n for n in report.processed_counts[0]]
    else:
        processed = [length] * text.num_hidden_layers
    row["flops"] = sparsevlm_flops(processed, text.hidden_size, text.intermediate_size)
    return row


def main():
    # A fixed mmap threshold makes glibc return every large tensor to the OS when it is freed, so the RSS
    # tracks live memory (with the default dynamic threshold, freed blocks stay in the heap and hide peaks).
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparsevlm_speed.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args.layers, args.hidden, args.intermediate, args.heads)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(6, 40, (25,), generator=generator)
    prefix = torch.randint(6, 40, (34,), generator=generator)
    ids = torch.cat([torch.tensor([1]), prefix, torch.full((576,), IMAGE_TOKEN_ID), text])[None]
    pixels = torch.randn(1, 3, 48, 48, generator=generator)

    configs = [{"method": "none"}] + [
        {"method": "sparsevlm", "version": v, "retained_tokens": p} for v, p in (("1.5", 192), ("1.5", 128), ("2.0", 128))
    ]
    rows = []
    for compression in configs:
        rows.append(run(model, compression, ids, pixels, args.reps))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("layer_counts", "prefill_s_all")}), flush=True)
    dense = rows[0]
    for row in rows[1:]:
        row["ratio_vs_none"] = {
            "prefill_time": row["prefill_s"] / dense["prefill_s"],
            "kv_cache_bytes": row["kv_cache_bytes"] / dense["kv_cache_bytes"],
            "peak_rss_delta": row["peak_rss_delta_mb"] / dense["peak_rss_delta_mb"] if dense["peak_rss_delta_mb"] else None,
            "flops": row["flops"] / dense["flops"],
            "decode_time": row["decode_ms_per_token"] / dense["decode_ms_per_token"],
        }
    result = {
        "setup": {
            "model": f"random Llama text model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
                     f"{args.heads} heads; tiny 1-layer CLIP; fp32; SDPA; CPU; batch 1",
            "prompt_tokens": int(ids.shape[1]),
            "visual_tokens": 576,
            "reps": args.reps,
            "memory_method": "peak RSS during prefill minus RSS before it, /proc/self/statm sampled every 2 ms, "
                             "glibc MALLOC_MMAP_THRESHOLD_=65536 (freed tensors return to the OS)",
            "command": "python benchmarks/bench_sparsevlm.py " + " ".join(sys.argv[1:]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "note": "CPU shared with other processes: timings are indicative. equal_tokens/processed_mean are over "
                    "this model's own depth; the presets' ET (192/128) is defined on 32 layers, so a 16-layer model "
                    "keeps the same per-step counts but reports a higher ET",
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
