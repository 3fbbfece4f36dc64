"""The audit log: append-only, hash-chained JSON lines.

Each line is one JSON object with `seq` (1, 2, ...), `time` (unix seconds), `event`, the
event's fields, `prev` (the previous line's hash; 64 zeros for the first) and `hash`:
the SHA-256 of the line's canonical JSON (sorted keys, no spaces) without `hash`.  An
edited line no longer matches its hash; a deleted, inserted or reordered line breaks
`prev` and `seq`.  `verify` finds the first line where either happens.

Lines are written (one `write` each, O_APPEND) as events happen and fsynced in batches
(`sync`, called by the daemon about once a second and at shutdown).  A crash can leave a
torn last line: the next start cuts it off and records `audit_tail_truncated`.

A log that cannot grow (disk full, quota, I/O error) is a state, not a crash: `record`
never raises.  A failed or short write is cut back to the last complete line, the log is
`degraded` (with the error) and each lost record is counted by event; the daemon refuses
what it must not do unaudited (`Service`: connects and admin changes) while degraded.  The
next record that fits is preceded by an `audit_gap` line saying how many records of which
events were lost and when, so the chain stays intact and the gap is on the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
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
        self._size = os.fstat(self._fd).st_size  # of the complete lines written
        self.degraded = ""  # why records are being lost now ("" while writable)
        self.degraded_since = 0.0
        self.lost: dict[str, int] = {}  # records lost (by event) since degraded
        self.lost_total = 0  # ... and since the daemon started
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

    def record(self, event: str, **fields: Any) -> bool:
        """Append one record; False if it could not be written (the log is `degraded`)."""
        with self._lock:
            if not self._close_gap():
                self._lose(event)
                return False
            if not self._append(event, fields):
                self._lose(event)
                return False
            return True

    def retry(self) -> bool:
        """While degraded: write the `audit_gap` record if it fits now; True if the log is
        writable (again)."""
        with self._lock:
            return self._close_gap()

    def _close_gap(self) -> bool:
        """(locked) While degraded, write the `audit_gap` record and leave the degraded
        state if it fits; True if the log is writable."""
        if not self.degraded:
            return True
        if not self._append("audit_gap", {"lost": dict(self.lost),
                                          "since": round(self.degraded_since, 3),
                                          "error": self.degraded}):
            return False
        self.degraded, self.lost = "", {}
        return True

    def _append(self, event: str, fields: dict[str, Any]) -> bool:
        obj: dict[str, Any] = {"seq": self.seq + 1, "time": round(time.time(), 3),
                               "event": event, **fields, "prev": self.prev}
        obj["hash"] = line_hash(obj)
        line = _canonical(obj) + b"\n"
        try:
            n = os.write(self._fd, line)
            if n != len(line):
                raise OSError(28, f"short write ({n} of {len(line)} bytes)")
        except OSError as e:
            self._cut_back(e)
            return False
        self._size += len(line)
        self.seq, self.prev = obj["seq"], obj["hash"]
        self._dirty = True
        return True

    def _cut_back(self, e: OSError) -> None:
        """A write failed or was short: cut the file back to its last complete line (so no
        torn line is left) and remember why."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            pass  # the next start cuts a torn tail off
        if not self.degraded:
            self.degraded = e.strerror or str(e)
            self.degraded_since = time.time()

    def _lose(self, event: str) -> None:
        self.lost[event] = self.lost.get(event, 0) + 1
        self.lost_total += 1

    def sync(self) -> bool:
        """fsync what was written; False (and degraded) if the fsync failed."""
        with self._lock:
            if not self._dirty:
                return True
            try:
                os.fsync(self._fd)
            except OSError as e:
                if not self.degraded:
                    self.degraded = f"fsync: {e.strerror or e}"
                    self.degraded_since = time.time()
                return False
            self._dirty = False
            return True

    def close(self) -> None:
        self.sync()
        try:
            os.close(self._fd)
        except OSError:
            pass

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {"path": self.path, "records": self.seq, "degraded": bool(self.degraded),
                    "error": self.degraded, "since": self.degraded_since or None,
                    "lost": dict(self.lost), "lost_total": self.lost_total}


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


class AttemptRecorder:
    """Cross-tenant attempts on the audit log, rate-limited per tenant: at most `per_s`
    `cross_tenant_attempt` lines (one per request and owner, with the keys) a second for
    each tenant; past that, attempts are summed per owner and op and written as one
    `cross_tenant_attempts` line per tenant and second (`flush`).  One tenant asking for
    others' keys as fast as it can grows the log by a bounded rate, not by its request
    rate.  Thread-safe: called from worker threads."""

    def __init__(self, log: AuditLog, per_s: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self._per_s = per_s
        self._clock = clock
        self._lock = threading.Lock()
        self._window: dict[str, tuple[int, int]] = {}  # tenant -> (second, lines written)
        self._summed: dict[str, dict[tuple[str, str], list[int]]] = {}  # -> (owner, op) ->
        # [requests, keys]

    def attempt(self, tenant: str, owner: str, op: str, keys: list[str],
                **who: Any) -> None:
        now = int(self._clock())
        with self._lock:
            second, lines = self._window.get(tenant, (now, 0))
            if second != now:
                self._flush_tenant(tenant)
                second, lines = now, 0
            if lines < self._per_s:
                self._window[tenant] = (second, lines + 1)
                full = True
            else:
                s = self._summed.setdefault(tenant, {}).setdefault((owner, op), [0, 0])
                s[0] += 1
                s[1] += len(keys)
                full = False
        if full:
            self._log.record("cross_tenant_attempt", tenant=tenant, op=op, owner=owner,
                             keys=keys, **who)

    def flush(self, *, final: bool = False) -> None:
        """Write the sums of the seconds gone by (the daemon calls this every second), or
        of all of them (`final`: at shutdown)."""
        now = int(self._clock())
        with self._lock:
            for tenant in [t for t, (sec, _) in self._window.items() if final or sec != now]:
                self._flush_tenant(tenant)
                del self._window[tenant]

    def _flush_tenant(self, tenant: str) -> None:
        summed = self._summed.pop(tenant, None)
        if summed:
            self._log.record("cross_tenant_attempts", tenant=tenant, window_s=1,
                             by_owner=[{"owner": o, "op": op, "requests": n, "keys": k}
                                       for (o, op), (n, k) in sorted(summed.items())])
