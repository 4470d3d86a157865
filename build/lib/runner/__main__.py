"""`runner [overrides]` / `python -m runner [overrides]` sweeps the matrix; `runner table|baseline|check`
report on finished sweeps; `runner --help` lists both and every config group."""
from __future__ import annotations

import os
import sys

USAGE_EXIT = 2
REPORT_COMMANDS = ("table", "baseline", "check")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for a hub
    os.environ.setdefault("YOLO_VERBOSE", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    if argv and argv[0] in REPORT_COMMANDS:
        from runner.report.cli import main as report_main

        sys.exit(report_main(argv))

    import hydra

    from runner import config, launcher

    if not any(a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in argv):
        try:
            variants = launcher.preflight(argv)
            launcher.open_tracking(variants[0].tracking)
        except config.ConfigError as exc:
            print(f"runner: error: {exc}", file=sys.stderr)
            sys.exit(USAGE_EXIT)
        launcher.SESSION["total"] = len(variants)
        launcher.announce_backends(variants)
    config.register()
    sys.argv = [sys.argv[0], *argv]
    hydra.main(config_path=str(launcher.CONF_DIR), config_name="config", version_base="1.3")(launcher.task)()


if __name__ == "__main__":
    main()
