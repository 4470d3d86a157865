"""A Markdown table on stdout, for the scripts that turn results.json files into README tables."""
from __future__ import annotations

from collections.abc import Iterable


def print_table(header: list[str], rows: Iterable[Iterable[object]]) -> None:
    print("|" + "|".join(header) + "|\n|" + "---|" * len(header))
    for row in rows:
        print("|" + "|".join(str(v) for v in row) + "|")
