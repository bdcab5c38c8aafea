"""`slimvlm` command line: demo | generate | convert | export | push.

    slimvlm demo                                   # bundled model, no network: every method at a few budgets
    slimvlm demo --image cat.png --question "what color is the circle ?"
    slimvlm generate --model llava-hf/llava-1.5-7b-hf --image cat.png --question "..." \
        --compression '{"method": "visionzip", "tokens": 64}'
    slimvlm convert llava-hf/llava-1.5-7b-hf out/ --compression '{"method": "visionzip", "tokens": 64}'
    slimvlm export out/voco-model exported/ --mode voco-only
    slimvlm push out/ my-user/llava-1.5-7b-visionzip-64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .configuration_slimvlm import sparsevlm_setting

BUNDLED_MODEL = Path(__file__).parent / "demo" / "assets" / "tiny-shapes-llava"


def _compression(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--compression must be JSON such as '{{\"method\": \"visionzip\", \"tokens\": 64}}': {error}")
    if not isinstance(value, dict):
        raise SystemExit(f"--compression must be a JSON object, got {text!r}")
    return value


def load(model_id: str | Path, compression: dict | None = None, dtype: torch.dtype = torch.float32):
    """A Slim model and processor from a stock or Slim checkpoint (local folder or hub id)."""
    from . import SlimLlavaForConditionalGeneration, SlimLlavaProcessor

    # Passing compression=None would reset a slim checkpoint's own setting to "none": only pass what was asked.
    overrides = {} if compression is None else {"compression": compression}
    model = SlimLlavaForConditionalGeneration.from_pretrained(model_id, dtype=dtype, **overrides).eval()
    processor = SlimLlavaProcessor.from_pretrained(model_id, compression=model.config.compression)
    processor.tokenizer.padding_side = "left"
    return model, processor


def demo_settings(num_text_layers: int) -> list[tuple[str, dict]]:
    """(label, compression) pairs the demo runs: the baseline, then each method at a few budgets."""
    settings = [("none (576 tokens)", {"method": "none"})]
    for tokens in (192, 64, 16):
        settings.append((f"visionzip {tokens}", {"method": "visionzip", "tokens": tokens}))
    for preset in (192, 64):
        settings.append((f"sparsevlm {preset}", sparsevlm_setting(num_text_layers, preset)))
    return settings


def visual_tokens_kept(model, outputs) -> str:
    """What reached (or stayed in) the language model, as a short string."""
    if model.config.compression["method"] == "sparsevlm":
        # SparseVLM prunes inside the LLM: report its "equal tokens" (mean visual tokens over the layers).
        equal_tokens = model.sparsevlm_report.equal_tokens
        return f"ET {sum(equal_tokens) / len(equal_tokens):.1f}"
    return str(model.image_token_count())


def time_prefill(model, inputs, repeats: int = 3) -> tuple[float, object]:
    """Median wall-clock seconds of one prefill forward (vision tower + compression + LLM), and its output."""
    outputs, times = None, []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = model(**inputs, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times), outputs


def answer(model, processor, images, questions, prompt_builder, max_new_tokens: int = 8) -> tuple[list[str], float, object]:
    inputs = processor(text=[prompt_builder(q) for q in questions], images=images, padding=True, return_tensors="pt")
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    seconds, outputs = time_prefill(model, inputs)
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in texts], seconds, outputs


def run_demo(args) -> int:
    from .demo import shapes

    torch.manual_seed(0)
    model_path = args.model or BUNDLED_MODEL
    if not args.model and not (BUNDLED_MODEL / "config.json").exists():
        raise SystemExit(f"the bundled demo model is missing at {BUNDLED_MODEL}; reinstall slimvlm or pass --model")
    if args.image:
        from PIL import Image

        images = [Image.open(args.image).convert("RGB")]
        questions = [args.question or "what color is the circle ?"]
        expected = [None]
    else:
        samples = shapes.make_samples("heldout", args.samples, seed=args.seed, start=10_000)
        images, questions, expected = [s.image for s in samples], [s.question for s in samples], [s.answer for s in samples]
    prompt_builder = shapes.build_prompt if not args.model else llava_prompt

    model, processor = load(model_path)
    print(f"model: {model_path}\n{len(images)} image(s); prefill = vision tower + compression + language model, "
          f"batch of {len(images)}, median of 3 runs on {torch.get_num_threads()} CPU thread(s)\n")
    baseline = None
    for label, compression in demo_settings(model.config.text_config.num_hidden_layers):
        try:
            model.set_compression(compression)
        except ValueError as error:  # e.g. a budget the model's geometry cannot take
            print(f"== {label}: skipped ({error})\n")
            continue
        processor.set_compression(model.config.compression)
        texts, seconds, outputs = answer(model, processor, images, questions, prompt_builder)
        baseline = baseline or seconds
        print(f"== {label}: visual tokens {visual_tokens_kept(model, outputs)}, prefill {seconds * 1e3:.1f} ms "
              f"({baseline / seconds:.2f}x vs uncompressed)")
        for question, text, truth in zip(questions, texts, expected):
            mark = "" if truth is None else ("  [ok]" if shapes.normalize_answer(text) == truth else f"  [expected {truth}]")
            print(f"   Q: {question}  A: {text}{mark}")
        print()
    return 0


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


def run_generate(args) -> int:
    from PIL import Image

    model, processor = load(args.model, _compression(args.compression), dtype=getattr(torch, args.dtype))
    prompt = args.prompt or default_prompt(model, args.question)
    texts, seconds, outputs = answer(model, processor, [Image.open(args.image).convert("RGB")], [args.question], lambda q: prompt, args.max_new_tokens)
    print(texts[0])
    print(f"[visual tokens {visual_tokens_kept(model, outputs)}, prefill {seconds * 1e3:.1f} ms]", file=sys.stderr)
    return 0


def run_convert(args) -> int:
    from .conversion.slim_checkpoint import convert_to_slim

    folder = convert_to_slim(args.source, args.output, _compression(args.compression), base_model=args.base_model)
    print(f"wrote {folder}")
    return 0


def run_export(args) -> int:
    from .conversion import voco_export

    model, _ = load(args.model)
    folder = voco_export.export_voco_weights(model, args.output, mode=args.mode)
    print(f"wrote {folder}")
    return 0


def run_push(args) -> int:
    from .hub_cards import push_to_hub

    url = push_to_hub(args.folder, args.repo_id, private=args.private, base_model=args.base_model)
    print(url)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimvlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="answer a few images with every method, bundled model, no network")
    demo.add_argument("--model", help="another checkpoint (folder or hub id) instead of the bundled one")
    demo.add_argument("--image", help="answer this image instead of generated ones")
    demo.add_argument("--question", help="question about --image")
    demo.add_argument("--samples", type=int, default=4, help="generated images to answer (default 4)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)

    generate = commands.add_parser("generate", help="answer one image with one compression setting")
    generate.add_argument("--model", required=True)
    generate.add_argument("--image", required=True)
    generate.add_argument("--question", required=True)
    generate.add_argument("--prompt", help="full prompt with <image> (default: LLaVA-1.5 'USER: <image>\\n{question} ASSISTANT:'; "
                          "the VoCo layout of slimvlm.voco.build_voco_prompt for a VoCo model)")
    generate.add_argument("--compression", help='JSON, e.g. \'{"method": "visionzip", "tokens": 64}\'')
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(func=run_generate)

    convert = commands.add_parser("convert", help="stock LLaVA checkpoint -> slim checkpoint (safetensors, remote code, card)")
    convert.add_argument("source")
    convert.add_argument("output")
    convert.add_argument("--compression", required=True, help="JSON compression dict")
    convert.add_argument("--base-model", help="Hub id of the base model for the card (default: source, which must "
                         "then be a Hub id or a folder of the Hub cache)")
    convert.set_defaults(func=run_convert)

    export = commands.add_parser("export", help="export VoCo weights (voco-only / full) to safetensors")
    export.add_argument("model")
    export.add_argument("output")
    export.add_argument("--mode", default="voco-only", choices=["voco-only", "full"])
    export.set_defaults(func=run_export)

    push = commands.add_parser("push", help="upload a slim checkpoint folder (with its card) to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--base-model", help="Hub id to write as the card's base_model before uploading "
                      "(needed when the card names a local path)")
    push.set_defaults(func=run_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
