"""Chained chunk keys: the names KV chunks are stored under.

A prompt is cut into chunks of `chunk_tokens` tokens; chunk i's key is

    key_i = BLAKE2b(key_{i-1} || model_fingerprint || token_ids_i)     (key_{-1} = b"")

truncated to 128 or 256 bits.  A key therefore names the whole prefix up to and
including its chunk, under one model: two prompts share key_i exactly when they share
their first (i+1)*chunk_tokens tokens.  A lookup of a prompt's key list returns the
longest stored prefix in one round trip.  Only full chunks get keys; a trailing partial
chunk is always recomputed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DEFAULT_CHUNK_TOKENS = 256


def model_fingerprint(name: str, *, dtype: str, num_layers: int, num_kv_heads: int,
                      head_dim: int, extra: str = "") -> bytes:
    """16 bytes that change whenever the KV cache a model produces could change."""
    text = f"{name}|{dtype}|L{num_layers}|H{num_kv_heads}|D{head_dim}|{extra}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def chunk_keys(token_ids: Sequence[int] | np.ndarray, fingerprint: bytes, *,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, digest_bits: int = 128) -> list[bytes]:
    """Keys of every full chunk of `token_ids`, in order."""
    if digest_bits not in (128, 256):
        raise ValueError(f"digest_bits must be 128 or 256, got {digest_bits}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ids = np.ascontiguousarray(np.asarray(token_ids, dtype="<u4"))
    if ids.ndim != 1:
        raise ValueError("token_ids must be one-dimensional")
    n = len(ids) // chunk_tokens
    size = digest_bits // 8
    prev = b""
    out = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=size)
        h.update(prev)
        h.update(fingerprint)
        h.update(ids[i * chunk_tokens:(i + 1) * chunk_tokens].data)
        prev = h.digest()
        out.append(prev)
    return out
