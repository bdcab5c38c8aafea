"""VoCo-LLaMA cost benchmark: answering from a cached compressed image vs a full prefill, and cache bytes.

One run (< 5 min on 2 CPU cores) of a random LLaVA-1.5-shaped model scaled down in width/depth but with
the real 576 image tokens, plus the cache size of a 7B-shaped model computed on the meta device.

    python benchmarks/bench_voco.py [--out benchmarks/results/voco_bench.json] [--threads 2]

Measured per image + question (greedy, `--new-tokens` tokens, median of `--repeats`):
  * full_prefill_stock: the uncompressed model (plain causal, 576 image tokens), from pixels;
  * full_prefill_voco_mask: the same sequence + K VoCo tokens under the VoCo mask (full-mask mode);
  * cached_voco: stage 2 only, i.e. text on top of a stored VoCoCache (what a repeat question costs);
  * compress: stage 1 once per image (voco_compress).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration  # noqa: E402
from slimvlm.voco import VoCoCache, cache_bytes_per_token  # noqa: E402

PAPER_MB_PER_TOKEN = 0.524  # Table 7: 0.525 MB for one VoCo token, Vicuna-7B fp16
VOCO_ID, IMAGE_ID, BOS = 32002, 32000, 1


def bench_config(num_voco: int, layers: int, hidden: int) -> SlimLlavaConfig:
    """LLaVA-1.5 geometry (336 px / 14 px patches -> 576 tokens) with a narrow, shallow tower and LLM."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=256, intermediate_size=1024,
                              num_hidden_layers=4, num_attention_heads=4)
    text = LlamaConfig(vocab_size=32064, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                       max_position_embeddings=4096, pad_token_id=32001)
    config = SlimLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
                             compression={"method": "voco", "num_voco_tokens": num_voco})
    config.voco_token_id = VOCO_ID
    return config


def seven_b_cache_bytes(num_voco: int) -> dict:
    """Cache bytes of a Vicuna-7B-shaped SlimLlava built on the meta device (no memory, no weights)."""
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    config = SlimLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             compression={"method": "voco", "num_voco_tokens": num_voco})
    with torch.device("meta"):
        model = SlimLlavaForConditionalGeneration(config)
    layers = model.model.language_model.layers
    per_token = sum(2 * layer.self_attn.k_proj.out_features * 2 for layer in layers)  # K + V, fp16
    shape = (1, len(layers), text.num_key_value_heads, num_voco, text.hidden_size // text.num_attention_heads)
    cache = VoCoCache(torch.empty(shape, dtype=torch.float16, device="meta"),
                      torch.empty(shape, dtype=torch.float16, device="meta"),
                      torch.zeros(1, num_voco, dtype=torch.long, device="meta"))
    assert per_token == cache_bytes_per_token(text, torch.float16)
    return {
        "bytes_per_voco_token_fp16": per_token,
        "mb_per_voco_token_fp16": per_token / 1e6,
        "paper_mb_per_voco_token": PAPER_MB_PER_TOKEN,
        "bytes_per_image_fp16": cache.nbytes,
        "full_576_token_cache_mb_fp16": per_token * 576 / 1e6,
        "num_voco_tokens": num_voco,
    }


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "voco_bench.json"))
    parser.add_argument("--num-voco", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--text-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = bench_config(args.num_voco, args.layers, args.hidden)
    model = SlimLlavaForConditionalGeneration(config).eval()
    image_tokens = model.image_token_count()
    K = args.num_voco
    text = torch.randint(100, 30000, (1, args.text_tokens))
    prefix = torch.tensor([[BOS] + [IMAGE_ID] * image_tokens + [13] + [VOCO_ID] * K])
    voco_ids = torch.cat([prefix, torch.tensor([[13]]), text], 1)
    stock_ids = torch.cat([torch.tensor([[BOS] + [IMAGE_ID] * image_tokens + [13]]), text], 1)
    pixels = torch.randn(1, 3, 336, 336)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    eos_token_id=None, pad_token_id=32001)
    stage2_text = torch.cat([torch.tensor([[13]]), text], 1)

    with torch.inference_mode():
        model.generate(input_ids=voco_ids, pixel_values=pixels, **settings)  # warm-up
        t_voco, voco_out = timed(lambda: model.generate(input_ids=voco_ids, pixel_values=pixels, **settings), args.repeats)
        t_compress, cache = timed(lambda: model.voco_compress(input_ids=prefix, pixel_values=pixels), args.repeats)
        t_cached, cached_out = timed(lambda: model.generate(input_ids=stage2_text, voco_cache=cache, **settings), args.repeats)
        t_first_cached, _ = timed(lambda: model(input_ids=stage2_text, voco_cache=cache, logits_to_keep=1), args.repeats)
        t_first_voco, _ = timed(lambda: model(input_ids=voco_ids, pixel_values=pixels, logits_to_keep=1), args.repeats)
        model.set_compression({"method": "none"})
        t_stock, _ = timed(lambda: model.generate(input_ids=stock_ids, pixel_values=pixels, **settings), args.repeats)
        t_first_stock, _ = timed(lambda: model(input_ids=stock_ids, pixel_values=pixels, logits_to_keep=1), args.repeats)
        model.set_compression({"method": "voco", "num_voco_tokens": K})

    same_tokens = torch.equal(voco_out[:, -args.new_tokens:], cached_out[:, -args.new_tokens:])
    result = {
        "model": {"image_tokens": image_tokens, "num_voco_tokens": K, "text_layers": args.layers,
                  "hidden": args.hidden, "kv_heads": config.text_config.num_key_value_heads,
                  "text_tokens": stage2_text.shape[1], "new_tokens": args.new_tokens, "dtype": "float32"},
        "seconds_median": {
            "answer_full_prefill_stock": t_stock,
            "answer_full_prefill_voco_mask": t_voco,
            "answer_from_cached_voco": t_cached,
            "compress_once": t_compress,
            "first_token_full_prefill_stock": t_first_stock,
            "first_token_full_prefill_voco_mask": t_first_voco,
            "first_token_from_cached_voco": t_first_cached,
        },
        "speedup_answer_cached_vs_stock": t_stock / t_cached,
        "speedup_first_token_cached_vs_stock": t_first_stock / t_first_cached,
        "cached_tokens_equal_full_mask_tokens": same_tokens,
        "cache_bytes_per_image": {"this_model_fp32": cache.nbytes,
                                  "this_model_full_prefix_cache_fp32": cache.nbytes // K * (image_tokens + 2)},
        "vicuna_7b_shaped_meta": seven_b_cache_bytes(K),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor(),
                        "load_average_1m": os.getloadavg()[0], "device": "cpu"},
        "notes": "Random weights, CPU, shared machine: the ratios matter, not absolute times. The cached path skips "
                 "the vision tower and the 576-token prefill; full_prefill_voco_mask also pays the dense mask.",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
