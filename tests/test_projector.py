"""Projector export and import (issue 14, item 4): bit-exact round trip, the original mm_projector.bin, and clear
errors on a shape or activation mismatch."""

from __future__ import annotations

import json

import pytest
import torch
from builders import save_stock_checkpoint
from safetensors import safe_open

from slimvlm.cli import main
from slimvlm.conversion.projector import export_projector, import_projector, read_projector
from slimvlm.conversion.slim_checkpoint import convert_to_slim
from slimvlm.modeling_llava import SlimLlavaForConditionalGeneration

HUB_ID = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("projector")
    tuned = convert_to_slim(save_stock_checkpoint(root / "stock-0", seed=0), root / "tuned", {"method": "none"}, base_model=HUB_ID)
    base = save_stock_checkpoint(root / "base", seed=1)  # stock llava-hf layout
    wide = save_stock_checkpoint(root / "wide", seed=2, text_hidden=64)
    return root, tuned, base, wide


def equal_dicts(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_then_import_is_bit_exact(checkpoints, tmp_path):
    root, tuned, base, _ = checkpoints
    file = export_projector(tuned, tmp_path / "proj")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["family"] == "llava" and metadata["activation"] == "gelu"
    assert (metadata["vision_hidden_size"], metadata["text_hidden_size"]) == ("32", "32")
    out = import_projector(base, file, tmp_path / "imported")
    assert equal_dicts(read_projector(out), read_projector(tuned))
    imported = SlimLlavaForConditionalGeneration.from_pretrained(out).state_dict()
    original_base = SlimLlavaForConditionalGeneration.from_pretrained(base).state_dict()
    assert all(torch.equal(imported[k], original_base[k]) for k in imported if "multi_modal_projector" not in k)
    again = export_projector(out, tmp_path / "proj-again")
    with safe_open(str(again), framework="pt") as handle:
        assert {k: v for k, v in handle.metadata().items() if k != "source"} == \
            {k: v for k, v in metadata.items() if k != "source"}
    assert equal_dicts(read_projector(tmp_path / "imported"), read_projector(tuned))


def test_the_original_mm_projector_bin_imports(checkpoints, tmp_path):
    root, tuned, base, _ = checkpoints
    projector = read_projector(tuned)
    original = {f"model.mm_projector.{0 if '.linear_1.' in k else 2}.{k.rsplit('.', 1)[1]}": v for k, v in projector.items()}
    torch.save(original, tmp_path / "mm_projector.bin")
    out = import_projector(base, tmp_path / "mm_projector.bin", tmp_path / "imported")
    assert equal_dicts(read_projector(out), projector)


def test_a_projector_of_another_width_is_refused(checkpoints, tmp_path):
    root, tuned, _, wide = checkpoints
    file = export_projector(wide, tmp_path / "wide-proj")
    with pytest.raises(ValueError, match=r"projector tensor multi_modal_projector\.linear_1\.bias has shape \(64,\), the base.s is \(32,\)"):
        import_projector(tuned, file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_projector_with_another_activation_is_refused(checkpoints, tmp_path):
    root, tuned, base, _ = checkpoints
    file = export_projector(tuned, tmp_path / "proj")
    silu = tmp_path / "silu-base"
    import shutil

    shutil.copytree(base, silu)
    config = json.loads((silu / "config.json").read_text())
    (silu / "config.json").write_text(json.dumps({**config, "projector_hidden_act": "silu"}))
    with pytest.raises(ValueError, match="projector activation 'gelu' does not match the base's projector_hidden_act 'silu'"):
        import_projector(silu, file, tmp_path / "out")


def test_the_cli_round_trip_and_a_mismatch_in_one_line(checkpoints, tmp_path, capsys):
    root, tuned, base, wide = checkpoints
    assert main(["export-projector", str(tuned), str(tmp_path / "proj")]) == 0
    assert main(["import-projector", str(base), str(tmp_path / "proj" / "projector.safetensors"), str(tmp_path / "out")]) == 0
    assert equal_dicts(read_projector(tmp_path / "out"), read_projector(tuned))
    capsys.readouterr()
    assert main(["import-projector", str(wide), str(tmp_path / "proj"), str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has shape" in err[0]


def test_mini_gemini_mining_module_travels_with_its_projector(tmp_path):
    """Mini-Gemini: the patch-info mining module is trained with the projector, so it is exported and imported too."""
    from builders import tiny_mini_gemini_config

    from slimvlm import SlimMiniGeminiConfig, SlimMiniGeminiForConditionalGeneration

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        SlimMiniGeminiForConditionalGeneration(SlimMiniGeminiConfig(**tiny_mini_gemini_config())).save_pretrained(tmp_path / f"m{seed}")
        folders.append(tmp_path / f"m{seed}")
    file = export_projector(folders[0], tmp_path / "proj")
    with safe_open(str(file), framework="pt") as handle:
        assert handle.metadata()["family"] == "mini-gemini"
        assert any(key.startswith("patch_mining.") for key in handle.keys())
    out = import_projector(folders[1], file, tmp_path / "out")
    assert equal_dicts(read_projector(out), read_projector(folders[0]))
    rebuilt = SlimMiniGeminiForConditionalGeneration.from_pretrained(out)
    source = SlimMiniGeminiForConditionalGeneration.from_pretrained(folders[0])
    assert equal_dicts(rebuilt.model.patch_mining.state_dict(), source.model.patch_mining.state_dict())
