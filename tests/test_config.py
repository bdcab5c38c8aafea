"""The compression config (DESIGN.md "Public API", specs/visionzip.md §1 and A1).

`config.compression` is a plain dict, validated whenever it is assigned: in the constructor, by
`from_pretrained(..., compression=...)` and by `set_compression` on the model and the processor.
"""

from __future__ import annotations

import json

import pytest
from builders import make_processor, tiny_llava_config

from slimvlm import SlimLlavaConfig, SlimLlavaForConditionalGeneration, SlimLlavaProcessor, normalize_compression
from slimvlm import split_visionzip_tokens

TOKENS_PER_VIEW = 577  # CLS + 24x24 patches of the tiny tower (image 48, patch 2)


def slim_config(compression=None, **kwargs) -> SlimLlavaConfig:
    return SlimLlavaConfig.from_dict(tiny_llava_config(**kwargs).to_dict(), compression=compression)


# --- validation errors ------------------------------------------------------------------------------

VALUE_ERRORS = [
    # (compression, words the message must contain)
    ({"method": "fastv"}, ["method", "fastv"]),
    ({"method": None}, ["method", "None"]),
    ({}, ["method"]),
    ({"method": "none", "dominant": 54}, ["dominant", "none"]),
    ({"method": "visionzip", "dominant": 54, "contextual": 10, "ratio": 0.5}, ["ratio"]),
    ({"method": "visionzip", "dominant": 54}, ["contextual"]),
    ({"method": "visionzip", "contextual": 10}, ["dominant"]),
    ({"method": "visionzip"}, ["dominant", "contextual", "tokens"]),
    ({"method": "visionzip", "dominant": 0, "contextual": 10}, ["dominant", "0"]),
    ({"method": "visionzip", "dominant": -3, "contextual": 10}, ["dominant", "-3"]),
    ({"method": "visionzip", "dominant": 54, "contextual": 0}, ["contextual", "0"]),
    ({"method": "visionzip", "dominant": 54, "contextual": -1}, ["contextual", "-1"]),
    ({"method": "visionzip", "dominant": 570, "contextual": 8}, ["570", "8", "578", "577"]),
    ({"method": "visionzip", "tokens": 64, "dominant": 54}, ["tokens", "dominant"]),
    ({"method": "visionzip", "tokens": 64, "contextual": 10}, ["tokens", "contextual"]),
    ({"method": "visionzip", "tokens": 1}, ["tokens", "1"]),
]


@pytest.mark.parametrize("compression, words", VALUE_ERRORS, ids=lambda x: json.dumps(x) if isinstance(x, dict) else None)
def test_invalid_values_raise_value_error_naming_field_and_value(compression, words):
    with pytest.raises(ValueError) as error:
        normalize_compression(compression, tokens_per_view=TOKENS_PER_VIEW)
    for word in words:
        assert word in str(error.value), f"{word!r} not named in: {error.value}"
    # The config validates on construction with the same rules (the bound comes from its vision tower).
    with pytest.raises(ValueError):
        slim_config(compression)


NON_INTEGERS = [
    ("dominant", 54.0),
    ("dominant", "54"),
    ("dominant", True),
    ("dominant", None),
    ("contextual", 10.5),
    ("contextual", False),
    ("contextual", [10]),
]


@pytest.mark.parametrize("field, value", NON_INTEGERS)
def test_non_integer_counts_raise_naming_field_and_value(field, value):
    compression = {"method": "visionzip", "dominant": 54, "contextual": 10, field: value}
    # specs/visionzip.md A1 asks for ValueError; a wrong type is also a TypeError in Python's sense.
    for error_class in (ValueError, TypeError):
        with pytest.raises(error_class) as error:
            normalize_compression(compression, tokens_per_view=TOKENS_PER_VIEW)
        assert field in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("value", [True, 64.0, "64"])
def test_non_integer_total_raises(value):
    with pytest.raises((ValueError, TypeError)) as error:
        normalize_compression({"method": "visionzip", "tokens": value})
    assert "tokens" in str(error.value) and repr(value) in str(error.value)


@pytest.mark.parametrize("compression", ["visionzip", ["method", "none"], 64, ("none",)])
def test_not_a_dict_raises_type_error(compression):
    with pytest.raises(TypeError) as error:
        normalize_compression(compression)
    assert "dict" in str(error.value) and repr(compression) in str(error.value)
    with pytest.raises(TypeError):
        slim_config(compression)


# --- accepted values ------------------------------------------------------------------------------


@pytest.mark.parametrize("total, dominant, contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30), (32, 27, 5), (17, 14, 3), (160, 135, 25)])
def test_total_only_uses_the_paper_split(total, dominant, contextual):
    assert split_visionzip_tokens(total) == (dominant, contextual)
    expected = {"method": "visionzip", "dominant": dominant, "contextual": contextual}
    assert normalize_compression({"method": "visionzip", "tokens": total}) == expected
    assert slim_config({"method": "visionzip", "tokens": total}).compression == expected


def test_the_official_default_191_30_is_not_ours():
    assert split_visionzip_tokens(221) != (191, 30)


def test_dominant_plus_contextual_may_equal_tokens_per_view():
    compression = {"method": "visionzip", "dominant": 570, "contextual": 7}
    assert slim_config(compression).compression == compression


def test_smallest_split():
    assert slim_config({"method": "visionzip", "dominant": 1, "contextual": 1}).compression["dominant"] == 1


def test_default_is_none():
    assert SlimLlavaConfig().compression == {"method": "none"}
    assert slim_config().compression == {"method": "none"}
    assert normalize_compression(None) == {"method": "none"}


def test_normalisation_returns_a_new_dict():
    given = {"method": "visionzip", "tokens": 64}
    assert normalize_compression(given) is not given
    assert given == {"method": "visionzip", "tokens": 64}


# --- persistence ----------------------------------------------------------------------------------

VISIONZIP = {"method": "visionzip", "dominant": 108, "contextual": 20}


def test_compression_survives_to_dict_from_dict_and_json():
    config = slim_config(VISIONZIP)
    as_dict = config.to_dict()
    assert as_dict["compression"] == VISIONZIP and as_dict["model_type"] == "slim_llava"
    assert SlimLlavaConfig.from_dict(as_dict).compression == VISIONZIP
    assert json.loads(config.to_json_string())["compression"] == VISIONZIP


def test_compression_survives_save_and_load(tmp_path):
    slim_config(VISIONZIP).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["compression"] == VISIONZIP
    loaded = SlimLlavaConfig.from_pretrained(tmp_path)
    assert loaded.compression == VISIONZIP
    assert loaded.vision_config.image_size == 48 and loaded.text_config.num_hidden_layers == 2


def test_from_pretrained_compression_kwarg_is_validated(tmp_path):
    slim_config().save_pretrained(tmp_path)
    assert SlimLlavaConfig.from_pretrained(tmp_path, compression={"method": "visionzip", "tokens": 64}).compression == {
        "method": "visionzip",
        "dominant": 54,
        "contextual": 10,
    }
    with pytest.raises(ValueError, match="dominant"):
        SlimLlavaConfig.from_pretrained(tmp_path, compression={"method": "visionzip", "dominant": 0, "contextual": 10})
    with pytest.raises(ValueError, match="577"):
        SlimLlavaConfig.from_pretrained(tmp_path, compression={"method": "visionzip", "dominant": 577, "contextual": 1})


def test_model_from_pretrained_validates_compression(stock_checkpoint):
    with pytest.raises(ValueError, match="contextual"):
        SlimLlavaForConditionalGeneration.from_pretrained(
            stock_checkpoint, compression={"method": "visionzip", "dominant": 54, "contextual": 0}
        )


def test_stock_llava_config_loads_and_saves_as_slim(stock_checkpoint, tmp_path):
    stock = json.loads((stock_checkpoint / "config.json").read_text())
    assert stock["model_type"] == "llava" and "compression" not in stock
    config = SlimLlavaConfig.from_pretrained(stock_checkpoint)
    assert config.compression == {"method": "none"}
    assert config.vision_config.to_dict()["image_size"] == stock["vision_config"]["image_size"]
    assert config.text_config.hidden_size == stock["text_config"]["hidden_size"]
    assert config.image_token_id == stock["image_token_index"]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "slim_llava"
    assert saved["compression"] == {"method": "none"}


# --- set_compression --------------------------------------------------------------------------------


def test_set_compression_on_model_validates():
    model = SlimLlavaForConditionalGeneration(slim_config())
    assert model.set_compression({"method": "visionzip", "tokens": 32}) is model
    assert model.config.compression == {"method": "visionzip", "dominant": 27, "contextual": 5}
    assert model.image_token_count() == 32
    for bad in ({"method": "visionzip", "dominant": 600, "contextual": 10}, {"method": "foo"}, {"method": "visionzip", "dominant": 1.5, "contextual": 2}):
        with pytest.raises(ValueError):
            model.set_compression(bad)
    assert model.config.compression == {"method": "visionzip", "dominant": 27, "contextual": 5}  # unchanged
    with pytest.raises(TypeError):
        model.set_compression("visionzip")
    model.set_compression(None)
    assert model.config.compression == {"method": "none"} and model.image_token_count() == 576


def test_set_compression_on_processor_validates(tmp_path):
    make_processor().save_pretrained(tmp_path)
    processor = SlimLlavaProcessor.from_pretrained(tmp_path, compression={"method": "visionzip", "tokens": 64})
    assert processor.compression == {"method": "visionzip", "dominant": 54, "contextual": 10}
    assert processor.set_compression({"method": "none"}) is processor
    assert processor.compression == {"method": "none"}
    for bad in ({"method": "foo"}, {"method": "visionzip", "dominant": 0, "contextual": 1}, {"method": "visionzip", "dominant": True, "contextual": 1}):
        with pytest.raises(ValueError):
            processor.set_compression(bad)
    with pytest.raises(TypeError):
        processor.set_compression(["none"])
    # Bounded like the model: a 48-px image with 2-px patches has 1 + 24 * 24 = 577 tokens per view.
    assert processor.set_compression({"method": "visionzip", "dominant": 570, "contextual": 7}).compression["dominant"] == 570
    with pytest.raises(ValueError, match="578"):
        processor.set_compression({"method": "visionzip", "dominant": 570, "contextual": 8})
    with pytest.raises(ValueError):
        SlimLlavaProcessor.from_pretrained(tmp_path, compression={"method": "visionzip", "dominant": 54})


@pytest.mark.parametrize("config_class, refused", [
    ("SlimQwen2_5_VLConfig", ("cdpruner", "divprune")),
    ("SlimQwen3VLConfig", ("voco", "cdpruner", "divprune")),
])
def test_a_family_refuses_the_methods_it_does_not_run_yet(config_class, refused):
    """A method a family has not wired must raise, never run the stock model under a compressed name."""
    import slimvlm

    settings = {"voco": {"method": "voco", "num_voco_tokens": 1}, "divprune": {"method": "divprune", "tokens": 8},
                "cdpruner": {"method": "cdpruner", "tokens": 8, "relevance": "llm_embeddings"}}
    config = getattr(slimvlm, config_class)(compression={"method": "sparsevlm", "version": "1.5", "retained_tokens": 64})
    for method in refused:
        with pytest.raises(ValueError, match=rf"compression method '{method}' is not available for {config_class} yet; "
                                             r"use one of \['none', 'visionzip', 'sparsevlm'"):
            config.compression = settings[method]
        assert config.compression["method"] == "sparsevlm"  # unchanged
        with pytest.raises(ValueError, match="is not available"):
            getattr(slimvlm, config_class)(compression=settings[method])
