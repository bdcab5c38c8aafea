"""Prefill time, peak memory and KV cache at LLaVA-OneVision-7B shapes, against the uncompressed model in the same run.

Model: SigLIP so400m/14-384 (26 layers, 1152 wide, 729 patches per view, no CLS), a Qwen2 language model 3584 wide
(28 heads, 4 KV heads; fewer layers so it fits this machine; a 32,000-word vocabulary, which does not change the
prefill with logits_to_keep=1), random weights, CPU, batch 1, a 40-token question and either

- one 1152x1152 image: a 3x3 anyres grid, 10 views. Stock OneVision feeds 7,371 visual tokens for it (729 base +
  81x81 crop patches + 81 newlines; anyres_max_9 leaves a square 3x3 grid as it is). VisionZip: (1 + 9)·K,
  640 for K = 64.
- one 16-frame video: stock 16 x 196 pooled + 1 = 3,137 tokens; per-frame VisionZip 16 x 64 + 1 = 1,025.

SparseVLM prunes the image or video block inside the LLM with the 64-token preset's budgets scaled to it.

    python benchmarks/bench_speed_onevision.py [--text-layers 2] [--dtypes float32] [--repeats 1] [--threads N]

Reported per setting (as bench_speed_next.py): prefill seconds (median of --repeats; no warm-up call: one prefill takes
minutes on a CPU, against which the first call's overhead is negligible), the ideal
speedup (ratio of prefill FLOPs) and the measured one, the share of ideal, KV-cache bytes and peak-RSS growth,
each also as a ratio to the uncompressed model; plus VisionZip's scoring step alone (attention received over the
10 views + selection and merge) in seconds and its peak-RSS growth, against the uncompressed prefill.
Writes results/speed_onevision.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import llm_layer_flops, median_seconds, reset_peak_rss, rss, vit_flops  # noqa: E402
from bench_speed_next import compare_settings, parse_args  # noqa: E402
from transformers import Qwen2Config, SiglipVisionConfig  # noqa: E402

from slimvlm import SlimLlavaOnevisionConfig, SlimLlavaOnevisionForConditionalGeneration  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402
from slimvlm.visionzip import received_attention_and_keys, visionzip_select  # noqa: E402

PROMPT_TOKENS = 40
IMAGE_SIZE = (1152, 1152)  # a 3x3 grid among llava-hf's pinpoints
VIEWS = 10
FRAMES = 16
IMAGE_ID, VIDEO_ID = 31998, 31999


def onevision_7b_shaped_config(text_layers: int) -> SlimLlavaOnevisionConfig:
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=32768, pad_token_id=0)
    return SlimLlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_ID,
                                    video_token_index=VIDEO_ID)  # the default pinpoints are llava-hf's


def flops_for(views: int):
    def prefill_flops(config, compression: dict, visual: int, text: int, schedule: list[int] | None = None) -> float:
        """Vision tower over every view (VisionZip scores at the last layer, so the whole tower runs; plus its
        QKᵀ) + projector + every decoder layer."""
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        total = views * vit_flops(vision, patches, vision.num_hidden_layers)
        if compression["method"] == "visionzip":
            total += views * 2 * patches * patches * vision.hidden_size  # the scoring step's extra QKᵀ
        projected = visual if compression["method"] == "visionzip" else views * patches
        total += 2 * projected * (vision.hidden_size * config.text_config.hidden_size + config.text_config.hidden_size ** 2)
        lengths = schedule or [visual + text] * config.text_config.num_hidden_layers
        return total + sum(llm_layer_flops(config.text_config, n) for n in lengths)
    return prefill_flops


def settings(text_layers: int, dense: int, compressed: int) -> list[tuple[str, int, dict]]:
    return [("none", dense, {"method": "none"}),
            ("visionzip", compressed, {"method": "visionzip", "tokens": 64}),
            ("sparsevlm", 64, sparsevlm_setting(text_layers, 64))]


def with_text(model, visual: int, token_id: int, generator) -> torch.Tensor:
    text = torch.randint(3, 30000, (PROMPT_TOKENS,), generator=generator)
    return torch.cat([text[:5], torch.full((visual,), token_id), text[5:]]).unsqueeze(0)


def image_inputs(model, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, VIEWS, 3, 384, 384, generator=generator).to(dtype)
    sizes = torch.tensor([IMAGE_SIZE])
    compression = model.config.compression
    if compression["method"] == "visionzip":
        visual = model.visionzip_token_count(IMAGE_SIZE)
    else:
        visual = 729 + 81 * 81 + 81
    ids = with_text(model, visual, IMAGE_ID, generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}


def video_inputs(model, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, FRAMES, 3, 384, 384, generator=generator).to(dtype)
    ids = with_text(model, model.video_token_count(FRAMES), VIDEO_ID, generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


@torch.inference_mode()
def scoring_step(model, dtype: torch.dtype, repeats: int) -> dict:
    """VisionZip's own work on the real last-layer tensors of the 10 views: attention received (chunked, fp32),
    the selection and the merge; seconds and peak-RSS growth."""
    model.to(dtype)
    tower = model.model.vision_tower
    pixels = torch.randn(VIEWS, 3, 384, 384, generator=torch.Generator().manual_seed(0)).to(dtype)
    hidden = tower.embeddings(pixels)
    for layer in tower.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    features = tower.encoder.layers[-1](hidden, None)

    def step() -> None:
        scores, keys = received_attention_and_keys(tower.encoder.layers[-1], hidden)
        visionzip_select(features, scores, keys, 54, 10, cls=False)

    seconds = median_seconds(step, repeats)
    before = reset_peak_rss()
    step()
    return {"dtype": str(dtype).removeprefix("torch."), "scoring_step_s": seconds,
            "scoring_step_peak_rss_growth_bytes": rss("VmHWM") - before}


def main() -> None:
    args = parse_args(__doc__, ROOT / "benchmarks" / "results" / "speed_onevision.json")
    config = onevision_7b_shaped_config(args.text_layers)
    model = SlimLlavaOnevisionForConditionalGeneration(config).eval()
    rows, steps = [], []

    def save(complete: bool) -> None:  # after every row: a prefill takes minutes on this CPU
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": f"LLaVA-OneVision-7B shapes: SigLIP so400m/14-384 + Qwen2 3584 x {args.text_layers} layers, random "
                     "weights", "image_size": IMAGE_SIZE, "frames": FRAMES, "device": "cpu",
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warm_up": False, "complete": complete,
            "prompt_text_tokens": PROMPT_TOKENS, "rows": rows, "scoring_step": steps}, indent=2, default=str))

    inputs_of = {"image 3x3": (7371, 640, image_inputs, VIEWS, IMAGE_ID),
                 "video 16 frames": (3137, 1025, video_inputs, FRAMES, VIDEO_ID)}
    for name in args.dtypes:
        dense = {}
        # Most informative first: dense and VisionZip for both inputs, the scoring step, then SparseVLM.
        for kind, method in (("image 3x3", "none"), ("image 3x3", "visionzip"), ("video 16 frames", "none"),
                             ("video 16 frames", "visionzip"), ("scoring step", None), ("image 3x3", "sparsevlm"),
                             ("video 16 frames", "sparsevlm")):
            if kind == "scoring step":
                step = scoring_step(model, getattr(torch, name), args.repeats)
                step["share_of_dense_prefill_time"] = step["scoring_step_s"] / dense["image 3x3"]["prefill_s"]
                step["share_of_dense_prefill_peak"] = (step["scoring_step_peak_rss_growth_bytes"]
                                                       / dense["image 3x3"]["peak_rss_growth_bytes"])
                steps.append(step)
                print(f"{name:>8} VisionZip scoring step (10 views): {step['scoring_step_s']:.3f} s "
                      f"({step['share_of_dense_prefill_time']:.1%} of the dense image prefill), peak "
                      f"{step['share_of_dense_prefill_peak']:.1%} of its peak", flush=True)
                save(False)
                continue
            dense_tokens, compressed, inputs_for, views, token_id = inputs_of[kind]
            setting = next(s for s in settings(args.text_layers, dense_tokens, compressed) if s[0] == method)
            print(f"--- {kind}", flush=True)
            row, = compare_settings(model, config, name, [setting], inputs_for, flops_for(views), token_id, args.repeats,
                                    warmup=False, dense=dense.get(kind))
            dense.setdefault(kind, row)
            rows.append({"input": kind, **row})
            save(False)
    save(True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
