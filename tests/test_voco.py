"""VoCo-LLaMA (specs/voco.md §13): the mask rule, two-stage exactness, generation, caches, training, export.

Tiny random models (4x4 = 16 image tokens, 2 Llama layers with GQA), offline, CPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import AddedToken
from tokenizers.processors import TemplateProcessing

from builders import (
    SPECIAL_TOKENS,
    make_processor,
    make_tokenizer,
    pad_rows,
    random_images,
    sharpen_language_model,
    tiny_llava_config,
)
from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.voco import (
    IGNORE_INDEX,
    VOCO_CHAT_TEMPLATE,
    VoCoCache,
    VoCoDataCollator,
    add_voco_token,
    build_voco_attention_mask,
    build_voco_prompt,
    build_voco_text_prompt,
    cache_bytes_per_token,
    check_mask_backend,
    freeze_vision_tower,
    voco_bounds,
    voco_reference_mask,
)

VOCO_ID = SPECIAL_TOKENS.index("<voco>")
IMAGE_ID = SPECIAL_TOKENS.index("<image>")
IMAGE_SIZE, PATCH = 8, 2  # 16 image tokens
QUESTIONS = ["what is the color ?", "how many are there in the image ?"]


# ------------------------------------------------------------------------------------------ builders


def voco_tokenizer():
    """The test tokenizer with BOS added and "\\n" kept as its own token (as the LLaMA tokenizer does)."""
    tokenizer = make_tokenizer()
    tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def voco_processor(num_voco: int, padding_side: str = "left") -> SlimLlavaProcessor:
    stock = make_processor(IMAGE_SIZE, PATCH)
    tokenizer = voco_tokenizer()
    tokenizer.padding_side = padding_side
    return SlimLlavaProcessor(
        image_processor=stock.image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        compression={"method": "voco", "num_voco_tokens": num_voco},
    )


def voco_model(num_voco: int = 2, seed: int = 0, attn: str = "eager", dtype=torch.float32, scale: float = 4.0,
               **config_kwargs):
    """Tiny VoCo LLaVA; LM weights scaled up so that masking errors show in the logits."""
    torch.manual_seed(seed)
    base = tiny_llava_config(image_size=IMAGE_SIZE, patch_size=PATCH, **config_kwargs)
    config = SlimLlavaConfig(**base.to_dict(), compression={"method": "voco", "num_voco_tokens": num_voco})
    config.voco_token_id = VOCO_ID
    model = SlimLlavaForConditionalGeneration(config)
    sharpen_language_model(model, scale)  # masking and position errors must show in the logits
    model.set_attn_implementation({"text_config": attn, "vision_config": "eager"})
    return model.to(dtype).eval()


def image_inputs(processor, questions=QUESTIONS, seed: int = 0):
    images = random_images(len(questions), IMAGE_SIZE, seed=seed)
    prompts = [build_voco_prompt(q) for q in questions]
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


def text_inputs(processor, questions=QUESTIONS):
    """Stage-2 text (after the VoCo group), left padded, no BOS."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    return tokenizer([build_voco_text_prompt(q) for q in questions], add_special_tokens=False, return_tensors="pt",
                     padding=True)


def text_logits_of_full(logits, input_ids, attention_mask):
    """Per row, the logits of the real tokens after the VoCo group: list of [T_b, V]."""
    bounds = voco_bounds(input_ids == VOCO_ID)
    rows = []
    for b in range(input_ids.shape[0]):
        after = torch.arange(input_ids.shape[1]) > bounds.last[b]
        rows.append(logits[b, after & attention_mask[b].bool()])
    return rows


def text_logits_of_stage2(logits, attention_mask):
    return [logits[b, attention_mask[b].bool()] for b in range(logits.shape[0])]


def max_diff(rows_a, rows_b) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(rows_a, rows_b))


@pytest.fixture(scope="module")
def processor2():
    return voco_processor(2)


@pytest.fixture(scope="module")
def model2():
    return voco_model(2)


# ------------------------------------------------------------------------------ 1-3: the mask rule


def brute_force_mask(ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Spec §3.1 as a literal triple loop."""
    batch, length = ids.shape
    allowed = torch.zeros(batch, length, length, dtype=torch.bool)
    for b in range(batch):
        voco = [i for i in range(length) if ids[b, i] == VOCO_ID]
        for i in range(length):
            for j in range(length):
                if not real[b, i]:
                    allowed[b, i, j] = True
                elif voco:
                    allowed[b, i, j] = j <= i and bool(real[b, j]) and (i <= voco[-1] or j >= voco[0])
                else:
                    allowed[b, i, j] = j <= i and bool(real[b, j])
    return allowed


def synthetic_rows(num_voco: int, padding_side: str):
    """Rows [prefix][<voco> x K][text] with unequal prefixes and texts, plus a text-only row."""
    rows = [[1] + [IMAGE_ID] * 3 + [VOCO_ID] * num_voco + [7, 8],
            [1] + [IMAGE_ID] * 5 + [9] + [VOCO_ID] * num_voco + [9, 7, 8, 10],
            [1, 7, 8, 9]]
    return pad_rows(rows, padding_side)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("num_voco", [1, 2, 4])
def test_mask_rule_equals_brute_force_and_native_masks(num_voco, padding_side):
    ids, real = synthetic_rows(num_voco, padding_side)
    expected = brute_force_mask(ids, real)
    assert torch.equal(voco_reference_mask(ids == VOCO_ID, real), expected)
    config = tiny_llava_config().text_config
    bounds = voco_bounds(ids == VOCO_ID)
    for attn in ("sdpa", "eager"):
        config._attn_implementation = attn
        mask = build_voco_attention_mask(config, torch.empty(ids.shape[0], ids.shape[1], 0), real, bounds)
        assert mask.shape == (ids.shape[0], 1, ids.shape[1], ids.shape[1])
        if attn == "sdpa":
            assert mask.dtype == torch.bool and torch.equal(mask[:, 0], expected)
        else:
            assert mask.is_floating_point() and torch.equal(mask[:, 0] == 0, expected)
        assert bool((mask[:, 0] == (True if attn == "sdpa" else 0)).any(-1).all()), "a row is fully masked"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_mask_forward_is_finite_with_padding(attn, processor2):
    model = voco_model(2, attn=attn)
    inputs = image_inputs(processor2)
    assert bool((inputs["attention_mask"] == 0).any()), "the batch should be padded"
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_flex_attention_applies_the_voco_mask(processor2):
    inputs = image_inputs(processor2)
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        sdpa = voco_model(2, attn="sdpa")(**inputs).logits[real]
        flex = voco_model(2, attn="flex_attention")(**inputs).logits[real]
    assert float((sdpa - flex).abs().max()) <= 1e-4


def test_two_voco_groups_in_a_row_are_refused():
    model = voco_model(1)
    with pytest.raises(ValueError, match="one contiguous group"):
        model(input_ids=torch.tensor([[1, IMAGE_ID, VOCO_ID, 7, IMAGE_ID, VOCO_ID, 8]]))


def test_flash_attention_guard():
    with pytest.raises(ValueError, match="flash_attention_2.*allowed"):
        check_mask_backend("flash_attention_2")
    check_mask_backend("flash_attention_2", needs_voco_mask=False)  # the cached path: plain causal
    model = voco_model(1)
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    ids = torch.tensor([[1, IMAGE_ID, VOCO_ID, 7]])
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        model(input_ids=ids)


# ---------------------------------------------------------------------------- 4: two-stage exactness


@pytest.mark.parametrize("num_voco", [1, 2])
def test_two_stage_equals_full_mask_forward(num_voco):
    processor = voco_processor(num_voco)
    model = voco_model(num_voco)
    inputs = image_inputs(processor)
    text = text_inputs(processor)
    with torch.no_grad():
        full = text_logits_of_full(model(**inputs).logits, inputs["input_ids"], inputs["attention_mask"])
        original = model.voco_compress(**inputs, position_mode="original")
        compact = model.voco_compress(**inputs)
        assert compact.position_mode == "compact" and original.position_mode == "original"
        stage2 = {
            mode: text_logits_of_stage2(model(**text, voco_cache=cache).logits, text["attention_mask"])
            for mode, cache in (("original", original), ("compact", compact))
        }
        # Sensitivity: renumbering without rotating the keys, and the plain causal (no VoCo mask) forward.
        renumbered = VoCoCache(original.keys, original.values, compact.positions)
        naive = text_logits_of_stage2(model(**text, voco_cache=renumbered).logits, text["attention_mask"])
        model.set_compression({"method": "none"})
        no_mask = text_logits_of_full(model(**inputs).logits, inputs["input_ids"], inputs["attention_mask"])
        model.set_compression({"method": "voco", "num_voco_tokens": num_voco})
    assert max(float(r.abs().max()) for r in full) > 1.0, "logits too small to show masking errors"
    print({"original": max_diff(stage2["original"], full), "compact": max_diff(stage2["compact"], full),
           "naive": max_diff(naive, full), "no_mask": max_diff(no_mask, full)})
    assert max_diff(stage2["original"], full) <= 1e-5
    assert max_diff(stage2["compact"], full) <= 1e-4
    assert max_diff(naive, full) > 1e-2
    assert max_diff(no_mask, full) > 1e-2


def test_two_stage_exact_in_float64(processor2):
    model = voco_model(2, attn="sdpa", dtype=torch.float64)  # eager softmaxes in float32
    inputs = image_inputs(processor2)
    inputs["pixel_values"] = inputs["pixel_values"].double()
    text = text_inputs(processor2)
    with torch.no_grad():
        full = text_logits_of_full(model(**inputs).logits, inputs["input_ids"], inputs["attention_mask"])
        cache = model.voco_compress(**inputs, position_mode="original")
        stage2 = text_logits_of_stage2(model(**text, voco_cache=cache).logits, text["attention_mask"])
    assert max_diff(stage2, full) <= 1e-10


def test_padding_side_does_not_change_full_mask_logits(model2):
    left = image_inputs(voco_processor(2, "left"))
    right = image_inputs(voco_processor(2, "right"))
    with torch.no_grad():
        a = model2(**left).logits
        b = model2(**right).logits
    rows_a = [a[i, left["attention_mask"][i].bool()] for i in range(2)]
    rows_b = [b[i, right["attention_mask"][i].bool()] for i in range(2)]
    assert max_diff(rows_a, rows_b) <= 1e-5
    # Stage 1 too: the compressed image does not depend on the padding side.
    cache_left, cache_right = model2.voco_compress(**left), model2.voco_compress(**right)
    assert torch.equal(cache_left.positions, cache_right.positions)
    assert torch.allclose(cache_left.keys, cache_right.keys, atol=1e-5) and torch.allclose(cache_left.values, cache_right.values, atol=1e-5)


# ------------------------------------------------------------------------------ 5-7: generation


def greedy_full_recompute(model, input_ids, attention_mask, pixel_values, steps):
    """Cache-free greedy loop: the whole masked sequence is recomputed for every new token."""
    ids, mask = input_ids, attention_mask
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids[:, input_ids.shape[1]:]


def greedy_cached_original(model, text, cache, steps):
    """Stage 2 with original positions, decoded by hand on the returned KV cache."""
    out = model(**text, voco_cache=cache)
    mask, new = text["attention_mask"], []
    positions = cache.next_position[:, None] + text["attention_mask"].cumsum(-1)[:, -1:] - 1
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        new.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = positions + 1
        full_mask = torch.cat([torch.ones(mask.shape[0], cache.num_voco_tokens, dtype=mask.dtype), mask], 1)
        out = model(input_ids=token, attention_mask=full_mask, position_ids=positions, past_key_values=out.past_key_values)
    return torch.cat(new, 1)


def test_generation_equivalence(model2, processor2):
    inputs = image_inputs(processor2)
    text = text_inputs(processor2)
    steps = 8
    settings = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        full_generate = model2.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
        recompute = greedy_full_recompute(model2, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], steps)
        compact = model2.voco_compress(**inputs)
        original = model2.voco_compress(**inputs, position_mode="original")
        manual = greedy_cached_original(model2, text, original, steps)
        stock = model2.generate(**text, voco_cache=compact, **settings)
        stock_original = model2.generate(**text, voco_cache=original, **settings)
    assert torch.equal(stock[:, : text["input_ids"].shape[1]], text["input_ids"])
    for tokens in (recompute, manual, stock[:, text["input_ids"].shape[1]:], stock_original[:, text["input_ids"].shape[1]:]):
        assert torch.equal(tokens, full_generate)
    assert len(set(full_generate.flatten().tolist())) > 1, "degenerate generation proves little"


def test_full_mask_decoding_keeps_voco_positions(model2, processor2):
    inputs = image_inputs(processor2)
    seen = []
    prepare = model2.prepare_inputs_for_generation

    def recording(*args, **kwargs):
        model_inputs = prepare(*args, **kwargs)
        seen.append((model_inputs["voco_bounds"].first.tolist(), model_inputs["voco_bounds"].last.tolist()))
        return model_inputs

    model2.prepare_inputs_for_generation = recording
    try:
        out = model2.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    finally:
        del model2.prepare_inputs_for_generation
    assert out.shape[1] == inputs["input_ids"].shape[1] + 32
    assert len(seen) == 32 and all(entry == seen[0] for entry in seen)


def test_one_cache_answers_several_prompts_unchanged(model2, processor2):
    inputs = image_inputs(processor2, questions=[QUESTIONS[0]])
    cache = model2.voco_compress(**inputs)
    stored = cache.clone()
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    questions = ["what is the shape ?", "is there a red circle in the picture ?"]
    together = model2.generate(**text_inputs(processor2, questions), voco_cache=cache, **settings)
    for index, question in enumerate(questions):
        alone = model2.generate(**text_inputs(processor2, [question]), voco_cache=cache, **settings)
        assert torch.equal(alone[0, -6:], together[index, -6:])
    assert torch.equal(cache.keys, stored.keys) and torch.equal(cache.values, stored.values)
    assert torch.equal(cache.positions, stored.positions)


# ---------------------------------------------------------------------------------- 8: cache files


def test_cache_file_round_trip_and_refusal(model2, processor2, tmp_path):
    cache = model2.voco_compress(**image_inputs(processor2))
    path = tmp_path / "image.voco.safetensors"
    cache.save(path)
    loaded = VoCoCache.load(path, model=model2)
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(loaded, name), getattr(cache, name))
    fields = {"format", "format_version", "model_name_or_path", "model_revision", "weights_fingerprint",
              "voco_token_id", "voco_num", "num_layers", "num_kv_heads", "head_dim", "rope_theta", "rope_type",
              "position_mode", "first_position", "next_position", "dtype", "quantization"}
    assert fields <= set(loaded.metadata)
    assert len(json.loads(loaded.metadata["image_sha256"])) == 2
    assert json.loads(cache[1].metadata["image_sha256"]) == json.loads(cache.metadata["image_sha256"])[1:]
    single = tmp_path / "one.safetensors"
    cache[1].save(single)
    assert VoCoCache.load(single).keys.shape == cache[1].keys.shape

    other = voco_model(2, seed=1)
    with pytest.raises(ValueError, match="weights_fingerprint"):
        VoCoCache.load(path, model=other)
    assert VoCoCache.load(path, model=other, allow_mismatch=True).num_voco_tokens == 2
    deeper = copy.deepcopy(loaded)
    deeper.metadata["num_layers"] = "3"
    with pytest.raises(ValueError, match="num_layers"):
        deeper.check_compatible(model2.voco_cache_metadata())
    rope = copy.deepcopy(loaded)
    rope.metadata["rope_theta"] = "500000.0"
    with pytest.raises(ValueError, match="rope_theta"):
        rope.check_compatible(model2.voco_cache_metadata())


def test_cache_bytes_per_token_of_a_7b_shaped_model():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064)
    assert cache_bytes_per_token(config, torch.float16) == 524_288
    with torch.device("meta"):
        from transformers import LlamaModel

        model = LlamaModel(config)
    attention = model.layers[0].self_attn
    per_layer = 2 * attention.k_proj.out_features * 2  # K and V, fp16
    assert per_layer * len(model.layers) == 524_288


# ------------------------------------------------------------------------------ 10: tokens and prompts


def test_prompt_layout_and_template(processor2):
    inputs = image_inputs(processor2, questions=[QUESTIONS[0]])
    ids = inputs["input_ids"][0].tolist()
    newline = processor2.tokenizer.convert_tokens_to_ids("\n")
    n = 16
    assert ids[: 1 + n + 1 + 2 + 1] == [1] + [IMAGE_ID] * n + [newline] + [VOCO_ID] * 2 + [newline]
    assert VOCO_ID not in ids[1 + n + 4:] and IMAGE_ID not in ids[1 + n:]
    assert "\n" not in build_voco_prompt([("a\nb", "c\nd"), ("e", None)]).split("\n", 1)[1]
    assert "a\nb" in build_voco_prompt([("a\nb", None)], strip_newlines=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                {"role": "user", "content": [{"type": "text", "text": "and the shape ?"}]}]
    from jinja2 import Template

    rendered = Template(VOCO_CHAT_TEMPLATE).render(messages=messages)
    assert rendered == build_voco_prompt([("what is it ?", "red"), ("and the shape ?", None)])
    assert processor2.apply_chat_template(messages, tokenize=False) == rendered


def test_add_voco_token_grows_vocabulary_by_one():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    from builders import WORDS

    torch.manual_seed(0)
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + WORDS  # a base checkpoint without <voco>
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>")
    plain.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert "<voco>" not in plain.get_vocab()
    config = tiny_llava_config(vocab_size=len(plain))
    model = LlavaForConditionalGeneration(config)
    rows = model.get_input_embeddings().weight.shape[0]
    voco_id = add_voco_token(model, plain, seed=0)
    assert voco_id == rows and len(plain) == rows + 1
    assert plain.convert_tokens_to_ids("<image>") == IMAGE_ID
    assert plain.encode("<voco> <voco>", add_special_tokens=False) == [voco_id, voco_id]
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.shape[0] == rows + 1
        assert 0 < float(weight[voco_id].detach().std()) < 0.1  # N(0, initializer_range = 0.02)
    assert model.config.voco_token_id == voco_id
    assert {voco_id, IMAGE_ID} <= set(model.generation_config.suppress_tokens)
    assert add_voco_token(model, plain) == voco_id and model.get_input_embeddings().weight.shape[0] == rows + 1


def conversation_examples(count: int, seed: int = 0):
    colors = ["red", "green", "blue"]
    values = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        color = colors[int(torch.randint(3, (1,), generator=generator))]
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), values[color])
        examples.append({"image": image, "conversation": [("what is the color ?", color)]})
    return examples


def test_collator_labels(processor2):
    collator = VoCoDataCollator(processor2)
    examples = [{"image": random_images(1, IMAGE_SIZE)[0], "conversation": [("what is the color ?", "red"),
                                                                              ("how many ?", "two\n three")]},
                {"image": None, "conversation": [("describe this", "yes")]}]
    batch = collator(examples)
    tokenizer = processor2.tokenizer
    eos = tokenizer.eos_token_id
    supervised = [[t for t, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX]
                  for ids, labels in zip(batch["input_ids"], batch["labels"])]
    word = tokenizer.convert_tokens_to_ids
    assert supervised[0] == [word("red"), eos, word("two"), word("three"), eos]  # "\n" stripped from answers
    assert supervised[1] == [word("yes"), eos]
    assert VOCO_ID not in batch["input_ids"][1].tolist(), "text-only rows get no VoCo tokens"
    assert batch["pixel_values"].shape[0] == 1
    assert batch["attention_mask"][1, -1] == 0 and batch["labels"][1, -1] == IGNORE_INDEX  # right padding


# ----------------------------------------------------------------------------------- 11: training


def test_training_step_loss_and_gradients(model2, processor2):
    model = copy.deepcopy(model2).train()
    frozen = freeze_vision_tower(model)
    assert frozen == ["model.vision_tower"]
    batch = VoCoDataCollator(processor2)(conversation_examples(3))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # Plain causal-LM cross-entropy over the supervised tokens, by hand.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    manual = torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(out.loss, manual, atol=1e-6)
    out.loss.backward()
    assert float(model.get_input_embeddings().weight.grad[VOCO_ID].abs().sum()) > 0
    assert float(model.model.multi_modal_projector.linear_1.weight.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_training_through_the_cache_equals_full_mask_training(processor2):
    """Loss and gradients of stage 2 on a differentiable VoCo cache equal model(**full_batch, labels=...)."""
    model = voco_model(2, scale=1.0).train()
    freeze_vision_tower(model)
    examples = conversation_examples(2)
    full = VoCoDataCollator(processor2, system_prompt="", padding_side="left")(examples)
    full_loss = model(**full).loss
    full_loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    prefix = processor2(text=["<image>\n"] * 2, images=[e["image"] for e in examples], return_tensors="pt")
    cache = model.voco_compress(**prefix, position_mode="original", enable_grad=True)
    start = int(voco_bounds(prefix["input_ids"] == VOCO_ID).last.max()) + 1  # the text starts with the second "\n"
    text = {k: full[k][:, start:] for k in ("input_ids", "attention_mask", "labels")}
    assert bool(text["attention_mask"].all()), "equal-length examples: no padding inside the text"
    staged_loss = model(**text, voco_cache=cache).loss
    staged_loss.backward()
    assert abs(staged_loss.item() - full_loss.item()) <= 1e-5
    for name, grad in full_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4), name


def test_short_training_run_learns_through_the_voco_tokens():
    """Solid-colour images, question "what is the color ?": the text sees the image only through <voco>.

    Answering blind costs ln(3)/2 = 0.55 nats per supervised token (colour + </s>); the loss must fall far
    below that, and the cached two-stage model must name the colour of new images.
    """
    model = voco_model(1, scale=1.0).train()
    freeze_vision_tower(model)
    collator = VoCoDataCollator(voco_processor(1, "right"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(80):
        loss = model(**collator(conversation_examples(6, seed=step))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.2 < sum(losses[:5]) / 5, losses

    model.eval()
    processor = voco_processor(1, "left")
    examples = conversation_examples(12, seed=99)
    questions = [e["conversation"][0][0] for e in examples]
    inputs = processor(text=[build_voco_prompt(q) for q in questions], images=[e["image"] for e in examples],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        cache = model.voco_compress(**inputs)
        answers = model.generate(**text_inputs(processor, questions), voco_cache=cache, max_new_tokens=1, do_sample=False)
    predicted = processor.tokenizer.convert_ids_to_tokens(answers[:, -1].tolist())
    assert sum(p == e["conversation"][0][1] for p, e in zip(predicted, examples)) >= 11, predicted


# ---------------------------------------------------------------------------- 12 and 15: packaging


REMOTE_SCRIPT = """
import json, sys
sys.modules["slimvlm"] = None  # the package must not be needed
import torch
from transformers import AutoModelForImageTextToText
from safetensors.torch import load_file
folder = sys.argv[1]
inputs = load_file(folder + "/inputs.safetensors")
model = AutoModelForImageTextToText.from_pretrained(folder + "/model", trust_remote_code=True).eval()
assert type(model).__name__ == "SlimLlavaForConditionalGeneration", type(model)
full = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
text = {"input_ids": inputs["text_ids"], "attention_mask": inputs["text_mask"]}
settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
with torch.no_grad():
    logits = model(**full).logits
    tokens = model.generate(**full, **settings)[:, full["input_ids"].shape[1]:]
    cache = model.voco_compress(**full)
    cached = model.generate(**text, voco_cache=cache, **settings)[:, text["input_ids"].shape[1]:]
print(json.dumps({"logit_diff": float((logits - inputs["logits"]).abs().max()),
                  "tokens": tokens.tolist(), "cached": cached.tolist()}))
"""


def test_remote_code_round_trip(model2, processor2, tmp_path):
    from safetensors.torch import save_file

    inputs = image_inputs(processor2)
    text = text_inputs(processor2)
    settings = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        logits = model2(**inputs).logits
        tokens = model2.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
    model2.save_pretrained(tmp_path / "model")
    save_file({"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
               "pixel_values": inputs["pixel_values"], "text_ids": text["input_ids"], "text_mask": text["attention_mask"],
               "logits": logits.contiguous()}, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["logit_diff"] <= 1e-5
    assert report["tokens"] == tokens.tolist() == report["cached"]


@pytest.mark.quantization
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_voco(bits, model2, processor2, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    source = voco_model(2, text_hidden=64, vision_hidden=64)  # bitsandbytes' 4-bit blocks need 64-wide rows
    source.save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    model = SlimLlavaForConditionalGeneration.from_pretrained(tmp_path, quantization_config=quantization,
                                                              device_map="cpu").eval()
    assert type(model.model.multi_modal_projector.linear_1) is torch.nn.Linear
    assert all(type(m) is torch.nn.Linear for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.Linear))
    assert type(model.model.language_model.layers[0].self_attn.k_proj) is not torch.nn.Linear
    inputs = image_inputs(processor2)
    with torch.no_grad():
        cache = model.voco_compress(**inputs)
        tokens = model.generate(**text_inputs(processor2), voco_cache=cache, max_new_tokens=4, do_sample=False)
    assert tokens.shape[0] == 2
    assert cache.metadata["quantization"] == f"bnb-{bits}bit"
    cache.save(tmp_path / "cache.safetensors")
    with pytest.raises(ValueError, match="quantization"):
        VoCoCache.load(tmp_path / "cache.safetensors", model=source)
    VoCoCache.load(tmp_path / "cache.safetensors", model=source, allow_mismatch=True)


# ---------------------------------------------------------------------------------- 13: export


def test_export_voco_weights_round_trip(model2, tmp_path):
    from safetensors import safe_open

    from slimvlm.conversion.voco_export import export_voco_weights, load_voco_weights

    out = export_voco_weights(model2, tmp_path / "voco", mode="voco-only", base_model="tiny-base")
    with safe_open(out / "voco_weights.safetensors", "pt") as handle:
        assert sorted(handle.keys()) == sorted(
            ["voco.embed_tokens_row", "voco.lm_head_row"]
            + [f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")])
        metadata = handle.metadata()
    assert metadata["voco_token_id"] == str(VOCO_ID) and metadata["voco_num"] == "2"
    assert metadata["base_model"] == "tiny-base"
    with pytest.raises(FileExistsError):
        export_voco_weights(model2, tmp_path / "voco", mode="voco-only")

    base = voco_model(2, seed=3)
    base.config.voco_token_id = None
    base.set_compression(None)
    load_voco_weights(base, out)
    assert base.config.voco_token_id == VOCO_ID and base.config.compression["num_voco_tokens"] == 2
    assert torch.equal(base.get_input_embeddings().weight[VOCO_ID], model2.get_input_embeddings().weight[VOCO_ID])
    assert torch.equal(base.lm_head.weight[VOCO_ID], model2.lm_head.weight[VOCO_ID])
    for name, tensor in model2.model.multi_modal_projector.state_dict().items():
        assert torch.equal(base.model.multi_modal_projector.state_dict()[name], tensor)

    full = export_voco_weights(model2, tmp_path / "full", mode="full")
    assert (full / "voco_weights.safetensors").exists() and (full / "config.json").exists()
    reloaded, info = SlimLlavaForConditionalGeneration.from_pretrained(full, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name, tensor in model2.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert not list(tmp_path.glob(".*tmp*")), "no temporary folder left behind"


def test_delta_export_rebuilds_the_fine_tuned_tensors(model2, tmp_path):
    from slimvlm.conversion.voco_export import apply_voco_delta, export_voco_weights
    from slimvlm.voco import tensor_sha256

    base = voco_model(2, seed=5)
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # a "fine-tuning" that touches every LLM tensor, the <voco> rows and the projector
        for name, param in tuned.named_parameters():
            if "vision_tower" not in name:
                param.add_(torch.randn_like(param) * 1e-3)
    out = export_voco_weights(tuned, tmp_path / "delta", mode="delta", base_state_dict=base.state_dict())
    rebuilt = apply_voco_delta(copy.deepcopy(base), out)
    for name, tensor in tuned.state_dict().items():
        assert tensor_sha256(rebuilt.state_dict()[name]) == tensor_sha256(tensor), name


# ------------------------------------------------------------------------- 9: official checkpoints


def test_official_checkpoint_conversion():
    from slimvlm.conversion.voco_official import convert_official_config, convert_official_state_dict

    base = 40  # "32000": the base vocabulary; official <voco> = 40, ours = 42 (<image> 40, <pad> 41)
    torch.manual_seed(0)
    config = SlimLlavaConfig(**tiny_llava_config(image_size=IMAGE_SIZE, patch_size=PATCH, vocab_size=base + 3).to_dict(),
                             compression={"method": "voco", "num_voco_tokens": 2})
    config.image_token_id, config.voco_token_id = base, base + 2
    reference = SlimLlavaForConditionalGeneration(config).eval()
    ours = reference.state_dict()
    # The same weights written the way the official code saves them.
    official = {}
    for key, tensor in ours.items():
        if key.endswith(("embed_tokens.weight",)) or key == "lm_head.weight":
            tensor = torch.cat([tensor[:base], tensor[base + 2 : base + 3]])
        key = (key.replace("model.language_model.", "model.")
               .replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
               .replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
               .replace("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."))
        official[key] = tensor.clone()
    official["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    embed, head = ours["model.language_model.embed_tokens.weight"], ours["lm_head.weight"]
    converted = convert_official_state_dict(official, base_embed_rows=embed[base : base + 2],
                                            base_lm_head_rows=head[base : base + 2])

    official_config = {"vocab_size": base + 1, "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
                       **{k: getattr(config.text_config, k) for k in ("hidden_size", "intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}}
    new_config = convert_official_config(official_config, 2, vision_config=config.vision_config.to_dict())
    assert (new_config.image_token_id, new_config.voco_token_id, new_config.pad_token_id) == (base, base + 2, base + 1)
    model = SlimLlavaForConditionalGeneration(new_config).eval()
    missing, unexpected = model.load_state_dict(converted, strict=True)
    assert not missing and not unexpected
    assert torch.equal(model.get_input_embeddings().weight[base + 2], official["model.embed_tokens.weight"][base])
    assert torch.equal(model.lm_head.weight[base + 2], official["lm_head.weight"][base])
    ids = torch.tensor([[1] + [base] * 16 + [base + 2] * 2 + [7, 8, 9]])
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids, pixel_values=pixels).logits,
                              reference(input_ids=ids, pixel_values=pixels).logits, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="model.mm_projector.4.weight"):
        convert_official_state_dict({**official, "model.mm_projector.4.weight": torch.ones(1)})


def test_cli_generate_uses_the_voco_prompt_layout(model2, processor2, tmp_path, capsys):
    """`slimvlm generate` on a VoCo checkpoint builds the VoCo prompt (image first) and answers like
    `model.generate` on that prompt; the LLaVA-1.5 prompt would put text before the image."""
    from slimvlm.cli import default_prompt, main

    model2.save_pretrained(tmp_path / "voco")
    processor2.save_pretrained(tmp_path / "voco")
    assert default_prompt(model2, "what is the color ?") == build_voco_prompt("what is the color ?")
    image = random_images(1, IMAGE_SIZE, seed=3)[0]
    image.save(tmp_path / "img.png")
    assert main(["generate", "--model", str(tmp_path / "voco"), "--image", str(tmp_path / "img.png"),
                 "--question", "what is the color ?", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    from PIL import Image

    inputs = processor2(text=[build_voco_prompt("what is the color ?")],
                        images=[Image.open(tmp_path / "img.png").convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model2.generate(**inputs, max_new_tokens=4, do_sample=False)
    expected = processor2.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert expected and printed == expected
