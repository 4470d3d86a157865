"""`runner sync --sweep DIR|latest`: log every result of a sweep folder that its MLflow store lacks.

Safe to run twice: a result already logged (its `runner.result_id`) is not logged again. Ends with the sweep's
summary, so the parent run gets its counts and files too.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from runner.preflight import USAGE_EXIT
from runner.summary import LOST_EXIT, finish_sweep
from runner.sweep import Sweep, SweepError, find_folder, job_records


def main(argv: list[str]) -> int:
    """The exit code: 0 when every result is logged and the sweep is complete."""
    from runner.track import Tracker, store_problem

    parser = argparse.ArgumentParser(prog="runner sync",
                                     description="Log every result of a sweep folder that its MLflow store lacks; "
                                                 "safe to run twice.")
    parser.add_argument("--sweep", default="latest", help="a sweep folder, or 'latest' (the default)")
    parser.add_argument("--outputs", type=Path, default=Path("outputs"), help="where 'latest' is looked for")
    parser.add_argument("--tracking-uri", help="the store, where it moved (default: the sweep's own)")
    args = parser.parse_args(argv)
    try:
        sweep = Sweep.read(find_folder(args.outputs / "sweeps", args.sweep))
    except SweepError as exc:
        print(f"runner: error: {exc}", file=sys.stderr)
        return USAGE_EXIT
    if not (sweep.tracking and sweep.parent_run_id):
        print(f"runner: error: sweep {sweep.folder} ran with tracking disabled; nothing to sync", file=sys.stderr)
        return USAGE_EXIT
    tracking = dataclasses.replace(sweep.tracking, uri=args.tracking_uri or sweep.tracking.uri)
    try:
        tracker = Tracker.of(tracking)
    except Exception as exc:  # MLflow's errors vary by store
        print(f"runner: error: cannot open {tracking.uri}: {store_problem(exc)}", file=sys.stderr)
        return USAGE_EXIT
    sweep.tracking = tracking
    records = job_records(sweep.folder)
    added, refused = 0, 0
    for record in records:
        was = record.mlflow_run_id
        try:
            record.mlflow_run_id, record.tracking_error = tracker.log_variant(sweep.parent_run_id, record), None
        except Exception as exc:  # one result the store refuses must not keep the others out
            record.mlflow_run_id, record.tracking_error = None, store_problem(exc)
            print(f"runner: warning: {record.result.name} not logged: {record.tracking_error}", file=sys.stderr)
        record.write()
        added += was is None and record.logged
        refused += not record.logged
    print(f"runner: sync of {sweep.folder}: {added} run(s) logged, {len(records) - added - refused} already there"
          + (f", {refused} not logged" if refused else ""), flush=True)
    return finish_sweep(sweep) or (LOST_EXIT if refused else 0)
