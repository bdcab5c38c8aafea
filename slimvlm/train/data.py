"""Training data: LLaVA instruction records, checked before training, batched with assistant-only labels.

A record (LLaVA-1.5 / Video-LLaVA instruction JSON, or a row of a `datasets` dataset saved to disk):

    {"image": "coco/train2017/000.jpg",            # optional; a path under --image-folder (or a PIL image)
     "video": "clips/0001.mp4",                     # optional, Video-LLaVA: a video file or a folder of frames
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]}

`"image"` may also be a list of paths (one `<image>` marker each). Roles: "human"/"user", "gpt"/"assistant",
"system". Every check runs before the first step (`check_records`) and fails with one line naming the record.

Labels (`ChatCollator`): the conversation is rendered by the processor's own chat template; the tokens of each
assistant turn (as the template renders it, end-of-turn token included) are supervised, everything else is
IGNORE_INDEX. The assistant spans are found by rendering the conversation up to each turn, so any template whose
renderings of a conversation's prefixes are prefixes of each other works (every common one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..voco import IGNORE_INDEX, VoCoDataCollator

IMAGE_MARKER = "<image>"
VIDEO_MARKER = "<video>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _where(index: int) -> str:
    return f"record {index}"


def read_records(data: str | os.PathLike) -> list[dict]:
    """The records of a LLaVA instruction JSON file (a list of objects) or of a `datasets` dataset saved to disk."""
    path = Path(data)
    if path.is_dir():
        if not ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()
                or (path / "dataset_dict.json").is_file()):
            raise FileNotFoundError(f"--data {data} is a folder but no dataset saved with datasets' save_to_disk "
                                    "(no dataset_info.json / state.json); give a LLaVA JSON file or such a folder")
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"--data {data} is a DatasetDict without a 'train' split (splits: {sorted(loaded)})")
            loaded = loaded["train"]
        return [dict(row) for row in loaded]
    if not path.is_file():
        raise FileNotFoundError(f"--data {data} does not exist; give a LLaVA instruction JSON file "
                                "(slimvlm demo-data --output DIR writes one) or a datasets folder")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--data {data} is not valid JSON ({error})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        found = type(records).__name__ if not isinstance(records, list) else \
            type(next(r for r in records if not isinstance(r, dict))).__name__
        raise ValueError(f"--data {data} must be a JSON list of records "
                         f"({{\"image\", \"conversations\": [...]}}), found a {found}")
    return records


def _media_list(value: Any) -> list:
    """"image" / "video": one item or a list of items (one marker each)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve(item: Any, image_folder: Path | None) -> Any:
    if not isinstance(item, str):
        return item  # a PIL image (datasets' Image feature) or frames
    path = Path(item)
    return path if path.is_absolute() or image_folder is None else image_folder / path


@dataclass
class Example:
    """One checked record: chat messages (content lists with image / video items) and its media."""

    messages: list[dict]
    images: list
    videos: list

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) text pairs, for the VoCo collator (markers removed)."""
        pairs, user = [], None
        for message in self.messages:
            text = " ".join(item["text"] for item in message["content"] if item["type"] == "text")
            if message["role"] == "user":
                user = text
            elif message["role"] == "assistant":
                pairs.append((user or "", text))
                user = None
        return pairs


def check_records(records: Sequence[dict], image_folder: str | os.PathLike | None,
                  takes_videos: bool = False) -> list[Example]:
    """Validate every record and turn it into an `Example`; the first problem raises one ValueError /
    FileNotFoundError naming the record's index (and the path for a missing file)."""
    if not records:
        raise ValueError("the training data has no records")
    folder = Path(image_folder) if image_folder is not None else None
    examples = []
    for index, record in enumerate(records):
        where = _where(index)
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a {type(record).__name__}, not an object with 'conversations'")
        conversation = record.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            raise ValueError(f"{where} has no 'conversations' list (keys: {sorted(record)})")
        images = [_resolve(i, folder) for i in _media_list(record.get("image"))]
        videos = [_resolve(v, folder) for v in _media_list(record.get("video"))]
        if videos and not takes_videos:
            raise ValueError(f"{where} has a video but this model takes images only; use a Video-LLaVA model")
        for kind, items in (("image", images), ("video", videos)):
            for item in items:
                if isinstance(item, Path) and not item.exists():
                    hint = "" if folder is not None or item.is_absolute() else " (pass --image-folder)"
                    raise FileNotFoundError(f"{where}: {kind} file {item} does not exist{hint}")
        messages, markers = [], {IMAGE_MARKER: 0, VIDEO_MARKER: 0}
        for turn, message in enumerate(conversation):
            if not isinstance(message, dict) or not isinstance(message.get("value"), str) \
                    or message.get("from") not in ROLES:
                raise ValueError(f"{where}, turn {turn}: expected {{\"from\": \"human\" | \"gpt\", \"value\": str}}, "
                                 f"got {json.dumps(message)[:120]}")
            role, text = ROLES[message["from"]], message["value"]
            content = []
            for marker, item_type in ((IMAGE_MARKER, "image"), (VIDEO_MARKER, "video")):
                count = text.count(marker)
                if count and role != "user":
                    raise ValueError(f"{where}, turn {turn}: {marker} may appear in human turns only")
                markers[marker] += count
                content += [{"type": item_type}] * count
                text = text.replace(marker, "")
            content.append({"type": "text", "text": text.strip()})
            messages.append({"role": role, "content": content})
        for marker, items, kind in ((IMAGE_MARKER, images, "image"), (VIDEO_MARKER, videos, "video")):
            if items and markers[marker] == 0:
                raise ValueError(f"{where} has {len(items)} {kind}(s) but no {marker} in its conversation; "
                                 f"put {marker} where the {kind} goes (LLaVA: at the start of the first human turn)")
            if markers[marker] != len(items):
                raise ValueError(f"{where} has {markers[marker]} {marker} marker(s) but {len(items)} {kind}(s)")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where} has no 'gpt' turn: nothing to train on")
        examples.append(Example(messages, images, videos))
    return examples


def load_image(item: Any):
    from PIL import Image

    if isinstance(item, Path):
        with Image.open(item) as image:
            return image.convert("RGB")
    return item.convert("RGB") if hasattr(item, "convert") else item


def load_video(item: Any) -> list:
    """A video as a list of RGB frames: a folder of frame images or a video file
    (decoded by transformers' `load_video`, which needs a video backend such as PyAV)."""
    if not isinstance(item, Path):
        return item  # frames already decoded (a datasets row)
    if isinstance(item, Path) and item.is_dir():
        frames = sorted(p for p in item.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        return [load_image(p) for p in frames]
    from transformers.video_utils import load_video as decode

    frames, _ = decode(str(item))
    return list(frames)


class SupervisedDataset(torch.utils.data.Dataset):
    """The checked examples; media are read when an item is fetched (in the DataLoader's workers)."""

    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"index": index, "messages": example.messages, "turns": example.turns,
                "images": [load_image(i) for i in example.images], "videos": [load_video(v) for v in example.videos]}


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of each assistant turn in it."""
    def render(upto: list[dict], generation_prompt: bool = False) -> str:
        if not upto:
            return ""
        return processor.apply_chat_template(upto, tokenize=False, add_generation_prompt=generation_prompt)

    text = render(messages)
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, prompt, after = render(messages[:turn]), render(messages[:turn], True), render(messages[: turn + 1])
        if not after.startswith(before) or not text.startswith(after):
            raise ValueError("the chat template renders a conversation's prefixes inconsistently; the assistant "
                             "turns cannot be located for the loss")
        start = len(prompt) if after.startswith(prompt) else len(before)
        spans.append((start, len(after)))
    return text, spans


class ChatCollator:
    """Batches `SupervisedDataset` items: the processor's chat template renders each conversation, the processor
    expands the image / video markers, and labels are the assistant turns' tokens (IGNORE_INDEX elsewhere).
    Right padding (training). Sequences longer than `max_length` are cut on the right, never inside media."""

    MEDIA_KEYS = VoCoDataCollator.IMAGE_KEYS

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        if getattr(processor, "chat_template", None) is None:
            raise ValueError("the model's processor has no chat_template; the loss needs one to find the assistant "
                             "turns (save the processor with a chat template)")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("training needs a fast tokenizer (character offsets); load the processor with use_fast=True")
        self.media_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_MARKER, VIDEO_MARKER,
                          getattr(processor, "image_token", IMAGE_MARKER), getattr(processor, "video_token", VIDEO_MARKER))
                          if t in self.tokenizer.get_vocab()}

    def encode(self, item: dict) -> dict[str, torch.Tensor]:
        text, spans = assistant_spans(self.processor, item["messages"])
        bos = self.tokenizer.bos_token
        special = not (bos and text.startswith(bos))
        plain = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        plain_labels = [token if any(s <= start < e for s, e in spans) and end > start else IGNORE_INDEX
                        for token, (start, end) in zip(plain["input_ids"], plain["offset_mapping"])]
        media = {}
        if item["images"]:
            media["images"] = item["images"]
        if item["videos"]:
            media["videos"] = item["videos"]
        full = self.processor(text=[text], return_tensors="pt", add_special_tokens=special, **media)
        ids = full["input_ids"][0].tolist()
        labels, j = [], 0
        for token, label in zip(plain["input_ids"], plain_labels):  # the processor only repeats media markers
            if token in self.media_ids:
                while j < len(ids) and ids[j] == token:
                    labels.append(IGNORE_INDEX)
                    j += 1
                continue
            if j >= len(ids) or ids[j] != token:
                raise ValueError(f"record {item['index']}: the processor's tokens do not line up with the tokenizer's "
                                 "beyond the image markers; this processor is not supported for training")
            labels.append(label)
            j += 1
        if j != len(ids):
            raise ValueError(f"record {item['index']}: the processor wrote {len(ids) - j} tokens the tokenizer did not")
        out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if self.max_length is not None and len(ids) > self.max_length:
            media_positions = [i for i, t in enumerate(ids) if t in self.media_ids]
            if media_positions and media_positions[-1] >= self.max_length:
                raise ValueError(f"record {item['index']} is {len(ids)} tokens with its media, more than --max-length "
                                 f"{self.max_length}, and the cut would fall inside an image; raise --max-length")
            out = {k: v[: self.max_length] for k, v in out.items()}
        out.update({key: full[key] for key in self.MEDIA_KEYS if key in full})
        return out

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_batch([self.encode(item) for item in items], self.tokenizer.pad_token_id, self.MEDIA_KEYS)


def pad_batch(encoded: list[dict], pad_id: int, media_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    from ..voco import cat_padded

    length = max(e["input_ids"].shape[0] for e in encoded)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in encoded:
        n = length - e["input_ids"].shape[0]
        batch["input_ids"].append(torch.cat([e["input_ids"], torch.full((n,), pad_id, dtype=torch.long)]))
        batch["attention_mask"].append(torch.cat([torch.ones_like(e["input_ids"]), torch.zeros(n, dtype=torch.long)]))
        batch["labels"].append(torch.cat([e["labels"], torch.full((n,), IGNORE_INDEX, dtype=torch.long)]))
    out = {key: torch.stack(value) for key, value in batch.items()}
    for key in media_keys:
        tensors = [e[key] for e in encoded if key in e]
        if tensors:
            out[key] = cat_padded(tensors)
    return out


class VoCoChatCollator:
    """The VoCo recipes' collator: the records' (user, assistant) turns through `VoCoDataCollator` (the VoCo
    layout: image first, then the system prompt and the turns; one image or video per record)."""

    def __init__(self, processor, max_length: int | None = None):
        self.inner = VoCoDataCollator(processor, max_length=max_length)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        examples = []
        for item in items:
            if len(item["images"]) + len(item["videos"]) > 1:
                raise ValueError(f"record {item['index']}: VoCo training takes one image or video per record")
            example = {"conversation": item["turns"]}
            if item["images"]:
                example["image"] = item["images"][0]
            if item["videos"]:
                example["video"] = item["videos"][0]
            examples.append(example)
        return self.inner(examples)
