"""Attention for a few new tokens over a long cached prefix (turn 2 after a resume).

When a conversation resumes from kvtier, the model runs a short forward (the new tokens,
q of them) against a long loaded prefix (P tokens).  Stock SDPA in transformers does that
badly at long P: it expands the KV heads to the query heads (GQA `repeat_kv`, a copy of
the whole cache per layer), passes an explicit [q, P + q] mask, and the kernel runs one
thread block per head, so a few dozen SMs stream the whole cache.  Measured on an H100
with qwen2.5-7b at P = 128k, q = 64: 186 ms for the forward, most of it in those copies and
that kernel.

This function computes the same attention as split-KV with a log-sum-exp merge:

* the prefix [0, P) is visible to every new token (no mask): it is cut into S equal
  splits that run as one batched flash-attention call, with the query heads of a KV group
  stacked as extra query rows (no K/V expansion, no copy of the cache);
* the q new tokens attend to each other causally (a q x q flash call, tiny);
* the partial results are merged exactly with their log-sum-exps.

It falls back to transformers' SDPA for anything else (decode steps, full prefills,
batches, padding masks, dropout).  `install(model)` registers it and points the model at
it; results equal SDPA's up to floating-point rounding (tests/test_attention.py).
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "kvtier_suffix"
MIN_PREFIX = 4096  # shorter prefixes: stock SDPA is fine
SPLIT = 8192  # prefix tokens per split (splits run in one batched kernel)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp [B, H, Lq] fp32) of softmax(q k^T * scale) v."""
    if q.is_cuda:
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                               scale=scale)
    else:
        r = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal,
                                                                       scale=scale)
    return r[0], r[1]


def suffix_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     scale: float, split: int = SPLIT) -> torch.Tensor:
    """Causal attention of the last q positions over all kv = P + q keys.

    query [1, Hq, q, D]; key, value [1, Hkv, kv, D] (Hq a multiple of Hkv).
    Returns [1, q, Hq, D] (the layout transformers' attention functions return).
    """
    _, Hq, q, D = query.shape
    Hkv, kv = key.shape[1], key.shape[2]
    P, g = kv - q, Hq // Hkv
    # Query heads of one KV group as extra rows: row j*q + i is head (kvh*g + j), token i.
    qs = query.reshape(1, Hkv, g * q, D)
    outs, lses = [], []
    S = max(1, P // split)
    L = P // S
    if S > 1:
        ks = key[0, :, :S * L].unflatten(1, (S, L)).transpose(0, 1)  # [S, Hkv, L, D], a view
        vs = value[0, :, :S * L].unflatten(1, (S, L)).transpose(0, 1)
        o, lse = _flash(qs.expand(S, -1, -1, -1).contiguous(), ks, vs, False, scale)
        outs += list(o.unbind(0))
        lses += list(lse.unbind(0))
        start = S * L
    else:
        start = 0
    if start < P:
        o, lse = _flash(qs, key[:, :, start:P], value[:, :, start:P], False, scale)
        outs.append(o[0])
        lses.append(lse[0])
    # The new tokens among themselves: causal, q x q, heads expanded (only q tokens).
    kn = key[:, :, P:].repeat_interleave(g, dim=1)
    vn = value[:, :, P:].repeat_interleave(g, dim=1)
    o, lse = _flash(query, kn, vn, True, scale)
    outs.append(o.reshape(Hkv, g * q, D))
    lses.append(lse.reshape(Hkv, g * q))
    lse_all = torch.stack(lses)  # [N, Hkv, g*q]
    w = torch.softmax(lse_all, dim=0).unsqueeze(-1)  # exp(lse_i - logsumexp(lse))
    out = (torch.stack(outs).float() * w).sum(0).to(query.dtype)  # [Hkv, g*q, D]
    return out.reshape(1, Hq, q, D).transpose(1, 2).contiguous()


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A transformers attention function: suffix attention where it applies, else SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, Hq, q, D = query.shape
    Hkv, kv = key.shape[1], key.shape[2]
    if (B != 1 or q < 2 or kv - q < MIN_PREFIX or dropout or Hq % Hkv
            or kwargs.get("sliding_window") or query.dtype not in (
                torch.float16, torch.bfloat16, torch.float32)
            or (query.is_cuda and query.dtype == torch.float32)):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else D ** -0.5
    return suffix_attention(query, key, value, scale), None


def install(model: Any) -> None:
    """Register the function with transformers and make `model` use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    # transformers builds no mask at all for an attention name it has no mask function
    # for; the SDPA fallback needs SDPA's.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)


__all__ = ["MIN_PREFIX", "NAME", "attention_forward", "install", "suffix_attention"]
