"""`kvtier demo`: a client round trip through a running kvtierd.

Saves the KV cache of a simulated prompt as chained chunks (one frame per layer) through
the shared-memory ring, drops nothing but forgets it locally, then -- as turn 2 -- looks up
the longest stored prefix of a longer prompt and loads it back layer by layer, checking
every byte.  Prints throughput, the tier each chunk came from, and where things are.
"""

from __future__ import annotations

import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier.client.client import Client
from kvtier.client.crypto import OVERHEAD, FrameCipher, Keyring
from kvtier.client.keys import chunk_keys, model_fingerprint
from kvtier.client.protocol import Tier
from kvtier.daemon.sizes import format_size

LAYERS, KV_HEADS, HEAD_DIM, CHUNK = 8, 4, 128, 256
FRAME = CHUNK * KV_HEADS * HEAD_DIM * 2 * 2  # K+V, fp16: 512 KiB per layer per chunk


def _chunk(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYERS * FRAME, dtype=np.uint8)


def run_client_demo(socket_path: str, token: str, tenant: str = "default",
                    prompt_tokens: int = 16384, keyring_path: str | None = None) -> int:
    """Save a prompt's KV chunks, look them up, load them back, check every byte.

    Where the tenant's policy is `encryption = "on"` the frames are sealed with a data key
    from the keyring at `keyring_path` (created on first use) and opened on the way back."""
    console = Console()
    fp = model_fingerprint("demo-8l", dtype="float16", num_layers=LAYERS,
                           num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    seed = int(time.time())
    tokens = np.random.default_rng(seed).integers(0, 150_000, prompt_tokens, dtype=np.uint32)
    keys = chunk_keys(tokens, fp, chunk_tokens=CHUNK)
    session = f"demo-{seed}"
    with Client.connect(socket_path, tenant, token, arena_size=64 << 20) as c:
        cipher = None
        if c.encryption == "on":
            if keyring_path is None:
                console.print(f"tenant {tenant}'s policy is encryption = \"on\": "
                              f"give the demo a keyring")
                return 1
            cipher = FrameCipher(c, Keyring(keyring_path), tenant)
        slot = c.allocator.alloc(LAYERS * FRAME + 8 * LAYERS)
        sealed = c.allocator.alloc(LAYERS * (FRAME + OVERHEAD) + 8 * LAYERS)
        t_put = 0.0
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("turn 1: saving KV through kvtierd", total=len(keys))
            for i, k in enumerate(keys):
                np.frombuffer(slot.view[:LAYERS * FRAME], np.uint8)[:] = _chunk(seed + i)
                t0 = time.perf_counter()
                if cipher is not None:
                    lengths = cipher.seal_into(session, k, [
                        slot.view[j * FRAME:(j + 1) * FRAME] for j in range(LAYERS)],
                        sealed.view)
                    c.put_slot(session, k, sealed, lengths, ttl_s=3600)
                else:
                    c.put_slot(session, k, slot, [FRAME] * LAYERS, ttl_s=3600)
                t_put += time.perf_counter() - t0
                prog.advance(task)
        c.allocator.free(slot)
        c.allocator.free(sealed)
        follow = np.concatenate([tokens, np.arange(700, dtype=np.uint32)])
        keys2 = chunk_keys(follow, fp, chunk_tokens=CHUNK)
        t0 = time.perf_counter()
        hit, tiers = c.lookup(keys2)
        t_lookup = time.perf_counter() - t0
        ok = hit == len(keys)
        t_get = 0.0
        from_tier: dict[str, int] = {}
        for i, k in enumerate(keys2[:hit]):
            t0 = time.perf_counter()
            if cipher is not None:
                got = b"".join(cipher.get(session, k))
                t_get += time.perf_counter() - t0
                ok &= bool(np.array_equal(np.frombuffer(got, np.uint8), _chunk(seed + i)))
            else:
                with c.get_slot(k, size=LAYERS * FRAME) as (view, frames):
                    t_get += time.perf_counter() - t0
                    ok &= frames == [FRAME] * LAYERS
                    ok &= bool(np.array_equal(np.frombuffer(view, np.uint8),
                                              _chunk(seed + i)))
            name = tiers[i].name.lower()
            from_tier[name] = from_tier.get(name, 0) + 1
        st = c.stats()
        if cipher is not None:
            cipher.close()
    total = len(keys) * LAYERS * FRAME
    t = Table(title="kvtier demo: client round trip through kvtierd", show_header=False)
    t.add_row("socket", socket_path)
    metrics = st["daemon"].get("metrics_port")
    t.add_row("metrics", f"http://127.0.0.1:{metrics}/metrics" if metrics else "off")
    t.add_row("tenant / session", f"{tenant} / {session}")
    t.add_row("encryption", "AES-256-GCM, client side" if cipher is not None else "off")
    t.add_row("turn 1 save", f"{len(keys)} chunks, {format_size(total)} in {t_put * 1000:.0f} ms "
              f"({total / t_put / 1e9:.2f} GB/s, ack={st['ack']})")
    t.add_row("turn 2 lookup", f"{hit}/{len(keys2)} chunks in {t_lookup * 1e6:.0f} us "
              f"({', '.join(f'{v} from {k}' for k, v in from_tier.items())})")
    t.add_row("turn 2 load", f"{format_size(hit * LAYERS * FRAME)} in {t_get * 1000:.0f} ms "
              f"({hit * LAYERS * FRAME / max(t_get, 1e-9) / 1e9:.2f} GB/s)")
    t.add_row("verified", "[green]all bytes match[/]" if ok else "[red]MISMATCH[/]")
    t.add_row("media pool", f"{st['media']['entries']} entries, "
              f"{format_size(st['media']['live_bytes'])} live")
    if st["dram"] is not None:
        t.add_row("dram tier", f"{st['dram']['entries']} entries, "
                  f"{format_size(st['dram']['live_bytes'])} live")
    console.print(t)
    return 0 if ok else 1


__all__ = ["Tier", "run_client_demo"]
