"""Tests for the shipped demo model (slimvlm/demo/assets/tiny-shapes-llava) and its task generator."""

from __future__ import annotations

import os
from pathlib import Path

# Passive OpenMP waiting: spin-waiting threads are slow when the 2 cores are shared (no effect if torch
# was already imported by another test module).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from slimvlm.demo import shapes  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "slimvlm" / "demo" / "assets" / "tiny-shapes-llava"


def _fingerprint(samples: list[shapes.Sample]) -> list[tuple[str, str, bytes]]:
    return [(s.question, s.answer, np.asarray(s.image).tobytes()) for s in samples]


def test_generator_is_deterministic() -> None:
    a = shapes.make_samples("heldout", 12, seed=3, per_image=3)
    b = shapes.make_samples("heldout", 12, seed=3, per_image=3)
    assert _fingerprint(a) == _fingerprint(b)
    # Different seeds and different splits give different data.
    assert _fingerprint(a) != _fingerprint(shapes.make_samples("heldout", 12, seed=4, per_image=3))
    assert _fingerprint(a) != _fingerprint(shapes.make_samples("train", 12, seed=3, per_image=3))
    assert a[0].image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_objects_are_local_to_a_patch_block() -> None:
    """Each object lies inside one 2x2-patch block of its own grid cell (what makes the benchmark's
    per-object information local to a few image tokens)."""
    p = shapes.PATCH
    for index in range(40):
        objects, _, mask, _ = shapes.make_scene_batch("heldout", 0, index)
        for k, obj in enumerate(objects, start=1):
            ys, xs = np.nonzero(mask == k)
            assert len(ys) > 0
            rows, cols = set(ys // p), set(xs // p)
            assert len(rows) <= shapes.BLOCK and len(cols) <= shapes.BLOCK, (index, obj)
            assert {r // shapes.CELL_PATCHES for r in rows} == {obj.cell // shapes.GRID}
            assert {c // shapes.CELL_PATCHES for c in cols} == {obj.cell % shapes.GRID}


def test_tokenizer_covers_generator() -> None:
    tok = shapes.build_tokenizer()
    for tokn in shapes.SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(tokn) != tok.unk_token_id or tokn == "<unk>"
    for s in shapes.make_samples("train", 200, seed=0, per_image=4):
        ids = tok(shapes.build_prompt(s.question) + f" {s.answer}</s>").input_ids
        assert tok.unk_token_id not in ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


@pytest.fixture(scope="module")
def model_and_processor():
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if not (ASSET / "model.safetensors").exists():
        pytest.skip("demo model not trained yet")
    processor = LlavaProcessor.from_pretrained(ASSET, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(ASSET, local_files_only=True).eval()
    return model, processor


def test_processor_geometry(model_and_processor) -> None:
    model, processor = model_and_processor
    inputs = processor(text=[shapes.build_prompt("what color is the circle ?")],
                       images=[shapes.make_samples("heldout", 1)[0].image], return_tensors="pt")
    n_image = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert n_image == 576 == model.config.image_seq_length
    assert model.config.vision_config.image_size // model.config.vision_config.patch_size == 24


TARGET_ACCURACY = 0.95


def test_heldout_accuracy_target(model_and_processor) -> None:
    """The shipped model answers at least 95 % of 100 held-out questions exactly (uncompressed)."""
    model, processor = model_and_processor
    samples = shapes.make_samples("heldout", 100, seed=0, per_image=1)
    accuracy = shapes.evaluate(model, processor, samples, batch_size=50, max_new_tokens=2)
    assert accuracy >= TARGET_ACCURACY, f"held-out exact-match accuracy {accuracy:.3f} < 0.95"
