"""CDPruner and DivPrune on LLaVA-OneVision (specs/cdpruner.md, issue 21 item 5): every one of a SigLIP view's
16 patches is a candidate (no CLS), K kept per view with one relevance min-max per image, a single image in
LLaVA-NeXT's official per-view layout, an image of a multi-image sample as K + 1, a video as K per frame (one
min-max per video) + 1; placeholders match the model for every grid, image count and video length; batch =
alone, generate with cache = cache-free; the question conditions CDPruner's selection; what is not wired (CLIP
relevance, scope "image") is refused.
"""

from __future__ import annotations

import pytest
import torch
from builders import IMAGE_TOKEN_ID, load_quantized, random_video, tiny_onevision_config, video_token_id
from test_cdpruner import reference_divprune, reference_dpp
from test_llava_next import assert_batch_generates_what_each_sample_generates_alone
from test_llava_onevision import (
    GRIDS,
    MULTI_PROMPT,
    PROMPT,
    SIDE,
    VIDEO_PROMPT,
    assert_multi_image_batch_generates_what_each_sample_generates_alone,
    slim_ov,
    slim_processor,
)
from test_remote_code import check_remote_round_trip

from slimvlm import SlimLlavaOnevisionConfig, SlimLlavaOnevisionForConditionalGeneration

CDP = {"method": "cdpruner", "tokens": 5}
DIV = {"method": "divprune", "tokens": 6}
VIDEO_ID = video_token_id()
QUESTIONS = ["what is the color of the circle", "how many red square are there"]


@pytest.fixture(scope="module")
def images():
    from builders import onevision_images

    return onevision_images(GRIDS)


def relevance_of(inputs) -> dict:
    return {key: value for key, value in inputs.items() if key.startswith("relevance_")}


def features_of(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                              batch_num_images=inputs["batch_num_images"], **relevance_of(inputs))


@pytest.mark.parametrize("compression", [CDP, DIV, {"method": "divprune", "ratio": 0.25}])
def test_processor_writes_as_many_placeholders_as_the_model_produces(images, compression):
    model = slim_ov(compression)
    processor = slim_processor(model.config.compression)
    k = 4 if "ratio" in compression else compression["tokens"]  # round(0.25 x 16)
    inputs = processor(images=images, text=[PROMPT] * 4, return_tensors="pt", padding=True, instructions=QUESTIONS * 2)
    counts = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist()
    assert counts == [f.shape[0] for f in features_of(model, inputs).pooler_output]
    assert counts == [3 * k, 2 * k, 4 * k, 5 * k]  # grids 1x2, 1x1, 1x3, 2x2: (1 + gh·gw)·K
    assert counts == [model.pruned_token_count(size) for size in inputs["image_sizes"]]
    assert processor._get_num_multimodal_tokens(image_sizes=[[i.height, i.width] for i in images]).num_image_tokens == counts
    for groups in ([images[:2], images[2:]], [images[:3], images[3:]]):  # multi-image samples: K + 1 per image
        prompts = [" ".join(["<image>"] * len(group)) + " what" for group in groups]
        inputs = processor(images=groups, text=prompts, return_tensors="pt", padding=True, instructions=QUESTIONS)
        per_image = [f.shape[0] for f in features_of(model, inputs).pooler_output]
        assert per_image == [5 * k if len(group) == 1 else k + 1 for group in groups for _ in group]
        assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [
            sum(per_image[:len(groups[0])]), sum(per_image[len(groups[0]):])]
    assert model.pruned_token_count() == k + 1
    for frames in (1, 3, 8):  # videos: F·K + 1 instead of the pooled F·4 + 1
        inputs = processor(videos=[random_video(frames)], text=[VIDEO_PROMPT], return_tensors="pt", instructions=QUESTIONS[:1])
        with torch.no_grad():
            features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                      **{key: value for key, value in relevance_of(inputs).items()
                                                         if "video" in key})
        count = int((inputs["input_ids"] == VIDEO_ID).sum())
        assert count == features.pooler_output.shape[1] == model.video_token_count(frames) == frames * k + 1
        assert processor._get_num_multimodal_tokens(video_sizes=[(frames, 56, 56)]).num_video_tokens == [count]


def reference_views(model, views, ids, k: int):
    """An image's views (a video's frames) recomputed with explicit loops: all 16 patches of each view (tower
    layer -1, no CLS to drop), projected; CDPruner (`ids`: the instruction): cosine to the mean instruction
    embedding, ONE min-max over all the views, the float32 DPP loop per view; DivPrune: the max-min loop per
    view. Returns (projected [views, 16, D], kept patches per view, ascending)."""
    with torch.no_grad():
        hidden = model.model.vision_tower(views, output_hidden_states=True).hidden_states[-1]
        full = model.model.multi_modal_projector(hidden)  # [views, 16, D]
        assert full.shape[1] == SIDE * SIDE
        if ids is not None:
            mean = model.model.get_input_embeddings()(ids).mean(0)
            rho = [[float(torch.nn.functional.cosine_similarity(full[v, n], mean, dim=0)) for n in range(full.shape[1])]
                   for v in range(full.shape[0])]
    if ids is not None:
        low, high = min(min(row) for row in rho), max(max(row) for row in rho)
        weights = [torch.tensor([(value - low + 1e-6) / (high - low) for value in row]) for row in rho]
        kept = [sorted(reference_dpp(full[v].numpy(), weights[v].numpy(), k)) for v in range(full.shape[0])]
    else:
        kept = [sorted(reference_divprune(full[v].numpy(), k)) for v in range(full.shape[0])]
    return full, kept


def reference_image(model, views, grid, ids, k: int):
    """A single image (grid) laid out in a loop as [base's kept ; crops' kept patches in raster order of the
    global grid], an image of a multi-image sample (grid None) as [base's kept ; newline]."""
    full, kept = reference_views(model, views, ids, k)
    rows = [full[0][p] for p in kept[0]]
    if grid is None:
        return torch.stack(rows + [model.model.image_newline.detach()]), kept
    placed = {}
    for crop in range(grid[0] * grid[1]):
        for p in kept[1 + crop]:
            row, column = (crop // grid[1]) * SIDE + p // SIDE, (crop % grid[1]) * SIDE + p % SIDE
            placed[(row, column)] = full[1 + crop][p]
    rows += [placed[key] for key in sorted(placed)]
    return torch.stack(rows), kept


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("compression", [CDP, DIV])
def test_kept_sets_and_layout_equal_the_explicit_loop_recomputation(images, compression, attn):
    model = slim_ov(compression, attn=attn)
    processor = slim_processor(model.config.compression)
    k = compression["tokens"]
    cases = ((images, [PROMPT] * 4, QUESTIONS * 2, True), ([images[:3]], [MULTI_PROMPT + " <image>"], QUESTIONS[:1], False))
    for sample_images, prompts, questions, single in cases:
        inputs = processor(images=sample_images, text=prompts, return_tensors="pt", padding=True, instructions=questions)
        output = features_of(model, inputs)
        view = 0
        for b, features in enumerate(output.pooler_output):
            grid = GRIDS[b] if single else None
            count = 1 + grid[0] * grid[1] if single else 1
            if compression["method"] == "cdpruner":
                row = inputs["relevance_input_ids"][b]
                ids = row[inputs["relevance_attention_mask"][b].bool()]
            else:
                ids = None
            views = inputs["pixel_values"][b][:count]
            expected, kept = reference_image(model, views, grid, ids, k)
            assert [v.tolist() for v in output.kept_indices[view:view + count]] == kept
            torch.testing.assert_close(features, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
            view += count
        assert view == len(output.kept_indices)  # padding views were never encoded


@pytest.mark.parametrize("compression", [CDP, DIV])
def test_video_frames_equal_the_explicit_loop_recomputation(compression):
    model = slim_ov(compression, attn="eager")
    videos = [random_video(3, 30, 40, seed=1), random_video(3, 40, 30, seed=2)]
    inputs = slim_processor(model.config.compression)(videos=videos, text=[VIDEO_PROMPT] * 2, return_tensors="pt",
                                                      padding=True, instructions=QUESTIONS)
    with torch.no_grad():
        output = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                relevance_video_input_ids=inputs.get("relevance_video_input_ids"),
                                                relevance_video_attention_mask=inputs.get("relevance_video_attention_mask"))
    for v in range(2):
        ids = None
        if compression["method"] == "cdpruner":
            ids = inputs["relevance_video_input_ids"][v][inputs["relevance_video_attention_mask"][v].bool()]
        full, kept = reference_views(model, inputs["pixel_values_videos"][v], ids, compression["tokens"])
        expected = torch.stack([full[t][p] for t in range(3) for p in kept[t]] + [model.model.image_newline.detach()])
        assert [row.tolist() for row in output.kept_indices[3 * v:3 * v + 3]] == kept
        torch.testing.assert_close(output.pooler_output[v], expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("compression", [CDP, DIV])
def test_left_padded_batch_generates_what_each_sample_generates_alone(images, compression):
    model = slim_ov(compression)
    processor = slim_processor(model.config.compression)
    prompts = [PROMPT, "USER: <image>\n what ASSISTANT:", "USER: <image>\n how many red circle are there ? ASSISTANT:",
               VIDEO_PROMPT]
    assert_batch_generates_what_each_sample_generates_alone(model, processor, [images[0], images[1], images[3], None],
                                                            prompts, videos=[None, None, None, random_video(3, seed=4)])
    assert_multi_image_batch_generates_what_each_sample_generates_alone(model, processor, images)


def test_two_questions_select_differently_and_the_same_question_the_same(images):
    model = slim_ov({"method": "cdpruner", "tokens": 4})
    processor = slim_processor(model.config.compression)

    def kept(question):
        inputs = processor(images=images[3:], text=[PROMPT], return_tensors="pt", instructions=[question])
        return torch.stack(features_of(model, inputs).kept_indices)  # [5 views, 4]

    assert not torch.equal(kept(QUESTIONS[0]), kept(QUESTIONS[1]))
    assert torch.equal(kept(QUESTIONS[0]), kept(QUESTIONS[0]))


def test_every_patch_bounds_the_count_and_what_is_not_wired_is_refused_with_a_message(images):
    for compression in ({"method": "divprune", "tokens": 16}, {"method": "cdpruner", "tokens": 16}):  # all 16 patches
        assert SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression=compression).compression["tokens"] == 16
        assert slim_processor(compression).compression["tokens"] == 16
        with pytest.raises(ValueError, match="exceeds the 16 patch tokens"):
            SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression={**compression, "tokens": 17})
        with pytest.raises(ValueError, match="exceeds the 16 patch tokens"):
            slim_processor({**compression, "tokens": 17})
    with pytest.raises(ValueError, match=r"'clip' is not available on LLaVA-OneVision \(SigLIP has no CLIP text tower\)"):
        SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression={**CDP, "relevance": "clip"})
    with pytest.raises(ValueError, match="'clip' is not available on LLaVA-OneVision"):
        slim_processor({**CDP, "relevance": "clip"})
    with pytest.raises(ValueError, match=r"scope'\] = 'image' for 'divprune' is not available on LLaVA-OneVision"):
        SlimLlavaOnevisionConfig(**tiny_onevision_config().to_dict(), compression={**DIV, "scope": "image"})
    model = slim_ov(DIV)
    with pytest.raises(ValueError, match="DivPrune on LLaVA-OneVision needs vision_feature_select_strategy='full'"):
        model.model.get_image_features(pixel_values=torch.zeros(1, 2, 3, 56, 56), image_sizes=torch.tensor([[56, 56]]),
                                       vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="DivPrune on LLaVA-OneVision needs vision_feature_select_strategy='full'"):
        model.model.get_video_features(pixel_values_videos=torch.zeros(1, 2, 3, 56, 56), vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="no relevance_input_ids"):
        slim_ov(CDP).model.get_image_features(pixel_values=torch.zeros(1, 2, 3, 56, 56), image_sizes=torch.tensor([[56, 56]]))


def test_remote_code_round_trip_under_cdpruner(tmp_path, images):
    """Saved with CDPruner, reloaded with trust_remote_code in a process without slimvlm and offline: the same
    compression, logits and greedy tokens (the prompt is the instruction on both sides)."""
    model = slim_ov({"method": "cdpruner", "tokens": 4})
    processor = slim_processor(model.config.compression)
    images[3].save(tmp_path / "image.png")
    inputs = processor(images=[images[3]], text=[PROMPT], return_tensors="pt")
    assert "relevance_input_ids" in inputs
    result = check_remote_round_trip(model, processor, inputs, {"image": str(tmp_path / "image.png")}, PROMPT, tmp_path,
                                     "modeling_llava_onevision.SlimLlavaOnevisionForConditionalGeneration",
                                     "processing_llava_onevision.SlimLlavaOnevisionProcessor")
    assert result["compression"]["method"] == "cdpruner"


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_keeps_the_vision_side_and_the_selection(tmp_path, images, bits):
    """The LLM is quantized, the tower and projector are not, and the kept sets of an image and a video equal
    the unquantized model's; generate runs."""
    pytest.importorskip("bitsandbytes")
    model = slim_ov(CDP, text_hidden=64, vision_hidden=64)  # bitsandbytes' 4-bit blocks need 64-wide rows
    model.save_pretrained(tmp_path)
    quantized = load_quantized(SlimLlavaOnevisionForConditionalGeneration, tmp_path, bits)
    assert quantized.config.compression == model.config.compression
    assert type(quantized.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    assert type(quantized.model.multi_modal_projector.linear_1) is torch.nn.Linear
    inputs = slim_processor(model.config.compression)(images=images[3:], videos=[random_video(2, seed=3)],
                                                      text=[PROMPT, VIDEO_PROMPT], return_tensors="pt", padding=True)
    with torch.no_grad():
        kept = [(features_of(candidate, inputs).kept_indices,
                 candidate.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"],
                                                    relevance_video_input_ids=inputs["relevance_video_input_ids"],
                                                    relevance_video_attention_mask=inputs["relevance_video_attention_mask"]
                                                    ).kept_indices) for candidate in (model, quantized)]
        tokens = quantized.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(kept[0][0]) == 5 and len(kept[0][1]) == 2
    assert all(torch.equal(a, b) for a, b in zip(kept[0][0] + kept[0][1], kept[1][0] + kept[1][1]))
    assert tokens.shape[0] == 2
