"""The `slimvlm` command line, stock -> slim conversion, and model cards."""

import json

import pytest
import torch

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.cli import BUNDLED_MODEL, build_parser, main
from slimvlm.configuration_slimvlm import SPARSEVLM_BUDGETS, normalize_compression, sparsevlm_setting
from slimvlm.conversion.slim_checkpoint import convert_to_slim
from slimvlm.hub_cards import model_card, push_to_hub


def test_convert_writes_a_complete_slim_checkpoint(stock_checkpoint, tmp_path):
    out = convert_to_slim(stock_checkpoint, tmp_path / "slim", {"method": "visionzip", "tokens": 64}, base_model="llava-hf/llava-1.5-7b-hf")
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "modeling_llava.py",
            "configuration_slimvlm.py", "visionzip.py", "processing_slimvlm.py"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slim_llava"
    assert config["compression"] == {"method": "visionzip", "dominant": 54, "contextual": 10}
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_llava.SlimLlavaForConditionalGeneration"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "library_name: transformers" in card
    assert "base_model: llava-hf/llava-1.5-7b-hf" in card and "- visionzip" in card
    assert "54 dominant" in card and "64 visual tokens per image" in card
    # Nothing but the output folder was created next to it (the staging folder was moved, not copied).
    assert [p.name for p in (tmp_path).iterdir()] == ["slim"]

    model, info = SlimLlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stock = SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert SlimLlavaProcessor.from_pretrained(out).compression == model.config.compression


def test_convert_with_bad_compression_writes_nothing(stock_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="dominant"):
        convert_to_slim(stock_checkpoint, tmp_path / "slim", {"method": "visionzip", "dominant": 600, "contextual": 10})
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_existing_output(stock_checkpoint, tmp_path):
    (tmp_path / "slim").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_slim(stock_checkpoint, tmp_path / "slim", {"method": "none"})


def test_cli_convert_and_generate(stock_checkpoint, tmp_path, capsys):
    from builders import random_images

    image = tmp_path / "img.png"
    random_images(1)[0].save(image)
    assert main(["convert", str(stock_checkpoint), str(tmp_path / "slim"), "--compression", '{"method": "visionzip", "tokens": 32}']) == 0
    assert main(["generate", "--model", str(tmp_path / "slim"), "--image", str(image), "--question", "what is this ?",
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "visual tokens 32" in err


def test_cli_rejects_bad_compression_json(stock_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="JSON"):
        main(["convert", str(stock_checkpoint), str(tmp_path / "x"), "--compression", "{method: visionzip}"])


def test_model_card_for_trained_voco_weights_says_finetune():
    card = model_card(base_model="llava-hf/llava-1.5-7b-hf", compression={"method": "voco", "num_voco_tokens": 2}, tokens_per_image=576)
    assert "base_model_relation: finetune" in card and "- voco-llama" in card and "2 <voco> token(s)" in card


def test_push_refuses_folder_without_card(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model card"):
        push_to_hub(tmp_path, "user/repo")


def test_parser_lists_every_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"demo", "generate", "convert", "export", "push"}


@pytest.mark.parametrize("depth", [4, 8, 16, 32])
def test_demo_sparsevlm_setting_is_valid_for_the_model_depth(depth):
    for preset in (192, 64):
        setting = normalize_compression(sparsevlm_setting(depth, preset), num_text_layers=depth)
        assert setting["layers"][-1] < depth
        if depth == 32:
            assert setting["retained_tokens"] == preset and setting["layers"] == [2, 6, 15]
        else:
            assert setting["budgets"] == list(SPARSEVLM_BUDGETS["1.5"][preset][: len(setting["layers"])])


@pytest.mark.skipif(not (BUNDLED_MODEL / "config.json").exists(), reason="bundled demo model not present")
def test_demo_runs_offline_on_the_bundled_model(capsys):
    assert main(["demo", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "none (576 tokens)" in out and "visionzip 64: visual tokens 64" in out
    assert "x vs uncompressed" in out


@pytest.mark.parametrize("depth", [1, 2, 3, 8, 15, 16])
def test_sparsevlm_preset_on_another_depth_shows_a_setting_that_fits(depth):
    with pytest.raises(ValueError, match="presets are defined for 32-layer language models") as error:
        normalize_compression({"method": "sparsevlm", "retained_tokens": 64}, num_text_layers=depth)
    assert "compression['layers']" not in str(error.value)  # the user never gave layers
    suggested = json.loads(str(error.value).split("e.g. ")[1])
    assert suggested == sparsevlm_setting(depth, 64)
    assert normalize_compression(suggested, num_text_layers=depth)["layers"][-1] < depth
