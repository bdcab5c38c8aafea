"""LLaVA-NeXT: stock checkpoints load, `none` is the stock model, VisionZip in the official anyres layout
(specs/visionzip.md §7.2) equals an independent recomputation, placeholders match, SparseVLM (v1.5, v2.0 with
the gravity floor) and VoCo-LLaMA on the whole image block, batching, generation, remote code, 4/8-bit.
"""

from __future__ import annotations

import pytest
import torch
from builders import (
    IMAGE_TOKEN_ID,
    load_quantized,
    make_next_processor,
    next_images,
    sharpen_language_model,
    tiny_llava_next_config,
)
from test_remote_code import check_auto_classes, check_remote_round_trip
from test_visionzip import reference_visionzip
from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from slimvlm import SlimLlavaNextConfig, SlimLlavaNextForConditionalGeneration, SlimLlavaNextProcessor
from slimvlm.sparsevlm import gravity_weights, sparsevlm_schedule
from slimvlm.voco import VoCoCache, build_voco_prompt, build_voco_text_prompt

GRIDS = [(2, 2), (1, 2), (3, 1)]
PROMPT = "USER: <image>\n describe the image ASSISTANT:"
SIDE = 24  # 48-px views, patch 2
VOCO_ID = 5


def slim_next(compression=None, attn: str = "sdpa", seed: int = 0, **config_kwargs) -> SlimLlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    config = SlimLlavaNextConfig(**tiny_llava_next_config(**config_kwargs).to_dict(), compression=compression)
    model = SlimLlavaNextForConditionalGeneration(config)
    model.set_attn_implementation({"text_config": attn, "vision_config": attn})
    return model.eval()


def slim_processor(compression, padding_side: str = "left") -> SlimLlavaNextProcessor:
    stock = make_next_processor()
    processor = SlimLlavaNextProcessor(image_processor=stock.image_processor, tokenizer=stock.tokenizer, patch_size=2,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                       compression=compression)
    processor.tokenizer.padding_side = padding_side
    return processor


@pytest.fixture(scope="module")
def images():
    return next_images(GRIDS)


def test_test_images_have_the_intended_grids(images):
    pinpoints = make_next_processor().image_processor.image_grid_pinpoints
    for image, grid in zip(images, GRIDS):
        height, width = select_best_resolution([image.height, image.width], pinpoints)
        assert (height // 48, width // 48) == grid


# ------------------------------------------------------------------------------------------- none = stock


@pytest.mark.parametrize("legacy", [False, True])
def test_stock_checkpoint_loads_whole_and_none_is_the_stock_model(tmp_path, images, legacy):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    stock = LlavaNextForConditionalGeneration(tiny_llava_next_config()).eval()
    stock.save_pretrained(tmp_path)
    if legacy:  # llava-hf/llava-v1.6-*-hf layout
        renames = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                   ("model.vision_tower.", "vision_tower.vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.image_newline", "image_newline"))
        weights = load_file(tmp_path / "model.safetensors")
        legacy_weights = {}
        for key, value in weights.items():
            for new, old in renames:
                if key.startswith(new):
                    key = old + key[len(new):]
                    break
            legacy_weights[key] = value
        assert "image_newline" in legacy_weights and any(k.startswith("language_model.model.") for k in legacy_weights)
        save_file(legacy_weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    slim, info = SlimLlavaNextForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    processor = make_next_processor()
    inputs = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = stock(**inputs).logits
        got = slim.eval()(**inputs).logits
    assert torch.equal(expected, got)


# ------------------------------------------------------------------------------------ VisionZip (§7.2)


def reference_anyres_visionzip(model, pixel_values, image_sizes, d, c):
    """§7.2 written out: each view through an eager CLIP and the literal §3 (test_visionzip.reference_visionzip),
    projected, then the image assembled with explicit loops over the global patch grid."""
    config = CLIPVisionConfig(**model.config.vision_config.to_dict())
    config._attn_implementation = "eager"
    tower = CLIPVisionModel(config).eval()
    tower.load_state_dict(model.model.vision_tower.state_dict())
    pinpoints = model.config.image_grid_pinpoints
    images = []
    for views, size in zip(pixel_values, image_sizes):
        height, width = select_best_resolution(size.tolist(), pinpoints)
        gh, gw = height // 48, width // 48
        views = views[: 1 + gh * gw]  # padding views are never compressed
        per_view = reference_visionzip(tower, views, d, c)
        with torch.no_grad():
            projected = [model.model.multi_modal_projector(tokens) for tokens, *_ in per_view]
        dominant = {}  # (global row, global column) -> projected token
        for crop in range(gh * gw):
            r, q = divmod(crop, gw)
            patches = sorted(index for index in per_view[1 + crop][1] if index != 0)
            for rank, index in enumerate(patches):
                y, x = divmod(index - 1, SIDE)
                dominant[(r * SIDE + y, q * SIDE + x)] = projected[1 + crop][1 + rank]
        rows = [projected[0]]
        rows += [dominant[key][None] for key in sorted(dominant)]  # raster order of the global grid
        rows += [projected[1 + crop][:1] for crop in range(gh * gw)]  # the crops' CLS
        rows += [projected[1 + crop][d:] for crop in range(gh * gw)]  # their contextual tokens, crop by crop
        images.append((torch.cat(rows), [view[1] for view in per_view], max(float(v[4]) for v in per_view)))
    return images


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("split", [(54, 10), (10, 3)])
def test_visionzip_equals_the_independent_recomputation(images, attn, split):
    d, c = split
    compression = {"method": "visionzip", "dominant": d, "contextual": c}
    model = slim_next(compression, attn=attn)
    inputs = slim_processor(compression)(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    reference = reference_anyres_visionzip(model, inputs["pixel_values"], inputs["image_sizes"], d, c)
    views = 0
    for image, (expected, dominant_sets, _), grid in zip(output.pooler_output, reference, GRIDS):
        count = 1 + grid[0] * grid[1]
        assert image.shape == ((1 + grid[0] * grid[1]) * (d + c), model.config.text_config.hidden_size)
        assert [set(output.dominant_indices[views + v].tolist()) for v in range(count)] == dominant_sets
        views += count
        torch.testing.assert_close(image, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert views == output.dominant_indices.shape[0]  # no padding view was encoded


@pytest.mark.parametrize("compression", [{"method": "visionzip", "dominant": 54, "contextual": 10},
                                         {"method": "visionzip", "tokens": 13}, {"method": "none"},
                                         {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
                                         {"method": "cdpruner", "tokens": 16}, {"method": "divprune", "tokens": 40},
                                         {"method": "divprune", "ratio": 0.098, "scope": "view"},
                                         {"method": "cdpruner", "tokens": 50, "scope": "image"}])
def test_processor_writes_as_many_placeholders_as_the_model_produces(images, compression):
    model = slim_next(compression)
    processor = slim_processor(model.config.compression)
    inputs = processor(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    relevance = {key: value for key, value in inputs.items() if key.startswith("relevance_")}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                                  **relevance)
    counts = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [f.shape[0] for f in features.pooler_output]
    if model.config.compression["method"] in ("cdpruner", "divprune"):
        multimodal = processor._get_num_multimodal_tokens(image_sizes=[[image.height, image.width] for image in images])
        assert multimodal.num_image_tokens == counts
        if model.config.compression["scope"] == "view":
            k = model.config.compression.get("tokens") or round(0.098 * 576)
            assert counts == [5 * k, 3 * k, 4 * k] == [model.pruned_token_count(size) for size in inputs["image_sizes"]]
        else:
            assert counts == [model.config.compression["tokens"]] * 3
    if model.config.compression["method"] == "visionzip":
        k = model.config.compression["dominant"] + model.config.compression["contextual"]
        assert counts == [5 * k, 3 * k, 4 * k]  # 2x2, 1x2, 3x1 grids
        assert counts == [model.visionzip_token_count(size) for size in inputs["image_sizes"]]
        multimodal = processor._get_num_multimodal_tokens(image_sizes=[[image.height, image.width] for image in images])
        assert multimodal.num_image_tokens == counts


def greedy_without_cache(model, inputs, steps, **extra):
    """Cache-free greedy loop over the whole prompt + generated tokens (SparseVLM: pass the prefill's
    `sparsevlm_plan`, since re-scoring with the generated tokens as raters would prune differently)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra.update({k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, inputs["input_ids"].shape[1]:]


SETTINGS = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
METHODS = [{"method": "none"}, {"method": "visionzip", "dominant": 54, "contextual": 10},
           {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
           {"method": "sparsevlm", "version": "2.0", "layers": [0], "budgets": [64]},
           {"method": "cdpruner", "tokens": 16}, {"method": "divprune", "tokens": 40}]
# SparseVLM v2.0 divides by the RoPE gravity, which needs a realistic head_dim for a floor (see sparsevlm.gravity_floor).
HEAD_DIM_128 = dict(text_hidden=128, heads=1, kv_heads=1)


def lm_shape(compression) -> dict:
    return HEAD_DIM_128 if compression.get("version") == "2.0" else {}


@pytest.mark.parametrize("compression", METHODS)
def test_left_padded_mixed_grid_batch_generates_what_each_sample_generates_alone(images, compression):
    model = slim_next(compression, **lm_shape(compression))
    processor = slim_processor(model.config.compression)
    prompts = [PROMPT, "USER: <image>\n what ASSISTANT:", "USER: <image>\n how many red circle are there ? ASSISTANT:"]
    assert_batch_generates_what_each_sample_generates_alone(model, processor, images, prompts)


def media_inputs(images, videos) -> dict:
    """processor keyword arguments for samples' images and videos (None: the sample has none)."""
    media = {"images": [image for image in images if image is not None],
             "videos": [video for video in videos if video is not None]}
    return {key: value for key, value in media.items() if value}


def assert_batch_generates_what_each_sample_generates_alone(model, processor, images, prompts, videos=None):
    """A left-padded batch generates what each (image or video, prompt) generates alone, and generate() with a
    cache equals a cache-free greedy loop (SparseVLM: replaying the batch prefill's plan). `images[i]`,
    `videos[i]`: sample i's image and video (None where it has none; `videos` None: no videos)."""
    videos = [None] * len(prompts) if videos is None else videos
    batch = processor(**media_inputs(images, videos), text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
        for i, (image, video, prompt) in enumerate(zip(images, videos, prompts)):
            alone = processor(**media_inputs([image], [video]), text=[prompt], return_tensors="pt")
            assert together[i].tolist() == model.generate(**alone, **SETTINGS)[0, alone["input_ids"].shape[1]:].tolist()
        together = model.generate(**batch, **SETTINGS)[:, batch["input_ids"].shape[1]:]
    plan = {"sparsevlm_plan": model.sparsevlm_report.steps} if model.config.compression["method"] == "sparsevlm" else {}
    assert together.tolist() == greedy_without_cache(model, batch, 4, **plan).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_visionzip_runs_in_fp32_and_bf16(images, dtype):
    model = slim_next({"method": "visionzip", "tokens": 16}).to(dtype)
    inputs = slim_processor(model.config.compression)(images=images[:1], text=[PROMPT], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == dtype and torch.isfinite(logits.float()).all()


# --------------------------------------------------------------------------------------------- SparseVLM


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_sparsevlm_prunes_the_whole_image_block_on_the_scaled_schedule(images, version):
    compression = {"method": "sparsevlm", "version": version, "layers": [0], "budgets": [64]}
    model = slim_next(compression, **lm_shape(compression))
    inputs = slim_processor(model.config.compression)(images=images, text=[PROMPT] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        model(**inputs)
    report = model.sparsevlm_report
    spans = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert report.visual_tokens == spans and spans[0] == 2928  # 2x2: base 576 + 48x48 crops + 48 newlines
    for v, counts in zip(spans, report.layer_counts):
        assert counts == sparsevlm_schedule(model.config.compression, v, 2).after  # budgets scaled to V


def test_v2_gravity_rule_keeps_the_official_division_where_defined_and_floors_it_beyond():
    """head_dim 128: W(Δ) <= 0 first at Δ = 1707; beyond, W is floored at min W over Δ <= 700 (1.1908, less 0.1 %)."""
    from transformers import LlamaConfig, LlamaModel

    from slimvlm.sparsevlm import GravityRule, visual_scores

    language_model = LlamaModel(LlamaConfig(hidden_size=256, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2, vocab_size=8))
    assert language_model.layers[0].self_attn.head_dim == 128
    like = torch.zeros(1, 1, 256)
    rule = GravityRule.for_model(language_model.rotary_emb, like, max_distance=2968)
    assert rule.first_nonpositive == 1707 and 1.189 <= rule.floor < 1.1908
    assert GravityRule.for_model(language_model.rotary_emb, like, max_distance=1047).first_nonpositive is None
    # Raters after a 2,928-token span (distances 40..2976).
    rows, columns = torch.arange(2968, 2978), torch.arange(1, 2929)
    rc, rs = language_model.rotary_emb(like, rows[None])
    vc, vs = language_model.rotary_emb(like, columns[None])
    raw = gravity_weights(rc[0], rs[0], vc[0], vs[0])
    distances = rows[:, None] - columns[None, :]
    used = rule.apply(raw, distances)
    assert bool((raw <= 0).any())  # the official division is undefined here
    near = distances < 1707
    assert torch.equal(used[near], raw[near])  # official where defined (the spec's V = 1000 parity included)
    assert bool((used[~near] >= rule.floor).all())
    probs = torch.softmax(torch.randn(4, 10, 2928), -1)
    scores = visual_scores(probs, "2.0", used, num_priority_heads=2)
    assert scores.shape == (2928,) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="version '1.5'"):
        visual_scores(probs, "2.0", raw, num_priority_heads=2)


# -------------------------------------------------------------------------------------------------- VoCo


def voco_next(num_voco: int = 2, attn: str = "eager") -> SlimLlavaNextForConditionalGeneration:
    model = slim_next({"method": "voco", "num_voco_tokens": num_voco}, attn=attn)
    model.config.voco_token_id = VOCO_ID
    sharpen_language_model(model)  # masking and position errors must show in the logits
    return model


def assert_voco_two_stage_equals_the_full_mask(model, inputs, text, voco_id: int = VOCO_ID):
    """Stage 2 on the cache of `voco_compress(**inputs)` gives the full masked forward's logits for the text after
    each row's VoCo group (<= 1e-4; the LM is sharpened so that errors show), and generate() from the cache equals
    the full masked greedy recompute. `text`: the tokenised text after the group. Returns the cache."""
    with torch.no_grad():
        full = model(**inputs).logits
        cache = model.voco_compress(**inputs)
        staged = model(**text, voco_cache=cache).logits
    after = torch.arange(inputs["input_ids"].shape[1])[None] > (inputs["input_ids"] == voco_id).int().argmax(1, keepdim=True) + 1
    diffs = [float((full[b, after[b] & inputs["attention_mask"][b].bool()] - staged[b, text["attention_mask"][b].bool()]).abs().max())
             for b in range(full.shape[0])]
    assert float(full.abs().max()) > 1.0
    assert max(diffs) <= 1e-4, diffs
    with torch.no_grad():
        cached = model.generate(**text, voco_cache=cache, **SETTINGS)[:, text["input_ids"].shape[1]:]
    assert cached.tolist() == greedy_without_cache(model, inputs, 4).tolist()
    return cache


def test_voco_two_stage_equals_the_full_mask_forward(images):
    model = voco_next(2)
    processor = slim_processor(model.config.compression)
    questions = ["what is the color of the circle ?", "how many are there ?", "describe"]
    inputs = processor(images=images, text=[build_voco_prompt(q) for q in questions], return_tensors="pt", padding=True)
    # One VoCo group after the whole image block (base, unpadded crops and newlines).
    for row in inputs["input_ids"]:
        voco = (row == VOCO_ID).nonzero().flatten()
        image = (row == IMAGE_TOKEN_ID).nonzero().flatten()
        assert len(voco) == 2 and int(voco[0]) > int(image[-1])
    tokenizer = processor.tokenizer
    text = tokenizer([build_voco_text_prompt(q) for q in questions], add_special_tokens=False, return_tensors="pt",
                     padding=True)
    cache = assert_voco_two_stage_equals_the_full_mask(model, inputs, text)
    assert isinstance(cache, VoCoCache) and cache.num_voco_tokens == 2


# ----------------------------------------------------------------------------------- remote code, bnb


def test_remote_code_round_trip(tmp_path, images):
    compression = {"method": "visionzip", "dominant": 10, "contextual": 3}
    processor = slim_processor(compression)
    images[0].save(tmp_path / "image.png")
    inputs = processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    result = check_remote_round_trip(slim_next(compression), processor, inputs, {"image": str(tmp_path / "image.png")},
                                     PROMPT, tmp_path, "modeling_llava_next.SlimLlavaNextForConditionalGeneration",
                                     "processing_slimvlm.SlimLlavaNextProcessor")
    assert result["compression"] == compression


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_loading_keeps_vision_side_full_precision(tmp_path, images, bits):
    pytest.importorskip("bitsandbytes")
    slim_next(text_hidden=64, vision_hidden=64).save_pretrained(tmp_path)  # bitsandbytes' 4-bit blocks need 64-wide rows
    model = load_quantized(SlimLlavaNextForConditionalGeneration, tmp_path, bits,
                           compression={"method": "visionzip", "dominant": 10, "contextual": 3})
    assert all(type(m) is torch.nn.Linear for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear))
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear
    assert model.model.image_newline.dtype == torch.float32
    assert type(model.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    processor = slim_processor(model.config.compression)
    inputs = processor(images=images[:2], text=[PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape[0] == 2


def test_auto_classes_resolve_to_slim_next(tmp_path):
    model = slim_next({"method": "visionzip", "tokens": 13})
    check_auto_classes(model, slim_processor(model.config.compression), tmp_path)


def test_voco_collator_training_step_and_export_on_next(images, tmp_path):
    """Training (mask + collator, mixed grids in one batch) and the VoCo export work as for LLaVA-1.5."""
    from slimvlm.conversion.voco_export import export_voco_weights, load_voco_weights
    from slimvlm.voco import VoCoDataCollator

    model = voco_next(2, attn="sdpa").train()
    processor = slim_processor(model.config.compression, padding_side="right")
    collator = VoCoDataCollator(processor, system_prompt="")
    batch = collator([{"image": images[0], "conversation": [("what is the color of the circle ?", "red")]},
                      {"image": images[1], "conversation": [("how many are there ?", "two")]}])
    assert batch["pixel_values"].shape[:2] == (2, 5) and batch["image_sizes"].tolist() == [[90, 90], [45, 90]]
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.linear_1.weight.grad is not None
    model.eval()
    folder = export_voco_weights(model, tmp_path / "voco", mode="voco-only")
    fresh = voco_next(2)
    load_voco_weights(fresh, folder / "voco_weights.safetensors")
    assert torch.equal(fresh.get_input_embeddings().weight[VOCO_ID], model.get_input_embeddings().weight[VOCO_ID])
    assert torch.equal(fresh.model.multi_modal_projector.linear_2.weight, model.model.multi_modal_projector.linear_2.weight)


def parameters_without_gradient(model, inputs) -> set[str]:
    """Names of the trainable parameters one training step leaves without a gradient (what DDP calls unused)."""
    model.zero_grad(set_to_none=True)
    model.train()(**inputs, labels=inputs["input_ids"]).loss.backward()
    model.eval()
    return {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}


def test_visionzip_freezes_image_newline_so_ddp_needs_no_unused_parameter_search(images, tmp_path):
    """The VisionZip layout has no newline: image_newline is frozen under VisionZip (no trainable parameter is
    left without a gradient beyond the stock ones), and gets its own requires_grad back when compression changes."""
    compression = {"method": "visionzip", "tokens": 16}
    model = slim_next({"method": "none"})
    stock_inputs = slim_processor(model.config.compression)(images=images[:1], text=[PROMPT], return_tensors="pt")
    stock_unused = parameters_without_gradient(model, stock_inputs)  # the tower layers after the feature layer
    assert "model.image_newline" not in stock_unused and model.model.image_newline.requires_grad
    inputs = slim_processor(compression)(images=images[:1], text=[PROMPT], return_tensors="pt")
    model.set_compression(compression)
    assert model.model.image_newline.requires_grad is False
    assert parameters_without_gradient(model, inputs) == stock_unused
    model.save_pretrained(tmp_path)
    reloaded = SlimLlavaNextForConditionalGeneration.from_pretrained(tmp_path)  # loading replaces the parameters
    assert reloaded.model.image_newline.requires_grad is False
    assert SlimLlavaNextForConditionalGeneration.from_pretrained(tmp_path, compression={"method": "none"}).model.image_newline.requires_grad
    model.set_compression({"method": "none"})
    assert model.model.image_newline.requires_grad and parameters_without_gradient(model, stock_inputs) == stock_unused
    model.model.image_newline.requires_grad_(False)  # the user's own choice survives a round trip through VisionZip
    model.set_compression(compression).set_compression({"method": "none"})
    assert model.model.image_newline.requires_grad is False
