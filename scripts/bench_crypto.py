#!/usr/bin/env python3
"""Encryption benchmark: AES-256-GCM decryption of KV frames, and loads with it on vs off.

    scripts/bench_crypto.py [--quick] [--json] [--dir DIR]

* decrypt throughput of 512 KiB frames (one layer of a 256-token qwen2.5-7b chunk) on one
  thread and on all cores, with `decrypt_into` (into a reused buffer, as the loader does)
  and with `decrypt` (a new buffer per frame); the scaling shows whether `cryptography`
  releases the GIL;
* loading chunks (28 frames each) through kvtierd's DRAM tier into the process: GET +
  decrypt with encryption on, as a ratio to GET alone with it off, same run, same data.

`--json` prints every figure as one JSON object on the last line.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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


def main() -> int:
    ap = bench_arguments(__doc__)
    args = ap.parse_args()
    console = Console(stderr=args.json)
    fig: dict[str, float] = decrypt_rates(1.0 if args.quick else 3.0)
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
