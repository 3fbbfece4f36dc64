"""`kvtier`: the admin command line.

    kvtier pool format PATH --size 1G [--segment-size 64M]
    kvtier pool info PATH [--json]
    kvtier pool scrub PATH
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.errors import StoreError
from kvtier.daemon.pool import Pool
from kvtier.daemon.sizes import format_size, size_arg


def _pool_format(args: argparse.Namespace) -> int:
    pool = Pool.format(FileDevice(args.path, create_size=args.size),
                       segment_size=args.segment_size)
    print(f"formatted {args.path}: {pool.sb.segment_count} segments of "
          f"{format_size(args.segment_size)}")
    pool.close()
    return 0


def _pool_info(args: argparse.Namespace) -> int:
    pool = Pool.open(FileDevice(args.path))
    st = pool.stats()
    st["recovery"] = {"seconds": pool.recovery.seconds,
                      "records_replayed": pool.recovery.records_replayed,
                      "torn_records": pool.recovery.torn_records,
                      "superblock": pool.recovery.superblock_used,
                      "warnings": pool.recovery.warnings}
    tenants: dict[str, dict[str, int]] = {}
    for e in pool.entries():
        t = tenants.setdefault(e.tenant, {"entries": 0, "bytes": 0})
        t["entries"] += 1
        t["bytes"] += e.record_bytes
    st["tenants"] = tenants
    pool.close(checkpoint=False)
    if args.json:
        print(json.dumps(st))
        return 0
    table = Table(title=f"pool {args.path}", show_header=False)
    table.add_row("capacity", format_size(st["capacity_bytes"]))
    table.add_row("segment size", format_size(st["segment_size"]))
    table.add_row("segments", ", ".join(f"{k} {v}" for k, v in st["segments"].items() if v))
    table.add_row("entries", str(st["entries"]))
    table.add_row("live data", format_size(st["live_bytes"]))
    table.add_row("index memory", format_size(st["index_bytes"]))
    table.add_row("recovery", f"{st['recovery']['seconds'] * 1000:.1f} ms, "
                  f"{st['recovery']['records_replayed']} records replayed")
    for w in st["recovery"]["warnings"]:
        table.add_row("[yellow]warning[/]", w)
    for name, t in sorted(tenants.items()):
        table.add_row(f"tenant {name}", f"{t['entries']} entries, {format_size(t['bytes'])}")
    Console().print(table)
    return 0


def _pool_scrub(args: argparse.Namespace) -> int:
    pool = Pool.open(FileDevice(args.path))
    problems = pool.scrub()
    n = pool.index.count
    pool.close(checkpoint=False)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"scrubbed {n} records: {len(problems)} problem(s)")
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier", description="kvtier admin tool")
    sub = p.add_subparsers(dest="cmd", required=True)
    pool = sub.add_parser("pool", help="work on a pool file or device directly "
                                       "(while no daemon has it open)")
    ps = pool.add_subparsers(dest="pool_cmd", required=True)
    f = ps.add_parser("format", help="create a new, empty pool (destroys what is there)")
    f.add_argument("path")
    f.add_argument("--size", type=size_arg, default=None,
                   help="create the file with this size (omit for block devices)")
    f.add_argument("--segment-size", type=size_arg, default=64 << 20)
    f.set_defaults(fn=_pool_format)
    i = ps.add_parser("info", help="recover and describe a pool")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_pool_info)
    s = ps.add_parser("scrub", help="verify every live record's checksums")
    s.add_argument("path")
    s.set_defaults(fn=_pool_scrub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (StoreError, ValueError) as e:
        print(f"kvtier: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
