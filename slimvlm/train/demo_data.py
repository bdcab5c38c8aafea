"""`slimvlm demo-data --output DIR [--samples N]`: the bundled shapes task as a LLaVA instruction dataset
(DIR/data.json + DIR/images/), so the training path can be tried offline on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

from ..demo import shapes


def write_demo_data(output: str | Path, samples: int = 512, seed: int = 0, split: str = "train",
                    per_image: int = 4) -> Path:
    """Write `samples` records (`per_image` questions about each picture, one record each) of the shapes task;
    returns DIR/data.json. Deterministic in (split, seed)."""
    if samples <= 0:
        raise ValueError(f"--samples must be positive, got {samples}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"--output {output} exists and is not an empty folder; choose another")
    images = output / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, index = [], 0
    while len(records) < samples:
        batch = shapes.make_image_samples(split, seed, index, per_image)
        name = f"{split}-{seed}-{index:06d}.png"
        batch[0].image.save(images / name)
        for sample in batch[: samples - len(records)]:
            records.append({"id": f"{split}-{seed}-{index}-{len(records)}", "image": name, "conversations": [
                {"from": "human", "value": f"<image>\n{sample.question}"}, {"from": "gpt", "value": sample.answer}]})
        index += 1
    path = output / "data.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
