"""Prefill time, peak memory and KV cache at Video-LLaVA-7B shapes, against the uncompressed model in the same run.

Model: two CLIP ViT-L/14-224 towers (24 layers; image and video), a Llama language model 4096 wide (fewer layers
so it fits this machine), random weights, CPU, batch 1, one 8-frame video and a 40-token question. Stock
Video-LLaVA feeds 8 x 257 = 2,056 video tokens (the video tower keeps CLS); VisionZip compresses every frame to
17 (14 dominant + 3 contextual): 136 tokens, the paper's setting; SparseVLM prunes the 2,056-token video block
inside the LLM with budgets scaled to it.

VoCo-LLaMA (shifted segments, specs/voco.md §7, 2 tokens per frame): answering from the compressed cache (16
tokens) against a full prefill of the video and the question (random weights: time and memory only).

    python benchmarks/bench_speed_video.py [--text-layers 4] [--dtypes float32] [--repeats 2] [--threads N]

Reported per setting (as bench_speed_next.py): prefill seconds (median of --repeats after a warm-up), the ideal
speedup (ratio of prefill FLOPs) and the measured one, the share of ideal, KV-cache bytes and peak-RSS growth,
each also as a ratio to the uncompressed model. Writes results/speed_video.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flops import prefill_flops as shared_prefill_flops  # noqa: E402
from bench_speed_next import compare_settings, parse_args  # noqa: E402
from bench_voco import timed  # noqa: E402
from transformers import CLIPVisionConfig, LlamaConfig  # noqa: E402

from slimvlm import SlimVideoLlavaConfig, SlimVideoLlavaForConditionalGeneration  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402

PROMPT_TOKENS = 40
FRAMES = 8
VOCO_ID, VIDEO_ID = 32002, 32001


def video_7b_shaped_config(text_layers: int) -> SlimVideoLlavaConfig:
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, pad_token_id=0)
    return SlimVideoLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=32000,
                                video_token_index=VIDEO_ID)


def prefill_flops(config, compression: dict, visual: int, text: int, schedule: list[int] | None = None) -> float:
    """Video tower over every frame + projector + every decoder layer."""
    vision = config.vision_config
    tower_layers = vision.num_hidden_layers - (1 if compression["method"] == "visionzip" else 0)
    lengths = schedule or [visual + text] * config.text_config.num_hidden_layers
    return shared_prefill_flops(vision, config.text_config, views=FRAMES,
                                tokens_per_view=(vision.image_size // vision.patch_size) ** 2 + 1,
                                tower_layers=tower_layers, projected=visual, lengths=lengths)


def settings(text_layers: int) -> list[tuple[str, int, dict]]:
    return [("none", 2056, {"method": "none"}),
            ("visionzip", 136, {"method": "visionzip", "tokens": 64, "video_tokens": 17}),
            ("sparsevlm", 64, sparsevlm_setting(text_layers, 64))]


def video_inputs(model, dtype: torch.dtype, seed: int = 0, voco: int = 0) -> dict:
    """[text[:5]; per frame: its placeholders (+ `voco` <voco>); text[5:]] for one random 8-frame video."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, FRAMES, 3, 224, 224, generator=generator).to(dtype)
    per_frame = model.video_token_count(1)
    text = torch.randint(3, 32000, (PROMPT_TOKENS,), generator=generator)
    frame = [VIDEO_ID] * per_frame + [VOCO_ID] * voco
    ids = torch.cat([text[:5], torch.tensor(frame * FRAMES), text[5:]]).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def voco_rows(model, dtype: torch.dtype, repeats: int, num_voco: int = 2) -> list[dict]:
    """Answer-from-cache (stage 2 over T·K cached tokens) vs a full masked prefill of video + question."""
    model.config.voco_token_id = VOCO_ID
    model.set_compression({"method": "voco", "num_voco_tokens": num_voco})
    inputs = video_inputs(model, dtype, voco=num_voco)
    prefix_end = int((inputs["input_ids"][0] == VOCO_ID).nonzero().max()) + 1
    prefix = {key: value[:, :prefix_end] if key != "pixel_values_videos" else value for key, value in inputs.items()}
    question = inputs["input_ids"][:, prefix_end:]
    with torch.inference_mode():
        t_full, _ = timed(lambda: model(**inputs, use_cache=True, logits_to_keep=1), repeats)
        t_compress, cache = timed(lambda: model.voco_compress(**prefix), repeats)
        t_answer, _ = timed(lambda: model(input_ids=question, voco_cache=cache, use_cache=True, logits_to_keep=1), repeats)
    return [{"method": "voco", "num_voco_tokens_per_frame": num_voco, "cached_tokens": cache.num_voco_tokens,
             "full_masked_prefill_s": t_full, "compress_s": t_compress, "answer_from_cache_s": t_answer,
             "answer_speedup": t_full / t_answer, "cache_bytes": cache.nbytes}]


def main() -> None:
    args = parse_args(__doc__, ROOT / "benchmarks" / "results" / "speed_video.json")
    config = video_7b_shaped_config(args.text_layers)
    model = SlimVideoLlavaForConditionalGeneration(config).eval()
    rows = []
    for name in args.dtypes:
        rows += compare_settings(model, config, name, settings(args.text_layers), video_inputs, prefill_flops,
                                 VIDEO_ID, args.repeats)
        for row in voco_rows(model, getattr(torch, name), args.repeats):
            rows.append({"dtype": name, **row})
            print(f"{name:>8} voco {row['cached_tokens']} cached tokens: answer {row['answer_from_cache_s']:.3f} s vs full "
                  f"masked prefill {row['full_masked_prefill_s']:.2f} s (x{row['answer_speedup']:.1f}); compress "
                  f"{row['compress_s']:.2f} s once per video", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": f"Video-LLaVA-7B shapes: 2 x CLIP ViT-L/14-224, {FRAMES} frames + Llama 4096 x {args.text_layers} layers, "
                 "random weights",
        "device": "cpu", "threads": torch.get_num_threads(), "repeats": args.repeats,
        "prompt_text_tokens": PROMPT_TOKENS, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
