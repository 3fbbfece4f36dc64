"""`kvtierd`: the kvtier daemon's command line."""

from __future__ import annotations

import argparse
import os
import sys

from kvtier.daemon.errors import StoreError
from kvtier.daemon.sizes import size_arg


def default_state_dir() -> str:
    return os.environ.get("KVTIER_STATE_DIR") or (
        "/var/lib/kvtier" if os.geteuid() == 0 and not os.environ.get("KVTIER_DEV")
        else os.path.join(os.getcwd(), ".state"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtierd", description="kvtier KV-cache tiering daemon")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="format/reopen the embedded default pool and run a "
                                    "save/lookup/load round trip")
    d.add_argument("--state-dir", default=None, help="where pool files live "
                   "(default: $KVTIER_STATE_DIR, or ./.state)")
    d.add_argument("--pool-size", default="1G", type=size_arg)
    d.add_argument("--segment-size", default="64M", type=size_arg)
    d.add_argument("--prompt-tokens", default=32768, type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "demo":
        from kvtier.daemon.demo import run_demo

        state = args.state_dir or os.environ.get("KVTIER_STATE_DIR") or \
            os.path.join(os.getcwd(), ".state")
        try:
            return run_demo(state, args.pool_size, args.segment_size, args.prompt_tokens)
        except StoreError as e:
            print(f"kvtierd: {e}", file=sys.stderr)
            return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
