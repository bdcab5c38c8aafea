import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from builders import save_stock_checkpoint  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def stock_checkpoint(tmp_path_factory) -> Path:
    """A tiny stock LLaVA-1.5 checkpoint (24x24 patches, 4 CLIP layers, 2 Llama layers) with its processor."""
    return save_stock_checkpoint(tmp_path_factory.mktemp("stock"))
