"""The GPU data path's logic on CPU tensors: save after prefill, resume, same logits.

A tiny model of a real architecture (Qwen2) with random weights; a real kvtierd.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from harness import TOKENS, Daemon  # noqa: E402

from kvtier.client.client import Client  # noqa: E402
from kvtier.client.gpu import (  # noqa: E402
    KVLayout,
    KVLoader,
    KVSaver,
    cache_layer,
    finish_resume,
    resume,
)
from kvtier.client.keys import chunk_keys  # noqa: E402

T = 16  # chunk tokens (small, for a small model)
# The model runs on CPU tensors here, which the GPU path's Triton kernels take only in
# Triton's interpreter (conftest sets it where there is no GPU; with one, test_gcm_gpu
# runs them compiled).
GPU_KERNELS_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    cfg = transformers.Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=2048,
                                   rope_theta=10000.0)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def _prefill(model, ids):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    return out.past_key_values, out.logits


@pytest.mark.parametrize("in_place", [True, False], ids=["reserved-in-dram", "put-via-arena"])
def test_save_then_resume_gives_the_same_logits(daemon: Daemon, model,  # type: ignore[no-untyped-def]
                                                in_place: bool) -> None:
    """Saved either way -- written into DRAM reservations, or PUT through the arena --
    the chunks load back to the same cache and the same logits."""
    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("tiny-qwen2")
    g = torch.Generator().manual_seed(1)
    turn1 = torch.randint(0, 500, (1, 5 * T + 3), generator=g)  # 5 full chunks + 3 tokens
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        cache, _ = _prefill(model, turn1)
        saver = KVSaver(c, layout, fp, in_place=in_place, slots=4)  # groups of 2 chunks
        rep = saver.save("conv-1", turn1[0], cache)
        assert rep.chunks == 5 and rep.bytes == 5 * layout.chunk_bytes
        assert rep.in_place == in_place
        assert saver.save("conv-1", turn1[0], cache).skipped == 5  # idempotent
        saver.close()

        # Turn 2: the conversation continues; the stored prefix is 5 chunks.
        turn2 = torch.cat([turn1, torch.randint(0, 500, (1, 9), generator=g)], dim=1)
        with torch.no_grad():
            want = model(turn2).logits[:, -1]
        for groups, map_dram in ((1, True), (3, True), (3, False)):
            loader = KVLoader(c, layout, fp, layer_groups=groups, inflight=4,
                              map_dram=map_dram)
            res = resume(model, loader, turn2[0])
            assert res.prefix_tokens == 5 * T and res.load.chunks == 5
            # The chunks are in the DRAM tier: MAPped and copied from the tenant's mapping,
            # or (map_dram=False) GET through the arena.
            assert res.load.mapped == (5 * groups if map_dram else 0)
            assert res.load.bytes == 5 * layout.chunk_bytes
            k0, _ = cache_layer(res.cache, 0)
            assert torch.equal(k0, cache_layer(cache, 0)[0][:, :, :5 * T])
            with torch.no_grad():
                got = model(turn2[:, res.prefix_tokens:], past_key_values=res.cache).logits[:, -1]
            finish_resume(loader)
            loader.close()
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_auto_layer_groups_follow_the_bytes_of_each_load(daemon: Daemon, model,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """layer_groups="auto": one group per AUTO_GROUP_BYTES of the load (here scaled down
    to two chunks), at most AUTO_MAX_GROUPS and the model's layers; the same loader then
    loads a short prefix in one group and a long one in two, with the same logits."""
    from kvtier.client import gpu

    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    monkeypatch.setattr(gpu, "AUTO_GROUP_BYTES", 2 * layout.chunk_bytes)
    fp = layout.fingerprint("tiny-qwen2-auto")
    g = torch.Generator().manual_seed(5)
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        loader = KVLoader(c, layout, fp, inflight=4)  # the default: auto
        assert [loader.groups_for(k * layout.chunk_bytes) for k in (0, 1, 2, 5, 7, 99)] == \
            [1, 1, 1, 2, 3, 3]  # 3: the model's layers
        for chunks, want_groups in ((1, 1), (5, 2)):
            ids = torch.randint(0, 500, (1, chunks * T + 4), generator=g)
            cache, _ = _prefill(model, ids[:, :chunks * T])
            saver = KVSaver(c, layout, fp)
            saver.save(f"auto-{chunks}", ids[0, :chunks * T], cache)
            saver.close()
            with torch.no_grad():
                want = model(ids).logits[:, -1]
            res = resume(model, loader, ids[0])
            assert res.prefix_tokens == chunks * T
            assert res.load.layer_groups == want_groups == len(loader.groups)
            with torch.no_grad():
                got = model(ids[:, res.prefix_tokens:], past_key_values=res.cache).logits[:, -1]
            finish_resume(loader)
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        loader.close()
    with pytest.raises(ValueError, match="layer_groups"):
        KVLoader(c, layout, fp, layer_groups=0)


def test_a_loader_takes_the_slots_the_arena_has_room_for(daemon: Daemon, model) -> None:  # type: ignore[no-untyped-def]
    """The default inflight is what the arena holds when it holds fewer than 16 slots (a
    7B model's chunk is 14.7 MB; the default 64 MiB arena holds 4): the loader still
    loads; an explicit inflight that does not fit, or room for fewer than 2, is an error
    naming the arena size it needs, and takes nothing."""
    from kvtier.client.arena import ArenaFullError
    from kvtier.client.gpu import ARENA_HEADROOM, DEFAULT_INFLIGHT

    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("tiny-qwen2-arena")
    per = -(-layout.chunk_bytes // 4096) * 4096  # a slot, aligned
    ids = torch.randint(0, 500, (1, 3 * T + 2), generator=torch.Generator().manual_seed(9))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=4 << 20) as c:
        cache, _ = _prefill(model, ids[:, :3 * T])
        saver = KVSaver(c, layout, fp, in_place=False)
        saver.save("arena", ids[0, :3 * T], cache)
        saver.close()
        # the rest of the arena in use but room for 5 slots and the headroom
        filler = c.allocator.alloc(c.allocator.free_bytes - 5 * per - ARENA_HEADROOM)
        free = c.allocator.free_bytes
        loader = KVLoader(c, layout, fp, map_dram=False)  # every chunk through a slot
        assert len(loader.slots) == 5 < DEFAULT_INFLIGHT
        with torch.no_grad():
            want = model(ids).logits[:, -1]
        res = resume(model, loader, ids[0])
        assert res.prefix_tokens == 3 * T and res.load.mapped == 0
        with torch.no_grad():
            got = model(ids[:, res.prefix_tokens:], past_key_values=res.cache).logits[:, -1]
        finish_resume(loader)
        assert torch.allclose(got, want, atol=1e-5)
        loader.close()
        assert c.allocator.free_bytes == free
        with pytest.raises(ArenaFullError, match="arena_size >= "):
            KVLoader(c, layout, fp, inflight=200)
        assert c.allocator.free_bytes == free  # nothing kept
        hog = c.allocator.alloc(free - per)  # room for one slot only (no headroom)
        with pytest.raises(ArenaFullError, match="no room for 2 KVLoader slots"):
            KVLoader(c, layout, fp)
        c.allocator.free(hog)
        assert c.allocator.free_bytes == free
        c.allocator.free(filler)


def test_partial_hit_and_greedy_generation_match(daemon: Daemon, model) -> None:  # type: ignore[no-untyped-def]
    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("tiny-qwen2")
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(0, 500, (1, 2 * T), generator=g)
    a = torch.cat([shared, torch.randint(0, 500, (1, 3 * T), generator=g)], dim=1)
    b = torch.cat([shared, torch.randint(0, 500, (1, 2 * T + 5), generator=g)], dim=1)
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        cache, _ = _prefill(model, a)
        KVSaver(c, layout, fp).save("conv-a", a[0], cache)
        loader = KVLoader(c, layout, fp, layer_groups=2, inflight=3)
        res = resume(model, loader, b[0])  # only the shared system prompt matches
        assert res.prefix_tokens == 2 * T
        with torch.no_grad():
            out = model.generate(b, past_key_values=res.cache, max_new_tokens=8,
                                 do_sample=False)
            ref = model.generate(b, max_new_tokens=8, do_sample=False)
        finish_resume(loader)
        assert torch.equal(out, ref)
        # Another tenant sees nothing of it.
    with Client.connect(daemon.socket, "bob", TOKENS["bob"], arena_size=16 << 20) as c2:
        other = KVLoader(c2, layout, fp)
        assert resume(model, other, b[0]).prefix_tokens == 0


def test_a_different_model_shape_never_hits(daemon: Daemon, model) -> None:  # type: ignore[no-untyped-def]
    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    ids = torch.randint(0, 500, (1, 3 * T))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        cache, _ = _prefill(model, ids)
        KVSaver(c, layout, layout.fingerprint("tiny-qwen2")).save("s", ids[0], cache)
        other = KVLoader(c, layout, layout.fingerprint("another-model"))
        assert other.lookup(ids[0])[1] == 0


def test_encrypted_save_and_resume_give_the_same_logits(daemon: Daemon, model,  # type: ignore[no-untyped-def]
                                                        tmp_path) -> None:
    from kvtier.client.crypto import OVERHEAD, DecryptError, FrameCipher, Keyring

    daemon.start()
    layout = KVLayout.from_config(model.config, torch.float32, chunk_tokens=T)
    fp = layout.fingerprint("tiny-qwen2-enc")
    g = torch.Generator().manual_seed(5)
    turn1 = torch.randint(0, 500, (1, 4 * T + 2), generator=g)
    turn2 = torch.cat([turn1, torch.randint(0, 500, (1, 5), generator=g)], dim=1)
    kr = Keyring(str(tmp_path / "keyring.json"))
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        cipher = FrameCipher(c, kr, "alice", scope="session")
        cache, _ = _prefill(model, turn1)
        saver = KVSaver(c, layout, fp, cipher=cipher)
        assert saver.save("conv-e", turn1[0], cache).chunks == 4
        saver.close()
        k0 = cache_layer(cache, 0)[0][:, :, :T].contiguous()
        stored = c.get(chunk_keys(turn1[0].tolist(), fp, chunk_tokens=T)[0])
        assert k0.numpy().tobytes()[:256] not in stored  # ciphertext at rest
        with torch.no_grad():
            want = model(turn2).logits[:, -1]
        # Decrypted on the CPU or by the GPU path's kernels (here interpreted on CPU
        # tensors), straight out of the DRAM mapping (MAP) or GET into the arena first.
        cases = [("cpu", True, 4 * 2, 8), ("cpu", False, 0, 8)]
        if GPU_KERNELS_ON_CPU:
            cases += [("gpu", True, 4 * 2, 3), ("gpu", False, 0, 1)]
        for decrypt, map_dram, mapped, batch in cases:
            loader = KVLoader(c, layout, fp, layer_groups=2, inflight=3, cipher=cipher,
                              session="conv-e", map_dram=map_dram, decrypt=decrypt,
                              gpu_batch=batch)
            assert loader.gpu_decrypt == (decrypt == "gpu")
            # Set up before the turn: the GPU path opens one throwaway frame (its kernels
            # compiled, here interpreted); the CPU path has nothing to prepare.
            took = loader.prepare("cpu")
            assert (took > 0) if decrypt == "gpu" else took == 0.0
            res = resume(model, loader, turn2[0])
            assert res.prefix_tokens == 4 * T and res.load.mapped == mapped
            for li in range(layout.num_layers):  # bit for bit, every layer and position
                for got_t, want_t in zip(cache_layer(res.cache, li), cache_layer(cache, li),
                                         strict=True):
                    assert torch.equal(got_t, want_t[:, :, :4 * T]), (decrypt, map_dram, li)
            with torch.no_grad():
                got = model(turn2[:, res.prefix_tokens:],
                            past_key_values=res.cache).logits[:, -1]
            finish_resume(loader)
            loader.close()
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        # A head_dim whose rows are not whole 16-byte blocks cannot be opened by the kernels.
        odd = KVLayout(3, 2, 6, torch.float16, chunk_tokens=T)
        with pytest.raises(ValueError, match="multiple of 16"):
            KVLoader(c, odd, fp, cipher=cipher, decrypt="gpu")
        # Without the key the stored chunks do not load.
        plain = KVLoader(c, layout, fp, layer_groups=1, inflight=2)
        with pytest.raises(Exception, match="expected"):
            resume(model, plain, turn2[0])
        plain.close()
        # A chunk tampered with in the store: the CPU path refuses it in load, the GPU path
        # in finish_resume (its tags are checked on the device), naming the chunk's key.
        key2 = chunk_keys(turn1[0].tolist(), fp, chunk_tokens=T)[2]
        sealed = bytearray(c.get(key2))
        sealed[3 * (layout.frame_bytes + OVERHEAD) // 2] ^= 0x10  # in frame 1's ciphertext
        c.put("conv-e", key2, [sealed[i:i + layout.frame_bytes + OVERHEAD] for i in
                               range(0, len(sealed), layout.frame_bytes + OVERHEAD)])
        for decrypt in ("cpu", "gpu") if GPU_KERNELS_ON_CPU else ("cpu",):
            loader = KVLoader(c, layout, fp, layer_groups=2, inflight=3, cipher=cipher,
                              session="conv-e", decrypt=decrypt)
            with pytest.raises(DecryptError, match=f"key {key2.hex()} frame 1"):
                resume(model, loader, turn2[0])
                finish_resume(loader)
            loader.close()
        cipher.close()

