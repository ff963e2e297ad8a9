"""Atomic writes: a crash or a bad input never leaves a half-written file or folder behind.

A file or folder is written under a temporary name beside its target (`.<name>.<pid>.<random>.tmp`), flushed
and fsynced, then renamed into place, and the folder holding it fsynced, so that after a power cut the target is
either the old one or the whole new one. A kill leaves only the temporary; `remove_stale_temps` deletes those
whose process is gone (the name carries its pid), so a folder shared by concurrent runs is safe to clean.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

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


def save_file(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O errors (a full disk) raised as the OSError they are: one line at the CLI."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file as save

    try:
        save(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None


# ---- links: nothing read or written under a folder resolves outside it --------------------------------------------
TRACKER_FOLDERS = ("wandb",)    # in a run folder, written by the tracker's library alone (with links of its own to
                                # its logs elsewhere); nothing of ours reads or writes inside them


def check_links(folder: str | Path) -> None:
    """Every symbolic link under `folder` must lead inside it: a crafted link would let a read, a write or a delete
    reach another folder. One line naming the first that does not; nothing is followed before. A tracker's folder
    must not be such a link itself, but what its library writes inside is its own."""
    root = Path(folder).resolve()
    for where, folders, files in os.walk(folder):        # links to folders are listed, not followed
        if Path(where) == Path(folder):     # a tracker's folder that is no link: not walked
            folders[:] = [f for f in folders if f not in TRACKER_FOLDERS or (Path(where) / f).is_symlink()]
        for name in folders + files:
            path = Path(where) / name
            if not path.is_symlink():
                continue
            try:
                target = path.resolve(strict=False)
            except (OSError, RuntimeError):             # a loop of links
                target = None
            if target is None or not target.is_relative_to(root):
                raise UserError(f"{path} is a link to {os.readlink(path)}, outside {folder}: refused (nothing is "
                                "read, written or deleted through it); remove the link")


def no_links(folder: Path, what: str) -> None:
    """A cache entry holds no links at all (we never write one): one line, and nothing deleted or followed."""
    links = [folder] if folder.is_symlink() else [p for p in folder.rglob("*") if p.is_symlink()]
    if links:
        raise UserError(f"{what} {links[0]} is a link to {os.readlink(links[0])}: refused (a cache entry is never "
                        "a link, and nothing is deleted or written through one); remove the link")


# ---- sealed folders: a cache entry that knows what it is ---------------------------------------------------------
SEAL = "checksums.json"


def seal(folder: Path, key: dict) -> None:
    """Write checksums.json into `folder`: the key it is stored under and every file's SHA-256."""
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != SEAL}
    (folder / SEAL).write_text(json.dumps({"key": key, "sha256": sums}, indent=1, sort_keys=True))


def sealed(folder: Path, key: dict, what: str) -> bool:
    """Whether `folder` is what `seal` wrote for this `key`: every file there and matching its SHA-256, nothing
    else, and stored under this key (a folder swapped with another entry's is not). A link is refused."""
    if not folder.exists() and not folder.is_symlink():
        return False
    no_links(folder, what)
    from concurrent.futures import ThreadPoolExecutor

    try:
        record = json.loads((folder / SEAL).read_text())
        sums = record["sha256"]
        names = sorted(sums)
        there = sorted(p.name for p in folder.iterdir() if p.name != SEAL)
        if record["key"] != json.loads(json.dumps(key)) or names != there:
            return False
        with ThreadPoolExecutor(4) as pool:                  # hashlib releases the GIL
            return list(pool.map(file_sha256, [folder / n for n in names])) == [sums[n] for n in names]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
