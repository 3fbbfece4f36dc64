#!/usr/bin/env python3
"""Turn-2 time-to-first-token: load the KV cache through kvtierd instead of recomputing it.

    scripts/bench_turn2.py [--model qwen2.5-7b|llama-3.1-8b|tiny] [--model-path DIR]
                           [--contexts 8192,32768,65536,131072] [--quick] [--json] [--out DIR]

For each context length: turn 1 prefills a random prompt and saves its KV through a real
kvtierd (ack = memory, written behind to the file pool).  Turn 2 is the same prompt plus
64 new tokens:
  (a) baseline: recompute the whole prompt (chunked prefill);
  (b) kvtier, DRAM tier: LOOKUP, load the stored prefix layer group by layer group into
      the GPU (through the CUDA-registered arena), prefill only the new tokens;
  (c) kvtier, file pool: the daemon restarted (DRAM empty), so the prefix comes from the
      pool file with O_DIRECT (no page cache).
Reported per length: TTFT, end-to-end latency with 32 generated tokens, KV bytes, load
GB/s, speedups (a)/(b) and (a)/(c), the max |logit difference| against (a) and whether
the greedy tokens are identical; plus the disk's own O_DIRECT read bandwidth.  Also: the
save's time and rate, the GPU memory it needed beyond the cache (`gpu_save_extra_bytes`),
the GPU memory left after the loads were dropped (`gpu_after_release_delta_bytes`, 0 when
everything came back), and turn 2 on turn 1's kept cache (`ttft_kept_s`: no load at all,
the compute floor).

Long contexts: `--recompute turn1` (auto above 131,072 tokens) times turn 1's prefill as
the recompute baseline instead of prefilling the prompt a second time (at 1M tokens that
is minutes); `--recompute none` does not prefill turn 1 at all: its cache is filled with
seeded random KV (turn 2 and the kept-cache reference then attend to the same values, so
the bit-for-bit check still holds), for saves and loads at lengths whose prefill alone
outlasts the device's 10-minute command limit (1M tokens of qwen2.5-7b: ~10 min on an
H200); no baseline and no speedups then.  Prompts over 131,072 tokens are prefilled in
chunks of 65,536 (kvtier's suffix attention builds no [q, kv] mask for them).  The DRAM
tier and the pool are sized from the memory and disk there are; a context whose KV does
not fit is reported as skipped (`skipped`), a file pool it does not fit as
`file_pool_skipped`.  turn2.json is rewritten after every context, so a run cut short
keeps what it measured.

Correctness has two references.  (a) rounds differently in bf16 from any resumed turn 2
(its new tokens are computed inside one long prefill), and with random weights the top
two logits are often within that rounding, so greedy tokens can part ways.  `_kept`
figures compare with turn 2 computed on turn 1's own cache, kept on the GPU: a loaded
prefix must reproduce that bit for bit (max |dlogit| 0, the same tokens).  Decoding runs
with a deterministic attention backend (see DECODE_SDPA).

`--hint-leads 1,auto`: turn 2 from the file pool with a PREFETCH hint given that many
seconds before it (auto: the lead the pool's measured read rate needs for the KV).

Models are built from their published configs with random weights (no downloads);
`--model-path` loads real local weights.  `tiny` runs on the CPU (CI).  Writes
`turn2.json` and `turn2.png` (log-scale TTFT vs context, speedups annotated) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_daemon import TOKEN, BenchDaemon
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvtier.client.attention import install as install_attention
from kvtier.client.client import Client
from kvtier.client.crypto import FrameCipher, Keyring
from kvtier.client.gpu import KVLayout, KVLoader, KVSaver, finish_resume, resume
from kvtier.daemon.sizes import parse_size

MiB, GiB = 1 << 20, 1 << 30
LONG = 131072  # longer prompts: recompute = turn 1's prefill (auto), chunked prefill
LONG_PREFILL_CHUNK = 65536


def model_config(name: str) -> Any:
    import transformers as tf

    if name == "qwen2.5-7b":
        return tf.Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, max_position_embeddings=131072,
                              rope_theta=1e7, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if name == "llama-3.1-8b":
        return tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, max_position_embeddings=131072,
                              rope_theta=500000.0, rms_norm_eps=1e-5,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192})
    if name == "tiny":
        return tf.Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=8192,
                              rope_theta=10000.0)
    raise SystemExit(f"bench_turn2: unknown model {name!r}")


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers as tf

    if args.model_path:
        model = tf.AutoModelForCausalLM.from_pretrained(
            args.model_path, dtype=dtype, attn_implementation="sdpa").to(device)
    else:
        cfg = model_config(args.model)
        torch.manual_seed(0)
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype,
                                                        attn_implementation="sdpa")
    if args.attention == "kvtier":
        install_attention(model)  # split-KV for the few new tokens over a long prefix
    return model.eval()


def chunk_for(args: argparse.Namespace, tokens: int) -> int:
    """Tokens per prefill forward for a prompt of `tokens`: --prefill-chunk, else all at
    once up to LONG tokens and LONG_PREFILL_CHUNK above (one pass at 1M tokens would need
    tens of GB for the MLP's activations alone)."""
    if args.prefill_chunk:
        return int(args.prefill_chunk)
    return 0 if tokens <= LONG else LONG_PREFILL_CHUNK


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Any, ids: torch.Tensor, cache: Any, chunk: int) -> torch.Tensor:
    """Chunked prefill of `ids` into `cache`; returns the last position's logits (fp32)."""
    base = model.model
    hidden = None
    chunk = chunk or ids.shape[1]
    for s in range(0, ids.shape[1], chunk):
        hidden = base(ids[:, s:s + chunk], past_key_values=cache, use_cache=True
                      ).last_hidden_state
    assert hidden is not None
    return model.lm_head(hidden[:, -1:]).float()[:, -1]


# Greedy decoding compares token sequences, so it must be repeatable: torch 2.11 picks
# cuDNN's attention for single-token decode steps on an H100, and that gave different
# tokens decoding twice from the very same cache (flash, efficient and math did not).
DECODE_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decode(model: Any, logits: torch.Tensor, cache: Any, n: int) -> list[int]:
    toks = []
    tok = logits.argmax(-1, keepdim=True)
    with sdpa_kernel(DECODE_SDPA):
        for _ in range(n):
            toks.append(int(tok))
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return toks


@dataclass
class Reference:
    """What turn 2 must produce.  `_a`: the baseline, recomputing prompt and new tokens in
    one prefill (None with `--recompute turn1`).  `_kept`: turn 1's own cache kept on the
    GPU, the new tokens prefilled on it -- the computation that a loaded prefix reproduces
    exactly, so its logits and tokens are expected bit for bit (the one-pass recompute
    rounds differently in bf16)."""
    logits_a: torch.Tensor | None
    toks_a: list[int] | None
    logits_kept: torch.Tensor
    toks_kept: list[int]


def fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def human(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def host_available() -> int:
    """MemAvailable, bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def kept_cache(model: Any, layout: KVLayout, capacity: int, device: torch.device,
               fill: int = 0) -> Any:
    """A DynamicCache whose layers fill preallocated [1, Hkv, capacity, D] buffers in
    place: turn 1's chunked prefill (and the kept-cache turn 2 after it) never
    `torch.cat`s the whole prefix per chunk, nor holds two copies of a layer.  `fill`:
    it starts with that many tokens of seeded random KV (--recompute none)."""
    from kvtier.client.gpu import build_cache

    shape = (1, layout.num_kv_heads, capacity, layout.head_dim)
    bufs = [(torch.empty(shape, dtype=layout.dtype, device=device),
             torch.empty(shape, dtype=layout.dtype, device=device))
            for _ in range(layout.num_layers)]
    if fill:
        g = torch.Generator(device=device).manual_seed(4321)
        for k, v in bufs:
            k[:, :, :fill].normal_(generator=g)
            v[:, :, :fill].normal_(generator=g)
    return build_cache([(k[:, :, :fill], v[:, :, :fill]) for k, v in bufs], model.config,
                       bufs)


def gpu_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def disk_read_bandwidth(path: str, nbytes: int) -> float:
    """O_DIRECT sequential read rate of the pool file (16 MiB reads)."""
    import mmap

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    try:
        buf = mmap.mmap(-1, 16 * MiB)
        size = min(nbytes, os.fstat(fd).st_size - 16 * MiB)
        t0 = time.perf_counter()
        off = MiB  # segments start after the superblock zone
        while off < size:
            os.preadv(fd, [buf], off)
            off += 16 * MiB
        return off / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def copy_rate(dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> int:
    """Bytes per second of `dst.copy_(src)` (non-blocking, 5 timed after one untimed)."""
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return round(5 * src.numel() * src.element_size() / (time.perf_counter() - t0))


def h2d_rates(d: BenchDaemon, arena: int, device: torch.device) -> dict[str, float]:
    """Host-to-device copy rate from the CUDA-registered client arena vs pageable memory,
    and device-to-host into the registered arena (what a save's copies can reach)."""
    from kvtier.client.gpu import register_arena

    n = min(1 * GiB, arena // 2)
    out: dict[str, float] = {}
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
        register_arena(c)
        pinned = torch.frombuffer(c.arena[:n], dtype=torch.uint8)
        pageable = torch.empty(n, dtype=torch.uint8)
        pageable.fill_(1)
        for name, src in (("registered_arena", pinned), ("pageable", pageable)):
            out[f"h2d_{name}_bytes_per_s"] = copy_rate(dst, src, device)
        out["d2h_registered_arena_bytes_per_s"] = copy_rate(pinned, dst, device)
        del pinned
    return out


def warm_up(model: Any, layout: KVLayout, fp: bytes, d: BenchDaemon, arena: int,
            device: torch.device, args: argparse.Namespace) -> None:
    """One untimed save/load/prefill pass: CUDA context, kernels, allocator, streams."""
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (1, 4 * layout.chunk_tokens + 8),
                        device=device)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        prefill(model, ids, cache, chunk_for(args, ids.shape[1]))
        with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
            KVSaver(c, layout, fp).save("warm-up", ids[0], cache)
            loader = KVLoader(c, layout, fp, layer_groups=args.layer_groups[0],
                              inflight=args.inflight)
            res = resume(model, loader, ids[0])
            prefill(model, ids[:, res.prefix_tokens:], res.cache, 0)
            finish_resume(loader)
            loader.close()
    sync(device)


def via_kvtier(tag: str, d: BenchDaemon, model: Any, layout: KVLayout, fp: bytes,
               args: argparse.Namespace, full: torch.Tensor, ref: Reference,
               r: dict[str, Any], arena: int, device: torch.device,
               map_dram: bool = True, repeats: int | None = None,
               keyring: Keyring | None = None, session: str = "",
               before: Callable[[], None] | None = None, decrypt: str = "auto",
               layer_groups: int | str | None = None) -> None:
    """Turn 2 through kvtier: resume from the stored prefix, prefill the rest.

    `map_dram=False` GETs DRAM hits through the arena (the path before MAP existed);
    `keyring`: the chunks are encrypted, opened where `decrypt` says (KVLoader: "auto" is
    the GPU's kernels on CUDA, "cpu" all cores); `before` runs once the client and loader
    are set up, just before the first timed turn 2.

    TTFT runs to the first token's logits *and* `finish_resume` (where the GPU path's tags
    are checked), for every path alike."""
    ttfts = []
    with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
        cipher = FrameCipher(c, keyring, "bench") if keyring is not None else None
        loader = KVLoader(c, layout, fp, layer_groups=layer_groups or args.layer_groups[0],
                          inflight=args.inflight, map_dram=map_dram, cipher=cipher,
                          session=session, decrypt=decrypt, gpu_batch=args.gpu_batch)
        # Set-up a serving engine does once (the GPU opener's kernels, its buffers): not
        # part of any turn; the first turn's TTFT below shows that none of it is left.
        r[f"prepare_{tag}_s"] = round(loader.prepare(device), 4)
        with torch.no_grad():
            # The same turn 2, `repeats` times from the same client: the first run also
            # pays for first-time kernel choices at this context length.  The median is
            # what a serving engine with warm kernels sees; the first is reported too.
            n = args.repeats if repeats is None else repeats
            if before is not None:
                before()
            for i in range(n):
                sync(device)
                t0 = time.perf_counter()
                res = resume(model, loader, full[0])
                logits = prefill(model, full[:, res.prefix_tokens:], res.cache,
                                 args.prefill_chunk)
                sync(device)
                finish_resume(loader)
                ttfts.append(time.perf_counter() - t0)
                if i + 1 < n:
                    del res, logits
            toks = decode(model, logits, res.cache, args.gen_tokens)
            sync(device)
            e2e = time.perf_counter() - t0
            diff = (float((logits - ref.logits_a).abs().max())
                    if ref.logits_a is not None else None)
            diff_kept = float((logits - ref.logits_kept).abs().max())
            if n > 1:
                # Where the time goes (one more run, serialised: data first, then prefill).
                load, prefix = res.load, res.prefix_tokens
                del res, logits
                sync(device)
                t0 = time.perf_counter()
                res2 = resume(model, loader, full[0])
                t1 = time.perf_counter()
                loader.wait_all()
                sync(device)
                t2 = time.perf_counter()
                prefill(model, full[:, res2.prefix_tokens:], res2.cache, args.prefill_chunk)
                sync(device)
                t3 = time.perf_counter()
                finish_resume(loader)
                r[f"breakdown_{tag}"] = {"lookup_s": round(res2.load.lookup_s, 4),
                                         "issued_s": round(t1 - t0, 4),
                                         "data_on_device_s": round(t2 - t0, 4),
                                         "prefill_new_tokens_s": round(t3 - t2, 4)}
                del res2
            else:
                load, prefix = res.load, res.prefix_tokens
                del res, logits
        loader.close()
        if cipher is not None:
            cipher.close()
    ttft = statistics.median(ttfts)
    r[f"ttft_{tag}_first_s"] = round(ttfts[0], 4)
    r[f"ttfts_{tag}_s"] = [round(t, 4) for t in ttfts]
    r[f"ttft_{tag}_s"] = round(ttft, 4)
    r[f"e2e_{tag}_s"] = round(e2e, 4)
    r[f"prefix_tokens_{tag}"] = prefix
    r[f"load_{tag}_s"] = round(load.seconds, 4)
    r[f"load_{tag}_bytes_per_s"] = round(load.bytes / load.seconds) if load.seconds else 0
    r[f"load_{tag}_tiers"] = load.tiers
    r[f"load_{tag}_mapped"] = load.mapped
    r[f"load_{tag}_layer_groups"] = load.layer_groups
    r[f"max_abs_logit_diff_{tag}"] = diff
    r[f"greedy_tokens_identical_{tag}"] = toks == ref.toks_a if ref.toks_a is not None else None
    r[f"max_abs_logit_diff_kept_{tag}"] = diff_kept
    r[f"greedy_tokens_identical_kept_{tag}"] = toks == ref.toks_kept
    base = r.get("ttft_baseline_s")
    r[f"speedup_{tag}"] = round(base / ttft, 2) if base is not None else None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios_to_map(r: dict[str, Any], tag: str, name: str) -> None:
    """`tag`'s load rate, time on the device and TTFT as ratios to the plain MAP load's
    ("dram") of the same run.  The load rate counts until `load` returns, which for MAP
    is before the copies are done: the time on the device is the fairer one."""
    r[f"{name}_load_ratio_to_map"] = round(
        r[f"load_{tag}_bytes_per_s"] / r["load_dram_bytes_per_s"], 3)
    r[f"{name}_ttft_ratio_to_map"] = round(r["ttft_dram_s"] / r[f"ttft_{tag}_s"], 3)
    if f"breakdown_{tag}" in r and "breakdown_dram" in r:
        r[f"{name}_on_device_ratio_to_map"] = round(
            r["breakdown_dram"]["data_on_device_s"] / r[f"breakdown_{tag}"]["data_on_device_s"],
            3)


def hinted(d: BenchDaemon, ctx: int, lead: float, name: str, model: Any, layout: KVLayout,
           fp: bytes, args: argparse.Namespace, full: torch.Tensor, ref: Reference,
           r: dict[str, Any], arena: int, device: torch.device) -> None:
    """Turn 2 from the file pool (DRAM empty), with a PREFETCH of its session given `lead`
    seconds before it starts and a deadline at that start."""
    d.stop()
    d.start()
    with Client.connect(d.sock, "bench", TOKEN) as c:
        hint: dict[str, Any] = {}

        def give_hint() -> None:
            hint["result"] = c.prefetch(session=f"ctx{ctx}", deadline_ms=round(lead * 1000))

        th = threading.Thread(target=give_hint)

        def hint_then_wait() -> None:
            th.start()
            time.sleep(lead)

        via_kvtier(f"file_hint_{name}", d, model, layout, fp, args, full, ref, r, arena,
                   device, repeats=1, before=hint_then_wait)
        th.join()
    # What came off the media for it (each value once is 1.0; the daemon has served
    # nothing else since its restart), hinted keys dropped because a GET had read them,
    # GETs that waited for a promotion of their key in flight.
    st = d.status()
    r[f"hint_{name}_media_read_ratio"] = round(
        st["media"]["counters"]["bytes_read"] / r["kv_bytes"], 3)
    r[f"hint_{name}_superseded"] = st["prefetch"]["superseded"]
    r[f"hint_{name}_single_flight_waits"] = st["tiers"]["single_flight_waits"]
    r[f"hint_{name}_values_by_deadline"], r[f"hint_{name}_met"] = hint["result"]
    r[f"hint_{name}_saved_s"] = round(r["ttft_file_s"] - r[f"ttft_file_hint_{name}_s"], 4)
    r[f"hint_{name}_ttft_ratio_to_dram"] = round(
        r["ttft_dram_s"] / r[f"ttft_file_hint_{name}_s"], 3)


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context_tokens"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 5))
    based = [r for r in results if r.get("ttft_baseline_s") is not None]
    ax.plot([r["context_tokens"] for r in based], [r["ttft_baseline_s"] for r in based], "o-",
            label="recompute (baseline)")
    ax.plot(ctx, [r["ttft_dram_s"] for r in results], "s-", label="kvtier, DRAM tier")
    if all("ttft_file_s" in r for r in results):
        ax.plot(ctx, [r["ttft_file_s"] for r in results], "^-", label="kvtier, file pool")
    for r in based:
        ax.annotate(f"{r['speedup_dram']:.0f}x", (r["context_tokens"], r["ttft_dram_s"]),
                    textcoords="offset points", xytext=(0, -14), ha="center", fontsize=9)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("turn-2 time to first token (s)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--contexts", default=None,
                    help="comma-separated prompt lengths (default 8192,32768,65536,131072; "
                         "--quick: 512,2048)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill at most this many tokens per forward (0: all at once up "
                         f"to {LONG} tokens, which lets SDPA use its causal flash kernel; "
                         f"{LONG_PREFILL_CHUNK} above)")
    ap.add_argument("--recompute", choices=("auto", "full", "turn1", "none"), default="auto",
                    help="the baseline: full = prefill prompt and new tokens again; turn1 = "
                         "turn 1's timed prefill of the prompt (no second prefill; its "
                         f"logits are not compared); auto: full up to {LONG} tokens; none: "
                         "turn 1's KV is seeded random values (no prefill, no baseline)")
    ap.add_argument("--layer-groups",
                    type=lambda v: [x if x == "auto" else int(x) for x in v.split(",")],
                    default=["auto"],
                    help="layer groups a load is copied (and waited for) in: a number or "
                         "auto (KVLoader's choice by bytes); several, comma-separated: turn "
                         "2 from DRAM once per value, in the same run (tags dram, "
                         "dram_groups<N>, ...)")
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--save-slots", type=int, default=8,
                    help="KVSaver's staging slots (chunks in flight; gathered half at a time)")
    ap.add_argument("--attention", choices=("kvtier", "sdpa"), default="kvtier",
                    help="kvtier: split-KV attention for turn 2's new tokens over the loaded "
                         "prefix (kvtier.client.attention); sdpa: transformers' stock SDPA")
    ap.add_argument("--encrypt", action="store_true",
                    help="also save the KV encrypted (AES-256-GCM) and time turn 2 from it")
    ap.add_argument("--gpu-batch", type=int, default=8,
                    help="with --encrypt on CUDA: chunk-groups opened per kernel launch")
    ap.add_argument("--repeats", type=int, default=3,
                    help="turn-2 runs per kvtier variant (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-file-pool", action="store_true")
    ap.add_argument("--writebehind-wait", type=float, default=300.0,
                    help="seconds to wait at most for the DRAM tier's write-behind to the "
                         "pool to finish before turn 2 is timed")
    ap.add_argument("--skip-get", action="store_true",
                    help="no turn 2 through GETs (the load before MAP existed)")
    ap.add_argument("--hint-leads", default="1,auto",
                    help="turn 2 from the file pool with a prefetch hint this many seconds "
                         "ahead (comma-separated; auto: what the pool's read rate needs)")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model on short contexts (CPU, under a minute)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--dir", default=None, help="where kvtierd keeps its files")
    ap.add_argument("--dram-max", type=parse_size, default=None,
                    help="cap the DRAM tier at this size (e.g. 64G; default: what the "
                         "contexts want, within the host memory available)")
    ap.add_argument("--pool-max", type=parse_size, default=None,
                    help="cap the file pool at this size (default: what the contexts want, "
                         "within the free disk)")
    args = ap.parse_args()
    if args.quick:
        args.model, args.prefill_chunk = "tiny", args.prefill_chunk or 1024
        args.contexts = args.contexts or "512,2048"
    args.contexts = args.contexts or "8192,32768,65536,131072"
    console = Console(stderr=args.json)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    contexts = [int(x) for x in args.contexts.split(",")]
    model = build_model(args, device, dtype)
    if device.type == "cuda":  # create the cuBLAS handle now, before any host registration
        (torch.ones(64, 64, device=device, dtype=dtype) @ torch.ones(64, 64, device=device,
                                                                     dtype=dtype)).sum().item()
    layout = KVLayout.from_config(model.config, dtype)
    fp = layout.fingerprint(args.model_path or args.model)
    def kv_of(ctx: int) -> int:
        return ctx // layout.chunk_tokens * layout.chunk_bytes

    kv_max = max(kv_of(c) for c in contexts)
    total = sum(kv_of(c) for c in contexts)
    # Small contexts (--quick's tiny model) get small segments: the pool keeps 16 spare
    # ones and is fallocated.
    seg = 256 * MiB if kv_max > 4 * GiB else 64 * MiB if kv_max > 256 * MiB else 16 * MiB
    work = tempfile.mkdtemp(prefix="kvtier-turn2-", dir=args.dir or os.getcwd())

    def segments(nbytes: float) -> int:
        return int(-(-nbytes // seg)) * seg

    keyring = Keyring(os.path.join(work, "keyring.json")) if args.encrypt else None
    fp_enc = layout.fingerprint((args.model_path or args.model) + "+encrypted")
    # The DRAM tier and the pool as large as the contexts want and the machine has: host
    # memory left after 16 GiB for this process (pinned arenas, torch), disk left after
    # 4 GiB.  Each context is measured right after its save, so a tier smaller than all
    # of them together only evicts contexts already measured.
    # Not more than that: a client's CUDA registration of its DRAM mapping pins (and
    # first faults in) every page of the tier, at about 2 GB/s under the device's sandbox.
    per_kv = 2.3 if args.encrypt else 1.15  # the encrypted copy too, and room to clean
    available, disk_free = host_available(), shutil.disk_usage(work).free
    dram_room = min((available - 16 * GiB) // seg * seg,
                    args.dram_max // seg * seg if args.dram_max else 1 << 62)
    dram = min(max(segments(kv_max * per_kv) + 8 * seg, 32 * seg), dram_room)
    disk_room = min((disk_free - 4 * GiB) // seg * seg,
                    args.pool_max // seg * seg if args.pool_max else 1 << 62)
    pool = min(max(segments(total * 1.3) + 16 * seg, 32 * seg), disk_room) + MiB
    sizing = {"dram_tier_bytes": dram, "pool_bytes": pool,
              "host_available_bytes": available, "disk_free_bytes": disk_free}
    console.print(f"DRAM tier {human(dram)}, pool {human(pool)} (host memory available "
                  f"{human(sizing['host_available_bytes'])}, disk free "
                  f"{human(sizing['disk_free_bytes'])})")
    d = BenchDaemon(work, dram=dram, pool=pool, segment=seg, ack="memory",
                    populate=False, arena_max=2 * GiB, io_threads=min(16, os.cpu_count() or 4))
    results: list[dict[str, Any]] = []

    def write_json() -> dict[str, Any]:
        """turn2.json as far as the run has come (a run cut short keeps its contexts)."""
        out = {"model": args.model_path or args.model, "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype), "attention": args.attention,
               "layer_groups": args.layer_groups, "inflight": args.inflight,
               **sizing, **h2d, "results": results}
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "turn2.json").write_text(json.dumps(out, indent=1))
        return out
    rng = torch.Generator().manual_seed(1234)
    arena = max(256 * MiB, (args.save_slots + args.inflight) * layout.chunk_bytes + 64 * MiB)
    if args.encrypt:  # sealed and plain slots for the loader, sealed slots for the saver
        arena += (args.inflight + 2) * (layout.chunk_bytes + 64 * 1024) + 64 * MiB
    h2d: dict[str, float] = {}
    try:
        d.start()
        if device.type == "cuda":
            h2d = h2d_rates(d, arena, device)
            reg, pag = h2d["h2d_registered_arena_bytes_per_s"], h2d["h2d_pageable_bytes_per_s"]
            console.print(f"H2D: registered arena {reg / 1e9:.1f} GB/s, pageable "
                          f"{pag / 1e9:.1f} GB/s; D2H into the registered arena "
                          f"{h2d['d2h_registered_arena_bytes_per_s'] / 1e9:.1f} GB/s")
        warm_up(model, layout, fp, d, arena, device, args)
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task(f"turn 2 on {args.model}", total=len(contexts) * 5)
            for ctx in contexts:
                r: dict[str, Any] = {"context_tokens": ctx}
                results.append(r)  # filled in as it is measured; written at each step
                kv = kv_of(ctx)
                if kv * (2 if args.encrypt else 1) + 4 * seg > dram:
                    r["skipped"] = (
                        f"its KV ({human(kv)}{' twice' if args.encrypt else ''}) does not "
                        f"fit the DRAM tier ({human(dram)}, 4 segments kept spare; "
                        + ("capped by --dram-max" if args.dram_max else
                           f"{human(sizing['host_available_bytes'])} of host memory "
                           "available") + ")")
                    console.print(f"[yellow]{ctx} tokens skipped: {r['skipped']}")
                    write_json()
                    prog.advance(task, 5)
                    continue
                recompute = args.recompute if args.recompute != "auto" else (
                    "full" if ctx <= LONG else "turn1")
                r["recompute"] = recompute
                r["prefill_chunk"] = chunk_for(args, ctx)
                prompt = torch.randint(0, model.config.vocab_size, (1, ctx), generator=rng)
                new = torch.randint(0, model.config.vocab_size, (1, args.new_tokens),
                                    generator=rng)
                full = torch.cat([prompt, new], dim=1).to(device)
                prompt = prompt.to(device)

                # Turn 1: prefill (timed: with --recompute turn1 it is the baseline) into a
                # cache with room for turn 2 and its decode, and save through kvtierd.
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                gpu_base = gpu_allocated(device)
                with torch.no_grad():
                    cache = kept_cache(model, layout, full.shape[1] + args.gen_tokens + 1,
                                       device, fill=ctx if recompute == "none" else 0)
                    if recompute != "none":
                        sync(device)
                        t0 = time.perf_counter()
                        prefill(model, prompt, cache, chunk_for(args, ctx))
                        sync(device)
                        r["turn1_prefill_s"] = round(time.perf_counter() - t0, 4)
                with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
                    saver = KVSaver(c, layout, fp, slots=args.save_slots)
                    before_save = gpu_allocated(device)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    srep = saver.save(f"ctx{ctx}", prompt[0], cache)
                    if device.type == "cuda":
                        # Beyond the cache itself: staging, CRCs (the goal: <= 2 GB).
                        r["gpu_save_extra_bytes"] = (torch.cuda.max_memory_allocated(device)
                                                     - before_save)
                    saver.close()
                    if keyring is not None:  # the same KV again, encrypted, under other keys
                        cipher = FrameCipher(c, keyring, "bench")
                        esaver = KVSaver(c, layout, fp_enc, cipher=cipher)
                        erep = esaver.save(f"ctx{ctx}-enc", prompt[0], cache)
                        esaver.close()
                        cipher.close()
                        r["save_encrypted_bytes_per_s"] = round(erep.bytes / erep.seconds)
                sync(device)
                with torch.no_grad():
                    # The reference turn 2 on the cache turn 1 kept, timed: no load at all,
                    # the compute floor of a resumed turn 2 (median of `repeats`, the
                    # cache cropped back to the prompt in between).
                    kept = []
                    for _ in range(args.repeats):
                        if cache.get_seq_length() > ctx:  # negative: tokens to drop
                            cache.crop(ctx - cache.get_seq_length())
                        sync(device)
                        t0 = time.perf_counter()
                        logits_kept = prefill(model, full[:, ctx:], cache, args.prefill_chunk)
                        sync(device)
                        kept.append(time.perf_counter() - t0)
                    r["ttft_kept_s"] = round(statistics.median(kept), 4)
                    toks_kept = decode(model, logits_kept, cache, args.gen_tokens)
                del cache
                r["kv_bytes"] = srep.bytes
                r["save_s"] = round(srep.seconds, 4)
                r["save_bytes_per_s"] = round(srep.bytes / srep.seconds) if srep.seconds else 0
                if h2d:  # the goal: >= 0.5 of the D2H rate
                    r["save_fraction_of_d2h"] = round(
                        r["save_bytes_per_s"] / h2d["d2h_registered_arena_bytes_per_s"], 3)
                write_json()
                # Turn 2 is timed with the write-behind done (it would share memory
                # bandwidth and cores), waiting at most --writebehind-wait seconds.
                t0 = time.perf_counter()
                while d.backlog() and time.perf_counter() - t0 < args.writebehind_wait:
                    time.sleep(0.05)
                r["writebehind_s"] = round(time.perf_counter() - t0, 3)
                r["writebehind_backlog_left"] = d.backlog()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                prog.advance(task)

                # (a) baseline: recompute everything (or turn 1's prefill stands for it).
                logits_a: torch.Tensor | None = None
                toks_a: list[int] | None = None
                if recompute in ("turn1", "none"):
                    r["ttft_baseline_s"] = r.get("turn1_prefill_s")
                else:
                    with torch.no_grad():
                        # Short contexts: median of `repeats` (first-call kernel choices
                        # would weigh on them); long ones run once, where that cost is lost
                        # in seconds.
                        base = []
                        for _ in range(args.repeats if ctx <= 32768 else 1):
                            cache = None
                            sync(device)
                            t0 = time.perf_counter()
                            cache = kept_cache(model, layout,
                                               full.shape[1] + args.gen_tokens + 1, device)
                            logits_a = prefill(model, full, cache, chunk_for(args, ctx))
                            sync(device)
                            base.append(time.perf_counter() - t0)
                        r["ttft_baseline_s"] = round(statistics.median(base), 4)
                        toks_a = decode(model, logits_a, cache, args.gen_tokens)
                        sync(device)
                        r["e2e_baseline_s"] = round(time.perf_counter() - t0, 4)
                        # Control: decoding again from the very same cache.  If this
                        # differs, the GPU kernels are not deterministic and token equality
                        # below says nothing about kvtier.
                        cache.crop(-args.gen_tokens)  # back to the prefilled state
                        r["baseline_decode_repeatable"] = decode(
                            model, logits_a, cache, args.gen_tokens) == toks_a
                    del cache
                    r["max_abs_logit_diff_baseline_vs_kept"] = float(
                        (logits_a - logits_kept).abs().max())
                    r["greedy_tokens_identical_baseline_vs_kept"] = toks_a == toks_kept
                ref = Reference(logits_a, toks_a, logits_kept, toks_kept)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                prog.advance(task)

                via_kvtier("dram", d, model, layout, fp, args, full, ref, r, arena,
                           device)
                for groups in args.layer_groups[1:]:
                    tag = f"dram_groups{groups}"
                    via_kvtier(tag, d, model, layout, fp, args, full, ref, r, arena, device,
                               layer_groups=groups)
                    ratios_to_map(r, tag, f"groups{groups}")
                write_json()
                prog.advance(task)
                if not args.skip_get:
                    via_kvtier("dram_get", d, model, layout, fp, args, full, ref, r,
                               arena, device, map_dram=False)
                    r["map_vs_get_ttft_ratio"] = round(
                        r["ttft_dram_get_s"] / r["ttft_dram_s"], 2)
                if keyring is not None:
                    via_kvtier("dram_enc", d, model, layout, fp_enc, args, full, ref, r,
                               arena, device, keyring=keyring)
                    if "load_dram_get_bytes_per_s" in r:
                        r["encrypted_load_ratio_to_get"] = round(
                            r["load_dram_enc_bytes_per_s"] / r["load_dram_get_bytes_per_s"],
                            3)
                    ratios_to_map(r, "dram_enc", "encrypted")
                    if device.type == "cuda":  # the same, opened on the CPU's cores
                        via_kvtier("dram_enc_cpu", d, model, layout, fp_enc, args, full, ref,
                                   r, arena, device, keyring=keyring, decrypt="cpu")
                        ratios_to_map(r, "dram_enc_cpu", "encrypted_cpu")
                        r["gpu_over_cpu_decrypt_ttft"] = round(
                            r["ttft_dram_enc_cpu_s"] / r["ttft_dram_enc_s"], 3)
                if h2d:
                    # The physical floor: the KV bytes at the registered-memory H2D rate.
                    floor = r["kv_bytes"] / h2d["h2d_registered_arena_bytes_per_s"]
                    r["h2d_floor_s"] = round(floor, 4)
                    r["fraction_of_h2d_limit_dram"] = round(floor / r["ttft_dram_s"], 3)
                    for groups in args.layer_groups[1:]:
                        r[f"fraction_of_h2d_limit_dram_groups{groups}"] = round(
                            floor / r[f"ttft_dram_groups{groups}_s"], 3)
                # The loads dropped: what the GPU holds now beyond what it held before
                # turn 1 (0: every buffer of the saves and loads came back).
                sync(device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                r["gpu_after_release_delta_bytes"] = gpu_allocated(device) - gpu_base
                r["kept_over_dram_ttft"] = round(r["ttft_kept_s"] / r["ttft_dram_s"], 3)
                prog.advance(task)
                if not args.skip_file_pool and kv * 1.1 > pool - 16 * seg:
                    r["file_pool_skipped"] = (
                        f"its KV ({human(kv)}) does not fit the file pool ({human(pool)}, 16 "
                        "segments kept spare; "
                        + ("capped by --pool-max" if args.pool_max else
                           f"{human(sizing['disk_free_bytes'])} of disk free") + ")")
                    console.print(f"[yellow]{ctx} tokens, file pool skipped: "
                                  f"{r['file_pool_skipped']}")
                elif not args.skip_file_pool:
                    d.stop()  # flushes and checkpoints; DRAM is gone
                    d.start()
                    # Once: the first read promotes the prefix to DRAM.
                    via_kvtier("file", d, model, layout, fp, args, full, ref, r,
                               arena, device, repeats=1)
                    # A prefetch hint when the request is queued: DRAM empty again, PREFETCH
                    # the session (it returns when promoted), then turn 2.
                    d.stop()
                    d.start()
                    with Client.connect(d.sock, "bench", TOKEN) as c:
                        t0 = time.perf_counter()
                        n, _met = c.prefetch(session=f"ctx{ctx}", deadline_ms=60_000)
                        r["prefetch_s"] = round(time.perf_counter() - t0, 4)
                        r["prefetch_values"] = n
                    via_kvtier("file_prefetched", d, model, layout, fp, args, full, ref, r, arena,
                               device, repeats=1)
                    # The hint as a scheduler gives it: when the request is queued, `lead`
                    # seconds before turn 2 starts (its client and loader already set up);
                    # turn 2 does not wait for the hint.  `auto`: the lead the media needs,
                    # the KV bytes at the pool load rate just measured, plus a quarter.
                    for spec in args.hint_leads.split(","):
                        lead = (1.25 * r["kv_bytes"] / r["load_file_bytes_per_s"]
                                if spec == "auto" else float(spec))
                        name = spec if spec == "auto" else f"{spec}s"
                        r[f"hint_{name}_lead_s"] = round(lead, 4)
                        hinted(d, ctx, lead, name, model, layout, fp, args, full, ref, r,
                               arena, device)
                prog.advance(task)
                write_json()
                console.print(f"{args.model} {ctx} tokens: baseline ({recompute}) "
                              f"{fmt(r['ttft_baseline_s'])} s, DRAM {r['ttft_dram_s']:.3f} s "
                              f"({r['speedup_dram']}x), kept cache {r['ttft_kept_s']:.3f} s"
                              + (f", {r['ttft_dram_get_s']:.3f} s without MAP"
                                 if "ttft_dram_get_s" in r else "")
                              + (f", file {r['ttft_file_s']:.3f} s ({r['speedup_file']}x)"
                                 if "ttft_file_s" in r else "")
                              + f"; save {r['save_bytes_per_s'] / 1e9:.1f} GB/s")
        # Only the written part of the pool: unwritten (fallocated) extents read as zeros
        # without touching the disk.
        disk = disk_read_bandwidth(d.pool_path, min(4 * GiB, total)) \
            if os.path.exists(d.pool_path) else 0
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    sizing["disk_read_bytes_per_s"] = round(disk)
    out = write_json()
    measured = [r for r in results if "ttft_dram_s" in r]
    if measured:
        plot(measured, os.path.join(args.out, "turn2.png"),
             f"turn-2 TTFT, {out['model']} on {out['gpu']}")
    t = Table(title=f"turn-2 TTFT: {out['model']} ({out['gpu']})")
    for col in ("context", "KV", "recompute s", "DRAM s", "x", "kept s", "file s", "x",
                "save GB/s", "load GB/s", "max |dlogit|", "same tokens", "bitwise vs kept"):
        t.add_column(col, justify="right")

    for r in measured:
        t.add_row(str(r["context_tokens"]), f"{r['kv_bytes'] / GiB:.2f} GiB",
                  fmt(r["ttft_baseline_s"]) + (" (turn 1)" if r["recompute"] == "turn1"
                                               else ""),
                  f"{r['ttft_dram_s']:.3f}", fmt(r["speedup_dram"]), fmt(r["ttft_kept_s"]),
                  fmt(r.get("ttft_file_s")), fmt(r.get("speedup_file")),
                  f"{r['save_bytes_per_s'] / 1e9:.1f}",
                  f"{r['load_dram_bytes_per_s'] / 1e9:.1f}",
                  fmt(r["max_abs_logit_diff_dram"], ".3g"),
                  fmt(r["greedy_tokens_identical_dram"]),
                  str(r["max_abs_logit_diff_kept_dram"] == 0
                      and r["greedy_tokens_identical_kept_dram"]))
    console.print(t)
    console.print(f"disk O_DIRECT read: {disk / 1e9:.2f} GB/s; wrote {args.out}/turn2.json, "
                  f"{args.out}/turn2.png")
    if args.json:
        flat = {k: v for k, v in out.items() if k != "results"}
        for r in results:
            for k, v in r.items():
                if k != "context_tokens":
                    flat[f"{k}_{r['context_tokens']}"] = v
        print(json.dumps(flat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
