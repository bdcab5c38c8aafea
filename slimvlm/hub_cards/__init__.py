"""Model cards for slim checkpoints, and pushing a checkpoint folder to the Hub.

The card follows the Hub's conventions for remote-code VLMs: `library_name: transformers`,
`pipeline_tag: image-text-to-text`, `base_model` (+ `base_model_relation` for trained weights) and tags.
"""

from __future__ import annotations

import json
from pathlib import Path

METHOD_TAGS = {"visionzip": "visionzip", "sparsevlm": "sparsevlm", "voco": "voco-llama"}
METHOD_NOTES = {
    "none": "No compression: the stock model, wrapped.",
    "visionzip": (
        "VisionZip (training-free): each image keeps {dominant} dominant tokens (CLS included; highest CLS attention "
        "at vision layer L-2) and {contextual} contextual tokens (the rest merged by key similarity), before the "
        "projector: {tokens} visual tokens per image reach the language model."
    ),
    "sparsevlm": (
        "SparseVLM v{version} (training-free): all visual tokens enter the language model; at decoder layers {layers} "
        "text raters score them and the least relevant are pruned (v1.5 recycles some into merged tokens)."
    ),
    "voco": (
        "VoCo-LLaMA: the language model distils the image into {num_voco_tokens} <voco> token(s) through an attention "
        "mask; at inference only their per-layer key/value cache is kept (trained weights)."
    ),
}


def model_card(
    base_model: str,
    compression: dict,
    tokens_per_image: int,
    license: str | None = None,
    datasets: list[str] | None = None,
    results: dict | None = None,
) -> str:
    """Markdown (with YAML front matter) describing a slim checkpoint."""
    method = compression["method"]
    tags = ["slimvlm", "visual-token-compression", "llava"] + ([METHOD_TAGS[method]] if method in METHOD_TAGS else [])
    header = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text", f"base_model: {base_model}"]
    if method == "voco":
        header.append("base_model_relation: finetune")
    if license:
        header.append(f"license: {license}")
    if datasets:
        header += ["datasets:"] + [f"- {name}" for name in datasets]
    header += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    note = METHOD_NOTES[method].format(**compression, tokens=tokens_per_image)
    body = [
        f"# {base_model.rstrip('/').split('/')[-1]} + SlimVLM ({method})",
        "",
        note,
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
    if results:
        body += ["## Results (same pipeline, against the uncompressed model)", "", "| setting | score |", "|---|---|"]
        body += [f"| {name} | {value} |" for name, value in results.items()] + [""]
    return "\n".join(header + body)


def write_model_card(folder: str | Path, **kwargs) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(**kwargs))
    return path


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a slim checkpoint folder (it must carry a model card) to the Hub; returns the repo URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    card = folder / "README.md"
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder} is not a checkpoint folder (no config.json)")
    if not card.exists() or "pipeline_tag:" not in card.read_text():
        raise ValueError(f"{folder} has no model card with pipeline_tag; write one with slimvlm.hub_cards.write_model_card")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload SlimVLM checkpoint")
    return str(url)
