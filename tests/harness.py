"""A real kvtierd process for tests: config in a temp dir, started and stopped by signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtier.client.admin import AdminClient
from kvtier.client.errors import PermissionDeniedError
from kvtier.daemon.config import hash_token

BIN = Path(sys.executable).parent
TOKENS = {"alice": "alice-secret", "bob": "bob-secret"}
# scrypt is deliberately slow: hash once per test session.
_HASHES: dict[str, str] = {}


def token_hash(token: str) -> str:
    if token not in _HASHES:
        _HASHES[token] = hash_token(token)
    return _HASHES[token]


@dataclass
class Daemon:
    dir: Path
    ack: str = "media"
    extra: str = ""
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    pool_size: str = "256M"
    segment_size: str = "8M"
    dram_size: str = "64M"
    dram_segment: str = "4M"
    admin_uids: list[int] | None = None
    pool: str = ""  # TOML of the [[pool]] table; "" = a file pool under the state dir
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "kvtier.sock")

    @property
    def config(self) -> Path:
        return self.dir / "kvtier.toml"

    @property
    def log(self) -> Path:
        return self.dir / "kvtierd.log"

    def write_config(self) -> None:
        admins = self.admin_uids if self.admin_uids is not None else [os.geteuid()]
        lines = [f'state_dir = "{self.dir}"', f'socket = "{self.socket}"', f'ack = "{self.ack}"',
                 f"admin_uids = {admins}", "",
                 "[dram]", f'size = "{self.dram_size}"', f'segment_size = "{self.dram_segment}"',
                 ""]
        lines += [self.pool] if self.pool else [
            "[[pool]]", 'name = "p0"', 'path = "pool0.img"', f'size = "{self.pool_size}"',
            f'segment_size = "{self.segment_size}"', ""]
        tenants = self.tenants or {t: {} for t in TOKENS}
        for tid, opts in tenants.items():
            lines += ["[[tenant]]", f'id = "{tid}"',
                      f'token_hash = "{token_hash(TOKENS.get(tid, tid + "-secret"))}"']
            if "allowed_uids" in opts:
                lines.append(f"allowed_uids = {opts['allowed_uids']}")
            lines.append(f'encryption = "{opts.get("encryption", "off")}"')
            if "key_scope" in opts:
                lines.append(f'key_scope = "{opts["key_scope"]}"')
            if "retention" in opts:
                lines.append(f'retention = "{opts["retention"]}"')
            for key in ("quota", "bandwidth"):
                if key in opts:
                    lines.append(f'{key} = "{opts[key]}"')
            if "iops" in opts:
                lines.append(f"iops = {opts['iops']}")
            lines.append("")
        lines.append(self.extra)
        self.config.write_text("\n".join(lines))

    def start(self, timeout: float = 30.0) -> Daemon:
        if not self.config.exists():
            self.write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([str(BIN / "kvtierd"), "run", "--config",
                                          str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtierd exited with {self.proc.returncode}:\n"
                                   + self.log.read_text())
            try:
                with AdminClient(self.socket, timeout=2) as a:
                    a.call("status")
                return self
            except PermissionDeniedError:
                return self  # serving; we are just not an admin
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("kvtierd did not become ready:\n" + self.log.read_text())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def rss_kib(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def admin(self, cmd: str, **kw: Any) -> Any:
        with AdminClient(self.socket) as a:
            return a.call(cmd, **kw)
