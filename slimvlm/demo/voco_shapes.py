"""VoCo-LLaMA on the bundled shapes task: prompt pieces and two-stage (or full-mask) evaluation.

Used by `slimvlm demo` (the bundled VoCo companion model) and by benchmarks/train_voco_demo.py, which
fine-tunes that companion. The layout is spec §2's: [BOS, image x N, "\\n", <voco> x K] as the prefix
(compressed once into the VoCo K/V), then the text turn.
"""

from __future__ import annotations

import torch

from ..voco import IGNORE_INDEX, voco_prompt_segments
from . import shapes


def text_pieces(tokenizer, question: str, answer: str | None) -> tuple[list[int], list[int]]:
    """Ids and labels of the text after the VoCo group (no system prompt: the demo vocabulary lacks it)."""
    segments = voco_prompt_segments([(question, answer)], has_image=False, system_prompt="")
    segments[0] = ("\n" + segments[0][0], False)  # the second "\n" of the layout (whitespace for this tokenizer)
    ids, labels = [], []
    for text, supervised in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE_INDEX] * len(piece)
    return ids, labels


def voco_prefix(processor, images, voco_id: int) -> dict:
    """[BOS, image x N, "\\n", <voco> x K] for each image (cut after the VoCo group; the text brings the next "\\n")."""
    prefix = processor(text=["<image>\n"] * len(images), images=images, return_tensors="pt")
    stop = int((prefix["input_ids"] == voco_id).nonzero()[:, 1].max()) + 1
    return {"input_ids": prefix["input_ids"][:, :stop], "attention_mask": prefix["attention_mask"][:, :stop],
            "pixel_values": prefix["pixel_values"]}


def pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    length = max(map(len, rows))
    return torch.tensor([([value] * (length - len(r)) + r) if side == "left" else (r + [value] * (length - len(r)))
                         for r in rows])


@torch.no_grad()
def evaluate_voco(model, processor, samples, batch_size: int = 25, full_mask: bool = False) -> tuple[float, list[str]]:
    """Greedy exact match; cached two-stage inference (default) or the full masked sequence."""
    tokenizer = processor.tokenizer
    predictions = []
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        texts = [text_pieces(tokenizer, s.question, None)[0] for s in batch]
        settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        if full_mask:
            prefix = voco_prefix(processor, [s.image for s in batch], model.config.voco_token_id)
            ids = pad([p.tolist() + t for p, t in zip(prefix["input_ids"], texts)], tokenizer.pad_token_id, "left")
            mask = pad([[1] * (prefix["input_ids"].shape[1] + len(t)) for t in texts], 0, "left")
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=prefix["pixel_values"], **settings)
            new = out[:, ids.shape[1]:]
        else:
            prefix = voco_prefix(processor, [s.image for s in batch], model.config.voco_token_id)
            cache = model.voco_compress(**prefix)
            ids = pad(texts, tokenizer.pad_token_id, "left")
            mask = pad([[1] * len(t) for t in texts], 0, "left")
            new = model.generate(input_ids=ids, attention_mask=mask, voco_cache=cache, **settings)[:, ids.shape[1]:]
        predictions += [shapes.normalize_answer(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    accuracy = sum(p == s.answer for p, s in zip(predictions, samples)) / max(len(samples), 1)
    return accuracy, predictions
