"""The Slim classes behave like the stock classes under transformers' generic model tests, for every method.

What transformers' own LLaVA model tests exercise (output tuples, hidden states and attentions, the real
`forward` signature, the same init on both construction paths, the cache keyword of the installed release)
is checked here for every Slim class and every compression method, on the installed transformers.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from builders import IMAGE_TOKEN_ID, tiny_llava_config
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, LlavaModel

import slimvlm  # noqa: F401  (registers the Auto classes)
from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaModel, compat
from slimvlm.voco import voco_bounds

METHODS = {
    "none": {"method": "none"},
    "visionzip": {"method": "visionzip", "dominant": 54, "contextual": 10},
    "sparsevlm": {"method": "sparsevlm", "version": "1.5", "layers": [0], "budgets": [64]},
    "voco": {"method": "voco", "num_voco_tokens": 1},
}
VOCO_TOKEN_ID = 5


def slim_model(method: str, attn: str = "sdpa", seed: int = 0) -> SlimLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = SlimLlavaConfig(**tiny_llava_config().to_dict(), compression=METHODS[method], voco_token_id=VOCO_TOKEN_ID)
    config.vision_config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    return SlimLlavaForConditionalGeneration(config).eval()


def prompt(model, batch: int = 2) -> dict:
    """[BOS, image x N, (<voco>), text] rows for `model`'s current compression."""
    count = model.image_token_count()
    voco = [VOCO_TOKEN_ID] if model.config.compression["method"] == "voco" else []
    row = [1] + [IMAGE_TOKEN_ID] * count + voco + [7, 8, 9, 10]
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.tensor([row] * batch),
        "attention_mask": torch.ones(batch, len(row), dtype=torch.long),
        "pixel_values": torch.randn(batch, 3, 48, 48, generator=generator),
    }


@pytest.mark.parametrize("method", METHODS)
def test_get_image_features_return_dict_false_gives_a_tuple(method):
    model = slim_model(method)
    pixel_values = prompt(model)["pixel_values"]
    with torch.no_grad():
        as_dict = model.model.get_image_features(pixel_values=pixel_values)
        as_tuple = model.model.get_image_features(pixel_values=pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert [torch.equal(a, b) for a, b in zip(as_tuple[1], as_dict.pooler_output)] == [True] * len(as_dict.pooler_output)


@pytest.mark.parametrize("method", METHODS)
def test_get_image_features_honours_output_hidden_states_and_attentions(method):
    """The vision tower's hidden states and (eager) attentions come back, equal to the stock model's."""
    model = slim_model(method, attn="eager")
    stock = LlavaModel(tiny_llava_config()).eval()
    stock.load_state_dict(model.model.state_dict())
    stock.vision_tower.config._attn_implementation = "eager"
    pixel_values = prompt(model)["pixel_values"]
    with torch.no_grad():
        slim_out = model.model.get_image_features(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
        stock_out = stock.get_image_features(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
        plain = model.model.get_image_features(pixel_values=pixel_values)
    layers = model.config.vision_config.num_hidden_layers
    assert len(slim_out.hidden_states) == layers + 1 and len(slim_out.attentions) == layers
    for ours, theirs in zip(slim_out.hidden_states + slim_out.attentions, stock_out.hidden_states + stock_out.attentions):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Asking for them does not change the features (VisionZip then runs the whole tower instead of stopping early).
    for ours, theirs in zip(slim_out.pooler_output, plain.pooler_output):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert plain.attentions is None


def parameter_names(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_base_forward_has_the_stock_signature():
    stock = parameter_names(LlavaModel.forward)
    assert parameter_names(SlimLlavaModel.forward)[: len(stock)] == stock
    assert compat.cache_keyword(LlavaModel.forward) in stock
    # transformers and Trainer read these from the signature.
    model = slim_model("none")
    assert parameter_names(model.model.forward)[0] == model.model.main_input_name == "input_ids"
    assert {"input_ids", "pixel_values", "attention_mask", "inputs_embeds"} <= set(parameter_names(model.model.forward))


def test_prepare_inputs_for_generation_shows_the_installed_cache_keyword():
    names = parameter_names(SlimLlavaForConditionalGeneration.prepare_inputs_for_generation)
    assert compat.cache_keyword(LlavaForConditionalGeneration.prepare_inputs_for_generation) in names
    assert "inputs_embeds" in names


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keyword", compat.CACHE_KEYWORDS)
def test_base_forward_accepts_either_cache_keyword_and_returns_tuples(method, keyword):
    model = slim_model(method)
    inputs = prompt(model)
    with torch.no_grad():
        reference = model.model(**inputs, use_cache=True)
        cache = compat.output_cache(reference)
        assert cache is not None and cache.get_seq_length() > 0
        # The next step, cache under either name.
        step = {"input_ids": torch.tensor([[11], [11]]),
                "attention_mask": torch.ones(2, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
        if method == "voco":  # full-mask decoding reads the VoCo span of the full rows (generate() passes it)
            step["voco_bounds"] = voco_bounds(torch.cat([inputs["input_ids"], step["input_ids"]], 1) == VOCO_TOKEN_ID)
        out = model.model(**step, **{keyword: cache}, use_cache=True)
        as_tuple = model.model(**inputs, return_dict=False)
    assert out.last_hidden_state.shape[1] == 1
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], reference.last_hidden_state, rtol=0, atol=0)


def deprecation_messages(module, **inputs) -> list[str]:
    """The FutureWarnings `module(**inputs)` gives, its class name written as <class>."""
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        module(**inputs)
    return [str(w.message).replace(type(module).__name__, "<class>") for w in caught if w.category is FutureWarning]


@pytest.mark.parametrize("method", ["none", "sparsevlm"])
def test_base_forward_warns_on_the_deprecated_cache_keyword_as_stock_does(method):
    from transformers import DynamicCache

    model = slim_model(method)
    stock = LlavaModel(model.config).eval()
    stock.load_state_dict(model.model.state_dict())
    inputs = prompt(model, batch=1)
    expected = deprecation_messages(stock, **inputs, past_key_values=DynamicCache(config=model.config.text_config))
    got = deprecation_messages(model.model, **inputs, past_key_values=DynamicCache(config=model.config.text_config))
    assert got == expected
    if compat.cache_keyword(LlavaModel.forward) == "cache":  # transformers >= 5.24 deprecates past_key_values=
        assert len(got) == 1 and "past_key_values" in got[0] and "<class>.forward" in got[0]
    assert deprecation_messages(model.model, **inputs, **{compat.cache_keyword(LlavaModel.forward): None}) == []


@pytest.mark.parametrize("method", METHODS)
def test_full_model_return_dict_false_and_hidden_states(method):
    model = slim_model(method)
    inputs = prompt(model)
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.logits, rtol=0, atol=0)
    if method == "sparsevlm":
        # Pruning shortens the sequence layer by layer: refused with a clear error instead of a silent None.
        with pytest.raises(ValueError, match="output_hidden_states=True is not supported under SparseVLM"):
            model(**inputs, output_hidden_states=True)
        return
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1


@pytest.mark.parametrize("method", METHODS)
def test_generation_passes_the_cache_under_the_installed_keyword(method):
    """No deprecation warning per step: the cache travels under the keyword the installed transformers declares."""
    model = slim_model(method)
    inputs = prompt(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    messages = [str(w.message) for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert messages == []


def test_one_element_feature_layer_list_is_accepted_under_visionzip():
    as_int = slim_model("visionzip")
    config = SlimLlavaConfig(**{**as_int.config.to_dict(), "vision_feature_layer": [-2]})
    as_list = SlimLlavaForConditionalGeneration(config).eval()
    as_list.load_state_dict(as_int.state_dict())
    pixel_values = prompt(as_int)["pixel_values"]
    with torch.no_grad():
        expected = as_int.model.get_image_features(pixel_values=pixel_values)
        for features in (
            as_list.model.get_image_features(pixel_values=pixel_values),
            as_int.model.get_image_features(pixel_values=pixel_values, vision_feature_layer=[-2]),
        ):
            assert torch.equal(features.dominant_indices, expected.dominant_indices)
            torch.testing.assert_close(features.pooler_output[0], expected.pooler_output[0], rtol=0, atol=0)


def test_multi_layer_feature_list_is_refused_when_the_config_is_validated():
    base = tiny_llava_config().to_dict()
    with pytest.raises(ValueError, match=r"single vision_feature_layer.*\[-2, -1\]"):
        SlimLlavaConfig(**{**base, "vision_feature_layer": [-2, -1]}, compression=METHODS["visionzip"])
    config = SlimLlavaConfig(**{**base, "vision_feature_layer": [-2, -1]})
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        config.compression = METHODS["visionzip"]
    config = SlimLlavaConfig(**base, compression=METHODS["visionzip"])
    with pytest.raises(ValueError, match="single vision_feature_layer"):
        config.vision_feature_layer = [-3, -2]
    assert config.vision_feature_layer == -2  # nothing half-set
    # Other methods keep the stock multi-layer behaviour.
    SlimLlavaConfig(**{**base, "vision_feature_layer": [-2, -1]}, compression=METHODS["sparsevlm"])


def test_missing_tower_weights_are_initialised_as_by_the_stock_class(tmp_path):
    """A checkpoint without vision-tower weights: the Slim class fills them exactly as the stock class does."""
    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "vision_tower" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    towers = {}
    for cls in (LlavaForConditionalGeneration, SlimLlavaForConditionalGeneration):
        torch.manual_seed(1)
        towers[cls] = cls.from_pretrained(tmp_path).model.vision_tower.state_dict()
    for name, value in towers[LlavaForConditionalGeneration].items():
        assert torch.equal(value, towers[SlimLlavaForConditionalGeneration][name]), name
    # ... and with the tower's own init scheme, as `__init__` gives (CLIP draws q_proj with std ~ width^-0.5 here,
    # not the generic 0.02).
    torch.manual_seed(1)
    fresh = SlimLlavaForConditionalGeneration(SlimLlavaConfig(**tiny_llava_config().to_dict())).model.vision_tower
    loaded_std = towers[SlimLlavaForConditionalGeneration]["encoder.layers.0.self_attn.q_proj.weight"].std()
    fresh_std = fresh.encoder.layers[0].self_attn.q_proj.weight.std()
    assert abs(float(loaded_std / fresh_std) - 1) < 0.15


def test_a_decoder_layer_call_that_leaves_the_cache_empty_raises(monkeypatch):
    """If the keyword a layer reads the cache under changes again, SparseVLM raises instead of returning wrong numbers."""
    model = slim_model("sparsevlm")
    inputs = prompt(model)
    with torch.no_grad():
        model(**inputs)  # works with the detected keyword
    detected = compat.cache_keyword
    # What a renamed decoder-layer keyword looks like to us: the layer takes our keyword into **kwargs.
    monkeypatch.setattr(compat, "cache_keyword", lambda fn: "kv_cache" if "DecoderLayer" in fn.__qualname__ else detected(fn))
    with pytest.raises(compat.TransformersCompatError, match=r"no longer writes the cache.*transformers \d"), torch.no_grad():
        model(**inputs)


def test_run_decoder_layer_detects_a_wrong_keyword(monkeypatch):
    from transformers import DynamicCache

    model = slim_model("none")
    language_model = model.model.language_model
    hidden = torch.randn(1, 4, model.config.text_config.hidden_size)
    positions = torch.arange(4)[None]
    cos_sin = language_model.rotary_emb(hidden, positions)
    cache = DynamicCache(config=model.config.text_config)
    arguments = dict(cache=cache, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
    compat.run_decoder_layer(language_model.layers[0], hidden, **arguments)
    assert cache.get_seq_length(0) == 4
    wrong = "past_key_values" if compat.cache_keyword(type(language_model.layers[0]).forward) == "cache" else "cache"
    monkeypatch.setattr(compat, "cache_keyword", lambda fn: wrong + "_renamed")
    with pytest.raises(compat.TransformersCompatError, match="left the KV cache of layer 1 at 0 tokens"):
        compat.run_decoder_layer(language_model.layers[1], hidden, **arguments)


def test_untested_transformers_warns_once_and_names_the_range():
    compat._forget_untested_warning()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.warn_if_untested("9.0.0") is True
        compat.warn_if_untested("9.0.0")
        assert compat.warn_if_untested(compat.TESTED_TRANSFORMERS_MIN) is False
    assert len(caught) == 1 and compat.TESTED_RANGE in str(caught[0].message)
    assert compat.is_tested_version()  # the suite runs on a tested release


def test_cache_keyword_prefers_cache_when_a_signature_shows_both():
    """The documented rule (compat.CACHE_KEYWORDS): 'cache' whenever present, else 'past_key_values', else raise."""
    from transformers.masking_utils import create_causal_mask
    from transformers.utils.deprecation import deprecate_kwarg

    def both(x, past_key_values=None, cache=None):  # the deprecated name first: the order of parameters is not the rule
        return x

    def new(x, cache=None):
        return x

    def old(x, past_key_values=None):
        return x

    def neither(x, kv=None):
        return x

    assert compat.CACHE_KEYWORDS == ("cache", "past_key_values")
    assert compat.choose_cache_keyword(["past_key_values", "cache"]) == "cache"
    assert compat.cache_keyword(both) == "cache"
    assert compat.cache_keyword(new) == "cache"
    assert compat.cache_keyword(old) == "past_key_values"
    with pytest.raises(compat.TransformersCompatError, match="neither of \\['cache', 'past_key_values'\\]"):
        compat.cache_keyword(neither)
    if "expose_in_signature" in inspect.signature(deprecate_kwarg).parameters:  # transformers >= 5.25
        exposed = deprecate_kwarg("past_key_values", "99.0.0", new_name="cache", expose_in_signature=True)(new)
        assert {"cache", "past_key_values"} <= set(inspect.signature(exposed).parameters)
        assert compat.cache_keyword(exposed) == "cache"
    names = set(inspect.signature(create_causal_mask).parameters)
    assert compat.cache_keyword(create_causal_mask) == ("cache" if "cache" in names else "past_key_values")


def test_the_tested_range_is_the_same_in_pyproject_compat_and_the_readme():
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in dependencies if d.startswith("transformers"))
    low, high = re.fullmatch(r"transformers>=([\d.]+),<([\d.]+)", pinned).groups()
    assert compat.TESTED_TRANSFORMERS_MIN.startswith(low) and compat.TESTED_TRANSFORMERS_BELOW == high
    readme = (root / "README.md").read_text()
    assert f"Tested: **transformers >= {low}, < {high}**" in readme
    assert f'pip install "transformers>={low},<{high}"' in readme
    assert compat.is_tested_version()  # the suite runs on a tested release
