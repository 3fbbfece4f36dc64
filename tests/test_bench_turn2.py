"""scripts/bench_turn2.py --quick: the whole turn-2 flow on the CPU with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def test_bench_turn2_quick(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_turn2.py"), "--quick",
                        "--encrypt", "--json", "--out", str(tmp_path / "out"),
                        "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads(r.stdout.strip().splitlines()[-1])
    for ctx in (512, 2048):
        for tier in ("dram", "dram_get", "file"):
            assert fig[f"prefix_tokens_{tier}_{ctx}"] == ctx
            assert fig[f"greedy_tokens_identical_{tier}_{ctx}"] is True
            assert fig[f"max_abs_logit_diff_{tier}_{ctx}"] < 1e-4
            assert fig[f"speedup_{tier}_{ctx}"] > 0
        # Against turn 1's own cache kept: the loaded prefix reproduces it bit for bit.
        for tier in ("dram", "dram_get", "dram_enc", "file", "file_prefetched",
                     "file_hint_1s", "file_hint_auto"):
            assert fig[f"max_abs_logit_diff_kept_{tier}_{ctx}"] == 0.0
            assert fig[f"greedy_tokens_identical_kept_{tier}_{ctx}"] is True
        assert fig[f"hint_auto_lead_s_{ctx}"] > 0
        # Encrypted (opened on the CPU here): the ratios to the plain MAP load of the run.
        for name in ("load", "ttft", "on_device"):
            assert fig[f"encrypted_{name}_ratio_to_map_{ctx}"] > 0
        assert fig[f"load_dram_tiers_{ctx}"] == {"dram": ctx // 256}
        assert fig[f"load_dram_mapped_{ctx}"] == ctx // 256  # one layer group
        assert fig[f"load_dram_get_mapped_{ctx}"] == 0
        assert fig[f"map_vs_get_ttft_ratio_{ctx}"] > 0
        assert fig[f"load_file_tiers_{ctx}"] == {"pool": ctx // 256}
        # After a PREFETCH hint the whole prefix comes from DRAM.
        assert fig[f"prefetch_values_{ctx}"] == ctx // 256
        assert fig[f"load_file_prefetched_tiers_{ctx}"] == {"dram": ctx // 256}
        assert fig[f"greedy_tokens_identical_file_prefetched_{ctx}"] is True
        # A hint 1 s before turn 2, not waited for: whatever tier each chunk is in then,
        # the tokens are the same.
        assert fig[f"greedy_tokens_identical_file_hint_1s_{ctx}"] is True
        assert sum(fig[f"load_file_hint_1s_tiers_{ctx}"].values()) == ctx // 256
        assert isinstance(fig[f"hint_1s_met_{ctx}"], bool)
    assert (tmp_path / "out" / "turn2.png").stat().st_size > 10_000
    doc = json.loads((tmp_path / "out" / "turn2.json").read_text())
    assert len(doc["results"]) == 2
