"""Loading a Slim model with its processor, prompts and greedy answers: shared by the CLI (`slimvlm.cli`) and
the demo (`slimvlm.demo.run`), which both import this module and not each other. Not shipped with checkpoints.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def load(model_id: str | Path, compression: dict | None = None, dtype: torch.dtype = torch.float32):
    """A Slim model and processor from a stock or Slim checkpoint (local folder or hub id).

    Everything that needs no weights is checked before any weight loads: the compression against the model's
    config (depth, vision tower), and under VoCo the tokenizer's `<voco>` token (its id becomes
    `config.voco_token_id` when the config has none, as `slimvlm convert` does)."""
    from .auto import family_of

    family = family_of(model_id)

    # Passing compression=None would reset a slim checkpoint's own setting to "none": only pass what was asked.
    overrides = {} if compression is None else {"compression": compression}
    config = family.config.from_pretrained(model_id, **overrides)
    processor = family.processor.from_pretrained(model_id, compression=config.compression)
    if config.compression["method"] == "voco":
        from .conversion.slim_checkpoint import checked_voco_token_id

        config.voco_token_id = checked_voco_token_id(config, processor.tokenizer)
    model = family.generation.from_pretrained(model_id, config=config, dtype=dtype).eval()
    processor.set_compression(model.config.compression)
    processor.tokenizer.padding_side = "left"
    return model, processor


def visual_tokens_kept(model, inputs) -> str:
    """What reached (or stayed in) the language model for the first sample, as a short string."""
    if model.config.compression["method"] == "sparsevlm":
        # SparseVLM prunes inside the LLM: report its "equal tokens" (mean visual tokens over the layers).
        equal_tokens = model.sparsevlm_report.equal_tokens
        return f"ET {equal_tokens[0]:.1f}"
    # The placeholders the processor wrote: the compressed count (it depends on the image for LLaVA-NeXT).
    return str(int((inputs["input_ids"][0] == model.config.image_token_id).sum()))


def time_prefill(model, inputs, repeats: int = 3) -> tuple[float, object]:
    """Median wall-clock seconds of one prefill forward (vision tower + compression + LLM), and its output."""
    outputs, times = None, []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = model(**inputs, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def answer(model, processor, images, questions, prompt_builder, max_new_tokens: int = 8) -> tuple[list[str], float, dict]:
    """Greedy answers, the median prefill seconds, and the processor's inputs."""
    inputs = processor(text=[prompt_builder(q) for q in questions], images=images, padding=True, return_tensors="pt")
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seconds, _ = time_prefill(model, inputs)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in texts], seconds, inputs


def llava_prompt(question: str) -> str:
    """LLaVA-1.5's single-turn prompt."""
    return f"USER: <image>\n{question} ASSISTANT:"


def default_prompt(model, question: str) -> str:
    """LLaVA-1.5's prompt; a VoCo model gets the VoCo layout (image first, then system prompt and turn),
    which its processor extends with the `<voco>` group."""
    if model.config.compression.get("method") == "voco":
        from .voco import build_voco_prompt

        return build_voco_prompt(question)
    return llava_prompt(question)


__all__ = ["answer", "default_prompt", "llava_prompt", "load", "time_prefill", "visual_tokens_kept"]
