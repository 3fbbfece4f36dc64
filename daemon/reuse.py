"""Reuse statistics: when will a session, or a shared prefix, be read again?

The daemon sees every turn of a conversation as a LOOKUP of its prompt's chained keys
(the engine looks the prompt up before it prefills).  From those it keeps, per tenant:

* per session: the time of its last turn, how many turns it had, and the inter-arrival
  time of its turns (an exponentially weighted mean, `EWMA_ALPHA`), the keys of its last
  turn plus those it has written since (what its next turn will read), and their bytes;
* per chunk key, for keys looked up by more than one session (shared system prompts,
  RAG documents): the last time any session used it, the mean time between uses, and
  how many distinct sessions used it;
* per tenant: the median turn interval of its sessions, the prior for a session that
  has had only one turn;
* per key named by a prefetch hint: its deadline -- the engine has queued the request
  that reads it, the surest prediction there is.

`next_use` turns these into a predicted time of next use:

    expected = last_turn + interval
    next     = expected                      if expected >= now
               now + 2 * (now - expected)    if the session is late (it recedes: a late
                                             session is predicted ever further away)

With no interval at all (no session of the tenant has had two turns yet) the prediction
is recency, `now + 2 * (now - last_turn)`.  A session never seen (say, after a restart)
has no prediction (`None`): the policy falls back on the values' access times.

Keys named by a prefetch hint are expected at its deadline, and the keys a turn looks up
are expected at once (the turn reads them next); either expectation holds until the key
is read, or at most `grace_s` after its time, and wins over the session's prediction.

Bounded memory: at most `max_sessions` sessions and `max_keys` keys are tracked; the least
recently used are forgotten first.  Thread-safe (one lock): the session tasks feed it and
the DRAM pools' eviction reads it from worker threads.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

EWMA_ALPHA = 0.5
SAME_TURN_S = 0.05  # lookups of one session closer than this are one turn


@dataclass
class SessionStats:
    first: float
    last_turn: float
    turns: int = 1
    interval: float | None = None  # mean time between turns
    keys: dict[bytes, None] = field(default_factory=dict)  # last turn's keys + puts since
    nbytes: int = 0  # bytes of the values under `keys` (as seen by puts and gets)


@dataclass
class KeyStats:
    last: float
    last_session: str
    sessions: int = 1  # distinct sessions seen in a row (A, B, A counts 3)
    interval: float | None = None


def _ewma(mean: float | None, sample: float) -> float:
    return sample if mean is None else (1 - EWMA_ALPHA) * mean + EWMA_ALPHA * sample


def predict(now: float, last: float, interval: float | None) -> float:
    """The formula in the module docstring."""
    if interval is None:
        return now + 2 * (now - last)
    expected = last + interval
    return expected if expected >= now else now + 2 * (now - expected)


class ReuseStats:
    def __init__(self, *, clock: Callable[[], float] = time.time, max_sessions: int = 100_000,
                 max_keys: int = 200_000, max_keys_per_session: int = 65_536,
                 grace_s: float = 5.0) -> None:
        self.clock = clock
        self.max_sessions = max_sessions
        self.max_keys = max_keys
        self.max_keys_per_session = max_keys_per_session
        self.grace_s = grace_s
        self._mu = threading.Lock()
        self._sessions: dict[tuple[str, str], SessionStats] = {}
        self._keys: dict[tuple[str, bytes], KeyStats] = {}
        self._shared: dict[tuple[str, bytes], KeyStats] = {}  # those with sessions > 1
        self._expected: dict[tuple[str, bytes], float] = {}  # hinted keys -> when due
        self._prior: dict[str, float] = {}
        self._prior_at = -1e18
        self._value_bytes: dict[str, tuple[int, int]] = {}  # tenant -> (puts, bytes)
        self.turns = 0
        self.returns = 0  # turns of sessions seen before

    # -- feeding -----------------------------------------------------------------------

    def turn(self, tenant: str, session: str, keys: Sequence[bytes],
             stored: int | None = None) -> None:
        """A session starts a turn whose prompt's chained keys are `keys`; it reads the
        first `stored` (all if None) and will write the rest."""
        now = self.clock()
        with self._mu:
            s = self._sessions.pop((tenant, session), None)
            if s is None:
                s = SessionStats(first=now, last_turn=now)
                self.turns += 1
            elif now - s.last_turn >= SAME_TURN_S:
                s.interval = _ewma(s.interval, now - s.last_turn)
                s.turns += 1
                s.last_turn = now
                self.turns += 1
                self.returns += 1
                if s.turns == 2:
                    self._prior_at = -1e18  # a first interval: the tenant's median moves
            avg = s.nbytes / len(s.keys) if s.keys and s.nbytes else self._mean_value(tenant)
            s.keys = dict.fromkeys(bytes(k) for k in keys[:self.max_keys_per_session])
            s.nbytes = int(avg * len(s.keys))
            self._keep_session(tenant, session, s)  # most recent last
            self._prune_expected()
            for i, k in enumerate(keys):
                self._use_key(tenant, session, bytes(k), now)
                if stored is None or i < stored:
                    self._expected[(tenant, bytes(k))] = now

    def _use_key(self, tenant: str, session: str, key: bytes, now: float) -> None:
        ks = self._keys.pop((tenant, key), None)
        if ks is None:
            ks = KeyStats(now, session)
        elif ks.last_session != session:
            ks.interval = _ewma(ks.interval, now - ks.last)
            ks.sessions += 1
            ks.last, ks.last_session = now, session
            self._shared[(tenant, key)] = ks
        else:
            ks.last = now
        self._keys[(tenant, key)] = ks
        if len(self._keys) > self.max_keys:
            old = next(iter(self._keys))
            del self._keys[old]
            self._shared.pop(old, None)

    def put(self, tenant: str, session: str, key: bytes, nbytes: int) -> None:
        """A session wrote a value: its next turn will read it (not this one: whatever
        expected the key to be read now -- a hint named a key not yet stored -- is over)."""
        with self._mu:
            self._expected.pop((tenant, bytes(key)), None)
            s = self._sessions.get((tenant, session))
            if s is None:
                now = self.clock()
                s = SessionStats(first=now, last_turn=now)
                self._keep_session(tenant, session, s)
            if len(s.keys) < self.max_keys_per_session and bytes(key) not in s.keys:
                s.keys[bytes(key)] = None
                s.nbytes += nbytes
            n, b = self._value_bytes.get(tenant, (0, 0))
            self._value_bytes[tenant] = (n + 1, b + nbytes)

    def _keep_session(self, tenant: str, session: str, s: SessionStats) -> None:
        """Track `s` as the most recently used session, forgetting the least recently
        used beyond `max_sessions`."""
        self._sessions[(tenant, session)] = s
        if len(self._sessions) > self.max_sessions:
            del self._sessions[next(iter(self._sessions))]

    def _mean_value(self, tenant: str) -> float:
        n, b = self._value_bytes.get(tenant, (0, 0))
        return b / n if n else 0.0

    def expect(self, tenant: str, keys: Sequence[bytes], at: float) -> None:
        """A prefetch hint: `keys` will be read by `at` (wall clock).  Until then (and for
        `grace_s` after) they are predicted for `at`, whatever their session's record."""
        with self._mu:
            self._prune_expected()
            for k in keys[:self.max_keys]:
                self._expected[(tenant, bytes(k))] = at

    def read(self, tenant: str, keys: Sequence[bytes]) -> None:
        """`keys` were read (GET, MAP): the expectation a hint or a turn set is met."""
        with self._mu:
            for k in keys:
                self._expected.pop((tenant, bytes(k)), None)

    def _prune_expected(self) -> None:
        if len(self._expected) > self.max_keys:
            self._drop_expired(self.clock())

    def _drop_expired(self, now: float) -> None:
        """Forget expectations more than `grace_s` past their time."""
        self._expected = {k: t for k, t in self._expected.items() if t >= now - self.grace_s}

    def forget(self, tenant: str, session: str | None = None) -> None:
        """A purge: drop a session's statistics (or every session of a tenant)."""
        with self._mu:
            for sk in [sk for sk in self._sessions
                       if sk[0] == tenant and (session is None or sk[1] == session)]:
                del self._sessions[sk]
            if session is None:
                for kk in [kk for kk in self._keys if kk[0] == tenant]:
                    del self._keys[kk]
                    self._shared.pop(kk, None)
                for kk in [kk for kk in self._expected if kk[0] == tenant]:
                    del self._expected[kk]

    # -- predictions ----------------------------------------------------------------------

    def prior(self, tenant: str) -> float | None:
        """The tenant's median turn interval (None until some session has had two turns)."""
        now = self.clock()
        with self._mu:
            if now - self._prior_at > 1.0:
                by: dict[str, list[float]] = {}
                for (t, _), s in self._sessions.items():
                    if s.interval is not None:
                        by.setdefault(t, []).append(s.interval)
                self._prior = {t: statistics.median(v) for t, v in by.items()}
                self._prior_at = now
            return self._prior.get(tenant)

    def next_use(self, tenant: str, session: str, now: float | None = None) -> float | None:
        """Predicted time of the session's next turn (None: never seen)."""
        now = self.clock() if now is None else now
        prior = self.prior(tenant)
        with self._mu:
            s = self._sessions.get((tenant, session))
            if s is None:
                return None
            interval = s.interval if s.interval is not None else prior
            return predict(now, s.last_turn, interval)

    def key_predictions(self, tenant: str, now: float | None = None
                        ) -> tuple[list[bytes], list[float]]:
        """Keys with a prediction of their own -- used by more than one session, or named
        by a prefetch hint --, and the predicted time of each's next use."""
        now = self.clock() if now is None else now
        out: dict[bytes, float] = {}
        with self._mu:
            for (t, k), ks in self._shared.items():
                if t == tenant:
                    out[k] = predict(now, ks.last, ks.interval)
            self._drop_expired(now)
            for (t, k), at in self._expected.items():
                if t == tenant:
                    out[k] = min(out.get(k, at), max(at, now))
        return list(out), list(out.values())

    def sessions(self, tenant: str | None = None) -> list[tuple[str, str, SessionStats]]:
        with self._mu:
            return [(t, s, st) for (t, s), st in self._sessions.items()
                    if tenant is None or t == tenant]

    def describe(self) -> dict[str, object]:
        with self._mu:
            shared = len(self._shared)
            learned = sum(1 for s in self._sessions.values() if s.interval is not None)
            return {"sessions": len(self._sessions), "sessions_with_interval": learned,
                    "keys": len(self._keys), "shared_keys": shared,
                    "expected_keys": len(self._expected), "turns": self.turns,
                    "returning_turns": self.returns}
