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


def test_bench_turn2_long_context_mode(tmp_path: Path) -> None:
    """What the 410k/1M runs use, at the tiny model's scale: turn 1's prefill as the
    recompute baseline (no second prefill), the tiers sized within caps, and contexts that
    do not fit reported as skipped rather than failing or evicting their own prefix."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_turn2.py"), "--quick",
                        "--json", "--out", str(tmp_path / "out"), "--dir", str(tmp_path),
                        "--contexts", "512,16384,65536", "--recompute", "turn1",
                        "--skip-get", "--dram-max", "160M", "--pool-max", "288M",
                        "--repeats", "1", "--hint-leads", "auto"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "turn2.json").read_text())
    assert doc["dram_tier_bytes"] == 160 << 20 and doc["pool_bytes"] == (288 << 20) + (1 << 20)
    small, mid, big = doc["results"]
    for x in (small, mid):
        assert x["recompute"] == "turn1"
        assert x["ttft_baseline_s"] == x["turn1_prefill_s"] > 0
        assert x["max_abs_logit_diff_dram"] is None  # no one-pass recompute to compare with
        assert x["max_abs_logit_diff_kept_dram"] == 0.0
        assert x["greedy_tokens_identical_kept_dram"] is True
        assert x["ttft_kept_s"] > 0 and x["gpu_after_release_delta_bytes"] == 0
        assert "ttft_dram_get_s" not in x  # --skip-get
    assert small["load_file_tiers"] == {"pool": 2}
    # 16,384 tokens are 32 MiB of KV: more than the pool's 18 segments less 16 spare.
    assert "file_pool_skipped" in mid and "ttft_file_s" not in mid
    assert "--pool-max" in mid["file_pool_skipped"]
    # 65,536 tokens (128 MiB) do not fit a 160 MiB DRAM tier with 4 segments spare.
    assert set(big) == {"context_tokens", "skipped"} and "--dram-max" in big["skipped"]


def test_bench_turn2_without_a_turn_1_prefill(tmp_path: Path) -> None:
    """`--recompute none` (the 1M-token run): turn 1's cache is seeded random KV, written
    in place; turn 2 from kvtier still equals turn 2 on that kept cache bit for bit, and no
    baseline or speedup is made up."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_turn2.py"), "--quick",
                        "--json", "--out", str(tmp_path / "out"), "--dir", str(tmp_path),
                        "--contexts", "512,4608", "--recompute", "none", "--skip-get",
                        "--skip-file-pool", "--repeats", "2", "--layer-groups", "1,2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "turn2.json").read_text())
    for x in doc["results"]:
        assert x["recompute"] == "none" and "turn1_prefill_s" not in x
        assert x["ttft_baseline_s"] is None and x["speedup_dram"] is None
        assert x["max_abs_logit_diff_kept_dram"] == 0.0
        assert x["greedy_tokens_identical_kept_dram"] is True
        assert x["load_dram_tiers"] == {"dram": x["context_tokens"] // 256}
        # the same turn 2 with the layers in two groups, in the same run
        assert x["max_abs_logit_diff_kept_dram_groups2"] == 0.0
        assert x["ttft_dram_groups2_s"] > 0 and x["groups2_ttft_ratio_to_map"] > 0
        assert x["gpu_after_release_delta_bytes"] == 0
    assert (tmp_path / "out" / "turn2.png").stat().st_size > 0
