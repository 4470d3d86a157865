"""A sweep as files: the sweep folder, its `sweep.json`, and one `result.json` per job folder.

The launching process writes `sweep.json` (the parent MLflow run, the store, how many variants, the server
jobs log through) and gives each job what it needs of it as overrides. A job writes its `result.json` into
its own Hydra job folder before it tracks anything, and hands the record back to the launching process, which
writes it into its sweep folder (`runner.sweeper`): a job folder on another host is a copy, not the source.
Everything after (summary, `runner sync`, `resume=`, `runner table --results DIR`) reads the sweep folder's
files, never a live process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from runner.cache import write_atomic
from runner.config import RunConfig, TrackingConfig, to_plain
from runner.results import VariantResult

SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
FORMAT = 1
NOT_IDENTITY = ("sweep", "resume", "tracking")  # how a variant is run and logged, not what is measured


class SweepError(ValueError):
    """A sweep folder that cannot be used, said in one line."""


def write_json(path: Path, data: dict) -> None:
    """Write `data` as JSON to `path` atomically: readers see the old file or the new one, never half."""
    write_atomic(path, json.dumps(data, indent=1, default=str).encode())


def identity(plain_config: dict) -> str:
    """sha256 of what a variant measures: its resolved config without the sweep, resume and tracking keys."""
    kept = {k: v for k, v in plain_config.items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def variant_id(run: RunConfig) -> str:
    """`identity` of a typed variant: the `config_id` its job gives its result."""
    return identity(to_plain(run))


def new_folder(root: Path) -> Path:
    """A fresh sweep folder under `root`, named by the time; never one another sweep already holds."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1, 1000):
        folder = root / (stamp if n == 1 else f"{stamp}_{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise SweepError(f"cannot make a new sweep folder under {root}")


def find_folder(root: Path, which: str) -> Path:
    """`latest` (the sweep folder under `root` started last) or a sweep folder's path."""
    if which != "latest":
        folder = Path(which)
        if not (folder / SWEEP_FILE).is_file():
            raise SweepError(f"{which} is not a sweep folder (no {SWEEP_FILE}); give one under {root}, or 'latest'")
        return folder
    sweeps = [p.parent for p in root.glob(f"*/{SWEEP_FILE}")]
    if not sweeps:
        raise SweepError(f"no sweep under {root} to resume or sync")
    return max(sweeps, key=lambda p: (Sweep.read(p).started, p.name))


@dataclass
class Sweep:
    """`sweep.json`: what the launching process knows, for jobs and for later commands."""
    folder: Path
    total: int
    overrides: list[str]
    tracking: TrackingConfig | None = None  # the store as the user named it; None: tracking off
    parent_run_id: str | None = None
    started: float = field(default_factory=time.time)
    variants: list[str] | None = None  # identity() of each variant in job order; None in a sweep.json made before
    server_uri: str | None = None  # the loopback server the jobs log through while the sweep runs; None: the store

    @classmethod
    def read(cls, folder: Path) -> Sweep:
        try:
            data = json.loads((folder / SWEEP_FILE).read_text())
            tracking = data.pop("tracking", None)
            return cls(folder=folder, tracking=tracking and TrackingConfig(**tracking),
                       **{k: v for k, v in data.items() if k != "folder"})
        except (OSError, ValueError, TypeError) as exc:
            raise SweepError(f"cannot read {folder / SWEEP_FILE}: {exc}") from None

    def write(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "folder"}
        data["tracking"] = self.tracking and dataclasses.asdict(self.tracking)
        write_json(self.folder / SWEEP_FILE, data)

    def job_overrides(self) -> list[str]:
        """What each job must know of this sweep, as overrides of its `sweep` keys: the parent run, the count,
        the loopback server. They travel with the job's config to whichever host runs it."""
        values = {"parent_run_id": self.parent_run_id, "total": self.total, "server_uri": self.server_uri}
        return [f"sweep.{key}={'null' if value is None else value if isinstance(value, int) else repr(value)}"
                for key, value in values.items()]


def job_config(run: RunConfig) -> RunConfig:
    """`run` as a job of its sweep runs it: the store reached through the loopback server where there is one."""
    if not run.sweep.server_uri:
        return run
    return dataclasses.replace(run, tracking=dataclasses.replace(run.tracking, uri=run.sweep.server_uri))


@dataclass
class JobRecord:
    """`result.json` of one job: the variant's result, what it measured, and whether MLflow has it yet."""
    folder: Path
    result: VariantResult
    config_id: str
    config: dict
    result_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started_ms: int = 0
    ended_ms: int = 0
    mlflow_run_id: str | None = None  # set once the run is logged, complete
    tracking_error: str | None = None
    ran_in: str = ""  # host:folder where the job measured it; on another host, this record is a copy


    @property
    def logged(self) -> bool:
        return self.mlflow_run_id is not None

    def to_dict(self) -> dict:
        """The record as `result.json` holds it, and as a job hands it back to the launching process."""
        return {"format": FORMAT, **{k: v for k, v in self.__dict__.items() if k not in ("folder", "result")},
                "result": self.result.to_dict()}

    def write(self) -> None:
        write_json(self.folder / RESULT_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, folder: Path) -> JobRecord | None:
        """The record `to_dict` made, kept in `folder`; None where it is partial or of another format."""
        try:
            data = dict(data)
            if data.pop("format") != FORMAT:
                return None
            return cls(folder=folder, result=VariantResult.from_dict(data.pop("result")), **data)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    @classmethod
    def read(cls, path: Path) -> JobRecord | None:
        """The record in `path`, or None where it is missing, partial or of another format."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls.from_dict(data, path.parent) if isinstance(data, dict) else None


def job_records(folder: Path) -> list[JobRecord]:
    """Every complete result.json of a sweep (its job folders, or the folder itself for a single run),
    one per variant: where a variant was measured twice, the later record."""
    paths = [folder / RESULT_FILE, *sorted(folder.glob(f"*/{RESULT_FILE}"), key=lambda p: _job_order(p.parent))]
    latest: dict[str, JobRecord] = {}
    for record in filter(None, map(JobRecord.read, paths)):
        if record.config_id not in latest or record.ended_ms >= latest[record.config_id].ended_ms:
            latest[record.config_id] = record
    return sorted(latest.values(), key=lambda r: _job_order(r.folder))


def _job_order(folder: Path) -> tuple:
    return (0, int(folder.name), "") if folder.name.isdigit() else (1, 0, folder.name)
