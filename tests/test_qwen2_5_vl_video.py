"""Qwen2.5-VL video without torchvision: frame preprocessing against a loop reference, per-step VisionZip against
the independent recomputation (8 and 9 frames), positions with the video Δt, image + video batches, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qwen_builders import IMAGE_ID, VIDEO_ID, prompt, qwen2_5_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen
from qwen_reference import assert_features_match, pruned_dense_inputs, reference_visionzip
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from slimvlm import SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor
from slimvlm.processing_qwen_vl import QwenFrameVideoProcessor

VIDEO_SIZE = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
FPS = 2  # second_per_grid_ts = 1: Δt = tokens_per_second = 2 per temporal step


def visionzip(dominant=0.45, contextual=0.05):
    return {"method": "visionzip", "dominant_ratio": dominant, "contextual_ratio": contextual}


def random_video(frames: int, height: int = 56, width: int = 84, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((frames, height, width, 3)) * 255).astype(np.uint8)


def video_prompt(before="w10 w11", after="w20 w21 w22"):
    return f"{before} <|vision_start|><|video_pad|><|vision_end|> {after}"


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()


def processor(tokenizer, compression=None):
    tokenizer.padding_side = "left"
    return SlimQwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tokenizer, compression=compression,
                                   video_size=VIDEO_SIZE, video_fps=FPS)


@pytest.fixture(scope="module", params=[(1, 3), (1,)], ids=["full-scoring-block", "windowed-scoring-block"])
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    config = qwen2_5_config(request.param)
    config._attn_implementation = "eager"
    stock = sharpen(Qwen2_5_VLForConditionalGeneration(config)).eval()
    folder = tmp_path_factory.mktemp("qwen-video")
    stock.save_pretrained(folder)
    return stock, SlimQwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()


# ---------------------------------------------------------------- frame preprocessing


def reference_video_pixels(video: np.ndarray, height: int, width: int, patch=14, temporal=2, merge=2):
    """The stock Qwen2-VL video math, frame by frame and patch by patch: antialiased bicubic resize in float32
    (clamped, rounded to uint8 levels), (x / 255 - mean) / std, the last frame repeated to an even count, then one
    row per patch in the order (step, merge-block row, merge-block column, row in block, column in block), each
    row laid out (channel, temporal, y, x)."""
    frames = []
    for frame in video:
        tensor = torch.tensor(frame, dtype=torch.float32).permute(2, 0, 1)[None]
        resized = F.interpolate(tensor, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        resized = resized.clamp(0, 255).round()[0]
        mean, std = torch.tensor(OPENAI_CLIP_MEAN)[:, None, None], torch.tensor(OPENAI_CLIP_STD)[:, None, None]
        frames.append((resized / 255 - mean) / std)
    while len(frames) % temporal:
        frames.append(frames[-1])
    grid_h, grid_w = height // patch, width // patch
    rows = []
    for step in range(len(frames) // temporal):
        for block_y in range(grid_h // merge):
            for block_x in range(grid_w // merge):
                for inner_y in range(merge):
                    for inner_x in range(merge):
                        y = (block_y * merge + inner_y) * patch
                        x = (block_x * merge + inner_x) * patch
                        values = [frames[step * temporal + t][c, y:y + patch, x:x + patch].reshape(-1)
                                  for c in range(3) for t in range(temporal)]
                        rows.append(torch.cat(values))
    return torch.stack(rows), [len(frames) // temporal, grid_h, grid_w]


@pytest.mark.parametrize("frames", [8, 9])
@pytest.mark.parametrize("layout", ["array", "tensor", "list"])
def test_frame_preprocessing_equals_the_stock_math(frames, layout):
    video = random_video(frames, 50, 90, seed=frames)
    given = {"array": video, "tensor": torch.from_numpy(video), "list": list(video)}[layout]
    out = QwenFrameVideoProcessor(VIDEO_SIZE)(given if layout != "list" else [given])
    expected, grid = reference_video_pixels(video, 56, 84)  # smart_resize(50, 90) -> 56 x 84
    assert out["video_grid_thw"].tolist() == [grid] == [[(frames + 1) // 2, 4, 6]]
    torch.testing.assert_close(out["pixel_values_videos"], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- counts, VisionZip per step


@pytest.mark.parametrize("frames", [8, 9])
def test_video_counts_per_step(models, tokenizer, frames):
    _, slim = models
    slim.set_compression(visionzip())
    inputs = processor(tokenizer, visionzip())(videos=[random_video(frames)], text=[video_prompt()], return_tensors="pt")
    steps = (frames + 1) // 2
    assert int((inputs["input_ids"] == VIDEO_ID).sum()) == 3 * steps  # 6 merged tokens per step -> 2 + 1 (§7)
    assert processor(tokenizer, visionzip())._get_num_multimodal_tokens(video_sizes=[(frames, 56, 84)]).num_video_tokens == [3 * steps]
    dense = processor(tokenizer)(videos=[random_video(frames)], text=[video_prompt()], return_tensors="pt")
    assert int((dense["input_ids"] == VIDEO_ID).sum()) == 6 * steps
    features = slim.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert features.pooler_output[0].shape[0] == 3 * steps
    keep = features.visionzip_keep[0].tolist()
    assert [sum(1 for u in keep if t * 6 <= u < (t + 1) * 6) for t in range(steps)] == [3] * steps  # per view


@pytest.mark.parametrize("frames", [8, 9])
def test_video_visionzip_equals_independent_recomputation(models, tokenizer, frames):
    stock, slim = models
    slim.set_compression(visionzip())
    video = random_video(frames, seed=10 + frames)
    inputs = processor(tokenizer, visionzip())(videos=[video], text=[video_prompt()], return_tensors="pt")
    dense = processor(tokenizer)(videos=[video], text=[video_prompt()], return_tensors="pt")
    vision = stock.config.vision_config
    items, merged = reference_visionzip(stock.model.visual, dense["pixel_values_videos"], dense["video_grid_thw"],
                                        (0.45, 0.05), vision.window_size // 2 // vision.patch_size)
    logits = assert_features_match(slim, inputs, items, "video")
    embeds, positions, mask, _ = pruned_dense_inputs(stock.model, dense, {"video": items}, {"video": merged},
                                                     {"image": IMAGE_ID, "video": VIDEO_ID})
    with torch.no_grad():
        expected = stock.lm_head(stock.model.language_model(inputs_embeds=embeds, position_ids=positions,
                                                            attention_mask=mask).last_hidden_state)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_video_positions_use_second_per_grid_ts(models, tokenizer):
    stock, slim = models
    slim.set_compression(visionzip())
    video = random_video(8, seed=3)
    inputs = processor(tokenizer, visionzip())(videos=[video], text=[video_prompt()], return_tensors="pt")
    dense = processor(tokenizer)(videos=[video], text=[video_prompt()], return_tensors="pt")
    assert inputs["second_per_grid_ts"].tolist() == [1.0]
    stock_positions, _ = stock.model.get_rope_index(dense["input_ids"], dense["mm_token_type_ids"],
                                                    video_grid_thw=dense["video_grid_thw"],
                                                    second_per_grid_ts=dense["second_per_grid_ts"])
    keep = slim.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).visionzip_keep
    positions, _ = slim.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             second_per_grid_ts=inputs["second_per_grid_ts"],
                                             visionzip_keep={"video": keep})
    dense_video = (dense["input_ids"][0] == VIDEO_ID).nonzero().squeeze(1)
    video_slots = (inputs["input_ids"][0] == VIDEO_ID).nonzero().squeeze(1)
    assert torch.equal(positions[:, 0, video_slots], stock_positions[:, 0, dense_video[keep[0]]])
    t_ids = stock_positions[0, 0, dense_video].unique().tolist()
    assert [b - a for a, b in zip(t_ids, t_ids[1:])] == [2, 2, 2]  # Δt = tokens_per_second · 1 s
    assert torch.equal(positions[:, 0, video_slots[-1] + 1:], stock_positions[:, 0, dense_video[-1] + 1:])


# ---------------------------------------------------------------- batch and generation with image + video


def sample_inputs(tokenizer, compression, image, video, text):
    kwargs = {"images": [image]} if image is not None else {}
    if video is not None:
        kwargs["videos"] = [video]
    return processor(tokenizer, compression)(text=[text], return_tensors="pt", **kwargs)


def test_batch_of_image_and_video_samples_equals_each_alone(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    image, video, video2 = random_image(112, 112, 20), random_video(8, seed=21), random_video(9, 84, 56, seed=22)
    texts = [prompt() + " " + video_prompt(before="w30"), video_prompt(before="w5 w6 w7 w8 w9 w10 w11")]
    batch = processor(tokenizer, visionzip())(images=[image], videos=[video, video2], text=texts, padding=True,
                                              return_tensors="pt")
    with torch.no_grad():
        together = slim(**batch).logits
        for b, (sample_image, sample_video) in enumerate([(image, video), (None, video2)]):
            alone = sample_inputs(tokenizer, visionzip(), sample_image, sample_video, texts[b])
            single = slim(**alone).logits
            torch.testing.assert_close(together[b, -single.shape[1]:], single[0], rtol=1e-5, atol=1e-5)


def test_generate_with_video_equals_cache_free_loop(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    inputs = processor(tokenizer, visionzip())(images=[random_image(56, 84, 30)], videos=[random_video(9, seed=31)],
                                               text=[prompt() + " " + video_prompt()], return_tensors="pt")
    generated = slim.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    media = {key: inputs[key] for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                          "second_per_grid_ts")}
    for _ in range(16):
        types = (ids == IMAGE_ID).long() + 2 * (ids == VIDEO_ID).long()
        with torch.no_grad():
            logits = slim(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **media).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


def test_none_on_video_is_stock(models, tokenizer):
    stock, slim = models
    slim.set_compression({"method": "none"})
    inputs = processor(tokenizer)(videos=[random_video(8, seed=40)], text=[video_prompt()], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, slim(**inputs).logits)
