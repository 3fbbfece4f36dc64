"""Prometheus metrics for kvtierd, served over HTTP on a localhost port.

One `CollectorRegistry` per service (no global state).  Request metrics are recorded as
requests complete; tier occupancy, hit counts and the write-behind backlog are read from
the store at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvtier.daemon.tiers import TieredStore

_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _StoreCollector(Collector):
    def __init__(self, store: TieredStore, clients: Callable[[], int],
                 io_queued: Callable[[], dict[str, int]] | None,
                 throttled: Callable[[], dict[str, float]] | None,
                 audit: Callable[[], dict[str, Any]] | None) -> None:
        self.store = store
        self.audit = audit
        self.clients = clients
        self.io_queued = io_queued
        self.throttled = throttled

    def collect(self) -> Iterator[Any]:
        st = self.store.stats()
        occ = GaugeMetricFamily("kvtier_tier_live_bytes", "Live bytes per tier", labels=["tier"])
        cap = GaugeMetricFamily("kvtier_tier_capacity_bytes", "Capacity per tier",
                                labels=["tier"])
        ent = GaugeMetricFamily("kvtier_tier_entries", "Stored values per tier", labels=["tier"])
        for tier in ("dram", "media"):
            occ.add_metric([tier], st[tier]["live_bytes"])
            cap.add_metric([tier], st[tier]["capacity_bytes"])
            ent.add_metric([tier], st[tier]["entries"])
        yield occ
        yield cap
        yield ent
        t = st["tiers"]
        hits = CounterMetricFamily("kvtier_get_hits", "GETs by the tier that served them",
                                   labels=["tier"])
        hits.add_metric(["dram"], t["dram_hits"])
        hits.add_metric(["media"], t["pool_hits"])
        hits.add_metric(["miss"], t["misses"])
        yield hits
        yield GaugeMetricFamily("kvtier_writebehind_backlog",
                                "Values acknowledged in DRAM, not yet on media",
                                value=t["writebehind_backlog"])
        yield CounterMetricFamily("kvtier_writebehind_flushed", "Values written behind",
                                  value=t["writebehind_flushed"])
        yield CounterMetricFamily("kvtier_promotions", "Values promoted to DRAM",
                                  value=t["promotions"])
        wa = GaugeMetricFamily("kvtier_write_amplification", "Media pool write amplification")
        wa.add_metric([], st["media"]["write_amplification"])
        yield wa
        yield GaugeMetricFamily("kvtier_clients", "Connected clients", value=self.clients())
        if self.io_queued is not None:
            q = GaugeMetricFamily("kvtier_io_queue_depth", "Requests waiting for an I/O thread",
                                  labels=["io_class"])
            for cls, n in self.io_queued().items():
                q.add_metric([cls], n)
            yield q
        if self.throttled is not None:
            th = CounterMetricFamily("kvtier_throttled_seconds",
                                     "Time requests waited on their tenant's rate limits",
                                     labels=["tenant"])
            for tenant, secs in self.throttled().items():
                th.add_metric([tenant], secs)
            yield th
        dev = st["media_device"]
        labels = ["pool", "kind"]
        lv = [dev["name"], dev["kind"]]
        up = GaugeMetricFamily("kvtier_pool_up", "1 while the media pool's device is attached",
                               labels=labels)
        up.add_metric(lv, 1.0 if dev["state"] == "live" else 0.0)
        yield up
        for name, key, doc in (
                ("kvtier_pool_reconnects", "reconnects", "Reconnections to the pool's target"),
                ("kvtier_pool_io_errors", "errors", "Failed commands on the pool's device"),
                ("kvtier_pool_io_timeouts", "timeouts", "Commands past their timeout")):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(lv, dev.get(key, 0))
            yield c
        if self.audit is not None:
            a = self.audit()
            yield GaugeMetricFamily("kvtier_audit_degraded",
                                    "1 while the audit log cannot be written",
                                    value=1.0 if a["degraded"] else 0.0)
            yield CounterMetricFamily("kvtier_audit_records_lost",
                                      "Audit records that could not be written",
                                      value=a["lost_total"])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ops = Counter("kvtier_ops", "Requests by op and status", ["op", "status"],
                           registry=r)
        self.bytes = Counter("kvtier_bytes", "Payload bytes by op", ["op"], registry=r)
        self.latency = Histogram("kvtier_op_latency_seconds", "Request latency by op and tier",
                                 ["op", "tier"], buckets=_BUCKETS, registry=r)
        self.connects = Counter("kvtier_connects", "Client connections accepted", registry=r)
        self.drops = Counter("kvtier_client_drops", "Clients dropped for protocol abuse",
                             registry=r)
        self.auth_failures = Counter("kvtier_auth_failures", "Refused HELLOs", registry=r)
        self.hello_refused = Counter("kvtier_hello_refused",
                                     "Connections refused before HELLO: too many waiting for it",
                                     registry=r)
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self.io_wait = Histogram("kvtier_io_wait_seconds",
                                 "Time a request queued for an I/O thread, by class and tenant",
                                 ["io_class", "tenant"], buckets=_BUCKETS, registry=r)
        self._io_children: dict[tuple[str, str], Any] = {}

    def observe_io(self, io_class: str, tenant: str, seconds: float) -> None:
        h = self._io_children.get((io_class, tenant))
        if h is None:
            h = self._io_children[(io_class, tenant)] = self.io_wait.labels(io_class, tenant)
        h.observe(seconds)

    def bind(self, store: TieredStore, clients: Callable[[], int],
             io_queued: Callable[[], dict[str, int]] | None = None,
             throttled: Callable[[], dict[str, float]] | None = None,
             audit: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry.register(_StoreCollector(store, clients, io_queued, throttled, audit))

    def record(self, op: str, status: str, tier: str, nbytes: int, seconds: float) -> None:
        children = self._children.get((op, status, tier))
        if children is None:  # labels() costs microseconds: resolve each label set once
            children = (self.ops.labels(op, status), self.bytes.labels(op),
                        self.latency.labels(op, tier))
            self._children[(op, status, tier)] = children
        ops, nb, lat = children
        ops.inc()
        if nbytes:
            nb.inc(nbytes)
        lat.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(metrics: Metrics, address: str, port: int, *,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A minimal HTTP/1.0 endpoint: any GET returns the Prometheus text format."""
    listeners = await trio.open_tcp_listeners(port, host=address)
    bound = listeners[0].socket.getsockname()[1]
    task_status.started(bound)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                req = b""
                while b"\r\n\r\n" not in req and len(req) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    req += chunk
                if not req.startswith(b"GET "):
                    await stream.send_all(b"HTTP/1.0 405 Method Not Allowed\r\n\r\n")
                    return
                body = await trio.to_thread.run_sync(metrics.render)
                head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                await stream.send_all(head + body)

    await trio.serve_listeners(handle, listeners)
