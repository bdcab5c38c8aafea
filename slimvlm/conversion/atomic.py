"""Outputs that appear whole or not at all: written to a temporary folder beside the target, moved in at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def refuse_existing(output: Path, overwrite: bool) -> None:
    """Raise FileExistsError when `output` exists and `overwrite` is False (call before any expensive work)."""
    if output.exists() and not overwrite:
        raise FileExistsError(f"output folder {output} already exists; choose another or pass overwrite=True")


@contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside `output`; on success it replaces `output`, on any error it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp", dir=output.parent))
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
