"""scripts/bench_client.py --quick --json runs and reports every figure of its issue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_client_quick_json(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_client.py"), "--quick",
                        "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    for size in ("2mib", "16mib"):
        for qd in ("qd1", "qd4"):
            assert fig[f"dram_get_{size}_{qd}_ratio_to_memcpy"] > 0.05
        assert fig[f"pool_get_{size}_ratio_to_engine"] > 0.05
        assert fig[f"dram_get_{size}_ratio_to_redis"] > 0
    assert 0 < fig["dram_get_4k_p50_us"] <= fig["dram_get_4k_p99_us"]
    assert fig["redis_get_4k_p50_us"] > 0
    assert list(tmp_path.iterdir()) == []
