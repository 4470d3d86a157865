"""The command-line parsing the report commands and `runner sensitivity` share: a parser whose errors are one line
(what is wrong, and where to read more), exit 2, as every other refusal of runner; and the number types."""
from __future__ import annotations

import argparse
import math
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, its usage error as one line: `runner: error: <prog>: <message> (see <prog> --help)`."""

    def error(self, message: str):
        print(f"runner: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def bounded(low: float, high: float | None = None):
    """A number in [low, high] (no upper end without `high`)."""
    top = math.inf if high is None else high

    def number(text: str) -> float:
        value = float(text)
        if not low <= value <= top:
            raise argparse.ArgumentTypeError(f"{text} is not in [{low:g}, {top:g}]")
        return value
    return number


def positive(kind=int):
    """A number of `kind` (int: a whole number) above 0."""
    def number(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"'{text}' is not a{' whole' if kind is int else ''} number above 0")
        return value
    return number
