"""The one request path, with no daemon, sockets or rings: `RequestHandler` over a real
store and an arena of the test's own (h11 style), and the ring and entry layouts checked
against the tables of docs/PROTOCOL.md (parsed from the document, not copied)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import trio

from kvtier.client.protocol import (
    ALL_FRAMES,
    CQE_SIZE,
    MAP_ENTRY,
    NOT_MAPPED,
    PROTOCOL_VERSION,
    RING_HEADER,
    RING_MAGIC,
    SQE_SIZE,
    Completion,
    Flag,
    Op,
    Request,
    Status,
    Tier,
    init_ring,
    ring_bytes,
)
from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.connection import HANDLERS, INLINE, RequestHandler
from kvtier.daemon.iosched import IoScheduler
from kvtier.daemon.pool import Pool
from kvtier.daemon.prefetch import PrefetchScheduler
from kvtier.daemon.qos import BURST_S, QoS
from kvtier.daemon.reuse import ReuseStats
from kvtier.daemon.tiers import TieredStore

MiB = 1 << 20
DOC = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()


def k(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()[:16]


def _table(heading: str) -> list[list[str]]:
    """The rows of the first table after `heading` in PROTOCOL.md."""
    at = DOC.index(heading)
    rows = []
    for line in DOC[at:].splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif rows:
            break
    return rows if heading.startswith("|") else rows[1:]  # without the header row


# -- layouts against the document ------------------------------------------------------------------


def test_sqe_fields_sit_where_the_protocol_says() -> None:
    req = Request(op=Op.GET, tag=0x1122334455667788, flags=Flag.KEYLIST, key=bytes(range(16)),
                  session="sess", count=0x01020304, data_off=0x0A0B0C0D0E0F1011,
                  data_len=0x2122232425262728, aux_off=0x3132333435363738, frame_a=0x41424344,
                  frame_b=0x51525354, ttl=0x61626364)
    raw = req.encode()
    assert len(raw) == SQE_SIZE == 128
    want: dict[str, int | bytes] = {
        "op": req.op, "flags": req.flags, "key_len": 16, "session_len": 4, "count": req.count,
        "tag": req.tag, "data_off": req.data_off, "data_len": req.data_len,
        "aux_off": req.aux_off, "frame_a": req.frame_a, "frame_b": req.frame_b,
        "ttl_s": req.ttl, "reserved": 0, "key": req.key.ljust(32, b"\0"),
        "session": b"sess".ljust(40, b"\0")}
    rows = _table("## 3. Submission entry")
    assert sum(int(r[1]) for r in rows) == 128
    seen = set()
    for off_s, size_s, field in rows:
        off, size = int(off_s), int(size_s)
        name = re.match(r"`?([a-z_]+)`?", field.replace("session name", "session"))
        assert name is not None, field
        value = want[name.group(1)]
        got = raw[off:off + size]
        if isinstance(value, bytes):
            assert got == value, field
        else:
            assert int.from_bytes(got, "little") == value, field
        seen.add(name.group(1))
    assert seen == set(want)


def test_cqe_fields_and_statuses_match_the_protocol() -> None:
    c = Completion(0x0102030405060708, Status.DEADLINE, 2, 0x1112131415161718,
                   0x2122232425262728)
    raw = c.encode()
    assert len(raw) == CQE_SIZE == 32
    want = {"tag": c.tag, "status": c.status & 0xFFFFFFFF, "flags": 2, "result": c.result,
            "aux": c.aux}
    for off_s, size_s, field in _table("## 4. Completion entry"):
        name = re.match(r"`([a-z]+)`", field)
        assert name is not None
        off, size = int(off_s), int(size_s)
        assert int.from_bytes(raw[off:off + size], "little") == want[name.group(1)], field
    statuses = {int(r[0].replace("−", "-")): r[1]
                for r in _table("| status | name | meaning |")}
    assert statuses == {s.value: s.name for s in Status}


def test_ops_documented_are_the_ops_handled() -> None:
    rows = _table("| op | name | request |")
    assert {int(r[0]): r[1] for r in rows} == {o.value: o.name for o in Op}
    assert set(HANDLERS) == set(Op)  # every op has a handler: none answers BAD_OP
    assert set(INLINE) <= set(HANDLERS)


def test_ring_control_page_matches_the_protocol() -> None:
    entries = 8
    buf = bytearray(ring_bytes(entries, SQE_SIZE))
    init_ring(memoryview(buf), entries, SQE_SIZE)
    want = {"magic": RING_MAGIC, "version": PROTOCOL_VERSION, "entry size": SQE_SIZE,
            "entries": entries, "reserved": 0, "head": 0, "tail": 0}
    for off_s, size_s, field in _table("## 2. Rings"):
        off, size = int(off_s), int(size_s.split()[0]) if size_s.isdigit() else 0
        name = next((n for n in want if field.strip("`").startswith(n) or
                     field.startswith(f"`{n}`")), None)
        if name is None:
            assert off == RING_HEADER  # the entries
            continue
        assert int.from_bytes(buf[off:off + size], "little") == want[name], field
    assert len(buf) == RING_HEADER + entries * SQE_SIZE


# -- the handler, driven directly ------------------------------------------------------------------


class Harness:
    def __init__(self, tmp: Path, *, iops: int | None = None,
                 bandwidth: int | None = None) -> None:
        media = Pool.format(FileDevice(str(tmp / "p.img"), create_size=64 * MiB),
                            segment_size=4 * MiB)
        self.store = TieredStore(TieredStore.create_drams({"t": 32 * MiB, "u": 32 * MiB},
                                                          4 * MiB, False), media, ack="memory")
        self.io = IoScheduler(2)
        self.qos = QoS(media.tenant_bytes)
        self.limits = {"quota": None, "bandwidth": bandwidth, "iops": iops}
        self.arena = memoryview(bytearray(4 * MiB))
        self.records: list[tuple[str, str, str, int]] = []
        self.audits: list[tuple[str, dict[str, Any]]] = []
        self.prefetch = PrefetchScheduler(self.store, self.io, workers=1)

    def handler(self, tenant: str = "t") -> RequestHandler:
        return RequestHandler(
            client_id=1, tenant=tenant, uid=0, pid=0, store=self.store, arena=self.arena,
            io=self.io, record=lambda op, st, tier, n, s: self.records.append((op, st, tier, n)),
            stats=lambda: {"tenant": tenant}, audit=lambda ev, **f: self.audits.append((ev, f)),
            prefetch=self.prefetch, qos=self.qos, reuse=ReuseStats())


def _run(h: Harness, body: Any) -> None:
    async def main() -> None:
        h.qos.set_limits("t", **h.limits)  # token buckets live on the trio clock
        async with trio.open_nursery() as n:
            await n.start(h.prefetch.run)
            await body()
            n.cancel_scope.cancel()

    trio.run(main)


def test_every_op_through_the_one_path(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    a = h.arena

    async def body() -> None:
        rh = h.handler()
        assert (await rh.execute(Request(Op.NOP, 1))).status == Status.OK
        a[0:300] = bytes(range(100)) * 3
        np.frombuffer(a[1024:1048], dtype="<u8")[:] = [100, 100, 100]
        c = await rh.execute(Request(Op.PUT, 2, key=k(1), session="s", count=3, data_off=0,
                                     data_len=300, aux_off=1024))
        assert (c.status, c.result) == (Status.OK, 300)
        c = await rh.execute(Request(Op.GET, 3, key=k(1), data_off=4096, data_len=300,
                                     count=3, aux_off=8192, frame_a=1, frame_b=3))
        assert (c.status, c.flags, c.result, c.aux) == (Status.OK, Tier.DRAM, 200, 2)
        assert bytes(a[4096:4296]) == bytes(range(100)) * 2
        a[16384:16400], a[16400:16416] = k(1), k(2)
        c = await rh.execute(Request(Op.LOOKUP, 4, flags=Flag.KEYLIST, key=bytes(16), count=2,
                                     data_off=16384, data_len=32, aux_off=16500))
        assert (c.status, c.result) == (Status.OK, 1)
        assert bytes(a[16500:16502]) == bytes([Tier.DRAM, Tier.NONE])
        c = await rh.execute(Request(Op.MAP, 5, flags=Flag.KEYLIST, key=bytes(16), count=2,
                                     data_off=16384, data_len=32, aux_off=20000))
        assert (c.status, c.result) == (Status.OK, 1)
        tab = np.frombuffer(a[20000:20000 + 2 * MAP_ENTRY.size], dtype="<u8").reshape(2, 2)
        assert tab[1, 0] == NOT_MAPPED and tab[0, 1] == 300
        np.frombuffer(a[24000:24008], dtype="<u8")[0] = tab[0, 0]
        c = await rh.execute(Request(Op.UNMAP, 6, count=1, data_off=24000))
        assert (c.status, c.result) == (Status.OK, 1)
        c = await rh.execute(Request(Op.UNMAP, 7, count=1, data_off=24000))  # not held now
        assert c.status == Status.INVALID
        c = await rh.execute(Request(Op.PREFETCH, 8, flags=Flag.KEYLIST, key=bytes(16),
                                     count=1, data_off=16384, data_len=16, ttl=1000))
        assert (c.status, c.result, c.aux) == (Status.OK, 1, 1)
        c = await rh.execute(Request(Op.STATS, 9, data_off=32768, data_len=4096))
        assert c.status == Status.OK
        assert json.loads(bytes(a[32768:32768 + c.result])) == {"tenant": "t"}
        c = await rh.execute(Request(Op.DELETE, 10, key=k(1)))
        assert (c.status, c.result) == (Status.OK, 1)
        c = await rh.execute(Request(Op.GET, 11, key=k(1), data_off=4096, data_len=300))
        assert c.status == Status.NOT_FOUND
        c = await rh.execute(Request(Op.PUT, 12, key=k(3), session="s2", data_off=0,
                                     data_len=10))
        c = await rh.execute(Request(Op.PURGE_SESSION, 13, session="s2"))
        assert (c.status, c.result) == (Status.OK, 1)
        assert (await rh.execute(Request(99, 14))).status == Status.BAD_OP
        # validation: a range past the arena, a bad key length
        c = await rh.execute(Request(Op.GET, 15, key=k(1), data_off=4 * MiB - 10,
                                     data_len=300))
        assert c.status == Status.INVALID
        c = await rh.execute(Request(Op.GET, 16, key=b"short", data_off=0, data_len=10))
        assert c.status == Status.INVALID
        assert rh.ops == 16 and rh.errors == 5

    _run(h, body)
    assert [r[0] for r in h.records][:3] == ["nop", "put", "get"]
    assert ("bad", "bad_op", "none", 0) in h.records


def test_inline_and_task_paths_pass_the_same_iops_admission(tmp_path: Path) -> None:
    """With `iops = 50`, 50 DRAM-hit GETs (served inline), 50 MAPs (inline) and 50 LOOKUPs
    (no charge): the charged ones take at least (101 - burst) / 50 s; the LOOKUPs a small
    part of that."""
    h = Harness(tmp_path, iops=50)
    took: dict[str, float] = {}

    async def body() -> None:
        rh = h.handler()
        h.arena[0:64] = b"x" * 64
        await rh.execute(Request(Op.PUT, 1, key=k(1), session="s", data_off=0, data_len=64))
        h.arena[1024:1040] = k(1)
        t0 = trio.current_time()
        for i in range(50):
            c = await rh.execute(Request(Op.GET, i, key=k(1), data_off=4096, data_len=64))
            assert (c.status, c.flags) == (Status.OK, Tier.DRAM)
        for i in range(50):
            c = await rh.execute(Request(Op.MAP, i, flags=Flag.KEYLIST, key=bytes(16),
                                         count=1, data_off=1024, data_len=16, aux_off=2048))
            assert c.status == Status.OK
            off = int(np.frombuffer(h.arena[2048:2056], dtype="<u8")[0])
            np.frombuffer(h.arena[3000:3008], dtype="<u8")[0] = off
            await rh.execute(Request(Op.UNMAP, i, count=1, data_off=3000))
        took["charged"] = trio.current_time() - t0
        t0 = trio.current_time()
        for i in range(50):
            await rh.execute(Request(Op.LOOKUP, i, flags=Flag.KEYLIST, key=bytes(16), count=1,
                                     data_off=1024, data_len=16, aux_off=2048))
        took["free"] = trio.current_time() - t0

    _run(h, body)
    # 1 PUT + 100 charged at 50/s, less the bucket's burst
    assert took["charged"] >= 0.95 * (101 - 50 * BURST_S) / 50, took
    assert took["free"] < took["charged"] / 5, took


def test_reserve_and_a_commit_with_crcs_complete_on_the_event_loop(tmp_path: Path) -> None:
    """ack = memory: a RESERVE that fits the open DRAM segment and a COMMIT carrying its
    CRCs are metadata only and complete inline; a COMMIT without CRCs (the daemon reads
    the frames), a reservation while another thread holds the tier's lock, and one that
    needs a new segment run as tasks -- all stored alike."""
    h = Harness(tmp_path)
    dram = h.store.dram("t")

    def reserve(rh: RequestHandler, tag: int, size: int) -> Request:
        np.frombuffer(h.arena[1024:1040], dtype="<u8")[:] = [size // 2, size - size // 2]
        return Request(Op.RESERVE, tag, key=k(tag), session="s", count=2, data_len=size,
                       aux_off=1024)

    async def body() -> None:
        rh = h.handler()
        offs = []
        for tag in (1, 2):  # the first opens the tier's first segment: a task
            c = await rh.execute(reserve(rh, tag, 8192))
            assert c.status == Status.OK
            offs.append(c.result)
        assert rh.inline(reserve(rh, 3, 8192)) is not None  # fits: inline
        held, done = threading.Event(), threading.Event()

        def hold() -> None:  # another thread holds the tier's lock
            with dram._ctx.lock:
                held.set()
                done.wait()

        th = threading.Thread(target=hold)
        th.start()
        held.wait()
        try:
            assert rh.inline(reserve(rh, 4, 8192)) is None
        finally:
            done.set()
            th.join()
        # one that needs another segment opens a free one inline, until taking one would
        # mean cleaning or evicting (free segments down to what puts leave): a task then
        big = [rh.inline(reserve(rh, 40 + i, 4 * MiB - 16384)) for i in range(8)]
        opened = [c for c in big if c is not None]
        assert opened and len(opened) < 8 and big[len(opened)] is None
        assert all(c.status == Status.OK for c in opened)
        counters = h.store.counters
        assert counters.inline_reserves >= 1 + len(opened)
        assert counters.inline_reserve_fallbacks >= 2
        for tag, off in zip((1, 2), offs, strict=True):
            frames = [bytes([tag]) * 4096, bytes([tag + 100]) * 4096]
            dram.dev.view(off, 8192)[:] = b"".join(frames)
            if tag == 1:  # CRCs carried: inline
                np.frombuffer(h.arena[2048:2056], dtype="<u4")[:] = [crc32c.crc32c(f)
                                                                    for f in frames]
                req = Request(Op.COMMIT, 10, flags=Flag.CRCS, key=k(1), data_off=off,
                              count=2, aux_off=2048)
                c = rh.inline(req)
                assert c is not None and (c.status, c.flags, c.result) == \
                    (Status.OK, Tier.DRAM, 8192)
            else:  # the daemon reads the frames: a task
                req = Request(Op.COMMIT, 11, key=k(2), data_off=off)
                assert rh.inline(req) is None
                assert (await rh.execute(req)).status == Status.OK
            c = await rh.execute(Request(Op.GET, 20 + tag, key=k(tag), data_off=4096,
                                         data_len=8192))
            assert c.status == Status.OK and bytes(h.arena[4096:8192]) == bytes([tag]) * 4096
        # both are written behind to the media pool, where their CRCs are checked
        await trio.to_thread.run_sync(h.store.flush_all)
        out = bytearray(8192)
        for tag in (1, 2):
            h.store.media.get_into("t", k(tag), out)
            assert bytes(out[4096:]) == bytes([tag + 100]) * 4096

    _run(h, body)


def test_a_dram_miss_is_counted_once(tmp_path: Path) -> None:
    """A GET the inline path found absent from DRAM goes to the media path, which does not
    look in DRAM again (item 13): one miss, one media hit."""
    h = Harness(tmp_path)

    async def body() -> None:
        rh = h.handler()
        h.store.media.put("t", "s", k(5), [b"m" * 100])  # on media only
        before = dict(h.store.stats()["tiers"])
        c = await rh.execute(Request(Op.GET, 1, key=k(5), data_off=0, data_len=4096))
        assert (c.status, c.flags, c.result) == (Status.OK, Tier.POOL, 100)
        after = h.store.stats()["tiers"]
        assert after["pool_hits"] - before["pool_hits"] == 1
        assert after["dram_misses"] - before.get("dram_misses", 0) <= 1 if "dram_misses" in \
            after else True

    _run(h, body)


def test_tenants_do_not_see_each_others_keys_through_the_handler(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def body() -> None:
        t, u = h.handler("t"), h.handler("u")
        h.arena[0:8] = b"secret!!"
        await t.execute(Request(Op.PUT, 1, key=k(9), session="s", data_off=0, data_len=8))
        c = await u.execute(Request(Op.GET, 2, key=k(9), data_off=100, data_len=8))
        assert c.status == Status.NOT_FOUND
        c = await u.execute(Request(Op.DELETE, 3, key=k(9)))
        assert (c.status, c.result) == (Status.OK, 0)
        c = await t.execute(Request(Op.GET, 4, key=k(9), data_off=100, data_len=8))
        assert c.status == Status.OK and bytes(h.arena[100:108]) == b"secret!!"

    _run(h, body)


def test_sqe_offsets_are_what_struct_packs() -> None:
    """A tamper check of the encoder against a hand-packed entry."""
    raw = Request(Op.PUT, 7, key=k(1), session="ab", data_len=5).encode()
    assert struct.unpack_from("<B", raw, 0)[0] == Op.PUT
    assert struct.unpack_from("<Q", raw, 8)[0] == 7
    assert struct.unpack_from("<I", raw, 44)[0] == ALL_FRAMES


def test_a_put_to_two_tiers_computes_its_crcs_once(tmp_path: Path,
                                                   monkeypatch: Any) -> None:
    """ack = media with a DRAM tier: one CRC pass over the frames serves both records
    (it was one per tier), and both records verify on read."""
    from kvtier.daemon import record

    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=64 * MiB),
                        segment_size=4 * MiB)
    store = TieredStore(TieredStore.create_drams({"t": 32 * MiB}, 4 * MiB, False), media,
                        ack="media")
    calls = []
    real = record.frame_crcs
    monkeypatch.setattr(record, "frame_crcs", lambda v: calls.append(len(v)) or real(v))
    frames = [np.full(100_000, i, np.uint8) for i in range(3)]
    assert store.put("t", "s", k(1), frames) == Tier.POOL
    assert calls == [3]
    out = memoryview(bytearray(300_000))
    assert store.get_dram_into("t", k(1), out).nbytes == 300_000  # DRAM record verifies
    assert bytes(out) == b"".join(f.tobytes() for f in frames)
    out2 = memoryview(bytearray(300_000))
    assert media.get_into("t", k(1), out2).nbytes == 300_000  # so does the media one
    assert bytes(out2) == bytes(out)
