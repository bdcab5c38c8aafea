"""Pushing a slim checkpoint folder to the Hub, with its card checked first.

The cards themselves come from the shipped module `slimvlm.modelcard_slimvlm` (which `save_pretrained` and
`push_to_hub` of the Slim classes use too); its names are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from ..modelcard_slimvlm import (  # noqa: F401  (re-exported)
    BASE_MODEL_RELATIONS,
    CARD_FILE,
    FAMILY_TAGS,
    METHOD_NOTES,
    METHOD_TAGS,
    card_for_model,
    hub_model_id,
    model_card,
    write_model_card,
)


def checked_card(folder: str | Path, base_model: str | None = None) -> ModelCard:
    """The card of a checkpoint folder, ready to push: with `base_model` (a Hub id) put in, when given.

    Raises ValueError when the folder is no checkpoint, has no card with a pipeline_tag, or its card names a
    local path as base_model (give the Hub id with --base-model).
    """
    folder = Path(folder)
    card_path = folder / "README.md"
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json); give the folder `slimvlm convert` wrote")
    card = ModelCard.load(card_path) if card_path.exists() else None
    if card is None or not card.data.get("pipeline_tag"):
        raise ValueError(f"{folder} has no model card with pipeline_tag; write one with slimvlm.hub_cards.write_model_card")
    if base_model is not None:
        card.data.base_model = hub_model_id(base_model)
    elif card.data.get("base_model") is not None:
        card.data.base_model = hub_model_id(card.data.base_model)
    return card


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    base_model: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Upload a slim checkpoint folder (it must carry a model card) to the Hub in one commit; returns the repo URL.

    base_model: the Hub id the card names as base model (needed when the card names a local path); the
        uploaded card carries it, and `folder/README.md` is rewritten with it once the upload has succeeded.
    Everything is checked before any request is made, and a failed upload leaves `folder` as it was.
    progress: called with a short description when each step begins.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    step = progress or (lambda description: None)
    step(f"checking {folder}")
    validate_repo_id(repo_id)
    folder = Path(folder)
    card = checked_card(folder, base_model)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and not any(
        part.startswith(".") for part in path.relative_to(folder).parts))
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=path)
                  for path in files if path.relative_to(folder).as_posix() != CARD_FILE]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=str(card).encode()))
    api = HfApi()
    step(f"creating {repo_id}")
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    step(f"uploading {folder}")
    api.create_commit(repo_id=repo_id, operations=operations, commit_message="Upload SlimVLM checkpoint")
    if base_model is not None:
        write_model_card(folder, card)
    return str(url)
