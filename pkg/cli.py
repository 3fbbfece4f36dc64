"""`kvtier`: the admin command line.

Talking to a running kvtierd (admin uid required):
    kvtier status [--json]
    kvtier ls [TENANT [SESSION]] [--json]
    kvtier stat TENANT KEY-HEX
    kvtier info TENANT [SESSION]     what the FUSE tree's tenants/T/info (.../S/info) shows
    kvtier pools                     every pool's info (the tree's pools/P/info)
    kvtier segments POOL             a pool's segment table (the tree's pools/P/segments)
    kvtier delete TENANT KEY-HEX     delete one value (the tree's rm of its block)
    kvtier purge TENANT [SESSION]
    kvtier demo                      a client round trip (tenant `default`)
    kvtier bench [--size 2M]         put/get throughput and 4 KiB latency
Offline, on a pool no daemon has open:
    kvtier pool format PATH --size 1G [--segment-size 64M]
    kvtier pool info PATH [--json]
    kvtier pool scrub PATH
Config helpers:
    kvtier token hash [TOKEN]        a token_hash line for a [[tenant]] (reads stdin if omitted)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from kvtier.client.admin import AdminClient
from kvtier.client.errors import KvtierError
from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.config import ConfigError, PoolConfig, default_state_dir, hash_token, load_config
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
    tenants = pool.usage()
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


def default_socket() -> str:
    env = os.environ.get("KVTIER_SOCKET")
    if env:
        return env
    local = os.path.join(default_state_dir(), "kvtier.sock")
    return local if os.path.exists(local) else "/run/kvtier/kvtier.sock"


def _admin(args: argparse.Namespace, cmd: str, **kw: Any) -> Any:
    with AdminClient(args.socket) as a:
        return a.call(cmd, **kw)


def _status(args: argparse.Namespace) -> int:
    st = _admin(args, "status")
    if args.json:
        print(json.dumps(st))
        return 0
    d, t = st["daemon"], st["tiers"]
    table = Table(title=f"kvtierd pid {d['pid']}", show_header=False)
    table.add_row("socket", d["socket"])
    table.add_row("metrics", f"http://127.0.0.1:{d['metrics_port']}/metrics"
                  if d["metrics_port"] else "off")
    table.add_row("uptime", f"{d['uptime_s']} s")
    table.add_row("ack", st["ack"])
    for tier in ("dram", "media"):
        x = st[tier]
        table.add_row(tier, f"{x['entries']} entries, {format_size(x['live_bytes'])} of "
                      f"{format_size(x['capacity_bytes'])}")
    table.add_row("gets", f"{t['dram_hits']} from DRAM, {t['pool_hits']} from media, "
                  f"{t['misses']} misses")
    table.add_row("write-behind", f"{t['writebehind_backlog']} pending, "
                  f"{t['writebehind_flushed']} flushed")
    table.add_row("clients", str(len(d["clients"])))
    Console().print(table)
    return 0


def _ls(args: argparse.Namespace) -> int:
    res = _admin(args, "ls", tenant=args.tenant, session=args.session)
    if args.json:
        print(json.dumps(res))
        return 0
    if args.session is None:
        table = Table("session" if args.tenant else "tenant", "entries", "bytes")
        for name, v in sorted(res.items()):
            table.add_row(name, str(v["entries"]), format_size(v["bytes"]))
    else:
        table = Table("key", "bytes", "frames", "hits", "expiry")
        for e in res:
            table.add_row(e["key"], format_size(e["bytes"]), str(e["frames"]), str(e["hits"]),
                          str(e["expiry"] or "never"))
    Console().print(table)
    return 0


def _stat(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "stat", tenant=args.tenant, key=args.key), indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "info", tenant=args.tenant, session=args.session), indent=2))
    return 0


def _pools(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "pools"), indent=2))
    return 0


def _segments(args: argparse.Namespace) -> int:
    print(json.dumps(_admin(args, "segments", pool=args.pool), indent=2))
    return 0


def _delete(args: argparse.Namespace) -> int:
    _admin(args, "delete", tenant=args.tenant, key=args.key)
    print(f"deleted {args.key} of tenant {args.tenant}")
    return 0


def _purge(args: argparse.Namespace) -> int:
    res = _admin(args, "purge", tenant=args.tenant, session=args.session)
    what = f"session {args.session} of tenant {args.tenant}" if args.session else \
        f"tenant {args.tenant}"
    print(f"purged {res['purged']} values of {what}")
    return 0


def _limit_arg(kind: str) -> Any:
    def parse(v: str) -> int | None:
        if v in ("off", "none", "unlimited"):
            return None
        return int(v) if kind == "count" else size_arg(v)
    return parse


def _limits(args: argparse.Namespace) -> int:
    changes = {k: getattr(args, k) for k in ("quota", "bandwidth", "iops")
               if getattr(args, k) is not _UNSET}
    res = _admin(args, "limits", tenant=args.tenant, **changes)
    if args.json:
        print(json.dumps(res))
        return 0

    def show(v: int | None, unit: str) -> str:
        return "unlimited" if v is None else (format_size(v) + unit if unit != " ops/s"
                                               else f"{v}{unit}")
    print(f"tenant {args.tenant}: quota {show(res['quota'], '')}, bandwidth "
          f"{show(res['bandwidth'], '/s')}, iops {show(res['iops'], ' ops/s')}; throttled "
          f"{res['throttled_s']} s, {res['refused_puts']} puts refused")
    return 0


_UNSET: Any = object()


def _token_hash(args: argparse.Namespace) -> int:
    token = args.token if args.token is not None else sys.stdin.readline().strip()
    if not token:
        print("kvtier: empty token", file=sys.stderr)
        return 1
    print(f'token_hash = "{hash_token(token)}"')
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Put/get throughput and 4 KiB GET latency through the running daemon."""
    import time

    import numpy as np

    from kvtier.client.client import Client

    token = _token(args)
    if token is None:
        return 1
    size, seconds = args.size, args.seconds
    with Client.connect(args.socket, args.tenant, token, arena_size=max(64 << 20,
                                                                        4 * size)) as c:
        val = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
        slot = c.allocator.alloc(size + 64)
        slot.view[:size] = val.tobytes()
        keys = [np.random.default_rng(i).bytes(16) for i in range(64)]
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            c.put_slot("kvtier-bench", keys[n % len(keys)], slot, [size], ttl_s=600)
            n += 1
        put = n * size / (time.perf_counter() - t0)
        stored = min(n, len(keys))
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 2:
            c._call(c.get_request(keys[n % stored], slot, size), "get")
            n += 1
        get = n * size / (time.perf_counter() - t0)
        c.allocator.free(slot)
        c.put("kvtier-bench", b"\1" * 16, [bytes(4096)], ttl_s=600)
        lat = []
        for _ in range(2000):
            t1 = time.perf_counter()
            c.get(b"\1" * 16)
            lat.append(time.perf_counter() - t1)
        c.purge_session("kvtier-bench")
    p50, p99 = np.percentile(lat, 50) * 1e6, np.percentile(lat, 99) * 1e6
    if args.json:
        print(json.dumps({"value_bytes": size, "put_bytes_per_s": round(put),
                          "get_bytes_per_s": round(get), "get_4k_p50_us": round(p50, 1),
                          "get_4k_p99_us": round(p99, 1)}))
        return 0
    table = Table(title=f"kvtier bench ({format_size(size)} values, tenant {args.tenant})",
                  show_header=False)
    table.add_row("put", f"{put / 1e9:.2f} GB/s")
    table.add_row("get", f"{get / 1e9:.2f} GB/s")
    table.add_row("4 KiB get", f"p50 {p50:.0f} us, p99 {p99:.0f} us")
    Console().print(table)
    return 0


def _token(args: argparse.Namespace) -> str | None:
    if args.token is not None:
        return str(args.token)
    path = os.path.join(args.state_dir or default_state_dir(), "default.token")
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        print(f"kvtier: cannot read the default tenant's token at {path}: {e.strerror}",
              file=sys.stderr)
        return None


def _demo(args: argparse.Namespace) -> int:
    from kvtier.demo_client import run_client_demo

    token = _token(args)
    if token is None:
        return 1
    keyring = os.path.join(args.state_dir or default_state_dir(), "keyring.json")
    return run_client_demo(args.socket, token, args.tenant, args.prompt_tokens, keyring)


def _audit_verify(args: argparse.Namespace) -> int:
    from kvtier.daemon.audit import verify

    r = verify(args.path)
    if r.ok:
        print(f"{args.path}: {r.lines} records, chain intact")
        return 0
    print(f"{args.path}: {r.problem} ({r.lines} records before it are intact)",
          file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtier", description="kvtier admin tool")
    p.add_argument("--socket", default=default_socket(),
                   help="kvtierd's control socket (default: $KVTIER_SOCKET, "
                        "./.state/kvtier.sock, /run/kvtier/kvtier.sock)")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="the daemon's state")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_status)
    ls = sub.add_parser("ls", help="tenants, a tenant's sessions, or a session's values")
    ls.add_argument("tenant", nargs="?")
    ls.add_argument("session", nargs="?")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_ls)
    sa = sub.add_parser("stat", help="one stored value")
    sa.add_argument("tenant")
    sa.add_argument("key", help="the key in hex")
    sa.set_defaults(fn=_stat)
    inf = sub.add_parser("info", help="a tenant's or a session's summary")
    inf.add_argument("tenant")
    inf.add_argument("session", nargs="?")
    inf.set_defaults(fn=_info)
    po = sub.add_parser("pools", help="every pool's state")
    po.set_defaults(fn=_pools)
    sg = sub.add_parser("segments", help="a pool's segment table")
    sg.add_argument("pool")
    sg.set_defaults(fn=_segments)
    de = sub.add_parser("delete", help="delete one stored value")
    de.add_argument("tenant")
    de.add_argument("key", help="the key in hex")
    de.set_defaults(fn=_delete)
    pu = sub.add_parser("purge", help="delete a tenant's or a session's values")
    pu.add_argument("tenant")
    pu.add_argument("session", nargs="?")
    pu.set_defaults(fn=_purge)
    li = sub.add_parser("limits", help="show or change a tenant's quota and rate limits, "
                                       "live (no restart)")
    li.add_argument("tenant")
    li.add_argument("--quota", type=_limit_arg("size"), default=_UNSET,
                    help="media pool space, e.g. 10G, or off")
    li.add_argument("--bandwidth", type=_limit_arg("size"), default=_UNSET,
                    help="GET + PUT payload bytes per second, e.g. 500M, or off")
    li.add_argument("--iops", type=_limit_arg("count"), default=_UNSET,
                    help="GET + PUT requests per second, or off")
    li.add_argument("--json", action="store_true")
    li.set_defaults(fn=_limits)
    tk = sub.add_parser("token", help="token helpers")
    tks = tk.add_subparsers(dest="token_cmd", required=True)
    th = tks.add_parser("hash", help="print a token_hash line for the config")
    th.add_argument("token", nargs="?")
    th.set_defaults(fn=_token_hash)
    dm = sub.add_parser("demo", help="a client save/lookup/load round trip through kvtierd")
    dm.add_argument("--tenant", default="default")
    dm.add_argument("--token", default=None,
                    help="the tenant's token (default: the embedded default's token file)")
    dm.add_argument("--state-dir", default=None)
    dm.add_argument("--prompt-tokens", type=int, default=16384)
    dm.set_defaults(fn=_demo)
    bn = sub.add_parser("bench", help="put/get throughput and 4 KiB latency through kvtierd")
    bn.add_argument("--tenant", default="default")
    bn.add_argument("--token", default=None)
    bn.add_argument("--state-dir", default=None)
    bn.add_argument("--size", type=size_arg, default=2 << 20)
    bn.add_argument("--seconds", type=float, default=4.0)
    bn.add_argument("--json", action="store_true")
    bn.set_defaults(fn=_bench)
    au = sub.add_parser("audit", help="the daemon's audit log")
    aus = au.add_subparsers(dest="audit_cmd", required=True)
    av = aus.add_parser("verify", help="check the hash chain; name the first bad line")
    av.add_argument("path", help="the audit log (<state_dir>/audit.log)")
    av.set_defaults(fn=_audit_verify)
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
    hn = ps.add_parser("hostnqn", help="the host NQN kvtierd uses when a pool names none")
    hn.set_defaults(fn=_pool_hostnqn)
    gk = ps.add_parser("gen-psk", help="write a new NVMe/TCP TLS PSK (interchange format, "
                                       "mode 0600) for an nvmf pool's psk_file")
    gk.add_argument("path", help="the key file to create (never overwritten)")
    gk.add_argument("--sha384", action="store_true",
                    help="a 48-byte key: TLS_AES_256_GCM_SHA384 (default: 32 bytes, "
                         "TLS_AES_128_GCM_SHA256)")
    gk.set_defaults(fn=_pool_gen_psk)
    for name, fn, doc in (("provision", _pool_provision,
                           "create an nvmf pool's subsystem on its SPDK target (idempotent)"),
                          ("decommission", _pool_decommission,
                           "remove an nvmf pool's subsystem from its SPDK target")):
        pv = ps.add_parser(name, help=doc)
        pv.add_argument("--config", required=True, help="kvtierd's config file")
        pv.add_argument("--pool", default=None, help="the pool's name (default: the first)")
        if name == "decommission":
            pv.add_argument("--delete-bdev", action="store_true",
                            help="delete the bdev too (its data is lost)")
        pv.set_defaults(fn=fn)
    return p


def _nvmf_pool(args: argparse.Namespace) -> PoolConfig:
    cfg = load_config(args.config)
    pools = [p for p in cfg.pools if args.pool in (None, p.name)]
    if not pools:
        raise ValueError(f"{args.config}: no pool named {args.pool!r}")
    if pools[0].kind != "nvmf" or pools[0].nvmf is None or pools[0].nvmf.provision is None:
        raise ValueError(f"{args.config}: pool {pools[0].name} is not an nvmf pool with a "
                         f"[pool.provision] table")
    return pools[0]


def _pool_hostnqn(args: argparse.Namespace) -> int:
    from kvtier.daemon.nvmf.host import default_hostnqn

    print(default_hostnqn())
    return 0


def _pool_gen_psk(args: argparse.Namespace) -> int:
    from kvtier.daemon.nvmf import psk

    key = psk.generate(48, psk.HASH_SHA384) if args.sha384 else psk.generate()
    try:
        # Exactly the interchange text, no newline: SPDK's keyring hands the whole file to
        # its parser, which refuses anything after the closing ':'.
        psk.write_file(args.path, key)
    except FileExistsError:
        raise ValueError(f"{args.path} exists: a key file is never overwritten") from None
    except OSError as e:
        raise ValueError(f"{args.path}: {e.strerror or e}") from None
    if psk.read_file(args.path) != key:  # read back by the rule SPDK applies
        raise ValueError(f"{args.path}: the key read back differs from the one written")
    print(f"wrote a {len(key.key)}-byte PSK ({key.suite}) to {args.path} (mode 0600, no "
          f"trailing newline, as SPDK's keyring reads it)")
    return 0


def _pool_provision(args: argparse.Namespace) -> int:
    from kvtier.daemon.spdk import provision_pool

    made = provision_pool(_nvmf_pool(args)).made
    print("\n".join(made) if made else "nothing to do: the target already serves the pool")
    return 0


def _pool_decommission(args: argparse.Namespace) -> int:
    from kvtier.daemon.spdk import decommission_pool

    made = decommission_pool(_nvmf_pool(args), delete_bdev=args.delete_bdev).made
    print("\n".join(made) if made else "nothing to do: the target does not serve the pool")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (StoreError, ValueError, KvtierError, ConfigError) as e:
        print(f"kvtier: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
