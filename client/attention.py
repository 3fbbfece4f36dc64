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

The same function serves a chunked prefill (turn 1 of a long prompt, q thousands of
tokens per forward over the chunks before them): there the query rows alone fill the GPU,
so the prefix is one flash call, not S splits (which would copy the queries S times), and
`install` registers a mask function that builds no [q, P + q] mask for the calls this
function takes -- at q = 64k over a 1M-token prefix that mask alone would be 64 GB.

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
# Query rows (KV heads x grouped query heads x new tokens) from which the prefix is not
# split: 16384 rows are 128 flash blocks of 128 rows, about one per SM, and splitting
# would copy the queries once per split.
MAX_SPLIT_ROWS = 16384


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
                     scale: float, split: int = SPLIT,
                     max_split_rows: int = MAX_SPLIT_ROWS) -> torch.Tensor:
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
    S = max(1, P // split) if Hkv * g * q < max_split_rows else 1
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
            or kwargs.get("sliding_window") or not _dtype_ok(query.dtype, query.device)):
        if attention_mask is None and 1 < q < kv:
            # `suffix_mask` built no mask for this shape, expecting this function to take
            # it: SDPA needs the causal mask spelled out (lower-right aligned).
            attention_mask = _lower_right_causal(q, kv, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else D ** -0.5
    return suffix_attention(query, key, value, scale), None


def _dtype_ok(dtype: torch.dtype, device: torch.device | str) -> bool:
    """The dtypes the flash kernels take (fp32 on the CPU only)."""
    if dtype in (torch.float16, torch.bfloat16):
        return True
    return dtype == torch.float32 and torch.device(device).type == "cpu"


def _lower_right_causal(q: int, kv: int, device: torch.device) -> torch.Tensor:
    """[1, 1, q, kv] bool: query i (position kv - q + i) sees keys 0 .. kv - q + i."""
    i = torch.arange(q, device=device)[:, None] + (kv - q)
    return (torch.arange(kv, device=device)[None, :] <= i)[None, None]


def suffix_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                kv_offset: int = 0, mask_function: Any = None,
                attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask function for NAME: no mask for the calls `attention_forward`
    computes by suffix attention (one unpadded sequence, causal, a prefix of at least
    MIN_PREFIX), SDPA's mask for everything else."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if (batch_size == 1 and attention_mask is None and local_size is None
            and mask_function is causal_mask_function and kv_offset == 0
            and isinstance(q_offset, int) and q_offset == kv_length - q_length
            and q_length >= 2 and kv_length - q_length >= MIN_PREFIX
            and _dtype_ok(kwargs.get("dtype", torch.bfloat16), kwargs.get("device", "cpu"))):
        return None
    mask: torch.Tensor | None = sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
        attention_mask=attention_mask, local_size=local_size, **kwargs)
    return mask


def install(model: Any) -> None:
    """Register the function with transformers and make `model` use it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    # transformers builds no mask at all for an attention name it has no mask function
    # for; the SDPA fallback needs SDPA's.
    AttentionMaskInterface.register(NAME, suffix_mask)
    model.set_attn_implementation(NAME)


__all__ = ["MAX_SPLIT_ROWS", "MIN_PREFIX", "NAME", "attention_forward", "install",
           "suffix_attention", "suffix_mask"]
