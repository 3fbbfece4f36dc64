#!/usr/bin/env python3
"""Encryption benchmark: AES-256-GCM decryption of KV frames, and loads with it on vs off.

    scripts/bench_crypto.py [--quick] [--json] [--dir DIR]

* decrypt throughput of 512 KiB frames (one layer of a 256-token qwen2.5-7b chunk) on one
  thread and on all cores, with `decrypt_into` (into a reused buffer, as the loader does)
  and with `decrypt` (a new buffer per frame); the scaling shows whether `cryptography`
  releases the GIL;
* loading chunks (28 frames each) through kvtierd's DRAM tier into the process: GET +
  decrypt with encryption on, as a ratio to GET alone with it off, same run, same data;
* with a CUDA GPU: opening the same kind of frames on the GPU (kvtier.client.gcm_gpu:
  AES-CTR + GHASH + tag check in Triton kernels, ciphertext already in GPU memory, the
  plaintext written as the loader's strided cache rows), against a device-to-device
  copy of the same bytes and against the CPU's all-core rate (`--gpu-gib` sizes it);
  and whole KVLoader loads of a 128k-token qwen2.5-7b prefix from the DRAM tier: plain
  (zero-copy MAP) vs sealed and opened on the GPU vs sealed and opened on the CPU.

`--json` prints every figure as one JSON object on the last line.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from bench_daemon import TOKEN, BenchDaemon
from bench_report import bench_arguments, report
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from rich.console import Console

from kvtier.client.client import Client
from kvtier.client.crypto import FrameCipher, Keyring

MiB = 1 << 20
FRAME = 512 * 1024
FRAMES = 28


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def decrypt_rates(seconds: float) -> dict[str, float]:
    aes = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    ct = aes.encrypt(nonce, os.urandom(FRAME), b"aad")
    cores = os.cpu_count() or 1

    def loop(deadline: float, into: bool) -> int:
        out = bytearray(FRAME)  # decrypt_into: what the loader does (no allocation)
        n = 0
        while time.perf_counter() < deadline:
            if into:
                aes.decrypt_into(nonce, ct, b"aad", out)
            else:
                aes.decrypt(nonce, ct, b"aad")
            n += 1
        return n

    fig: dict[str, float] = {"cores": cores}
    for into, name in ((True, "decrypt_into"), (False, "decrypt")):
        t0 = time.perf_counter()
        one = loop(t0 + seconds, into) * FRAME / (time.perf_counter() - t0)
        with ThreadPoolExecutor(cores) as ex:
            t0 = time.perf_counter()
            futs = [ex.submit(loop, t0 + seconds, into) for _ in range(cores)]
            total = sum(f.result() for f in futs) * FRAME / (time.perf_counter() - t0)
        fig[f"{name}_1_thread_bytes_per_s"] = round(one)
        fig[f"{name}_all_cores_bytes_per_s"] = round(total)
        fig[f"{name}_scaling_all_cores_over_1"] = round(total / one, 2)
    return fig


def gpu_open_rates(gib: float, batch: int) -> dict[str, float]:
    """GcmOpener over `gib` GiB of sealed 512 KiB frames already on the GPU."""
    import torch

    from kvtier.client.crypto import FORMAT_VERSION, OVERHEAD, DecryptError, frame_aad
    from kvtier.client.gcm_gpu import FrameBatch, GcmOpener

    dev = torch.device("cuda")
    n = max(batch, int(gib * 2**30) // FRAME // batch * batch)
    dk, kid, tenant = os.urandom(32), os.urandom(16), "bench"
    aes = AESGCM(dk)
    plain = np.random.default_rng(5).integers(0, 256, FRAME, dtype=np.uint8).tobytes()
    per = FRAME + OVERHEAD
    sealed = torch.empty(n * per, dtype=torch.uint8)
    view = sealed.numpy()

    def seal(i: int) -> None:
        nonce = os.urandom(12)
        aad = frame_aad(tenant, kid, bytes(b for b in i.to_bytes(8, "little") for _ in range(2)),
                        i % 28)
        view[i * per:(i + 1) * per] = np.frombuffer(nonce + aes.encrypt(nonce, plain, aad),
                                                    dtype=np.uint8)
    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        list(ex.map(seal, range(n)))
    src = sealed.to(dev)
    # The loader's destination: rows of 64 KiB (256 tokens x 128 dims x bf16) at a pitch of
    # a 4k-token cache.
    row, pitch = 64 * 1024, 4096 * 256
    dst = torch.empty(n * FRAME // row * pitch // 16 + pitch, dtype=torch.uint8, device=dev)
    op = GcmOpener(tenant, dev)
    idx = np.arange(n)
    refs = FrameBatch(idx * per, (idx // 16) * (FRAME // row) * pitch + (idx % 16) * row,
                      idx.astype("<u8").view(np.uint8).reshape(n, 8).repeat(2, axis=1),
                      (idx % 28).astype(np.uint32))

    def part(b: int, e: int) -> FrameBatch:
        return FrameBatch(refs.src[b:e], refs.dst[b:e], refs.keys[b:e], refs.index[b:e])

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in range(0, n, batch):
            op.open(kid, dk, FORMAT_VERSION, src, part(b, b + batch), FRAME, dst, row, pitch)
        assert op.check() == n
        return time.perf_counter() - t0
    run()  # compiles the kernels
    best = min(run() for _ in range(3))
    last = int(refs.dst[-1])
    assert dst[last:last + row].cpu().numpy().tobytes() == plain[:row], "GPU plaintext differs"
    src[int(refs.src[-1]) + 1000] ^= 1  # one flipped bit: the GPU's tag check must refuse it
    op.open(kid, dk, FORMAT_VERSION, src, part(n - batch, n), FRAME, dst, row, pitch)
    try:
        op.check()
        raise AssertionError("a tampered frame opened on the GPU")
    except DecryptError:
        pass
    copy = torch.empty_like(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        copy.copy_(src)
    torch.cuda.synchronize()
    d2d = 3 * src.numel() / (time.perf_counter() - t0)
    return {"gpu_open_bytes_per_s": round(n * FRAME / best),
            "gpu_open_frames": n, "gpu_open_batch_frames": batch,
            "gpu_d2d_copy_bytes_per_s": round(d2d)}


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for b, e in sorted(spans):
        if out and b <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((b, e))
    return out


def gpu_timeline(prof: Any, name: str) -> dict[str, float]:
    """What the GPU did during one profiled load (torch.profiler, CUDA activity): the span
    from the first to the last device operation, the time host-to-device copies ran, the
    time kernels ran, the time both ran at once, and the time neither did (every figure
    in seconds, `trace_<name>_...`).  The largest idle gaps go to stderr."""
    import torch

    h2d: list[tuple[float, float]] = []
    kern: list[tuple[float, float]] = []
    streams: dict[str, set[Any]] = {"h2d": set(), "kernel": set()}
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start / 1e6, e.time_range.end / 1e6)
        kind = "h2d" if e.name.startswith("Memcpy HtoD") else "kernel"
        (h2d if kind == "h2d" else kern).append(span)
        streams[kind].add(getattr(e, "device_resource_id", None))
    both = _union(h2d + kern)
    if not both:
        return {}
    t0, t1 = both[0][0], both[-1][1]
    busy_c = sum(e - b for b, e in _union(h2d))
    busy_k = sum(e - b for b, e in _union(kern))
    busy = sum(e - b for b, e in both)
    gaps = sorted(((b2 - e1, e1 - t0) for (_, e1), (b2, _) in itertools.pairwise(both)),
                  reverse=True)[:8]
    print(f"[{name}] {len(h2d)} H2D copies on streams {sorted(map(str, streams['h2d']))}, "
          f"{len(kern)} kernels on {sorted(map(str, streams['kernel']))}; largest idle "
          f"gaps (s, at s): " + ", ".join(f"{g:.5f}@{a:.4f}" for g, a in gaps),
          file=sys.stderr)
    p = f"trace_{name}_"
    return {p + "gpu_span_s": round(t1 - t0, 4), p + "h2d_busy_s": round(busy_c, 4),
            p + "kernel_busy_s": round(busy_k, 4),
            p + "overlap_s": round(busy_c + busy_k - busy, 4),
            p + "idle_s": round((t1 - t0) - busy, 4)}


def gpu_load_rates(work: str, chunks: int, batches: list[int], profile: bool,
                   device: str = "cuda", layout: Any = None,
                   trace: bool = False) -> dict[str, float]:
    """KVLoader loads of a qwen2.5-7b-shaped prefix (`chunks` x 256 tokens, 2 layer groups)
    from kvtierd's DRAM tier to the GPU: plain (zero-copy MAP), sealed and opened by the
    GPU's kernels (per `gpu_batch`), sealed and opened on all CPU cores.  Each figure is the
    best of 3 loads after one warm-up, from `load` until the data is on the device and
    (sealed) every tag is checked; the loaded cache is compared with what was saved."""
    import cProfile
    import pstats

    import torch

    from kvtier.client.gpu import KVLayout, KVLoader, KVSaver

    dev = torch.device(device)
    lay = layout or KVLayout(28, 4, 128, torch.bfloat16)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()
    tokens = chunks * lay.chunk_tokens
    ids = [(i * 7919) % 150000 for i in range(tokens)]
    g = torch.Generator(device=dev).manual_seed(1)
    cache = [tuple(torch.randn((1, lay.num_kv_heads, tokens, lay.head_dim), generator=g,
                               device=dev,
                               dtype=torch.bfloat16) for _ in range(2))
             for _ in range(lay.num_layers)]
    kv = chunks * lay.chunk_bytes
    seg = 256 * MiB
    d = BenchDaemon(work, dram=int(-(-(2.3 * kv) // seg) + 32) * seg,
                    pool=int(-(-(2.3 * kv) // seg) + 16) * seg, segment=seg, ack="memory",
                    populate=False, arena_max=2 << 30, io_threads=16)
    fig: dict[str, float] = {"loader_chunks": chunks, "loader_kv_bytes": kv}
    try:
        d.start()
        with Client.connect(d.sock, "bench", TOKEN, arena_size=1 << 30) as c:
            cipher = FrameCipher(c, Keyring(os.path.join(work, "keyring.json")), "bench")
            plain_fp, sealed_fp = lay.fingerprint("bench-plain"), lay.fingerprint("bench-enc")
            KVSaver(c, lay, plain_fp).save("p", ids, cache)
            KVSaver(c, lay, sealed_fp, cipher=cipher).save("e", ids, cache)

            def timed(fp: bytes, prof: cProfile.Profile | None = None,
                      traced: str = "", **kw: object) -> float:
                loader = KVLoader(c, lay, fp, layer_groups=2, inflight=32, **kw)
                best = float("inf")
                for i in range(4):
                    sync()
                    t0 = time.perf_counter()
                    if prof is not None and i == 3:
                        prof.enable()
                    out, rep = loader.load(ids, dev)
                    loader.wait_all()
                    sync()
                    if prof is not None and i == 3:
                        prof.disable()
                    if i:
                        best = min(best, time.perf_counter() - t0)
                    else:
                        assert rep.tokens == tokens, rep
                        for li in (0, lay.num_layers - 1):
                            assert torch.equal(out[li][1], cache[li][1]), "loaded != saved"
                    del out
                if traced and dev.type == "cuda":  # one more load, not timed, traced
                    from torch.profiler import ProfilerActivity
                    from torch.profiler import profile as torch_profile
                    with torch_profile(activities=[ProfilerActivity.CUDA]) as tp:
                        out, rep = loader.load(ids, dev)
                        loader.wait_all()
                        sync()
                    del out
                    fig.update(gpu_timeline(tp, traced))
                loader.close()
                return best

            fig["load_plain_map_s"] = round(timed(plain_fp, traced="plain" if trace else ""), 4)
            for b in batches:
                prof = cProfile.Profile() if profile and b == batches[0] else None
                fig[f"load_gpu_decrypt_batch{b}_s"] = round(
                    timed(sealed_fp, prof, traced=f"gpu_batch{b}" if trace else "",
                          cipher=cipher, decrypt="gpu", gpu_batch=b), 4)
                fig[f"load_gpu_decrypt_batch{b}_ratio_to_plain"] = round(
                    fig["load_plain_map_s"] / fig[f"load_gpu_decrypt_batch{b}_s"], 3)
                if prof is not None:
                    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)
            fig["load_cpu_decrypt_s"] = round(timed(sealed_fp, cipher=cipher, decrypt="cpu"), 4)
            fig["load_cpu_decrypt_ratio_to_plain"] = round(
                fig["load_plain_map_s"] / fig["load_cpu_decrypt_s"], 3)
            cipher.close()
    finally:
        d.stop()
    return fig


def main() -> int:
    ap = bench_arguments(__doc__)
    ap.add_argument("--gpu-gib", type=float, default=2.0,
                    help="sealed GiB opened on the GPU (default 2; CUDA only)")
    ap.add_argument("--gpu-batch", type=int, default=112,
                    help="frames per GPU kernel launch (default 112: 8 chunk-groups)")
    ap.add_argument("--loader-chunks", type=int, default=512,
                    help="256-token chunks per loader figure (default 512: 128k tokens)")
    ap.add_argument("--loader-batches", default="8,32",
                    help="gpu_batch values for the GPU-opened loads (default 8,32)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile one GPU-opened load (first batch value), to stderr")
    ap.add_argument("--trace", action="store_true",
                    help="trace one more load of each kind on the GPU (torch.profiler): "
                         "copy, kernel, overlap and idle time as trace_* figures")
    args = ap.parse_args()
    console = Console(stderr=args.json)
    fig: dict[str, float] = decrypt_rates(1.0 if args.quick else 3.0)
    if _cuda():
        fig.update(gpu_open_rates(0.25 if args.quick else args.gpu_gib, args.gpu_batch))
        fig["gpu_open_ratio_to_cpu_all_cores"] = round(
            fig["gpu_open_bytes_per_s"] / fig["decrypt_into_all_cores_bytes_per_s"], 2)
        lwork = tempfile.mkdtemp(prefix="kvtier-crypto-load-", dir=args.dir)
        try:
            fig.update(gpu_load_rates(lwork, 64 if args.quick else args.loader_chunks,
                                      [int(b) for b in args.loader_batches.split(",")],
                                      args.profile, trace=args.trace))
        finally:
            shutil.rmtree(lwork, ignore_errors=True)
    chunks = 16 if args.quick else 64
    work = tempfile.mkdtemp(prefix="kvtier-crypto-", dir=args.dir)
    d = BenchDaemon(work, dram=(2048 if args.quick else 4096) * MiB, pool=4096 * MiB,
                    segment=64 * MiB)
    try:
        d.start()
        rng = np.random.default_rng(3)
        data = [[rng.integers(0, 256, FRAME, dtype=np.uint8) for _ in range(FRAMES)]
                for _ in range(chunks)]
        with Client.connect(d.sock, "bench", TOKEN, arena_size=512 * MiB) as c:
            cipher = FrameCipher(c, Keyring(os.path.join(work, "keyring.json")), "bench")
            for i, frames in enumerate(data):
                c.put("plain", b"p" * 8 + i.to_bytes(8, "little"), frames)
                cipher.put("sealed", b"s" * 8 + i.to_bytes(8, "little"), frames)
            plain_s, sealed_s = [], []
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(chunks):
                    with c.get_slot(b"p" * 8 + i.to_bytes(8, "little")) as (_v, _fl):
                        pass
                plain_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for i in range(chunks):
                    out = cipher.get("sealed", b"s" * 8 + i.to_bytes(8, "little"))
                sealed_s.append(time.perf_counter() - t0)
            assert out == [f.tobytes() for f in data[-1]]
            cipher.close()
        nbytes = chunks * FRAMES * FRAME
        fig["load_plain_bytes_per_s"] = round(nbytes / min(plain_s))
        fig["load_encrypted_bytes_per_s"] = round(nbytes / min(sealed_s))
        fig["load_encrypted_ratio_to_plain"] = round(min(plain_s) / min(sealed_s), 3)
    finally:
        d.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(console, "kvtier encryption" + (" (--quick)" if args.quick else ""), fig, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
