"""The admin tree: what kvtierd holds, as files (pyfuse3, inside the daemon's trio loop).

    status  config  metrics
    pools/<pool>/info                     pools/<pool>/segments/<id>
    tenants/<tenant>/info
    tenants/<tenant>/sessions/<session>/info
    tenants/<tenant>/sessions/<session>/blocks/<key hex>

JSON files are rendered when opened (their size is that rendering's); a block file is the
value's record exactly as stored on the media pool (header, frames, padding), streamed
from the device in the reader's chunks, never decoded.  mtime of a block is its write
time, atime its last read.  Removing is the only change allowed:

* `rm tenants/T/sessions/S/blocks/K` deletes that value;
* any other removal inside a session (its info, its blocks/ directory, the session
  directory itself — what `rm -r` does) purges the whole session;

every removal is logged with the caller's uid.  Everything else is EROFS (writes,
creates, renames, attribute changes) or EPERM (removing outside a session).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pyfuse3
import trio

from kvtier.daemon.admin_view import AdminView
from kvtier.daemon.config import Config
from kvtier.daemon.errors import StoreError

log = logging.getLogger("kvtierd.fuse")

Path = tuple[str, ...]
TOP = ("status", "config", "metrics", "pools", "tenants")
READDIR_BATCH = 256  # attributes computed per worker-thread call while listing


def _err(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@contextlib.contextmanager
def _enoent() -> Iterator[None]:
    """What the view says is not there (NotFound, a malformed key): ENOENT here."""
    try:
        yield
    except StoreError:
        raise _err(errno.ENOENT) from None


class AdminTree(pyfuse3.Operations):  # type: ignore[misc]
    """The tree's operations; `paths` maps inodes to paths (allocated on lookup)."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, cfg: Config, view: AdminView,
                 metrics: Callable[[], bytes],
                 run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
                 audit: Callable[..., Any] | None = None,
                 audit_ok: Callable[[], bool] | None = None) -> None:
        """`view` is what the admin socket answers from too (daemon/admin_view.py);
        `run_blocking` runs its reads off the event loop: the daemon's I/O scheduler
        (interactive class, as admin commands), so they count against its threads."""
        super().__init__()
        self.cfg, self.view, self.metrics = cfg, view, metrics
        self.audit = audit or (lambda event, **fields: None)
        # False while the audit log cannot be written: removals are refused (ENOSPC), as
        # the admin socket refuses its changes, since they must be on the record.
        self.audit_ok = audit_ok or (lambda: True)
        self.run_blocking = run_blocking
        view.listeners.append(self._forget)
        self.paths: dict[int, Path] = {pyfuse3.ROOT_INODE: ()}
        self.inodes: dict[Path, int] = {(): pyfuse3.ROOT_INODE}
        self.open_files: dict[int, tuple[Path, bytes | None]] = {}
        self.open_dirs: dict[int, tuple[Path, list[str]]] = {}
        self._next_fh = 1
        self.started = time.time()
        # Sessions purged through the tree whose directory is not removed yet: `rm -r`
        # still walks them, so they stay as empty directories until their own rmdir.
        self.purged: set[tuple[str, str]] = set()
        self.mounted = False  # kernel notifications only while mounted (serve_tree)

    # -- paths ---------------------------------------------------------------------------------

    def _inode(self, path: Path) -> int:
        ino = self.inodes.get(path)
        if ino is None:
            ino = len(self.paths) + 1
            while ino in self.paths:
                ino += 1
            self.paths[ino] = path
            self.inodes[path] = ino
        return ino

    def _path(self, inode: int) -> Path:
        try:
            return self.paths[inode]
        except KeyError:
            raise _err(errno.ENOENT) from None

    def _forget(self, via: str, tenant: str, session: str | None, key: str | None) -> None:
        """A value, session or tenant's values removed through the admin socket: drop the
        directory entry the kernel may cache for a second (a removal here the kernel saw
        itself; `rm -r` is still walking what it purged)."""
        if via == "fuse" or not self.mounted:
            return
        if session is None:
            parent, name = ("tenants", tenant), "sessions"
        elif key is None:
            parent, name = ("tenants", tenant, "sessions"), session
        else:
            parent, name = ("tenants", tenant, "sessions", session, "blocks"), key
        ino = self.inodes.get(parent)
        if ino is not None:
            pyfuse3.invalidate_entry_async(ino, os.fsencode(name), ignore_enoent=True)

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await self.run_blocking(fn)

    def _tenants(self) -> list[str]:
        return self.view.tenants()

    # -- what a path is ------------------------------------------------------------------------

    def _is_dir(self, p: Path) -> bool:
        n = len(p)
        return (n == 0 or p in (("pools",), ("tenants",))
                or (n == 2 and p[0] in ("pools", "tenants"))
                or (n == 3 and p[0] == "pools" and p[2] == "segments")
                or (n == 3 and p[0] == "tenants" and p[2] == "sessions")
                or (n == 4 and p[0] == "tenants" and p[2] == "sessions")
                or (n == 5 and p[0] == "tenants" and p[4] == "blocks"))

    def _purged(self, p: Path) -> bool:
        return len(p) >= 4 and p[0] == "tenants" and p[2] == "sessions" and \
            (p[1], p[3]) in self.purged

    def _children(self, p: Path) -> list[str]:
        """Names in directory `p` (blocking: call through _run).  ENOENT if p is gone."""
        n = len(p)
        if self._purged(p):
            return ["info", "blocks"] if n == 4 else []
        if n == 0:
            return list(TOP)
        if p == ("pools",):
            return list(self.view.pools())
        if p == ("tenants",):
            return self._tenants()
        if n == 2 and p[0] == "pools":
            if p[1] not in self.view.pools():
                raise _err(errno.ENOENT)
            return ["info", "segments"]
        if n == 2 and p[0] == "tenants":
            if p[1] not in self._tenants():
                raise _err(errno.ENOENT)
            return ["info", "sessions"]
        with _enoent():
            if n == 3 and p[2] == "segments":
                return [str(s["id"]) for s in self.view.segments(p[1])]
            if n == 3 and p[2] == "sessions":
                return sorted(set(self.view.sessions(p[1])) |
                              {s for t, s in self.purged if t == p[1]})
            if n == 4:
                if not self.view.has_session(p[1], p[3]):
                    raise _err(errno.ENOENT)
                return ["info", "blocks"]
            if n == 5:
                return self.view.block_keys(p[1], p[3])
        raise _err(errno.ENOTDIR)

    def _render(self, p: Path) -> bytes:
        """The content of a generated (JSON / text) file (blocking)."""
        if self._purged(p) and len(p) == 5 and p[4] == "info":
            return json.dumps({"tenant": p[1], "session": p[3], "purged": True}).encode()
        if p == ("config",):
            obj: Any = self.cfg.redacted()
        elif p == ("metrics",):
            return self.metrics()
        else:
            with _enoent():
                obj = self._rendered(p)
        return (json.dumps(obj, indent=1, default=str) + "\n").encode()

    def _rendered(self, p: Path) -> Any:
        """What the view shows at `p` (any StoreError: the caller's ENOENT)."""
        v, n = self.view, len(p)
        if p == ("status",):
            return v.status()
        if n == 3 and p[0] == "pools" and p[2] == "info":
            return v.pool_info(p[1])
        if n == 4 and p[0] == "pools" and p[2] == "segments":
            return v.segment(p[1], p[3])
        if n == 3 and p[0] == "tenants" and p[2] == "info":
            return v.tenant_info(p[1])
        if n == 5 and p[0] == "tenants" and p[4] == "info":
            return v.session_info(p[1], p[3])
        raise _err(errno.ENOENT)

    def _block(self, p: Path) -> Any:
        """The value a block path names, in that path's session; ENOENT if none."""
        with _enoent():
            e = self.view.block(p[1], p[5])
        if e.session != p[3]:
            raise _err(errno.ENOENT)
        return e

    def _attr(self, p: Path) -> pyfuse3.EntryAttributes:
        """Attributes of `p` (blocking); ENOENT if it does not exist."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = self._inode(p)
        a.st_uid = 0
        a.st_gid = self.cfg.fuse_admin_gid
        a.generation = 0
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_blksize = 4096
        now_ns = int(time.time() * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = int(self.started * 1e9)
        # All of it root:admin_gid, 0750/0440: the top level (status, config, pools/, the
        # tenants/ listing) names every tenant, its clients and its usage, which no
        # tenant may learn of another.
        if self._is_dir(p):
            if len(p) >= 1:
                parent = p[:-1]
                if p[-1] not in self._children(parent):
                    raise _err(errno.ENOENT)
            a.st_mode = stat.S_IFDIR | 0o750
            # Directories may be cached for a second: `ls -l` of a large session would
            # otherwise re-check the session's existence once per entry.
            a.entry_timeout = a.attr_timeout = 1.0
            a.st_nlink = 2
            a.st_size = 0
            a.st_mtime_ns = now_ns
        elif len(p) == 6 and p[0] == "tenants" and p[4] == "blocks":
            e = self._block(p)
            a.st_mode = stat.S_IFREG | 0o440
            a.st_nlink = 1
            a.st_size = e.record_bytes
            a.entry_timeout = a.attr_timeout = 1.0  # a stored record never changes
            a.st_mtime_ns = a.st_ctime_ns = int(e.created * 1e9)
            a.st_atime_ns = int(max(e.atime, e.created) * 1e9)
        else:
            data = self._render(p)
            a.st_mode = stat.S_IFREG | 0o440
            a.st_nlink = 1
            a.st_size = len(data)
            a.st_mtime_ns = now_ns
        a.st_blocks = -(-a.st_size // 512)
        return a

    # -- lookups and listings ------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        p = (*self._path(parent_inode), os.fsdecode(name))
        return await self._run(lambda: self._attr(p))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        p = self._path(inode)
        return await self._run(lambda: self._attr(p))

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        p = self._path(inode)
        if not self._is_dir(p):
            raise _err(errno.ENOTDIR)
        names = await self._run(lambda: self._children(p))
        fh = self._next_fh
        self._next_fh += 1
        self.open_dirs[fh] = (p, names)
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries from offset `start_id` on, as many as the kernel's buffer takes: a
        directory of 100k blocks is listed in pieces, attributes computed per piece."""
        parent, names = self.open_dirs[fh]
        i = start_id
        while i < len(names):
            batch = names[i:i + READDIR_BATCH]

            def attrs(batch: list[str] = batch) -> list[pyfuse3.EntryAttributes | None]:
                out: list[pyfuse3.EntryAttributes | None] = []
                for name in batch:
                    try:
                        out.append(self._attr((*parent, name)))
                    except pyfuse3.FUSEError:
                        out.append(None)  # went away since opendir
                return out

            for name, attr in zip(batch, await self._run(attrs), strict=True):
                i += 1
                if attr is not None and not pyfuse3.readdir_reply(token, os.fsencode(name),
                                                                  attr, i):
                    return

    async def releasedir(self, fh: int) -> None:
        self.open_dirs.pop(fh, None)

    # -- reading -------------------------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        p = self._path(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            log.warning("fuse: uid %d tried to open %s for writing", ctx.uid, "/".join(p))
            raise _err(errno.EROFS)
        if self._is_dir(p):
            raise _err(errno.EISDIR)
        is_block = len(p) == 6 and p[4] == "blocks"
        data = None if is_block else await self._run(lambda: self._render(p))
        if is_block:
            await self._run(lambda: self._block(p))
        fh = self._next_fh
        self._next_fh += 1
        self.open_files[fh] = (p, data)
        fi = pyfuse3.FileInfo(fh=fh)
        fi.direct_io = True  # sizes of generated files change; blocks stream from the device
        fi.keep_cache = False
        return fi

    async def read(self, fh: int, off: int, size: int) -> bytes:
        p, data = self.open_files[fh]
        if data is not None:
            return data[off:off + size]
        try:
            return bytes(await self._run(lambda: self.view.read_block(p[1], p[5], off, size)))
        except StoreError:
            raise _err(errno.ENOENT) from None

    async def release(self, fh: int) -> None:
        self.open_files.pop(fh, None)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        st = await self._run(lambda: self.view.pool_info(self.view.media_name()))
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = st["capacity_bytes"] // 4096
        s.f_bfree = s.f_bavail = max(0, st["capacity_bytes"] - st["live_bytes"]) // 4096
        s.f_files = st["entries"]
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- removal: the only change ----------------------------------------------------------------

    def _remove(self, p: Path, uid: int) -> None:
        """Remove what `p` names (blocking); see the module docstring."""
        where = "/".join(p)
        if self._purged(p) and len(p) > 4:
            return  # `rm -r` finishing a session purged a moment ago
        if not self.audit_ok():
            log.error("fuse: uid %d may not remove %s now: the audit log cannot be written",
                      uid, where)
            raise _err(errno.ENOSPC)
        if len(p) == 6 and p[0] == "tenants" and p[4] == "blocks":
            with _enoent():
                self.view.delete(p[1], p[5], uid=uid, via="fuse", session=p[3])
            log.warning("fuse: uid %d deleted %s", uid, where)
            return
        if len(p) >= 4 and p[0] == "tenants" and p[2] == "sessions":
            if (p[1], p[3]) not in self.purged:
                with _enoent():
                    n = self.view.purge(p[1], p[3], uid=uid, via="fuse")
                log.warning("fuse: uid %d purged session %s/%s (%d values) via %s", uid,
                            p[1], p[3], n, where)
            if len(p) == 4:
                self.purged.discard((p[1], p[3]))  # its directory is gone now
            else:
                self.purged.add((p[1], p[3]))
            return
        log.warning("fuse: uid %d may not remove %s", uid, where)
        self.audit("fuse_denied", uid=uid, path=where, action="remove")
        raise _err(errno.EPERM)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        p = (*self._path(parent_inode), os.fsdecode(name))
        await self._run(lambda: self._attr(p))
        await self._run(lambda: self._remove(p, ctx.uid))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        p = (*self._path(parent_inode), os.fsdecode(name))
        if not self._is_dir(p):
            raise _err(errno.ENOTDIR)
        await self._run(lambda: self._remove(p, ctx.uid))

    # -- everything else is read-only --------------------------------------------------

    def _readonly(self, what: str, ctx: pyfuse3.RequestContext | None) -> pyfuse3.FUSEError:
        log.warning("fuse: uid %s: %s refused (read-only tree)", ctx.uid if ctx else "?", what)
        return _err(errno.EROFS)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly(f"create {os.fsdecode(name)}", ctx)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly(f"mkdir {os.fsdecode(name)}", ctx)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly("mknod", ctx)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly("symlink", ctx)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly("link", ctx)

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        raise self._readonly("rename", ctx)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> Any:
        raise self._readonly("setattr", ctx)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise self._readonly("write", None)

    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise self._readonly("setxattr", ctx)


def clean_stale_mount(mountpoint: str) -> None:
    """A daemon killed with the tree mounted leaves a dead mount (ENOTCONN): lazily unmount
    it.  Creates the mountpoint if missing."""
    try:
        os.stat(mountpoint)
    except FileNotFoundError:
        os.makedirs(mountpoint, exist_ok=True)
        return
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
    if os.path.ismount(mountpoint) or _is_dead(mountpoint):
        log.warning("fuse: unmounting a stale mount at %s", mountpoint)
        for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
            try:
                if subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0:
                    return
            except FileNotFoundError:
                continue
        raise OSError(errno.EBUSY, f"cannot unmount the stale mount at {mountpoint}")


def _is_dead(path: str) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as e:
        return e.errno == errno.ENOTCONN


async def serve_tree(tree: AdminTree, mountpoint: str, options: Sequence[str] = (), *,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Mount `tree` at `mountpoint` and serve it until cancelled; unmounts on the way out."""
    await trio.to_thread.run_sync(clean_stale_mount, mountpoint)
    opts = set(pyfuse3.default_options)
    opts.discard("default_permissions")
    opts |= {"fsname=kvtier", "default_permissions", "allow_other", *options}
    pyfuse3.init(tree, mountpoint, opts)
    tree.mounted = True
    log.info("fuse: admin tree mounted at %s", mountpoint)
    try:
        task_status.started()
        await pyfuse3.main()
    finally:
        tree.mounted = False
        pyfuse3.close(unmount=True)
        log.info("fuse: admin tree unmounted from %s", mountpoint)
