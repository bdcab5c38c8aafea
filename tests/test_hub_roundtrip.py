"""Push to a Hub and load back by repo id, with the real `huggingface_hub` client against a loopback Hub
(tests/hub_server.py): `slimvlm push` and `push_to_hub` upload code, weights, processor and card; a process that
cannot import slimvlm loads `user/repo` (and an earlier revision) with trust_remote_code and generates the same
tokens as the local model; a refused upload leaves the local folder as it was.

huggingface_hub reads HF_ENDPOINT once, when it is imported, so the client runs in subprocesses started with
HF_ENDPOINT pointing at the loopback Hub; the Hub itself runs in a thread of the test process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from builders import random_images, save_stock_checkpoint
from hub_server import LoopbackHub, wait_until_stopped
from huggingface_hub import ModelCard

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.conversion.slim_checkpoint import convert_to_slim

HUB_ID = "llava-hf/llava-1.5-7b-hf"
PROMPT = "USER: <image>\n what is the color of the circle ? ASSISTANT:"
NEW_TOKENS = 6
VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}

# Pushes with the installed slimvlm: the CLI's `push` (twice: first and second checkpoint), the model method,
# and a push the Hub refuses. Prints one RESULT line.
PUSHER = textwrap.dedent(
    '''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor
    from slimvlm.cli import main
    from slimvlm.modelcard_slimvlm import push_to_hub_with_card

    task = json.loads(open(sys.argv[1]).read())
    codes = [main(["push", task["first"], "user/slim-cli"]), main(["push", task["second"], "user/slim-cli"])]
    model = SlimLlavaForConditionalGeneration.from_pretrained(task["first"])
    processor = SlimLlavaProcessor.from_pretrained(task["first"])
    push_to_hub_with_card(model, "user/slim-api", processor=processor, base_model=task["base_model"], tags=["demo"])
    codes.append(main(["push", task["refused"], "user/refused", "--base-model", task["base_model"]]))
    print("RESULT " + json.dumps({"codes": codes}))
    '''
)

# Loads by repo id from the Hub with slimvlm made unimportable; prints one RESULT line.
LOADER = textwrap.dedent(
    '''
    import sys
    sys.modules["slimvlm"] = None  # any `import slimvlm` now raises ImportError
    import json
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(1)
    results = []
    for task in json.loads(open(sys.argv[1]).read()):
        revision = {"revision": task["revision"]} if task.get("revision") else {}
        model = AutoModelForImageTextToText.from_pretrained(task["repo"], trust_remote_code=True, **revision).eval()
        processor = AutoProcessor.from_pretrained(task["repo"], trust_remote_code=True, **revision)
        inputs = processor(images=[Image.open(task["image"])], text=[task["prompt"]], return_tensors="pt")
        tokens = model.generate(**inputs, max_new_tokens=task["new_tokens"], do_sample=False, eos_token_id=None)
        results.append({"tokens": tokens[:, inputs["input_ids"].shape[1]:].tolist(), "compression": model.config.compression,
                        "model_class": type(model).__module__ + "." + type(model).__name__,
                        "processor_class": type(processor).__module__ + "." + type(processor).__name__})
    print("RESULT " + json.dumps({"slimvlm_modules": sorted(m for m in sys.modules if m.startswith("slimvlm")
                                                            and sys.modules[m] is not None), "results": results}))
    '''
)


def run_client(script: str, tasks, workdir: Path, endpoint: str, isolated: bool) -> dict:
    """Run `script` on `tasks` in a fresh interpreter whose huggingface_hub talks to `endpoint` (own HF cache).

    isolated: outside the repository, no PYTHONPATH (`python -I`), so only the Hub can provide the code."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "script.py").write_text(script)
    (workdir / "tasks.json").write_text(json.dumps(tasks))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_"))}
    env.update(HF_ENDPOINT=endpoint, HF_TOKEN="hf_loopback", HF_HOME=str(workdir / "hf_home"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, *(["-I"] if isolated else []), str(workdir / "script.py"), str(workdir / "tasks.json")]
    completed = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    assert completed.returncode == 0 and lines, f"client failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return {**json.loads(lines[-1][len("RESULT "):]), "stderr": completed.stderr}


def local_tokens(folder: Path, image_path: Path) -> list[list[int]]:
    """Greedy tokens of the checkpoint in `folder`, loaded with the installed classes."""
    from PIL import Image

    model = SlimLlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = SlimLlavaProcessor.from_pretrained(folder)
    inputs = processor(images=[Image.open(image_path)], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return tokens[:, inputs["input_ids"].shape[1]:].tolist()


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def round_trip(stock_checkpoint, tmp_path_factory):
    """Two converted checkpoints pushed to one repo (CLI), the first through push_to_hub_with_card to another,
    a refused push, then everything loaded back by repo id in a process without slimvlm."""
    root = tmp_path_factory.mktemp("hub")
    first = convert_to_slim(stock_checkpoint, root / "first", VISIONZIP, base_model=HUB_ID)
    second = convert_to_slim(save_stock_checkpoint(root / "stock-1", seed=1), root / "second", {"method": "none"},
                             base_model=HUB_ID)
    refused = convert_to_slim(stock_checkpoint, root / "refused", {"method": "none"}, base_model=HUB_ID)
    (refused / "README.md").write_text("---\nbase_model: /home/me/llava\npipeline_tag: image-text-to-text\n---\n# mine\n")
    refused_before = folder_digest(refused)
    image = root / "image.png"
    random_images(1, seed=3)[0].save(image)

    with LoopbackHub(max_requests=1500, lifetime=110, refuse_commits_to=("user/refused",)) as hub:
        pushed = run_client(PUSHER, {"first": str(first), "second": str(second), "refused": str(refused),
                                     "base_model": HUB_ID}, root / "pusher", hub.endpoint, isolated=False)
        cli_history = list(hub.repos["user/slim-cli"].history)
        tasks = [{"repo": "user/slim-cli", "revision": cli_history[1]}, {"repo": "user/slim-cli"}, {"repo": "user/slim-api"}]
        loaded = run_client(LOADER, [{**task, "image": str(image), "prompt": PROMPT, "new_tokens": NEW_TOKENS} for task in tasks],
                            root / "loader", hub.endpoint, isolated=True)
    assert wait_until_stopped(hub)
    return {"hub": hub, "pushed": pushed, "loaded": loaded, "history": cli_history, "image": image, "first": first,
            "second": second, "refused": refused, "refused_before": refused_before}


def test_a_pushed_checkpoint_loads_back_by_repo_id_without_slimvlm(round_trip):
    loaded = round_trip["loaded"]
    assert loaded["slimvlm_modules"] == []
    first, second = (local_tokens(round_trip[name], round_trip["image"]) for name in ("first", "second"))
    assert first != second  # the revision check below can tell them apart
    by_revision, main, api = loaded["results"]
    assert main["tokens"] == second and main["compression"] == {"method": "none"}
    assert api["tokens"] == first and api["compression"]["method"] == "visionzip"
    for result in loaded["results"]:
        assert result["model_class"].startswith("transformers_modules.") and "SlimLlavaForConditionalGeneration" in result["model_class"]
        assert result["processor_class"].endswith("processing_slimvlm.SlimLlavaProcessor")


def test_an_earlier_revision_loads_by_commit_id(round_trip):
    initial, first_push, second_push = round_trip["history"]
    by_revision = round_trip["loaded"]["results"][0]
    assert by_revision["compression"]["method"] == "visionzip"
    assert by_revision["tokens"] == local_tokens(round_trip["first"], round_trip["image"])


@pytest.mark.parametrize("repo", ["user/slim-cli", "user/slim-api"])
def test_a_push_carries_code_weights_processor_and_card(round_trip, repo):
    files = round_trip["hub"].repos[repo].commits[round_trip["hub"].repos[repo].branches["main"]]
    assert {"config.json", "model.safetensors", "configuration_slimvlm.py", "modeling_llava.py", "processing_slimvlm.py",
            "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert card.data.base_model == HUB_ID and "slimvlm" in card.data.tags
    if repo == "user/slim-api":
        assert "demo" in card.data.tags and "visionzip" in card.data.tags


def test_a_refused_upload_fails_in_one_line_and_leaves_the_folder_intact(round_trip):
    assert round_trip["pushed"]["codes"] == [0, 0, 1]  # the two CLI pushes, then the refused one
    errors = [line for line in round_trip["pushed"]["stderr"].splitlines() if line.startswith("slimvlm push: error:")]
    assert len(errors) == 1 and "403" in errors[0] and "refused" in errors[0]
    assert folder_digest(round_trip["refused"]) == round_trip["refused_before"]
    assert len(round_trip["hub"].repos["user/refused"].history) == 1  # the initial commit only


def test_the_loopback_hub_answered_every_request(round_trip):
    hub = round_trip["hub"]
    assert hub.unhandled == [] and 0 < len(hub.requests) < hub.max_requests
    # the client had every card's front matter validated by the Hub before committing it
    assert hub.validated_cards and all(card["pipeline_tag"] == "image-text-to-text" for card in hub.validated_cards)


def test_the_loopback_hub_stops_by_itself():
    hub = LoopbackHub(max_requests=1, lifetime=0.5).start()
    assert wait_until_stopped(hub, timeout=5)
