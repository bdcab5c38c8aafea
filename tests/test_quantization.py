"""bitsandbytes 4-bit / 8-bit on CPU (DESIGN.md "Quantization", transformers_notes.md §9).

The language model is quantised; the vision tower (VisionZip scores come from it), the projector and
lm_head stay `torch.nn.Linear` in full precision unless the user gives their own `llm_int8_skip_modules`.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from builders import random_images, save_stock_checkpoint  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor  # noqa: E402

pytestmark = pytest.mark.quantization

VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}
PROMPTS = ["USER: <image>\n what is the color of the circle ? ASSISTANT:", "USER: <image>\n describe ASSISTANT:"]
MODES = {
    "4bit": ({"load_in_4bit": True}, "bitsandbytes.nn.modules.Linear4bit"),
    "8bit": ({"load_in_8bit": True}, "bitsandbytes.nn.modules.Linear8bitLt"),
}
FULL_PRECISION = ("model.vision_tower.", "model.multi_modal_projector.", "lm_head")


def linear_types(model) -> dict[str, str]:
    return {
        name: f"{type(module).__module__}.{type(module).__name__}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def assert_language_model_quantised_rest_full_precision(types: dict[str, str], quantised_type: str, dtypes: dict[str, str]):
    language = {name: kind for name, kind in types.items() if name.startswith("model.language_model.")}
    assert len(language) == 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert set(language.values()) == {quantised_type}, language
    rest = {name: kind for name, kind in types.items() if name.startswith(FULL_PRECISION)}
    assert len(rest) == 4 * 6 + 2 + 1  # tower: 4 layers x 6 linears; projector: 2; lm_head
    assert set(rest.values()) == {"torch.nn.modules.linear.Linear"}, rest
    assert set(types) == set(language) | set(rest)
    assert {dtypes[name] for name in rest} == {"torch.float32"}


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory):
    """The tiny stock checkpoint with a 64-wide language model: bitsandbytes' CPU 4-bit kernel packs weights in
    blocks of 64 input features and fails on narrower layers (RuntimeError "shape '[32, 0]' is invalid")."""
    return save_stock_checkpoint(tmp_path_factory.mktemp("stock64"), text_hidden=64)


@pytest.fixture(scope="module")
def inputs(stock_checkpoint):
    processor = SlimLlavaProcessor.from_pretrained(stock_checkpoint, compression=VISIONZIP)
    processor.tokenizer.padding_side = "left"
    return processor(images=random_images(2), text=PROMPTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize("mode", MODES)
def test_installed_class_quantises_only_the_language_model(stock_checkpoint, inputs, mode):
    options, quantised_type = MODES[mode]
    model = SlimLlavaForConditionalGeneration.from_pretrained(
        stock_checkpoint, quantization_config=BitsAndBytesConfig(**options), device_map="cpu", compression=VISIONZIP
    ).eval()
    assert model.config.compression == VISIONZIP
    dtypes = {name: str(module.weight.dtype) for name, module in model.named_modules() if type(module) is torch.nn.Linear}
    assert_language_model_quantised_rest_full_precision(linear_types(model), quantised_type, dtypes)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert [f.shape[0] for f in features] == [64, 64]
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert output.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert output[:, -4:].min() >= 0 and output[:, -4:].max() < model.config.text_config.vocab_size


def test_user_skip_list_is_respected(stock_checkpoint, inputs):
    # The user's list replaces the defaults: the projector is quantised, decoder layer 1 is not.
    skip = ["model.vision_tower", "lm_head", "model.language_model.layers.1"]
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    model = SlimLlavaForConditionalGeneration.from_pretrained(
        stock_checkpoint, quantization_config=config, device_map="cpu", compression=VISIONZIP
    ).eval()
    assert config.llm_int8_skip_modules == skip
    types = linear_types(model)
    quantised = "bitsandbytes.nn.modules.Linear8bitLt"
    plain = "torch.nn.modules.linear.Linear"
    assert types["model.multi_modal_projector.linear_1"] == quantised
    assert types["model.language_model.layers.0.self_attn.q_proj"] == quantised
    assert types["model.language_model.layers.1.self_attn.q_proj"] == plain
    assert types["model.language_model.layers.1.mlp.down_proj"] == plain
    assert types["model.vision_tower.encoder.layers.0.self_attn.k_proj"] == plain
    assert types["lm_head"] == plain
    output = model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=None)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2


def test_remote_code_quantises_only_the_language_model(stock_checkpoint, tmp_path):
    from test_remote_code import run_isolated, task

    folder = tmp_path / "slim"
    SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint).save_pretrained(folder)
    SlimLlavaProcessor.from_pretrained(stock_checkpoint, compression=VISIONZIP).save_pretrained(folder)
    image = tmp_path / "image.png"
    random_images(1)[0].save(image)
    tasks = [
        task(folder, image, tmp_path / f"{mode}.safetensors", quantization=MODES[mode][0], kwargs={"compression": VISIONZIP})
        for mode in MODES
    ]
    report = run_isolated(tasks, tmp_path / "isolated")
    assert report["slimvlm_importable"] is False
    for mode, result in zip(MODES, report["results"]):
        assert result["model_class"].startswith("transformers_modules."), result["model_class"]
        assert result["compression"] == result["processor_compression"] == VISIONZIP
        assert result["missing"] == []
        assert len(result["tokens"][0]) == 8
        types = {name: kind for name, kind in result["linear_types"].items()}
        assert_language_model_quantised_rest_full_precision(types, MODES[mode][1], result["linear_dtypes"])
