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


@pytest.fixture(autouse=True, scope="session")
def _one_thread_session():
    """One intra-op thread for module- and session-scoped fixtures too (see `_one_thread`)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """The test models are tiny: one intra-op thread is fastest, and on two shared cores torch's
    default thread pool oversubscribes them (spin-waiting made these tests ~10x slower). Set per test,
    so a module that uses more threads for a fixture cannot leak its setting (bitwise comparisons with
    a one-thread subprocess depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
