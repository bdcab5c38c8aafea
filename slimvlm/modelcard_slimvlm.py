"""Model cards of slim checkpoints, written by `save_pretrained` and `push_to_hub` (shipped with checkpoints).

Cards are `huggingface_hub.ModelCard`s whose metadata comes from `ModelCardData`, so the Hub's conventions for
remote-code VLMs hold by construction: `library_name: transformers`, `pipeline_tag: image-text-to-text`,
`base_model` (a Hub id, never a local path), `base_model_relation` (only for trained weights: a training-free
compression is the base model repacked), tags, and `model-index` eval results when given.

Shipped: imports only huggingface_hub (a transformers dependency) and the standard library.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

CARD_FILE = "README.md"
METHOD_TAGS = {"visionzip": "visionzip", "sparsevlm": "sparsevlm", "voco": "voco-llama", "cdpruner": "cdpruner",
               "divprune": "divprune"}
# Methods whose checkpoints carry trained weights; the others are training-free repacks of the base model,
# for which the Hub wants no relation (it infers one from the files).
BASE_MODEL_RELATIONS = {"voco": "finetune"}
FAMILY_TAGS = {"slim_llava": "llava", "slim_llava_next": "llava-next", "slim_video_llava": "video-llava",
               "slim_mini_gemini": "mini-gemini", "slim_llava_onevision": "llava-onevision",
               "slim_qwen2_5_vl": "qwen2.5-vl", "slim_qwen3_vl": "qwen3-vl"}
METHOD_NOTES = {
    "none": "No compression: the stock model, wrapped.",
    "visionzip": (
        "VisionZip (training-free): each image keeps {dominant} dominant tokens (CLS included; highest CLS attention "
        "at vision layer L-2) and {contextual} contextual tokens (the rest merged by key similarity), before the "
        "projector: {tokens} visual tokens per image reach the language model."
    ),
    # Variable-size families (Qwen-VL): counts are fractions of each image's merged tokens.
    "visionzip_ratios": (
        "VisionZip (training-free, the official Qwen2.5-VL rule): each image keeps a fraction {dominant_ratio} of its "
        "merged tokens as dominant tokens (most attention received in the last vision block) and {contextual_ratio} "
        "as contextual tokens (the rest merged by key similarity), after the merger, at their original M-RoPE "
        "positions: {tokens} per image reach the language model."
    ),
    "sparsevlm": (
        "SparseVLM v{version} (training-free): all visual tokens enter the language model; at decoder layers {layers} "
        "text raters score them and the least relevant are pruned (v1.5 recycles some into merged tokens)."
    ),
    "cdpruner": (
        "CDPruner (training-free): of each view's projected visual tokens, a DPP greedy MAP keeps a diverse set "
        "weighted by relevance to the instruction ({relevance} relevance, scope \"{scope}\"): {tokens} visual tokens "
        "per image reach the language model."
    ),
    "divprune": (
        "DivPrune (training-free): of the projected visual tokens (scope \"{scope}\"), a max-min diversity selection "
        "keeps {tokens} visual tokens per image; the instruction is not used."
    ),
    "voco": (
        "VoCo-LLaMA: the language model distils the image into {num_voco_tokens} <voco> token(s) through an attention "
        "mask; at inference only their per-layer key/value cache is kept (trained weights)."
    ),
}
# A folder of the local Hub cache: .../models--{namespace}--{name}/snapshots/{revision}
HUB_CACHE_FOLDER = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots(?:[/\\]|$)")


def hub_model_id(name: str | Path) -> str:
    """`name` as a Hub model id for a card's `base_model`.

    A folder of the local Hub cache gives the id it was downloaded from. A `namespace/name` string is taken as
    the id even when a local folder has that path (downloads are often kept there). Anything else that is a
    local path, or not of the form `name` / `namespace/name`, raises ValueError.
    """
    text = str(name)
    cached = HUB_CACHE_FOLDER.search(text)
    if cached:
        return cached["repo"].replace("--", "/")
    try:
        validate_repo_id(text)
        local = "/" not in text and Path(text).expanduser().exists()
    except HFValidationError:
        local = True
    if local:
        raise ValueError(
            f"base_model {text!r} is a local path, not a Hub model id; the card must name the Hub model the "
            "checkpoint derives from: give its id as base_model (--base-model on the command line), "
            "e.g. llava-hf/llava-1.5-7b-hf"
        )
    return text

# Where a family's method differs from the note above (a tower without CLS).
FAMILY_METHOD_NOTES = {
    ("llava-onevision", "visionzip"): (
        "VisionZip (training-free) on SigLIP, which has no CLS token: every 729-patch view keeps {dominant} dominant "
        "patches (the most attention received, head-averaged, at the layer whose output becomes the features) and "
        "{contextual} contextual tokens (the rest merged by key similarity), before the projector: {tokens} visual "
        "tokens reach the language model."
    ),
}


def model_card(
    compression: dict,
    tokens_per_image: int | str,
    base_model: str | None = None,
    family: str = "llava",
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_results: list[EvalResult] | None = None,
    model_name: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """The card of a slim checkpoint.

    Args:
        compression: the checkpoint's `config.compression` (canonical form).
        tokens_per_image: visual-token placeholders the processor writes per image (a number, or a description
            where it depends on the image, as for LLaVA-NeXT's anyres grids).
        base_model: Hub id of the model it derives from (a local path raises ValueError); None leaves it out.
        family: tag of the model family ("llava", "llava-next", ...).
        eval_results: `huggingface_hub.EvalResult`s, written as `model-index` and as a table in the text.
        model_name: the name in `model-index` and the title (default: from base_model and method).
        tags: more tags, after slimvlm's own.
    """
    method = compression["method"]
    base_model = None if base_model is None else hub_model_id(base_model)
    title = f"{base_model.split('/')[-1] if base_model else family} + SlimVLM ({method})"
    own_tags = ["slimvlm", "visual-token-compression", family] + ([METHOD_TAGS[method]] if method in METHOD_TAGS else [])
    data = ModelCardData(
        base_model=base_model,
        base_model_relation=BASE_MODEL_RELATIONS.get(method) if base_model else None,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        datasets=datasets,
        tags=own_tags + [tag for tag in tags or () if tag not in own_tags],
        eval_results=eval_results or None,
        model_name=(model_name or title) if eval_results else None,
    )
    body = [
        f"# {model_name or title}",
        "",
        FAMILY_METHOD_NOTES.get((family, method), METHOD_NOTES["visionzip_ratios" if "dominant_ratio" in compression
                                                                else method]).format(**{**compression, "tokens": tokens_per_image}),
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained("<this repo>", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained("<this repo>", trust_remote_code=True)',
        "```",
        "",
        f"- Compression (`config.compression`): `{json.dumps(compression, sort_keys=True)}`",
        f"- Visual-token placeholders per image written by the processor: {tokens_per_image}",
        "- Remote code: the modeling, configuration and processing files of SlimVLM travel with this checkpoint;"
        " they import only torch and transformers.",
        "- Change the setting after loading with `model.set_compression({...})` and `processor.set_compression({...})`.",
        "",
    ]
    if eval_results:
        body += ["## Results", "", "| dataset | metric | value |", "|---|---|---|"]
        body += [f"| {r.dataset_name} | {r.metric_name or r.metric_type} | {r.metric_value} |" for r in eval_results] + [""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def card_for_model(model, base_model: str | None = None, **kwargs) -> ModelCard:
    """`model_card` for a loaded Slim model: compression, placeholder count and family come from it.

    base_model defaults to the id the model was loaded from (`config._name_or_path`) when that is a Hub id,
    and is left out when it was a local folder.
    """
    if base_model is None:
        try:
            base_model = hub_model_id(model.config._name_or_path or "")
        except ValueError:
            base_model = None
    family = FAMILY_TAGS.get(model.config.model_type, model.config.model_type)
    return model_card(model.config.compression, model.image_tokens_summary(), base_model, family=family, **kwargs)


def write_model_card(folder: str | Path, card: ModelCard, overwrite: bool = True) -> Path:
    """Write `card` as `folder/README.md` (unless one exists and `overwrite` is False); returns the path."""
    path = Path(folder) / CARD_FILE
    if overwrite or not path.exists():
        card.save(path)
    return path


def write_card_unless_present(model, save_directory: str | os.PathLike) -> Path:
    """The `save_pretrained` hook: write the model's card into `save_directory` unless it has a README.md."""
    return write_model_card(save_directory, card_for_model(model), overwrite=False)


def push_to_hub_with_card(
    model,
    repo_id: str,
    *,
    processor=None,
    base_model: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """`push_to_hub` of Slim models: weights, config and remote code, the processor when given, and the card, in one commit.

    transformers' own `push_to_hub` replaces README.md with the repo's current card (or a generic one); a slim
    checkpoint's card must say what it is (`card_for_model`), so it is written here instead. `base_model` (a Hub
    id) overrides the id the model was loaded from; `tags` are added to slimvlm's. Returns the `CommitInfo`.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    tags = list(dict.fromkeys([*(getattr(model, "model_tags", None) or []), *(tags or [])]))
    card = card_for_model(model, base_model=base_model, tags=tags)
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(folder)
        write_model_card(folder, card)
        return api.upload_folder(
            folder_path=folder, repo_id=repo_id, revision=revision, token=token, create_pr=create_pr,
            commit_message=commit_message or "Upload SlimVLM checkpoint", commit_description=commit_description,
        )


__all__ = ["card_for_model", "hub_model_id", "model_card", "push_to_hub_with_card", "write_card_unless_present",
           "write_model_card"]
