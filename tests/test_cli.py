"""The `slimvlm` command line, stock -> slim conversion, and model cards."""

import json

import pytest
import torch

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.cli import BUNDLED_MODEL, build_parser, main
from slimvlm.configuration_slimvlm import SPARSEVLM_BUDGETS, normalize_compression, sparsevlm_setting
from slimvlm.conversion.slim_checkpoint import convert_to_slim
from slimvlm.hub_cards import model_card, push_to_hub

HUB_ID = "llava-hf/llava-1.5-7b-hf"


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
    assert "base_model_relation" not in card  # training-free: the base model repacked
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
        convert_to_slim(stock_checkpoint, tmp_path / "slim", {"method": "visionzip", "dominant": 600, "contextual": 10},
                        base_model=HUB_ID)
    assert list(tmp_path.iterdir()) == []


def test_convert_refuses_existing_output(stock_checkpoint, tmp_path):
    (tmp_path / "slim").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_slim(stock_checkpoint, tmp_path / "slim", {"method": "none"})


def test_cli_convert_and_generate(stock_checkpoint, tmp_path, capsys):
    from builders import random_images

    image = tmp_path / "img.png"
    random_images(1)[0].save(image)
    assert main(["convert", str(stock_checkpoint), str(tmp_path / "slim"), "--compression", '{"method": "visionzip", "tokens": 32}',
                 "--base-model", HUB_ID]) == 0
    assert main(["generate", "--model", str(tmp_path / "slim"), "--image", str(image), "--question", "what is this ?",
                 "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "visual tokens 32" in err


def test_cli_rejects_bad_compression_json(stock_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="JSON"):
        main(["convert", str(stock_checkpoint), str(tmp_path / "x"), "--compression", "{method: visionzip}", "--base-model", HUB_ID])


def test_model_card_for_trained_voco_weights_says_finetune():
    card = str(model_card(base_model=HUB_ID, compression={"method": "voco", "num_voco_tokens": 2}, tokens_per_image=576))
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


# ----------------------------------------------------------------------------- model cards


def test_card_metadata_validates_with_huggingface_hub():
    from huggingface_hub import EvalResult, ModelCard
    from huggingface_hub.utils import validate_repo_id

    result = EvalResult(task_type="image-text-to-text", dataset_type="shapes", dataset_name="tiny shapes",
                        metric_type="accuracy", metric_value=0.99)
    card = model_card({"method": "visionzip", "dominant": 54, "contextual": 10}, 64, HUB_ID, eval_results=[result])
    parsed = ModelCard(str(card))  # the Hub client's own parsing of the YAML front matter and model-index
    data = parsed.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    validate_repo_id(data["base_model"])
    assert data["tags"] == ["slimvlm", "visual-token-compression", "llava", "visionzip"]
    assert "base_model_relation" not in data
    assert parsed.data.eval_results == [result]
    assert "| tiny shapes | accuracy | 0.99 |" in parsed.text


@pytest.mark.parametrize("compression, relation", [
    ({"method": "none"}, None),
    ({"method": "visionzip", "dominant": 54, "contextual": 10}, None),
    (normalize_compression({"method": "sparsevlm", "retained_tokens": 64}), None),
    ({"method": "voco", "num_voco_tokens": 1}, "finetune"),
])
def test_card_base_model_relation_only_for_trained_weights(compression, relation):
    from huggingface_hub import ModelCard

    data = ModelCard(str(model_card(compression, 576, HUB_ID))).data
    assert data.get("base_model_relation") == relation


def test_card_refuses_a_local_base_model(tmp_path, monkeypatch):
    from slimvlm.hub_cards import hub_model_id

    with pytest.raises(ValueError, match="local path, not a Hub model id.*--base-model"):
        model_card({"method": "none"}, 576, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-llava").mkdir()
    with pytest.raises(ValueError, match="local path"):
        model_card({"method": "none"}, 576, "my-llava")
    # a folder of the Hub cache names the repo it came from
    assert hub_model_id(f"/cache/hub/models--llava-hf--llava-1.5-7b-hf/snapshots/{'0' * 40}") == HUB_ID


def test_push_replaces_a_local_base_model_and_uploads(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    folder = tmp_path / "slim"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "README.md").write_text("---\nbase_model: /home/me/llava\npipeline_tag: image-text-to-text\n---\n# old card\n")
    with pytest.raises(ValueError, match="local path"):
        push_to_hub(folder, "user/repo")
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id) or f"https://hub/{repo_id}")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw["folder_path"]))
    assert push_to_hub(folder, "user/repo", base_model=HUB_ID) == "https://hub/user/repo"
    assert calls == ["user/repo", str(folder)]
    assert ModelCard.load(folder / "README.md").data.base_model == HUB_ID
