"""Process isolation: a variant's stages run in a spawned child with a timeout.

A segfault, abort, CUDA error or timeout in the child becomes that variant's status; the sweep goes on,
and the GPU memory goes back with the child. The child reports the stage it entered and its partial
result over a pipe, so a crash still names the failing stage.
"""
from __future__ import annotations

import multiprocessing as mp
import signal
import time


def _child(target, args: tuple, conn) -> None:
    def stage_started(stage: str) -> None:
        conn.send(("stage", stage))

    def publish(result: dict) -> None:
        conn.send(("partial", result))

    try:
        conn.send(("result", target(*args, stage_started=stage_started, publish=publish)))
    except BaseException as exc:  # an unexpected bug: still a result, not a hung parent
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_isolated(target, args: tuple, timeout_s: float, base: dict) -> dict:
    """Run `target(*args, stage_started=..., publish=...)` in a child; always return a result dict.

    `base` is the result skeleton that a crash or timeout result is built on."""
    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(target, args, sender), daemon=True)
    proc.start()
    sender.close()
    stage, partial, deadline = "start", base, time.monotonic() + timeout_s
    outcome = None
    while outcome is None:
        if receiver.poll(0.2):
            try:
                kind, payload = receiver.recv()
            except EOFError:
                break
            if kind == "stage":
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
            return {**partial, "status": "failed", "failed_stage": stage,
                    "error": f"timeout: stage '{stage}' still running after {timeout_s:.0f} s (backend.timeout_s)"}
    proc.join(30)
    if outcome and outcome[0] == "result":
        return outcome[1]
    if outcome:
        return {**partial, "status": "failed", "failed_stage": stage, "error": outcome[1]}
    code = proc.exitcode
    how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
    return {**partial, "status": "failed", "failed_stage": stage, "error": f"crash: child process {how} in stage "
                                                                            f"'{stage}'"}
