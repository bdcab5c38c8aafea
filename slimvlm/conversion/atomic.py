"""Outputs that appear whole or not at all: written to a temporary folder beside the target, moved in at the end.

`check_output_folder` (also `refuse_existing`) says, before any expensive work, whether the target can be
written at all; `atomic_folder` stages the output in a folder created with the process's umask (0755 under
umask 022, like `mkdir`), so a converted checkpoint is readable by other users and containers.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def mount_points() -> set[str]:
    """The mount points of this process (from /proc/self/mountinfo; empty where there is none)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    points = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 4:  # field 5 is the mount point, with space, tab, newline and backslash octal-escaped
            points.add(re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), fields[4]))
    return points


def is_mount_point(path: Path) -> bool:
    """True for a mount point, bind mounts of a folder onto itself included (os.path.ismount misses those)."""
    return os.path.ismount(path) or str(Path(path).resolve()) in mount_points()


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder in `parent`, created with the umask's permissions (not mkdtemp's 0700)."""
    while True:
        folder = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


def check_output_folder(output: str | os.PathLike, overwrite: bool, overwrite_hint: str = "overwrite=True") -> None:
    """Raise, naming `output` and the cause, when the output folder cannot be written (call before any weight
    loads): it exists (and `overwrite` is False), is a file, is a mount point that `overwrite` would have to
    replace, has a file as a parent, or its nearest existing parent does not accept new folders (read-only file
    system, no permission, /proc, ...; tried by creating and removing a folder there)."""
    output = Path(output)
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"output {output} is a file; give a folder path")
        if not overwrite:
            raise FileExistsError(f"output folder {output} already exists; choose another or pass {overwrite_hint} to replace it")
        if is_mount_point(output):
            raise OSError(f"output folder {output} is a mount point, which cannot be replaced; write to a folder "
                          "inside it or elsewhere")
    parent = output.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot write output folder {output}: {parent} is a file, not a folder")
    try:
        _new_folder(parent, f".{output.name}.check").rmdir()
    except OSError as error:
        raise OSError(f"cannot write output folder {output}: creating a folder in {parent} fails "
                      f"({error.strerror or error})") from None


def refuse_existing(output: Path, overwrite: bool) -> None:
    """`check_output_folder` (the API's name for it): raise when `output` exists and `overwrite` is False, or
    when it cannot be written (call before any expensive work)."""
    check_output_folder(output, overwrite)


@contextmanager
def atomic_folder(output: Path) -> Iterator[Path]:
    """Yield a staging folder beside `output`; on success it replaces `output`, on any error (Ctrl-C included)
    it is removed."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_folder(output.parent, f".{output.name}.tmp")
    try:
        yield staging
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
