"""Saves and loads give back what they take (issue: a 1M-token load leaked 58 GB of GPU
memory): over 20 turns with one reused loader and saver, no earlier turn's cache stays
alive once its caller drops it, the arena returns to its baseline when they close, and a
save's device staging is a few chunks whatever the prefix length.  CPU tensors here; the
same bookkeeping holds CUDA memory on a GPU (bench_paged reports it there)."""

from __future__ import annotations

import gc
import weakref

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from harness import TOKENS, Daemon  # noqa: E402

from kvtier.client import Client, KVLayout, KVLoader, KVSaver, finish_resume, resume  # noqa: E402
from kvtier.client.gpu import cache_layer  # noqa: E402

T = 16


def _tiny_model():  # type: ignore[no-untyped-def]
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def test_twenty_turns_hold_nothing_from_earlier_turns(daemon: Daemon) -> None:
    daemon.start()
    model = _tiny_model()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("release-test")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, 4 * T + 5), generator=g)
    gc.collect()
    gc.disable()
    try:
        _twenty_turns(daemon, model, layout, fp, g, ids)
    finally:
        gc.enable()


def _twenty_turns(daemon: Daemon, model: object, layout: KVLayout, fp: bytes,
                  g: torch.Generator, ids: torch.Tensor) -> None:
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20) as c:
        free0 = c.allocator.free_bytes
        saver = KVSaver(c, layout, fp)
        loader = KVLoader(c, layout, fp, inflight=3)
        held = c.allocator.free_bytes
        earlier: list[weakref.ref[torch.Tensor]] = []
        for turn in range(20):
            with torch.no_grad():
                cache = model(ids, use_cache=True).past_key_values
            rep = saver.save(f"conv-{turn % 3}", ids[0], cache)
            assert rep.chunks + rep.skipped == ids.shape[1] // T
            # Staging for a save: `slots` chunk buffers, whatever the prefix.
            assert sum(t.numel() * t.element_size() for t in saver._staging) == \
                len(saver.slots) * layout.chunk_bytes
            ids = torch.cat([ids, torch.randint(0, 300, (1, T), generator=g)], dim=1)
            res = resume(model, loader, ids[0])
            assert res.prefix_tokens == (ids.shape[1] - T) // T * T
            with torch.no_grad():
                model(ids[:, res.prefix_tokens:], past_key_values=res.cache)
            finish_resume(loader)
            k0 = cache_layer(res.cache, 0)[0]  # a view of the load's one allocation
            earlier.append(weakref.ref(k0._base if k0._base is not None else k0))
            del k0
            # No gc.collect(): a cache must go when its last reference does, not when the
            # collector runs (a cycle held 58 GB of a 1M-token load on the H200).
            del res, cache
            assert all(r() is None for r in earlier), f"turn {turn}: an earlier cache lives on"
            assert c.allocator.free_bytes == held  # no slot taken and not given back
        saver.close()
        loader.close()
        assert c.allocator.free_bytes == free0


def _memfd_mappings() -> list[str]:
    """This process's mappings of memfds (the daemon's rings, arena and DRAM tier)."""
    with open("/proc/self/maps") as maps:
        return [ln.split(None, 5)[-1].strip() for ln in maps if "/memfd:" in ln]


def test_closed_client_unmaps_the_daemons_memory_at_once(daemon: Daemon) -> None:
    """A closed client held on to the daemon's memfds until the garbage collector reached
    it (a cycle through its close hooks): on the H200, each daemon restart in one process
    left the old DRAM tier resident (35 GB each) until the machine ran out of memory.  With
    the collector off, close() alone unmaps the rings, the arena and the DRAM mapping,
    after a save and a load through them."""
    daemon.start()
    model = _tiny_model()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("unmap-test")
    ids = torch.randint(0, 300, (1, 4 * T + 3), generator=torch.Generator().manual_seed(2))
    before = _memfd_mappings()
    gc.collect()
    gc.disable()
    try:
        c = Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20)
        mapped = [m for m in _memfd_mappings() if m not in before]
        assert len(mapped) >= 4, mapped  # sq, cq, arena, DRAM
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        saver = KVSaver(c, layout, fp)
        saver.save("unmap", ids[0], cache)
        saver.close()
        loader = KVLoader(c, layout, fp, inflight=2)
        res = resume(model, loader, ids[0])
        assert res.prefix_tokens == 4 * T
        finish_resume(loader)
        loader.close()
        c.close()
        assert [m for m in _memfd_mappings() if m not in before] == []
    finally:
        gc.enable()


def test_close_with_a_live_view_of_the_arena_warns_and_keeps_it_mapped(daemon: Daemon) -> None:
    """Unmapping memory a live tensor points at would crash the process: close() leaves
    that mapping, says so, and the rest is unmapped."""
    daemon.start()
    before = _memfd_mappings()
    c = Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20)
    held = torch.frombuffer(c.arena[:4096], dtype=torch.uint8)
    held.fill_(7)
    with pytest.warns(ResourceWarning, match="arena"):
        c.close()
    left = [m for m in _memfd_mappings() if m not in before]
    assert len(left) == 1 and "arena" in left[0], left
    assert int(held.sum()) == 7 * 4096  # still readable, not unmapped under it
    del held, c
    gc.collect()
    assert [m for m in _memfd_mappings() if m not in before] == []


def test_a_cache_built_empty_over_buffers_grows_in_them() -> None:
    """build_cache with empty leading views of preallocated buffers (a turn 1 prefilled in
    chunks, as bench_turn2 does at 1M tokens): every chunk is written into the buffers,
    none torch.cat'ed into a new tensor.  (An empty view's data_ptr() is 0, which once
    made every such cache concatenate: at 1M tokens a second 58 GB, and CUDA OOM.)"""
    from kvtier.client.gpu import build_cache

    model = _tiny_model()
    cfg = model.config
    shape = (1, 2, 200, 16)
    bufs = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(2)]
    cache = build_cache([(k[:, :, :0], v[:, :, :0]) for k, v in bufs], cfg, bufs)
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for s in range(0, 150, 40):
            model(ids[:, s:s + 40], past_key_values=cache, use_cache=True)
        want = model(ids, use_cache=True).past_key_values
    for i, (kbuf, vbuf) in enumerate(bufs):
        k, v = cache_layer(cache, i)
        assert k.shape[-2] == 150
        assert k.untyped_storage().data_ptr() == kbuf.untyped_storage().data_ptr()
        assert v.untyped_storage().data_ptr() == vbuf.untyped_storage().data_ptr()
        assert torch.allclose(kbuf[:, :, :150], cache_layer(want, i)[0], atol=1e-5)
    # Dropped, it is gone at once (no reference cycle through the in-place update).
    gc.disable()
    try:
        alive = weakref.ref(cache.layers[0])
        del cache, k, v
        assert alive() is None
    finally:
        gc.enable()


def test_a_saver_or_loader_dropped_unclosed_gives_its_arena_slots_back(daemon: Daemon) -> None:
    """`KVSaver(c, ...).save(...)` in a loop (no close) once kept every saver's slots until
    the arena was full; dropped, a saver or loader gives them back at once (gc off)."""
    daemon.start()
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                      chunk_tokens=T)
    fp = layout.fingerprint("unclosed")
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=8 << 20) as c:
        free0 = c.allocator.free_bytes
        gc.collect()
        gc.disable()
        try:
            for _ in range(3):
                KVSaver(c, layout, fp, slots=4)
                assert c.allocator.free_bytes == free0
                loader = KVLoader(c, layout, fp, inflight=3)
                assert c.allocator.free_bytes < free0
                del loader
                assert c.allocator.free_bytes == free0
            saver = KVSaver(c, layout, fp)
            saver.close()
            del saver  # closed, then collected: nothing freed twice
            assert c.allocator.free_bytes == free0
        finally:
            gc.enable()
