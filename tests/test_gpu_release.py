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


def test_twenty_turns_hold_nothing_from_earlier_turns(daemon: Daemon) -> None:
    daemon.start()
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("release-test")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, 4 * T + 5), generator=g)
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
            del res, cache
            gc.collect()
            assert all(r() is None for r in earlier), f"turn {turn}: an earlier cache lives on"
            assert c.allocator.free_bytes == held  # no slot taken and not given back
        saver.close()
        loader.close()
        assert c.allocator.free_bytes == free0
