"""VoCo-LLaMA on Qwen2.5-VL (specs/modern_families.md §6.2, M13): `<voco>` after `<|vision_end|>` at text-like
positions p_v = p_img + max(gh, gw)/2 + 1, stage 2 on the cached VoCo K/V equal to the masked full forward (both
position modes), generate from the cache equal to full-mask generate, and stage 1's rope_deltas never reused."""

from __future__ import annotations

import pytest
import torch
from qwen_builders import IMAGE_ID, prompt, qwen2_5_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen

from slimvlm import SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor

VOCO_ID = 294
VOCO = {"method": "voco", "num_voco_tokens": 2}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = SlimQwen2_5_VLConfig(**qwen2_5_config().to_dict(), compression=VOCO, voco_token_id=VOCO_ID)
    config._attn_implementation = "eager"
    return sharpen(SlimQwen2_5_VLForConditionalGeneration(config)).eval()


@pytest.fixture(scope="module")
def processor():
    tokenizer = qwen_tokenizer()
    tokenizer.padding_side = "left"
    return SlimQwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tokenizer, compression=VOCO)


def test_layout_and_positions(model, processor):
    inputs = processor(images=[random_image(56, 84, 1)], text=[prompt()], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    end = ids.index(293)
    assert ids[end + 1: end + 3] == [VOCO_ID, VOCO_ID] and ids[end - 1] == IMAGE_ID
    positions = model.model._mrope_positions(inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"],
                                             inputs["image_grid_thw"], None, None)
    first_image = ids.index(IMAGE_ID)
    p_image = int(positions[1, 0, first_image])
    voco = positions[1:, 0, end + 1: end + 3]
    assert voco.tolist() == [[p_image + 3 + 1, p_image + 3 + 2]] * 3  # grid 4 x 6 -> max(2, 3) = 3; equal rows


@pytest.mark.parametrize("mode", ["original", "compact"])
def test_stage_two_equals_the_masked_full_forward(model, processor, mode):
    images = [random_image(56, 84, 2), random_image(112, 112, 3)]
    texts = [prompt(), prompt(after="w30 w31 w32 w33 w34")]
    for image, text in zip(images, texts):
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            full = model(**inputs).logits
            cache = model.voco_compress(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                        attention_mask=inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
                                        mm_token_type_ids=inputs["mm_token_type_ids"], position_mode=mode)
            stop = int((inputs["input_ids"][0] == VOCO_ID).nonzero()[-1]) + 1
            staged = model(input_ids=inputs["input_ids"][:, stop:], voco_cache=cache).logits
        torch.testing.assert_close(staged[0], full[0, stop:], rtol=1e-5, atol=1e-5)
        first = int((inputs["input_ids"][0] == VOCO_ID).nonzero()[0])
        expected = [0, 1] if mode == "compact" else [int(model.model._mrope_positions(
            inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], None,
            None)[1, 0, first]) + k for k in range(2)]
        assert cache.positions[0].tolist() == expected


def test_generate_from_the_cache_equals_full_mask_generate_and_ignores_stale_deltas(model, processor):
    inputs = processor(images=[random_image(84, 56, 4)], text=[prompt()], return_tensors="pt")
    full = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cache = model.voco_compress(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                attention_mask=inputs["attention_mask"], image_grid_thw=inputs["image_grid_thw"],
                                mm_token_type_ids=inputs["mm_token_type_ids"])
    stop = int((inputs["input_ids"][0] == VOCO_ID).nonzero()[-1]) + 1
    model.model.rope_deltas = torch.tensor([[-1000]])  # a stale stage-1 value must not be used
    staged = model.generate(input_ids=inputs["input_ids"][:, stop:], voco_cache=cache, max_new_tokens=8,
                            min_new_tokens=8, do_sample=False)
    assert model.model.rope_deltas is None or int(model.model.rope_deltas.flatten()[0]) != -1000
    assert staged[:, -8:].tolist() == full[:, -8:].tolist()


def test_left_padded_batch_equals_alone_and_stage_two_equals_full(model, processor):
    images, texts = [random_image(56, 84, 5), random_image(112, 112, 6)], [prompt(), prompt(before="w4 w5 w6 w7 w8")]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = model(**batch).logits
        for b in range(2):
            alone = processor(images=[images[b]], text=[texts[b]], return_tensors="pt")
            single = model(**alone).logits
            torch.testing.assert_close(full[b, -single.shape[1]:], single[0], rtol=1e-5, atol=1e-5)
        cache = model.voco_compress(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                                    attention_mask=batch["attention_mask"], image_grid_thw=batch["image_grid_thw"],
                                    mm_token_type_ids=batch["mm_token_type_ids"])
        staged = model(input_ids=batch["input_ids"][:, -3:], voco_cache=cache).logits  # both rows end "w20 w21 w22"
    torch.testing.assert_close(staged, full[:, -3:], rtol=1e-5, atol=1e-5)
