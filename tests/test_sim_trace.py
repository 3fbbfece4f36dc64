"""scripts/sim_trace.py replays a trace against real daemons and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sim_trace_small_run(tmp_path: Path) -> None:
    png = tmp_path / "sim.png"
    trace = tmp_path / "trace.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sim_trace.py"), "--quick",
                        "--json", "--sessions", "20", "--duration", "150",
                        "--modes", "none,kvtier", "--dir", str(tmp_path), "--plot", str(png),
                        "--trace-out", str(trace)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    assert fig["sessions"] == 20 and fig["returning_turns"] > 10
    assert 0.24 <= fig["dram_fraction"] <= 0.3
    for m in ("none", "kvtier"):
        assert 0 <= fig[f"{m}_returning_turns_from_dram"] <= 1
        assert fig[f"{m}_bytes_promoted"] > 0
    assert fig["none_hint_deadline_hit_rate"] is None
    assert fig["kvtier_hint_deadline_hit_rate"] > 0.5
    # Hints and the reuse policy serve returning turns from DRAM far more often than a
    # plain cache does (measured here: ~0.95 against ~0.35).
    assert fig["kvtier_returning_turns_from_dram"] > fig["none_returning_turns_from_dram"] + 0.2
    assert png.stat().st_size > 10_000
    turns = json.loads(trace.read_text())
    assert len(turns) == fig["turns"] and {"t", "session", "prompt"} <= set(turns[0])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("kvtier-sim")] == []


def test_sim_trace_bad_arguments() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sim_trace.py"), "--modes",
                        "mru"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown mode 'mru'" in r.stderr
