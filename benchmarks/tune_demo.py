"""Tuning under compression on the bundled shapes model: VisionZip 64, VisionZip‡ 64 (projector) and VisionZip 64 +
LoRA, on the retention benchmark's held-out questions (CPU, not part of the tests).

    python benchmarks/tune_demo.py [--steps 240] [--questions 300] [--out benchmarks/results/tune_demo.json]
        [--save-assets]      # also write slimvlm/demo/assets/tuned-visionzip64 (what `slimvlm demo` uses)

1. `slimvlm demo-data` writes --records training records (4 questions per picture, train split).
2. `slimvlm train projector` and `slimvlm train lora` tune the bundled model under VisionZip 64 (one thread,
   seed 0: a rerun reproduces the files bit for bit; the script prints their SHA-256).
3. The tuned projector (export-projector) and the LoRA adapter (peft's files) are applied to the bundled model the
   way `slimvlm demo` applies them (slimvlm/demo/tuned.py), and scored by greedy exact match on the same held-out
   questions as bench_retention.py (heldout split, seed 0, one question per picture), per question type:
   uncompressed, VisionZip 64 untuned, VisionZip‡ 64, VisionZip 64 + LoRA.

bench_retention.py merges the result into retention.json when the file exists.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimvlm import SlimLlavaForConditionalGeneration, SlimLlavaProcessor  # noqa: E402
from slimvlm.demo import shapes  # noqa: E402
from slimvlm.conversion.projector import export_projector  # noqa: E402
from slimvlm.demo import tuned  # noqa: E402
from slimvlm.demo.run import BUNDLED_MODEL  # noqa: E402
from slimvlm.train import train, write_demo_data  # noqa: E402

COMPRESSION = {"method": "visionzip", "tokens": 64}


def evaluate(model, samples) -> tuple[float, dict]:
    model = model.eval()
    processor = SlimLlavaProcessor.from_pretrained(BUNDLED_MODEL, compression=model.config.compression)
    score, predictions = shapes.evaluate(model, processor, samples, return_predictions=True)
    table: dict[str, list[int]] = {}
    for sample, prediction in zip(samples, predictions):
        table.setdefault(sample.qtype, []).append(int(prediction == sample.answer))
    return score, {k: round(sum(v) / len(v), 3) for k, v in sorted(table.items())}


def portable_adapter_config(path: Path) -> None:
    """peft writes the base model's absolute path; the shipped file names it relative to the repository."""
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(BUNDLED_MODEL.relative_to(ROOT))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--records", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="keep the tuned checkpoints in this folder")
    parser.add_argument("--save-assets", action="store_true", help=f"write the tuned files to {tuned.ASSETS}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_demo.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    samples = shapes.make_samples("heldout", args.questions, seed=args.seed, per_image=1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        data = write_demo_data(work / "data", samples=args.records, seed=args.seed)
        common = ["--model", str(BUNDLED_MODEL), "--data", str(data), "--image-folder", str(data.parent / "images"),
                  "--compression", json.dumps(COMPRESSION), "--max-steps", str(args.steps), "--per-device-batch-size",
                  str(args.batch_size), "--gradient-accumulation-steps", "1", "--learning-rate", str(args.learning_rate),
                  "--seed", str(args.seed), "--save-steps", str(10 * args.steps), "--logging-steps", "10"]
        seconds, outputs = {}, {}
        for recipe, extra in (("projector", []), ("lora", ["--lora-r", str(args.lora_r), "--lora-alpha",
                                                           str(2 * args.lora_r), "--projector-learning-rate",
                                                           str(args.learning_rate)])):
            start = time.perf_counter()
            outputs[recipe] = train([recipe, *common, "--output", str(work / recipe), *extra])
            seconds[recipe] = round(time.perf_counter() - start, 1)
        assets = work / "assets"
        export_projector(outputs["projector"], assets)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(outputs["lora"] / "adapter" / name, assets / name)
        portable_adapter_config(assets / "adapter_config.json")
        files = {name: sha256(assets / name) for name in sorted(os.listdir(assets))}
        print(f"tuned files: {files}", flush=True)
        base = SlimLlavaForConditionalGeneration.from_pretrained(BUNDLED_MODEL)
        rows = []
        for label, model in (("uncompressed (576)", copy.deepcopy(base)),
                             ("VisionZip 64", copy.deepcopy(base).set_compression(COMPRESSION)),
                             ("VisionZip‡ 64 (projector)", tuned.with_projector(base, assets)),
                             ("VisionZip 64 + LoRA", tuned.with_lora(base, assets))):
            score, per_type = evaluate(model, samples)
            rows.append({"label": label, "accuracy": score, "per_type": per_type})
            print(f"{label:>28}: {score:.3f} {per_type}", flush=True)
        if args.save_assets:
            if tuned.ASSETS.exists():
                shutil.rmtree(tuned.ASSETS)
            shutil.copytree(assets, tuned.ASSETS)
        summaries = {r: json.loads((outputs[r] / "training_summary.json").read_text()) for r in outputs}
    dense = rows[0]["accuracy"]
    for row in rows:
        row["retention"] = round(row["accuracy"] / dense, 4) if dense else None
    result = {"model": str(BUNDLED_MODEL.relative_to(ROOT)), "questions": len(samples), "seed": args.seed,
              "compression": COMPRESSION, "rows": rows,
              "training": {r: {"steps": s["steps"], "records": s["data_size"], "global_batch_size": s["global_batch_size"],
                               "learning_rate": s["learning_rate"], "seconds": seconds[r],
                               "loss_first_last": [s["losses"][0], s["losses"][-1]]} for r, s in summaries.items()},
              "files_sha256": files, "lora_r": args.lora_r, "threads": 1, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


if __name__ == "__main__":
    main()
