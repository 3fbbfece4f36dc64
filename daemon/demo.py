"""`kvtierd demo`: the embedded default pool, end to end, in one command.

Formats (or reopens) a pool file under the state dir, stores the KV cache of a
simulated prompt as chained chunks (one frame per layer), looks up the longest stored
prefix of a longer follow-up prompt, reads the prefix back layer by layer, verifies every
byte, and prints a summary.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier.client.keys import chunk_keys, model_fingerprint
from kvtier.daemon.blockdev import FileDevice, aligned_buffer
from kvtier.daemon.errors import FormatError
from kvtier.daemon.pool import Pool, PoolOptions
from kvtier.daemon.sizes import format_size


@dataclass
class DemoModel:
    """A small model shape (fp16 KV); one frame per layer, K and V together."""

    name: str = "demo-8l"
    layers: int = 8
    kv_heads: int = 4
    head_dim: int = 128
    chunk_tokens: int = 256

    @property
    def frame_bytes(self) -> int:
        return self.chunk_tokens * self.kv_heads * self.head_dim * 2 * 2  # K+V, fp16


def open_or_format(path: str, size: int, segment_size: int, console: Console) -> Pool:
    if os.path.exists(path):
        try:
            pool = Pool.open(FileDevice(path), options=PoolOptions())
            r = pool.recovery
            console.print(f"reopened [bold]{path}[/]: {pool.index.count} entries, recovery "
                          f"{r.seconds * 1000:.1f} ms ({r.records_replayed} records replayed)")
            return pool
        except FormatError as e:
            raise SystemExit(f"kvtierd: {e}\n(remove the file to start over)") from e
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pool = Pool.format(FileDevice(path, create_size=size), segment_size=segment_size)
    console.print(f"formatted [bold]{path}[/]: {format_size(size)}, segments of "
                  f"{format_size(segment_size)}")
    return pool


def run_demo(state_dir: str, pool_size: int, segment_size: int, prompt_tokens: int) -> int:
    console = Console()
    model = DemoModel()
    path = os.path.join(state_dir, "pool0.img")
    pool = open_or_format(path, pool_size, segment_size, console)
    fp = model_fingerprint(model.name, dtype="float16", num_layers=model.layers,
                           num_kv_heads=model.kv_heads, head_dim=model.head_dim)
    rng = np.random.default_rng(int(time.time()))
    tokens = rng.integers(0, 150_000, prompt_tokens, dtype=np.uint32)
    keys = chunk_keys(tokens, fp, chunk_tokens=model.chunk_tokens)
    fb = model.frame_bytes
    chunk = aligned_buffer(fb * model.layers)
    arr = np.frombuffer(chunk, dtype=np.uint8)

    def fill(i: int) -> None:
        arr[:] = np.random.default_rng(i + int(tokens[0])).integers(0, 256, len(arr),
                                                                    dtype=np.uint8)

    # Turn 1: save the prompt's KV, chunk by chunk.
    t_put = 0.0
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("turn 1: saving KV chunks", total=len(keys))
        for i, k in enumerate(keys):
            fill(i)
            frames = [chunk[j * fb:(j + 1) * fb] for j in range(model.layers)]
            t0 = time.perf_counter()
            pool.put("demo", "session-1", k, frames, ttl_s=3600)
            t_put += time.perf_counter() - t0
            prog.advance(task)
    # Turn 2: the same prompt plus new tokens; find the stored prefix, load it by layer.
    follow = np.concatenate([tokens, rng.integers(0, 150_000, 1000, dtype=np.uint32)])
    keys2 = chunk_keys(follow, fp, chunk_tokens=model.chunk_tokens)
    t0 = time.perf_counter()
    hit = pool.lookup_prefix("demo", keys2)
    t_lookup = time.perf_counter() - t0
    out = aligned_buffer(fb * model.layers)
    ok = True
    t_get = 0.0
    for i, k in enumerate(keys2[:hit]):
        t0 = time.perf_counter()
        for layer in range(model.layers):
            pool.get_into("demo", k, out[layer * fb:(layer + 1) * fb], frames=(layer, layer + 1))
        t_get += time.perf_counter() - t0
        fill(i)  # regenerate what was saved, outside the timing, and compare
        ok &= bytes(out) == bytes(chunk)
    total = hit * fb * model.layers
    st = pool.stats()
    pool.close()

    table = Table(title="kvtier demo: embedded default pool", show_header=False)
    table.add_row("pool", path)
    table.add_row("prompt", f"{prompt_tokens} tokens -> {len(keys)} chunks of "
                  f"{model.chunk_tokens} ({format_size(fb * model.layers)} each, "
                  f"{model.layers} frames)")
    table.add_row("turn 1 save", f"{format_size(len(keys) * fb * model.layers)} in "
                  f"{t_put * 1000:.0f} ms ({len(keys) * fb * model.layers / t_put / 1e9:.2f} GB/s)")
    table.add_row("turn 2 lookup", f"{hit}/{len(keys2)} chunks hit in {t_lookup * 1e6:.0f} us")
    table.add_row("turn 2 load", f"{format_size(total)} layer by layer in {t_get * 1000:.0f} ms "
                  f"({total / max(t_get, 1e-9) / 1e9:.2f} GB/s)")
    table.add_row("verified", "[green]all bytes match[/]" if ok else "[red]MISMATCH[/]")
    table.add_row("pool entries", str(st["entries"]))
    table.add_row("segments", ", ".join(f"{k} {v}" for k, v in st["segments"].items() if v))
    table.add_row("write amplification", f"{st['write_amplification']:.3f}")
    console.print(table)
    return 0 if ok and hit == len(keys) else 1
