"""`pipeline("image-text-to-text")` on a slim checkpoint, with raw prompts and chat messages, compression on, through
the installed classes and through remote code; slim processors keep the source's chat template (issue 14, item 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlavaProcessor, pipeline

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor
from slimvlm.conversion.slim_checkpoint import convert_to_slim
from slimvlm.demo import shapes
from slimvlm.demo.run import BUNDLED_MODEL

VISIONZIP = {"method": "visionzip", "tokens": 64}
NEW_TOKENS = 3


def chat(image, question):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    folder = convert_to_slim(BUNDLED_MODEL, tmp_path_factory.mktemp("pipe") / "slim", VISIONZIP, base_model="llava-hf/llava-1.5-7b-hf")
    samples = shapes.make_samples("heldout", 2, seed=7)
    model = SlimLlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = SlimLlavaProcessor.from_pretrained(folder)
    expected = []
    for sample in samples:
        inputs = processor(images=[sample.image], text=[shapes.build_prompt(sample.question)], return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected.append(processor.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    assert all(expected)  # the bundled model answers something: equal answers below mean something
    return folder, samples, expected


@pytest.mark.parametrize("name", ["tiny-shapes-llava", "tiny-shapes-llava-voco"])
def test_the_bundled_checkpoints_chat_template_gives_the_demo_prompt(name):
    processor = LlavaProcessor.from_pretrained(BUNDLED_MODEL.parent / name)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == shapes.build_prompt("what color is the circle ?")


def test_a_slim_processor_keeps_the_sources_chat_template(slim):
    folder, _, _ = slim
    assert (folder / "chat_template.jinja").read_text() == shapes.CHAT_TEMPLATE
    assert SlimLlavaProcessor.from_pretrained(folder).chat_template == shapes.CHAT_TEMPLATE


def test_pipeline_with_raw_prompts_and_chat_messages_installed(slim):
    folder, samples, expected = slim
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    assert type(pipe.model) is SlimLlavaForConditionalGeneration and pipe.model.image_token_count() == 64
    for sample, answer in zip(samples, expected):
        raw = pipe(images=sample.image, text=shapes.build_prompt(sample.question), max_new_tokens=NEW_TOKENS,
                   return_full_text=False)
        chatted = pipe(text=chat(sample.image, sample.question), max_new_tokens=NEW_TOKENS, return_full_text=False)
        assert raw[0]["generated_text"].strip() == answer == chatted[0]["generated_text"].strip()


REMOTE = textwrap.dedent(
    '''
    import sys
    sys.modules["slimvlm"] = None
    import json
    from PIL import Image
    import torch
    from transformers import pipeline
    torch.set_num_threads(1)
    task = json.loads(open(sys.argv[1]).read())
    pipe = pipeline("image-text-to-text", model=task["folder"], trust_remote_code=True)
    answers = []
    for image, question, prompt in task["samples"]:
        image = Image.open(image)
        raw = pipe(images=image, text=prompt, max_new_tokens=task["new_tokens"], return_full_text=False)
        chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        chatted = pipe(text=chat, max_new_tokens=task["new_tokens"], return_full_text=False)
        answers.append([raw[0]["generated_text"].strip(), chatted[0]["generated_text"].strip()])
    print("RESULT " + json.dumps({"answers": answers, "model": type(pipe.model).__module__}))
    '''
)


def test_pipeline_with_raw_prompts_and_chat_messages_through_remote_code(slim, tmp_path):
    folder, samples, expected = slim
    images = []
    for index, sample in enumerate(samples):
        sample.image.save(tmp_path / f"{index}.png")
        images.append([str(tmp_path / f"{index}.png"), sample.question, shapes.build_prompt(sample.question)])
    (tmp_path / "script.py").write_text(REMOTE)
    (tmp_path / "task.json").write_text(json.dumps({"folder": str(folder), "samples": images, "new_tokens": NEW_TOKENS}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "script.py"), str(tmp_path / "task.json")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["model"].startswith("transformers_modules.")
    assert result["answers"] == [[answer, answer] for answer in expected]
