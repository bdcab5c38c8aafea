"""`save_pretrained` writes a model card unless the folder has one; `push_to_hub` carries it (issue 14, item 1).

The hooks live in the shipped module `modelcard_slimvlm`; the tests named `test_pending_modeling_hook_*` check
that the modeling classes call them (`SlimGenerationMixin.save_pretrained` / `.push_to_hub`).
"""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from slimvlm import SlimLlavaForConditionalGeneration
from slimvlm.modelcard_slimvlm import push_to_hub_with_card, write_card_unless_present

VISIONZIP = {"method": "visionzip", "dominant": 54, "contextual": 10}


@pytest.fixture(scope="module")
def model(stock_checkpoint):
    return SlimLlavaForConditionalGeneration.from_pretrained(stock_checkpoint, compression=VISIONZIP).eval()


def test_the_save_hook_writes_the_models_card_into_a_saved_folder(model, tmp_path):
    model.save_pretrained(tmp_path)
    (tmp_path / "README.md").unlink(missing_ok=True)
    path = write_card_unless_present(model, tmp_path)
    card = ModelCard.load(path)
    assert path == tmp_path / "README.md"
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert "visionzip" in card.data.tags and "llava" in card.data.tags
    assert card.data.base_model is None  # loaded from a local folder: no Hub id to name
    assert "64 visual tokens per image" in card.text


def test_the_save_hook_keeps_an_existing_card(model, tmp_path):
    (tmp_path / "README.md").write_text("# my own card\n")
    write_card_unless_present(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my own card\n"


def test_pending_modeling_hook_save_pretrained_writes_a_card(model, tmp_path):
    """Fails until SlimGenerationMixin.save_pretrained calls write_card_unless_present."""
    model.save_pretrained(tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.pipeline_tag == "image-text-to-text"


def test_pending_modeling_hook_push_to_hub_carries_the_card():
    """Fails until SlimGenerationMixin has `push_to_hub = push_to_hub_with_card` (transformers' own push_to_hub
    replaces README.md with the repo's current or a generic card)."""
    assert SlimLlavaForConditionalGeneration.push_to_hub is push_to_hub_with_card
