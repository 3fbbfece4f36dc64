"""Where an NVMe-oF/TCP namespace is and how kvtierd's host talks to it: plain data.

This lives apart from `host` (the trio transport) so that the configuration
(`kvtier.daemon.config`) can describe `nvmf` pools without importing trio or the
transport; `host` re-exports both names for its existing users.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field

from kvtier.daemon.nvmf.psk import ConfiguredPsk


@dataclass
class NvmfTargetConfig:
    address: str
    port: int
    subnqn: str
    hostnqn: str
    nsid: int = 1
    queues: int = 4
    queue_depth: int = 32
    header_digest: bool = False
    data_digest: bool = False
    kato_ms: int = 10_000
    io_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    reconnect_max_s: float = 2.0
    hostid: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    psk: ConfiguredPsk | None = None  # TLS 1.3 with this PSK on every queue
    psk_file: str = ""  # where `psk` was read from (provisioning hands it to SPDK)

    @property
    def where(self) -> str:
        return f"{self.address}:{self.port} {self.subnqn} ns {self.nsid}"


def default_hostnqn() -> str:
    """A stable host NQN for this machine (from /etc/machine-id when there is one)."""
    try:
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
        u = uuid.UUID(mid) if len(mid) == 32 else uuid.uuid5(uuid.NAMESPACE_DNS, mid)
    except (OSError, ValueError):
        u = uuid.uuid5(uuid.NAMESPACE_DNS, os.uname().nodename)
    return f"nqn.2014-08.org.nvmexpress:uuid:{u}"
