"""Qwen3-VL: none = stock, VisionZip with DeepStack against the independent recomputation (the same keep mask and
merge on every DeepStack feature), counts, generation, batch (specs/modern_families.md §1.2, §3, M1-M7)."""

from __future__ import annotations

import pytest
import torch
from qwen_builders import IMAGE_ID, VIDEO_ID, prompt, qwen3_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen
from qwen_reference import assert_features_match, pruned_dense_inputs, reference_visionzip
from transformers import Qwen3VLForConditionalGeneration

from slimvlm import SlimQwen3VLConfig, SlimQwen3VLForConditionalGeneration, SlimQwen3VLProcessor

SIZES = [(56, 84), (84, 56), (112, 112), (28, 28)]


def visionzip(dominant=0.45, contextual=0.05):
    return {"method": "visionzip", "dominant_ratio": dominant, "contextual_ratio": contextual}


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = qwen_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


def processor(tokenizer, compression=None):
    return SlimQwen3VLProcessor(image_processor=qwen_image_processor(patch_size=16), tokenizer=tokenizer,
                                compression=compression)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = qwen3_config()
    config._attn_implementation = "eager"
    stock = sharpen(Qwen3VLForConditionalGeneration(config)).eval()
    folder = tmp_path_factory.mktemp("qwen3")
    stock.save_pretrained(folder)
    slim, info = SlimQwen3VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager",
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return stock, slim.eval()


def test_none_gives_stock_logits_and_tokens_bitwise(models, tokenizer):
    stock, slim = models
    slim.set_compression({"method": "none"})
    inputs = processor(tokenizer)(images=[random_image(56, 84, 1), random_image(112, 112, 2)],
                                  text=[prompt(), prompt(before="w5 w6 w7 w8")], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(stock(**inputs).logits, slim(**inputs).logits)
    assert torch.equal(stock.generate(**inputs, max_new_tokens=8, do_sample=False),
                       slim.generate(**inputs, max_new_tokens=8, do_sample=False))


def test_voco_is_refused():
    with pytest.raises(ValueError, match="not available"):
        SlimQwen3VLConfig(compression={"method": "voco"})


@pytest.mark.parametrize("ratios", [(0.45, 0.05), (0.65, 0.05), (0.95, 0.05)], ids=lambda r: f"{r[0]}/{r[1]}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_visionzip_with_deepstack_equals_independent_recomputation(models, tokenizer, size, ratios):
    stock, slim = models
    slim.set_compression(visionzip(*ratios))
    image = random_image(*size, seed=size[0] * 3 + size[1])
    inputs = processor(tokenizer, visionzip(*ratios))(images=[image], text=[prompt()], return_tensors="pt")
    dense = processor(tokenizer)(images=[image], text=[prompt()], return_tensors="pt")
    check_against_reference(stock, slim, inputs, dense, "image", ratios)


def check_against_reference(stock, slim, inputs, dense, modality, ratios):
    """The Slim features (and DeepStack rows) equal the recomputation, and its logits equal the official-style
    input: the dense sequence pruned by keep, DeepStack rows pruned and merged the same way, through the stock LM."""
    pixels, grids = dense[f"pixel_values{'' if modality == 'image' else '_videos'}"], dense[f"{modality}_grid_thw"]
    with torch.no_grad():
        tower = stock.model.visual(pixels, grid_thw=grids)
    items, merged = reference_visionzip(stock.model.visual, pixels, grids, ratios, None, tower.pooler_output,
                                        tower.deepstack_features)
    logits = assert_features_match(slim, inputs, items, modality)
    token = IMAGE_ID if modality == "image" else VIDEO_ID
    embeds, positions, mask, columns = pruned_dense_inputs(stock.model, dense, {modality: items}, {modality: merged},
                                                           {"image": IMAGE_ID, "video": VIDEO_ID})
    with torch.no_grad():
        hidden = stock.model.language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                            visual_pos_masks=(dense["input_ids"][0] == token)[columns][None],
                                            deepstack_visual_embeds=[level.to(embeds.dtype) for level in items[0][2]])
        expected = stock.lm_head(hidden.last_hidden_state)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_counts_processor_equals_model(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    images = [random_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    inputs = processor(tokenizer, visionzip())(images=images, text=[" ".join(prompt() for _ in images)],
                                               return_tensors="pt")
    features = slim.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    counts = [f.shape[0] for f in features.pooler_output]
    assert counts[0] == 3 and int((inputs["input_ids"] == IMAGE_ID).sum()) == sum(counts)
    assert processor(tokenizer, visionzip())._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens == counts
    with pytest.raises(ValueError, match="images only"):
        processor(tokenizer, visionzip())(videos=[torch.zeros(4, 3, 32, 32)], text=["<|video_pad|>"])


def test_generate_equals_cache_free_loop_and_batch_equals_alone(models, tokenizer):
    _, slim = models
    slim.set_compression(visionzip())
    images, texts = [random_image(56, 84, 5), random_image(112, 112, 6)], [prompt(), prompt(before="w9 w8 w7 w6")]
    inputs = processor(tokenizer, visionzip())(images=images, text=texts, padding=True, return_tensors="pt")
    generated = slim.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(16):
        with torch.no_grad():
            logits = slim(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_ID).long(),
                          pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                          use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)
    static = slim.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                           cache_implementation="static")
    assert torch.equal(static, ids)
    with torch.no_grad():
        together = slim(**inputs).logits
        for b in range(2):
            alone = processor(tokenizer, visionzip())(images=[images[b]], text=[texts[b]], return_tensors="pt")
            single = slim(**alone).logits
            torch.testing.assert_close(together[b, -single.shape[1]:], single[0], rtol=1e-5, atol=1e-5)


def test_sparsevlm_deepstack_order_equals_a_step_by_step_reference(models, tokenizer):
    """Prune at layer 0 < J = 2 (spec §6.1): decoder layer 0, DeepStack level 0 added, prune (kept + recycled
    clusters), then level 1 added after layer 1 to the survivors' rows (a cluster: the same weighted mean of rows as
    its hidden state). Recomputed here layer by layer on the stock modules with the model's own prune plan."""
    stock, slim = models
    slim.set_compression({"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [200]})
    inputs = processor(tokenizer)(images=[random_image(112, 112, 7)], text=[prompt()], return_tensors="pt")
    with torch.no_grad():
        logits = slim(**inputs).logits
        step = slim.sparsevlm_report.steps[0][0]
        model, language = stock.model, stock.model.language_model
        features = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        ids = inputs["input_ids"][0]
        visual = (ids == IMAGE_ID).nonzero().squeeze(1)
        v0, count = int(visual[0]), visual.numel()
        hidden = model.get_input_embeddings()(inputs["input_ids"])[0].clone()
        hidden[visual] = features.pooler_output[0]
        levels = [level[0] for level in features.deepstack_features]
        positions, _ = model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
        positions = positions[:, 0]

        def run(layer, hidden, positions):
            length = hidden.shape[0]
            causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
            cos_sin = language.rotary_emb(hidden[None], positions[:, None])
            return layer(hidden[None], attention_mask=causal, position_embeddings=cos_sin)[0]

        def cluster_means(rows):
            k = step.centres.numel()
            sums = torch.zeros(k, rows.shape[1])
            sizes = torch.zeros(k)
            for i, c in enumerate(step.assignment.tolist()):
                sizes[c] += 1
            for i, c in enumerate(step.assignment.tolist()):
                sums[c] += rows[step.recycled[i]] / (sizes[c] + 1e-6)
            return sums

        hidden = run(language.layers[0], hidden, positions)
        hidden[visual] = hidden[visual] + levels[0]
        vis, vis_pos = hidden[v0:v0 + count], positions[:, v0:v0 + count]
        assert step.centres.numel() > 0
        hidden = torch.cat([hidden[:v0], vis[step.kept], cluster_means(vis), hidden[v0 + count:]])
        positions = torch.cat([positions[:, :v0], vis_pos[:, step.kept], vis_pos[:, step.recycled[step.centres]],
                               positions[:, v0 + count:]], dim=1)
        kept_rows = torch.cat([levels[1][step.kept], cluster_means(levels[1])])
        hidden = run(language.layers[1], hidden, positions)
        survivors = slice(v0, v0 + kept_rows.shape[0])
        hidden[survivors] = hidden[survivors] + kept_rows
        hidden = run(language.layers[2], hidden, positions)
        expected = stock.lm_head(language.norm(hidden))[-1]
    torch.testing.assert_close(logits[0, -1], expected, rtol=1e-5, atol=1e-5)


def test_sparsevlm_generate_equals_cache_free_replay(models, tokenizer):
    _, slim = models
    slim.set_compression({"method": "sparsevlm", "version": "1.5", "layers": [1], "budgets": [200]})
    inputs = processor(tokenizer)(images=[random_image(56, 84, 8), random_image(112, 112, 9)],
                                  text=[prompt(), prompt(before="w4 w5 w6 w7")], padding=True, return_tensors="pt")
    generated = slim.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    plan = slim.sparsevlm_report.steps
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(8):
        with torch.no_grad():
            logits = slim(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_ID).long(),
                          pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                          sparsevlm_plan=plan, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("frames", [8, 9])
def test_video_frame_groups_equal_independent_recomputation(models, tokenizer, frames):
    """Qwen3-VL videos: one placeholder group per temporal step (frame group); each step is a view, its K_f kept
    tokens at their stock per-group ids; DeepStack rows merged with the same keep. Pixels are built with the
    Qwen2-VL frame math at patch 16 (the Qwen3 processor's own video path needs torchvision)."""
    from slimvlm.processing_qwen_vl import QwenFrameVideoProcessor

    stock, slim = models
    slim.set_compression(visionzip())
    video = (torch.rand(frames, 64, 96, 3, generator=torch.Generator().manual_seed(frames)) * 255).to(torch.uint8)
    pixels = QwenFrameVideoProcessor({"shortest_edge": 64 * 64, "longest_edge": 10**6}, patch_size=16)([video.numpy()])
    grid = pixels["video_grid_thw"][0].tolist()
    steps, units = grid[0], grid[1] * grid[2] // 4
    assert steps == (frames + 1) // 2 and units == 6

    def inputs_with(per_step: int):
        groups = " ".join("<|vision_start|>" + "<|video_pad|>" * per_step + "<|vision_end|>" for _ in range(steps))
        ids = tokenizer([f"w10 w11 {groups} w20 w21"], return_tensors="pt")["input_ids"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": 2 * (ids == VIDEO_ID).long(),
                "pixel_values_videos": pixels["pixel_values_videos"], "video_grid_thw": pixels["video_grid_thw"]}

    check_against_reference(stock, slim, inputs_with(3), inputs_with(units), "video", (0.45, 0.05))


def test_count_with_the_hub_minimum_pixels(models, tokenizer):
    """§7: a 56x84 image under min_pixels 65,536 becomes 224 x 320 -> 280 patches -> 70 tokens; at r = 0.5, 31 + 3."""
    _, slim = models
    slim.set_compression(visionzip())
    proc = SlimQwen3VLProcessor(image_processor=qwen_image_processor(min_pixels=65536, patch_size=16),
                                tokenizer=tokenizer, compression=visionzip())
    inputs = proc(images=[random_image(56, 84, 10)], text=[prompt()], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == 34 == slim.model.visionzip_token_count([1, 14, 20])
    features = slim.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert features.pooler_output[0].shape[0] == 34
