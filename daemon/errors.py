"""Errors raised by the storage engine.  Every message names the thing and the problem."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every storage-engine error."""


class DeviceError(StoreError):
    """The block device refused or failed an operation (path, alignment, I/O error)."""


class FormatError(StoreError):
    """The media does not hold a kvtier pool, or holds one this code cannot read."""


class VersionError(FormatError):
    """The pool was written by an unsupported format version."""


class CorruptionError(StoreError):
    """A checksum or structural check failed: the bytes are not served."""


class PoolFullError(StoreError):
    """No space can be made for a put (after cleaning and eviction)."""


class ValueTooLargeError(StoreError):
    """A value cannot fit in one segment."""


class InvalidArgument(StoreError, ValueError):
    """A caller passed a malformed key, name, frame range or buffer."""


class NotFound(StoreError, KeyError):
    """No live value is stored under the key (never stored, deleted, purged or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class BufferTooSmall(InvalidArgument):
    """The caller's buffer cannot hold what was asked for."""
