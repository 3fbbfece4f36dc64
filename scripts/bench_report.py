"""What every kvtier benchmark shares on the outside: its flags and how it reports.

`--quick` (a reduced run), `--json` (every figure as one JSON object on the last line of
stdout; the human table goes to stderr then) and `--dir` (where its files go).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def bench_arguments(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=None)
    return ap


def report(console: Console, title: str, fig: dict[str, Any], as_json: bool) -> None:
    """The figures as a table (rates in GB/s), then as JSON on the last line if asked."""
    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value", justify="right")
    for k, v in fig.items():
        t.add_row(k, f"{v / 1e9:.2f} GB/s" if k.endswith("bytes_per_s") and v is not None
                  else str(v))
    console.print(t)
    if as_json:
        print(json.dumps(fig))
