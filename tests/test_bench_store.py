"""scripts/bench_store.py --quick --json runs and reports every figure of its issue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_store_quick_json(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_store.py"), "--quick",
                        "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    for size in ("2mib", "16mib"):
        for qd in ("qd1", "qd4"):
            for op in ("put", "get"):
                assert fig[f"{op}_{size}_{qd}_ratio_to_fio"] > 0
    assert fig["index_entries"] == 10_000_000
    assert 52 <= fig["index_bytes_per_entry"] <= 64
    assert fig["prefix_lookup_keys_per_s"] > 100_000
    assert fig["churn_write_amplification"] >= 1.0
    assert fig["churn_freed_segments"] > 0
    assert fig["recovery_entries"] > 0 and fig["recovery_after_crash_full_scan_s"] > 0
    assert list(tmp_path.iterdir()) == []  # cleaned up after itself
