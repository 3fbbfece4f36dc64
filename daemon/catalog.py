"""The catalog: what a pool holds, by name -- tenant and session names <-> numbers, and the
index rows that say where each live value's record is.

The index (`index.py`) stores tenants and sessions as numbers; the name tables here map
them back and forth, in the order the checkpoint saves them.  Every change to the rows
goes through here, because each one moves live blocks between segments in the segment
table (which the cleaner's and eviction's choices read): inserting, replacing, removing
and repointing rows keep `SegmentTable.live` equal to what the index says.  Every method
expects the pool's metadata lock held by the caller.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from kvtier.daemon import checkpoint as ckpt
from kvtier.daemon import record
from kvtier.daemon.errors import StoreError
from kvtier.daemon.index import Index, split_key
from kvtier.daemon.pool_context import PoolContext
from kvtier.daemon.pool_types import EntryInfo
from kvtier.daemon.segtable import NEVER, SegmentTable


class Catalog:
    """Names and index rows of one pool (see the module docstring)."""

    def __init__(self, ctx: PoolContext, table: SegmentTable) -> None:
        self.ctx = ctx
        self.table = table
        self.index = Index()
        self.tenants: list[str] = []
        self._tenant_ids: dict[str, int] = {}
        self.sessions: list[str] = []
        self._session_ids: dict[str, int] = {}

    def load(self, state: ckpt.CheckpointState) -> None:
        """Take over a checkpoint's rows and name tables (recovery)."""
        self.index = Index(capacity=len(state.rows) + 1024, salt=state.salt)
        self.index.bulk_load(state.rows)
        self.tenants = list(state.tenants)
        self._tenant_ids = {t: i for i, t in enumerate(self.tenants)}
        self.sessions = list(state.sessions)
        self._session_ids = {s: i for i, s in enumerate(self.sessions)}

    def snapshot(self) -> tuple[npt.NDArray[np.void], list[str]]:
        """The live rows and the session names they use, renumbered densely (for a
        checkpoint: session names no live entry uses are dropped)."""
        ix = self.index
        rows = ix.rows[ix.live_rows()].copy()
        used, inverse = np.unique(rows["session"], return_inverse=True)
        sessions = [self.sessions[int(s)] for s in used]
        rows["session"] = inverse.astype(np.uint32)
        return rows, sessions

    # -- names ----------------------------------------------------------------------------

    def tenant_id(self, name: str, create: bool) -> int:
        t = self._tenant_ids.get(name)
        if t is None:
            if not create:
                return -1
            if len(self.tenants) >= 0xFFFF:
                raise StoreError("too many tenants in one pool (65535)")
            t = len(self.tenants)
            self.tenants.append(name)
            self._tenant_ids[name] = t
        return t

    def session_id(self, name: str, create: bool) -> int:
        s = self._session_ids.get(name)
        if s is None:
            if not create:
                return -1
            s = len(self.sessions)
            self.sessions.append(name)
            self._session_ids[name] = s
        return s

    # -- rows -----------------------------------------------------------------------------

    def live_row(self, tenant: str, key: bytes) -> int:
        """The row of (tenant, key) if it is stored and not expired, else -1."""
        t = self.tenant_id(tenant, False)
        if t < 0 or len(key) not in record.KEY_LENGTHS:
            return -1
        row = self.index.find(t, *split_key(key))
        if row < 0:
            return -1
        exp = int(self.index.expiry[row])
        if exp and exp <= self.ctx.clock():
            return -1
        return row

    def put_row(self, tenant: str, session: str, key: bytes, seg: int, at: int,
                nblocks: int, nframes: int, keygen: int, exp: int, now: int) -> bool:
        """Point (tenant, key) at the record at block `at` of `seg`; True if it replaced
        an older value."""
        ix = self.index
        table = self.table
        t = self.tenant_id(tenant, True)
        s = self.session_id(session, True)
        k0, k1 = split_key(key)
        row, created = ix.insert(t, k0, k1)
        if not created:
            table.live[int(table.seg_of_block(int(ix.loc[row])))] -= int(ix.blocks[row])
        table.live[seg] += nblocks
        ix.loc[row] = (table.offset(seg) + at * table.B) // table.B
        ix.blocks[row] = nblocks
        ix.session[row] = s
        ix.nframes[row] = nframes
        ix.gen[row] = keygen
        ix.expiry[row] = min(exp, NEVER - 1)
        ix.created[row] = now
        ix.atime[row] = now
        ix.hits[row] = 0
        return not created

    def remove_rows(self, rows: npt.NDArray[np.int64]) -> None:
        """Drop entries from the index; their records become dead space."""
        if len(rows) == 0:
            return
        ix = self.index
        segs = self.table.seg_of_block(ix.loc[rows]).astype(np.int64)
        np.subtract.at(self.table.live, segs, ix.blocks[rows].astype(np.int64))
        ix.remove_many(rows)

    def repoint(self, ident: tuple[int, int, int], loc: int, nblocks: int, new_seg: int,
                at: int) -> None:
        """Point the entry `ident` (tenant, k0, k1) at its copy at block `at` of `new_seg`
        if it still names the record at `loc` (else the copy is dead)."""
        row = self.index.find(*ident)
        if row >= 0 and int(self.index.loc[row]) == loc:
            table = self.table
            table.live[int(table.seg_of_block(loc))] -= nblocks
            table.live[new_seg] += nblocks
            self.index.loc[row] = (table.offset(new_seg) + at * table.B) // table.B

    def touch(self, row: int) -> None:
        """A read of the entry: its access time and count."""
        ix = self.index
        ix.atime[row] = int(self.ctx.clock())
        ix.hits[row] = min(int(ix.hits[row]) + 1, 0xFFFF)

    def rows_in_segment(self, seg: int) -> npt.NDArray[np.int64]:
        """Rows whose records lie in segment `seg`."""
        lo = self.table.offset(seg) // self.table.B
        return self.index.select(loc_range=(lo, lo + self.table.seg_blocks))

    def segments_of_rows(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The segment holding each index row's record."""
        return np.asarray(self.table.seg_of_block(self.index.loc[rows]), dtype=np.int64)

    def live_blocks(self) -> npt.NDArray[np.int64]:
        """Live blocks per segment, from the index (the source of truth)."""
        ix = self.index
        rows = ix.live_rows()
        live = np.zeros(len(self.table.segs), dtype=np.int64)
        if len(rows):
            segs = self.table.seg_of_block(ix.loc[rows]).astype(np.int64)
            np.add.at(live, segs, ix.blocks[rows].astype(np.int64))
        return live

    # -- listings -------------------------------------------------------------------------

    def entry_info(self, row: int, key: bytes) -> EntryInfo:
        ix = self.index
        B = self.table.B
        return EntryInfo(
            tenant=self.tenants[int(ix.tenant[row])],
            session=self.sessions[int(ix.session[row])], key=key,
            record_bytes=int(ix.blocks[row]) * B, nframes=int(ix.nframes[row]),
            key_generation=int(ix.gen[row]), created=int(ix.created[row]),
            expiry=int(ix.expiry[row]), atime=int(ix.atime[row]), hits=int(ix.hits[row]),
            offset=int(ix.loc[row]) * B)

    def entries(self, tenant: str | None, session: str | None) -> list[EntryInfo]:
        """Live entries (optionally of one tenant / session)."""
        ix = self.index
        t = None if tenant is None else self.tenant_id(tenant, False)
        s = None if session is None else self.session_id(session, False)
        if (t is not None and t < 0) or (s is not None and s < 0):
            return []
        rows = ix.select(tenant=t, session=s)
        now = int(self.ctx.clock())
        out = []
        for r in rows.tolist():
            exp = int(ix.expiry[r])
            if exp and exp <= now:
                continue
            key = int(ix.k0[r]).to_bytes(8, "little") + int(ix.k1[r]).to_bytes(8, "little")
            out.append(self.entry_info(r, key))
        return out

    def tenant_bytes(self) -> dict[str, int]:
        """Record bytes held by each tenant: one vectorised pass over the index."""
        ix = self.index
        n = ix.n_rows
        sums = np.bincount(ix.tenant[:n].astype(np.int64),
                           weights=ix.blocks[:n].astype(np.float64),
                           minlength=len(self.tenants))
        return {name: int(sums[i]) * self.table.B for i, name in enumerate(self.tenants)
                if sums[i]}

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Entries and record bytes of one tenant: one vectorised pass over the index."""
        t = self.tenant_id(tenant, False)
        if t < 0:
            return {"entries": 0, "live_bytes": 0}
        rows = self.index.select(tenant=t)  # live rows only
        return {"entries": len(rows),
                "live_bytes": int(self.index.blocks[rows].sum()) * self.table.B}
