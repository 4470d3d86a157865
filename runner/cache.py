"""Cached artifacts on disk, trusted only while they match the record taken when they were written.

A record is the size and sha256 of a file. Metadata JSON carries the records of its files under "files"
(path relative to the metadata's folder -> record) and keeps every path relative to that folder, so a moved
or copied cache still works. A file kept without metadata of its own (a timing cache) has its record beside
it in `<name>.json`. Records are written after their artifacts, through a temporary name and `os.replace`,
so an artifact is a hit only once it is complete and recorded.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class Stale(Exception):
    """A cached artifact that does not match its record; the message says which file and how, in one line."""


def file_sha256(path: str | Path, h=None):
    """sha256 of a file, streamed (into `h` when given); returns the hash object."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def unwritable(path: str | Path, folder: bool = True) -> str | None:
    """Why `path` (a folder, or with `folder=False` a file) could not be made or written, or None. Tried by making
    and removing a folder in its nearest existing parent, so nothing is left behind."""
    target = Path(path).absolute()
    found = next(p for p in (target, *target.parents) if p.exists())
    if found != target and not found.is_dir():
        return f"{found} is a file, not a folder"
    if found == target and found.is_dir() != folder:
        return f"it is a {'folder' if found.is_dir() else 'file'}"
    if not found.is_dir():
        return None if os.access(found, os.W_OK) else f"{found} cannot be written"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".runner-check-", dir=found))
    except OSError as exc:
        return f"cannot write in {found} ({exc.strerror or exc})"
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary name of this process: readers see the old file or the new."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a lock file): parallel jobs that need one artifact make it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def record(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path).hexdigest()}


def problem(path: Path, recorded: dict) -> str | None:
    """What differs between the file at `path` and its record, in one line naming the file; None if nothing."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != recorded["size"]:
        return f"{path.name} is damaged (size {size} != {recorded['size']} recorded)"
    digest = file_sha256(path).hexdigest()
    if digest != recorded["sha256"]:
        return f"{path.name} is damaged (sha256 {digest[:12]}... != {recorded['sha256'][:12]}... recorded)"
    return None


def relative(path: str | None, folder: Path) -> str | None:
    return None if path is None else Path(os.path.relpath(path, folder)).as_posix()


def absolute(path: str | None, folder: Path) -> str | None:
    return None if path is None else os.path.abspath(Path(folder) / path)


def save(meta: Path, data: dict, files: Iterable[Path]) -> None:
    """Write `data` to `meta` as JSON with the records of `files` (written before, beside or below `meta`)."""
    records = {relative(str(f), meta.parent): record(f) for f in files}
    write_atomic(meta, json.dumps({**data, "files": records}, indent=1).encode())


def load(meta: Path, decode: Callable[[dict], T]) -> T | None:
    """`decode` of the metadata at `meta`, or None when there is none. Raises Stale when `meta` cannot be read
    or decoded, or a file it records is missing or differs from its record."""
    if not meta.exists():
        return None
    try:
        data = json.loads(meta.read_text())
        checks = [(meta.parent / name, {"size": r["size"], "sha256": r["sha256"]})
                  for name, r in data["files"].items()]
        found = decode(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Stale(f"{meta.name} is invalid ({type(exc).__name__}: {exc})") from None
    for path, recorded in checks:
        if wrong := problem(path, recorded):
            raise Stale(wrong)
    return found


def _writer_lock(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def write_recorded(path: Path, data: bytes) -> None:
    """Write `data` to `path`, then its record beside it in `<name>.json` (one writer at a time)."""
    with locked(_writer_lock(path)):
        write_atomic(path, data)
        save(_sidecar(path), {}, [path])


def read_recorded(path: Path) -> bytes | None:
    """The bytes at `path`, None when there is no such file. Raises Stale when they do not match the record
    beside them (or there is none); both files are removed first. Waits while a writer holds the file."""
    with locked(_writer_lock(path)):
        if not path.exists():
            return None
        try:
            if load(_sidecar(path), dict) is None:
                raise Stale(f"{path.name} has no record ({_sidecar(path).name} is missing)")
        except Stale:
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
            raise
        return path.read_bytes()
