"""Opening the media pool at start, and formatting it where `[[pool]] format` allows.

File pools (`kind = "file"`: a regular file or a block device):

* `path` does not exist: created and formatted under "if-missing" (the default) and
  "if-empty" (this needs `size`), refused under "never".  The file is created and
  formatted as `<path>.formatting`, fsynced, renamed to `<path>`, and the directory is
  fsynced: a crash at any point leaves either no `<path>` or a complete pool, never a
  half-formatted `<path>`.  A start that finds a `<path>.formatting` (an earlier first
  start died while formatting) removes it, with a warning.
* `path` exists but is zero-length or has no superblock magic in either copy: formatted
  in place under "if-empty" only; "if-missing" and "never" refuse it and say what to do --
  an existing file is never formatted silently.  `Pool.format` writes the superblocks
  last, so a crash during this format leaves a file "if-empty" formats again.
* `path` holds a pool: opened under every mode.  A `size` or `segment_size` in the config
  that differs from the pool's superblock is an error (`size` 0, i.e. not set: whatever
  the pool has); kvtierd neither resizes nor reformats a pool.

Nvmf pools: a namespace always exists, so a blank one (no superblock magic in either
copy) is what a missing file is for a file pool: formatted under "if-missing" and
"if-empty", refused under "never".  `Pool.format` zeroes the segment headers, flushes,
and only then writes the superblocks: a crash leaves the namespace blank or a valid pool.

A superblock copy that could not be used (damaged, missing, or older than the other) is
logged at WARNING on "kvtierd", naming the copy, the reason and the copy opened from.
"""

from __future__ import annotations

import logging
import os

from kvtier.daemon.blockdev import BlockDevice, FileDevice
from kvtier.daemon.config import Config, PoolConfig
from kvtier.daemon.errors import StoreError
from kvtier.daemon.pool import DEFAULT_SEGMENT, Pool, PoolOptions
from kvtier.daemon.sizes import format_size
from kvtier.daemon.superblock import newest_superblock, superblock_present

log = logging.getLogger("kvtierd")

FORMATTING_SUFFIX = ".formatting"


class PoolOpenError(StoreError):
    """The configured media pool cannot be opened (or formatted) as configured; the message
    names the pool, the key and what the operator can do."""


def open_media_pool(cfg: Config) -> Pool:
    """Open the first configured pool, formatting it where its `format` mode allows."""
    p = cfg.pools[0]
    if p.kind == "nvmf":
        return open_nvmf_pool(p)
    return open_file_pool(p)


# -- file pools --------------------------------------------------------------------------------


def open_file_pool(p: PoolConfig) -> Pool:
    """Open the file pool `p`, creating or formatting it as its `format` mode allows (see
    the module's docstring)."""
    direct: bool | str = "auto" if p.direct == "auto" else p.direct == "on"
    path = p.path
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise PoolOpenError(f"pool {p.name}: directory {parent} (of path {path}) does not "
                            f"exist; kvtierd does not create it: create it, or fix the "
                            f"pool's path")
    _remove_stale(p, path + FORMATTING_SUFFIX, parent)
    if not os.path.lexists(path):
        if p.format == "never":
            raise PoolOpenError(
                f'pool {p.name}: {path} does not exist and format = "never" (kvtierd only '
                f"opens a pool that is there): create it with `kvtier pool format {path} "
                f'--size SIZE`, or set format = "if-missing"')
        if not p.size:
            raise PoolOpenError(f"pool {p.name}: {path} does not exist and no size is "
                                f"configured to create it")
        _format_new_file(p, direct, parent)
    elif not os.path.exists(path):
        raise PoolOpenError(f"pool {p.name}: {path} is a symbolic link to "
                            f"{os.readlink(path)}, which does not exist")
    dev = FileDevice(path, direct=direct)
    try:
        if dev.size and superblock_present(dev):
            return _open_existing(p, dev, destroy=f"delete {path}")
        state = ("is empty (zero length)" if dev.size == 0 else
                 "holds no kvtier pool (no superblock magic in either copy)")
        if p.format != "if-empty":
            rule = ("kvtierd only creates a pool file that does not exist, and never formats "
                    "an existing one" if p.format == "if-missing" else "kvtierd never formats")
            raise PoolOpenError(
                f'pool {p.name}: {path} exists but {state}; with format = "{p.format}" '
                f'{rule}: set format = "if-empty" in the pool\'s config to have it formatted, '
                f"or delete the file (if it is one) to have it created")
        return _format_in_place(p, dev, direct, state)
    except BaseException:
        dev.close()
        raise


def _format_new_file(p: PoolConfig, direct: bool | str, parent: str) -> None:
    """Create and format `<path>.formatting`, make it durable, rename it to `<path>`."""
    tmp = p.path + FORMATTING_SUFFIX
    seg = p.segment_size or DEFAULT_SEGMENT
    log.info("pool %s: %s does not exist; formatting %s in segments of %s (as %s, renamed "
             "into place when done)", p.name, p.path, format_size(p.size), format_size(seg),
             os.path.basename(tmp))
    try:
        dev = FileDevice(tmp, direct=direct, create_size=p.size)
        try:
            Pool.format(dev, segment_size=seg, options=PoolOptions())
            os.fsync(dev.fd)  # the size and allocation, beyond what fdatasync promised
        finally:
            dev.close()  # the pool is opened again under its real name
        os.rename(tmp, p.path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(parent)


def _format_in_place(p: PoolConfig, dev: FileDevice, direct: bool | str, state: str) -> Pool:
    """`format = "if-empty"`: format an existing file (or block device) that holds no pool.

    Takes `dev` over (closes it on failure).  A regular file of another size than a
    configured `size` is sized afresh: it holds nothing kvtier could lose."""
    seg = p.segment_size or DEFAULT_SEGMENT
    try:
        if dev.is_block_device:
            if p.size and p.size != dev.size:
                raise PoolOpenError(
                    f"pool {p.name}: size = {p.size} ({format_size(p.size)}), but block device "
                    f"{p.path} has {dev.size} bytes: set size = {_size_text(dev.size)}, or "
                    f"leave it out")
        else:
            want = p.size or dev.size
            if not want:
                raise PoolOpenError(f"pool {p.name}: {p.path} {state} and no size is "
                                    f"configured to format it with: set size")
            if dev.size != want:
                dev.close()
                os.truncate(p.path, 0)
                dev = FileDevice(p.path, direct=direct, create_size=want)
        log.info('pool %s: %s %s; formatting it in place (format = "if-empty"): %s in '
                 "segments of %s", p.name, p.path, state, format_size(dev.size),
                 format_size(seg))
        return Pool.format(dev, segment_size=seg, options=PoolOptions())
    except BaseException:
        dev.close()
        raise


def _size_text(n: int) -> str:
    """`n` bytes as a config value ("64M", "1G", or bytes)."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f'"{n >> shift}{unit}"'
    return str(n)


def _remove_stale(p: PoolConfig, tmp: str, parent: str) -> None:
    if not os.path.lexists(tmp):
        return
    log.warning("pool %s: removing %s, left by a format that did not finish (kvtierd "
                "stopped while formatting the pool during an earlier start)", p.name, tmp)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        return
    except OSError as e:
        raise PoolOpenError(f"pool {p.name}: cannot remove {tmp} (an unfinished format): "
                            f"{e.strerror}; remove it by hand") from e
    _fsync_dir(parent)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- nvmf pools --------------------------------------------------------------------------------


def open_nvmf_pool(p: PoolConfig) -> Pool:
    """Attach the namespace (provisioning it first when configured); open its pool, or
    format it when the namespace is blank (no superblock magic anywhere) and `format` is
    not "never"."""
    from kvtier.daemon.nvmf.device import NvmfDevice

    n = p.nvmf
    assert n is not None
    if n.provision is not None:
        from kvtier.daemon.spdk import provision_pool

        provision_pool(p)
    dev = NvmfDevice(n, name=p.name, size_limit=p.size or None)
    try:
        if superblock_present(dev):
            return _open_existing(p, dev, destroy="zero the namespace's first MiB")
        if p.format == "never":
            raise PoolOpenError(
                f'pool {p.name}: {dev.name} ({n.where}) holds no kvtier pool (no superblock '
                f'magic in either copy) and format = "never": set format = "if-missing" '
                f"to have it formatted")
        seg = p.segment_size or DEFAULT_SEGMENT
        log.info("pool %s: no kvtier pool on %s; formatting %s in segments of %s", p.name,
                 dev.name, format_size(dev.size), format_size(seg))
        return Pool.format(dev, segment_size=seg, options=PoolOptions())
    except BaseException:
        dev.close()
        raise


# -- both --------------------------------------------------------------------------------------


def _open_existing(p: PoolConfig, dev: BlockDevice, *, destroy: str) -> Pool:
    """Check the config's geometry against the pool's superblock, open it, log recovery.
    `destroy`: how the operator starts over (for the error messages)."""
    sb = newest_superblock(dev)
    if sb is not None:  # else Pool.open says what is wrong with both copies
        size = p.size - p.size % sb.block_size  # an nvmf size limit is rounded down
        if p.size and size != sb.device_size:
            raise PoolOpenError(
                f"pool {p.name}: size = {p.size} ({format_size(p.size)}) in the config, but "
                f"{dev.name} holds a pool formatted with {sb.device_size} bytes "
                f"({format_size(sb.device_size)}); kvtierd does not resize a pool: set "
                f"size = {_size_text(sb.device_size)} (or leave size out to use what is "
                f"there), or, to start over with the new size, {destroy} (its contents are "
                f"lost) and start again")
        if p.segment_size and p.segment_size != sb.segment_size:
            raise PoolOpenError(
                f"pool {p.name}: segment_size = {p.segment_size} "
                f"({format_size(p.segment_size)}) in the config (64M when not set), but "
                f"{dev.name} holds a pool formatted with segments of {sb.segment_size} bytes "
                f"({format_size(sb.segment_size)}); a pool's segment size is fixed when it is "
                f"formatted: set segment_size = {_size_text(sb.segment_size)}, or, to use the "
                f"new size, {destroy} (its contents are lost) and start again")
    pool = Pool.open(dev, options=PoolOptions())
    _log_recovery(p, pool)
    return pool


def _log_recovery(p: PoolConfig, pool: Pool) -> None:
    rep = pool.recovery
    for copy, why in sorted(rep.superblock_errors.items()):
        log.warning("pool %s: superblock copy %s was not used (%s); opened from copy %s "
                    "(generation %d); the next checkpoint rewrites both copies", p.name, copy,
                    why, rep.superblock_used, pool.sb.generation)
    seen = set(rep.superblock_errors.values())
    for w in rep.warnings:
        if w not in seen:
            log.warning("pool %s: recovery: %s", p.name, w)
    log.info("pool %s: opened %s (%s in %d segments of %s) in %.2f s: %d checkpointed "
             "entries, %d records replayed, %d torn", p.name, pool.dev.name,
             format_size(pool.sb.device_size), pool.sb.segment_count,
             format_size(pool.sb.segment_size), rep.seconds, rep.checkpoint_entries,
             rep.records_replayed, rep.torn_records)
