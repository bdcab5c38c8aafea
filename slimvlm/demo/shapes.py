"""Procedural "shapes" visual question answering task for the SlimVLM demo model.

Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB pictures (192 px; with ``PATCH`` = 8 px patches this
gives the LLaVA-1.5 geometry of a 24x24 patch grid) showing 1-4 small coloured shapes (4 colours x 4
shapes) on a noisy, textured background.  Each object sits in one cell of a coarse 3x3 grid (8x8
patches per cell) and is drawn inside a 2x2-patch block at a random place in its cell, so every
object covers exactly 4 of the 576 patches and each of those patches shows a quarter of the shape
(an arc, a corner, a slanted edge, the arms of a cross): what an object is can be seen in each of
its patches, and nowhere else.  That makes per-object information local to a few tokens, which is
what a token-compression benchmark needs.  Each image comes with single-word-answer questions
about it (colour of a shape, shape of a colour, counts, what is at a grid position, "is there a
...", where something is).  Everything is deterministic given ``(split, seed, index)``; the
``"train"`` and ``"heldout"`` splits draw from disjoint seed streams.

Text format (LLaVA-1.5 style, word-level tokenizer)::

    prompt = "USER: <image>\\n{question} ASSISTANT:"      # build_prompt(question)
    target = " {answer}</s>"                               # the model must generate this

The tokenizer (``build_tokenizer``) splits on whitespace and punctuation, so the prompt above
tokenizes to ``<s> USER : <image> what color is the circle ? ASSISTANT :`` (``<s>`` is added by the
post-processor, the newline is just whitespace) and the target to ``red </s>``.  Every answer is
exactly one word token followed by ``</s>``.  ``LlavaProcessor`` expands ``<image>`` into the 576
image tokens before tokenization.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 192
PATCH = 8  # vision tower patch size: IMAGE_SIZE // PATCH = 24 patches per side, like LLaVA-1.5
GRID_PATCHES = IMAGE_SIZE // PATCH
GRID = 3  # coarse grid: objects sit in the cells of a GRID x GRID layout
CELL_PATCHES = GRID_PATCHES // GRID  # 8
BLOCK = 2  # an object is drawn inside a BLOCK x BLOCK patch block
MIN_COVER = 4  # pixels (of PATCH * PATCH) an object must cover for a patch to count as showing it

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
# Four colours and four clearly distinct shapes (the demo tower is trained from scratch on a
# CPU budget; "purple"/"orange" and "diamond" were dropped because they were the confusable ones).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
# Cell index = row * GRID + col; each position name is a single word so answers stay one token.
POSITIONS: tuple[str, ...] = (
    "top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right",
)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
MAX_OBJECTS = 4

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<voco>")
IMAGE_TOKEN = "<image>"
QUESTION_TYPES: tuple[str, ...] = (
    "color_of_shape", "shape_of_color", "count_shape", "count_color",
    "shape_at", "color_at", "exists", "where",
)


@dataclass(frozen=True)
class Obj:
    """One object of a scene: grid cell index, colour name and shape name."""

    cell: int
    color: str
    shape: str


@dataclass
class Sample:
    """One VQA example: the image, a question and its single-word answer."""

    image: Image.Image
    question: str
    answer: str
    qtype: str = ""
    objects: list[Obj] = field(default_factory=list)


# ----------------------------------------------------------------------------- scenes and images


def _rng(split: str, seed: int, index: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs/platforms
    # and makes the train/heldout streams disjoint.
    return random.Random(f"slimvlm-shapes/{split}/{seed}/{index}")


def make_scene(rng: random.Random) -> list[Obj]:
    """Draw 1..MAX_OBJECTS objects in distinct cells with random colours and shapes."""
    n = rng.randint(1, MAX_OBJECTS)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    return [Obj(c, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in cells]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "cross":
        t = r * 0.38
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def render(objects: Sequence[Obj], rng: random.Random, return_mask: bool = False) -> Any:
    """Render a scene.  With ``return_mask`` also return an int map (H, W): 0 = background,
    k = k-th object (1-based), used for the vision tower's dense pre-training targets."""
    nprng = np.random.default_rng(rng.getrandbits(63))
    # Background: random dim base colour + linear gradient + blotchy low-frequency texture + pixel
    # noise, so background patches are not all identical and attention has something to ignore.
    base = nprng.uniform(40, 110, size=3)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    grad = (nprng.uniform(-25, 25) * xx + nprng.uniform(-25, 25) * yy)[..., None]
    blotch = nprng.normal(0, 12, size=(6, 6, 3)).repeat(IMAGE_SIZE // 6, 0).repeat(IMAGE_SIZE // 6, 1)
    bg = base + grad + blotch
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    mdraw = ImageDraw.Draw(mask)
    for k, o in enumerate(objects, start=1):
        row, col = divmod(o.cell, GRID)
        # The object's 2x2-patch block: anywhere in its cell with a margin of one patch, so objects
        # of neighbouring cells never touch.
        top = row * CELL_PATCHES + rng.randint(1, CELL_PATCHES - BLOCK - 1)
        left = col * CELL_PATCHES + rng.randint(1, CELL_PATCHES - BLOCK - 1)
        cx, cy = (left + BLOCK / 2) * PATCH, (top + BLOCK / 2) * PATCH
        r = rng.uniform(0.75, 0.9) * PATCH * BLOCK / 2
        jitter = np.array(COLORS[o.color]) + nprng.integers(-20, 21, size=3)
        fill = tuple(int(v) for v in np.clip(jitter, 0, 255))
        for d, val in ((draw, fill), (mdraw, k)):
            if o.shape == "circle":
                d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=val)
            else:
                d.polygon(_shape_polygon(o.shape, cx, cy, r), fill=val)
    arr = np.asarray(img).astype(np.float32) + nprng.normal(0, 8, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return (img, np.asarray(mask)) if return_mask else img


def patch_cover(objects: Sequence[Obj], mask: np.ndarray) -> np.ndarray:
    """For each of the GRID_PATCHES**2 patches (raster order), the (1-based) object covering most of its
    pixels in ``mask`` (from ``render(..., return_mask=True)``), 0 if none covers ``MIN_COVER`` pixels."""
    side = GRID_PATCHES
    counts = np.stack([np.zeros((side, side), dtype=np.int64)] + [
        (mask == k).reshape(side, PATCH, side, PATCH).sum((1, 3)) for k in range(1, len(objects) + 1)])
    best = counts.argmax(0)
    best[counts.max(0) < MIN_COVER] = 0
    return best.flatten()


# ----------------------------------------------------------------------------- questions


def _index(objects: Sequence[Obj]) -> tuple[dict[str, list[Obj]], dict[str, list[Obj]], dict[int, Obj]]:
    """Objects by shape, by colour (every name, possibly empty) and by grid cell."""
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    by_color = {c: [o for o in objects if o.color == c] for c in COLORS}
    return by_shape, by_color, {o.cell: o for o in objects}


def _questions(objects: Sequence[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """All candidate (qtype, question, answer) triples with an unambiguous answer, balanced so
    that the answer cannot be guessed from the question alone."""
    by_shape, by_color, by_cell = _index(objects)
    out: list[tuple[str, str, str]] = []
    for s, objs in by_shape.items():
        if len(objs) == 1:
            out.append(("color_of_shape", f"what color is the {s} ?", objs[0].color))
    for c, objs in by_color.items():
        if len(objs) == 1:
            out.append(("shape_of_color", f"what shape is the {c} object ?", objs[0].shape))
    # Counts: ask about a present shape/colour most of the time, an absent one sometimes.
    s = rng.choice([o.shape for o in objects]) if rng.random() < 0.75 else rng.choice(SHAPES)
    out.append(("count_shape", f"how many {PLURALS[s]} are there ?", NUMBERS[len(by_shape[s])]))
    c = rng.choice([o.color for o in objects]) if rng.random() < 0.75 else rng.choice(list(COLORS))
    out.append(("count_color", f"how many {c} objects are there ?", NUMBERS[len(by_color[c])]))
    # Positions: empty cells answer "nothing".
    cell = rng.randrange(GRID * GRID) if rng.random() < 0.3 else rng.choice(list(by_cell))
    o = by_cell.get(cell)
    out.append(("shape_at", f"what is at the {POSITIONS[cell]} ?", o.shape if o else "nothing"))
    o = by_cell[rng.choice(list(by_cell))]
    out.append(("color_at", f"what color is the object at the {POSITIONS[o.cell]} ?", o.color))
    # Existence, balanced yes/no; "no" uses a combination absent from the scene, often one that
    # shares the colour or the shape with a present object (so both attributes must be checked).
    present = {(o.color, o.shape) for o in objects}
    if rng.random() < 0.5:
        c, s = rng.choice(sorted(present))
        ans = "yes"
    else:
        ref = rng.choice(list(objects))
        cands = [(c2, s2) for c2 in COLORS for s2 in SHAPES if (c2, s2) not in present
                 and (c2 == ref.color or s2 == ref.shape or rng.random() < 0.2)]
        c, s = rng.choice(cands)
        ans = "no"
    out.append(("exists", f"is there a {c} {s} ?", ans))
    # Where: only for a (colour, shape) that occurs exactly once.
    unique = [o for o in objects if sum(1 for p in objects if (p.color, p.shape) == (o.color, o.shape)) == 1]
    if unique:
        o = rng.choice(unique)
        out.append(("where", f"where is the {o.color} {o.shape} ?", POSITIONS[o.cell]))
    return out


def all_questions(objects: Sequence[Obj]) -> list[tuple[str, str, str]]:
    """Every (qtype, question, answer) triple with an unambiguous answer for a scene (a superset of
    what ``_questions`` samples from; used to get many supervised questions per training image)."""
    by_shape, by_color, by_cell = _index(objects)
    out: list[tuple[str, str, str]] = []
    for s, objs in by_shape.items():
        if len(objs) == 1:
            out.append(("color_of_shape", f"what color is the {s} ?", objs[0].color))
        out.append(("count_shape", f"how many {PLURALS[s]} are there ?", NUMBERS[len(objs)]))
    for c, objs in by_color.items():
        if len(objs) == 1:
            out.append(("shape_of_color", f"what shape is the {c} object ?", objs[0].shape))
        out.append(("count_color", f"how many {c} objects are there ?", NUMBERS[len(objs)]))
    for cell in range(GRID * GRID):
        o = by_cell.get(cell)
        out.append(("shape_at", f"what is at the {POSITIONS[cell]} ?", o.shape if o else "nothing"))
        if o:
            out.append(("color_at", f"what color is the object at the {POSITIONS[cell]} ?", o.color))
    present = {(o.color, o.shape) for o in objects}
    for c in COLORS:
        for s in SHAPES:
            out.append(("exists", f"is there a {c} {s} ?", "yes" if (c, s) in present else "no"))
    for o in objects:
        if sum(1 for p in objects if (p.color, p.shape) == (o.color, o.shape)) == 1:
            out.append(("where", f"where is the {o.color} {o.shape} ?", POSITIONS[o.cell]))
    return out


def make_samples(split: str, n: int, seed: int = 0, per_image: int = 1, start: int = 0) -> list[Sample]:
    """``n`` deterministic samples of ``split`` ("train" or "heldout") for ``seed``.

    ``per_image`` questions are asked about each generated image (distinct question types where
    possible).  Images are generated from indices ``start, start+1, ...``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    out: list[Sample] = []
    index = start
    while len(out) < n:
        for s in make_image_samples(split, seed, index, per_image):
            if len(out) < n:
                out.append(s)
        index += 1
    return out


def make_image_samples(split: str, seed: int, index: int, per_image: int) -> list[Sample]:
    """The image with ``index`` of a split and ``per_image`` questions about it."""
    rng = _rng(split, seed, index)
    objects = make_scene(rng)
    image = render(objects, rng)
    cands = _questions(objects, rng)
    # Round-robin over question types so each image gets a varied set of questions.
    rng.shuffle(cands)
    picked = cands[:per_image] if per_image <= len(cands) else [rng.choice(cands) for _ in range(per_image)]
    return [Sample(image, q, a, t, list(objects)) for t, q, a in picked]


def make_scene_batch(split: str, seed: int, index: int) -> tuple[list[Obj], Image.Image, np.ndarray, list[tuple[str, str, str]]]:
    """Scene, image, object mask and all candidate questions for one image index (for training)."""
    rng = _rng(split, seed, index)
    objects = make_scene(rng)
    image, mask = render(objects, rng, return_mask=True)
    return objects, image, mask, _questions(objects, rng)


# ----------------------------------------------------------------------------- text


def build_prompt(question: str) -> str:
    """LLaVA-1.5 style prompt for one question (the model generates ``" {answer}</s>"``)."""
    return f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


# The processor's chat template: a single user turn with one image gives exactly build_prompt's text; answers
# follow as " ASSISTANT: {answer}</s>", later user turns as " USER: {question}".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}{%- set images = '' -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | map(attribute='type')"
    " | map('replace', 'image', '" + IMAGE_TOKEN + "\\n') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ ('' if loop.first else ' ') + 'USER: ' + images + text }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT: ' + text + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def vocabulary() -> list[str]:
    """Every non-special word the prompts and answers can contain, in a fixed order."""
    words = ["USER", "ASSISTANT", ":", "?", "what", "color", "is", "the", "shape", "object", "objects",
             "how", "many", "are", "there", "at", "a", "where", "yes", "no", "nothing"]
    words += list(COLORS) + list(SHAPES) + list(PLURALS.values()) + list(NUMBERS) + list(POSITIONS)
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


def build_tokenizer():
    """Word-level ``PreTrainedTokenizerFast`` with ids: <pad>=0 <s>=1 </s>=2 <unk>=3 <image>=4 <voco>=5."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Words may contain '-' (positions like "top-left"); everything else non-alphanumeric is its
    # own token.  Whitespace (including the newline after <image>) only separates.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[\w-]+|[^\w\s-]"), behavior="isolated"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=["<image>", "<voco>"],
        model_max_length=1024,
        padding_side="left",
    )


# ----------------------------------------------------------------------------- evaluation


def normalize_answer(text: str) -> str:
    """First word of a decoded generation, lower-cased (exact-match comparison key)."""
    words = text.strip().split()
    return words[0].lower() if words else ""


def evaluate(model: Any, processor: Any, samples: Sequence[Sample], batch_size: int = 25,
             max_new_tokens: int = 3, return_predictions: bool = False, **generate_kwargs: Any) -> Any:
    """Greedy exact-match accuracy of ``model`` on ``samples``.

    Uses only the generic processor/model API (``processor(text=..., images=..., padding=True,
    return_tensors="pt")`` + ``model.generate``), so it works for any LLaVA-like model/processor
    pair, including compressed subclasses.  Left padding is required for batched generation.
    """
    import torch

    processor.tokenizer.padding_side = "left"
    preds: list[str] = []
    correct = 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i:i + batch_size]
        # CDPruner conditions on the question alone, as the papers' evaluation does (specs/cdpruner.md §5.1).
        question = ({"instructions": [s.question for s in batch]}
                    if getattr(processor, "compression", {}).get("method") == "cdpruner" else {})
        inputs = processor(text=[build_prompt(s.question) for s in batch], images=[s.image for s in batch],
                           padding=True, return_tensors="pt", **question)
        inputs = inputs.to(model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        for s, text in zip(batch, processor.tokenizer.batch_decode(new, skip_special_tokens=True)):
            pred = normalize_answer(text)
            preds.append(pred)
            correct += int(pred == s.answer)
    acc = correct / max(len(samples), 1)
    return (acc, preds) if return_predictions else acc
