"""CDPruner / DivPrune selection overhead at 7B shapes (specs/cdpruner.md §7, issue 21 §6), in milliseconds.

Times only the selection on already projected features (D = 4096, float32 math as shipped), the CLIP text
tower for one 77-token row (openai/clip-vit-large-patch14-336's text shape: 12 layers, width 768, random
weights, float32), and for scale one float32 LLaMA-7B decoder layer's prefill over the same sequence:

    - LLaVA-1.5:  N = 576 per view, K = 64
    - LLaVA-NeXT: 5 x 576 views batched, K = 128 per view (official per-view layout)
    - global:     one set over N = 2,880 (scope "image"), K = 640

    python benchmarks/bench_cdpruner_overhead.py [--repeats 3] [--threads 1] [--out benchmarks/results]

Writes cdpruner_overhead.json. Offline; CPU by default (`--device cuda` where there is one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimvlm.cdpruner import clip_text_embeddings, divprune_select, dpp_greedy_map, minmax_relevance  # noqa: E402

CASES = [("llava-1.5: N=576, K=64", 1, 576, 64), ("llava-next: 5x576, K=128 per view", 5, 576, 128),
         ("global: N=2880, K=640", 1, 2880, 640)]
WIDTH = 4096


def timed(fn, repeats: int, device: torch.device) -> float:
    """Best-of-`repeats` wall time in ms (one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@torch.inference_mode()
def run(args) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for label, views, n, k in CASES:
        features = torch.randn(views, n, WIDTH, generator=generator).to(device, torch.float16)
        weights = minmax_relevance(torch.randn(views, n, generator=generator)).to(device)
        rows.append({"case": label, "views": views, "candidates": n, "kept": k,
                     "cdpruner_ms": timed(lambda: dpp_greedy_map(features, weights, k), args.repeats, device),
                     "divprune_ms": timed(lambda: divprune_select(features, k), args.repeats, device)})
        print(rows[-1])
    text_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    text_model = CLIPTextModel._from_config(text_config).to(device).eval()
    projection = torch.nn.Linear(768, 768, bias=False).to(device)
    ids = torch.randint(0, 49406, (1, 77), generator=generator).to(device)
    mask = torch.ones_like(ids)
    text_ms = timed(lambda: clip_text_embeddings(text_model, projection, ids, mask), args.repeats, device)
    # One LLaMA-7B layer's prefill over a LLaVA-1.5 prompt with all 576 visual tokens (+ 64 text tokens), fp32.
    llama = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
    layer = LlamaDecoderLayer(llama, 0).to(device).eval()
    hidden = torch.randn(1, 640, 4096, generator=generator).to(device)
    positions = torch.arange(640, device=device)[None]
    rotary = LlamaRotaryEmbedding(llama).to(device)(hidden, positions)
    layer_ms = timed(lambda: layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions),
                     args.repeats, device)
    return {"device": str(device), "threads": torch.get_num_threads(), "feature_width": WIDTH, "repeats": args.repeats,
            "rows": rows, "clip_text_tower_ms_per_77_token_row": text_ms,
            "llama7b_one_layer_prefill_ms_640_tokens": layer_ms,
            "llama7b_32_layer_prefill_ms_estimate": 32 * layer_ms,
            "note": "best of repeats; selection math in float32 from float16 features; shared CPU, so indicative only"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cdpruner_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
