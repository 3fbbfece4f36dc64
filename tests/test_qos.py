"""Per-tenant limits through a real daemon: token buckets hold their rate, quotas refuse
puts clearly and never cost another tenant its data, and both change live."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.errors import NoSpaceError

MiB = 1 << 20
KVTIER = str(Path(sys.executable).parent / "kvtier")


def k(tag: str, i: int) -> bytes:
    return hashlib.sha256(f"{tag}{i}".encode()).digest()[:16]


def connect(d: Daemon, tenant: str) -> Client:
    return Client.connect(d.socket, tenant, TOKENS[tenant], arena_size=16 << 20)


def test_bandwidth_and_iops_limits_hold_within_10_percent(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {"bandwidth": "8M"}, "bob": {"iops": 100}}).start()
    try:
        with connect(d, "alice") as a:
            a.put("s", k("a", 0), [np.ones(MiB, np.uint8)])
            n, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 5.0:
                n += len(a.get(k("a", 0)))
            rate = n / (time.monotonic() - t0)
        assert abs(rate / (8 * MiB) - 1) < 0.10, rate / MiB
        with connect(d, "bob") as b:
            b.put("s", k("b", 0), [b"x" * 4096])
            ops, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 3.0:
                b.get(k("b", 0))
                ops += 1
            iops = ops / (time.monotonic() - t0)
        assert abs(iops / 100 - 1) < 0.10, iops
        qos = d.admin("status")["qos"]
        assert qos["alice"]["throttled_s"] > 3 and qos["bob"]["throttled_s"] > 1
    finally:
        d.stop()


def test_a_quota_refuses_puts_and_never_costs_another_tenant_its_data(tmp_path: Path) -> None:
    d = Daemon(tmp_path, pool_size="96M", segment_size="4M",
               tenants={"alice": {}, "bob": {"quota": "16M"}}).start()
    try:
        alice = {i: np.full(MiB, i, np.uint8) for i in range(20)}
        with connect(d, "alice") as a:
            for i, v in alice.items():
                a.put("s", k("a", i), [v])
        accepted = 0
        with connect(d, "bob") as b, pytest.raises(NoSpaceError):
            for i in range(100):
                b.put("s", k("b", i), [np.full(MiB, 7, np.uint8)])
                accepted += 1
        assert 12 <= accepted <= 16
        with connect(d, "alice") as a:
            for i, v in alice.items():
                assert a.get(k("a", i)) == v.tobytes()
        assert "would pass its quota of 16777216 bytes" in d.log.read_text()
        assert d.admin("status")["qos"]["bob"]["refused_puts"] == 1
    finally:
        d.stop()


def test_limits_change_live_through_the_cli_and_are_audited(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tenants={"alice": {}, "bob": {"quota": "2M"}}).start()
    try:
        with connect(d, "bob") as b:
            b.put("s", k("b", 0), [np.zeros(MiB, np.uint8)])
            with pytest.raises(NoSpaceError):
                b.put("s", k("b", 1), [np.zeros(2 * MiB, np.uint8)])
            r = subprocess.run([KVTIER, "--socket", d.socket, "limits", "bob", "--quota",
                                "8M", "--iops", "500", "--json"], capture_output=True,
                               text=True, timeout=30)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["quota"] == 8 * MiB
            b.put("s", k("b", 1), [np.zeros(2 * MiB, np.uint8)])  # no restart needed
            r = subprocess.run([KVTIER, "--socket", d.socket, "limits", "bob", "--quota",
                                "off"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0 and "quota unlimited" in r.stdout, r.stderr
            r = subprocess.run([KVTIER, "--socket", d.socket, "limits", "nobody"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and "no tenant 'nobody'" in r.stderr
    finally:
        d.stop()
    recs = [json.loads(x) for x in (d.dir / "audit.log").read_text().splitlines()]
    changes = [r for r in recs if r["event"] == "policy_change"]
    assert [(c["before"]["quota"], c["after"]["quota"]) for c in changes] == \
        [(2 * MiB, 8 * MiB), (8 * MiB, None)]
    assert changes[0]["after"]["iops"] == 500
