"""The admin's view of the store: what an operator sees and may change, in one place.

Both admin front ends answer from it -- the admin socket's commands (`kvtier ls`, `stat`,
`info`, `segments`, `delete`, `purge`; service.py) and the FUSE tree's files and removals
(fuse/tree.py) -- so `cat tenants/T/sessions/S/info` and `kvtier info T S` are the same
JSON, a tenant or session one of them shows exists for the other, and `rm` in the tree
and `kvtier delete`/`purge` leave the same audit records (`admin_delete`, `admin_purge`,
with `via` saying which front end).  The front ends only translate: paths and errno
there, commands and error messages here.

Tenants are the configured ones (a tenant missing from the config is NotFound, whatever
its pool still holds); sessions and values those of the media pool, which holds every
value (the DRAM tiers hold copies).  Every method blocks (pool locks, device reads): call
it in a worker thread through the I/O scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtier.daemon.config import Config
from kvtier.daemon.errors import InvalidArgument, NotFound
from kvtier.daemon.pool import Pool
from kvtier.daemon.pool_types import EntryInfo
from kvtier.daemon.tiers import TieredStore

Audit = Callable[..., Any]
# Told of every change made through the view: (via, tenant, session or None for the whole
# tenant, key hex or None for the whole session).
ChangeListener = Callable[[str, str, str | None, str | None], None]


class AdminView:
    def __init__(self, cfg: Config, store: TieredStore, status: Callable[[], dict[str, Any]],
                 audit: Audit) -> None:
        self.cfg, self.store = cfg, store
        self.status = status  # the daemon-wide status (admin only)
        self._audit = audit
        # the FUSE tree drops what the kernel cached of a change made through the socket
        self.listeners: list[ChangeListener] = []

    # -- names ---------------------------------------------------------------------------

    def media_name(self) -> str:
        return self.cfg.pools[0].name if self.cfg.pools else "media"

    def pools(self) -> dict[str, Pool]:
        """The media pool (by its configured name) and each tenant's DRAM tier."""
        out = {self.media_name(): self.store.media}
        for t, p in self.store.drams.items():
            out[f"dram-{t}"] = p
        return out

    def pool(self, name: str) -> Pool:
        pool = self.pools().get(name)
        if pool is None:
            raise NotFound(f"no pool {name!r}")
        return pool

    def tenants(self) -> list[str]:
        return [t.id for t in self.cfg.tenants]

    def _tenant(self, tenant: Any) -> str:
        if not isinstance(tenant, str) or self.cfg.tenant(tenant) is None:
            raise NotFound(f"no tenant {tenant!r} in the configuration")
        return tenant

    def sessions(self, tenant: str) -> list[str]:
        return sorted(self.store.media.usage(self._tenant(tenant)))

    def has_session(self, tenant: str, session: str) -> bool:
        return session in self.store.media.usage(self._tenant(tenant))

    def _session(self, tenant: str, session: Any) -> str:
        if not isinstance(session, str) or not self.has_session(tenant, session):
            raise NotFound(f"tenant {tenant} has no session {session!r}")
        return session

    def block_keys(self, tenant: str, session: str) -> list[str]:
        return [e.key.hex() for e in self.store.media.entries(self._tenant(tenant), session)]

    # -- what is shown -------------------------------------------------------------------

    def usage(self, tenant: str | None = None) -> dict[str, dict[str, int]]:
        """Entries and bytes per tenant, or per session of `tenant`."""
        if tenant is None:
            names = set(self.tenants())
            return {t: u for t, u in self.store.media.usage(None).items() if t in names}
        return self.store.media.usage(self._tenant(tenant))

    def pool_info(self, name: str) -> dict[str, Any]:
        return self.pool(name).stats()

    def segments(self, name: str) -> list[dict[str, Any]]:
        return self.pool(name).segment_table()

    def segment(self, name: str, seg_id: str) -> dict[str, Any]:
        for s in self.segments(name):
            if str(s["id"]) == seg_id:
                return s
        raise NotFound(f"pool {name} has no segment {seg_id!r}")

    def tenant_info(self, tenant: str) -> dict[str, Any]:
        t = self.cfg.tenant(self._tenant(tenant))
        assert t is not None
        use = self.store.media.usage(None).get(t.id, {"entries": 0, "bytes": 0})
        dram = self.store.drams.get(t.id)
        return {"tenant": t.id, "entries": use["entries"], "bytes": use["bytes"],
                "sessions": len(self.store.media.usage(t.id)),
                "allowed_uids": t.allowed_uids,
                "dram_bytes": dram.dev.size if dram is not None else 0,
                "dram_live_bytes": dram.stats()["live_bytes"] if dram is not None else 0}

    def session_info(self, tenant: str, session: str) -> dict[str, Any]:
        use = self.store.media.usage(self._tenant(tenant)).get(session)
        if use is None:
            raise NotFound(f"tenant {tenant} has no session {session!r}")
        ents = self.store.media.entries(tenant, session)
        return {"tenant": tenant, "session": session, **use,
                "created_first": min((e.created for e in ents), default=0),
                "created_last": max((e.created for e in ents), default=0),
                "last_access": max((e.atime for e in ents), default=0)}

    def blocks(self, tenant: str, session: str) -> list[dict[str, Any]]:
        """A session's values, one row each (`kvtier ls T S`)."""
        return [{"key": e.key.hex(), "bytes": e.record_bytes, "frames": e.nframes,
                 "created": e.created, "expiry": e.expiry, "hits": e.hits}
                for e in self.store.media.entries(tenant, self._session(tenant, session))]

    def block(self, tenant: str, key: str) -> EntryInfo:
        """The stored value `key` (hex) of `tenant`; NotFound if there is none."""
        return self.store.media.stat(self._tenant(tenant), _key(key))

    def block_info(self, tenant: str, key: str) -> dict[str, Any]:
        e = self.block(tenant, key)
        dram = self.store.drams.get(tenant)
        return {"tenant": e.tenant, "session": e.session, "key": e.key.hex(),
                "bytes": e.record_bytes, "frames": e.nframes, "created": e.created,
                "expiry": e.expiry, "atime": e.atime, "hits": e.hits,
                "in_dram": dram is not None and dram.contains(tenant, e.key)}

    def read_block(self, tenant: str, key: str, offset: int, size: int) -> bytes:
        """Bytes of the value's record exactly as stored on the media pool."""
        return self.store.media.read_raw(self._tenant(tenant), _key(key), offset, size)

    # -- changes (each on the audit record) ----------------------------------------------

    def delete(self, tenant: str, key: str, *, uid: int, via: str,
               session: str | None = None) -> None:
        """Delete one value (of `session`, when given: NotFound if it is in another)."""
        e = self.block(tenant, key)
        if session is not None and e.session != session:
            raise NotFound(f"tenant {tenant} has no value {key} in session {session!r}")
        self.store.delete(tenant, e.key)
        self._audit("admin_delete", uid=uid, via=via, tenant=tenant, session=e.session,
                    key=e.key.hex())
        self._changed(via, tenant, e.session, e.key.hex())

    def purge(self, tenant: str, session: str | None = None, *, uid: int, via: str) -> int:
        """Delete a session's values, or all of a tenant's; how many."""
        self._tenant(tenant)
        if session is not None:
            n = self.store.purge_session(tenant, session)
        else:
            n = self.store.purge_tenant(tenant)
        self._audit("admin_purge", uid=uid, via=via, tenant=tenant, session=session,
                    values=n)
        self._changed(via, tenant, session, None)
        return n

    def _changed(self, via: str, tenant: str, session: str | None, key: str | None) -> None:
        for fn in self.listeners:
            fn(via, tenant, session, key)


def _key(key: Any) -> bytes:
    try:
        raw = bytes.fromhex(key) if isinstance(key, str) else b""
    except ValueError:
        raw = b""
    if len(raw) not in (16, 32):
        raise InvalidArgument(f"a key is 16 or 32 bytes in hex, got {key!r}")
    return raw
