"""Write held-out questions of the bundled shapes task to disk as the local dataset of the `shapes_vqa` task.

    python -m slimvlm.eval.shapes_data [--questions 300] [--out slimvlm/eval/tasks/shapes_vqa/data]

The questions are the demo's: `shapes.make_samples("heldout", n, seed=0, start=10_000)`, one per image, in
that order (so `--limit N` in lmms-eval takes the first N). Images are stored losslessly (PNG in parquet), so
the model sees the same pixels as when the samples are generated in memory. No network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import shapes

TASK_DIR = Path(__file__).parent / "tasks" / "shapes_vqa"
DATA_FILE = "shapes_heldout.parquet"
START = 10_000  # the demo's held-out image indices (slimvlm demo uses the same)


def heldout_samples(questions: int, seed: int = 0) -> list[shapes.Sample]:
    """The held-out samples the dataset holds, in dataset order."""
    return shapes.make_samples("heldout", questions, seed=seed, start=START)


def write_shapes_dataset(out: str | Path = TASK_DIR / "data", questions: int = 300, seed: int = 0) -> Path:
    """Write `questions` held-out samples to OUT/shapes_heldout.parquet (columns id, question, answer, qtype, image)."""
    import datasets

    if not isinstance(questions, int) or questions < 1:
        raise ValueError(f"questions must be a positive integer, got {questions!r}")
    samples = heldout_samples(questions, seed)
    features = datasets.Features({"id": datasets.Value("int32"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "qtype": datasets.Value("string"),
                                  "image": datasets.Image()})
    table = datasets.Dataset.from_dict({"id": list(range(len(samples))),
                                        "question": [s.question for s in samples],
                                        "answer": [s.answer for s in samples],
                                        "qtype": [s.qtype for s in samples],
                                        "image": [s.image for s in samples]}, features=features)
    path = Path(out) / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TASK_DIR / "data",
                        help="folder for shapes_heldout.parquet (default: next to the task YAML)")
    args = parser.parse_args(argv)
    print(f"wrote {write_shapes_dataset(args.out, args.questions, args.seed)}")


if __name__ == "__main__":
    main()
