"""Process isolation: a variant's stages run in a child process with a timeout.

A segfault, abort, CUDA error or timeout in the child becomes that variant's status; the sweep goes on,
and the GPU memory goes back with the child. The child reports the stage it entered, its partial result
and runner's log records over a pipe, so a crash still names the failing stage. Everything else the child
says (its stdout and stderr, libraries' warnings) goes straight to the file this process logs to: under
Hydra, the job's log, which so holds everything the child said. What onnxruntime's and TensorRT's C++
loggers, ultralytics and torch print stays there, and the console shows runner's own lines.

The child is a plain `subprocess` running `python -m runner.isolate`, not a `multiprocessing` process:
launcher workers are often daemonic (joblib's loky, Ray actors), and those may not start multiprocessing
children. The target and its arguments go to the child pickled on stdin, so the target must be a
module-level function of an importable module; the child sees the parent's `sys.path`. The child dies
with its parent (Linux `PR_SET_PDEATHSIG`), so `kill -9` of a sweep leaves no orphan measuring on.

SIGINT or SIGTERM (Ctrl-C reaches the whole process group) ends the child at once, with no result: an
interruption is no verdict on the variant, so `run_isolated` raises `Interrupted` and the variant is measured
again on `resume=`. `start_tethered` ties a helper's process group (the loopback tracking server) to this
process the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import traceback
from multiprocessing.connection import Connection

from runner.results import VariantResult

PR_SET_PDEATHSIG = 1
STAMPED = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"  # as the job's log writes its lines
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GROUP_STOP_S = 10
EXIT_S = 30  # a child that closed its pipe and lingers longer (its interpreter's teardown, on a loaded host) is killed


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the sweep. Not an Exception, so no `except Exception` turns it into a result."""

    def __init__(self, signum: int):
        super().__init__(signum)  # args stay (signum,): it pickles across joblib's workers
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _is_runner(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] == "runner"


class _PipeHandler(logging.Handler):
    """Sends runner's records (INFO and up) to the parent."""

    def __init__(self, conn: Connection):
        super().__init__(logging.INFO)
        self.conn = conn
        self.addFilter(_is_runner)

    def emit(self, record: logging.LogRecord) -> None:
        self.conn.send(("log", (record.levelno, record.name, record.getMessage())))


def _library_handler() -> logging.Handler:
    """Writes other loggers' warnings and errors to stderr (the job's log, see `_job_log`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(STAMPED))
    handler.addFilter(lambda record: not _is_runner(record))
    return handler


def _die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _child(fd: int, parent_pid: int) -> None:
    for sig in STOP_SIGNALS:  # die of it, unreported: Python would make SIGINT a KeyboardInterrupt, a "result"
        signal.signal(sig, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    conn = Connection(fd, readable=False)
    root = logging.getLogger()
    root.handlers, root.level = [_PipeHandler(conn), _library_handler()], logging.INFO
    sys.stdout.reconfigure(line_buffering=True)  # a library's prints land in the log in order
    logging.captureWarnings(True)
    try:
        target, args = pickle.load(sys.stdin.buffer)
        result = target(*args, stage_started=lambda stage: conn.send(("stage", stage)),
                        publish=lambda partial: conn.send(("partial", partial.to_dict())))
        conn.send(("result", result.to_dict()))
    except BaseException as exc:  # a bug outside the stages: still a result, not a hung parent
        conn.send(("error", (f"{type(exc).__name__}: {exc}", traceback.format_exc())))
    finally:
        conn.close()


def _job_log() -> str | None:
    """The file this process logs to, if any: the last file handler of the root logger (in a job, the only one:
    Hydra's `<job folder>/<job name>.log`)."""
    files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    return files[-1] if files else None


def _import_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with `env` added, and this `sys.path`: a child imports runner as this process does."""
    return {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _start(target, args: tuple, env: dict[str, str] | None) -> tuple[subprocess.Popen, Connection]:
    read_fd, write_fd = os.pipe()
    log_path = _job_log()
    with open(log_path, "ab") if log_path else contextlib.nullcontext() as output:  # appended, as the parent does
        proc = subprocess.Popen([sys.executable, "-m", "runner.isolate", str(write_fd), str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=output, stderr=output, pass_fds=(write_fd,),
                                env=_import_env(env))
    os.close(write_fd)
    try:
        proc.stdin.write(pickle.dumps((target, args)))
        proc.stdin.close()
    except BrokenPipeError:  # the child died at once; its exit code tells why
        pass
    return proc, Connection(read_fd, writable=False)


def run_isolated(target, args: tuple, timeout_s: float, base: VariantResult, log_prefix: str = "",
                 env: dict[str, str] | None = None) -> VariantResult:
    """Run `target(*args, stage_started=..., publish=...)` (returning a VariantResult) in a child process
    with `env` added to its environment.

    Always returns a result: a crash or timeout fails the latest partial result (else `base`) at the stage
    the child was in. The child's runner records are re-logged here, each message after `log_prefix`; what
    else it says goes to this process's log file (inherited stdout and stderr where there is none)."""
    proc, receiver = _start(target, args, env)
    try:
        return _follow(proc, receiver, timeout_s, base, log_prefix)
    except BaseException:  # Interrupted, or a KeyboardInterrupt here: the child must not measure on
        proc.kill()
        proc.wait()
        raise


def _follow(proc: subprocess.Popen, receiver: Connection, timeout_s: float, base: VariantResult,
            log_prefix: str) -> VariantResult:
    stage, partial, deadline = "start", base.to_dict(), time.monotonic() + timeout_s
    outcome = None
    try:
        while outcome is None:
            if receiver.poll(0.2):
                try:
                    kind, payload = receiver.recv()
                except EOFError:
                    break
                if kind == "log":
                    level, name, message = payload
                    logging.getLogger(name).log(level, "%s%s", log_prefix, message)
                elif kind == "stage":
                    stage = payload
                elif kind == "partial":
                    partial = payload
                else:
                    outcome = (kind, payload)
            elif proc.poll() is not None and not receiver.poll():
                break
            elif time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return _failed(partial, stage, f"timeout: stage '{stage}' still running after {timeout_s:.0f} s "
                                               f"(backend.timeout_s)")
    finally:
        receiver.close()
    code = _exit_code(proc)
    if outcome and outcome[0] == "result":
        return VariantResult.from_dict(outcome[1])
    if outcome:
        return _failed(partial, stage, *outcome[1])
    if -code in STOP_SIGNALS:
        raise Interrupted(-code)
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    return _failed(partial, stage, f"crash: child process {how} in stage '{stage}'")


def _exit_code(proc: subprocess.Popen) -> int:
    """The child's exit code, once its pipe is closed; past EXIT_S it is killed, so a result it sent still counts."""
    try:
        return proc.wait(EXIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _failed(partial: dict, stage: str, error: str, detail: str | None = None) -> VariantResult:
    """The latest partial result, failed at `stage` (a crash outranks a validation verdict published before it)."""
    result = VariantResult.from_dict(partial)
    result.status, result.failed_stage, result.error, result.error_detail = "failed", stage, error, detail
    return result


def start_tethered(command: list[str], **popen_args) -> subprocess.Popen:
    """Start `command` in a session of its own under a leader that takes that session's processes down when this
    process dies, even of `kill -9`. SIGTERM to the group (`os.killpg(proc.pid, ...)`) stops it as before."""
    return subprocess.Popen([sys.executable, "-m", "runner.isolate", "--lead", str(os.getpid()), *command],
                            env=_import_env(), start_new_session=True, **popen_args)


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _lead(parent_pid: int, command: list[str]) -> None:
    """The session leader of `start_tethered`: runs `command`; on SIGTERM (sent to the group, or by the kernel
    when the parent dies) it passes SIGTERM to the whole group, then SIGKILL to what is left after GROUP_STOP_S."""
    signal.signal(signal.SIGTERM, _stop)
    _die_with_parent(parent_pid, signal.SIGTERM)
    proc = None
    try:
        proc = subprocess.Popen(command)
        sys.exit(proc.wait())
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        try:
            if proc:
                proc.wait(GROUP_STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1] == "--lead":
        _lead(int(sys.argv[2]), sys.argv[3:])
    else:
        _child(int(sys.argv[1]), int(sys.argv[2]))
