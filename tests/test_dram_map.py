"""MAP/UNMAP: a tenant's DRAM tier mapped into its clients, values pinned there.

A real daemon; the clients read values straight out of their mapping of the tenant's
DRAM memfd.  Checked: bytes equal GET, frame ranges, pins hold values in place while the
tenant's DRAM churns, pins die with the client, the descriptor is the tenant's own tier
(writable, for RESERVE) and never another's, and no tenant's mapping ever holds another
tenant's data.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError
from kvtier.client.protocol import (
    FD_ORDER,
    PROTOCOL_VERSION,
    CtrlParser,
    Msg,
    Tier,
    encode_ctrl,
)

MiB = 1 << 20


def _value(seed: int, n: int = MiB) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _churn(c: Client, n: int, seed: int = 1000) -> None:
    """Write n MiB of other values: the tenant's DRAM tier holds 32 MiB."""
    for i in range(n):
        c.put("churn", f"churn-{seed + i}".encode().ljust(16, b"."), [_value(seed + i)])


def test_mapped_bytes_are_the_value(daemon: Daemon) -> None:
    daemon.start()
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        assert c.dram_size == 32 * MiB  # 64 MiB of DRAM, shared equally by two tenants
        frames = [_value(1, 4096), _value(2, 3 * 4096 + 17), _value(3, 100)]
        c.put("s", b"k" * 16, frames)
        c.put("s", b"j" * 16, [_value(4)])
        maps = c.map([b"k" * 16, b"missing".ljust(16, b"-"), b"j" * 16])
        assert maps[1] is None
        (off, n), (off2, n2) = maps[0], maps[2]  # type: ignore[misc]
        assert bytes(c.dram[off:off + n]) == b"".join(frames)
        assert bytes(c.dram[off2:off2 + n2]) == _value(4)
        ((fo, fn),) = c.map([b"k" * 16], frames=(1, 3))  # type: ignore[misc]
        assert bytes(c.dram[fo:fo + fn]) == frames[1] + frames[2]
        assert c.unmap([off, off2, fo]) == 3
        with pytest.raises(KvtierError, match="INVALID"):
            c.unmap([off])  # not held any more
        with pytest.raises(KvtierError, match="INVALID"):
            c.map([b"k" * 16], frames=(2, 9))


def test_a_pin_holds_the_value_in_place_until_unmap(daemon: Daemon) -> None:
    daemon.start()
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        v = _value(7)
        c.put("s", b"p" * 16, [v])
        ((off, n),) = c.map([b"p" * 16])  # type: ignore[misc]
        _churn(c, 48)  # 1.5 times the tenant's DRAM tier
        assert bytes(c.dram[off:off + n]) == v  # pinned: not evicted, not overwritten
        assert c.lookup([b"p" * 16])[1] == [Tier.DRAM]
        c.unmap([off])
        _churn(c, 48, seed=2000)
        assert c.lookup([b"p" * 16])[1] == [Tier.POOL]  # evicted from DRAM once unpinned
        assert c.get(b"p" * 16) == v


def test_pins_are_released_when_the_client_goes(daemon: Daemon) -> None:
    daemon.start()
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        c.put("s", b"q" * 16, [_value(8)])
        assert c.map([b"q" * 16])[0] is not None
    # The client closed without UNMAP: the daemon released its pin.
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        _churn(c, 48)
        assert c.lookup([b"q" * 16])[1] == [Tier.POOL]


def test_tenants_map_only_their_own_dram(daemon: Daemon) -> None:
    daemon.start()
    secret = _value(9, 256 * 1024)
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as a, \
            Client.connect(daemon.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as b:
        a.put("s", b"s" * 16, [secret])
        assert bytes(a.dram).find(secret[:4096]) >= 0
        assert b.map([b"s" * 16]) == [None]
        assert bytes(b.dram).find(secret[:4096]) < 0


def _hello_fds(sock: str, tenant: str) -> tuple[dict[str, int], dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock)
        s.sendall(encode_ctrl(Msg.HELLO, {"version": PROTOCOL_VERSION, "tenant": tenant,
                                          "token": TOKENS[tenant], "arena_size": 1 << 20,
                                          "ring_entries": 8}))
        p, fds = CtrlParser(), []
        while (m := p.next_message()) is None:
            data, got, _f, _a = socket.recv_fds(s, 65536, len(FD_ORDER))
            fds += got
            p.feed(data)
    assert m[0] == Msg.HELLO_OK and len(fds) == len(FD_ORDER)
    return dict(zip(FD_ORDER, fds, strict=True)), m[1]


def test_the_dram_descriptor_is_the_tenants_own_tier(daemon: Daemon) -> None:
    """The fd a client gets is its tenant's own DRAM tier, writable (RESERVE has the client
    write values there; docs/SECURITY.md): a client can change its own tenant's memory,
    and no descriptor ever reaches another tenant's."""
    daemon.start()
    a, ha = _hello_fds(daemon.socket, "alice")
    b, hb = _hello_fds(daemon.socket, "bob")
    try:
        assert fcntl.fcntl(a["dram"], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert os.fstat(a["dram"]).st_ino != os.fstat(b["dram"]).st_ino  # two memfds
        assert os.fstat(a["dram"]).st_size == ha["dram_size"]
        m = mmap.mmap(a["dram"], ha["dram_size"], flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        m[:4] = b"xxxx"  # alice's own memory
        m.close()
        m = mmap.mmap(b["dram"], hb["dram_size"], flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        assert m[:4] != b"xxxx"
        m.close()
    finally:
        for fd in (*a.values(), *b.values()):
            os.close(fd)
