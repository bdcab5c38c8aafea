"""`slimvlm demo`: the bundled shapes-VQA model answering held-out questions with every method.

For each setting it reports what is true and meaningful on a 2 M-parameter model: the visual tokens that
reach (or stay in) the language model, the KV cache a sample leaves after its prompt, and exact-match
accuracy on the same held-out questions. It does not time prefill: on a model this small, fixed per-call
overhead swamps the language model's savings, so wall-clock ratios would mislead. Speed is measured at
LLaVA-1.5-7B shapes by benchmarks/bench_speed.py (README, "Benchmarks").

VoCo-LLaMA needs VoCo-trained weights: the bundled companion `tiny-shapes-llava-voco` is the bundled model
fine-tuned by benchmarks/train_voco_demo.py (K = 2 `<voco>` tokens) and answers from the two cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..voco import cache_bytes_per_token
from . import shapes
from .voco_shapes import evaluate_voco

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = ASSETS / "tiny-shapes-llava"
BUNDLED_VOCO_MODEL = ASSETS / "tiny-shapes-llava-voco"
MAX_SAMPLES = 1000  # held-out questions per run: about 5 min on 2 CPU cores (48 take 15 s)


@dataclass
class DemoRow:
    """One compression setting's results on the demo questions."""

    label: str
    visual_tokens: str
    kv_bytes: float  # mean KV-cache bytes per sample after its prompt
    accuracy: float | None
    answers: list[str] = field(default_factory=list)


def demo_settings(num_text_layers: int) -> list[tuple[str, dict]]:
    """(label, compression) pairs the demo runs on the base model: the baseline, then VisionZip and SparseVLM."""
    from ..configuration_slimvlm import sparsevlm_setting

    settings = [("none", {"method": "none"})]
    for tokens in (192, 64, 16):
        settings.append((f"visionzip {tokens}", {"method": "visionzip", "tokens": tokens}))
    for preset in (192, 64):
        settings.append((f"sparsevlm {preset} (preset budgets)", sparsevlm_setting(num_text_layers, preset)))
    # At VisionZip's 64 tokens, on the same questions; CDPruner conditions on the question (LLM-embedding relevance).
    settings.append(("cdpruner 64", {"method": "cdpruner", "tokens": 64, "relevance": "llm_embeddings"}))
    settings.append(("divprune 64", {"method": "divprune", "tokens": 64}))
    return settings


def _per_layer_bytes(model) -> float:
    config = model.config.text_config
    return cache_bytes_per_token(config, model.dtype) / config.num_hidden_layers


@torch.no_grad()
def answer_llava(model, processor, samples, prompt_builder, batch_size: int = 16) -> tuple[list[str], float]:
    """Greedy answers and the mean KV-cache bytes per sample left by each prompt (real tokens, every layer)."""
    per_layer = _per_layer_bytes(model)
    layers = model.config.text_config.num_hidden_layers
    answers, kv = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        question = {"instructions": [s.question for s in batch]} if model.config.compression["method"] == "cdpruner" else {}
        inputs = processor(text=[prompt_builder(s.question) for s in batch], images=[s.image for s in batch],
                           padding=True, return_tensors="pt", **question)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers += processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if model.config.compression["method"] == "sparsevlm":
            # Each layer segment keeps its own (pruned) tokens: the report has every sample's per-layer lengths.
            kv += [sum(lengths) * per_layer for lengths in model.sparsevlm_report.real_kv_lengths]
        else:
            kv += [int(n) * layers * per_layer for n in inputs["attention_mask"].sum(-1)]
    return [a.strip() for a in answers], sum(kv) / len(kv)


def _accuracy(samples, answers) -> float | None:
    if any(s.answer is None for s in samples):
        return None
    return sum(shapes.normalize_answer(a) == s.answer for a, s in zip(answers, samples)) / len(samples)


def run_llava_settings(model, processor, samples, prompt_builder) -> list[DemoRow]:
    rows = []
    for label, compression in demo_settings(model.config.text_config.num_hidden_layers):
        try:
            model.set_compression(compression)
        except ValueError as error:  # e.g. a budget the model's geometry cannot take
            rows.append(DemoRow(f"{label} (skipped: {error})", "-", float("nan"), None))
            continue
        processor.set_compression(model.config.compression)
        answers, kv = answer_llava(model, processor, samples, prompt_builder)
        if compression["method"] == "sparsevlm":
            equal = model.sparsevlm_report.equal_tokens
            tokens = f"ET {sum(equal) / len(equal):.0f} of {model.sparsevlm_report.visual_tokens[0]}"
        else:
            tokens = str(model.image_token_count())
        rows.append(DemoRow(label, tokens, kv, _accuracy(samples, answers), answers))
    return rows


def tuned_rows(model, processor, samples, prompt_builder) -> list[DemoRow]:
    """VisionZip‡ 64 (projector tuned) and VisionZip 64 + LoRA: the bundled model with the small tuned files of
    benchmarks/tune_demo.py (slimvlm/demo/tuned.py); none when they are not installed."""
    from . import tuned

    if not tuned.tuned_available():
        return []
    processor.set_compression(tuned.COMPRESSION)
    rows = []
    for label, variant in (("visionzip‡ 64 (projector tuned)", tuned.with_projector),
                           ("visionzip 64 + lora (tuned)", tuned.with_lora)):
        answers, kv = answer_llava(variant(model), processor, samples, prompt_builder)
        rows.append(DemoRow(label, "64", kv, _accuracy(samples, answers), answers))
    return rows


@torch.no_grad()
def run_voco(voco_model, voco_processor, samples) -> DemoRow:
    """The VoCo companion answering from its cached VoCo K/V (two-stage inference)."""
    count = voco_model.config.compression["num_voco_tokens"]
    _, predictions = evaluate_voco(voco_model, voco_processor, samples, batch_size=16)
    tokenizer = voco_processor.tokenizer
    from .voco_shapes import text_pieces

    text_lengths = [len(text_pieces(tokenizer, s.question, None)[0]) for s in samples]
    per_token = cache_bytes_per_token(voco_model.config.text_config, voco_model.dtype)
    kv = sum((count + n) * per_token for n in text_lengths) / len(samples)
    return DemoRow(f"voco K={count} (fine-tuned companion)", str(count), kv, _accuracy(samples, predictions), predictions)


def format_report(rows: list[DemoRow], samples, examples: int = 3) -> str:
    baseline = rows[0].kv_bytes
    scored = rows[0].accuracy is not None
    header = f"{'setting':<36} {'visual tokens':>14} {'KV cache / sample':>22}" + (f" {'accuracy':>9}" if scored else "")
    lines = [header, "-" * len(header)]
    for row in rows:
        kv = f"{row.kv_bytes / 1024:.1f} KiB ({row.kv_bytes / baseline:.2f}x)" if row.kv_bytes == row.kv_bytes else "-"
        accuracy = f" {row.accuracy:>9.2f}" if row.accuracy is not None else (" " * 10 if scored else "")
        lines.append(f"{row.label:<36} {row.visual_tokens:>14} {kv:>22}{accuracy}")
    lines.append("")
    for index, sample in enumerate(samples[:examples]):
        truth = f" (expected: {sample.answer})" if sample.answer is not None else ""
        lines.append(f"Q{index + 1}: {sample.question}{truth}")
        lines.append("    " + " | ".join(f"{row.label.split(' (')[0]}: {row.answers[index] if index < len(row.answers) else '-'}"
                                       for row in rows if row.answers))
    return "\n".join(lines)


def check_samples(samples) -> None:
    """ValueError unless `samples` is a whole number of held-out questions in 1..MAX_SAMPLES."""
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"--samples must be a whole number from 1 to {MAX_SAMPLES} (held-out questions to answer), "
                         f"got {samples!r}")


def check_voco_model(path, option: str = "--voco-model") -> None:
    """ValueError unless the checkpoint at `path` is a VoCo one (compression method 'voco' and a `<voco>` id in its
    config); reads only its config, so it fails before any weight loads."""
    from ..auto import family_of

    config = family_of(path).config.from_pretrained(path)
    if config.compression.get("method") != "voco" or config.voco_token_id is None:
        raise ValueError(f"{option} {path} is not a VoCo checkpoint (compression {config.compression}, voco_token_id "
                         f"{config.voco_token_id}); give a VoCo-trained slim checkpoint (compression method 'voco'), "
                         f"or leave {option} out")


def run_demo(model_path=None, voco_model_path=None, samples: int = 48, seed: int = 0, image=None,
             question: str | None = None) -> str:
    """Run the demo and return its report (the CLI prints it). Every argument is checked before a weight loads."""
    from ..inference import llava_prompt, load

    check_samples(samples)
    torch.manual_seed(0)
    bundled = model_path is None
    model_path = BUNDLED_MODEL if bundled else model_path
    if voco_model_path is not None:
        check_voco_model(voco_model_path)
    elif bundled and (BUNDLED_VOCO_MODEL / "config.json").exists():
        voco_model_path = BUNDLED_VOCO_MODEL
    if image is not None:
        from PIL import Image

        items = [shapes.Sample(image=Image.open(image).convert("RGB"), question=question or "what color is the circle ?",
                               answer=None, qtype="user")]
    else:
        items = shapes.make_samples("heldout", samples, seed=seed, start=10_000)
    prompt_builder = shapes.build_prompt if bundled else llava_prompt

    model, processor = load(model_path)
    rows = run_llava_settings(model, processor, items, prompt_builder)
    if bundled:
        rows += tuned_rows(model, processor, items, prompt_builder)
    if voco_model_path is not None:
        voco_model, voco_processor = load(voco_model_path)
        rows.append(run_voco(voco_model, voco_processor, items))
    what = f"{len(items)} held-out question(s), one image each" if image is None else f"your image: {image}"
    head = (f"model: {model_path}" + (f"\nVoCo model: {voco_model_path}" if voco_model_path else "")
            + f"\n{what}; greedy answers; KV cache = keys + values of every prompt token in every layer "
            f"({model.dtype}), relative to uncompressed\n")
    tail = ("\nSpeed: not timed here (on a 2 M-parameter model fixed per-call overhead dominates). Prefill at "
            "LLaVA-1.5-7B shapes: README 'Benchmarks' (benchmarks/bench_speed.py).")
    return head + "\n" + format_report(rows, items) + "\n" + tail
