"""Puts in flight: between taking their LSN (`Pool.reserve`) and committing to the index
(`Pool.complete`), and puts whose write failed but may have reached the media anyway.

Three parts of a pool read this: a put commits only if no later put, delete or purge of
its key came meanwhile (it is then still the key's newest put here); a delete or purge
supersedes the puts of its keys that are still in flight, and writes its tombstone even
for a key with no live value when such a put may yet land (a restart would replay it);
and a checkpoint waits until no put is in flight, since their LSNs are below its own
but their records are not in the index yet.  Every method expects the pool's metadata
lock held by the caller.
"""

from __future__ import annotations

IndexKey = tuple[int, int, int]  # (tenant number, k0, k1)


class PutsInFlight:
    """See the module docstring."""

    def __init__(self) -> None:
        # key -> (LSN of the newest put in flight, session number)
        self.by_key: dict[IndexKey, tuple[int, int]] = {}
        # Puts whose write failed but may have reached the media whole (an NVMe-oF write
        # whose answer timed out, a write whose flush failed): (lsn, session) by key,
        # until a checkpoint past their LSN means they are never replayed.  A delete or
        # purge of such a key writes its tombstone as if it were live, else a restart
        # would replay the record and bring a deleted value back.
        self.doubtful: dict[IndexKey, tuple[int, int]] = {}
        self.count = 0  # puts between reserve and commit, superseded ones included

    def begin(self, ikey: IndexKey, lsn: int, session: int) -> None:
        self.by_key[ikey] = (lsn, session)
        self.count += 1

    def end(self, ikey: IndexKey, lsn: int, ok: bool) -> bool:
        """The put of `ikey` with `lsn` is done (written if `ok`): True if it is still the
        key's newest (so it commits, or, failed, becomes doubtful)."""
        self.count -= 1
        entry = self.by_key.get(ikey, (0, 0))
        current = entry[0] == lsn
        if current:
            del self.by_key[ikey]
            if not ok:
                self.doubtful[ikey] = entry
        return current

    def pending_key(self, ikey: IndexKey) -> bool:
        """A put of this key is in flight or doubtful."""
        return ikey in self.by_key or ikey in self.doubtful

    def pending_session(self, tenant: int, session: int) -> bool:
        return any(k[0] == tenant and v[1] == session for k, v in
                   (*self.by_key.items(), *self.doubtful.items()))

    def pending_tenant(self, tenant: int) -> bool:
        return any(k[0] == tenant for k in (*self.by_key, *self.doubtful))

    def cancel(self, tenant: int, key: tuple[int, int] | None = None,
               session: int | None = None) -> None:
        """A delete or purge supersedes puts of the same keys that are still in flight:
        forgetting them here means they find themselves superseded when they commit."""
        for d in (self.by_key, self.doubtful):
            for ik, (_lsn, sid) in list(d.items()):
                if ik[0] != tenant or (key is not None and ik[1:] != key) or \
                        (session is not None and sid != session):
                    continue
                del d[ik]

    def forget_doubtful_below(self, lsn: int) -> None:
        """A checkpoint at `lsn` is published: doubtful puts below it are never replayed."""
        self.doubtful = {ik: v for ik, v in self.doubtful.items() if v[0] >= lsn}
