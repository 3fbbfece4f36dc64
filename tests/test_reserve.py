"""RESERVE / COMMIT through a real daemon: values written by the client straight into its
tenant's DRAM tier, stored as PUTs of those bytes would be -- and nothing a client does
with its mapping reaches beyond its own tenant's values or stops the daemon."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import (
    CorruptDataError,
    InvalidRequestError,
    KvtierError,
    NoSpaceError,
    NotFoundError,
)
from kvtier.client.protocol import KEYS_SESSION, Op, Request, Tier
from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.errors import NotFound
from kvtier.daemon.pool import Pool
from kvtier.daemon.tiers import TieredStore

MiB = 1 << 20


def _k(s: str) -> bytes:
    return s.encode().ljust(16, b".")


def _v(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _write(c: Client, off: int, frames: list[bytes]) -> None:
    for f in frames:
        c.dram[off:off + len(f)] = f
        off += len(f)


def test_a_value_written_in_place_is_stored_like_a_put(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()  # ack = media: on the pool before the answer
    try:
        frames = [_v(1, 5000), _v(2, 3 * 4096 + 17), _v(3, 100)]
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            assert c.dram_writable
            assert c.put_in_place("s", _k("a"), frames) == Tier.POOL
            assert c.get(_k("a")) == b"".join(frames)
            with c.get_slot(_k("a")) as (_view, lengths):
                assert lengths == [len(f) for f in frames]
            assert c.lookup([_k("a")]) == (1, [Tier.DRAM])
        info = d.admin("stat", tenant="alice", key=_k("a").hex())
        assert (info["session"], info["frames"], info["in_dram"]) == ("s", 3, True)
        d.stop()
        d.start()  # DRAM is gone: the media copy was written at the answer
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            assert c.lookup([_k("a")]) == (1, [Tier.POOL])
            assert c.get(_k("a")) == b"".join(frames)
    finally:
        d.stop()


def test_with_ack_memory_it_is_written_behind(tmp_path: Path) -> None:
    d = Daemon(tmp_path, ack="memory").start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            for i in range(8):
                assert c.put_in_place("s", _k(f"m{i}"), [_v(i, 300_000)]) == Tier.DRAM
        deadline = time.monotonic() + 60
        while d.admin("status")["tiers"]["writebehind_backlog"]:
            assert time.monotonic() < deadline, "write-behind never drained"
            time.sleep(0.02)
        d.stop()
        d.start()
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            for i in range(8):
                assert c.get(_k(f"m{i}")) == _v(i, 300_000)
    finally:
        d.stop()


def test_order_abort_and_what_is_served_meanwhile(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            c.put("s", _k("x"), [b"old" * 100])
            off = c.reserve("s", _k("x"), [300])
            _write(c, off, [b"new" * 100])
            assert c.get(_k("x")) == b"old" * 100  # not stored before COMMIT
            c.abort(_k("x"), off)
            assert c.get(_k("x")) == b"old" * 100  # given up: the old value stays
            # RESERVE takes the key's place in the order of its puts: a PUT after it wins
            off = c.reserve("s", _k("x"), [300])
            c.put("s", _k("x"), [b"put" * 100])
            _write(c, off, [b"res" * 100])
            c.commit(_k("x"), off)
            assert c.get(_k("x")) == b"put" * 100
            # ... and so does a DELETE after it
            off = c.reserve("s", _k("y"), [300])
            c.delete(_k("y"))
            _write(c, off, [b"yyy" * 100])
            c.commit(_k("y"), off)
            with pytest.raises(NotFoundError):
                c.get(_k("y"))
    finally:
        d.stop()


def test_bad_reservations_are_refused_by_name(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {}, "bob": {}}).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            off = a.reserve("s", _k("r"), [4096])
            with pytest.raises(InvalidRequestError):
                a.commit(_k("other"), off)  # not this key's reservation
            with pytest.raises(InvalidRequestError):
                a.commit(_k("r"), off + 4096)  # no reservation there
            with pytest.raises(InvalidRequestError):
                b.commit(_k("r"), off)  # another client's (another tenant's) reservation
            a.commit(_k("r"), off)
            with pytest.raises(InvalidRequestError):
                a.commit(_k("r"), off)  # committed already
            with pytest.raises(InvalidRequestError):
                a.reserve(KEYS_SESSION, _k("k"), [64])  # data keys are PUT, audited
            with pytest.raises(InvalidRequestError):
                a.reserve("", _k("k"), [64])
            table = a.allocator.alloc(16)
            try:
                req = a.reserve_request("s", _k("t"), [100, 100], table)
                req.data_len = 300  # the frames do not add up
                with pytest.raises(InvalidRequestError, match="INVALID"):
                    a._call(req, "reserve")
            finally:
                a.allocator.free(table)
            with pytest.raises(KvtierError):
                a.reserve("s", _k("huge"), [8 * MiB])  # larger than a DRAM segment (4M)
    finally:
        d.stop()


def test_reservations_left_open_are_given_up_with_the_client(tmp_path: Path) -> None:
    """A reservation pins its DRAM segment: a client that goes away without committing
    must not leave the tenant's DRAM tier pinned full."""
    d = Daemon(tmp_path).start()  # 64 MiB DRAM for two tenants: alice has 32 MiB
    try:
        opened = 0
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            with pytest.raises(NoSpaceError):
                while opened < 20:  # 3 MiB each in 4 MiB segments: every one pinned
                    c.reserve("s", _k(f"open{opened}"), [3 * MiB])
                    opened += 1
            assert opened >= 2
            with pytest.raises(NoSpaceError):
                c.put_in_place("s", _k("blocked"), [b"x" * (3 * MiB)])
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            for i in range(24):  # 72 MiB through the 32 MiB tier: it must evict freely
                c.put_in_place("s", _k(f"v{i}"), [_v(i, 3 * MiB)])
            assert c.get(_k("v23")) == _v(23, 3 * MiB)
            for i in range(opened):
                with pytest.raises(NotFoundError):
                    c.get(_k(f"open{i}"))
    finally:
        d.stop()


def test_at_most_so_many_reservations_per_client(tmp_path: Path) -> None:
    d = Daemon(tmp_path).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            offs = [c.reserve("s", _k(f"n{i}"), [64]) for i in range(256)]
            with pytest.raises(InvalidRequestError):
                c.reserve("s", _k("one-too-many"), [64])
            c.abort(_k("n0"), offs[0])
            c.reserve("s", _k("one-too-many"), [64])  # room again
    finally:
        d.stop()


def test_a_tenant_damaging_its_own_tier_harms_only_its_own_values(tmp_path: Path) -> None:
    """The mapping is writable: a client scribbling over a stored record's header gets
    CORRUPT for that value from DRAM; the other tenant and the daemon carry on."""
    d = Daemon(tmp_path, tenants={"alice": {}, "bob": {}}).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "bob", TOKENS["bob"]) as b:
            b.put("s", _k("b"), [b"bob" * 1000])
            off = a.reserve("s", _k("a"), [4096])
            _write(a, off, [b"a" * 4096])
            a.commit(_k("a"), off)
            a.dram[off - 4096:off] = b"\xff" * 4096  # the header's last block
            with pytest.raises(CorruptDataError), a.get_slot(_k("a")):
                pass
            assert a.map([_k("b")]) == [None]  # bob's key: not in alice's tier
            assert b.get(_k("b")) == b"bob" * 1000
            a.put("s", _k("a2"), [b"fine"])
            assert a.get(_k("a2")) == b"fine"
        assert d.proc is not None and d.proc.poll() is None  # the daemon is up
    finally:
        d.stop()


def test_the_write_behind_skips_a_record_its_tenant_damaged(tmp_path: Path) -> None:
    """ack = memory: a DRAM record damaged before its write-behind is counted and not
    written on; the write-behind goes on with the next value (it used to be a crash of
    the daemon's background task, once clients could write their tier)."""
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=64 * MiB),
                        segment_size=4 * MiB)
    store = TieredStore(TieredStore.create_drams({"t": 32 * MiB}, 4 * MiB, False), media,
                        ack="memory")
    dram = store.dram("t")
    rs = [store.reserve_dram("t", "s", _k(f"w{i}"), [4096]) for i in range(2)]
    for i, r in enumerate(rs):
        dram.payload_views(r)[0][:] = bytes([i + 1]) * 4096
        assert store.commit_dram(r) == Tier.DRAM
    hdr = dram.payload_offset(rs[0]) - 4096
    dram.dev.view(hdr, 4096)[:] = b"\xff" * 4096
    store.flush_all()
    assert store.counters.writebehind_corrupt == 1
    assert store.counters.writebehind_flushed == 1
    out = bytearray(8192)
    media.get_into("t", _k("w1"), out)
    assert bytes(out[:4096]) == b"\x02" * 4096
    with pytest.raises(NotFound):
        media.get_into("t", _k("w0"), out)
    media.close()


def test_reserve_is_admitted_and_charged_like_a_put(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {"quota": "2M"}}).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            c.put_in_place("s", _k("q1"), [b"1" * MiB])
            with pytest.raises(NoSpaceError, match="NO_SPACE"):  # over its quota
                c.put_in_place("s", _k("q2"), [b"2" * (2 * MiB)])
            req = Request(Op.RESERVE, 0, key=_k("q3"), session="s", data_len=10)
            assert c._call(req, "reserve").result > 0  # one frame, no table needed
    finally:
        d.stop()


def test_a_save_in_place_puts_the_chunks_a_full_dram_tier_has_no_room_for(
        tmp_path: Path) -> None:
    """KVSaver writes chunks into DRAM reservations; when the tier has no room left (here:
    another client of the tenant holds it all reserved, as values not yet written behind
    would), the chunks it refuses go through the arena as PUTs and the save completes."""
    torch = pytest.importorskip("torch")
    from kvtier.client.gpu import KVLayout, KVSaver

    layout = KVLayout(2, 2, 64, torch.float32, chunk_tokens=64)  # 128 KiB chunks
    chunks = [torch.randn(2, 2, 2, 64, 64, generator=torch.Generator().manual_seed(i))
              for i in range(12)]

    d = Daemon(tmp_path).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as a, \
                Client.connect(d.socket, "alice", TOKENS["alice"]) as hog:

            class Chunks:
                device = torch.device("cpu")

                def gather(self, c: int, out: torch.Tensor) -> None:
                    if c == 3:  # from here on the tier is full
                        for size in (3 * MiB, 128 << 10):
                            i = 0
                            with pytest.raises(NoSpaceError):
                                while i < 1000:
                                    hog.reserve("hog", _k(f"h{size}-{i}"), [size])
                                    i += 1
                    out.copy_(chunks[c])

            keys = [_k(f"c{i}") for i in range(len(chunks))]
            saver = KVSaver(a, layout, b"fp", reserve_ahead=1)
            rep = saver.save_chunks("s", keys, Chunks())
            saver.close()
            assert rep.in_place and rep.chunks == len(chunks)
            assert 1 <= rep.put_chunks <= len(chunks) - 3
            for k, want in zip(keys, chunks, strict=True):
                assert a.get(k) == want.numpy().tobytes()
    finally:
        d.stop()
