"""The key index: (tenant, key) -> where the record is, plus the metadata policies need.

Compact by construction: one packed 52-byte row per entry in a numpy structured array
(`ROW`), and an open-addressing hash table of int32 row numbers (linear probing, load
kept under 0.7).  No Python object exists per entry.  Single-key operations walk the
table in Python; batch lookups, bulk loads and rehashes are vectorised.

Keys are 128 or 256-bit digests; the index holds their first 128 bits (`k0`, `k1`),
which is unique for all practical purposes, and the record header on the media holds
the whole key, which readers compare before serving.
"""

from __future__ import annotations

import secrets

import numpy as np
import numpy.typing as npt

ROW = np.dtype([
    ("k0", "<u8"), ("k1", "<u8"),  # first 128 bits of the key
    ("loc", "<u8"),  # record offset on the device, in blocks
    ("tenant", "<u2"), ("gen", "<u2"),  # tenant number, key generation
    ("nframes", "<u2"), ("hits", "<u2"),  # frame count, access count (saturating)
    ("session", "<u4"),  # session number
    ("blocks", "<u4"),  # record length in blocks; 0 marks a free row
    ("expiry", "<u4"),  # unix seconds, 0 = never
    ("created", "<u4"), ("atime", "<u4"),  # unix seconds
], align=False)
assert ROW.itemsize == 52

EMPTY = -1
TOMB = -2
MASK64 = (1 << 64) - 1
_M1 = 0x9E3779B97F4A7C15
_M2 = 0xC2B2AE3D27D4EB4F
_M3 = 0x165667B19E3779F9
_MAX_LOAD = 0.7
_MIN_SLOTS_LOG2 = 10

IntArray = npt.NDArray[np.int64]
U64Array = npt.NDArray[np.uint64]


def split_key(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[0:8], "little"), int.from_bytes(key[8:16], "little")


def split_keys(keys: list[bytes] | tuple[bytes, ...]) -> tuple[U64Array, U64Array]:
    """First 128 bits of each key as two uint64 arrays (keys are 16 or 32 bytes)."""
    if not keys:
        z = np.zeros(0, np.uint64)
        return z, z.copy()
    if all(len(k) == 16 for k in keys):
        arr = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
    else:
        arr = np.frombuffer(b"".join(k[:16] for k in keys), dtype="<u8").reshape(-1, 2)
    return arr[:, 0].astype(np.uint64), arr[:, 1].astype(np.uint64)


class Index:
    def __init__(self, *, capacity: int = 1024, salt: int | None = None) -> None:
        self.salt = secrets.randbits(64) if salt is None else salt
        self.rows = np.zeros(max(capacity, 16), dtype=ROW)
        self.n_rows = 0  # rows ever used (high-water mark)
        self.count = 0  # live entries
        self._free = np.zeros(64, dtype=np.int64)
        self._n_free = 0
        bits = _MIN_SLOTS_LOG2
        while (1 << bits) * _MAX_LOAD < capacity:
            bits += 1
        self._alloc_slots(bits)
        self._refresh_views()

    # -- memory -----------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays (rows, slot table, free list)."""
        return int(self.rows.nbytes + self.slots.nbytes + self._free.nbytes)

    def _alloc_slots(self, bits: int) -> None:
        self.bits = bits
        self.shift = 64 - bits
        self.slot_mask = (1 << bits) - 1
        self.slots = np.full(1 << bits, EMPTY, dtype=np.int32)
        self._used_slots = 0  # live + tombstones

    def _refresh_views(self) -> None:
        r = self.rows
        self.k0, self.k1, self.tenant = r["k0"], r["k1"], r["tenant"]
        self.loc, self.blocks, self.session = r["loc"], r["blocks"], r["session"]
        self.expiry, self.atime, self.hits = r["expiry"], r["atime"], r["hits"]
        self.created, self.gen, self.nframes = r["created"], r["gen"], r["nframes"]

    # -- hashing ----------------------------------------------------------------------

    def _hash1(self, tenant: int, k0: int, k1: int) -> int:
        h = ((k0 ^ self.salt) * _M1) & MASK64
        h ^= ((k1 + tenant) * _M2) & MASK64
        h ^= h >> 29
        return ((h * _M3) & MASK64) >> self.shift

    def _hash_many(self, tenant: npt.NDArray[np.uint64] | int, k0: U64Array,
                   k1: U64Array) -> IntArray:
        with np.errstate(over="ignore"):
            h = (k0 ^ np.uint64(self.salt)) * np.uint64(_M1)
            h ^= (k1 + np.asarray(tenant, dtype=np.uint64)) * np.uint64(_M2)
            h ^= h >> np.uint64(29)
            h = (h * np.uint64(_M3)) >> np.uint64(self.shift)
        return h.astype(np.int64)

    # -- single-key operations -----------------------------------------------------------

    def find(self, tenant: int, k0: int, k1: int) -> int:
        """Row number of the entry, or -1."""
        s = self._hash1(tenant, k0, k1)
        slots, mask = self.slots, self.slot_mask
        while True:
            r = int(slots[s])
            if r == EMPTY:
                return -1
            if r >= 0 and int(self.k0[r]) == k0 and int(self.k1[r]) == k1 and \
                    int(self.tenant[r]) == tenant:
                return r
            s = (s + 1) & mask

    def _slot_of(self, row: int) -> int:
        t, k0, k1 = int(self.tenant[row]), int(self.k0[row]), int(self.k1[row])
        s = self._hash1(t, k0, k1)
        while True:
            r = int(self.slots[s])
            if r == row:
                return s
            if r == EMPTY:
                raise KeyError(f"index row {row} is not in the slot table")
            s = (s + 1) & self.slot_mask

    def _new_row(self) -> int:
        if self._n_free:
            self._n_free -= 1
            return int(self._free[self._n_free])
        if self.n_rows == len(self.rows):
            grow = max(len(self.rows) // 8, 4096)
            self.rows = np.resize(self.rows, len(self.rows) + grow)
            self.rows[self.n_rows:] = np.zeros(1, ROW)
            self._refresh_views()
        self.n_rows += 1
        return self.n_rows - 1

    def insert(self, tenant: int, k0: int, k1: int) -> tuple[int, bool]:
        """Row for (tenant, key), creating it if absent.  Returns (row, created).

        The caller fills the row's fields (a new row has blocks == 0 until it does).
        """
        r = self.find(tenant, k0, k1)
        if r >= 0:
            return r, False
        if (self._used_slots + 1) > _MAX_LOAD * len(self.slots):
            self._rehash(self._bits_for(self.count + 1))
        row = self._new_row()
        self.k0[row], self.k1[row], self.tenant[row] = k0, k1, tenant
        s = self._hash1(tenant, k0, k1)
        while True:
            cur = int(self.slots[s])
            if cur < 0:
                if cur == EMPTY:
                    self._used_slots += 1
                self.slots[s] = row
                break
            s = (s + 1) & self.slot_mask
        self.count += 1
        return row, True

    def remove(self, row: int) -> None:
        self.slots[self._slot_of(row)] = TOMB
        self._release_row(row)

    def _release_row(self, row: int) -> None:
        self.rows[row] = np.zeros(1, ROW)[0]
        if self._n_free == len(self._free):
            self._free = np.resize(self._free, len(self._free) * 2)
        self._free[self._n_free] = row
        self._n_free += 1
        self.count -= 1

    def remove_many(self, rows: IntArray) -> None:
        """Remove many rows; rebuilds the slot table when that is cheaper."""
        if len(rows) == 0:
            return
        if len(rows) * 8 < self.count:
            for r in rows.tolist():
                self.remove(int(r))
            return
        rows = np.unique(rows)
        self.blocks[rows] = 0
        self.rows[rows] = np.zeros(1, ROW)[0]
        need = self._n_free + len(rows)
        if need > len(self._free):
            self._free = np.resize(self._free, max(need, len(self._free) * 2))
        self._free[self._n_free:need] = rows
        self._n_free = need
        self.count -= len(rows)
        self._rehash(self._bits_for(self.count))

    # -- vectorised operations ---------------------------------------------------------

    def _bits_for(self, n: int) -> int:
        bits = _MIN_SLOTS_LOG2
        while (1 << bits) * _MAX_LOAD < n:
            bits += 1
        return bits

    def live_rows(self) -> IntArray:
        return np.flatnonzero(self.blocks[:self.n_rows]).astype(np.int64)

    def _rehash(self, bits: int) -> None:
        self._alloc_slots(max(bits, _MIN_SLOTS_LOG2))
        self._place_many(self.live_rows())

    def _place_many(self, rows: IntArray) -> None:
        if len(rows) == 0:
            return
        pos = self._hash_many(self.tenant[rows], self.k0[rows], self.k1[rows])
        pending = rows
        mask = np.int64(self.slot_mask)
        while len(pending):
            free = self.slots[pos] < 0
            cand_pos, cand_rows = pos[free], pending[free]
            uniq, first = np.unique(cand_pos, return_index=True)
            self._used_slots += int(np.count_nonzero(self.slots[uniq] == EMPTY))
            self.slots[uniq] = cand_rows[first].astype(np.int32)
            placed = np.zeros(len(pending), dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            pending = pending[~placed]
            pos = (pos[~placed] + 1) & mask

    def bulk_load(self, rows: npt.NDArray[np.void]) -> None:
        """Append entries known to be absent and distinct (checkpoint load, benchmarks)."""
        n = len(rows)
        if n == 0:
            return
        if self.n_rows + n > len(self.rows):
            self.rows = np.resize(self.rows, self.n_rows + n)
            self._refresh_views()
        ids = np.arange(self.n_rows, self.n_rows + n, dtype=np.int64)
        self.rows[self.n_rows:self.n_rows + n] = rows
        self.n_rows += n
        self.count += n
        bits = self._bits_for(self.count)
        if bits > self.bits or (self._used_slots + n) > _MAX_LOAD * len(self.slots):
            self._rehash(max(bits, self.bits))
        else:
            self._place_many(ids)

    def lookup_many(self, tenant: int, k0: U64Array, k1: U64Array) -> IntArray:
        """Row number for each key (-1 where absent)."""
        n = len(k0)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return out
        pos = self._hash_many(tenant, k0, k1)
        active = np.arange(n)
        mask = np.int64(self.slot_mask)
        t = np.uint16(tenant)
        while len(active):
            r = self.slots[pos].astype(np.int64)
            rr = np.where(r >= 0, r, 0)
            hit = (r >= 0) & (self.k0[rr] == k0[active]) & (self.k1[rr] == k1[active]) & \
                (self.tenant[rr] == t)
            out[active[hit]] = r[hit]
            go_on = ~hit & (r != EMPTY)
            active = active[go_on]
            pos = (pos[go_on] + 1) & mask
        return out

    def live_mask(self, rows: IntArray, now_s: int) -> npt.NDArray[np.bool_]:
        """Which of `rows` (-1 allowed) hold an entry that has not expired at `now_s`."""
        ok = rows >= 0
        rr = np.where(ok, rows, 0)
        exp = self.expiry[rr]
        live: npt.NDArray[np.bool_] = ok & ((exp == 0) | (exp > now_s))
        return live

    def select(self, *, tenant: int | None = None, session: int | None = None,
               loc_range: tuple[int, int] | None = None,
               expired_at: int | None = None) -> IntArray:
        """Rows of live entries matching every given condition."""
        n = self.n_rows
        m = self.blocks[:n] > 0
        if tenant is not None:
            m &= self.tenant[:n] == tenant
        if session is not None:
            m &= self.session[:n] == session
        if loc_range is not None:
            lo, hi = loc_range
            loc = self.loc[:n]
            m &= (loc >= lo) & (loc < hi)
        if expired_at is not None:
            e = self.expiry[:n]
            m &= (e > 0) & (e <= expired_at)
        return np.flatnonzero(m).astype(np.int64)
