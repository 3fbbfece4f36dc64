"""Paged KV caches (vLLM's) as a destination and a source of kvtier chunks, on CPU tensors.

The same frames whatever produced them: a paged cache saved through a real kvtierd loads
into a transformers-style contiguous cache and back into other blocks bit for bit, in every
physical layout vLLM 0.32 can resolve, with the layers in one allocation or apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from harness import TOKENS, Daemon  # noqa: E402

from kvtier.client.client import Client  # noqa: E402
from kvtier.client.crypto import FrameCipher, Keyring  # noqa: E402
from kvtier.client.gpu import (  # noqa: E402
    ContiguousDestination,
    KVLayout,
    KVLoader,
    KVSaver,
)
from kvtier.client.keys import chunk_keys  # noqa: E402
from kvtier.client.paged import (  # noqa: E402
    LayoutError,
    PagedDestination,
    PagedKV,
    PagedSource,
    layer_index,
)

REPO = Path(__file__).resolve().parent.parent
L, H, D, N, T = 3, 2, 8, 4, 16
LAYOUT = KVLayout(L, H, D, torch.float32, T)
ORDERS = {"LBHNC": (0, 1, 2, 3, 4), "LBNHC": (0, 1, 3, 2, 4), "BLNHC": (1, 0, 3, 2, 4),
          "BHLNC": (1, 2, 0, 3, 4)}


def cache(order: str, blocks: int = 40) -> list[torch.Tensor]:
    logical = (L, blocks, H, N, 2 * D)
    perm = ORDERS[order]
    phys = torch.zeros([logical[d] for d in perm])
    view = phys.permute([perm.index(d) for d in range(5)])
    return [view[li] for li in range(L)]


def apart(blocks: int = 40) -> list[torch.Tensor]:
    """Each layer its own allocation (no common 5-D view)."""
    return [torch.zeros(blocks, H, N, 2 * D) for _ in range(L)]


@pytest.mark.parametrize("order", [*ORDERS, "apart"])
def test_scatter_then_gather_is_the_identity(order: str) -> None:
    layers = apart() if order == "apart" else cache(order)
    paged = PagedKV(layers, LAYOUT)
    assert (paged.stacked is None) == (order == "apart")
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(3, L, 2, H, T, D, generator=g)
    rows = [[5, 9, 2, 7], [11, 12, 13, 14], [20, 3, 1, 0]]
    dest = PagedDestination(paged, rows, batch=2)
    for c in range(3):
        dest.target(c, 0, L, None).copy_(frames[c])
    dest.flush(None)
    # The layout is vLLM's: block b holds tokens [jN, (j+1)N) of its chunk, K then V.
    assert torch.equal(layers[2][rows[1][1], 1, 2, D:], frames[1, 2, 1, 1, N + 2])
    assert torch.equal(layers[0][rows[2][3], 0, :, :D], frames[2, 0, 0, 0, 3 * N:])
    out = torch.empty(L, 2, H, T, D)
    src = PagedSource(paged, rows)
    for c in range(3):
        src.gather(c, out)
        assert torch.equal(out, frames[c])
    many = torch.empty(2, L, 2, H, T, D)  # a save's group: chunks 1 and 2 at once
    src.gather_many(1, 2, many)
    assert torch.equal(many, frames[1:])


def test_blocks_marked_minus_one_are_left_alone() -> None:
    layers = cache("LBNHC")
    paged = PagedKV(layers, LAYOUT)
    before = [t.clone() for t in layers]
    frames = torch.randn(1, L, 2, H, T, D)
    dest = PagedDestination(paged, [[-1, 30, -1, 31]])
    dest.target(0, 0, L, None).copy_(frames[0])
    dest.flush(None)
    for li in range(L):
        changed = (layers[li] != before[li]).flatten(1).any(1).nonzero().flatten().tolist()
        assert changed == [30, 31]
        assert torch.equal(layers[li][31, :, :, D:], frames[0, li, 1, :, 3 * N:])


def test_layer_groups_and_batches_land_in_place() -> None:
    """Frames [a, b) of many chunks, in batches that a change of group cuts short."""
    layers = cache("BLNHC", blocks=64)
    paged = PagedKV(layers, LAYOUT)
    frames = torch.randn(5, L, 2, H, T, D)
    rows = [[4 * c + j for j in range(4)][::-1] for c in range(5)]
    dest = PagedDestination(paged, rows, batch=3)
    for a, b in ((0, 1), (1, 3)):
        for c in range(5):
            dest.target(c, a, b, None).copy_(frames[c, a:b])
        dest.flush(None)
    out = torch.empty(L, 2, H, T, D)
    for c in range(5):
        PagedSource(paged, rows).gather(c, out)
        assert torch.equal(out, frames[c])


def test_layouts_that_do_not_fit_are_refused_by_name() -> None:
    with pytest.raises(LayoutError, match="2 KV cache tensors for a model of 3 layers"):
        PagedKV(cache("LBNHC")[:2], LAYOUT)
    with pytest.raises(LayoutError, match="KV heads"):
        PagedKV([torch.zeros(8, H + 1, N, 2 * D) for _ in range(L)], LAYOUT)
    with pytest.raises(LayoutError, match="multiple of vLLM's block size"):
        PagedKV([torch.zeros(8, H, 5, 2 * D) for _ in range(L)], LAYOUT)
    with pytest.raises(LayoutError, match="float64"):
        PagedKV([torch.zeros(8, H, N, 2 * D, dtype=torch.float64) for _ in range(L)], LAYOUT)
    with pytest.raises(ValueError, match="takes 4 blocks"):
        PagedDestination(PagedKV(cache("LBNHC"), LAYOUT), [[1, 2]])
    assert layer_index("model.layers.12.self_attn.attn") == 12
    with pytest.raises(LayoutError, match="no layer index"):
        layer_index("lm_head")


def test_from_vllm_orders_layers_by_index_and_drops_shared_ones() -> None:
    layers = cache("LBNHC")
    names = {f"model.layers.{i}.self_attn.attn": t for i, t in reversed(list(enumerate(layers)))}
    paged = PagedKV.from_vllm(names, LAYOUT)
    assert [t.data_ptr() for t in paged.layers] == [t.data_ptr() for t in layers]
    names["model.layers.3.self_attn.attn"] = layers[2]  # cross-layer KV sharing
    assert len(PagedKV.from_vllm(names, LAYOUT).layers) == L


@pytest.mark.parametrize("encrypted,decrypt", [(False, "cpu"), (True, "cpu"), (True, "gpu")])
def test_paged_and_contiguous_caches_share_one_format(daemon: Daemon, tmp_path: Path,
                                                       encrypted: bool, decrypt: str) -> None:
    """Saved from paged blocks, loaded into a contiguous cache and into other blocks;
    saved from a contiguous (transformers) cache, loaded into paged blocks."""
    if decrypt == "gpu" and not torch.cuda.is_available() and \
            os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the GPU opener's kernels need a GPU or Triton's interpreter")
    pytest.importorskip("triton") if decrypt == "gpu" else None
    daemon.tenants = {"alice": {"encryption": "on" if encrypted else "off"}}
    daemon.start()
    g = torch.Generator().manual_seed(3)
    src_layers = cache("LBNHC")
    for t in src_layers:
        t.copy_(torch.randn(t.shape, generator=g))
    paged = PagedKV(src_layers, LAYOUT)
    fp = LAYOUT.fingerprint("paged-test")
    keys = chunk_keys(list(range(4 * T)), fp, chunk_tokens=T)
    rows = [[3, 1, 4, 15], [9, 2, 6, 5], [35, 8, 10, 7], [32, 38, 24, 16]]
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20) as c:
        cipher = FrameCipher(c, Keyring(str(tmp_path / "kr.json")), "alice") \
            if encrypted else None
        saver = KVSaver(c, LAYOUT, fp, cipher=cipher, slots=6)  # in groups of 3 chunks
        rep = saver.save_chunks("s", keys, PagedSource(paged, rows))
        assert rep.chunks == 4 and rep.bytes == 4 * LAYOUT.chunk_bytes
        saver.close()
        kw = {"decrypt": decrypt, "gpu_batch": 3} if encrypted else {}
        for groups in (1, 2):
            loader = KVLoader(c, LAYOUT, fp, layer_groups=groups, inflight=3, cipher=cipher,
                              session="s", **kw)
            # Into a contiguous cache [layer, K/V, 1, head, token, dim].
            kv = torch.zeros(L, 2, 1, H, 4 * T, D)
            loader.load_into(keys, ContiguousDestination(kv, T))
            loader.synchronize()
            other = PagedKV(cache("BLNHC"), LAYOUT)
            rows2 = [[4 * i + j for j in range(4)] for i in range(4)]
            loader.load_into(keys, PagedDestination(other, rows2, batch=3))
            loader.synchronize()
            loader.close()
            for ci in range(4):
                want = torch.empty(L, 2, H, T, D)
                PagedSource(paged, rows).gather(ci, want)
                got = torch.empty(L, 2, H, T, D)
                PagedSource(other, rows2).gather(ci, got)
                assert torch.equal(got, want)
                assert torch.equal(kv[:, :, 0, :, ci * T:(ci + 1) * T], want)


def test_bench_paged_quick(tmp_path: Path) -> None:
    """The H200 benchmark's code path, tiny, on the CPU: it checks every load itself."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_paged.py"), "--quick",
                          "--json", "--dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["layout"] for r in res["results"]} == {"LBNHC", "BLNHC"}
    for r in res["results"]:
        assert r["verified_chunks"] > 0 and r["load_bytes_per_s"] > 0
        assert r["save_bytes_per_s"] > 0 and r["paged_stacked"]
