"""Exceptions raised by kvtier.client.  Every daemon status maps onto one class."""

from __future__ import annotations

from kvtier.client.protocol import Status


class KvtierError(Exception):
    """Base class of every kvtier client error."""

    status: Status = Status.INTERNAL


class NotFoundError(KvtierError, KeyError):
    status = Status.NOT_FOUND

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class InvalidRequestError(KvtierError, ValueError):
    status = Status.INVALID


class ValueTooLargeError(KvtierError):
    status = Status.TOO_LARGE


class NoSpaceError(KvtierError):
    status = Status.NO_SPACE


class CorruptDataError(KvtierError):
    status = Status.CORRUPT


class DaemonIOError(KvtierError):
    status = Status.IO_ERROR


class PermissionDeniedError(KvtierError, PermissionError):
    status = Status.DENIED


class BufferTooSmallError(KvtierError):
    status = Status.BUFFER_TOO_SMALL


class ShuttingDownError(KvtierError):
    status = Status.SHUTTING_DOWN


class DeadlineError(KvtierError):
    status = Status.DEADLINE


class DisconnectedError(KvtierError, ConnectionError):
    """The connection to kvtierd is gone; requests in flight failed with this."""


class TimeoutError_(KvtierError, TimeoutError):
    """No completion arrived within the timeout."""


class HandshakeError(KvtierError):
    """The daemon refused the connection (bad token, uid, version or limits)."""


_BY_STATUS: dict[int, type[KvtierError]] = {
    int(c.status): c for c in (NotFoundError, InvalidRequestError, ValueTooLargeError,
                               NoSpaceError, CorruptDataError, DaemonIOError,
                               PermissionDeniedError, BufferTooSmallError, ShuttingDownError,
                               DeadlineError)
}


def error_for(status: int, message: str) -> KvtierError:
    cls = _BY_STATUS.get(status, KvtierError)
    return cls(message)
