"""scripts/bench_prefetch.py --quick --json runs and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_prefetch_quick_json(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_prefetch.py"), "--quick",
                        "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    for w in (1, 4):
        assert fig[f"prefetch_{w}w_values_in_dram"] == fig["values"] == 32
        assert fig[f"prefetch_{w}w_met"] is True
        assert fig[f"prefetch_{w}w_bytes_per_s"] > 0 and fig[f"prefetch_{w}w_ratio_to_file"] > 0
    assert fig["pool_file_read_bytes_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # cleaned up after itself
