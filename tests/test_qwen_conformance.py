"""The Qwen-VL Slim classes behave like the stock classes under the calls transformers and users make: stock
signatures, return_dict=False tuples, output_hidden_states, either cache keyword, generation without cache warnings."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from qwen_builders import prompt, qwen2_5_config, qwen3_config, qwen_image_processor, qwen_tokenizer, random_image
from transformers import Qwen2_5_VLModel, Qwen3VLModel

from slimvlm import compat
from slimvlm import (SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, SlimQwen2_5_VLProcessor,
                     SlimQwen3VLConfig, SlimQwen3VLForConditionalGeneration, SlimQwen3VLProcessor)

FAMILIES = {
    "qwen2_5_vl": (qwen2_5_config, SlimQwen2_5_VLConfig, SlimQwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel, 14,
                   SlimQwen2_5_VLProcessor),
    "qwen3_vl": (qwen3_config, SlimQwen3VLConfig, SlimQwen3VLForConditionalGeneration, Qwen3VLModel, 16,
                 SlimQwen3VLProcessor),
}
METHODS = {"none": {"method": "none"}, "visionzip": {"method": "visionzip", "retain_ratio": 0.5},
           "sparsevlm": {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [200]}}
CASES = [(family, method) for family in FAMILIES for method in METHODS]


def build(family, method):
    make_config, config_class, model_class, _, patch, processor_class = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**make_config().to_dict(), compression=METHODS[method])).eval()
    tokenizer = qwen_tokenizer()
    tokenizer.padding_side = "left"
    processor = processor_class(image_processor=qwen_image_processor(patch_size=patch), tokenizer=tokenizer,
                                        compression=METHODS[method])
    inputs = processor(images=[random_image(56, 84, 1), random_image(112, 112, 2)],
                       text=[prompt(), prompt(before="w4 w5 w6 w7")], padding=True, return_tensors="pt")
    return model, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_base_forward_has_the_stock_signature(family):
    stock_class = FAMILIES[family][3]
    model, _ = build(family, "none")
    stock = list(inspect.signature(stock_class.forward).parameters)
    assert list(inspect.signature(type(model.model).forward).parameters)[: len(stock)] == stock


@pytest.mark.parametrize("family,method", CASES)
def test_return_dict_false_hidden_states_and_either_cache_keyword(family, method):
    model, inputs = build(family, method)
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=False)
        assert isinstance(as_tuple, tuple) and isinstance(features, tuple)
        torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)
        if method == "sparsevlm":
            with pytest.raises(ValueError, match="not supported under SparseVLM"):
                model(**inputs, output_hidden_states=True)
        else:
            hidden = model(**inputs, output_hidden_states=True).hidden_states
            assert len(hidden) == model.config.text_config.num_hidden_layers + 1
        for keyword in compat.CACHE_KEYWORDS:
            prefill = model(**inputs, use_cache=True)
            cache = compat.output_cache(prefill)
            length = inputs["input_ids"].shape[1]
            step = {"input_ids": torch.tensor([[11], [11]]),
                    "attention_mask": torch.ones(2, length + 1, dtype=torch.long)}
            positions = model.model.rope_deltas + inputs["attention_mask"].sum(-1, keepdim=True)  # last + 1
            step["position_ids"] = positions.view(1, 2, 1).expand(3, -1, -1)
            out = model(**step, **{keyword: cache}, use_cache=True)
            assert out.logits.shape[:2] == (2, 1)


@pytest.mark.parametrize("family,method", CASES)
def test_generation_passes_the_cache_under_the_installed_keyword(family, method):
    model, inputs = build(family, method)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)] == []
