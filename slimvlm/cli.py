"""`slimvlm` command line: demo | generate | convert | convert-original | export | export-projector | import-projector | push | eval.

    slimvlm demo                                   # bundled model, no network: every method, tokens / KV cache / accuracy
    slimvlm demo --image cat.png --question "what color is the circle ?"
    slimvlm generate --model llava-hf/llava-1.5-7b-hf --image cat.png --question "..." \
        --compression '{"method": "visionzip", "tokens": 64}'
    slimvlm convert llava-hf/llava-1.5-7b-hf out/ --compression '{"method": "visionzip", "tokens": 64}'
    slimvlm export out/voco-model exported/ --mode voco-only
    slimvlm push out/ my-user/llava-1.5-7b-visionzip-64
    slimvlm eval --tasks gqa --output_path out --model_args 'pretrained=llava-hf/llava-1.5-7b-hf,compression={"method":"visionzip","tokens":64}'

Bad input ends in one line on stderr naming the problem and the fix, and exit status 1 (usage errors: the
subcommand's usage, status 2); Ctrl-C in one line and status 130; add --debug to any command for the full
traceback. Everything that needs no weights (inputs, output folder, the Hub) is checked before any weight loads.
Long steps show a progress bar on a terminal only (tqdm when installed; transformers' own bars likewise).
Shared loading and answering code lives in slimvlm.inference (the demo uses it too; it does not import this module).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .configuration_slimvlm import normalize_compression
from .demo.run import BUNDLED_MODEL  # noqa: F401  (re-exported: the bundled model's folder)
from .inference import answer, default_prompt, llava_prompt, load, time_prefill, visual_tokens_kept  # noqa: F401

# (logger, message prefix, how many to show in one command)
CLI_NOTICES = (
    # logged at every 8-bit matmul with non-fp16 inputs: dozens per generation
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast", 1),
    # a stock LLaVA checkpoint loaded into the Slim class: what the CLI is for (README: "expected")
    ("transformers.configuration_utils", "You are using a model of type `llava` to instantiate a model of type `slim_llava`", 0),
)
EXAMPLE_COMPRESSION = '{"method": "visionzip", "tokens": 64}'


def _compression(text: str | None) -> dict | None:
    """The --compression JSON, checked on its own (the model's depth and tower are checked when its config loads)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--compression must be JSON such as '{EXAMPLE_COMPRESSION}', got {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"--compression must be a JSON object such as '{EXAMPLE_COMPRESSION}', got {text!r}")
    try:
        # Per-frame keys are allowed here; a family without videos refuses them when its config loads.
        normalize_compression(value, video=True, relevance_encoder=None)  # the model says whether it has one
    except (TypeError, ValueError) as error:
        raise type(error)(f"--compression: {error}") from error
    return value


def check_model_source(source: str | Path, option: str = "model") -> None:
    """Fail early, in words, on a model argument that is neither a checkpoint folder nor a Hub id, or a Hub id
    that cannot be fetched (offline and not cached, or the Hub unreachable)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{option} folder {source} has no config.json; give a checkpoint folder "
                                    "(config.json + weights) or a Hub id such as llava-hf/llava-1.5-7b-hf")
        return
    if path.exists():
        raise ValueError(f"{option} {source} is a file; give a checkpoint folder or a Hub id such as llava-hf/llava-1.5-7b-hf")
    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise FileNotFoundError(f"{option} folder {source} does not exist (and it is no Hub id such as "
                                "llava-hf/llava-1.5-7b-hf); check the path") from None
    check_hub(option, str(source))


def check_output(output: str | Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Fail early on an output folder that exists (without --overwrite), is a file, is the source itself, or
    cannot be written (read-only, a parent that is a file, a mount point to replace, ...)."""
    from .conversion.atomic import check_output_folder

    output = Path(output)
    if source is not None and output.exists() and output.resolve() == Path(source).expanduser().resolve():
        raise ValueError(f"output folder {output} is the source folder; write to another folder")
    check_output_folder(output, overwrite, overwrite_hint="--overwrite")


# ----------------------------------------------------------------------------- the Hub, without a network

HUB_PROBE_SECONDS = 5.0  # one request, no retries: a missing network fails in seconds, not after ~27 s of retries
_NETWORK_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "ConnectionError", "NetworkError", "ProxyError",
                        "TimeoutException", "TransportError", "ReadTimeout", "PoolTimeout"}


def is_network_error(error: BaseException | None) -> bool:
    """True when `error`, or an error it was raised from, says the network or the Hub could not be reached."""
    import socket

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (ConnectionError, socket.gaierror)):
            return True
        if any(cls.__name__ in _NETWORK_ERROR_NAMES and cls.__module__.split(".")[0] in
               ("httpx", "httpx2", "httpcore", "requests", "urllib3") for cls in type(error).__mro__):
            return True
        error = error.__cause__ or error.__context__
    return False


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the Hub (HF_ENDPOINT) cannot be reached, or None when it answers (any HTTP status counts)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001  (only network errors count; anything else: let the real call tell)
        if is_network_error(error):
            return " ".join(str(error).split()) or type(error).__name__
    return None


def check_hub(what: str, repo_id: str | None = None) -> None:
    """Fail in one line, within seconds, when `what` needs the Hub and cannot have it: under HF_HUB_OFFLINE=1
    a model that is not cached (or an upload: repo_id None), otherwise a Hub that does not answer."""
    from huggingface_hub import constants, try_to_load_from_cache

    endpoint = constants.ENDPOINT
    cached = repo_id is not None and isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if repo_id is None:
            raise ConnectionError(f"{what} needs the Hub ({endpoint}) and HF_HUB_OFFLINE=1 is set; unset HF_HUB_OFFLINE")
        if not cached:
            raise FileNotFoundError(f"{what} {repo_id} is not in the local Hub cache ({constants.HF_HUB_CACHE}) and "
                                    f"HF_HUB_OFFLINE=1 forbids downloading it; unset HF_HUB_OFFLINE to download it from "
                                    f"the Hub ({endpoint}), or give a checkpoint folder")
        return
    cause = hub_unreachable()
    if cause is None:
        return
    if repo_id is None:
        raise ConnectionError(f"cannot reach the Hub at {endpoint} ({cause}); {what} needs it: check the network "
                              "(and HF_ENDPOINT / proxy settings)")
    if cached:
        raise ConnectionError(f"cannot reach the Hub at {endpoint} ({cause}); {repo_id} is in the local cache: rerun "
                              "with HF_HUB_OFFLINE=1 to use it")
    raise ConnectionError(f"cannot reach the Hub at {endpoint} ({cause}) to download {what} {repo_id}; check the network "
                          "(and HF_ENDPOINT / proxy settings), or give a checkpoint folder")


def open_image(path: str | Path):
    """The image at `path` as RGB, or one clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    if Path(path).is_dir():
        raise IsADirectoryError(f"image {path} is a folder; give the path of an image file (PNG, JPEG, ...)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path} does not exist; give the path of an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL raises SyntaxError on some broken files
        raise ValueError(f"image {path} cannot be read ({error}); give a PNG, JPEG or other image file PIL can open") from error


class Progress:
    """The steps of one long command on stderr: a tqdm bar when tqdm is installed, else one line per step.

    Shown only when stderr is a terminal (or `enabled=True`), so pipes, logs and tests stay quiet.
    Call it with a description when a step begins.
    """

    def __init__(self, steps: int, enabled: bool | None = None):
        self.steps, self.started, self.bar = steps, 0, None
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=steps, file=sys.stderr, leave=False, bar_format="{desc} |{bar}| {n}/{total} [{elapsed}]")

    def __call__(self, description: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            print(f"[{self.started + 1}/{self.steps}] {description} ...", file=sys.stderr, flush=True)
        else:
            self.bar.update(1 if self.started else 0)
            self.bar.set_description_str(description)
        self.started += 1

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


class _Repeats(logging.Filter):
    """Drops the records whose message starts with `prefix` once `keep` of them have passed."""

    def __init__(self, prefix: str, keep: int):
        super().__init__()
        self.prefix, self.keep = prefix, keep

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        self.keep -= 1
        return self.keep >= 0


@contextmanager
def fewer_notices() -> Iterator[None]:
    """While a command runs, show the log notices of CLI_NOTICES at most as often as they say (filters are
    added to those loggers on entry and removed on exit)."""
    filters = [(logging.getLogger(name), _Repeats(prefix, keep)) for name, prefix, keep in CLI_NOTICES]
    for logger, notice_filter in filters:
        logger.addFilter(notice_filter)
    try:
        yield
    finally:
        for logger, notice_filter in filters:
            logger.removeFilter(notice_filter)


def run_demo(args) -> int:
    from .demo.run import check_samples, check_voco_model
    from .demo.run import run_demo as demo

    check_samples(args.samples)
    if not args.model and not (BUNDLED_MODEL / "config.json").exists():
        raise FileNotFoundError(f"the bundled demo model is missing at {BUNDLED_MODEL}; reinstall slimvlm or pass --model")
    for option, source in (("--model", args.model), ("--voco-model", args.voco_model)):
        if source is not None:
            check_model_source(source, option)
    if args.voco_model is not None:
        check_voco_model(args.voco_model)  # its config only
    if args.image:
        open_image(args.image)  # a missing or unreadable image fails here, before any model loads
    print(demo(args.model, args.voco_model, samples=args.samples, seed=args.seed, image=args.image,
               question=args.question))
    return 0


def run_generate(args) -> int:
    compression = _compression(args.compression)
    check_model_source(args.model, "--model")
    image = open_image(args.image)
    with Progress(2) as progress:
        progress(f"loading {args.model}")
        model, processor = load(args.model, compression, dtype=getattr(torch, args.dtype))
        progress("generating")
        prompt = args.prompt or default_prompt(model, args.question)
        texts, seconds, inputs = answer(model, processor, [image], [args.question], lambda q: prompt, args.max_new_tokens)
    print(texts[0])
    print(f"[visual tokens {visual_tokens_kept(model, inputs)}, prefill {seconds * 1e3:.1f} ms]", file=sys.stderr)
    return 0


def run_convert(args) -> int:
    from .conversion.slim_checkpoint import convert_to_slim

    compression = _compression(args.compression)
    check_model_source(args.source, "source")
    check_output(args.output, args.overwrite, source=args.source)
    with Progress(3) as progress:
        folder = convert_to_slim(args.source, args.output, compression, base_model=args.base_model,
                                 overwrite=args.overwrite, progress=progress, vision_tower=args.vision_tower,
                                 vision_tower_aux=args.vision_tower_aux, relevance_encoder=args.relevance_encoder)
    print(f"wrote {folder}")
    return 0


def run_convert_original(args) -> int:
    from .conversion.llava_original import convert_original_llava, is_original_llava_folder

    check_model_source(args.source, "source")
    if not is_original_llava_folder(args.source):
        raise ValueError(f"{args.source} is not a folder of the original LLaVA code's layout (config.json with "
                         "architectures LlavaLlamaForCausalLM / LlavaMistralForCausalLM); for llava-hf checkpoints use convert")
    check_output(args.output, args.overwrite, source=args.source)
    with Progress(5) as progress:
        folder = convert_original_llava(args.source, args.output, vision_tower=args.vision_tower,
                                        overwrite=args.overwrite, progress=progress)
    print(f"wrote {folder}")
    return 0


def run_export(args) -> int:
    from .auto import family_of
    from .conversion import voco_export

    check_model_source(args.model)
    if (args.mode == "delta") != (args.base is not None):
        raise ValueError("--mode delta needs --base BASE (the checkpoint the model was fine-tuned from), "
                         "and --base is only used with --mode delta")
    if args.base is not None:
        check_model_source(args.base, "--base")
    check_output(args.output, args.overwrite, source=args.model)
    family = family_of(args.model)
    config = family.config.from_pretrained(args.model)
    if config.voco_token_id is None:
        raise ValueError(f"{args.model} is not a VoCo checkpoint (config.voco_token_id is None, compression "
                         f"{config.compression}); export needs one: slimvlm.voco.add_voco_token, then VoCo training")
    with Progress(3 if args.base else 2) as progress:
        progress(f"loading {args.model}")
        model, processor = load(args.model)
        base_state = None
        if args.base is not None:
            progress(f"loading {args.base}")
            base_state = family.generation.from_pretrained(args.base, dtype=model.dtype).state_dict()
        progress(f"exporting ({args.mode}) to {args.output}")
        folder = voco_export.export_voco_weights(model, args.output, mode=args.mode, base_model=args.base or "",
                                                 processor=processor, overwrite=args.overwrite, base_state_dict=base_state)
    print(f"wrote {folder}")
    return 0


def run_export_projector(args) -> int:
    from .conversion.projector import export_projector

    check_model_source(args.model)
    check_output(args.output, args.overwrite, source=args.model)
    print(f"wrote {export_projector(args.model, args.output, overwrite=args.overwrite)}")
    return 0


def run_import_projector(args) -> int:
    from .conversion.projector import import_projector

    check_model_source(args.base, "base")
    check_output(args.output, args.overwrite, source=args.base)
    print(f"wrote {import_projector(args.base, args.projector, args.output, overwrite=args.overwrite)}")
    return 0


def run_push(args) -> int:
    from huggingface_hub.utils import validate_repo_id

    from .hub_cards import checked_card, push_to_hub

    validate_repo_id(args.repo_id)
    checked_card(Path(args.folder), args.base_model)  # what push_to_hub checks first, before the Hub is asked
    check_hub("push")
    with Progress(3) as progress:
        url = push_to_hub(args.folder, args.repo_id, private=args.private, base_model=args.base_model, progress=progress)
    print(url)
    return 0


def run_eval(args) -> int:
    from .eval.run import run_eval as evaluate

    return evaluate(args.lmms_args, args.compare)


def build_parser() -> argparse.ArgumentParser:
    from .conversion.voco_export import EXPORT_MODES

    parser = argparse.ArgumentParser(prog="slimvlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, passes_arguments_on: bool = False, **kwargs) -> argparse.ArgumentParser:
        """A subcommand's parser. passes_arguments_on: arguments it does not know reach `func` as
        args.lmms_args (else they are a usage error, shown with this subcommand's usage, exit status 2)."""
        sub = commands.add_parser(name, help=help, parents=[common], **kwargs)
        sub.set_defaults(command_parser=sub, passes_arguments_on=passes_arguments_on)
        return sub

    # One block per command: command(name, help), its arguments, set_defaults(func=run_<name>).

    demo = command("demo", help="answer a few images with every method, bundled model, no network")
    demo.add_argument("--model", help="another checkpoint (folder or hub id) instead of the bundled one")
    demo.add_argument("--image", help="answer this image instead of generated ones")
    demo.add_argument("--question", help="question about --image")
    demo.add_argument("--voco-model", help="a VoCo-trained checkpoint for the VoCo row (default: the bundled companion)")
    demo.add_argument("--samples", type=int, default=48, help="held-out questions to answer (default 48)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)

    generate = command("generate", help="answer one image with one compression setting")
    generate.add_argument("--model", required=True)
    generate.add_argument("--image", required=True)
    generate.add_argument("--question", required=True)
    generate.add_argument("--prompt", help="full prompt with <image> (default: LLaVA-1.5 'USER: <image>\\n{question} ASSISTANT:'; "
                          "the VoCo layout of slimvlm.voco.build_voco_prompt for a VoCo model)")
    generate.add_argument("--compression", help=f"JSON, e.g. '{EXAMPLE_COMPRESSION}'")
    generate.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.set_defaults(func=run_generate)

    convert = command("convert", help="stock LLaVA checkpoint (or original LLaVA-1.5 / Mini-Gemini layout) -> slim checkpoint "
                      "(safetensors, remote code, card)")
    convert.add_argument("source")
    convert.add_argument("output")
    convert.add_argument("--compression", required=True, help="JSON compression dict")
    convert.add_argument("--base-model", help="Hub id of the base model for the card (default: source, which must "
                         "then be a Hub id or a folder of the Hub cache)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    convert.add_argument("--vision-tower", help="for a source in the original LLaVA code's layout: the CLIP tower "
                         "(Hub id or folder; default: the config's mm_vision_tower)")
    convert.add_argument("--vision-tower-aux", help="for an original Mini-Gemini folder without ConvNeXt weights: the "
                         "open_clip checkpoint (file, folder or Hub id; default: the config's mm_vision_tower_aux)")
    convert.add_argument("--relevance-encoder", help="CDPruner's CLIP (Hub id or folder, e.g. openai/clip-vit-large-patch14-336): "
                         "its text tower, projections and tokenizer are stored inside the slim checkpoint")
    convert.set_defaults(func=run_convert)

    original = command("convert-original", help="original LLaVA code checkpoint (LLaVA-1.5 / 1.6) -> stock "
                       "transformers LLaVA / LLaVA-NeXT checkpoint")
    original.add_argument("source")
    original.add_argument("output")
    original.add_argument("--vision-tower", help="the CLIP tower (Hub id or folder; default: the config's mm_vision_tower)")
    original.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    original.set_defaults(func=run_convert_original)

    export = command("export", help="export VoCo weights (voco-only / full / delta) to safetensors")
    export.add_argument("model")
    export.add_argument("output")
    export.add_argument("--mode", default="voco-only", choices=list(EXPORT_MODES),
                        help="voco-only: <voco> rows + projector; full: the whole model too; delta: fine-tuned - base "
                             "for every LLM tensor (needs --base)")
    export.add_argument("--base", help="with --mode delta: the checkpoint (folder or Hub id) the model was fine-tuned from")
    export.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    export.set_defaults(func=run_export)

    export_proj = command("export-projector", help="write a checkpoint's projector to OUTPUT/projector.safetensors")
    export_proj.add_argument("model", help="checkpoint folder (stock or slim LLaVA / LLaVA-NeXT)")
    export_proj.add_argument("output")
    export_proj.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    export_proj.set_defaults(func=run_export_projector)

    import_proj = command("import-projector", help="copy BASE to OUTPUT with the projector replaced")
    import_proj.add_argument("base", help="checkpoint folder (stock or slim LLaVA / LLaVA-NeXT)")
    import_proj.add_argument("projector", help="projector.safetensors (export-projector) or the original mm_projector.bin")
    import_proj.add_argument("output")
    import_proj.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    import_proj.set_defaults(func=run_import_projector)

    push = command("push", help="upload a slim checkpoint folder (with its card) to the Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--base-model", help="Hub id to write as the card's base_model before uploading "
                      "(needed when the card names a local path)")
    push.set_defaults(func=run_push)

    evaluate = command("eval", help="lmms-eval with the slimvlm backend (every other argument goes to lmms-eval)",
                       passes_arguments_on=True, allow_abbrev=False)
    evaluate.add_argument("--compare", metavar="SETTINGS", help="JSON object label -> compression (or model_args "
                          "overrides), inline or a file: run the tasks once per setting (none added) and write one table")
    evaluate.set_defaults(func=run_eval)

    from .train.cli import add_demo_data_command, add_train_command

    add_train_command(command)  # slimvlm train RECIPE ... (slimvlm/train/)
    add_demo_data_command(command)  # slimvlm demo-data --output DIR [--samples N]
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: its message with line breaks folded; the type too when it is not a plain
    input error (ValueError, TypeError, OSError), with a hint to look at the traceback. A network error (the
    Hub did not answer) says so and what to do."""
    message = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, (ValueError, OSError)) and is_network_error(error):
        from huggingface_hub import constants

        return (f"cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {message}); check the network "
                "(and HF_ENDPOINT / proxy settings), or use cached models with HF_HUB_OFFLINE=1")
    if isinstance(error, (ValueError, TypeError, OSError)):
        return message
    return f"{type(error).__name__}: {message} (unexpected: rerun with --debug for the traceback)"


@contextmanager
def progress_bars_on_terminal_only() -> Iterator[None]:
    """transformers' and huggingface_hub's own bars ("Loading weights", "Writing model shards", downloads) only
    when stderr is a terminal, like this CLI's Progress; their previous setting is restored on exit."""
    if sys.stderr.isatty():
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    transformers_on, hub_on = transformers_logging.is_progress_bar_enabled(), not hub_utils.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if transformers_on:
            transformers_logging.enable_progress_bar()
        if hub_on:
            hub_utils.enable_progress_bars()


INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error ends in one line on stderr and exit status 1, Ctrl-C in one line and exit
    status 130 (outputs are written to a staging folder that is removed); --debug: the traceback."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not args.passes_arguments_on:  # only `eval` passes arguments on (to lmms-eval)
        args.command_parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.lmms_args = rest
    try:
        with fewer_notices(), progress_bars_on_terminal_only():
            return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"slimvlm {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return INTERRUPTED
    except Exception as error:
        if args.debug:
            raise
        print(f"slimvlm {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
