"""Qwen2.5-VL: stock equivalence, VisionZip against an independent fp32 recomputation, counts, positions, batch,
generation and backends (specs/modern_families.md §8, M1-M8, M14)."""

from __future__ import annotations

import pytest
import torch
from qwen_builders import IMAGE_ID, VIDEO_ID, prompt, qwen2_5_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen
from qwen_reference import assert_features_match, pruned_dense_inputs, reference_visionzip
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

import slimvlm
from slimvlm import SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor
from slimvlm.visionzip import segmented_attention_received, visionzip_counts

SIZES = [(56, 84), (84, 56), (112, 112), (28, 28)]
RATIOS = [(0.45, 0.05), (0.65, 0.05), (0.95, 0.05)]


def visionzip(dominant=0.45, contextual=0.05):
    return {"method": "visionzip", "dominant_ratio": dominant, "contextual_ratio": contextual}


@pytest.fixture(scope="module")
def tokenizer():
    return qwen_tokenizer()


def processor(tokenizer, compression=None, padding_side="left"):
    tokenizer.padding_side = padding_side
    return SlimQwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tokenizer, compression=compression)


def stock_model(fullatt=(1, 3), attn="eager", seed=0):
    torch.manual_seed(seed)
    config = qwen2_5_config(fullatt)
    config._attn_implementation = attn
    return sharpen(Qwen2_5_VLForConditionalGeneration(config)).eval()


@pytest.fixture(scope="module", params=[(1, 3), (1,)], ids=["full-scoring-block", "windowed-scoring-block"])
def models(request, tmp_path_factory):
    """(stock, slim) with the same weights, eager attention; saved and loaded as a user would."""
    stock = stock_model(request.param)
    folder = tmp_path_factory.mktemp("qwen")
    stock.save_pretrained(folder)
    slim = SlimQwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
    return stock, slim


# ---------------------------------------------------------------- M1: none = stock; loading; M14 isolation


def test_loads_current_and_legacy_layouts_with_no_missing_or_unexpected_keys(tmp_path):
    stock = stock_model()
    stock.save_pretrained(tmp_path / "saved")  # transformers writes the legacy layout (visual.*, model.*)
    legacy = load_file(tmp_path / "saved" / "model.safetensors")
    assert any(key.startswith("visual.") for key in legacy) and any(key.startswith("model.layers.") for key in legacy)
    current = {("model." + key if not key.startswith("lm_head") else key).replace("model.model.", "model.language_model."): value
               for key, value in legacy.items()}
    (tmp_path / "current").mkdir()
    for name in ("config.json", "generation_config.json"):
        (tmp_path / "current" / name).write_bytes((tmp_path / "saved" / name).read_bytes())
    save_file(current, tmp_path / "current" / "model.safetensors", metadata={"format": "pt"})
    assert any(key.startswith("model.language_model.") for key in current)
    expected = stock.state_dict()
    for folder in ("saved", "current"):
        slim, info = SlimQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (folder, info)
        assert isinstance(slim.config, SlimQwen2_5_VLConfig) and slim.config.compression == {"method": "none"}
        loaded = slim.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in expected.items()), folder
    model = slimvlm.AutoSlimModel.from_pretrained(tmp_path / "saved", compression=visionzip())
    assert isinstance(model, SlimQwen2_5_VLForConditionalGeneration) and model.config.compression == visionzip()


def test_none_gives_stock_logits_and_tokens_bitwise(models, tokenizer):
    stock, slim = models
    slim.set_compression({"method": "none"})
    proc = processor(tokenizer)
    images = [random_image(56, 84, 1), random_image(112, 112, 2)]
    inputs = proc(images=images, text=[prompt(), prompt(before="w5 w6 w7 w8 w9")], padding=True, return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 0  # left padding
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, slim(**inputs).logits)
    stock_tokens = stock.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(stock_tokens, slim.generate(**inputs, max_new_tokens=8, do_sample=False))


def test_stock_classes_are_untouched():
    before = {name: getattr(Qwen2_5_VLModel, name) for name in ("forward", "get_image_features", "get_rope_index")}
    stock_model()
    slim = SlimQwen2_5_VLForConditionalGeneration(SlimQwen2_5_VLConfig(**qwen2_5_config().to_dict(), compression=visionzip()))
    assert type(slim.model).forward is not Qwen2_5_VLModel.forward
    assert before == {name: getattr(Qwen2_5_VLModel, name) for name in before}
    assert Qwen2_5_VLForConditionalGeneration.generate is not SlimQwen2_5_VLForConditionalGeneration.generate


# ---------------------------------------------------------------- config and counts (M4)


def test_config_ratios_and_errors():
    assert SlimQwen2_5_VLConfig(compression={"method": "visionzip", "retain_ratio": 0.7}).compression == visionzip(0.65, 0.05)
    assert SlimQwen2_5_VLConfig(compression={"method": "visionzip"}).compression == visionzip(0.45, 0.05)
    for bad, error in [
        ({"method": "visionzip", "retain_ratio": 0.05}, ValueError),
        ({"method": "visionzip", "dominant_ratio": 0.99, "contextual_ratio": 0.05}, ValueError),
        ({"method": "visionzip", "dominant_ratio": 0.5}, ValueError),
        ({"method": "visionzip", "dominant_ratio": 0, "contextual_ratio": 0.05}, ValueError),
        ({"method": "visionzip", "retain_ratio": 0.5, "dominant_ratio": 0.4}, ValueError),
        ({"method": "visionzip", "dominant": 3, "contextual": 1}, ValueError),
        ({"method": "visionzip", "retain_ratio": "half"}, TypeError),
    ]:
        with pytest.raises(error):
            SlimQwen2_5_VLConfig(compression=bad)


def test_counts_official_formula():
    assert visionzip_counts(6, 0.45, 0.05) == (2, 1) and visionzip_counts(6, 0.65, 0.05) == (3, 1)
    assert visionzip_counts(256, 0.45, 0.05) == (115, 12) and visionzip_counts(256, 0.65, 0.05) == (166, 12)
    assert visionzip_counts(1222, 0.45, 0.05) == (549, 61) and visionzip_counts(6, 0.95, 0.05) == (6, 0)
    assert visionzip_counts(4, 0.45, 0.05) == (1, 1)


@pytest.mark.parametrize("ratios", RATIOS[:2])
def test_processor_count_equals_model_count(models, tokenizer, ratios):
    _, slim = models
    slim.set_compression(visionzip(*ratios))
    proc = processor(tokenizer, visionzip(*ratios))
    images = [random_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    text = [" ".join(prompt() for _ in images)]  # four images in one sample
    inputs = proc(images=images, text=text, return_tensors="pt")
    features = slim.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    counts = [f.shape[0] for f in features.pooler_output]
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == sum(counts)
    assert counts[0] == {0.45: 3, 0.65: 4}[ratios[0]]  # 56x84: 6 merged tokens (§7)
    assert counts == [slim.model.visionzip_token_count(grid) for grid in inputs["image_grid_thw"]]
    sizes = proc._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    assert sizes == counts
    with torch.no_grad():
        slim(**inputs)
    dense = processor(tokenizer)(images=images, text=text, return_tensors="pt")
    assert int((dense["input_ids"] == IMAGE_ID).sum()) == int(sum(g.prod() // 4 for g in dense["image_grid_thw"]))
    with pytest.raises(ValueError, match="placeholder"):
        slim(**dense)


# ---------------------------------------------------------------- M2: independent fp32 recomputation


def official_style_logits(stock, dense, items_by_modality, merged_by_modality):
    embeds, positions, mask, _ = pruned_dense_inputs(stock.model, dense, items_by_modality, merged_by_modality,
                                                     {"image": IMAGE_ID, "video": VIDEO_ID})
    with torch.no_grad():
        hidden = stock.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask)
        return stock.lm_head(hidden.last_hidden_state)


def window_units(stock) -> int:
    vision = stock.config.vision_config
    return vision.window_size // vision.spatial_merge_size // vision.patch_size


@pytest.mark.parametrize("ratios", RATIOS, ids=lambda r: f"{r[0]}/{r[1]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_visionzip_equals_independent_recomputation(models, tokenizer, size, ratios):
    stock, slim = models
    slim.set_compression(visionzip(*ratios))
    image = random_image(*size, seed=size[0] + size[1])
    inputs = processor(tokenizer, visionzip(*ratios))(images=[image], text=[prompt()], return_tensors="pt")
    dense = processor(tokenizer)(images=[image], text=[prompt()], return_tensors="pt")
    items, merged = reference_visionzip(stock.model.visual, dense["pixel_values"], dense["image_grid_thw"], ratios,
                                        window_units(stock))
    logits = assert_features_match(slim, inputs, items)
    expected = official_style_logits(stock, dense, {"image": items}, {"image": merged})
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_chunked_attention_received_equals_full_map():
    torch.manual_seed(0)
    q, k = torch.randn(300, 4, 16), torch.randn(300, 4, 16)
    bounds = [0, 100, 300]
    full = torch.zeros(300)
    for start, end in zip(bounds[:-1], bounds[1:]):
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q[start:end], k[start:end]) / 4, dim=-1)
        full[start:end] = probs.sum(dim=(0, 1)) / 4
    for budget in (1, 4 * 4 * 64 * 300, 2**30):  # 64-row chunks, ..., one chunk
        torch.testing.assert_close(segmented_attention_received(q, k, torch.tensor(bounds), budget), full, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- M5 positions


def test_kept_tokens_keep_their_stock_positions(models, tokenizer):
    stock, slim = models
    slim.set_compression(visionzip())
    image = random_image(56, 84, 3)
    inputs = processor(tokenizer, visionzip())(images=[image], text=[prompt()], return_tensors="pt")
    dense = processor(tokenizer)(images=[image], text=[prompt()], return_tensors="pt")
    stock_positions, stock_delta = stock.model.get_rope_index(dense["input_ids"], dense["mm_token_type_ids"],
                                                              image_grid_thw=dense["image_grid_thw"])
    keep = slim.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).visionzip_keep
    positions, delta = slim.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"],
                                                 visionzip_keep={"image": keep})
    dense_image = (dense["input_ids"][0] == IMAGE_ID).nonzero().squeeze(1)
    image = (inputs["input_ids"][0] == IMAGE_ID).nonzero().squeeze(1)
    assert torch.equal(positions[:, 0, image], stock_positions[:, 0, dense_image[keep[0]]])
    # text before is unchanged, text after resumes where stock resumes (p + max(gh, gw)/2), so δ shrinks by n - K
    assert torch.equal(positions[:, 0, : image[0]], stock_positions[:, 0, : dense_image[0]])
    assert torch.equal(positions[:, 0, image[-1] + 1:], stock_positions[:, 0, dense_image[-1] + 1:])
    assert int(delta) == int(stock_delta) + len(dense_image) - len(image)
    with torch.no_grad():
        slim(**inputs)
    assert int(slim.model.rope_deltas) == int(delta)
    bad = dict(inputs)
    bad["input_ids"] = dense["input_ids"]
    with pytest.raises(ValueError, match="placeholder"):
        slim.model.get_rope_index(bad["input_ids"], dense["mm_token_type_ids"], image_grid_thw=dense["image_grid_thw"])


# ---------------------------------------------------------------- M6 batch, M7 generate, M8 backends


def batch_inputs(tokenizer, compression, images, prompts):
    return processor(tokenizer, compression)(images=images, text=prompts, padding=True, return_tensors="pt")


def test_left_padded_batch_of_mixed_sizes_equals_each_sample_alone(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    images = [random_image(56, 84, 4), random_image(112, 112, 5), random_image(28, 28, 6)]
    prompts = [prompt(), prompt(before="w5 w6 w7 w8 w9 w30"), prompt(after="w40")]
    batch = batch_inputs(tokenizer, visionzip(), images, prompts)
    with torch.no_grad():
        together = slim(**batch)
        keep = slim.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).visionzip_keep
        for b, (image, text) in enumerate(zip(images, prompts)):
            alone = batch_inputs(tokenizer, visionzip(), [image], [text])
            single = slim(**alone)
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(together.logits[b, -length:], single.logits[0], rtol=1e-5, atol=1e-5)
            assert keep[b].tolist() == slim.model.get_image_features(
                alone["pixel_values"], alone["image_grid_thw"]).visionzip_keep[0].tolist()


def cache_free_greedy(model, inputs, steps):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    media = {key: inputs[key] for key in ("pixel_values", "image_grid_thw")}
    for _ in range(steps):
        types = torch.zeros_like(ids)
        types[ids == IMAGE_ID] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **media).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def test_generate_with_cache_equals_cache_free_loop(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    images = [random_image(56, 84, 7), random_image(84, 56, 8)]
    inputs = batch_inputs(tokenizer, visionzip(), images, [prompt(), prompt(before="w9 w8 w7 w6 w5")])
    generated = slim.generate(**inputs, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 32
    assert torch.equal(generated, cache_free_greedy(slim, inputs, 32))


def test_static_cache_generate_equals_the_dynamic_cache_and_the_cache_free_loop(models, tokenizer):
    """generate() with a static cache hands the forward 4-D masks instead of the [B, L] padding mask; the kept tokens'
    positions then come from the 2-D mask passed as `padding_mask` (this failed with KeyError: 0 before)."""
    _, slim = models
    slim.set_compression(visionzip())
    images = [random_image(56, 84, 7), random_image(84, 56, 8)]
    inputs = batch_inputs(tokenizer, visionzip(), images, [prompt(), prompt(before="w9 w8 w7 w6 w5")])
    static = slim.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           cache_implementation="static")
    dynamic = slim.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(static, dynamic)
    assert torch.equal(static, cache_free_greedy(slim, inputs, 16))
    four_d = torch.ones(2, 1, inputs["input_ids"].shape[1], inputs["input_ids"].shape[1], dtype=torch.bool)
    with pytest.raises(ValueError, match="padding_mask"):
        slim(**{**inputs, "attention_mask": four_d})


def test_consecutive_generate_calls_leave_no_stale_rope_deltas(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    first = batch_inputs(tokenizer, visionzip(), [random_image(112, 112, 9)], [prompt(after="w1 w2 w3 w4 w5 w6")])
    second = batch_inputs(tokenizer, visionzip(), [random_image(28, 28, 10)], [prompt()])
    slim.model.rope_deltas = None
    fresh = slim.generate(**second, max_new_tokens=12, do_sample=False)
    slim.generate(**first, max_new_tokens=12, do_sample=False)
    assert torch.equal(slim.generate(**second, max_new_tokens=12, do_sample=False), fresh)
    assert torch.equal(fresh, cache_free_greedy(slim, second, 12))


def test_sampling_beam_search_and_chunked_prefill(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    inputs = batch_inputs(tokenizer, visionzip(), [random_image(56, 84, 11)], [prompt()])
    assert slim.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5).shape[1] == inputs["input_ids"].shape[1] + 4
    beams = slim.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape[0] == 1
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        slim.generate(**inputs, max_new_tokens=4, prefill_chunk_size=4)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        slim(**{key: value for key, value in inputs.items() if key != "mm_token_type_ids"})


def test_eager_and_sdpa_agree(tmp_path, tokenizer):
    stock = stock_model()
    stock.save_pretrained(tmp_path)
    images = [random_image(56, 84, 12), random_image(112, 112, 13)]
    inputs = batch_inputs(tokenizer, visionzip(), images, [prompt(), prompt(before="w4")])
    outputs = {}
    for attn in ("eager", "sdpa"):
        model = SlimQwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=attn,
                                                                       compression=visionzip()).eval()
        with torch.no_grad():
            keep = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).visionzip_keep
            outputs[attn] = ([k.tolist() for k in keep], model(**inputs).logits)
    assert outputs["eager"][0] == outputs["sdpa"][0]
    real = inputs["attention_mask"].bool()  # padding rows attend to nothing; backends fill them differently
    torch.testing.assert_close(outputs["eager"][1][real], outputs["sdpa"][1][real], rtol=1e-5, atol=1e-5)


def test_auto_classes(tmp_path):
    model = SlimQwen2_5_VLForConditionalGeneration(SlimQwen2_5_VLConfig(**qwen2_5_config().to_dict(), compression=visionzip()))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded, SlimQwen2_5_VLForConditionalGeneration) and loaded.config.compression == visionzip()


def test_bfloat16_runs_with_fp32_scores(models, tokenizer):
    """Half precision (M10 on tiny random weights): the scores stay fp32, the kept sets match fp32 but for near-ties,
    and generation runs."""
    _, slim = models
    slim.set_compression(visionzip())
    inputs = batch_inputs(tokenizer, visionzip(), [random_image(112, 112, 14)], [prompt()])
    with torch.no_grad():
        keep32 = slim.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).visionzip_keep[0]
        half = SlimQwen2_5_VLForConditionalGeneration(slim.config).eval()
        half.load_state_dict(slim.state_dict())
        half.to(torch.bfloat16)
        hook_scores = []
        handle = half.model.visual.blocks[-1].register_forward_pre_hook(
            lambda module, args, kwargs: hook_scores.append(kwargs["hidden_states"].dtype if "hidden_states" in kwargs
                                                              else args[0].dtype), with_kwargs=True)
        features = half.model.get_image_features(inputs["pixel_values"].bfloat16(), inputs["image_grid_thw"])
        handle.remove()
    assert hook_scores == [torch.bfloat16] and features.pooler_output[0].dtype == torch.bfloat16
    half_qk = torch.randn(8, 2, 4).bfloat16()
    assert segmented_attention_received(half_qk, half_qk, [0, 8]).dtype == torch.float32
    overlap = len(set(keep32.tolist()) & set(features.visionzip_keep[0].tolist()))
    assert overlap >= len(keep32) - 2
    assert half.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3
