"""Static caches and torch.compile: on an accelerator, generate() compiles the decoding forward by itself (a static
cache and the default CompileConfig); `compile_config._compile_all_devices = True` takes the same path on CPU.

The Slim forward must trace without graph breaks (fullgraph=True) and give the eager tokens. The compile tests
trace with Dynamo (fullgraph) and run the traced graph with the "eager" backend (inductor's CPU code generation
would cost ~20 s a test): every family, and the two decoding paths that differ, the stock one (none; VisionZip
decodes the same way) and VoCo's full-mask decoding. SparseVLM needs a dynamic cache and refuses a static one.
"""

from __future__ import annotations

import pytest
import torch
from builders import sharpen_language_model
from test_conformance import prompt, slim_model
from transformers import CompileConfig

from slimvlm import SlimLlavaModel

SETTINGS = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)


def model_and_batch(method: str):
    model = slim_model(method)
    sharpen_language_model(model)  # masking and position errors must show in the logits
    inputs = prompt(model)
    inputs["attention_mask"][1, :2] = 0  # row 1 left-padded
    return model, inputs


def assert_same_generation(out, reference):
    assert out.sequences.tolist() == reference.sequences.tolist()
    for step, (got, expected) in enumerate(zip(out.logits, reference.logits)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("method", ["none", "visionzip", "voco"])
def test_static_cache_generates_what_the_dynamic_cache_generates(method):
    """generate() builds a 4-D mask itself for a static cache: under VoCo it must be the VoCo mask."""
    model, inputs = model_and_batch(method)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **SETTINGS)
        static = model.generate(**inputs, cache_implementation="static", **SETTINGS)
    assert_same_generation(static, dynamic)


def test_sparsevlm_refuses_a_static_cache():
    model, inputs = model_and_batch("sparsevlm")
    with pytest.raises(ValueError, match="needs a dynamic cache; got StaticCache"):
        model.generate(**inputs, cache_implementation="static", **SETTINGS)


def test_the_forward_binds_arguments_as_the_stock_signature():
    """The base forward binds positional and keyword arguments itself (no Signature.bind inside a traced call)."""
    model = slim_model("none")
    inputs = prompt(model, batch=1)
    with torch.no_grad():
        by_name = model.model(**inputs).last_hidden_state
        by_position = model.model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(by_position.last_hidden_state, by_name, rtol=0, atol=0)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model.model(inputs["input_ids"], input_ids=inputs["input_ids"])
    with pytest.raises(TypeError, match="positional arguments"):
        model.model(*[None] * 40)
    assert SlimLlavaModel._stock_cache_keyword in ("cache", "past_key_values")


def family_model_and_inputs(family: str, method: str):
    """A tiny model of `family` and one sample (VoCo: with its VoCo group; Video-LLaVA: a video)."""
    from builders import random_images
    from slimvlm.voco import build_voco_prompt

    if family == "llava":
        return model_and_batch(method)
    compression = {"none": {"method": "none"}, "voco": {"method": "voco", "num_voco_tokens": 2}}[method]
    text = build_voco_prompt("what is the color ?") if method == "voco" else "USER: <image>\n describe the image ASSISTANT:"
    if family == "llava_next":
        from test_llava_next import slim_next, slim_processor

        model, processor = slim_next(compression), slim_processor(compression)
        media = {"images": random_images(1, 30, seed=3)}
    elif family == "mini_gemini":
        from builders import make_mgm_processor
        from test_mini_gemini import slim_mgm

        model, processor = slim_mgm(compression), make_mgm_processor(False, compression)
        media = {"images": random_images(1, 30, seed=3)}
    else:
        from builders import random_video
        from test_video_llava import slim_processor as video_processor, slim_video, voco_video_processor

        model = slim_video(compression)
        processor = voco_video_processor(2) if method == "voco" else video_processor(compression)
        text = text.replace("<image>", "<video>")
        media = {"videos": [random_video(4, seed=1)]}
    model.config.voco_token_id = 5
    sharpen_language_model(model)
    return model, processor(text=[text], return_tensors="pt", **media)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava", "mini_gemini"])
@pytest.mark.parametrize("method", ["none", "voco"])
def test_compiled_decoding_with_fullgraph_equals_eager(family, method):
    model, inputs = family_model_and_inputs(family, method)
    # Dynamo's tracing is what breaks on a graph break (fullgraph=True raises); the "eager" backend runs the traced
    # graph without inductor's code generation, which would cost ~20 s per test on CPU.
    config = CompileConfig(fullgraph=True, backend="eager")
    config._compile_all_devices = True  # compile on CPU too, as generate() does on an accelerator
    with torch.no_grad():
        eager = model.generate(**inputs, **SETTINGS)
        compiled = model.generate(**inputs, cache_implementation="static", compile_config=config, **SETTINGS)
    assert_same_generation(compiled, eager)
