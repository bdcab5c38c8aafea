"""Fine-tuning under compression (not shipped with checkpoints): `slimvlm train RECIPE`,
`python -m slimvlm.train RECIPE`, or `slimvlm.train.train([...argv...])`. See run.py and the README."""

from .demo_data import write_demo_data
from .recipes import DEFAULTS, RECIPES
from .run import build_parser, main, train

__all__ = ["DEFAULTS", "RECIPES", "build_parser", "main", "train", "write_demo_data"]
