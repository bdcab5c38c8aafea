"""SparseVLM on the Qwen2.5-VL language model through the shared wiring (specs/modern_families.md §6.1, M13):
survivors keep their original 3-D M-RoPE ids (v1.5 too; a recycled token takes its centre's), decoding continues at
last + 1 in every segment, generate() equals a cache-free replay, a left-padded batch equals each sample alone."""

from __future__ import annotations

import pytest
import torch
from qwen_builders import IMAGE_ID, prompt, qwen2_5_config, qwen_image_processor, qwen_tokenizer, random_image, sharpen

from slimvlm import SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor


def sparse(version="1.5"):
    return {"method": "sparsevlm", "version": version, "layers": [0], "budgets": [200]}


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = qwen_tokenizer()
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = SlimQwen2_5_VLConfig(**qwen2_5_config().to_dict())
    config._attn_implementation = "eager"
    return sharpen(SlimQwen2_5_VLForConditionalGeneration(config)).eval()


def inputs_for(tokenizer, images, texts):
    processor = SlimQwen2_5_VLProcessor(image_processor=qwen_image_processor(), tokenizer=tokenizer)
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def rotary_positions(model):
    seen = []
    hook = model.model.language_model.rotary_emb.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    return seen, hook


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_survivors_keep_their_original_3d_positions(model, tokenizer, version):
    model.set_compression(sparse(version))
    inputs = inputs_for(tokenizer, [random_image(112, 112, 1)], [prompt()])
    stock_positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    image_grid_thw=inputs["image_grid_thw"])
    seen, hook = rotary_positions(model)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    seen = [p for p in seen if p.ndim == 3]  # (v2.0's gravity table is computed at 1-D distances first)
    step = model.sparsevlm_report.steps[0][0]
    first = int((inputs["input_ids"][0] == IMAGE_ID).nonzero()[0])
    visual = stock_positions[:, 0, first:first + 16]
    expected = torch.cat([stock_positions[:, 0, :first], visual[:, step.kept], visual[:, step.recycled[step.centres]],
                          stock_positions[:, 0, first + 16:]], dim=1)
    assert step.centres.numel() > 0 or version == "2.0"
    assert seen[0].shape == (3, 1, inputs["input_ids"].shape[1])
    assert torch.equal(seen[-1][:, 0], expected)  # the pruned segment rotates with the gathered original ids
    cos, sin = model.model.language_model.rotary_emb(torch.zeros(1, 1, 64), expected[:, None])
    cos_seen, sin_seen = model.model.language_model.rotary_emb(torch.zeros(1, 1, 64), seen[-1])
    assert torch.equal(cos, cos_seen) and torch.equal(sin, sin_seen)


def replay(model, inputs, plan, steps):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        types = (ids == IMAGE_ID).long()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, pixel_values=inputs["pixel_values"],
                           image_grid_thw=inputs["image_grid_thw"], sparsevlm_plan=plan, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("version", ["1.5", "2.0"])
def test_generate_equals_cache_free_replay_and_decodes_at_last_plus_one(model, tokenizer, version):
    model.set_compression(sparse(version))
    inputs = inputs_for(tokenizer, [random_image(56, 84, 2), random_image(112, 112, 3)],
                        [prompt(), prompt(before="w4 w5 w6 w7 w8")])
    seen, hook = rotary_positions(model)
    try:
        generated = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    finally:
        hook.remove()
    assert torch.equal(generated, replay(model, inputs, model.sparsevlm_report.steps, 16))
    stock_positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    image_grid_thw=inputs["image_grid_thw"],
                                                    attention_mask=inputs["attention_mask"])
    last = stock_positions[:, :, -1]  # [3, B]: the last prompt token's ids (text: equal rows)
    decode = [p for p in seen if p.ndim == 3 and p.shape[-1] == 1]
    for t in range(3):
        for segment in decode[2 * t: 2 * t + 2]:  # two segments (layers [0] | [1])
            assert torch.equal(segment[-3:, :, 0], last + 1 + t)


def test_batch_equals_each_sample_alone(model, tokenizer):
    model.set_compression(sparse())
    images, texts = [random_image(56, 84, 4), random_image(112, 112, 5)], [prompt(), prompt(after="w30 w31 w32 w33")]
    batch = inputs_for(tokenizer, images, texts)
    with torch.no_grad():
        together = model(**batch).logits
        steps = model.sparsevlm_report.steps
        for b in range(2):
            alone = inputs_for(tokenizer, [images[b]], [texts[b]])
            single = model(**alone).logits
            assert model.sparsevlm_report.steps[0][0].kept.tolist() == steps[b][0].kept.tolist()
            torch.testing.assert_close(together[b, -1], single[0, -1], rtol=1e-5, atol=1e-5)

