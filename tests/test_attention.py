"""kvtier.client.attention: split-KV suffix attention equals plain causal attention."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvtier.client.attention import MIN_PREFIX, NAME, install, suffix_attention  # noqa: E402


def _reference(q, k, v, scale):  # type: ignore[no-untyped-def]
    """Causal attention of the last q positions, lower-right aligned, heads expanded."""
    Hq, n, kv = q.shape[1], q.shape[2], k.shape[2]
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    mask = torch.arange(kv)[None, :] <= (kv - n + torch.arange(n))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize(("prefix", "split"), [(100, 1000), (1000, 128), (1000, 333),
                                               (512, 256)])
def test_matches_plain_causal_attention(prefix: int, split: int) -> None:
    g = torch.Generator().manual_seed(prefix + split)
    q = torch.randn(1, 6, 7, 32, generator=g)
    k = torch.randn(1, 2, prefix + 7, 32, generator=g)
    v = torch.randn(1, 2, prefix + 7, 32, generator=g)
    got = suffix_attention(q, k, v, 32 ** -0.5, split=split)
    want = _reference(q, k, v, 32 ** -0.5)
    assert got.shape == (1, 7, 6, 32)
    assert torch.allclose(got, want, atol=2e-5), (got - want).abs().max()
    # A value changed in the future of a query must not change that query's output.
    k2 = k.clone()
    k2[:, :, -1] += 5
    got2 = suffix_attention(q, k2, v, 32 ** -0.5, split=split)
    assert torch.equal(got2[:, :6], got[:, :6]) or torch.allclose(got2[:, :6], got[:, :6],
                                                                  atol=1e-6)
    assert not torch.allclose(got2[:, 6], got[:, 6])


def test_a_model_resumed_with_it_gives_the_same_logits() -> None:
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 300, (1, MIN_PREFIX + 300 + 16))
    P = ids.shape[1] - 16
    with torch.no_grad():
        want = model(ids).logits[:, -16:]
        cache = transformers.DynamicCache(config=cfg)
        model(ids[:, :P], past_key_values=cache)
        install(model)
        assert model.config._attn_implementation == NAME
        got = model(ids[:, P:], past_key_values=cache).logits
        decode = model(got[:, -1:].argmax(-1), past_key_values=cache).logits  # falls back
        # A short prefix takes the SDPA fallback, which needs its causal mask.
        short = transformers.DynamicCache(config=cfg)
        model(ids[:, :300], past_key_values=short)
        got_short = model(ids[:, 300:316], past_key_values=short).logits
        want_short = model(ids[:, :316]).logits[:, -16:]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.allclose(got_short, want_short, atol=1e-4), (got_short - want_short).abs().max()
    assert decode.shape == (1, 1, 300)


def test_many_query_rows_take_one_unsplit_flash_call() -> None:
    """A chunk of a long prefill (q large): no splits, so no copies of the queries."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 6, 40, 32, generator=g)
    k = torch.randn(1, 2, 1000 + 40, 32, generator=g)
    v = torch.randn(1, 2, 1000 + 40, 32, generator=g)
    want = _reference(q, k, v, 32 ** -0.5)
    # 2 KV heads x 3 grouped heads x 40 tokens = 240 rows: at or over 240 the prefix is one
    # call; below it, 1000 // 128 = 7 splits.
    for rows in (240, 241):
        got = suffix_attention(q, k, v, 32 ** -0.5, split=128, max_split_rows=rows)
        assert torch.allclose(got, want, atol=2e-5), (rows, (got - want).abs().max())


def test_a_chunked_prefill_builds_no_mask_and_matches_one_pass() -> None:
    """Turn 1 of a long prompt in chunks: the chunks over a long enough prefix get no
    [q, kv] mask from transformers (suffix_mask), and the logits equal one full pass."""
    from kvtier.client import attention

    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=65536)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    chunk = MIN_PREFIX
    ids = torch.randint(0, 300, (1, 3 * chunk + 100))
    masks: list[bool] = []
    orig = attention.suffix_mask

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        m = orig(*a, **kw)
        masks.append(m is None)
        return m

    with torch.no_grad():
        want = model(ids).logits[:, -1]
        install(model)
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(NAME, spy)
        cache = transformers.DynamicCache(config=cfg)
        for s in range(0, ids.shape[1], chunk):
            got = model(ids[:, s:s + chunk], past_key_values=cache).logits[:, -1]
        AttentionMaskInterface.register(NAME, orig)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert masks == [True] * 4  # chunk 0: SDPA's own is_causal skip; 1-3: suffix attention


def test_a_fallback_without_a_mask_is_lower_right_causal() -> None:
    """A shape suffix_mask leaves maskless but attention_forward hands to SDPA (here a
    batch of two) still gets the causal mask, aligned to the end of the keys."""
    from kvtier.client.attention import attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 3

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 5, 32, generator=g)
    k = torch.randn(2, 2, MIN_PREFIX + 5, 32, generator=g)
    v = torch.randn(2, 2, MIN_PREFIX + 5, 32, generator=g)
    got, _ = attention_forward(Module(), q, k, v, None, scaling=32 ** -0.5)
    for b in range(2):
        want = _reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], 32 ** -0.5)
        assert torch.allclose(got[b:b + 1], want, atol=2e-5), (got[b:b + 1] - want).abs().max()
