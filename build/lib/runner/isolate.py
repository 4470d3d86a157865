"""Process isolation: a variant's stages run in a spawned child with a timeout.

A segfault, abort, CUDA error or timeout in the child becomes that variant's status; the sweep goes on,
and the GPU memory goes back with the child. The child reports the stage it entered, its partial result
and its log records over a pipe, so a crash still names the failing stage and the job's log (Hydra's,
in the parent) holds everything the child said.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import time
import traceback

from runner.results import VariantResult


class _PipeHandler(logging.Handler):
    """Sends runner's INFO records, and everyone's warnings and errors, to the parent."""

    def __init__(self, conn):
        super().__init__(logging.INFO)
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.name.split(".")[0] == "runner":
            self.conn.send(("log", (record.levelno, record.name, record.getMessage())))


def _child(target, args: tuple, conn) -> None:
    root = logging.getLogger()
    root.handlers, root.level = [_PipeHandler(conn)], logging.INFO
    logging.captureWarnings(True)
    try:
        result = target(*args, stage_started=lambda stage: conn.send(("stage", stage)),
                        publish=lambda partial: conn.send(("partial", partial.to_dict())))
        conn.send(("result", result.to_dict()))
    except BaseException as exc:  # a bug outside the stages: still a result, not a hung parent
        conn.send(("error", (f"{type(exc).__name__}: {exc}", traceback.format_exc())))
    finally:
        conn.close()


def run_isolated(target, args: tuple, timeout_s: float, base: VariantResult, log_prefix: str = "") -> VariantResult:
    """Run `target(*args, stage_started=..., publish=...)` (returning a VariantResult) in a child process.

    Always returns a result: a crash or timeout fails the latest partial result (else `base`) at the stage
    the child was in. The child's log records are re-logged here, each message after `log_prefix`."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(target, args, sender), daemon=True)
    proc.start()
    sender.close()
    stage, partial, deadline = "start", base.to_dict(), time.monotonic() + timeout_s
    outcome = None
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
        elif not proc.is_alive() and not receiver.poll():
            break
        elif time.monotonic() > deadline:
            proc.kill()
            proc.join()
            return _failed(partial, stage, f"timeout: stage '{stage}' still running after {timeout_s:.0f} s "
                                           f"(backend.timeout_s)")
    proc.join(30)
    if outcome and outcome[0] == "result":
        return VariantResult.from_dict(outcome[1])
    if outcome:
        return _failed(partial, stage, *outcome[1])
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
    return _failed(partial, stage, f"crash: child process {how} in stage '{stage}'")


def _failed(partial: dict, stage: str, error: str, detail: str | None = None) -> VariantResult:
    """The latest partial result, failed at `stage` (a crash outranks a validation verdict published before it)."""
    result = VariantResult.from_dict(partial)
    result.status, result.failed_stage, result.error, result.error_detail = "failed", stage, error, detail
    return result
