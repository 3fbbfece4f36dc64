"""The audit log: append-only, hash-chained JSON lines.

Each line is one JSON object with `seq` (1, 2, ...), `time` (unix seconds), `event`, the
event's fields, `prev` (the previous line's hash; 64 zeros for the first) and `hash`:
the SHA-256 of the line's canonical JSON (sorted keys, no spaces) without `hash`.  An
edited line no longer matches its hash; a deleted, inserted or reordered line breaks
`prev` and `seq`.  `verify` finds the first line where either happens.

Lines are written (one `write` each, O_APPEND) as events happen and fsynced in batches
(`sync`, called by the daemon about once a second and at shutdown).  A crash can leave a
torn last line: the next start cuts it off and records `audit_tail_truncated`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def line_hash(obj: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in obj.items() if k != "hash"})).hexdigest()


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._lock = threading.Lock()
        self._dirty = False
        self.seq, self.prev = 0, GENESIS
        torn = self._recover()
        if torn:
            self.record("audit_tail_truncated", bytes=torn)
            self.sync()

    def _recover(self) -> int:
        """Continue the chain after the last complete line; cut a torn tail off."""
        size = os.fstat(self._fd).st_size
        if not size:
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1  # 0 if no complete line
        torn = len(data) - end
        if torn:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        if end:
            last = data[data.rfind(b"\n", 0, end - 1) + 1:end]
            obj = json.loads(last)
            self.seq, self.prev = int(obj["seq"]), str(obj["hash"])
        return torn

    def record(self, event: str, **fields: Any) -> None:
        with self._lock:
            obj: dict[str, Any] = {"seq": self.seq + 1, "time": round(time.time(), 3),
                                   "event": event, **fields, "prev": self.prev}
            obj["hash"] = line_hash(obj)
            os.write(self._fd, _canonical(obj) + b"\n")
            self.seq, self.prev = obj["seq"], obj["hash"]
            self._dirty = True

    def sync(self) -> None:
        with self._lock:
            if self._dirty:
                os.fsync(self._fd)
                self._dirty = False

    def close(self) -> None:
        self.sync()
        os.close(self._fd)


@dataclass
class VerifyResult:
    lines: int
    problem: str | None  # None: the whole chain is intact

    @property
    def ok(self) -> bool:
        return self.problem is None


def verify(path: str) -> VerifyResult:
    """Check the chain line by line; the first problem names its line (1-based)."""
    prev, seq, n = GENESIS, 0, 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return VerifyResult(n - 1, f"line {n}: torn (no end of line): the log was "
                                           f"cut off mid-write")
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError
                h, p, s = obj["hash"], obj["prev"], int(obj["seq"])
            except (ValueError, KeyError, TypeError):
                return VerifyResult(n - 1, f"line {n}: not an audit record (edited)")
            if line_hash(obj) != h:
                return VerifyResult(n - 1, f"line {n}: contents edited (hash mismatch)")
            if p != prev or s != seq + 1:
                what = ("deleted" if s > seq + 1 else "reordered or inserted")
                return VerifyResult(n - 1, f"line {n}: chain broken (seq {s} after {seq}): "
                                           f"a line before it was {what}")
            prev, seq = h, s
    return VerifyResult(n, None)
