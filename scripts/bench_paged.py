#!/usr/bin/env python3
"""The vLLM connector's worker data path: a paged KV cache shaped and strided as vLLM 0.32
allocates it, saved to and loaded from kvtierd's DRAM tier.

vLLM itself does not run here (its CUDA wheel does not fit the GPU machine): this drives
the exact calls `kvtier.client.vllm.Worker` makes for a request -- `KVSaver.save_chunks`
over a `PagedSource` and `KVLoader.load_into` a `PagedDestination` + `synchronize` -- on
one backing allocation viewed per layer as `[blocks, kv_heads, block_size, K+V]` in the
physical order of a vLLM layout (LBNHC: each layer's blocks token-major, FlashAttention's
NHD; BLNHC: block-major across layers), with the request's blocks scattered at random.

Ratios, measured in the same run: load GB/s into the paged blocks / H2D from
CUDA-registered host memory; save GB/s / D2H into registered memory.  Every load is
checked against the saved bytes (sampled chunks, bit for bit), and GPU memory is read
before the save, at its peak, and after the load's release.

    scripts/bench_paged.py [--tokens 131072,409600] [--layouts LBNHC,BLNHC] [--json]
    scripts/bench_paged.py --quick    # a tiny shape on the CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_daemon import TOKEN, BenchDaemon

from kvtier.client.client import Client
from kvtier.client.gpu import KVLayout, KVLoader, KVSaver, register_arena, register_dram
from kvtier.client.paged import PagedDestination, PagedKV, PagedSource

MiB, GiB = 1 << 20, 1 << 30
SHAPES = {  # layers, kv heads, head dim (bf16)
    "qwen2.5-7b": (28, 4, 128),
    "llama-3.1-8b": (32, 8, 128),
    "tiny": (2, 2, 64),
}
# vLLM's KVCacheLayout: the physical order of the logical dims [L, B, H, N, C].
LAYOUTS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "BLNHC": (1, 0, 3, 2, 4),
           "BLHNC": (1, 0, 2, 3, 4)}


def vllm_like_cache(L: int, B: int, H: int, N: int, D: int, dtype: torch.dtype, order: str,
                    device: torch.device) -> list[torch.Tensor]:
    """One allocation, viewed per layer as [B, H, N, 2D] in physical `order` (as vLLM's
    allocate_kv_cache / create_kv_cache_views lay it out)."""
    logical = (L, B, H, N, 2 * D)
    perm = LAYOUTS[order]
    phys = torch.empty([logical[d] for d in perm], dtype=dtype, device=device)
    inv = [perm.index(d) for d in range(5)]
    view = phys.permute(inv)
    assert tuple(view.shape) == logical
    return [view[li] for li in range(L)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_rates(c: Client, dev: torch.device, n: int) -> dict[str, float]:
    """H2D and D2H between the CUDA-registered arena and the device (CPU: memcpy)."""
    register_arena(c)
    host = torch.frombuffer(c.arena[:n], dtype=torch.uint8)
    devbuf = torch.empty(n, dtype=torch.uint8, device=dev)
    devbuf.fill_(3)
    out = {}
    for name, dst, src in (("h2d", devbuf, host), ("d2h", host, devbuf)):
        dst.copy_(src, non_blocking=True)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        sync(dev)
        out[f"{name}_bytes_per_s"] = 5 * n / (time.perf_counter() - t0)
    del host
    return out


def crc_rates(layout: KVLayout, dev: torch.device) -> dict[str, float]:
    """Frame CRC32Cs of one chunk on the device (kvtier.client.crc_gpu, checked against
    the host's crc32c) and on one host thread, bytes per second of each."""
    import crc32c

    from kvtier.client.crc_gpu import FrameCrcs

    L, fb = layout.num_layers, layout.frame_bytes
    chunk = torch.randint(0, 256, (L * fb,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(5))
    raw = chunk.numpy()
    t0 = time.perf_counter()
    want = [crc32c.crc32c(raw[i * fb:(i + 1) * fb]) for i in range(L)]
    host = L * fb / (time.perf_counter() - t0)
    on_dev = chunk.to(dev)
    crcs = FrameCrcs(dev, fb)
    out = torch.zeros(L, dtype=torch.int32, device=dev)
    crcs.compute_into(on_dev, L, out)  # compiles
    if [int(x) & 0xFFFFFFFF for x in out.cpu()] != want:
        raise SystemExit("device CRC32Cs differ from the host's")
    n = 50
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        crcs.compute_into(on_dev, L, out)
    sync(dev)
    return {"crc_device_bytes_per_s": n * L * fb / (time.perf_counter() - t0),
            "crc_host_1thread_bytes_per_s": host}


def daemon_faults(d: BenchDaemon) -> int:
    """kvtierd's page faults so far (minor + major, /proc/PID/stat): a save that makes the
    daemon fault on memory it copies runs near first-touch speed."""
    assert d.proc is not None
    with open(f"/proc/{d.proc.pid}/stat") as stat:
        f = stat.read().rsplit(")", 1)[1].split()
    return int(f[7]) + int(f[9])


def gpu_mem(dev: torch.device) -> int:
    return int(torch.cuda.memory_allocated(dev)) if dev.type == "cuda" else 0


def run_one(d: BenchDaemon, layout: KVLayout, order: str, tokens: int, block: int,
            dev: torch.device, arena: int, rng: torch.Generator, inflight: int,
            save_slots: int, batch: int, keyring: Any = None) -> dict[str, Any]:
    L, H, D, T = layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.chunk_tokens
    chunks = tokens // T
    k = T // block
    nblocks = chunks * k + chunks * k // 8 + 1  # the request's blocks and others
    layers = vllm_like_cache(L, nblocks, H, block, D, layout.dtype, order, dev)
    for t in layers:  # distinct, reproducible contents
        t.copy_(torch.randn(t.shape, generator=rng).to(layout.dtype)) if dev.type == "cpu" \
            else t.normal_()
    paged = PagedKV(layers, layout)
    perm = torch.randperm(nblocks, generator=rng)[:chunks * k].view(chunks, k).tolist()
    fp = layout.fingerprint(f"bench-paged-{order}-{tokens}-{time.time_ns()}")
    from kvtier.client.keys import chunk_keys

    ids = torch.randint(0, 32000, (chunks * T,), generator=rng).tolist()
    keys = chunk_keys(ids, fp, chunk_tokens=T)
    sample = sorted(set(torch.randint(0, chunks, (8,), generator=rng).tolist()))
    src = PagedSource(paged, perm)
    want = []
    for c in sample:
        buf = torch.empty((L, 2, H, T, D), dtype=layout.dtype, device=dev)
        src.gather(c, buf)
        want.append(buf)
    nbytes = chunks * layout.chunk_bytes
    r: dict[str, Any] = {"layout": order, "tokens": chunks * T, "kv_bytes": nbytes,
                         "block_size": block, "chunks": chunks, "paged_stacked":
                         paged.stacked is not None}
    with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
        sync(dev)
        base = gpu_mem(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        # Both save paths, in one run: PUTs through arena slots (the daemon copies each
        # chunk into DRAM), then chunks copied from the GPU straight into DRAM reservations
        # (RESERVE/COMMIT: the daemon only reads them once, for CRCs).  The loads below read
        # what the second one stored.
        if dev.type == "cuda":  # a one-time setup cost per client (KVSaver/KVLoader do it)
            t0 = time.perf_counter()
            assert register_dram(c)
            r["dram_register_s"] = round(time.perf_counter() - t0, 3)
        # In place twice: the daemon reading the frames for their CRCs, then (on a GPU)
        # the CRCs computed on the device and carried by the COMMITs.
        modes = ("arena", "in_place_daemon_crcs", "in_place") if dev.type == "cuda" \
            else ("arena", "in_place")
        for mode in modes:
            saver = KVSaver(c, layout, fp, slots=save_slots, in_place=mode != "arena",
                            frame_crcs=False if mode == "in_place_daemon_crcs" else None)
            faults0 = daemon_faults(d)
            t0 = time.perf_counter()
            rep = saver.save_chunks("bench", keys, src)
            sync(dev)
            secs = time.perf_counter() - t0
            faults = daemon_faults(d) - faults0
            saver.close()
            assert rep.in_place == (mode != "arena") and rep.chunks == chunks, rep
            pre = {"in_place": "save", "arena": "save_arena",
                   "in_place_daemon_crcs": "save_daemon_crcs"}[mode]
            r[f"{pre}_frame_crcs_on_device"] = rep.frame_crcs
            r[f"{pre}_s"] = secs
            r[f"{pre}_bytes_per_s"] = rep.bytes / secs
            r[f"{pre}_d2h_wait_s"] = round(rep.d2h_wait_s, 4)
            r[f"{pre}_put_wait_s"] = round(rep.put_wait_s, 4)
            r[f"{pre}_reserve_wait_s"] = round(rep.reserve_wait_s, 4)
            r[f"{pre}_daemon_page_faults_per_mib"] = round(faults / (rep.bytes / MiB), 2)
            if mode != "in_place":
                while d.backlog():  # the first save's write-behind is done ...
                    time.sleep(0.05)
                c.purge_session("bench")  # ... and its chunks gone: the second stores anew
        r["save_in_place_over_arena"] = round(r["save_arena_s"] / r["save_s"], 3)
        st = d.status()
        r["save_daemon"] = {"writebehind_fallbacks": st["tiers"]["writebehind_fallbacks"],
                            **{k: v for k, v in st["tiers"].items() if k.startswith("inline_")},
                            "write_class": st["io"]["classes"]["write"]["tenants"].get("bench"),
                            "io_slots": st["io"]["slots"]}
        if dev.type == "cuda":
            r["save_gpu_peak_over_base_bytes"] = int(torch.cuda.max_memory_allocated(dev)) - base
        for t in layers:  # the blocks are reused by other requests meanwhile
            t.zero_()
        loader = KVLoader(c, layout, fp, layer_groups=1, inflight=inflight)
        staging: list[torch.Tensor] = []
        times = []
        for _ in range(3):
            sync(dev)
            t0 = time.perf_counter()
            dest = PagedDestination(paged, perm, batch=batch, staging=staging)
            lrep = loader.load_into(keys, dest)
            loader.synchronize()
            times.append(time.perf_counter() - t0)
            assert lrep.chunks == chunks, lrep
        r["load_s"] = min(times)
        r["load_s_all"] = [round(x, 4) for x in times]
        r["load_bytes_per_s"] = nbytes / r["load_s"]
        r["load_mapped_chunks"] = lrep.mapped
        got = torch.empty((L, 2, H, T, D), dtype=layout.dtype, device=dev)
        for c_, w in zip(sample, want, strict=True):
            src.gather(c_, got)
            if not torch.equal(got, w):
                raise SystemExit(f"{order} {tokens}: chunk {c_} differs after the load")
        r["verified_chunks"] = len(sample)
        loader.close()
        c.purge_session("bench")  # the next run's chunks get the whole DRAM tier
        if keyring is not None:  # the same, sealed
            from kvtier.client.crypto import FrameCipher

            cipher = FrameCipher(c, keyring, "bench", scope="tenant")
            ekeys = [bytes([k[0] ^ 0xFF]) + k[1:] for k in keys]
            saver = KVSaver(c, layout, fp, slots=save_slots, cipher=cipher)
            t0 = time.perf_counter()
            saver.save_chunks("bench-enc", ekeys, src)
            sync(dev)
            r["save_enc_s"] = time.perf_counter() - t0
            saver.close()
            for t in layers:
                t.zero_()
            loader = KVLoader(c, layout, fp, layer_groups=1, inflight=inflight, cipher=cipher)
            r["decrypt_on"] = "gpu" if loader.gpu_decrypt else "cpu"
            times = []
            for _ in range(3):
                sync(dev)
                t0 = time.perf_counter()
                dest = PagedDestination(paged, perm, batch=batch, staging=staging)
                loader.load_into(ekeys, dest)
                loader.synchronize()
                times.append(time.perf_counter() - t0)
            r["load_enc_s"] = min(times)
            r["load_enc_s_all"] = [round(x, 4) for x in times]
            r["load_enc_vs_plain"] = round(r["load_s"] / r["load_enc_s"], 3)
            for c_, w in zip(sample, want, strict=True):
                src.gather(c_, got)
                if not torch.equal(got, w):
                    raise SystemExit(f"{order} {tokens}: sealed chunk {c_} differs")
            loader.close()
            cipher.close()
            c.purge_session("bench-enc")
        del staging, dest, want, got
        sync(dev)
        r["gpu_after_release_over_base_bytes"] = gpu_mem(dev) - base
    del paged, src, layers
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-7b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", default="131072,409600")
    ap.add_argument("--layouts", default="LBNHC,BLNHC")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--save-slots", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="chunk-groups per staging buffer")
    ap.add_argument("--encrypt", action="store_true",
                    help="also save and load sealed chunks (AES-256-GCM; opened on the GPU "
                         "where CUDA and Triton are, else on the host's cores)")
    ap.add_argument("--populate", action="store_true",
                    help="kvtierd faults its DRAM tier in at start (as a production daemon's "
                         "default [dram] populate = true does)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dir", default=None, help="work dir for kvtierd (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny shape, 8k tokens, CPU")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.tokens, args.device = "tiny", "8192", "cpu"
        args.block_size, args.chunk_tokens = 32, 128
    dev = torch.device(args.device)
    L, H, D = SHAPES[args.model]
    layout = KVLayout(L, H, D, torch.bfloat16, args.chunk_tokens)
    contexts = [int(x) for x in args.tokens.split(",")]
    orders = args.layouts.split(",")
    for o in orders:
        if o not in LAYOUTS:
            raise SystemExit(f"unknown layout {o!r}; one of {sorted(LAYOUTS)}")
    kv_max = max(contexts) // args.chunk_tokens * layout.chunk_bytes
    seg = 256 * MiB if kv_max > 4 * GiB else 16 * MiB
    dram = int(math.ceil(kv_max * 1.15 / seg) + 8) * seg
    work = tempfile.mkdtemp(prefix="kvtier-paged-", dir=args.dir)
    arena = ((args.inflight + 2 * args.save_slots) * layout.chunk_bytes + 64 * MiB) // 4096 * 4096
    arena = min(arena, GiB)
    d = BenchDaemon(work, dram=dram, pool=2 * seg * 8 + MiB, segment=seg, ack="memory",
                    populate=args.populate, arena_max=GiB, io_threads=min(16, os.cpu_count() or 4))
    d.start()
    rng = torch.Generator().manual_seed(7)
    results = []
    keyring = None
    if args.encrypt:
        from kvtier.client.crypto import Keyring

        keyring = Keyring(os.path.join(work, "keyring.json"))
    try:
        with Client.connect(d.sock, "bench", TOKEN, arena_size=arena) as c:
            rates = copy_rates(c, dev, min(arena // 2, GiB))
        if dev.type == "cuda":
            rates.update(crc_rates(layout, dev))
        for tokens in contexts:
            for order in orders:
                r = run_one(d, layout, order, tokens, args.block_size, dev, arena, rng,
                            args.inflight, args.save_slots, args.batch, keyring)
                r["load_vs_h2d"] = round(r["load_bytes_per_s"] / rates["h2d_bytes_per_s"], 3)
                r["save_vs_d2h"] = round(r["save_bytes_per_s"] / rates["d2h_bytes_per_s"], 3)
                r["save_arena_vs_d2h"] = round(r["save_arena_bytes_per_s"]
                                               / rates["d2h_bytes_per_s"], 3)
                if "save_daemon_crcs_bytes_per_s" in r:
                    r["save_daemon_crcs_vs_d2h"] = round(r["save_daemon_crcs_bytes_per_s"]
                                                         / rates["d2h_bytes_per_s"], 3)
                results.append(r)
                if not args.json:
                    print(f"{order} {r['tokens']:>8} tokens {r['kv_bytes'] / 1e9:6.2f} GB: "
                          f"load {r['load_s']:.3f} s {r['load_bytes_per_s'] / 1e9:5.1f} GB/s "
                          f"({r['load_vs_h2d']:.2f} of H2D), save {r['save_s']:.2f} s "
                          f"{r['save_bytes_per_s'] / 1e9:5.2f} GB/s ({r['save_vs_d2h']:.2f} "
                          f"of D2H; {r['save_in_place_over_arena']:.2f}x the arena PUTs' "
                          f"{r['save_arena_bytes_per_s'] / 1e9:.2f} GB/s)", flush=True)
    finally:
        d.stop()
    out = {"model": args.model, "device": str(dev), "save_slots": args.save_slots,
           "inflight": args.inflight, "batch": args.batch, "populate": args.populate,
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
           "block_size": args.block_size, "chunk_tokens": args.chunk_tokens,
           **{k: round(v) for k, v in rates.items()}, "results": [
               {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
               for r in results]}
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
