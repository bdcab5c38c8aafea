"""Prefill time, peak memory and KV cache at Qwen2.5-VL-7B shapes, against the uncompressed model in the same run.

Model: the Qwen2.5-VL-7B vision tower (32 blocks, 1280 wide, 16 heads, windows of 8x8 patches, full blocks
7/15/23/31, merger to 3584) and a Qwen2 language model 3584 wide (28 heads, 4 KV heads) with fewer layers so it
fits (--text-layers, default 4) and a smaller vocabulary (--vocab, default 32,000; only lm_head depends on it and
prefill keeps one logit row), random weights, batch 1, a 40-token question. Inputs (--inputs):
  image448   a 448x448 image: 1,024 patches -> 256 tokens (VisionZip retain 0.5: 115 + 12 = 127)
  image1008  a 1,008x1,008 image: 5,184 patches -> 1,296 tokens
  video8     an 8-frame 448x448 video: 4 temporal steps x 256 tokens = 1,024
each uncompressed, with VisionZip at retain 0.5 / 0.25 / 0.1 (per view: an image or one temporal step) and with
SparseVLM (the 64-token preset's schedule on this depth, budgets scaled to the visual count).

    python benchmarks/bench_speed_qwen.py [--inputs image448 image1008 video8] [--text-layers 4] [--dtypes float32]
                                          [--repeats 2] [--threads N] [--smoke]

Reported per setting (as bench_speed_next.py): prefill seconds (median of --repeats after a warm-up), the ideal
speedup (ratio of prefill FLOPs: the vision tower is the same in every setting; VisionZip adds one QK^T of its
scoring block and shrinks the language model's input) and the measured one, the share of ideal, KV-cache bytes
and peak-RSS growth as ratios to the uncompressed model. --smoke runs tiny shapes (a check that the script works,
not a measurement). Writes results/speed_qwen.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import llm_layer_flops  # noqa: E402
from bench_speed_next import compare_settings, parse_args  # noqa: E402
from transformers import Qwen2_5_VLConfig  # noqa: E402

from slimvlm import SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402

PROMPT_TOKENS = 40
INPUTS = {"image448": (1, 448, 448), "image1008": (1, 1008, 1008), "video8": (8, 448, 448)}
RETAIN = (0.5, 0.25, 0.1)


def qwen_7b_shaped_config(text_layers: int, vocab: int, smoke: bool = False) -> SlimQwen2_5_VLConfig:
    if smoke:
        vision = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, window_size=56,
                      fullatt_block_indexes=[1, 3], out_hidden_size=64)
        text = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]})
    else:
        vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584)
        text = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, hidden_act="silu")
    text.update(vocab_size=vocab, num_hidden_layers=text_layers, max_position_embeddings=32768, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    stock = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 4,
                             video_token_id=vocab - 3, vision_start_token_id=vocab - 2, vision_end_token_id=vocab - 1)
    return SlimQwen2_5_VLConfig(**stock.to_dict())


def grid_of(kind: str) -> list[int]:
    frames, height, width = INPUTS[kind]
    return [max(1, frames // 2), height // 14, width // 14]


def vision_flops(config, grid: list[int], visionzip: bool) -> float:
    """The tower over every patch (windowed and full blocks), the merger, and VisionZip's extra QK^T."""
    vision = config.vision_config
    steps, gh, gw = grid
    patches = steps * gh * gw
    width, ffn = vision.hidden_size, vision.intermediate_size
    window = (vision.window_size // vision.patch_size) ** 2
    per_block = 2 * patches * (4 * width * width + 3 * width * ffn)
    total = 0.0
    for block in range(vision.depth):
        segment = gh * gw if block in vision.fullatt_block_indexes else window
        total += per_block + 2 * 2 * patches * segment * width
    merged = patches // 4
    total += 2 * merged * (4 * width * 4 * width + 4 * width * vision.out_hidden_size)
    if visionzip:  # one more QK^T in the last block's segments
        last = vision.depth - 1
        segment = gh * gw if last in vision.fullatt_block_indexes else window
        total += 2 * patches * segment * width
    return total


def settings(text_layers: int) -> list[tuple[str, float, dict]]:
    rows = [("none", 1.0, {"method": "none"})]
    rows += [("visionzip", r, {"method": "visionzip", "retain_ratio": r}) for r in RETAIN]
    rows.append(("sparsevlm", 64, sparsevlm_setting(text_layers, 64)))
    return rows


def make_inputs_for(kind: str):
    def inputs_for(model, dtype: torch.dtype, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)
        grid = grid_of(kind)
        patches = grid[0] * grid[1] * grid[2]
        pixels = torch.randn(patches, 3 * 2 * 14 * 14, generator=generator).to(dtype)
        config = model.config
        token = config.video_token_id if kind.startswith("video") else config.image_token_id
        count = model.model.visionzip_token_count(grid) if config.compression["method"] == "visionzip" else patches // 4
        text = torch.randint(3, config.image_token_id, (PROMPT_TOKENS,), generator=generator)
        ids = torch.cat([text[:5], torch.tensor([config.vision_start_token_id]), torch.full((count,), token),
                         torch.tensor([config.vision_end_token_id]), text[5:]]).unsqueeze(0)
        types = (ids == config.image_token_id).long() + 2 * (ids == config.video_token_id).long()
        media = ({"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([grid]),
                  "second_per_grid_ts": torch.tensor([1.0])} if kind.startswith("video")
                 else {"pixel_values": pixels, "image_grid_thw": torch.tensor([grid])})
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types, **media}

    return inputs_for


def make_prefill_flops(kind: str):
    def prefill_flops(config, compression: dict, visual: int, text: int, schedule: list[int] | None = None) -> float:
        total = vision_flops(config, grid_of(kind), compression["method"] == "visionzip")
        lengths = schedule or [visual + text] * config.text_config.num_hidden_layers
        return total + sum(llm_layer_flops(config.text_config, n) for n in lengths)

    return prefill_flops


def main() -> None:
    extra = [("--inputs", dict(nargs="+", default=list(INPUTS), choices=list(INPUTS))),
             ("--vocab", dict(type=int, default=32000)), ("--smoke", dict(action="store_true"))]
    args = parse_args(__doc__, ROOT / "benchmarks" / "results" / "speed_qwen.json", extra)
    config = qwen_7b_shaped_config(args.text_layers, args.vocab, args.smoke)
    model = SlimQwen2_5_VLForConditionalGeneration(config).eval()
    rows = []
    for kind in args.inputs:
        token = config.video_token_id if kind.startswith("video") else config.image_token_id
        for name in args.dtypes:
            for row in compare_settings(model, config, name, settings(args.text_layers), make_inputs_for(kind),
                                        make_prefill_flops(kind), token, args.repeats):
                rows.append({"input": kind, **row})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": ("tiny smoke shapes (not a measurement)" if args.smoke else
                  f"Qwen2.5-VL-7B shapes: vision 32 x 1280 + Qwen2 3584 x {args.text_layers} layers, vocab {args.vocab}, "
                  "random weights"),
        "inputs": {kind: grid_of(kind) for kind in args.inputs}, "device": "cpu", "threads": torch.get_num_threads(),
        "repeats": args.repeats, "prompt_text_tokens": PROMPT_TOKENS, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
