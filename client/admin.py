"""The admin side of the control socket (used by the `kvtier` CLI).

Admin requests are allowed only from the uids in the daemon's `admin_uids`.
"""

from __future__ import annotations

import socket
from typing import Any

from kvtier.client.errors import DisconnectedError, KvtierError, PermissionDeniedError
from kvtier.client.protocol import MAX_ADMIN_REPLY, CtrlParser, Msg, encode_ctrl


class AdminClient:
    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path)
        except OSError as e:
            self._sock.close()
            raise DisconnectedError(f"cannot connect to kvtierd at {socket_path}: "
                                    f"{e.strerror}") from e
        self._parser = CtrlParser(MAX_ADMIN_REPLY)

    def call(self, cmd: str, **args: Any) -> Any:
        self._sock.sendall(encode_ctrl(Msg.ADMIN, {"cmd": cmd, **args}))
        while True:
            m = self._parser.next_message()
            if m is not None:
                break
            data = self._sock.recv(65536)
            if not data:
                raise DisconnectedError("kvtierd closed the admin connection")
            self._parser.feed(data)
        msg, body = m
        if msg == Msg.ERROR:
            if body.get("code") == "denied":
                raise PermissionDeniedError(body.get("message", "denied"))
            raise KvtierError(body.get("message", "admin request failed"))
        return body.get("result")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
