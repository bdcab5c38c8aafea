"""`slimvlm train` (slimvlm/train/): data checks, assistant-only labels, recipes, 1 vs 2 processes, resume, outputs.

Everything runs on the bundled demo model under VisionZip 64 (77-token sequences) with a few steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimvlm import cli
from slimvlm.demo.run import BUNDLED_MODEL
from slimvlm.train import write_demo_data
from slimvlm.train.data import IGNORE_INDEX, ChatCollator, SupervisedDataset, check_records, read_records
from slimvlm.train.run import load_model, train

ROOT = Path(__file__).resolve().parents[1]
VZ64 = json.dumps({"method": "visionzip", "tokens": 64})
PROJECTOR = "multi_modal_projector.linear_1.weight"  # saved names follow the stock (legacy) layout


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    return write_demo_data(tmp_path_factory.mktemp("demo-data") / "shapes", samples=24)


def arguments(recipe, data: Path, output: Path, *extra) -> list[str]:
    return [recipe, "--model", str(BUNDLED_MODEL), "--data", str(data), "--image-folder", str(data.parent / "images"),
            "--output", str(output), "--compression", VZ64, "--learning-rate", "1e-3", "--seed", "0",
            "--gradient-accumulation-steps", "1", *extra]


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------------------- bad data


def write_json(folder: Path, records) -> Path:
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def record(image="a.png", human="<image>\nwhat color is the circle ?", answer="red") -> dict:
    out = {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image is not None:
        out["image"] = image
    return out


@pytest.mark.parametrize("records, expected", [
    ([record(image="missing.png")], "record 1: image file {folder}/missing.png does not exist"),
    ([record(human="what color is the circle ?")], "record 1 has 1 image(s) but no <image> in its conversation"),
    ([record(human="<image>\n<image>\nwhat color ?")], "record 1 has 2 <image> marker(s) but 1 image(s)"),
    ({"image": "a.png"}, "must be a JSON list of records"),
    ([record(), "not a record"], "must be a JSON list of records"),
])
def test_bad_data_fails_in_one_line_before_training(tmp_path, capsys, demo_data, records, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((demo_data.parent / "images").iterdir().__next__().read_bytes())
    if isinstance(records, list) and len(records) == 1:
        records = [record()] + records  # the bad one is record 1
    data = write_json(tmp_path, records)
    argv = ["train", *arguments("projector", data, tmp_path / "out", "--max-steps", "1")]
    argv[argv.index("--image-folder") + 1] = str(tmp_path / "images")
    message = one_line_error(capsys, argv)
    assert expected.format(folder=tmp_path / "images") in message
    assert message.startswith("slimvlm train: error: ")
    assert not (tmp_path / "out").exists()


def test_max_steps_zero_is_refused(tmp_path, capsys, demo_data):
    message = one_line_error(capsys, ["train", *arguments("projector", demo_data, tmp_path / "out", "--max-steps", "0")])
    assert message == "slimvlm train: error: --max-steps must be a positive number of optimizer steps, got 0"


def test_sparsevlm_is_refused_by_the_projector_recipe(tmp_path, capsys, demo_data):
    argv = ["train", *arguments("projector", demo_data, tmp_path / "out", "--max-steps", "1")]
    argv[argv.index("--compression") + 1] = json.dumps({"method": "sparsevlm", "retained_tokens": 64})
    assert "sparsevlm is not one: SparseVLM runs dense in training mode" in one_line_error(capsys, argv)


def test_video_record_needs_a_video_model(tmp_path):
    (tmp_path / "clip").mkdir()
    records = [{"video": "clip", "conversations": [{"from": "human", "value": "<video>\nwhat happens ?"},
                                                  {"from": "gpt", "value": "nothing"}]}]
    with pytest.raises(ValueError, match="record 0 has a video but this model takes images only"):
        check_records(records, tmp_path, takes_videos=False)
    example = check_records(records, tmp_path, takes_videos=True)[0]
    assert example.videos == [tmp_path / "clip"] and example.messages[0]["content"][0] == {"type": "video"}


# ----------------------------------------------------------------------------------------------- labels


def test_labels_are_the_assistant_turns_only(demo_data, tmp_path):
    """A multi-turn text-only record and an image record: the supervised tokens are exactly each answer and its
    </s>, found through the processor's chat template; the image expands to its 64 placeholders, unsupervised."""
    _, processor, _ = load_model(str(BUNDLED_MODEL), json.loads(VZ64))
    records = read_records(demo_data)[:1] + [{"conversations": [
        {"from": "human", "value": "how many circles ?"}, {"from": "gpt", "value": "two"},
        {"from": "human", "value": "is there a red cross ?"}, {"from": "gpt", "value": "no"}]}]
    dataset = SupervisedDataset(check_records(records, demo_data.parent / "images"))
    batch = ChatCollator(processor)([dataset[0], dataset[1]])
    tokens = processor.tokenizer.convert_ids_to_tokens
    supervised = [tokens([i for i in row.tolist() if i != IGNORE_INDEX]) for row in batch["labels"]]
    assert supervised == [[records[0]["conversations"][1]["value"], "</s>"], ["two", "</s>", "no", "</s>"]]
    assert int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 64
    assert batch["pixel_values"].shape[0] == 1  # the text-only record has no image
    text_only = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    assert processor.tokenizer.decode(text_only) == \
        "<s> USER : how many circles ? ASSISTANT : two </s> USER : is there a red cross ? ASSISTANT : no </s>"


def test_datasets_folder_is_read(demo_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = read_records(demo_data)[:3]
    rows = {"image": [str(demo_data.parent / "images" / r["image"]) for r in records],
            "conversations": [r["conversations"] for r in records]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    examples = check_records(read_records(tmp_path / "ds"), None)
    assert [e.messages for e in examples] == [e.messages for e in check_records(records, demo_data.parent / "images")]


# ----------------------------------------------------------------------------------------------- 1 vs 2 processes


def run_module(args: list[str], nproc: int) -> None:
    """`torchrun --standalone --nproc_per_node N -m slimvlm.train ...` (CPU: gloo)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    done = subprocess.run([*launcher, "-m", "slimvlm.train", *args], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_equal_one_with_the_same_global_batch(demo_data, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, DDP) with batch 2 per process vs one process with batch 4: the same
    samples per step, the same per-step loss (tokens averaged across processes) and the same trained weights."""
    common = ["--max-steps", "3", "--save-steps", "100"]
    train(arguments("projector", demo_data, tmp_path / "one", *common, "--per-device-batch-size", "4"))
    run_module(arguments("projector", demo_data, tmp_path / "two", *common, "--per-device-batch-size", "2"), 2)
    one, two = (json.loads((tmp_path / name / "training_summary.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"], one["global_batch_size"], two["global_batch_size"]) == (1, 2, 4, 4)
    assert len(one["losses"]) == 3
    assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(two["losses"]), atol=1e-5, rtol=0)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    base = load_file(BUNDLED_MODEL / "model.safetensors")
    assert not torch.equal(a[PROJECTOR], base[PROJECTOR])  # it trained
    frozen = [k for k in a if "multi_modal_projector" not in k]
    assert all(torch.equal(a[k], base[k]) for k in frozen)  # nothing else moved


# ----------------------------------------------------------------------------------------------- resume, checkpointing


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_weights(demo_data, tmp_path):
    """A run stopped after step 3 (checkpoints at 2) leaves checkpoint-2 intact; --resume finishes the same run:
    the same losses and weights as an uninterrupted one. Gradient checkpointing changes neither."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Interrupt

    common = ["--max-steps", "4", "--save-steps", "2", "--per-device-batch-size", "2"]
    train(arguments("projector", demo_data, tmp_path / "straight", *common))
    with pytest.raises(Interrupt):
        train(arguments("projector", demo_data, tmp_path / "cut", *common, "--gradient-checkpointing"),
              callbacks=[StopAt()])
    checkpoint = tmp_path / "cut" / "checkpoint-2"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert not (tmp_path / "cut" / "checkpoint-3").exists() and not (tmp_path / "cut" / "model.safetensors").exists()
    train(arguments("projector", demo_data, tmp_path / "cut", *common, "--gradient-checkpointing", "--resume"))
    straight, resumed = (json.loads((tmp_path / n / "training_summary.json").read_text()) for n in ("straight", "cut"))
    assert resumed["steps"] == 4
    assert torch.allclose(torch.tensor(straight["losses"][2:]), torch.tensor(resumed["losses"][-2:]), atol=1e-5)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("straight", "cut"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resume_without_checkpoint_and_reuse_of_output_are_refused(demo_data, tmp_path, capsys):
    message = one_line_error(capsys, ["train", *arguments("projector", demo_data, tmp_path / "none", "--resume")])
    assert "--resume: " in message and "has no checkpoint-N folder" in message
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    assert "is not empty" in one_line_error(capsys, ["train", *arguments("projector", demo_data, tmp_path / "used")])


# ----------------------------------------------------------------------------------------------- outputs


def logits(model, processor, demo_data) -> torch.Tensor:
    from PIL import Image

    record = read_records(demo_data)[0]
    image = Image.open(demo_data.parent / "images" / record["image"]).convert("RGB")
    inputs = processor(text=["USER: <image>\n" + record["conversations"][0]["value"][8:] + " ASSISTANT:"],
                       images=[image], return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits[0, -1]


def test_projector_output_loads_remote_code_exports_and_has_a_card(demo_data, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from slimvlm.conversion.projector import export_projector, import_projector

    out = train(arguments("projector", demo_data, tmp_path / "out", "--max-steps", "2", "--per-device-batch-size", "4",
                          "--dataset-id", "liuhaotian/LLaVA-Instruct-150K", "--base-model", "llava-hf/llava-1.5-7b-hf"))
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert model.config.compression == {"method": "visionzip", "dominant": 54, "contextual": 10}
    base, base_processor, _ = load_model(str(BUNDLED_MODEL), json.loads(VZ64))
    tuned, base_logits = logits(model, processor, demo_data), logits(base, base_processor, demo_data)
    assert not torch.allclose(tuned, base_logits, atol=1e-3)
    # export-projector takes the output; importing it into the base gives the output's answers
    export_projector(out, tmp_path / "proj")
    rebuilt = import_projector(BUNDLED_MODEL, tmp_path / "proj", tmp_path / "rebuilt")
    again, again_processor, _ = load_model(str(rebuilt), json.loads(VZ64))
    assert torch.allclose(logits(again, again_processor, demo_data), tuned, atol=1e-6)
    from slimvlm.demo.tuned import with_projector  # what the demo does with the exported file

    assert torch.allclose(logits(with_projector(base, tmp_path / "proj"), again_processor, demo_data), tuned, atol=1e-6)
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["liuhaotian/LLaVA-Instruct-150K"]
    assert (card.data.base_model, card.data.base_model_relation) == ("llava-hf/llava-1.5-7b-hf", "finetune")
    training = card.data.slimvlm_training
    assert (training["recipe"], training["data_size"], training["steps"]) == ("projector", 24, 2)
    assert training["compression"]["method"] == "visionzip" and "slimvlm train projector" in card.text


def test_lora_adapter_and_merge(demo_data, tmp_path):
    """lora: OUT (base + tuned projector) + OUT/adapter answer like the --merge checkpoint of the same run; the
    adapter changes the answers; only the projector and the LoRA matrices trained."""
    pytest.importorskip("peft")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    common = ["--max-steps", "2", "--per-device-batch-size", "4", "--lora-r", "4", "--lora-alpha", "8",
              "--projector-learning-rate", "1e-3"]
    out = train(arguments("lora", demo_data, tmp_path / "lora", *common))
    merged = train(arguments("lora", demo_data, tmp_path / "merged", *common, "--merge"))
    assert (out / "adapter" / "adapter_config.json").is_file() and not (merged / "adapter").exists()
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    without = logits(model, processor, demo_data)
    model.load_adapter(str(out / "adapter"))
    with_adapter = logits(model, processor, demo_data)
    merged_model = AutoModelForImageTextToText.from_pretrained(merged, trust_remote_code=True)
    assert torch.allclose(with_adapter, logits(merged_model, processor, demo_data), atol=1e-4)
    assert not torch.allclose(with_adapter, without, atol=1e-4)
    # the demo applies the adapter without peft (slimvlm/demo/tuned.py): the same answers as peft's merge
    from slimvlm import SlimLlavaForConditionalGeneration
    from slimvlm.demo.tuned import with_lora

    bundled = SlimLlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL)
    assert torch.allclose(logits(with_lora(bundled, out / "adapter"), processor, demo_data), with_adapter, atol=1e-5)
    a, base = load_file(out / "model.safetensors"), load_file(BUNDLED_MODEL / "model.safetensors")
    assert set(a) == set(base) and not torch.equal(a[PROJECTOR], base[PROJECTOR])
    assert all(torch.equal(a[k], base[k]) for k in a if "multi_modal_projector" not in k)


def test_voco_lora_trains_the_voco_rows(demo_data, tmp_path):
    """voco-lora: the <voco> rows of embed_tokens and lm_head train (peft trainable tokens), no other row."""
    pytest.importorskip("peft")
    argv = arguments("voco-lora", demo_data, tmp_path / "out", "--max-steps", "2", "--per-device-batch-size", "2",
                     "--lora-r", "4", "--lora-alpha", "8", "--merge")
    argv[argv.index("--compression") + 1] = json.dumps({"method": "voco", "num_voco_tokens": 1})
    out = train(argv)
    config = json.loads((out / "config.json").read_text())
    voco = config["voco_token_id"]
    assert config["compression"]["method"] == "voco"
    trained, base = load_file(out / "model.safetensors"), load_file(BUNDLED_MODEL / "model.safetensors")
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        changed = (trained[key] != base[key]).any(-1).nonzero().flatten().tolist()
        assert changed == [voco], (key, changed)


def test_bf16_is_one_flag(demo_data, tmp_path):
    """--bf16: mixed precision (autocast; on CPU too), the saved weights stay fp32 and the loss stays close."""
    common = ["--max-steps", "1", "--per-device-batch-size", "2"]
    fp32 = train(arguments("projector", demo_data, tmp_path / "fp32", *common))
    bf16 = train(arguments("projector", demo_data, tmp_path / "bf16", *common, "--bf16"))
    losses = [json.loads((folder / "training_summary.json").read_text())["losses"][0] for folder in (fp32, bf16)]
    assert losses[0] != losses[1] and abs(losses[0] - losses[1]) < 0.1 * losses[0]
    assert load_file(bf16 / "model.safetensors")[PROJECTOR].dtype == torch.float32


def test_demo_data_command_writes_llava_json(tmp_path, capsys):
    assert cli.main(["demo-data", "--output", str(tmp_path / "d"), "--samples", "6"]) == 0
    records = json.loads((tmp_path / "d" / "data.json").read_text())
    assert len(records) == 6 and all((tmp_path / "d" / "images" / r["image"]).is_file() for r in records)
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert len(check_records(records, tmp_path / "d" / "images")) == 6
    assert "exists and is not an empty folder" in one_line_error(capsys, ["demo-data", "--output", str(tmp_path / "d")])


VIDEO_TEMPLATE = (  # user turns: their images / videos first, then the text (as the demo's template does for images)
    "{%- for message in messages -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set media = message['content'] | rejectattr('type', 'equalto', 'text') | map(attribute='type')"
    " | map('replace', 'image', '<image>\\n') | map('replace', 'video', '<video>\\n') | join('') -%}"
    "{%- if message['role'] == 'user' -%}{{ ('' if loop.first else ' ') + 'USER: ' + media + text }}"
    "{%- else -%}{{ ' ASSISTANT: ' + text + eos_token }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def test_video_llava_trains_on_a_video_record(tmp_path):
    """A Video-LLaVA record whose video is a folder of frames: its <video> expands to frames x tokens, unsupervised,
    the answer is supervised, and the projector recipe trains on it (tiny random Video-LLaVA)."""
    from PIL import Image

    from builders import VIDEO_PATCH, make_video_image_processor, make_video_tokenizer, random_video, \
        tiny_video_llava_config
    from slimvlm import SlimVideoLlavaConfig, SlimVideoLlavaForConditionalGeneration, SlimVideoLlavaProcessor

    config = SlimVideoLlavaConfig(**tiny_video_llava_config().to_dict(), compression={"method": "none"})
    SlimVideoLlavaForConditionalGeneration(config).save_pretrained(tmp_path / "model")
    processor = SlimVideoLlavaProcessor(image_processor=make_video_image_processor(), tokenizer=make_video_tokenizer(),
                                        patch_size=VIDEO_PATCH, chat_template=VIDEO_TEMPLATE)
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "media" / "clip").mkdir(parents=True)
    for index, frame in enumerate(random_video(4, seed=3)):
        Image.fromarray(frame).save(tmp_path / "media" / "clip" / f"{index:03d}.png")
    records = [{"video": "clip", "conversations": [{"from": "human", "value": "<video>\nwhat is this ?"},
                                                  {"from": "gpt", "value": "a red circle"}]}] * 2
    data = write_json(tmp_path, records)
    _, loaded, family = load_model(str(tmp_path / "model"), None)
    examples = check_records(records, tmp_path / "media", takes_videos=family.processor.takes_videos)
    batch = ChatCollator(loaded)([SupervisedDataset(examples)[0]])
    assert batch["pixel_values_videos"].shape[:2] == (1, 4)
    video_id = loaded.tokenizer.convert_tokens_to_ids("<video>")
    assert int((batch["input_ids"] == video_id).sum()) == 4 * 37  # 4 frames x (6 x 6 patches + CLS)
    supervised = [i for i in batch["labels"][0].tolist() if i != IGNORE_INDEX]
    assert loaded.tokenizer.convert_ids_to_tokens(supervised) == ["a", "red", "circle", "</s>"]
    out = train(["projector", "--model", str(tmp_path / "model"), "--data", str(data), "--image-folder",
                 str(tmp_path / "media"), "--output", str(tmp_path / "out"), "--max-steps", "2",
                 "--per-device-batch-size", "1", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2"])
    trained = load_file(out / "model.safetensors")
    base = load_file(tmp_path / "model" / "model.safetensors")
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_voco_recipe_trains_llm_and_projector_not_the_tower(demo_data, tmp_path):
    argv = arguments("voco", demo_data, tmp_path / "out", "--max-steps", "2", "--per-device-batch-size", "2")
    argv[argv.index("--compression") + 1] = json.dumps({"method": "voco", "num_voco_tokens": 2})
    out = train(argv)
    config = json.loads((out / "config.json").read_text())
    assert config["compression"] == {"method": "voco", "num_voco_tokens": 2} and config["voco_token_id"] == 5
    trained, base = load_file(out / "model.safetensors"), load_file(BUNDLED_MODEL / "model.safetensors")
    changed = {k for k in base if not torch.equal(trained[k], base[k])}
    assert not any(k.startswith("vision_tower") for k in changed)
    assert PROJECTOR in changed and "language_model.model.layers.0.self_attn.q_proj.weight" in changed
