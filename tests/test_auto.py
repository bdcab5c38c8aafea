"""AutoSlimModel / AutoSlimProcessor pick the Slim family from a stock or slim checkpoint's config."""

from __future__ import annotations

import json

import pytest
import torch
from builders import make_next_processor, make_processor, next_images, tiny_llava_config, tiny_llava_next_config
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

from slimvlm import (
    AutoSlimModel,
    AutoSlimProcessor,
    SlimLlavaForConditionalGeneration,
    SlimLlavaNextForConditionalGeneration,
    SlimLlavaNextProcessor,
    SlimLlavaProcessor,
)
from slimvlm.cli import main

VISIONZIP = {"method": "visionzip", "dominant": 10, "contextual": 3}


@pytest.fixture(scope="module")
def stock_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(tiny_llava_config()).save_pretrained(root / "llava")
    make_processor().save_pretrained(root / "llava")
    LlavaNextForConditionalGeneration(tiny_llava_next_config()).save_pretrained(root / "next")
    make_next_processor().save_pretrained(root / "next")
    return root


@pytest.mark.parametrize("family, model_class, processor_class", [
    ("llava", SlimLlavaForConditionalGeneration, SlimLlavaProcessor),
    ("next", SlimLlavaNextForConditionalGeneration, SlimLlavaNextProcessor),
])
def test_stock_and_slim_checkpoints_load_into_their_family(stock_folders, tmp_path, family, model_class, processor_class):
    model = AutoSlimModel.from_pretrained(stock_folders / family, compression=VISIONZIP)
    processor = AutoSlimProcessor.from_pretrained(stock_folders / family, compression=model.config.compression)
    assert type(model) is model_class and type(processor) is processor_class
    assert model.config.compression == VISIONZIP == processor.compression
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    again = AutoSlimModel.from_pretrained(tmp_path)  # a slim checkpoint keeps its own compression
    assert type(again) is model_class and again.config.compression == VISIONZIP


def test_unsupported_model_type_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert'.*supported: .*'llava_next'"):
        AutoSlimModel.from_pretrained(tmp_path)


def test_cli_converts_and_answers_with_a_llava_next_checkpoint(stock_folders, tmp_path, capsys):
    out = tmp_path / "slim-next"
    assert main(["convert", str(stock_folders / "next"), str(out), "--compression", json.dumps(VISIONZIP),
                 "--base-model", "llava-hf/llava-v1.6-vicuna-7b-hf"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "slim_llava_next"
    next_images([(2, 2)])[0].save(tmp_path / "image.png")
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--image", str(tmp_path / "image.png"), "--question", "what",
                 "--max-new-tokens", "2"]) == 0
    assert "visual tokens" in capsys.readouterr().err
