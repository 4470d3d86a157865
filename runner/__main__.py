"""`runner [overrides]` / `python -m runner [overrides]` sweeps the matrix; `runner sync` logs what a lost
tracking store missed; `runner table|baseline|check|pick|layers` report on finished sweeps; `runner sensitivity`
finds the nodes a Q/DQ int8 model keeps in float; `runner --help` lists them all and every config group."""
from __future__ import annotations

import sys

REPORT_COMMANDS = ("table", "baseline", "check", "pick", "layers")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in REPORT_COMMANDS:
        from runner.report.cli import main as report_main

        sys.exit(report_main(argv))
    if argv and argv[0] == "sync":
        from runner import sync
        from runner.environment import quiet_defaults

        quiet_defaults()
        sys.exit(sync.main(argv[1:]))
    if argv and argv[0] == "sensitivity":
        from runner import sensitivity

        sys.exit(sensitivity.main(argv[1:]))
    from runner import cli

    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
