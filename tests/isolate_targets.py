"""Targets for runner.isolate.run_isolated in test_isolate.py.

They must be module-level functions of an importable module: the spawn start method pickles them
by name and the child imports this module (tests/ is on sys.path, see conftest.py).
"""
from __future__ import annotations

import os
import signal
import time


def succeed(value, stage_started, publish):
    stage_started("export")
    publish({"status": "running", "stages": {"export": {"value": value}}})
    stage_started("validate")
    return {"status": "ok", "failed_stage": None, "error": None, "value": value * 2, "pid": os.getpid()}


def segfault_in_build(stage_started, publish):
    stage_started("export")
    publish({"status": "running", "stages": {"export": {"onnx": "model.onnx"}}, "marker": "exported"})
    stage_started("build")
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(30)  # never reached: the signal ends the process


def abort_in_validate(stage_started, publish):
    stage_started("validate")
    os.abort()


def sleep_in_bench(seconds, stage_started, publish):
    stage_started("export")
    publish({"status": "running", "stages": {"export": {"done": True}}, "marker": "before-bench"})
    stage_started("bench")
    time.sleep(seconds)
    return {"status": "ok"}


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

    from runner.trt_runtime import TrtRunner

    stage_started("validate")
    runner = TrtRunner(engine_path)
    runner.infer(np.zeros(shape, np.float32))
    publish({"status": "running", "marker": "inferred"})
    stage_started("bench")
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(30)


def trt_infer(engine_path, shape, stage_started, publish):
    import numpy as np

    from runner.trt_runtime import TrtRunner

    stage_started("validate")
    with TrtRunner(engine_path) as runner:
        out = runner.infer(np.ones(shape, np.float32))
    return {"status": "ok", "failed_stage": None, "error": None, "sum": float(next(iter(out.values())).sum())}


def trt_hang(engine_path, shape, stage_started, publish):
    from runner.trt_runtime import TrtRunner

    stage_started("validate")
    runner = TrtRunner(engine_path)
    runner.set_shape(tuple(shape))
    time.sleep(600)
