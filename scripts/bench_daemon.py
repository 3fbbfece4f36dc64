"""A kvtierd process for the benchmarks: its own config, state dir and tenant."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvtier.client.admin import AdminClient
from kvtier.daemon.config import hash_token

TOKEN = "bench-token"  # the tenant `bench` of every benchmark daemon
MiB, GiB = 1 << 20, 1 << 30


class BenchDaemon:
    def __init__(self, work: str, *, dram: int, pool: int, segment: int = 64 * MiB,
                 ack: str = "media", populate: bool = True, arena_max: int = GiB,
                 io_threads: int = 8, extra: str = "") -> None:
        self.sock = os.path.join(work, "kvtier.sock")
        self.cfg = os.path.join(work, "kvtier.toml")
        self.log = os.path.join(work, "kvtierd.log")
        self.pool_path = os.path.join(work, "pool0.img")
        Path(self.cfg).write_text(
            f'state_dir = "{work}"\nsocket = "{self.sock}"\nack = "{ack}"\n'
            f"admin_uids = [{os.geteuid()}]\n"
            f"[dram]\nsize = {dram}\nsegment_size = {segment}\n"
            f"populate = {'true' if populate else 'false'}\n"
            f'[[pool]]\npath = "pool0.img"\nsize = {pool}\nsegment_size = {segment}\n'
            f'[[tenant]]\nid = "bench"\ntoken_hash = "{hash_token(TOKEN)}"\n'
            f'encryption = "off"\n'
            f"[limits]\narena_max = {arena_max}\nio_threads = {io_threads}\n"
            f"inflight_per_client = 64\n{extra}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        with open(self.log, "ab") as log:  # the child keeps its own copy of the handle
            self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.daemon.main", "run",
                                          "--config", self.cfg], stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with AdminClient(self.sock, timeout=2) as a:
                    a.call("status")
                return
            except Exception:
                if self.proc.poll() is not None:
                    raise SystemExit("kvtierd exited:\n"
                                     + Path(self.log).read_text()[-2000:]) from None
                time.sleep(0.05)
        raise SystemExit("kvtierd did not become ready")

    def status(self) -> dict[str, Any]:
        with AdminClient(self.sock) as a:
            st: dict[str, Any] = a.call("status")
            return st

    def backlog(self) -> int:
        """Values acknowledged in DRAM and not yet written behind to the pool."""
        return int(self.status()["tiers"]["writebehind_backlog"])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(600)
            self.proc = None
