"""LLaVA-OneVision (specs/modern_families.md §1.3, §4, §7, §8): stock checkpoints load, `none` is the stock model
for single images, multi-image samples, videos and left-padded batches; VisionZip on SigLIP (attention received,
no CLS) equals an independent fp32 recomputation in the per-view layout; placeholders match for every grid, image
count and video length; batching, generation, SparseVLM, VoCo, torchvision-free frames, remote code, 4/8-bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from builders import (
    IMAGE_TOKEN_ID,
    OV_IMAGE_SIZES,
    OV_PINPOINTS,
    OV_SIDE,
    load_quantized,
    make_onevision_image_processor,
    make_video_tokenizer,
    onevision_images,
    random_video,
    sharpen_language_model,
    tiny_onevision_config,
    video_token_id,
)
from test_llava_next import (
    SETTINGS,
    assert_batch_generates_what_each_sample_generates_alone,
    assert_voco_two_stage_equals_the_full_mask,
    greedy_without_cache,
)
from test_remote_code import check_auto_classes, check_remote_round_trip
from transformers import LlavaOnevisionForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel
from transformers.image_processing_utils import select_best_resolution

from slimvlm import SlimLlavaOnevisionConfig, SlimLlavaOnevisionForConditionalGeneration, SlimLlavaOnevisionProcessor
from slimvlm.sparsevlm import sparsevlm_schedule
from slimvlm.visionzip import attention_received
from slimvlm.voco import build_voco_prompt, build_voco_text_prompt

GRIDS = [(1, 2), (1, 1), (1, 3), (2, 2)]
SIDE = OV_SIDE // 14  # 4 x 4 = 16 patches per view
PROMPT = "USER: <image>\n describe the image ASSISTANT:"
VIDEO_PROMPT = "USER: <video>\n describe ASSISTANT:"
MULTI_PROMPT = "USER: <image> <image>\n what is left ASSISTANT:"
VIDEO_ID = video_token_id()
VOCO_ID = 5
VZ = {"method": "visionzip", "dominant": 3, "contextual": 1, "video_dominant": 2, "video_contextual": 1}


def slim_ov(compression=None, attn: str = "sdpa", seed: int = 0, **config_kwargs) -> SlimLlavaOnevisionForConditionalGeneration:
    torch.manual_seed(seed)
    config = SlimLlavaOnevisionConfig(**tiny_onevision_config(**config_kwargs).to_dict(), compression=compression)
    model = SlimLlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn, "vision_config": attn})
    return model.eval()


def slim_processor(compression, padding_side: str = "left") -> SlimLlavaOnevisionProcessor:
    processor = SlimLlavaOnevisionProcessor(image_processor=make_onevision_image_processor(), tokenizer=make_video_tokenizer(),
                                            num_image_tokens=SIDE * SIDE, vision_feature_select_strategy="full",
                                            compression=compression)
    processor.tokenizer.padding_side = padding_side
    return processor


@pytest.fixture(scope="module")
def images():
    return onevision_images(GRIDS)


@pytest.fixture(scope="module")
def videos():
    return [random_video(8, 30, 40, seed=1), random_video(8, 40, 30, seed=2)]


def test_test_images_have_the_intended_grids(images):
    for image, grid in zip(images, GRIDS):
        height, width = select_best_resolution([image.height, image.width], OV_PINPOINTS)
        assert (height // OV_SIDE, width // OV_SIDE) == grid


# ------------------------------------------------------------------------------------------- none = stock


def inputs_of_every_kind(processor, images, videos) -> dict[str, dict]:
    """Left-padded batches: single images of mixed grids, multi-image samples, videos, and image + video rows."""
    return {
        "images": processor(images=images, text=[PROMPT, "USER: <image>\n what", PROMPT, "<image> how many"],
                            return_tensors="pt", padding=True),
        "multi-image": processor(images=[images[:2], images[2:3]], text=[MULTI_PROMPT, PROMPT], return_tensors="pt",
                                 padding=True),
        "videos": processor(videos=videos, text=[VIDEO_PROMPT, "<video> what"], return_tensors="pt", padding=True),
        "image + video": processor(images=images[3:], videos=videos[:1], text=[PROMPT, VIDEO_PROMPT], return_tensors="pt",
                                   padding=True),
    }


@pytest.mark.parametrize("legacy", [False, True])
def test_stock_checkpoint_loads_whole_and_none_is_the_stock_model(tmp_path, images, videos, legacy):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).eval()
    stock.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    # transformers saves the llava-hf layout (language_model.model.*, top-level towers and newline) ...
    assert "image_newline" in weights and any(k.startswith("language_model.model.") for k in weights)
    if legacy:  # ... and the Hub's llava-hf/llava-onevision-qwen2-*-hf files also keep SigLIP's `vision_model.` level
        weights = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                   for k, v in weights.items()}
        save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    slim, info = SlimLlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert slim.config.compression == {"method": "none"}
    slim.eval()
    for kind, inputs in inputs_of_every_kind(slim_processor(None), images, videos).items():
        assert bool((inputs["attention_mask"] == 0).any()), kind  # every batch is left-padded
        with torch.no_grad():
            expected, got = stock(**inputs).logits, slim(**inputs).logits
        assert torch.equal(expected, got), kind
    inputs = slim_processor(None)(images=images[3:], text=[PROMPT], return_tensors="pt")
    settings = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(stock.generate(**inputs, **settings), slim.generate(**inputs, **settings))


# ------------------------------------------------------------------------------ VisionZip on SigLIP (§4)


def eager_tower(model) -> SiglipVisionModel:
    config = SiglipVisionConfig(**model.config.vision_config.to_dict())
    config._attn_implementation = "eager"
    tower = SiglipVisionModel(config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    return tower


def reference_view(tower, view: torch.Tensor, d: int, c: int, layer: int):
    """§4 for one view, written out: the layer's input from the stock eager tower, LN1/q/k by hand, a softmax
    per head over the view's N patches, attention received summed over heads and queries, the top d patches,
    the stride targets over the ascending rest, argmax assignment by cosine of the head-mean keys, and each
    target + the mean of its assigned patches. Returns (tokens [d + c, C]: dominant ascending then contextual,
    the dominant set)."""
    with torch.no_grad():
        hidden = tower(view[None].float(), output_hidden_states=True).hidden_states
        x, out = hidden[layer][0], hidden[layer + 1][0]
        block = tower.encoder.layers[layer]
        attention = block.self_attn
        normed = block.layer_norm1(x)
        q, k = attention.q_proj(normed), attention.k_proj(normed)
    heads, n = attention.num_heads, x.shape[0]
    dh = x.shape[1] // heads
    received = [0.0] * n
    for h in range(heads):
        qh, kh = q[:, h * dh:(h + 1) * dh], k[:, h * dh:(h + 1) * dh]
        for i in range(n):
            logits = [float(qh[i] @ kh[j]) / math.sqrt(dh) for j in range(n)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            total = sum(exps)
            for j in range(n):
                received[j] += exps[j] / total / (heads * n)
    dominant = sorted(range(n), key=lambda j: -received[j])[:d]
    rest = [j for j in range(n) if j not in dominant]
    step = max(1, len(rest) // c)
    targets = [rest[r] for r in range(0, len(rest), step)][:c]
    others = [j for j in rest if j not in targets]
    mean_keys = k.view(n, heads, dh).mean(1)
    unit = {j: mean_keys[j] / mean_keys[j].norm() for j in rest}
    members = {t: [] for t in targets}
    for j in others:
        similarity = [float(unit[j] @ unit[t]) for t in targets]
        members[targets[similarity.index(max(similarity))]].append(j)
    contextual = [out[t] + (torch.stack([out[j] for j in members[t]]).mean(0) if members[t] else 0) for t in targets]
    return torch.stack([out[j] for j in sorted(dominant)] + contextual), set(dominant)


def reference_image(model, tower, views, grid, single: bool, d: int, c: int, layer: int):
    """An image's LLM tokens assembled in loops: per view `reference_view`, projected; a single image as
    [base ; crops' dominant patches in raster order of the global grid ; crops' contextual, crop by crop], an
    image of a multi-image sample as [base ; newline]."""
    per_view = [reference_view(tower, view, d, c, layer) for view in views]
    with torch.no_grad():
        projected = [model.model.multi_modal_projector(tokens) for tokens, _ in per_view]
    if not single:
        return torch.cat([projected[0], model.model.image_newline.detach()[None]]), [per_view[0][1]]
    gh, gw = grid
    dominant = {}
    for crop in range(gh * gw):
        r, q = divmod(crop, gw)
        for rank, patch in enumerate(sorted(per_view[1 + crop][1])):
            y, x = divmod(patch, SIDE)
            dominant[(r * SIDE + y, q * SIDE + x)] = projected[1 + crop][rank]
    rows = [projected[0]] + [dominant[key][None] for key in sorted(dominant)]
    rows += [projected[1 + crop][d:] for crop in range(gh * gw)]
    return torch.cat(rows), [sets for _, sets in per_view]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_visionzip_on_images_equals_the_independent_recomputation(images, attn):
    model = slim_ov(VZ, attn=attn)
    tower = eager_tower(model)
    d, c = 3, 1
    layer = model.config.vision_config.num_hidden_layers - 1  # vision_feature_layer -1: the last layer's output
    processor = slim_processor(VZ)
    for sample_images, single in ((images, True), ([images[:3]], False)):
        inputs = processor(images=sample_images, text=[PROMPT] * len(sample_images) if single else [MULTI_PROMPT + " <image>"],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                    batch_num_images=inputs["batch_num_images"])
        start = 0
        for b, (features, size) in enumerate(zip(output.pooler_output, inputs["image_sizes"])):
            grid = GRIDS[b] if single else None
            count = 1 + grid[0] * grid[1] if single else 1
            expected, sets = reference_image(model, tower, inputs["pixel_values"][b][:count], grid, single, d, c, layer)
            assert [set(row.tolist()) for row in output.dominant_indices[start:start + count]] == sets
            assert features.shape[0] == (count * (d + c) if single else d + c + 1)
            torch.testing.assert_close(features, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
            start += count
        assert start == output.dominant_indices.shape[0]  # padding views were never encoded


def test_visionzip_on_video_replaces_the_pooling_per_frame(videos):
    model = slim_ov(VZ)
    tower = eager_tower(model)
    layer = model.config.vision_config.num_hidden_layers - 1
    inputs = slim_processor(VZ)(videos=videos, text=[VIDEO_PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    assert output.pooler_output.shape == (2, 8 * 3 + 1, model.config.text_config.hidden_size)
    for v in range(2):
        rows, sets = [], []
        for t in range(8):
            tokens, dominant = reference_view(tower, inputs["pixel_values_videos"][v, t], 2, 1, layer)
            with torch.no_grad():
                rows.append(model.model.multi_modal_projector(tokens))
            sets.append(dominant)
        expected = torch.cat(rows + [model.model.image_newline.detach()[None]])
        assert [set(row.tolist()) for row in output.dominant_indices[8 * v:8 * v + 8]] == sets
        torch.testing.assert_close(output.pooler_output[v], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_sdpa_and_eager_keep_the_same_sets(images, videos):
    outputs = {}
    for attn in ("sdpa", "eager"):
        model = slim_ov(VZ, attn=attn)
        inputs = slim_processor(VZ)(images=images, videos=videos[:1], text=[PROMPT] * 4 + [VIDEO_PROMPT],
                                    return_tensors="pt", padding=True)
        with torch.no_grad():  # padding rows attend to nothing: their values are backend-defined
            outputs[attn] = model(**inputs).logits[inputs["attention_mask"].bool()]
            outputs[attn + " sets"] = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).dominant_indices
    assert torch.equal(outputs["sdpa sets"].sort(1).values, outputs["eager sets"].sort(1).values)
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=0, atol=1e-5)


def test_attention_received_is_the_head_and_query_mean_of_softmax_columns_and_chunking_is_exact():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 100, 8, generator=generator), torch.randn(2, 3, 100, 8, generator=generator)
    full = torch.softmax(q @ k.transpose(2, 3) * 0.3, dim=-1)  # [B, H, N, N]
    expected = full.sum(dim=2).mean(dim=1) / 100
    for chunk_bytes in (1, 4 * 2 * 3 * 100 * 64, 2**30):  # 64-query chunks, and one chunk
        torch.testing.assert_close(attention_received(q, k, 0.3, chunk_bytes), expected, rtol=0, atol=1e-6)
    assert torch.allclose(attention_received(q, k, 0.3).sum(1), torch.ones(2))
    # A key every query attends to wins, whichever head it is in.
    k[:, 1, 7] = q[:, 1].mean(1) * 50
    assert attention_received(q, k, 0.3).argmax(1).tolist() == [7, 7]


def test_visionzip_counts_patches_and_refuses_what_siglip_cannot_do():
    with pytest.raises(ValueError, match="16 tokens"):
        SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression={"method": "visionzip", "dominant": 16,
                                                                                   "contextual": 1, "video_tokens": 4})
    config = SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(),
                                      compression={"method": "visionzip", "dominant": 15, "contextual": 1, "video_tokens": 4})
    assert config.compression["dominant"] + config.compression["contextual"] == 16  # d counts patches (no CLS)
    with pytest.raises(ValueError, match=r"54 \+ 10 = 64 exceeds the 16 tokens"):  # the default 54/10 per frame
        SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression={"method": "visionzip", "tokens": 4})
    assert SlimLlavaOnevisionConfig(compression={"method": "visionzip", "tokens": 64}).compression == {
        "method": "visionzip", "dominant": 54, "contextual": 10, "video_dominant": 54, "video_contextual": 10}
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        SlimLlavaOnevisionConfig(**tiny_onevision_config(vision_feature_layer=[-1, -2]).to_dict(), compression=VZ)
    model = slim_ov(VZ)
    with pytest.raises(ValueError, match="'full'"):
        model.model.get_image_features(pixel_values=torch.zeros(1, 2, 3, 56, 56), image_sizes=torch.tensor([[56, 56]]),
                                       vision_feature_select_strategy="default")


# --------------------------------------------------------------------------------- counts (§7 table)


@pytest.mark.parametrize("compression", [{"method": "none"}, VZ, {"method": "visionzip", "tokens": 8, "video_tokens": 5}])
def test_processor_writes_as_many_placeholders_as_the_model_produces(images, videos, compression):
    model = slim_ov(compression)
    processor = slim_processor(model.config.compression)
    stock_counts, k = [44, 36, 68, 88], None  # spec §7: 56x84 / 56² / 100x300 / 112²
    if model.config.compression["method"] == "visionzip":
        k = model.config.compression["dominant"] + model.config.compression["contextual"]
        k_f = model.config.compression["video_dominant"] + model.config.compression["video_contextual"]
    inputs = processor(images=images, text=[PROMPT] * 4, return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    counts = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [f.shape[0] for f in features.pooler_output]
    assert counts == (stock_counts if k is None else [3 * k, 2 * k, 4 * k, 5 * k])
    multimodal = processor._get_num_multimodal_tokens(image_sizes=[[image.height, image.width] for image in images])
    assert multimodal.num_image_tokens == counts
    if k is not None:
        assert counts == [model.visionzip_token_count(size) for size in inputs["image_sizes"]]
    # Multi-image samples: K + 1 (stock 16 + 1) per image.
    for groups in ([images[:2], images[2:]], [images[:3], images[3:]], [images]):
        prompts = [" ".join(["<image>"] * len(group)) + " what" for group in groups]
        inputs = processor(images=groups, text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                      batch_num_images=inputs["batch_num_images"])
        per_image = [f.shape[0] for f in features.pooler_output]
        single = [len(group) == 1 for group in groups for _ in group]
        expected = [(stock_counts[3] if k is None else 5 * k) if alone else (17 if k is None else k + 1) for alone in single]
        assert per_image == expected
        assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum().item() == sum(per_image)
    # Videos of 1, 3 and 8 frames: F·196-style pooled (2x2 here: 4 per frame) + 1, or F·K_f + 1.
    for frames in (1, 3, 8):
        inputs = processor(videos=[random_video(frames)], text=[VIDEO_PROMPT], return_tensors="pt")
        with torch.no_grad():
            features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
        count = int((inputs["input_ids"] == VIDEO_ID).sum())
        assert count == features.pooler_output.shape[1] == model.video_token_count(frames)
        assert count == (frames * 4 + 1 if k is None else frames * k_f + 1)
        assert processor._get_num_multimodal_tokens(video_sizes=[(frames, 56, 56)]).num_video_tokens == [count]


# ------------------------------------------------------------------------------- batching and generation


SPARSEVLM = [{"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
             {"method": "sparsevlm", "version": "2.0", "layers": [0], "budgets": [64]}]
HEAD_DIM_128 = dict(text_hidden=128, heads=1, kv_heads=1)  # SparseVLM v2.0's gravity floor needs a realistic head_dim


@pytest.mark.parametrize("compression", [{"method": "none"}, VZ, *SPARSEVLM])
def test_left_padded_mixed_batch_generates_what_each_sample_generates_alone(images, videos, compression):
    """Mixed grids (1x2, 1x1, 2x2) and a video row in one left-padded batch; generate() with a cache = a
    cache-free greedy loop."""
    model = slim_ov(compression, **(HEAD_DIM_128 if compression.get("version") == "2.0" else {}))
    processor = slim_processor(model.config.compression)
    prompts = [PROMPT, "USER: <image>\n what ASSISTANT:", "USER: <image>\n how many red circle are there ? ASSISTANT:",
               VIDEO_PROMPT]
    assert_batch_generates_what_each_sample_generates_alone(model, processor, [images[0], images[1], images[3], None],
                                                            prompts, videos=[None, None, None, videos[0]])


def test_multi_image_batch_generates_what_each_sample_generates_alone(images):
    assert_multi_image_batch_generates_what_each_sample_generates_alone(slim_ov(VZ), slim_processor(VZ), images)


def assert_multi_image_batch_generates_what_each_sample_generates_alone(model, processor, images):
    """A left-padded batch of a two-image sample and a single image generates what each generates alone, and
    generate() with a cache equals a cache-free greedy loop."""
    groups, prompts = [images[:2], images[2:3]], [MULTI_PROMPT, PROMPT]
    batch = processor(images=groups, text=prompts, return_tensors="pt", padding=True)
    assert bool((batch["attention_mask"] == 0).any())
    with torch.no_grad():
        together = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
        for i in range(2):
            alone = processor(images=[groups[i]], text=[prompts[i]], return_tensors="pt")
            assert together[i].tolist() == model.generate(**alone, **SETTINGS)[0, alone["input_ids"].shape[1]:].tolist()
    assert together.tolist() == greedy_without_cache(model, batch, 4).tolist()


# --------------------------------------------------------------------------------------------- SparseVLM


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_sparsevlm_prunes_the_whole_image_or_video_block(images, videos, version):
    compression = {"method": "sparsevlm", "version": version, "layers": [0], "budgets": [64]}
    model = slim_ov(compression, **(HEAD_DIM_128 if version == "2.0" else {}))
    inputs = slim_processor(model.config.compression)(images=images[3:], videos=videos[:1], text=[PROMPT, VIDEO_PROMPT],
                                                      return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**inputs)
    report = model.sparsevlm_report
    spans = ((inputs["input_ids"] == IMAGE_TOKEN_ID) | (inputs["input_ids"] == VIDEO_ID)).sum(1).tolist()
    assert report.visual_tokens == spans == [88, 33]  # 2x2 image: 16 + 8x8 unpadded + 8 newlines; 8 frames x 4 + 1
    for v, counts in zip(spans, report.layer_counts):
        assert counts == sparsevlm_schedule(model.config.compression, v, 2).after
    with pytest.raises(ValueError, match="one image per sample"):
        multi = slim_processor(model.config.compression)(images=[images[:2]], text=[MULTI_PROMPT], return_tensors="pt")
        model(**multi)


# -------------------------------------------------------------------------------------------------- VoCo


def voco_ov(num_voco: int = 2, attn: str = "eager") -> SlimLlavaOnevisionForConditionalGeneration:
    model = slim_ov({"method": "voco", "num_voco_tokens": num_voco}, attn=attn)
    model.config.voco_token_id = VOCO_ID
    sharpen_language_model(model)  # masking and position errors must show in the logits
    return model


def test_voco_two_stage_equals_the_full_mask_forward_for_images_and_videos(images, videos):
    model = voco_ov(2)
    processor = slim_processor(model.config.compression)
    questions = ["what is the color of the circle ?", "how many are there ?", "describe"]
    prompts = [build_voco_prompt(q) for q in questions]
    prompts[2] = prompts[2].replace("<image>", "<video>")
    inputs = processor(images=[images[0], images[3]], videos=videos[:1], text=prompts, return_tensors="pt", padding=True)
    for row in inputs["input_ids"]:  # one VoCo group after the whole image or video block
        voco = (row == VOCO_ID).nonzero().flatten()
        visual = ((row == IMAGE_TOKEN_ID) | (row == VIDEO_ID)).nonzero().flatten()
        assert len(voco) == 2 and int(voco[0]) > int(visual[-1])
    text = processor.tokenizer([build_voco_text_prompt(q) for q in questions], add_special_tokens=False,
                               return_tensors="pt", padding=True)
    assert_voco_two_stage_equals_the_full_mask(model, inputs, text, VOCO_ID)


# ------------------------------------------------------------------------------ video frames, no torchvision


def reference_frames(video, size=(OV_SIDE, OV_SIDE), mean=0.5, std=0.5) -> torch.Tensor:
    """The stock LlavaOnevisionVideoProcessor's steps on the CPU, frame by frame: the uint8 RGB frame, channels
    first; torchvision's resize (bicubic, antialias) of a uint8 CPU tensor, which is torch's uint8 interpolate;
    x / 255, then (x - mean) / std."""
    frames = []
    for frame in video:
        chw = torch.from_numpy(np.asarray(frame)).permute(2, 0, 1)[None]
        resized = torch.nn.functional.interpolate(chw, size=size, mode="bicubic", align_corners=False, antialias=True)
        frames.append(((resized[0].double() / 255 - mean) / std).float())
    return torch.stack(frames)


def test_frames_are_preprocessed_as_the_stock_video_processor_without_torchvision(videos):
    from PIL import Image

    from slimvlm.processing_llava_onevision import OnevisionFrameProcessor

    processor = slim_processor(None)
    assert isinstance(processor.video_processor, OnevisionFrameProcessor)
    expected = torch.stack([reference_frames(video) for video in videos])
    forms = {"arrays": videos, "tensors": [torch.from_numpy(v) for v in videos],
             "channels first": [torch.from_numpy(v).permute(0, 3, 1, 2) for v in videos],
             "PIL frames": [[Image.fromarray(frame) for frame in v] for v in videos]}
    for form, given in forms.items():
        got = processor(videos=given, text=[VIDEO_PROMPT] * 2, return_tensors="pt", padding=True)["pixel_values_videos"]
        assert got.shape == (2, 8, 3, OV_SIDE, OV_SIDE), form
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=form)
    one = processor(videos=videos[0], text=[VIDEO_PROMPT], return_tensors="pt")["pixel_values_videos"]
    torch.testing.assert_close(one, expected[:1], rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        processor(videos=[videos[0].astype(np.float32) / 255], text=[VIDEO_PROMPT])
    with pytest.raises(ValueError, match="same number of frames"):
        processor(videos=[videos[0], videos[1][:3]], text=[VIDEO_PROMPT] * 2, padding=True)


def test_a_stock_folders_video_preprocessor_config_sets_the_frames(tmp_path, videos):
    import json

    processor = slim_processor(None)
    processor.save_pretrained(tmp_path)
    assert not (tmp_path / "video_preprocessor_config.json").exists()  # AutoProcessor never needs torchvision
    assert SlimLlavaOnevisionProcessor.from_pretrained(tmp_path).video_preprocessing == processor.video_preprocessing
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 28, "width": 28},
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    loaded = SlimLlavaOnevisionProcessor.from_pretrained(tmp_path)
    got = loaded(videos=videos[:1], text=[VIDEO_PROMPT], return_tensors="pt")["pixel_values_videos"]
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    expected = reference_frames(videos[0], (28, 28), mean.double(), std.double())
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- remote code, auto, bnb


def test_remote_code_round_trip_with_a_video(tmp_path, videos):
    processor = slim_processor(VZ)
    np.save(tmp_path / "video.npy", videos[0])
    inputs = processor(text=[VIDEO_PROMPT], videos=videos[:1], return_tensors="pt")
    result = check_remote_round_trip(slim_ov(VZ), processor, inputs, {"video": str(tmp_path / "video.npy")},
                                     VIDEO_PROMPT, tmp_path, "modeling_llava_onevision.SlimLlavaOnevisionForConditionalGeneration",
                                     "processing_llava_onevision.SlimLlavaOnevisionProcessor")
    assert result["compression"] == VZ


def test_remote_code_round_trip_with_an_image(tmp_path, images):
    processor = slim_processor(VZ)
    images[3].save(tmp_path / "image.png")
    inputs = processor(images=[images[3]], text=[PROMPT], return_tensors="pt")
    check_remote_round_trip(slim_ov(VZ), processor, inputs, {"image": str(tmp_path / "image.png")}, PROMPT, tmp_path,
                            "modeling_llava_onevision.SlimLlavaOnevisionForConditionalGeneration",
                            "processing_llava_onevision.SlimLlavaOnevisionProcessor")


def test_auto_classes_resolve_to_slim_onevision(tmp_path):
    from slimvlm import AutoSlimModel, AutoSlimProcessor

    model = slim_ov(VZ)
    reloaded = check_auto_classes(model, slim_processor(VZ), tmp_path / "slim")
    assert reloaded.compression == VZ
    stock = tmp_path / "stock"
    LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).save_pretrained(stock)
    assert type(AutoSlimModel.from_pretrained(stock, compression=VZ)) is SlimLlavaOnevisionForConditionalGeneration


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_keeps_vision_side_full_precision(tmp_path, images, videos, bits):
    pytest.importorskip("bitsandbytes")
    slim_ov(text_hidden=64, vision_hidden=64).save_pretrained(tmp_path)  # bitsandbytes' 4-bit blocks need 64-wide rows
    model = load_quantized(SlimLlavaOnevisionForConditionalGeneration, tmp_path, bits, compression=VZ)
    assert all(type(m) is torch.nn.Linear for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear))
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear and model.model.image_newline.dtype == torch.float32
    assert type(model.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    processor = slim_processor(model.config.compression)
    inputs = processor(images=images[:1], videos=videos[:1], text=[PROMPT, VIDEO_PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 2


# --------------------------------------------------------------------------- behaves like the stock class


def same(a, b) -> bool:
    """Nested tuples/lists of tensors (or None) are equal element by element."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return (a is None and b is None) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b))


@pytest.mark.parametrize("compression", [{"method": "none"}, VZ])
def test_get_features_return_dict_false_and_tower_outputs(images, videos, compression):
    """return_dict=False gives a tuple; output_hidden_states / output_attentions come back as the stock tower's."""
    model = slim_ov(compression, attn="eager")
    stock = LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).eval()
    stock.load_state_dict(model.state_dict())
    stock.model.vision_tower.config._attn_implementation = "eager"
    inputs = slim_processor(model.config.compression)(images=images[3:], videos=videos[:1], text=[PROMPT, VIDEO_PROMPT],
                                                      return_tensors="pt", padding=True)
    pixel = dict(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    with torch.no_grad():
        as_dict = model.model.get_image_features(**pixel)
        as_tuple = model.model.get_image_features(**pixel, return_dict=False)
        ours = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], output_hidden_states=True,
                                              output_attentions=True)
        theirs = stock.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], output_hidden_states=True,
                                                output_attentions=True)
        plain = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    assert isinstance(as_tuple, tuple) and same(as_tuple, as_dict.to_tuple())
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    layers = model.config.vision_config.num_hidden_layers
    assert len(ours.hidden_states) == layers + 1 and len(ours.attentions) == layers
    for a, b in zip(ours.hidden_states + ours.attentions, theirs.hidden_states + theirs.attentions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooler_output, plain.pooler_output, rtol=0, atol=1e-6)
    with torch.no_grad():
        full = model(**inputs, return_dict=False)
        dense = model(**inputs)
    assert isinstance(full, tuple) and torch.equal(full[0], dense.logits)


def test_base_forward_has_the_stock_signature_and_stock_classes_stay_untouched(images):
    import inspect

    from transformers import LlavaOnevisionModel

    stock_params = list(inspect.signature(LlavaOnevisionModel.forward).parameters)
    assert list(inspect.signature(slim_ov().model.forward).parameters) == stock_params[1:]
    before = LlavaOnevisionModel.get_image_features, LlavaOnevisionModel.forward, LlavaOnevisionModel.get_video_features
    slim_ov(VZ)
    assert (LlavaOnevisionModel.get_image_features, LlavaOnevisionModel.forward,
            LlavaOnevisionModel.get_video_features) == before
    # device_map="auto" keeps the stock vision block and decoder layer whole (declared by the stock sub-models).
    assert {"SiglipEncoderLayer", "Qwen2DecoderLayer"} <= set(slim_ov()._no_split_modules)


def test_model_card_says_what_visionzip_does_on_siglip(tmp_path):
    model = slim_ov(VZ)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "llava-onevision" in card and "attention received" in card and "CLS included" not in card
    assert "(1 + anyres crops) x 4 per single image (20 for a 2x2 grid), 5 per image of a multi-image sample, 3 per video frame + 1" in card


def test_cli_converts_a_stock_onevision_folder_and_answers(tmp_path, images, capsys):
    import json

    from slimvlm import AutoSlimProcessor
    from slimvlm.cli import main

    stock = tmp_path / "stock"
    torch.manual_seed(0)
    LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).save_pretrained(stock)
    # A llava-hf folder's processor files, written by hand: the stock processor cannot be built without torchvision.
    make_onevision_image_processor().save_pretrained(stock)
    make_video_tokenizer().save_pretrained(stock)
    (stock / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": SIDE * SIDE,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    (stock / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": OV_SIDE, "width": OV_SIDE},
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255}))
    assert type(AutoSlimProcessor.from_pretrained(stock, compression=VZ)) is SlimLlavaOnevisionProcessor
    out = tmp_path / "slim"
    assert main(["convert", str(stock), str(out), "--compression", json.dumps(VZ),
                 "--base-model", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "slim_llava_onevision"
    # The stock video processor (torchvision) is not named in the slim folder; its frame settings travel instead.
    assert not (out / "video_preprocessor_config.json").exists()
    assert SlimLlavaOnevisionProcessor.from_pretrained(out).video_preprocessing["size"] == {"height": OV_SIDE, "width": OV_SIDE}
    images[3].save(tmp_path / "image.png")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--image", str(tmp_path / "image.png"), "--question", "what",
                 "--max-new-tokens", "2"]) == 0
    assert "visual tokens 20," in capsys.readouterr().err  # (1 + 2x2) x 4


def test_what_transformers_own_onevision_tests_check_holds_for_the_slim_classes(images):
    """The checks of transformers' LlavaOnevision model tests, on the Slim classes with `none` (and VisionZip where
    it applies): the same init as the stock class, inputs_embeds = input_ids, a list of feature layers under none,
    half precision without NaN."""
    config = tiny_onevision_config()
    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    slim = SlimLlavaOnevisionForConditionalGeneration(SlimLlavaOnevisionConfig(**config.to_dict())).eval()
    assert stock.state_dict().keys() == slim.state_dict().keys()
    assert all(torch.equal(value, slim.state_dict()[key]) for key, value in stock.state_dict().items())
    inputs = slim_processor(None)(images=images[:2], text=[PROMPT] * 2, return_tensors="pt", padding=True)
    text_only = {key: value for key, value in inputs.items() if key not in ("pixel_values", "image_sizes", "batch_num_images")}
    embeds = slim.get_input_embeddings()(text_only.pop("input_ids"))
    with torch.no_grad():
        torch.testing.assert_close(slim(input_ids=inputs["input_ids"], **text_only).logits,
                                   slim(inputs_embeds=embeds, **text_only).logits)
        assert torch.equal(slim(inputs_embeds=embeds, **text_only).logits, stock(inputs_embeds=embeds, **text_only).logits)
    layered = tiny_onevision_config(vision_feature_layer=[-1, -2])
    torch.manual_seed(0)
    stock = LlavaOnevisionForConditionalGeneration(layered).eval()
    slim = SlimLlavaOnevisionForConditionalGeneration(SlimLlavaOnevisionConfig(**layered.to_dict())).eval()
    slim.load_state_dict(stock.state_dict())
    assert slim.model.multi_modal_projector.linear_1.in_features == 2 * layered.vision_config.hidden_size
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, slim(**inputs).logits)
    for compression in ({"method": "none"}, VZ):
        model = slim_ov(compression).to(torch.bfloat16)
        half = slim_processor(model.config.compression)(images=images[3:], text=[PROMPT], return_tensors="pt")
        half["pixel_values"] = half["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            logits = model(**half).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_projector_and_newline_export_and_import_bit_exact(tmp_path):
    from slimvlm.conversion.projector import export_projector, import_projector, read_projector

    slim_ov(VZ, seed=0).save_pretrained(tmp_path / "tuned")
    torch.manual_seed(1)
    LlavaOnevisionForConditionalGeneration(tiny_onevision_config()).save_pretrained(tmp_path / "base")  # llava-hf layout
    file = export_projector(tmp_path / "tuned", tmp_path / "projector")
    tuned = read_projector(tmp_path / "tuned")
    assert {"image_newline", "multi_modal_projector.linear_1.weight"} <= set(tuned)
    out = import_projector(tmp_path / "base", file, tmp_path / "imported")
    imported = read_projector(out)
    assert imported.keys() == tuned.keys() and all(torch.equal(imported[k], tuned[k]) for k in tuned)
    model = SlimLlavaOnevisionForConditionalGeneration.from_pretrained(out).state_dict()
    base = SlimLlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "base").state_dict()
    assert all(torch.equal(model[k], base[k]) for k in model if "multi_modal_projector" not in k and "image_newline" not in k)
    assert torch.equal(model["model.image_newline"], tuned["image_newline"])
    assert not torch.equal(base["model.image_newline"], tuned["image_newline"])  # the import changed something
