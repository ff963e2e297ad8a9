"""Atomic writes: a crash or a bad input never leaves a half-written file or folder behind.

A file or folder is written under a temporary name beside its target (`.<name>.<pid>.<random>.tmp`), flushed
and fsynced, then renamed into place, and the folder holding it fsynced, so that after a power cut the target is
either the old one or the whole new one. A kill leaves only the temporary; `remove_stale_temps` deletes those
whose process is gone (the name carries its pid), so a folder shared by concurrent runs is safe to clean.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")


def fsync(path: str | Path) -> None:
    """Flush a file's bytes to the disk; for a folder, make the renames inside it durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(Path(tmp))
        os.replace(tmp, path)
        fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a temporary folder beside `path`; it becomes `path` only if the block succeeds (first writer wins, also
    between processes: a rename onto a folder another process just put there fails, and ours is dropped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp"))
    tmp.chmod(0o755)        # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync(file)
        fsync(tmp)
        try:
            os.replace(tmp, path)       # fails when path is a folder already (not empty)
            fsync(path.parent)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | Path) -> list[str]:
    """Delete the temporaries that killed writes left in `folder` (their process is gone); returns their names."""
    import psutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if not match or int(match["pid"]) == os.getpid() or psutil.pid_exists(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
