"""scripts/bench_nvmf.py --quick --json --tls runs and reports every figure of its issue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_nvmf_quick_json(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_nvmf.py"), "--quick",
                        "--json", "--tls", "--dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    for size in ("128k", "1m"):
        for qd in (1, 8, 32):
            for op in ("read", "write"):
                assert fig[f"nvmf_{op}_{size}_qd{qd}_bytes_per_s"] > 0
                assert fig[f"file_{op}_{size}_qd{qd}_bytes_per_s"] > 0
                assert fig[f"nvmf_{op}_{size}_qd{qd}_ratio_to_file"] > 0
                assert fig[f"nvmf_tls_{op}_{size}_qd{qd}_ratio_to_plain"] > 0
    # SPDK's transport as kvtier provisions it, or the test target's MDTS (as SPDK's default)
    assert fig["errors"] == 0 and fig["max_io_bytes"] == (
        1 << 20 if fig["target"].startswith("SPDK") else 131072)
    assert fig["tls"].startswith("TLS 1.3") and fig["tls_errors"] == 0
    assert list(tmp_path.iterdir()) == []  # cleaned up after itself
