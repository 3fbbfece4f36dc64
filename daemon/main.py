"""`kvtierd`: the kvtier daemon's command line.

    kvtierd [run] [--config /etc/kvtier/kvtier.toml] [--state-dir DIR]   serve (default)
    kvtierd demo [--state-dir DIR]                     engine-only demo (no daemon)
    kvtierd check-config --config PATH                 validate a config and exit
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kvtier.daemon.config import (
    Config,
    ConfigError,
    check_runtime,
    default_config,
    ensure_default_tenant,
    load_config,
)
from kvtier.daemon.errors import StoreError
from kvtier.daemon.sizes import size_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtierd", description="kvtier KV-cache tiering daemon")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="serve clients (the default command)")
    for q in (p, r):
        q.add_argument("--config", default=os.environ.get("KVTIER_CONFIG"),
                       help="TOML config (default: the embedded default under --state-dir)")
        q.add_argument("--state-dir", default=None,
                       help="state directory of the embedded default "
                            "(default: $KVTIER_STATE_DIR, /var/lib/kvtier as root, ./.state)")
        q.add_argument("--log-level", default=os.environ.get("KVTIER_LOG", "info"))
    c = sub.add_parser("check-config", help="validate a config file and exit")
    c.add_argument("--config", required=True)
    d = sub.add_parser("demo", help="engine-only demo: format/reopen a pool file and run a "
                                    "save/lookup/load round trip (no daemon)")
    d.add_argument("--state-dir", default=None)
    d.add_argument("--pool-size", default="1G", type=size_arg)
    d.add_argument("--segment-size", default="64M", type=size_arg)
    d.add_argument("--prompt-tokens", default=32768, type=int)
    return p


def load(args: argparse.Namespace) -> Config:
    if args.config:
        cfg = load_config(args.config)
    else:
        cfg = default_config(args.state_dir)
        cfg.metrics_port = int(os.environ.get("KVTIER_METRICS_PORT", "9464"))
    if not cfg.tenants:
        ensure_default_tenant(cfg)
    return cfg


def limit_malloc_arenas(n: int = 2) -> None:
    """Keep glibc from holding on to memory.  By default every worker thread may get its
    own arena, and large freed blocks raise the mmap threshold so that later large buffers
    come from the heap and stay resident; the daemon's RSS then creeps up in steps.  A
    couple of shared arenas and a fixed mmap threshold keep it flat."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            libc = ctypes.CDLL(name)
            libc.mallopt(-8, n)  # M_ARENA_MAX
            libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (also stops its growth)
        except (OSError, AttributeError):
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = args.cmd or "run"
    try:
        if cmd == "demo":
            from kvtier.daemon.config import default_state_dir
            from kvtier.daemon.demo import run_demo

            return run_demo(args.state_dir or default_state_dir(), args.pool_size,
                            args.segment_size, args.prompt_tokens)
        if cmd == "check-config":
            cfg = load_config(args.config)
            check_runtime(cfg)  # directories: as the user running this
            print(f"{args.config}: ok ({len(cfg.pools)} pool(s), {len(cfg.tenants)} tenant(s))")
            return 0
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stderr)
        cfg = load(args)
        limit_malloc_arenas()
        import trio

        from kvtier.daemon.service import Service

        trio.run(Service(cfg).run)
        return 0
    except (ConfigError, StoreError) as e:
        print(f"kvtierd: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
