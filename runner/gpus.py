"""One variant per GPU: a host-wide pool of lock files hands each job its own GPU.

Every job on a host (any launcher, any sweep) takes a free GPU's lock before its variant's child starts,
and gives it back when the child ends. The child sees only that GPU (`CUDA_VISIBLE_DEVICES`, numbered in
PCI order as nvidia-smi numbers them) and gets its share of the host's cores (`OMP_NUM_THREADS` for torch,
`RUNNER_CPU_THREADS` for onnxruntime: ultralytics sets the former to 1 on import where it is unset), so four
variants on four GPUs do not each spin a thread per core. A lock is an `flock` on a file in the host's temp
folder, so a killed job frees its GPU with its process. That folder is shared with every user of the host:
runner makes it 0700 and refuses one it does not own, or a symbolic link, and never follows a link to a lock
file. Where a scheduler (SLURM, Ray) has already set `CUDA_VISIBLE_DEVICES`, that choice stands and no lock is
taken.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
POLL_S = 1.0


class PoolError(RuntimeError):
    """The GPU pool's lock folder or a lock file is not ours, said in one line."""


@dataclass(frozen=True)
class Gpu:
    index: str  # as nvidia-smi numbers it (what CUDA_VISIBLE_DEVICES takes)
    uuid: str

    def environment(self) -> dict[str, str]:
        return {"gpu.index": self.index, "gpu.uuid": self.uuid}


def host_gpus(select: str | None = None) -> list[Gpu]:
    """The host's GPUs by nvidia-smi (all, or those `select` names: an index, a UUID, or a comma list);
    [] where there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    command = ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"]
    if select:
        command += ["-i", select]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [Gpu(*(part.strip() for part in line.split(","))) for line in out.splitlines() if line.strip()]


def _lock_dir() -> Path:
    """The pool's folder in the host's temp folder, made 0700; raises PoolError where it is not a folder of ours."""
    folder = Path(tempfile.gettempdir()) / f"runner-gpus-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    found = os.lstat(folder)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():  # a link is no folder here
        raise _not_ours(folder)
    return folder


def _open_lock(path: Path) -> int:
    """A lock file's descriptor: made 0600 where missing, never truncated, never through a symbolic link."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _not_ours(path) from None
        raise


def _not_ours(path: Path) -> PoolError:
    return PoolError(f"{path} is not ours; remove it or set TMPDIR")


@contextlib.contextmanager
def claim(wanted: str | list[int]):
    """Yield (the Gpu this job runs on, the environment for its child); both empty without GPUs.

    `wanted` is "auto" (every GPU of the host) or a list of indices. Waits while all of them are taken."""
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        found = host_gpus(preset.split(",")[0]) if preset else []
        yield (found[0] if found else None), {}
        return
    found = host_gpus()
    pool = found if wanted == "auto" else [g for g in found if int(g.index) in wanted]
    if not pool:
        if found:
            log.warning("backend.gpus=%s names no GPU of this host (it has %s): running unpinned", wanted,
                        ", ".join(g.index for g in found))
        yield None, {}
        return
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // len(pool)))
    share = {"OMP_NUM_THREADS": threads, "RUNNER_CPU_THREADS": threads}
    locks, waited = _lock_dir(), False
    while True:
        for gpu in pool:
            handle = _open_lock(locks / f"gpu{gpu.index}.lock")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                continue
            try:
                yield gpu, {"CUDA_VISIBLE_DEVICES": gpu.index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", **share}
            finally:
                os.close(handle)  # closing the file releases the lock
            return
        if not waited:
            log.info("waiting for a free GPU (all %d taken)", len(pool))
            waited = True
        time.sleep(POLL_S)
