"""Video-LLaVA: stock checkpoints load (both layouts), `none` is the stock model for images, videos and mixed
batches, per-frame VisionZip (specs/visionzip.md §7.3) equals an independent recomputation, placeholders match,
torchvision-free frame preprocessing equals CLIP's, SparseVLM over the video block, VoCo-LLaMA's shifted segments
(specs/voco.md §7), batching, generation, remote code, 4/8-bit.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from builders import (
    sharpen_language_model,
    IMAGE_TOKEN_ID,
    VIDEO_PATCH,
    VIDEO_SIDE,
    make_video_image_processor,
    load_quantized,
    make_video_tokenizer,
    pad_rows,
    random_images,
    random_video,
    tiny_video_llava_config,
    video_token_id,
)
from PIL import Image
from test_remote_code import check_auto_classes, check_remote_round_trip
from test_visionzip import reference_visionzip
from transformers import CLIPVisionConfig, CLIPVisionModel, VideoLlavaForConditionalGeneration

from slimvlm import (
    SlimLlavaConfig,
    SlimVideoLlavaConfig,
    SlimVideoLlavaForConditionalGeneration,
    SlimVideoLlavaProcessor,
)
from slimvlm.sparsevlm import sparsevlm_schedule
from slimvlm.voco import (
    VoCoCache,
    VoCoDataCollator,
    build_voco_attention_mask,
    build_voco_prompt,
    build_voco_text_prompt,
    voco_bounds,
    voco_segments,
)

VIDEO_ID = video_token_id()
VOCO_ID = 5
VIDEO_PROMPT = "USER: <video>\n describe the image ASSISTANT:"
IMAGE_PROMPT = "USER: <image>\n what is the color ASSISTANT:"
# Random tiny models may emit placeholder ids; neither generate() nor the reference loop may.
SUPPRESSED = [IMAGE_TOKEN_ID, VIDEO_ID, VOCO_ID]
SETTINGS = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0, suppress_tokens=SUPPRESSED)
TOKENS_PER_FRAME = (VIDEO_SIDE // VIDEO_PATCH) ** 2 + 1  # the video tower keeps CLS: 37 here, 257 in Video-LLaVA-7B


def slim_video(compression=None, attn: str = "sdpa", seed: int = 0, **config_kwargs) -> SlimVideoLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = SlimVideoLlavaConfig(**tiny_video_llava_config(**config_kwargs).to_dict(), compression=compression)
    model = SlimVideoLlavaForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn, "vision_config": attn})
    return model.eval()


def slim_processor(compression, padding_side: str = "left", tokenizer=None) -> SlimVideoLlavaProcessor:
    tokenizer = tokenizer or make_video_tokenizer()
    tokenizer.padding_side = padding_side
    return SlimVideoLlavaProcessor(image_processor=make_video_image_processor(), tokenizer=tokenizer,
                                   patch_size=VIDEO_PATCH, compression=compression)


@pytest.fixture(scope="module")
def videos():
    return [random_video(4, seed=1), random_video(4, seed=2)]


@pytest.fixture(scope="module")
def images():
    return random_images(2, 30, seed=3)


def mixed_inputs(processor, videos, images):
    """Row 0: a video sample; row 1: an image sample (left padding)."""
    return processor(text=[VIDEO_PROMPT, IMAGE_PROMPT], videos=videos[:1], images=images[:1], return_tensors="pt",
                     padding=True)


# ------------------------------------------------------------------------------------------- none = stock


@pytest.mark.parametrize("legacy", [False, True])
def test_stock_checkpoint_loads_whole_and_none_is_the_stock_model(tmp_path, videos, images, legacy):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    stock = VideoLlavaForConditionalGeneration(tiny_video_llava_config()).eval()
    stock.save_pretrained(tmp_path, save_original_format=False)  # the in-memory layout (model.image_tower.* ...)
    assert any(k.startswith("model.video_tower.") for k in load_file(tmp_path / "model.safetensors"))
    if legacy:  # LanguageBind/Video-LLaVA-7B-hf layout
        renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.image_tower.", "image_tower.vision_model."), ("model.video_tower.", "video_tower.vision_model."),
                   ("model.multi_modal_projector.", "multi_modal_projector."))
        legacy_weights = {}
        for key, value in load_file(tmp_path / "model.safetensors").items():
            for new, old in renames:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
            legacy_weights[key] = value
        assert any(k.startswith("video_tower.vision_model.") for k in legacy_weights)
        save_file(legacy_weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    slim, info = SlimVideoLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = slim_processor(None)
    batches = [processor(text=[VIDEO_PROMPT] * 2, videos=videos, return_tensors="pt", padding=True),
               processor(text=[IMAGE_PROMPT] * 2, images=images, return_tensors="pt", padding=True),
               mixed_inputs(processor, videos, images)]
    assert int((batches[0]["input_ids"] == VIDEO_ID).sum(1)[0]) == 4 * TOKENS_PER_FRAME
    with torch.no_grad():
        for inputs in batches:
            assert torch.equal(stock(**inputs).logits, slim.eval()(**inputs).logits)


# ------------------------------------------------------------------------------ compression schema


def test_video_counts_default_to_14_3_and_are_validated_like_image_counts():
    model = slim_video({"method": "visionzip", "dominant": 10, "contextual": 3})
    assert model.config.compression["video_dominant"] == 14 and model.config.compression["video_contextual"] == 3
    assert model.video_token_count(8) == 136  # the paper's Video-LLaVA setting
    model.set_compression({"method": "visionzip", "tokens": 13, "video_tokens": 17})
    assert (model.config.compression["video_dominant"], model.config.compression["video_contextual"]) == (14, 3)
    bad = [({"video_dominant": 0, "video_contextual": 3}, "'video_dominant'.*>= 1"),
           ({"video_dominant": 14}, "missing \\['video_contextual'\\]"),
           ({"video_dominant": "14", "video_contextual": 3}, "'video_dominant'.*integer"),
           ({"video_dominant": 30, "video_contextual": 8}, "video_dominant \\+ video_contextual = 30 \\+ 8 = 38 exceeds the 37"),
           ({"video_tokens": 17, "video_dominant": 14}, "either 'video_tokens' or"),
           ({"video_tokens": 1}, "'video_tokens'.*>= 2")]
    for extra, message in bad:
        with pytest.raises(ValueError, match=message):
            model.set_compression({"method": "visionzip", "dominant": 10, "contextual": 3, **extra})
    with pytest.raises(ValueError, match="only video-capable models"):  # image-only families refuse video keys
        SlimLlavaConfig(compression={"method": "visionzip", "tokens": 64, "video_tokens": 17})
    with pytest.raises(ValueError, match="only video-capable models"):
        from slimvlm import SlimLlavaProcessor  # noqa: F401  (processor schema = model schema)
        from builders import make_processor

        stock = make_processor()
        SlimLlavaProcessor(image_processor=stock.image_processor, tokenizer=stock.tokenizer, patch_size=2,
                           compression={"method": "visionzip", "tokens": 64, "video_dominant": 14, "video_contextual": 3})


# ------------------------------------------------------------------------------------ VisionZip (§7.3)


def eager_tower(model, name: str) -> CLIPVisionModel:
    config = CLIPVisionConfig(**model.config.vision_config.to_dict())
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(getattr(model.model, name).state_dict())
    return tower


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_frame_visionzip_equals_the_independent_recomputation(attn):
    compression = {"method": "visionzip", "dominant": 10, "contextual": 3}  # video: the default 14/3
    model = slim_video(compression, attn=attn)
    processor = slim_processor(model.config.compression)
    clips = [random_video(8, seed=4), random_video(8, seed=5)]
    inputs = processor(text=[VIDEO_PROMPT] * 2, videos=clips, return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == VIDEO_ID).sum(1).tolist() == [136, 136]  # 8 frames x 17
    with torch.no_grad():
        output = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"])
    features = output.pooler_output  # [videos·frames, 17, D], video-major, frames in temporal order
    assert features.shape == (16, 17, model.config.text_config.hidden_size)
    reference = reference_visionzip(eager_tower(model, "video_tower"), inputs["pixel_values_videos"].flatten(0, 1), 14, 3)
    for frame, (tokens, dominant, *_) in enumerate(reference):
        assert set(output.dominant_indices[frame].tolist()) == dominant
        with torch.no_grad():
            expected = model.model.multi_modal_projector(tokens)
        torch.testing.assert_close(features[frame], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # Images keep their own split on the image tower.
    image_inputs = processor(text=[IMAGE_PROMPT], images=random_images(1, 30), return_tensors="pt")
    assert int((image_inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 13
    with torch.no_grad():
        image = model.model.get_image_features(pixel_values=image_inputs["pixel_values"]).pooler_output
    (tokens, *_), = reference_visionzip(eager_tower(model, "image_tower"), image_inputs["pixel_values"], 10, 3)
    with torch.no_grad():
        torch.testing.assert_close(image[0], model.model.multi_modal_projector(tokens), rtol=0, atol=1e-5 * float(image.abs().max()))


@pytest.mark.parametrize("compression", [{"method": "none"}, {"method": "visionzip", "tokens": 13, "video_tokens": 9},
                                         {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
                                         {"method": "cdpruner", "tokens": 6}, {"method": "divprune", "ratio": 0.1},
                                         {"method": "divprune", "ratio": 0.1, "scope": "image"},
                                         {"method": "cdpruner", "tokens": 5, "scope": "image"}])
def test_processor_writes_as_many_placeholders_as_the_model_produces(videos, images, compression):
    model = slim_video(compression)
    inputs = mixed_inputs(slim_processor(model.config.compression), videos, images)
    relevance = {key: value for key, value in inputs.items() if key.startswith("relevance_")}
    video_relevance = {key: relevance.pop(key) for key in list(relevance) if "video" in key}
    with torch.no_grad():
        video = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], **video_relevance).pooler_output
        image = model.model.get_image_features(pixel_values=inputs["pixel_values"], **relevance).pooler_output
    assert int((inputs["input_ids"] == VIDEO_ID).sum()) == video.shape[0] * video.shape[1] == model.video_token_count(4)
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == image.shape[1] == model.image_token_count()


# ------------------------------------------------------------------------ torchvision-free preprocessing


def clip_reference(frame: np.ndarray, side: int) -> np.ndarray:
    """Video-LLaVA's CLIP preprocessing written out: RGB, resize the shortest edge to `side` (bicubic, the long
    edge int(side·long/short)), center crop side x side, x/255, normalise with the OpenAI CLIP mean/std; CHW."""
    image = Image.fromarray(frame).convert("RGB")
    width, height = image.size
    if width <= height:
        size = (side, int(side * height / width))
    else:
        size = (int(side * width / height), side)
    image = image.resize(size, Image.BICUBIC)
    left, top = (size[0] - side) // 2, (size[1] - side) // 2
    array = np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    return ((array - mean) / std).transpose(2, 0, 1)


def test_frames_are_preprocessed_as_clip_images_without_torchvision():
    import importlib.util

    assert importlib.util.find_spec("torchvision") is None  # the environment the processor must work in
    processor = slim_processor(None)
    clip = random_video(3, height=30, width=40, seed=6)
    expected = np.stack([clip_reference(frame, VIDEO_SIDE) for frame in clip])
    forms = {"array": clip, "tensor": torch.from_numpy(clip), "PIL frames": [Image.fromarray(f) for f in clip]}
    for name, video in forms.items():
        out = processor(text=[VIDEO_PROMPT], videos=video, return_tensors="pt")
        assert out["pixel_values_videos"].shape == (1, 3, 3, VIDEO_SIDE, VIDEO_SIDE), name
        np.testing.assert_allclose(out["pixel_values_videos"][0].numpy(), expected, rtol=0, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------- batches and generate()


def greedy_without_cache(model, inputs, steps, **extra):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra.update({k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        logits[:, SUPPRESSED] = -float("inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, inputs["input_ids"].shape[1]:]


METHODS = [{"method": "none"}, {"method": "visionzip", "dominant": 10, "contextual": 3},
           {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
           {"method": "cdpruner", "tokens": 6}, {"method": "divprune", "tokens": 5, "scope": "image"}]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("compression", METHODS)
def test_mixed_video_image_batch_generates_what_each_sample_generates_alone(videos, images, compression, attn):
    model = slim_video(compression, attn=attn)
    processor = slim_processor(model.config.compression)
    batch = mixed_inputs(processor, videos, images)
    with torch.no_grad():
        together = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
        video_alone = processor(text=[VIDEO_PROMPT], videos=videos[:1], return_tensors="pt")
        image_alone = processor(text=[IMAGE_PROMPT], images=images[:1], return_tensors="pt")
        for row, alone in enumerate((video_alone, image_alone)):
            assert together[row].tolist() == model.generate(**alone, **SETTINGS)[0, alone["input_ids"].shape[1]:].tolist()
        together = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
    plan = {"sparsevlm_plan": model.sparsevlm_report.steps} if compression["method"] == "sparsevlm" else {}
    assert together.tolist() == greedy_without_cache(model, batch, 4, **plan).tolist()  # generate() with cache = no cache


def test_sparsevlm_prunes_the_video_block_on_the_scaled_schedule(videos, images):
    compression = {"method": "sparsevlm", "version": "1.5", "layers": [0, 1], "budgets": [64, 32]}
    model = slim_video(compression)
    inputs = mixed_inputs(slim_processor(model.config.compression), videos, images)
    with torch.no_grad():
        model(**inputs)
    report = model.sparsevlm_report
    spans = [4 * TOKENS_PER_FRAME, 36]  # the video block (CLS kept per frame), the image block
    assert report.visual_tokens == spans
    for v, counts in zip(spans, report.layer_counts):
        assert counts == sparsevlm_schedule(model.config.compression, v, 2).after  # budgets scaled to the span
    # The paper's 194-token Video-LLaVA setting through budget_fractions (README): fractions of the span.
    model.set_compression({"method": "sparsevlm", "version": "1.5", "layers": [0, 1], "budget_fractions": [0.5, 0.25]})
    with torch.no_grad():
        model(**inputs)
    assert model.sparsevlm_report.layer_counts[0] == sparsevlm_schedule(model.config.compression, spans[0], 2).after


# -------------------------------------------------------------------------------------- VoCo (§7)


def voco_video(num_voco: int = 2, attn: str = "eager") -> SlimVideoLlavaForConditionalGeneration:
    model = slim_video({"method": "voco", "num_voco_tokens": num_voco}, attn=attn)
    model.config.voco_token_id = VOCO_ID
    sharpen_language_model(model)  # masking and position errors must show in the logits
    return model


def voco_video_processor(num_voco: int):
    from test_voco import voco_tokenizer

    tokenizer = voco_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<voco>", "<video>"]})
    assert tokenizer.convert_tokens_to_ids("<video>") == VIDEO_ID
    return slim_processor({"method": "voco", "num_voco_tokens": num_voco}, tokenizer=tokenizer)


def brute_force_segment_mask(ids: torch.Tensor, real: torch.Tensor, visual_ids=(IMAGE_TOKEN_ID, VIDEO_ID)) -> torch.Tensor:
    """specs/voco.md §7 with explicit loops: a token of segment t sees BOS/prefix and segment t; a token after the
    last VoCo sees every VoCo token and the text; prefix tokens are causal; pad query rows see everything."""
    batch, length = ids.shape
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        ends = [j for j in range(length) if ids[b, j] == VOCO_ID and (j + 1 == length or ids[b, j + 1] != VOCO_ID)]
        first = next((j for j in range(length) if int(ids[b, j]) in visual_ids), length)
        kind = []  # "prefix", a segment index, or "text" per token
        for j in range(length):
            ended = sum(1 for end in ends if end < j)
            kind.append("prefix" if j < first else ended if ended < len(ends) else "text")
        for i in range(length):
            for j in range(i + 1):
                if not real[b, j]:
                    continue
                if kind[i] == "prefix":
                    allowed[b, i, j] = True
                elif kind[i] == "text":
                    allowed[b, i, j] = ids[b, j] == VOCO_ID or kind[j] == "text"
                else:
                    allowed[b, i, j] = kind[j] == "prefix" or kind[j] == kind[i]
            if not real[b, i]:
                allowed[b, i] = True
    return allowed


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_segment_mask_equals_a_brute_force_loop_of_the_rule(padding_side):
    V, I, Q = VIDEO_ID, IMAGE_TOKEN_ID, VOCO_ID
    rows = [[1, V, V, V, Q, Q, V, V, V, Q, Q, V, V, V, Q, Q, 9, 7, 8],  # 3 frames of 3 tokens, K = 2
            [1, 7, I, I, I, I, 9, Q, Q, 9, 7],  # an image: one group (the image rule)
            [1, 7, 8, 9]]  # text only
    ids, real = pad_rows(rows, padding_side)
    expected = brute_force_segment_mask(ids, real)
    segments = voco_segments(ids == Q, (ids == V) | (ids == I), 2)
    config = tiny_video_llava_config().text_config
    for attn in ("sdpa", "eager"):
        config._attn_implementation = attn
        mask = build_voco_attention_mask(config, torch.empty(ids.shape[0], ids.shape[1], 0), real, segments)
        got = mask[:, 0] if attn == "sdpa" else mask[:, 0] == 0
        assert torch.equal(got, expected), attn
        # The image row obeys the plain image rule (§3) exactly.
        plain = build_voco_attention_mask(config, torch.empty(ids.shape[0], ids.shape[1], 0), real, voco_bounds(ids == Q))
        assert torch.equal(mask[1], plain[1])
    # Shifted positions: frames of n = 3 and K = 2 -> frame t at 1 + 2t .., VoCo_t at 4 + 2t .., text at 10 ...
    positions = segments.positions(real)[0][real[0].bool()].tolist()
    assert positions == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10, 11, 12]


def video_voco_inputs(processor, clips, questions):
    return processor(text=[build_voco_prompt(q).replace("<image>", "<video>") for q in questions], videos=clips,
                     return_tensors="pt", padding=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_voco_video_two_stage_equals_the_full_mask_forward_and_generates_the_same(videos, attn):
    model = voco_video(2, attn=attn)
    processor = voco_video_processor(2)
    questions = ["what is the color of the circle ?", "how many are there ?"]
    inputs = video_voco_inputs(processor, videos, questions)
    ids = inputs["input_ids"]
    assert (ids == VOCO_ID).sum(1).tolist() == [8, 8]  # 4 frames x K = 2, one group after every frame
    text = processor.tokenizer([build_voco_text_prompt(q) for q in questions], add_special_tokens=False,
                               return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**inputs).logits
        cache = model.voco_compress(**inputs)
        staged = model(**text, voco_cache=cache).logits
    assert isinstance(cache, VoCoCache) and cache.num_voco_tokens == 8 and cache.metadata["num_frames"] == "4"
    assert cache.positions.tolist() == [list(range(8))] * 2  # relocated uniformly to 0 .. T·K - 1
    last = torch.where(ids == VOCO_ID, torch.arange(ids.shape[1]), -1).amax(1)
    diffs = []
    for b in range(2):
        after = (torch.arange(ids.shape[1]) > last[b]) & inputs["attention_mask"][b].bool()
        diffs.append(float((full[b, after] - staged[b, text["attention_mask"][b].bool()]).abs().max()))
    assert float(full.abs().max()) > 1.0 and max(diffs) <= 1e-4, diffs
    with torch.no_grad():
        original = model.voco_compress(**inputs, position_mode="original")
        staged_original = model(**text, voco_cache=original).logits
        cached = model.generate(**text, voco_cache=cache, **SETTINGS)[:, text["input_ids"].shape[1]:]
        recomputed = greedy_without_cache(model, inputs, 4)
        generated = model.generate(**inputs, **SETTINGS)[:, ids.shape[1]:]  # full-mask decoding with a KV cache
    torch.testing.assert_close(staged_original, staged, rtol=0, atol=1e-4)
    assert cached.tolist() == recomputed.tolist() == generated.tolist()


def test_voco_collator_trains_on_video_and_image_samples(videos, images):
    model = voco_video(2, attn="sdpa").train()
    processor = voco_video_processor(2)
    processor.tokenizer.padding_side = "right"
    collator = VoCoDataCollator(processor, system_prompt="", padding_side="right")
    batch = collator([{"video": videos[0], "conversation": [("what is the color of the circle ?", "red")]},
                      {"image": images[0], "conversation": [("how many are there ?", "two")]}])
    assert batch["pixel_values_videos"].shape[:2] == (1, 4) and batch["pixel_values"].shape[0] == 1
    assert (batch["input_ids"] == VOCO_ID).sum(1).tolist() == [8, 2]
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad is not None


# ----------------------------------------------------------------------------------- remote code, bnb


def test_remote_code_round_trip(tmp_path, videos):
    compression = {"method": "visionzip", "dominant": 10, "contextual": 3, "video_dominant": 6, "video_contextual": 2}
    processor = slim_processor(compression)
    np.save(tmp_path / "video.npy", videos[0])
    inputs = processor(text=[VIDEO_PROMPT], videos=videos[:1], return_tensors="pt")
    result = check_remote_round_trip(slim_video(compression), processor, inputs, {"video": str(tmp_path / "video.npy")},
                                     VIDEO_PROMPT, tmp_path, "modeling_video_llava.SlimVideoLlavaForConditionalGeneration",
                                     "processing_slimvlm.SlimVideoLlavaProcessor")
    assert result["compression"] == compression


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_keeps_both_towers_and_the_projector_full_precision(tmp_path, videos, images, bits):
    pytest.importorskip("bitsandbytes")
    slim_video(text_hidden=64, vision_hidden=64).save_pretrained(tmp_path)  # 4-bit blocks need 64-wide rows
    model = load_quantized(SlimVideoLlavaForConditionalGeneration, tmp_path, bits,
                           compression={"method": "visionzip", "dominant": 10, "contextual": 3})
    for tower in (model.model.image_tower, model.model.video_tower, model.model.multi_modal_projector):
        assert all(type(m) is torch.nn.Linear for m in tower.modules() if isinstance(m, torch.nn.Linear))
    assert type(model.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    inputs = mixed_inputs(slim_processor(model.config.compression), videos, images)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 2


def test_auto_classes_resolve_to_slim_video_llava(tmp_path):
    model = slim_video({"method": "visionzip", "tokens": 13})
    processor = check_auto_classes(model, slim_processor(model.config.compression), tmp_path)
    assert processor.compression == model.config.compression
    assert processor.num_additional_image_tokens == 1 and processor.vision_feature_select_strategy == "default"



@pytest.mark.parametrize("rows", ["one video", "padded batch"])
def test_voco_video_generate_prefill_uses_the_shifted_segment_positions_of_forward(videos, rows):
    """generate() gets no attention_mask for an unpadded batch: its prefill must still use the shifted-segment
    positions of forward() (specs/voco.md §7), not the plain 0..L-1."""
    model = voco_video(2, attn="eager")
    processor = voco_video_processor(2)
    questions = ["what is the color of the circle ?", "how many are there ?"]
    count = 1 if rows == "one video" else 2
    inputs = video_voco_inputs(processor, videos[:count], questions[:count])
    if rows == "one video":
        inputs.pop("attention_mask")  # what generate() sees for an unpadded batch
    else:
        assert not bool(inputs["attention_mask"].all())
    with torch.no_grad():
        full = model(**inputs).logits[:, -1]
        out = model.generate(**inputs, **dict(SETTINGS, max_new_tokens=1, suppress_tokens=None),
                             output_logits=True, return_dict_in_generate=True)
    assert float(full.abs().max()) > 1.0
    torch.testing.assert_close(out.logits[0], full, rtol=0, atol=1e-5)


def future_warnings(call, model) -> tuple[object, list[str]]:
    import warnings

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        result = call()
    names = (type(model).__name__, type(model.model).__name__)
    messages = []
    for w in caught:
        if w.category is FutureWarning:
            message = str(w.message).split("=tensor(")[0]
            for name in names:
                message = message.replace(name, "<class>")
            messages.append(message)
    return result, messages


@pytest.mark.parametrize("compression", [{"method": "none"}, {"method": "visionzip", "dominant": 5, "contextual": 2}])
def test_stock_pixel_values_images_is_taken_as_stock_takes_it(images, compression):
    """The stock VideoLlavaImageProcessor returns `pixel_values_images`: generate(), forward() and
    get_image_features() take it as `pixel_values`, warning (or not) as stock does."""
    model = slim_video(compression)
    stock = VideoLlavaForConditionalGeneration(model.config).eval()
    stock.load_state_dict(model.state_dict())
    inputs = slim_processor(model.config.compression)(text=[IMAGE_PROMPT], images=images[:1], return_tensors="pt")
    pixels = inputs.pop("pixel_values")
    assert "pixel_values_images" in inspect.signature(model.model.get_image_features).parameters  # generate() reads it
    reference = {"logits": model(**inputs, pixel_values=pixels).logits,
                 "base": model.model(**inputs, pixel_values=pixels).last_hidden_state,
                 "features": model.model.get_image_features(pixel_values=pixels).pooler_output,
                 "tokens": model.generate(**inputs, pixel_values=pixels, **SETTINGS)}
    calls = {"logits": lambda m: m(**inputs, pixel_values_images=pixels).logits,
             "base": lambda m: m.model(**inputs, pixel_values_images=pixels).last_hidden_state,
             "features": lambda m: m.model.get_image_features(pixel_values_images=pixels).pooler_output,
             "tokens": lambda m: m.generate(**inputs, pixel_values_images=pixels, **SETTINGS),
             "both": lambda m: m.model.get_image_features(pixel_values=pixels, pixel_values_images=pixels).pooler_output}
    for name, call in calls.items():
        got, warned = future_warnings(lambda: call(model), model)
        if compression["method"] == "none":
            expected, stock_warned = future_warnings(lambda: call(stock), stock)
            assert warned == stock_warned, name
            if name in reference:
                torch.testing.assert_close(list(got) if name == "features" else got, list(expected) if name == "features" else expected,
                                           rtol=0, atol=1e-6)
        if name in reference:
            torch.testing.assert_close(got, reference[name], rtol=0, atol=0)
        else:
            assert [m for m in warned if "Both `pixel_values_images` and `pixel_values`" in m], warned
