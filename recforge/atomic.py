"""Writing a directory all at once: built in a hidden sibling, then renamed into place.

Whoever reads the target (a server reloading an artifact, a training run reading prepared
data, Lightning looking for the last checkpoint) sees the old complete directory or the new
complete one, never a half-written one, and a failed write leaves nothing behind. Nothing here
imports recforge, so every layer may use it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TargetExistsError(FileExistsError):
    """The target directory exists and replacing it was not asked for."""


def _exists(path: Path) -> bool:
    # A dangling symlink is still something a rename would clobber.
    return path.exists() or path.is_symlink()


def hidden_sibling(target: Path, purpose: str) -> Path:
    """A fresh hidden name beside ``target``: ``.<name>.<purpose>-<pid>-<random>``.

    Beside, not in a temp folder: ``os.replace`` only renames within one file system."""
    return target.with_name(f".{target.name}.{purpose}-{os.getpid()}-{secrets.token_hex(4)}")


def replace_directory(source: Path, target: Path, aside: Path | None = None) -> None:
    """Rename the complete directory ``source`` to ``target``.

    A directory cannot be renamed over a non-empty one, so an existing ``target`` is first moved
    to ``aside`` (default: a fresh hidden sibling) and deleted once the new one is in place."""
    if not _exists(target):
        os.replace(source, target)
        return
    if aside is None:
        aside = hidden_sibling(target, "old")
    elif _exists(aside):
        shutil.rmtree(aside, ignore_errors=True)  # left by a crash between the two renames
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)  # the old one back rather than none at all
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory beside ``target``; rename it to ``target`` when the block ends
    normally, delete it when the block raises.

    Without ``overwrite`` an existing ``target`` raises :class:`TargetExistsError`, on entry and
    again before the rename (it may have appeared meanwhile). The directory is made with
    ``mkdir`` rather than ``tempfile.mkdtemp``, whose 0700 mode would stick to the result."""
    target = Path(target).absolute()
    if _exists(target) and not overwrite:
        raise TargetExistsError(f"{target}: already exists (overwrite not requested)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden_sibling(target, "partial")
    tmp.mkdir()
    try:
        yield tmp
        if _exists(target) and not overwrite:
            raise TargetExistsError(
                f"{target}: appeared while it was being written (overwrite not requested)"
            )
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
