#!/usr/bin/env python3
"""Trace-driven simulator: replay a multi-turn workload against kvtierd, and report how
often a returning conversation found its KV cache in DRAM.

    scripts/sim_trace.py [--quick] [--json] [--dir DIR] [--sessions N] [--duration S]
                         [--speed X] [--dram-fraction F] [--chunk-bytes B] [--lead S]
                         [--seed N] [--modes none,lru,kvtier] [--trace-out F] [--plot F]
                         [--socket PATH --tenant T --token TOKEN]

The workload (seeded, times in simulated seconds) mixes three kinds of session:

* chat -- a user and an assistant: sessions arrive as a Poisson stream over the first 60%
  of `--duration`; each user has a pace (mean think time, log-uniform in [20, 120] s) and
  every think time is that pace times a lognormal jitter (sigma 0.25); a conversation has
  2-10 turns; the prompt starts with the shared system prompt (2 chunks) plus 4-16
  chunks and grows by 1-3 chunks a turn (the user's message and the previous answer).
* agent -- a tool loop: pace 3-10 s (the tool's latency), 8-24 turns, a private prompt of
  8-24 chunks growing by 1 chunk a turn.
* rag -- retrieval: one of 12 documents (8-32 chunks each, shared by every session that
  retrieves it; popularity Zipf, s = 1.1) plus a 1-chunk question; 1-3 turns, pace
  10-60 s, growing by 1 chunk a turn.

Sessions are chat, agent and rag in the proportion 6 : 2 : 2.  Every chunk is a value of
`--chunk-bytes` (default 56 KiB: a scaled-down 256-token chunk, whose record with its
header fills a quarter of a 244 KiB DRAM segment, as a real 14 MiB chunk of a 7B model
fills a good part of a 16 MiB one; the replay is faster).  The working set is every distinct
chunk the trace stores; the daemon's DRAM tier is `--dram-fraction` of it (default 0.25).
Also reported: the live working set, the most bytes that sessions between their first
and last turn hold at once (the data that can still be read again), and DRAM's share
of it.

Replay (in real time, `--speed` simulated seconds per second): each turn is a request
that an engine queues `--lead` real seconds before it runs; when it runs the client
LOOKUPs the prompt's chained keys naming the session (a turn), GETs the stored prefix,
and PUTs the chunks it prefilled.  Three modes, each on a fresh daemon:

* none   -- no prefetch: DRAM is a cache filled by writes and reads, evicting LRU;
* lru    -- the engine sends a PREFETCH hint of the prompt's keys when it queues the
            request (deadline: the lead); DRAM evicts LRU;
* kvtier -- the same hints, and the daemon's `reuse` policy: eviction and pre-promotion
            by predicted next use (docs/OPERATIONS.md, "DRAM policy");
* kvtier_nohint -- the `reuse` policy with no hints: what it learns on its own.

Figures per mode: the share of returning turns (a session's 2nd turn on) whose every GET
was served from DRAM -- overall and per kind --, the DRAM hit rate of all GETs, the share
of hints answered before their deadline, bytes moved from media to DRAM and read from
media by GETs, and how far the replay fell behind its schedule.  With `--socket` the
trace is replayed once against a running daemon (whatever its policy; mode `external`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from bench_daemon import TOKEN, BenchDaemon
from bench_report import bench_arguments, report
from rich.console import Console
from rich.progress import Progress

from kvtier.client.admin import AdminClient
from kvtier.client.arena import Slot
from kvtier.client.client import Client
from kvtier.client.errors import KvtierError
from kvtier.client.protocol import Completion, Flag, Op, Request, Status, Tier

KiB, MiB = 1 << 10, 1 << 20
KINDS = ("chat", "agent", "rag")
SEGMENTS_PER_DRAM_MIN = 16
HEADER_ZONE = 1 << 20  # a pool's superblocks come before its first segment
RECORDS_PER_SEGMENT = 4


# -- the workload -----------------------------------------------------------------------------


@dataclass
class Turn:
    t: float  # simulated seconds
    session: str
    kind: str
    number: int  # 0 for a session's first turn
    prompt: list[int]  # chunk ids of the prompt (its chained keys, in order)
    new: int  # chunks the turn prefills and stores (the prompt's tail)


@dataclass
class Workload:
    turns: list[Turn]
    chunks: int  # distinct chunks stored
    sessions: dict[str, int] = field(default_factory=dict)  # kind -> sessions

    def peak_live_chunks(self) -> int:
        """The most chunks that sessions between their first and last turn hold at once
        (each counted at its final size: an upper bound of what is live)."""
        first: dict[str, float] = {}
        last: dict[str, Turn] = {}
        for t in self.turns:
            first.setdefault(t.session, t.t)
            last[t.session] = t
        steps = []
        for name, t in last.items():
            if t.number > 0:
                steps += [(first[name], len(t.prompt)), (t.t, -len(t.prompt))]
        cur = peak = 0
        for _, d in sorted(steps):
            cur += d
            peak = max(peak, cur)
        return peak


def make_workload(sessions: int, duration: float, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    next_chunk = 0

    def fresh(n: int) -> list[int]:
        nonlocal next_chunk
        out = list(range(next_chunk, next_chunk + n))
        next_chunk += n
        return out

    system = fresh(2)
    docs = [fresh(int(rng.integers(8, 33))) for _ in range(12)]
    zipf = 1.0 / np.arange(1, len(docs) + 1) ** 1.1
    zipf /= zipf.sum()
    turns: list[Turn] = []
    counts = dict.fromkeys(KINDS, 0)
    arrivals = np.sort(rng.uniform(0, 0.6 * duration, sessions))
    for i, t0 in enumerate(arrivals.tolist()):
        kind = str(rng.choice(KINDS, p=[0.6, 0.2, 0.2]))
        counts[kind] += 1
        name = f"{kind}-{i}"
        if kind == "chat":
            pace = math.exp(rng.uniform(math.log(20), math.log(120)))
            n_turns = int(rng.integers(2, 11))
            prompt = system + fresh(int(rng.integers(4, 17)))
            grow = lambda: int(rng.integers(1, 4))  # noqa: E731
        elif kind == "agent":
            pace = rng.uniform(3, 10)
            n_turns = int(rng.integers(8, 25))
            prompt = fresh(int(rng.integers(8, 25)))
            grow = lambda: 1  # noqa: E731
        else:
            pace = rng.uniform(10, 60)
            n_turns = int(rng.integers(1, 4))
            prompt = list(docs[int(rng.choice(len(docs), p=zipf))]) + fresh(1)
            grow = lambda: 1  # noqa: E731
        t = t0
        stored = 0 if kind != "rag" else len(prompt) - 1  # a doc is stored by its first user
        for n in range(n_turns):
            if t > duration:
                break
            turns.append(Turn(t, name, kind, n, list(prompt), len(prompt) - stored))
            stored = len(prompt)
            prompt = prompt + fresh(grow())
            t += pace * float(rng.lognormal(0.0, 0.25))
    turns.sort(key=lambda x: x.t)
    return Workload(turns, next_chunk, counts)


def chunk_key(c: int) -> bytes:
    return c.to_bytes(8, "little") + b"kvtiersim"[:8]


# -- the replay -------------------------------------------------------------------------------


@dataclass
class ModeResult:
    returning_turns: int = 0
    returning_from_dram: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0] for k in KINDS})
    gets: int = 0
    gets_dram: int = 0
    hints: int = 0
    hints_met: int = 0
    lag_max_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)


class Replayer:
    def __init__(self, c: Client, chunk_bytes: int, lead: float, hints: bool) -> None:
        self.c = c
        self.chunk = chunk_bytes
        self.lead = lead
        self.hints = hints
        self.value = np.full(chunk_bytes, 7, np.uint8)
        self.pending: list[tuple[Future[Completion], Slot]] = []
        self.r = ModeResult()
        self.stored: set[int] = set()  # the rag docs: stored by their first user only

    def hint(self, turn: Turn) -> None:
        keys = [chunk_key(x) for x in turn.prompt[:len(turn.prompt) - turn.new]]
        if not keys:
            return
        slot = self.c.allocator.alloc(len(keys) * 16)
        slot.view[:len(keys) * 16] = b"".join(keys)
        fut = self.c.submit(Request(Op.PREFETCH, 0, flags=Flag.KEYLIST, key=bytes(16),
                                    count=len(keys), data_off=slot.offset,
                                    data_len=len(keys) * 16,
                                    ttl=max(1, int(self.lead * 1000))))
        self.pending.append((fut, slot))
        self.r.hints += 1

    def reap(self, wait: bool = False) -> None:
        keep = []
        for fut, slot in self.pending:
            if wait or fut.done():
                comp = fut.result(timeout=60)
                self.r.hints_met += comp.status == Status.OK
                self.c.allocator.free(slot)
            else:
                keep.append((fut, slot))
        self.pending = keep

    def run(self, turn: Turn) -> None:
        c = self.c
        keys = [chunk_key(x) for x in turn.prompt]
        hit, _ = c.lookup(keys, session=turn.session)
        tiers = self.get_all(keys[:hit])
        if turn.number > 0 and hit:
            self.r.returning_turns += 1
            all_dram = all(t == Tier.DRAM for t in tiers)
            self.r.returning_from_dram += all_dram
            self.r.by_kind[turn.kind][0] += 1
            self.r.by_kind[turn.kind][1] += all_dram
        for x, key in zip(turn.prompt[hit:], keys[hit:], strict=True):
            c.put(turn.session, key, [self.value])
            self.stored.add(x)

    def get_all(self, keys: list[bytes], depth: int = 16) -> list[int]:
        """GET every key, `depth` at a time; the tier each was served from."""
        c, cap = self.c, self.chunk
        tiers: list[int] = []
        for lo in range(0, len(keys), depth):
            batch = keys[lo:lo + depth]
            slots = [c.allocator.alloc(cap + 64) for _ in batch]
            try:
                futs = [c.submit(c.get_request(k, s, cap, None, 4))
                        for k, s in zip(batch, slots, strict=True)]
                for f in futs:
                    comp = f.result(timeout=60)
                    if comp.status != Status.OK:
                        raise RuntimeError(f"GET failed: {Status(comp.status).name}")
                    tiers.append(comp.flags)
            finally:
                for s in slots:
                    c.allocator.free(s)
        self.r.gets += len(tiers)
        self.r.gets_dram += sum(t == Tier.DRAM for t in tiers)
        return tiers


def replay(w: Workload, socket: str, tenant: str, token: str, *, speed: float, lead: float,
           chunk_bytes: int, hints: bool, progress: Callable[[int], None]) -> ModeResult:
    events: list[tuple[float, int, str, Turn]] = []
    for i, t in enumerate(w.turns):
        r = t.t / speed
        if hints:
            events.append((r, i, "hint", t))
        events.append((r + lead, i, "run", t))
    events.sort(key=lambda e: (e[0], e[2] == "run", e[1]))
    with Client.connect(socket, tenant, token, arena_size=64 * MiB) as c:
        rp = Replayer(c, chunk_bytes, lead, hints)
        t0 = time.monotonic()
        for at, _, what, turn in events:
            now = time.monotonic() - t0
            if at > now:
                time.sleep(at - now)
            else:
                rp.r.lag_max_s = max(rp.r.lag_max_s, now - at)
            if what == "hint":
                rp.hint(turn)
            else:
                rp.run(turn)
                progress(1)
            rp.reap()
        rp.reap(wait=True)
    # Daemon-wide figures (promotions, prefetch, the policy's plans) are the admin's: a
    # client's STATS describes its own tenant only.
    try:
        with AdminClient(socket) as a:
            rp.r.stats = a.call("status")
    except KvtierError:
        rp.r.stats = {}
    return rp.r


# -- driving it -------------------------------------------------------------------------------


def segment_for(chunk_bytes: int) -> int:
    """A DRAM segment that holds exactly RECORDS_PER_SEGMENT values (each with its header
    block) after the segment's own header block."""
    block = 4096
    record = -(-chunk_bytes // block) * block + block
    return RECORDS_PER_SEGMENT * record + block


MODES = {"none": ("lru", False), "lru": ("lru", True), "kvtier": ("reuse", True),
         "kvtier_nohint": ("reuse", False)}


def figures(w: Workload, results: dict[str, ModeResult], chunk_bytes: int,
            dram: int | None, args: Any) -> dict[str, Any]:
    ret = sum(1 for t in w.turns if t.number > 0)
    fig: dict[str, Any] = {
        "sessions": len({t.session for t in w.turns}), "turns": len(w.turns),
        "returning_turns": ret, "sessions_by_kind": w.sessions,
        "chunk_bytes": chunk_bytes, "working_set_bytes": w.chunks * chunk_bytes,
        "live_working_set_bytes": w.peak_live_chunks() * chunk_bytes,
        "dram_bytes": dram, "dram_fraction": (dram / (w.chunks * chunk_bytes)) if dram else None,
        "dram_fraction_of_live": (dram / (w.peak_live_chunks() * chunk_bytes)) if dram else None,
        "speed": args.speed, "lead_s": args.lead, "seed": args.seed,
    }
    for m, r in results.items():
        st = r.stats
        promoted = st.get("prefetch", {}).get("bytes", 0) + \
            st.get("tiers", {}).get("promotions", 0) * chunk_bytes
        fig[f"{m}_returning_turns_from_dram"] = round(
            r.returning_from_dram / max(r.returning_turns, 1), 4)
        for k in KINDS:
            n, d = r.by_kind[k]
            fig[f"{m}_{k}_returning_from_dram"] = round(d / n, 4) if n else None
        fig[f"{m}_get_dram_hit_rate"] = round(r.gets_dram / max(r.gets, 1), 4)
        fig[f"{m}_hint_deadline_hit_rate"] = round(r.hints_met / r.hints, 4) if r.hints else None
        fig[f"{m}_bytes_promoted"] = promoted
        fig[f"{m}_bytes_read_from_media"] = (r.gets - r.gets_dram) * chunk_bytes
        fig[f"{m}_planned_sessions"] = st.get("policy", {}).get("planned_sessions", 0)
        fig[f"{m}_replay_lag_max_s"] = round(r.lag_max_s, 3)
    if "kvtier" in results and "lru" in results:
        base = max(fig["lru_returning_turns_from_dram"], 1e-9)
        fig["kvtier_vs_lru_returning_from_dram"] = round(
            fig["kvtier_returning_turns_from_dram"] / base, 3)
    if "kvtier" in results and "none" in results:
        base = max(fig["none_returning_turns_from_dram"], 1e-9)
        fig["kvtier_vs_none_returning_from_dram"] = round(
            fig["kvtier_returning_turns_from_dram"] / base, 3)
    if "kvtier" in results:
        # the goal: >= 90% from DRAM when DRAM holds 25% of the working set
        fig["goal_met"] = bool(fig["kvtier_returning_turns_from_dram"] >= 0.9
                               and (fig["dram_fraction"] or 1) <= 0.27)
    return fig


def plot(fig: dict[str, Any], modes: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["all", *KINDS]
    x = np.arange(len(groups))
    width = 0.8 / len(modes)
    f, ax = plt.subplots(figsize=(7, 4))
    for i, m in enumerate(modes):
        vals = [fig[f"{m}_returning_turns_from_dram"]] + \
            [fig[f"{m}_{k}_returning_from_dram"] or 0 for k in KINDS]
        bars = ax.bar(x + (i - (len(modes) - 1) / 2) * width, vals, width, label=m)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in vals], fontsize=7)
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("returning turns served from DRAM")
    frac = fig.get("dram_fraction")
    ax.set_title(f"kvtier sim: {fig['sessions']} sessions, DRAM = "
                 f"{frac:.0%} of the working set" if frac else "kvtier sim")
    ax.legend()
    f.tight_layout()
    f.savefig(path, dpi=120)
    plt.close(f)


def main() -> int:
    ap = bench_arguments(__doc__)
    ap.add_argument("--sessions", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None, help="simulated seconds")
    ap.add_argument("--speed", type=float, default=None,
                    help="simulated seconds per real second")
    ap.add_argument("--dram-fraction", type=float, default=0.25)
    ap.add_argument("--chunk-bytes", type=int, default=56 * KiB)
    ap.add_argument("--lead", type=float, default=0.05,
                    help="real seconds between queueing a request (the hint) and running it")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="none,lru,kvtier,kvtier_nohint")
    ap.add_argument("--trace-out", default=None, help="write the generated trace (JSON)")
    ap.add_argument("--plot", default=None, help="PNG of the hit rates per mode and kind")
    ap.add_argument("--socket", default=None, help="replay against this running daemon")
    ap.add_argument("--tenant", default="bench")
    ap.add_argument("--token", default=TOKEN)
    args = ap.parse_args()
    args.sessions = args.sessions or (36 if args.quick else 240)
    args.duration = args.duration or (200.0 if args.quick else 1500.0)
    args.speed = args.speed or 20.0
    if not 0 < args.dram_fraction <= 4 or args.chunk_bytes < 4096 or args.speed <= 0:
        ap.error("--dram-fraction must be in (0, 4], --chunk-bytes >= 4096, --speed > 0")
    modes = ["external"] if args.socket else args.modes.split(",")
    for m in modes:
        if m not in MODES and m != "external":
            ap.error(f"unknown mode {m!r} (known: {', '.join(MODES)})")
    console = Console(stderr=args.json)
    w = make_workload(args.sessions, args.duration, args.seed)
    if args.trace_out:
        with open(args.trace_out, "w") as f:
            json.dump([asdict(t) for t in w.turns], f)
    results: dict[str, ModeResult] = {}
    dram: int | None = None
    with Progress(console=console, transient=True) as prog:
        if args.socket:
            task = prog.add_task("replay (external)", total=len(w.turns))
            results["external"] = replay(w, args.socket, args.tenant, args.token,
                                         speed=args.speed, lead=args.lead,
                                         chunk_bytes=args.chunk_bytes, hints=True,
                                         progress=lambda n: prog.advance(task, n))
            with AdminClient(args.socket) as a:
                dram = int(a.call("status")["dram_by_tenant"][args.tenant]["capacity_bytes"])
        else:
            seg = segment_for(args.chunk_bytes)
            want = int(args.dram_fraction * w.chunks * args.chunk_bytes)
            dram_config = max(SEGMENTS_PER_DRAM_MIN, -(-want // seg) + 1) * seg + HEADER_ZONE
            pool = -(-3 * w.chunks * args.chunk_bytes // (4 * MiB)) * 4 * MiB + 64 * MiB
            work = tempfile.mkdtemp(prefix="kvtier-sim-", dir=args.dir)
            try:
                for m in modes:
                    policy, hints = MODES[m]
                    sub = os.path.join(work, m)
                    os.makedirs(sub)
                    d = BenchDaemon(sub, dram=dram_config, pool=pool, segment=seg,
                                    extra=f'\n[policy]\nname = "{policy}"\n')
                    d.start()
                    try:
                        task = prog.add_task(f"replay ({m})", total=len(w.turns))
                        results[m] = replay(w, d.sock, "bench", TOKEN, speed=args.speed,
                                            lead=args.lead, chunk_bytes=args.chunk_bytes,
                                            hints=hints,
                                            progress=lambda n, t=task: prog.advance(t, n))
                        with AdminClient(d.sock) as a:
                            dram = int(a.call("status")["dram"]["capacity_bytes"])
                    finally:
                        d.stop()
                    # Each mode's pool is fallocated: drop it before the next mode's.
                    shutil.rmtree(sub, ignore_errors=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    fig = figures(w, results, args.chunk_bytes, dram, args)
    if args.plot:
        plot(fig, modes, args.plot)
    report(console, "kvtier trace simulator", fig, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
