"""Serialization and remote code (specs/visionzip.md A12, transformers_notes.md §6).

A saved Slim checkpoint must load with `trust_remote_code=True` in a process where slimvlm cannot be
imported, and answer exactly as the in-process model does.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from builders import random_images
from safetensors.torch import load_file

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor

VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}
PROMPT = "USER: <image>\n what is the color of the circle ? ASSISTANT:"
NEW_TOKENS = 8
SHIPPED = {"configuration_slimvlm.py", "modeling_llava.py", "modeling_slimvlm.py", "compat.py", "visionzip.py", "sparsevlm.py",
           "cdpruner.py",
           "voco.py", "processing_slimvlm.py"}

# Runs in a fresh interpreter outside the repository. Its first statement makes `import slimvlm` impossible.
ISOLATED_RUNNER = textwrap.dedent(
    '''
    import sys
    sys.modules["slimvlm"] = None  # any `import slimvlm` now raises ImportError
    import json
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    torch.set_num_threads(1)
    try:
        import slimvlm  # noqa: F401
        slimvlm_importable = True
    except ImportError:
        slimvlm_importable = False

    results = []
    for task in json.loads(open(sys.argv[1]).read()):
        kwargs = dict(task.get("kwargs", {}))
        quantization = task.get("quantization")
        if quantization is not None:
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
            kwargs["device_map"] = "cpu"
        model, info = AutoModelForImageTextToText.from_pretrained(
            task["folder"], trust_remote_code=True, output_loading_info=True, **kwargs
        )
        model.eval()
        processor = AutoProcessor.from_pretrained(task["folder"], trust_remote_code=True)  # compression from its json
        media = {"images": [Image.open(task["image"])]} if task.get("image") else {}
        if task.get("video"):  # a [frames, H, W, 3] uint8 array
            import numpy

            media["videos"] = [numpy.load(task["video"])]
        inputs = processor(text=[task["prompt"]], return_tensors="pt", **media)
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=task["new_tokens"], do_sample=False, eos_token_id=None)
        save_file({"logits": logits.float().contiguous(), "input_ids": inputs["input_ids"].contiguous()}, task["out"])
        result = {
            "model_class": f"{type(model).__module__}.{type(model).__name__}",
            "config_class": f"{type(model.config).__module__}.{type(model.config).__name__}",
            "processor_class": f"{type(processor).__module__}.{type(processor).__name__}",
            "compression": model.config.compression,
            "processor_compression": processor.compression,
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "tokens": tokens[:, inputs["input_ids"].shape[1]:].tolist(),
            "linear_types": {
                name: f"{type(module).__module__}.{type(module).__name__}"
                for name, module in model.named_modules()
                if "Linear" in type(module).__name__
            },
            "linear_dtypes": {
                name: str(module.weight.dtype) for name, module in model.named_modules() if type(module) is torch.nn.Linear
            },
        }
        if task.get("auto_model"):
            base = AutoModel.from_pretrained(task["folder"], trust_remote_code=True)
            result["base_class"] = f"{type(base).__module__}.{type(base).__name__}"
        results.append(result)
    print("RESULT " + json.dumps({"slimvlm_importable": slimvlm_importable,
                                  "slimvlm_modules": sorted(m for m in sys.modules if m.startswith("slimvlm") and sys.modules[m] is not None),
                                  "results": results}))
    '''
)


def run_isolated(tasks: list[dict], workdir: Path) -> dict:
    """Run ISOLATED_RUNNER on `tasks` in a fresh interpreter: cwd outside the repo, no PYTHONPATH, own HF cache."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "runner.py").write_text(ISOLATED_RUNNER)
    (workdir / "tasks.json").write_text(json.dumps(tasks))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    repo = Path(__file__).resolve().parents[1]
    assert repo not in workdir.resolve().parents
    completed = subprocess.run(
        [sys.executable, "-I", str(workdir / "runner.py"), str(workdir / "tasks.json")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, f"isolated run failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


def check_remote_round_trip(model, processor, inputs, media: dict, prompt: str, tmp_path: Path, model_class: str,
                            processor_class: str, new_tokens: int = 3) -> dict:
    """Save `model` and `processor`, load both with trust_remote_code in a clean process (slimvlm not importable)
    and check the reload: same classes, compression, every weight loaded, the same logits and greedy tokens on
    `prompt` with `media` (the runner's {"image": path} or {"video": path to a [frames, H, W, 3] .npy})."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    out = tmp_path / "out.safetensors"
    report = run_isolated([{"folder": str(folder), "prompt": prompt, "out": str(out), "new_tokens": new_tokens, **media}],
                          tmp_path / "isolated")
    assert report["slimvlm_importable"] is False
    result = report["results"][0]
    assert result["model_class"].endswith(model_class)
    assert result["processor_class"].endswith(processor_class)
    assert result["compression"] == model.config.compression == result["processor_compression"]
    assert result["missing"] == [] and result["unexpected"] == []
    assert result["tokens"] == tokens[:, inputs["input_ids"].shape[1]:].tolist()
    torch.testing.assert_close(load_file(out)["logits"], logits, rtol=0, atol=1e-5)
    return result


def check_auto_classes(model, processor, folder: Path):
    """Save `model` and `processor` to `folder` and check that the Auto classes load them back as the Slim
    classes (AutoModel: the head-less base model). Returns the reloaded processor."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert type(AutoConfig.from_pretrained(folder)) is type(model.config)
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is type(model)
    assert type(AutoModel.from_pretrained(folder)).__name__ == type(model.model).__name__
    reloaded = AutoProcessor.from_pretrained(folder)
    assert type(reloaded) is type(processor)
    return reloaded


@pytest.fixture(scope="module")
def saved(stock_checkpoint, tmp_path_factory):
    """A Slim checkpoint (VisionZip 54/10) saved with save_pretrained, its image, and the in-process answer."""
    folder = tmp_path_factory.mktemp("slim_saved")
    model = SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint, compression=VISIONZIP).eval()
    processor = SlimLlavaProcessor.from_pretrained(stock_checkpoint, compression=model.config.compression)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    image = folder.parent / "image.png"
    random_images(1, seed=11)[0].save(image)
    from PIL import Image

    inputs = processor(images=[Image.open(image)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return {
        "folder": folder,
        "image": image,
        "model": model,
        "input_ids": inputs["input_ids"],
        "logits": logits,
        "tokens": tokens[:, inputs["input_ids"].shape[1] :].tolist(),
    }


def task(folder, image, out, **extra) -> dict:
    return {"folder": str(folder), "image": str(image), "prompt": PROMPT, "new_tokens": NEW_TOKENS, "out": str(out), **extra}


@pytest.fixture(scope="module")
def legacy_saved(saved, tmp_path_factory):
    """The saved Slim checkpoint with its weights rewritten in the legacy llava-hf layout."""
    from test_llava import write_legacy_copy

    return write_legacy_copy(saved["folder"], tmp_path_factory.mktemp("legacy") / "slim_legacy", saved["model"].state_dict())


@pytest.fixture(scope="module")
def isolated(saved, legacy_saved, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("isolated")
    tasks = [
        task(saved["folder"], saved["image"], workdir / "saved.safetensors", auto_model=True),
        task(legacy_saved, saved["image"], workdir / "legacy.safetensors"),
    ]
    return run_isolated(tasks, workdir), workdir


# --- what save_pretrained writes ----------------------------------------------------------------------


def test_save_pretrained_writes_safetensors_code_and_auto_map(saved):
    folder = saved["folder"]
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    assert SHIPPED <= {path.name for path in folder.glob("*.py")}
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "slim_llava" and config["compression"] == VISIONZIP
    assert config["auto_map"] == {
        "AutoConfig": "configuration_slimvlm.SlimLlavaConfig",
        "AutoModel": "modeling_llava.SlimLlavaModel",
        "AutoModelForImageTextToText": "modeling_llava.SlimLlavaForConditionalGeneration",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_slimvlm.SlimLlavaProcessor"}
    assert processor_config["compression"] == VISIONZIP
    # Every tensor is saved (save_pretrained writes the llava-hf key layout, which the shipped code maps back).
    assert len(load_file(folder / "model.safetensors")) == len(saved["model"].state_dict())


def test_shipped_modules_are_flat_and_never_import_slimvlm(saved):
    folder = saved["folder"]
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(alias.name.split(".")[0] == "slimvlm" for alias in node.names), f"{path.name} imports slimvlm"
            if isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert (node.module or "").split(".")[0] != "slimvlm", f"{path.name} imports from slimvlm"
                else:
                    # Only flat sibling imports travel: `from .x import y` with x.py shipped alongside.
                    assert node.level == 1 and node.module, f"{path.name}: relative import the Hub loader cannot follow"
                    assert (folder / f"{node.module}.py").is_file(), f"{path.name} needs {node.module}.py, which was not shipped"


# --- loading in a fresh process without slimvlm --------------------------------------------------------------


def test_fresh_process_cannot_import_slimvlm(isolated):
    report, _ = isolated
    assert report["slimvlm_importable"] is False and report["slimvlm_modules"] == []


def test_trust_remote_code_loads_and_answers_as_the_installed_model(saved, isolated):
    report, workdir = isolated
    result = report["results"][0]
    assert result["model_class"].startswith("transformers_modules.")
    assert result["model_class"].endswith("modeling_llava.SlimLlavaForConditionalGeneration")
    assert result["config_class"].endswith("configuration_slimvlm.SlimLlavaConfig")
    assert result["processor_class"].startswith("transformers_modules.")
    assert result["processor_class"].endswith("processing_slimvlm.SlimLlavaProcessor")
    assert result["base_class"].endswith("modeling_llava.SlimLlavaModel")
    assert result["compression"] == result["processor_compression"] == VISIONZIP
    assert result["missing"] == [] and result["unexpected"] == []
    remote = load_file(workdir / "saved.safetensors")
    assert torch.equal(remote["input_ids"], saved["input_ids"])
    assert int((remote["input_ids"] == saved["model"].config.image_token_id).sum()) == 64
    assert torch.equal(remote["logits"], saved["logits"])
    assert result["tokens"] == saved["tokens"]


def test_legacy_layout_with_slim_config_loads_through_remote_code(saved, isolated):
    report, workdir = isolated
    result = report["results"][1]
    assert result["model_class"].startswith("transformers_modules.")
    assert result["missing"] == [] and result["unexpected"] == [], result
    assert torch.equal(load_file(workdir / "legacy.safetensors")["logits"], saved["logits"])
    assert result["tokens"] == saved["tokens"]


UNTESTED_RUNNER = textwrap.dedent(
    '''
    import sys
    sys.modules["slimvlm"] = None  # any `import slimvlm` now raises ImportError
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaModel  # noqa: F401

    # An untested release. (Importing a model class replaces the lazy `transformers` module in sys.modules: set it after.)
    sys.modules["transformers"].__version__ = "9.0.0"

    folder = sys.argv[1]
    AutoConfig.from_pretrained(folder, trust_remote_code=True)
    AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    copies = [name for name, module in sys.modules.items() if name.endswith(".compat") and hasattr(module, "warn_if_untested")]
    print("COPIES", len(copies))
    '''
)


def test_untested_transformers_warns_once_per_process_in_one_line_under_remote_code(saved, tmp_path):
    """Config, processor and model each load their own copy of the shipped modules: one warning in all, one line."""
    (tmp_path / "runner.py").write_text(UNTESTED_RUNNER)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    completed = subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), str(saved["folder"])], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert int(completed.stdout.split("COPIES")[1]) >= 2  # several copies of compat were loaded
    lines = completed.stderr.splitlines()
    warned = [i for i, line in enumerate(lines) if "UntestedTransformersWarning" in line]
    assert len(warned) == 1, completed.stderr
    line = lines[warned[0]]
    assert line.startswith("slimvlm:0: UntestedTransformersWarning: SlimVLM is tested with transformers >=")
    assert "transformers 9.0.0 is installed" in line and line.endswith("'")
    assert warned[0] + 1 == len(lines) or not lines[warned[0] + 1].startswith(" "), completed.stderr  # no source line
