"""Targets for runner.isolate.run_isolated in test_isolate.py.

They must be module-level functions of an importable module: runner.isolate pickles them
by name and the child imports this module (tests/ is on sys.path, see conftest.py).
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import time
import warnings

from runner.results import BuildVariant, Cell, OnnxVariant, VariantResult

CELL = Cell(OnnxVariant("ultralytics", "static", "fp32"), BuildVariant("tensorrt_api", "static", "fp32"), "yolov8n")


def result(status: str = "running", **fields) -> VariantResult:
    return VariantResult(cell=CELL, backend="tensorrt", profile="default", status=status, **fields)


def succeed(value, stage_started, publish):
    stage_started("export")
    publish(result(timings={"export": float(value)}))
    logging.getLogger("runner.export").info("export: %d done", value)
    logging.getLogger("some.library").info("chatter that stays in the child")
    logging.getLogger("some.library").warning("a library warning")
    stage_started("validate")
    return result("ok", timings={"export": float(value)}, environment={"pid": os.getpid()})


def say_everything(value, stage_started, publish):
    """Say something in every way a variant's libraries do: runner's log, another logger, a Python warning, a
    print, and a line written straight to fd 2 (as onnxruntime's and TensorRT's C++ loggers do)."""
    stage_started("export")
    logging.getLogger("runner.export").info("export: %d done", value)
    logging.getLogger("some.library").info("chatter that stays in the child")
    logging.getLogger("some.library").warning("a library warning")
    warnings.warn("a library's Python warning")
    print("a library's print")
    os.write(2, b"[E:native] a C++ logger's line\n")
    return result("ok")


def segfault_in_build(stage_started, publish):
    stage_started("export")
    publish(result(timings={"export": 1.5}, started_at="exported"))
    stage_started("build")
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(30)  # never reached: the signal ends the process


def abort_in_validate(stage_started, publish):
    stage_started("validate")
    os.abort()


def sleep_in_bench(seconds, stage_started, publish):
    stage_started("export")
    publish(result(started_at="before-bench"))
    stage_started("bench")
    time.sleep(seconds)
    return result("ok")


def raise_in_export(stage_started, publish):
    stage_started("export")
    raise ValueError("bad weights: unexpected key 'model'")


def exit_nonzero(stage_started, publish):
    stage_started("build")
    os._exit(3)


def report_pid_then_sleep(pid_file, stage_started, publish):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    stage_started("build")
    time.sleep(60)


def trt_infer_then_segfault(engine_path, shape, stage_started, publish):
    """Hold an engine, buffers and a stream on the GPU, then die in the middle of the bench stage."""
    import numpy as np

    from runner.backends.tensorrt.runtime import TrtRunner

    stage_started("validate")
    runner = TrtRunner(engine_path)
    runner.open()
    runner.infer(np.zeros(shape, np.float32))
    publish(result(started_at="inferred"))
    stage_started("bench")
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(30)


def trt_infer(engine_path, shape, stage_started, publish):
    import numpy as np

    from runner.backends.tensorrt.runtime import TrtRunner

    stage_started("validate")
    with TrtRunner(engine_path) as runner:
        out = runner.infer(np.ones(shape, np.float32))
    return result("ok", timings={"sum": float(next(iter(out.values())).sum())})


def trt_hang(engine_path, shape, stage_started, publish):
    from runner.backends.tensorrt.runtime import TrtRunner

    stage_started("validate")
    runner = TrtRunner(engine_path)
    runner.open()
    runner.set_shape(tuple(shape))
    time.sleep(600)


def report_env(name, stage_started, publish):
    """The value of environment variable `name` in the child (None where unset), and the child's pid."""
    stage_started("export")
    return result("ok", environment={"var": os.environ.get(name), "pid": os.getpid()})


def isolate_in_daemonic_worker(queue):
    """A daemonic worker process (as joblib's loky workers and Ray actors are) that runs a variant isolated.

    Puts (daemon?, this worker's pid, the variant's status, the variant child's pid, what a multiprocessing
    child of this worker would have said) into `queue`."""
    import multiprocessing

    from runner.isolate import run_isolated

    try:  # what runner.isolate avoids by using subprocess: multiprocessing refuses children of a daemon
        multiprocessing.get_context("spawn").Process(target=os.getpid).start()
        refused = None
    except AssertionError as exc:
        refused = str(exc)
    outcome = run_isolated(succeed, (5,), 60, result("failed"))
    queue.put((multiprocessing.current_process().daemon, os.getpid(), outcome.status,
               outcome.environment.get("pid"), outcome.error, refused))


def succeed_then_linger(value, stage_started, publish):
    """Return a result, then take an hour to exit (as an interpreter's teardown can on a loaded host)."""
    atexit.register(time.sleep, 3600)
    return result("ok", timings={"export": float(value)})
