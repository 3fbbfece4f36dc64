"""RESERVE / COMMIT through a real daemon: values written by the client straight into its
tenant's DRAM tier, stored as PUTs of those bytes would be -- and nothing a client does
with its mapping reaches beyond its own tenant's values or stops the daemon."""

from __future__ import annotations

import time
from pathlib import Path

import crc32c
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
from kvtier.client.protocol import KEYS_SESSION, Flag, Op, Request, Tier
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


def _commit_with_crcs(c: Client, key: bytes, off: int, crcs: list[int]) -> Tier:
    slot = c.allocator.alloc(4 * len(crcs))
    try:
        np.frombuffer(slot.view[:4 * len(crcs)], dtype="<u4")[:] = crcs
        return Tier(c._call(c.commit_request(key, off, crcs=slot, frames=len(crcs)),
                            "commit").flags)
    finally:
        c.allocator.free(slot)


def test_a_commit_may_carry_the_frames_crcs(tmp_path: Path) -> None:
    """COMMIT with CRCS stores the writer's CRCs and does not read the frames for them:
    right ones read back from the media pool; wrong ones (a client's own mistake) make
    that value CORRUPT where its CRCs are checked, and nothing else."""
    d = Daemon(tmp_path).start()  # ack = media
    good, bad = [_v(4, 8192), _v(5, 4096)], [_v(6, 4096), _v(7, 4096)]
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            for name, frames, crcs in (
                    ("good", good, [crc32c.crc32c(f) for f in good]),
                    ("bad", bad, [crc32c.crc32c(bad[0]), crc32c.crc32c(bad[0])])):
                off = c.reserve("s", _k(name), [len(f) for f in frames])
                _write(c, off, frames)
                assert _commit_with_crcs(c, _k(name), off, crcs) == Tier.POOL
            off = c.reserve("s", _k("n"), [4096, 4096])
            _write(c, off, [b"n" * 8192])
            with pytest.raises(InvalidRequestError, match="INVALID"):  # 1 CRC for 2 frames
                _commit_with_crcs(c, _k("n"), off, [0])
            req = c.commit_request(_k("n"), off)
            req.flags, req.count, req.aux_off = Flag.CRCS, 2, c.arena.nbytes - 4
            with pytest.raises(InvalidRequestError, match="INVALID"):  # table past the arena
                c._call(req, "commit")
            c.commit(_k("n"), off)  # the reservation is still there, and commits plainly
        d.stop()
        d.start()  # DRAM is gone: the values come from the media pool, CRCs checked
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            assert c.get(_k("good")) == b"".join(good)
            with pytest.raises(CorruptDataError):
                c.get(_k("bad"))
            assert c.get(_k("n")) == b"n" * 8192
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


def test_a_save_in_place_with_device_crcs_reads_back_from_media(tmp_path: Path) -> None:
    """KVSaver with frame_crcs: the frames' CRCs computed by kvtier.client.crc_gpu's
    kernel (interpreted on CPU tensors here) and carried by each COMMIT; what the media
    pool holds then verifies on every read."""
    torch = pytest.importorskip("torch")
    from kvtier.client.gpu import CacheSource, KVLayout, KVSaver

    layout = KVLayout(2, 2, 16, torch.float32, chunk_tokens=16)  # 4 KiB frames
    g = torch.Generator().manual_seed(9)
    cache = [(torch.randn(1, 2, 3 * 16, 16, generator=g),
              torch.randn(1, 2, 3 * 16, 16, generator=g)) for _ in range(2)]
    keys = [_k(f"d{i}") for i in range(3)]
    d = Daemon(tmp_path).start()  # ack = media
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            # in groups of 2 chunks (one kernel each), the last group short
            saver = KVSaver(c, layout, b"fp", frame_crcs=True, slots=4)
            assert saver.group == 2
            rep = saver.save_chunks("s", keys, CacheSource(cache, layout, 0))
            saver.close()
            assert rep.in_place and rep.frame_crcs and rep.chunks == 3
        d.stop()
        d.start()
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            out = torch.empty(2, 2, 2, 16, 16)
            for i, k in enumerate(keys):
                for layer, (kk, vv) in enumerate(cache):
                    out[layer, 0], out[layer, 1] = (x[0, :, 16 * i:16 * (i + 1)]
                                                    for x in (kk, vv))
                assert c.get(k) == out.numpy().tobytes()  # CRC-checked on the media read
    finally:
        d.stop()


def test_commits_on_the_event_loop_leave_their_upkeep_to_the_write_behind(
        tmp_path: Path) -> None:
    """A COMMIT that completes without waiting (`try_commit_dram`) skips the cleaning ahead
    a put does after it; the tier is marked and the write-behind worker's `flush_some`
    cleans ahead for it, so a DRAM tier with dead space still gets segments cleaned."""
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=64 * MiB),
                        segment_size=4 * MiB)
    store = TieredStore(TieredStore.create_drams({"t": 32 * MiB}, 4 * MiB, False), media,
                        ack="memory")
    dram = store.dram("t")
    frame = b"z" * (512 << 10)
    crc = crc32c.crc32c(frame)
    marked = 0
    for i in range(120):
        key = i.to_bytes(16, "little")
        r = store.try_reserve_dram("t", "s", key, [len(frame)]) or \
            store.reserve_dram("t", "s", key, [len(frame)])
        dram.payload_views(r)[0][:] = frame
        assert store.try_commit_dram(r, [crc]) == Tier.DRAM  # never waited for here
        if i % 4:
            store.delete("t", key)  # dead space for the cleaner
        if store._upkeep:
            marked += 1
            store.flush_some()
    assert marked and not store._upkeep
    assert dram._ctx.counters.cleaned_ahead >= 1
    store.flush_all()
    out = bytearray(len(frame))
    media.get_into("t", (116).to_bytes(16, "little"), out)  # written behind, CRC checked
    assert bytes(out) == frame
    media.close()
