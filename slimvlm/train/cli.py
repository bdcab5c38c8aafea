"""The `train` and `demo-data` subcommands of `slimvlm` (registered by slimvlm/cli.py in one line each)."""

from __future__ import annotations

from typing import Callable


def run_train(args) -> int:
    from .run import run

    print(f"wrote {run(args)}")
    return 0


def run_demo_data(args) -> int:
    from .demo_data import write_demo_data

    path = write_demo_data(args.output, samples=args.samples, seed=args.seed)
    print(f"wrote {path} and {path.parent / 'images'}")
    return 0


def add_train_command(command: Callable) -> None:
    """`slimvlm train RECIPE ...`; `command(name, help)` makes a subparser with slimvlm's common options."""
    from .run import build_parser

    parser = command("train", help="fine-tune under compression on transformers.Trainer (projector | lora | voco | "
                     "voco-lora); multi-process: torchrun / accelerate launch -m slimvlm.train")
    build_parser(parser).set_defaults(func=run_train)


def add_demo_data_command(command: Callable) -> None:
    """`slimvlm demo-data --output DIR [--samples N]`."""
    parser = command("demo-data", help="write the bundled shapes task as LLaVA instruction data (DIR/data.json + "
                     "DIR/images/) for slimvlm train")
    parser.add_argument("--output", required=True)
    parser.add_argument("--samples", type=int, default=512, help="records (default 512; 4 questions per image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_demo_data)
