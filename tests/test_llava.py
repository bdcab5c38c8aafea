"""SlimLlava end to end: stock and legacy checkpoints load, `none` is the stock model, placeholders match the
model, batching and left padding, generate() == a cache-free greedy loop, Auto classes.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from builders import IMAGE_TOKEN_ID, random_images
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaProcessor,
)

import slimvlm  # noqa: F401  (registers the Auto classes)
from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaModel, SlimLlavaProcessor

NONE = {"method": "none"}
VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}
PROMPTS = [
    "USER: <image>\n what is the color of the circle ? ASSISTANT:",
    "USER: <image>\n describe ASSISTANT:",
    "USER: <image>\n how many red square are there in this picture ? ASSISTANT:",
]


def legacy_key(key: str) -> str:
    """In-memory (transformers 5) weight name -> the legacy llava-hf name most published checkpoints use."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if key.startswith(new):
            return old + key[len(new) :]
    raise AssertionError(f"unexpected key {key}")


def write_legacy_copy(source, target, state_dict):
    """Copy a checkpoint folder, replacing its weights by `state_dict` (in-memory names) in the legacy layout."""
    shutil.copytree(source, target)
    legacy = {legacy_key(key): value.contiguous() for key, value in state_dict.items()}
    assert any(key.startswith("vision_tower.vision_model.encoder.layers.") for key in legacy)
    assert any(key.startswith("language_model.model.layers.") for key in legacy)
    assert "language_model.lm_head.weight" in legacy
    save_file(legacy, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def stock(stock_checkpoint):
    return LlavaForConditionalGeneration.from_pretrained(stock_checkpoint).eval()


@pytest.fixture(scope="module")
def slim(stock_checkpoint):
    return SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint).eval()


def slim_processor(folder, compression, padding_side="left"):
    processor = SlimLlavaProcessor.from_pretrained(folder, compression=compression)
    processor.tokenizer.padding_side = padding_side
    return processor


def stock_inputs(folder, count=1):
    processor = LlavaProcessor.from_pretrained(folder)
    processor.tokenizer.padding_side = "left"
    return processor(images=random_images(count), text=PROMPTS[:count], return_tensors="pt", padding=True)


# --- loading ----------------------------------------------------------------------------------------


def test_stock_checkpoint_loads_every_weight_and_none_is_the_stock_model(stock_checkpoint, stock):
    model, info = SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.compression == NONE and model.image_token_count() == 576
    stock_state, slim_state = stock.state_dict(), model.state_dict()
    assert stock_state.keys() == slim_state.keys()
    assert all(torch.equal(stock_state[key], slim_state[key]) for key in stock_state)
    inputs = stock_inputs(stock_checkpoint, count=2)
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, stock(**inputs).logits)


def test_legacy_layout_loads_with_no_missing_weights(stock_checkpoint, stock, tmp_path):
    legacy = write_legacy_copy(stock_checkpoint, tmp_path / "legacy", stock.state_dict())
    model, info = SlimLlavaForConditionalGeneration.from_pretrained(legacy, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stock_state, slim_state = stock.state_dict(), model.state_dict()
    assert all(torch.equal(stock_state[key], slim_state[key]) for key in stock_state)
    inputs = stock_inputs(stock_checkpoint)
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, stock(**inputs).logits)


def test_in_memory_layout_loads_with_no_missing_weights(stock_checkpoint, stock, tmp_path):
    stock.save_pretrained(tmp_path, save_original_format=False)
    model, info = SlimLlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stock_state, slim_state = stock.state_dict(), model.state_dict()
    assert all(torch.equal(stock_state[key], slim_state[key]) for key in stock_state)


def test_legacy_layout_with_a_slim_config_loads_through_the_auto_classes(stock_checkpoint, stock, tmp_path):
    legacy = write_legacy_copy(stock_checkpoint, tmp_path / "legacy", stock.state_dict())
    SlimLlavaConfig.from_pretrained(stock_checkpoint, compression=VISIONZIP).save_pretrained(legacy)
    model, info = AutoModelForImageTextToText.from_pretrained(legacy, output_loading_info=True)
    assert type(model) is SlimLlavaForConditionalGeneration and model.config.compression == VISIONZIP
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    base, info = AutoModel.from_pretrained(legacy, output_loading_info=True)
    assert type(base) is SlimLlavaModel
    assert not info["missing_keys"], info
    stock_state = stock.model.state_dict()
    assert all(torch.equal(stock_state[key], value) for key, value in base.state_dict().items())


def test_legacy_layout_loads_into_the_base_model(stock_checkpoint, stock, tmp_path):
    legacy = write_legacy_copy(stock_checkpoint, tmp_path / "legacy", stock.state_dict())
    base, info = SlimLlavaModel.from_pretrained(legacy, output_loading_info=True)
    assert not info["missing_keys"], info
    assert set(info["unexpected_keys"]) <= {"lm_head.weight", "language_model.lm_head.weight"}
    stock_state = stock.model.state_dict()
    assert all(torch.equal(stock_state[key], value) for key, value in base.state_dict().items())


# --- placeholders and batching -------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [NONE, VISIONZIP, {"method": "visionzip", "dominant": 1, "contextual": 1},
                                         {"method": "cdpruner", "tokens": 20}, {"method": "divprune", "ratio": 0.098}])
def test_processor_writes_as_many_placeholders_as_the_model_consumes(stock_checkpoint, slim, compression):
    slim.set_compression(compression)
    processor = slim_processor(stock_checkpoint, slim.config.compression)
    inputs = processor(images=random_images(3), text=PROMPTS, return_tensors="pt", padding=True)
    counts = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert counts == [slim.image_token_count()] * 3
    expected = {"none": 576, "visionzip": compression.get("dominant", 0) + compression.get("contextual", 0),
                "cdpruner": 20, "divprune": 56}  # DivPrune's official ratio 0.098 of 576
    assert slim.image_token_count() == expected[compression["method"]]
    # The count transformers' serving code asks the processor for agrees too.
    assert processor._get_num_multimodal_tokens(image_sizes=[(48, 48), (60, 80)]).num_image_tokens == [slim.image_token_count()] * 2
    with torch.no_grad():
        relevance = {key: value for key, value in inputs.items() if key.startswith("relevance_")}
        features = slim.model.get_image_features(pixel_values=inputs["pixel_values"], **relevance).pooler_output
        logits = slim(**inputs).logits
    assert [f.shape[0] for f in features] == [slim.image_token_count()] * 3
    assert logits.shape[:2] == inputs["input_ids"].shape
    slim.set_compression(NONE)


def test_batched_images_give_the_same_features_as_each_alone(stock_checkpoint, slim):
    slim.set_compression(VISIONZIP)
    pixel_values = slim_processor(stock_checkpoint, VISIONZIP).image_processor(random_images(3), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        batched = slim.model.get_image_features(pixel_values=pixel_values)
        for i in range(3):
            alone = slim.model.get_image_features(pixel_values=pixel_values[i : i + 1])
            assert set(alone.dominant_indices[0].tolist()) == set(batched.dominant_indices[i].tolist())
            torch.testing.assert_close(alone.pooler_output[0], batched.pooler_output[i], rtol=1e-5, atol=1e-6)
    slim.set_compression(NONE)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(stock_checkpoint, slim):
    slim.set_compression(VISIONZIP)
    processor = slim_processor(stock_checkpoint, VISIONZIP)
    images = random_images(3, seed=7)
    batch = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left padded"
    generated = slim.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i in range(3):
        alone = processor(images=images[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt")
        tokens = slim.generate(**alone, max_new_tokens=8, do_sample=False)[:, alone["input_ids"].shape[1] :]
        assert tokens[0].tolist() == generated[i, : tokens.shape[1]].tolist()
    slim.set_compression(NONE)


# --- generation -----------------------------------------------------------------------------------------


def greedy_without_cache(model, inputs, steps):
    input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        with torch.no_grad():
            logits = model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"], use_cache=False
            ).logits
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize(
    "compression, cache_implementation", [(NONE, None), (VISIONZIP, None), (VISIONZIP, "static")], ids=["none", "visionzip", "visionzip-static"]
)
def test_generate_with_cache_equals_a_cache_free_greedy_loop(stock_checkpoint, slim, compression, cache_implementation):
    slim.set_compression(compression)
    inputs = slim_processor(stock_checkpoint, compression)(images=random_images(1, seed=3), text=PROMPTS[:1], return_tensors="pt")
    expected = greedy_without_cache(slim, inputs, 32)
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
    # eos_token_id=None: always 32 tokens, as the loop.
    output = slim.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None, **extra)
    generated = output[:, inputs["input_ids"].shape[1] :]
    assert generated.shape[1] == 32
    assert generated.tolist() == expected.tolist()
    slim.set_compression(NONE)


def test_sampling_and_beam_search_run(stock_checkpoint, slim):
    slim.set_compression(VISIONZIP)
    inputs = slim_processor(stock_checkpoint, VISIONZIP)(images=random_images(2), text=PROMPTS[:2], return_tensors="pt", padding=True)
    length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    sampled = slim.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=10, temperature=1.5, eos_token_id=None)
    assert sampled.shape == (2, length + 5)
    beams = slim.generate(**inputs, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, eos_token_id=None)
    assert beams.shape == (4, length + 5)
    slim.set_compression(NONE)


def test_bfloat16_runs(stock_checkpoint):
    model = SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint, dtype=torch.bfloat16, compression=VISIONZIP).eval()
    inputs = slim_processor(stock_checkpoint, VISIONZIP)(images=random_images(2), text=PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        from_fp32_pixels = model.model.get_image_features(pixel_values=inputs["pixel_values"])  # cast by the tower
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    assert features.pooler_output[0].dtype == torch.bfloat16 and features.pooler_output[0].shape[0] == 64
    assert torch.equal(features.pooler_output[0], from_fp32_pixels.pooler_output[0])
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 4


# --- Auto classes ---------------------------------------------------------------------------------------


def test_auto_classes_resolve_to_slim(stock_checkpoint, tmp_path):
    config = SlimLlavaConfig.from_pretrained(stock_checkpoint, compression=VISIONZIP)
    assert type(AutoConfig.for_model("slim_llava")) is SlimLlavaConfig
    model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is SlimLlavaForConditionalGeneration
    assert type(AutoModel.from_config(config)) is SlimLlavaModel
    model.save_pretrained(tmp_path)
    slim_processor(stock_checkpoint, VISIONZIP).save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is SlimLlavaConfig
    assert AutoConfig.from_pretrained(tmp_path).compression == VISIONZIP
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is SlimLlavaForConditionalGeneration and loaded.config.compression == VISIONZIP
    assert type(AutoModel.from_pretrained(tmp_path)) is SlimLlavaModel
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(processor) is SlimLlavaProcessor and processor.compression == VISIONZIP
    # The stock classes are untouched: a stock checkpoint still resolves to them.
    assert type(AutoModelForImageTextToText.from_pretrained(stock_checkpoint)) is LlavaForConditionalGeneration
    assert type(AutoModel.from_pretrained(stock_checkpoint)) is LlavaModel
    assert type(AutoProcessor.from_pretrained(stock_checkpoint)) is LlavaProcessor


# --- where the compressed features go ----------------------------------------------------------------------


def test_compressed_features_fill_the_placeholder_spans_in_order(stock_checkpoint, slim):
    """An independent assembly: embed the text, write each image's K features over its K placeholders in
    order, run the language model and lm_head; the model must give the same logits."""
    slim.set_compression(VISIONZIP)
    processor = slim_processor(stock_checkpoint, VISIONZIP)
    texts = ["USER: <image>\n <image>\n which is red ? ASSISTANT:", "USER: <image>\n describe ASSISTANT:"]
    inputs = processor(images=random_images(3, seed=5), text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        features = slim.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds = slim.model.get_input_embeddings()(inputs["input_ids"]).clone()
        image = 0
        for b in range(2):
            positions = (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten().tolist()
            for start in range(0, len(positions), 64):
                span = positions[start : start + 64]
                assert span == list(range(span[0], span[0] + 64))  # K consecutive placeholders per image
                embeds[b, span] = features[image]
                image += 1
        assert image == 3
        hidden = slim.model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
        expected = slim.lm_head(hidden)
        logits = slim(**inputs).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    slim.set_compression(NONE)


def test_generate_from_inputs_embeds_equals_generate_from_ids(stock_checkpoint, slim):
    """`generate(inputs_embeds=...)` works (transformers checks the signature of prepare_inputs_for_generation)
    and, with the image features written into the embeddings, gives the tokens of the ids + pixels call."""
    slim.set_compression(VISIONZIP)
    processor = slim_processor(stock_checkpoint, VISIONZIP)
    inputs = processor(images=random_images(2, seed=7), text=["USER: <image>\n what ? ASSISTANT:"] * 2,
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        features = slim.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        embeds = slim.model.get_input_embeddings()(inputs["input_ids"]).clone()
        embeds[inputs["input_ids"] == IMAGE_TOKEN_ID] = torch.cat(list(features)).to(embeds.dtype)
        settings = {"max_new_tokens": 5, "do_sample": False}
        from_ids = slim.generate(**inputs, **settings)[:, inputs["input_ids"].shape[1]:]
        from_embeds = slim.generate(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], **settings)
    slim.set_compression(NONE)
    assert from_embeds.shape == (2, 5)
    assert torch.equal(from_embeds, from_ids)


def test_feature_select_strategy_is_ignored_under_visionzip(stock_checkpoint):
    default = SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint, compression=VISIONZIP).eval()
    full = SlimLlavaForConditionalGeneration.from_pretrained(
        stock_checkpoint, compression=VISIONZIP, vision_feature_select_strategy="full"
    ).eval()
    assert full.config.vision_feature_select_strategy == "full"
    assert default.image_token_count() == full.image_token_count() == 64
    pixel_values = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        a = default.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
        b = full.model.get_image_features(pixel_values=pixel_values).pooler_output[0]
    assert torch.equal(a, b)
    processor = slim_processor(stock_checkpoint, VISIONZIP)
    processor.vision_feature_select_strategy = "full"
    inputs = processor(images=random_images(1), text=PROMPTS[:1], return_tensors="pt")
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 64
