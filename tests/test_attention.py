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
