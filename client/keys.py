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
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_CHUNK_TOKENS = 256


def model_fingerprint(name: str, *, dtype: str, num_layers: int, num_kv_heads: int,
                      head_dim: int, extra: str = "") -> bytes:
    """16 bytes that change whenever the KV cache a model produces could change."""
    text = f"{name}|{dtype}|L{num_layers}|H{num_kv_heads}|D{head_dim}|{extra}"
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def chunk_keys(token_ids: Sequence[int] | np.ndarray, fingerprint: bytes, *,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, digest_bits: int = 128,
               salt: bytes = b"", extras: Mapping[int, bytes] | None = None) -> list[bytes]:
    """Keys of every full chunk of `token_ids`, in order.

    `salt` (e.g. vLLM's `cache_salt`, a LoRA adapter's name) enters the first chunk's
    digest and so, through the chain, every key: two salts never share a chunk.
    `extras[i]` enters chunk i's digest (e.g. the hashes of images whose placeholder
    tokens fall in that chunk).  Without either the keys are the plain chain above."""
    chain = ChunkChain(fingerprint, chunk_tokens=chunk_tokens, digest_bits=digest_bits,
                       salt=salt)
    return chain.extend(token_ids, extras)


class ChunkChain:
    """The key chain of one growing token sequence, hashed incrementally: `extend` hashes
    only the chunks that became full since the last call (a decode step costs nothing
    until a chunk fills)."""

    def __init__(self, fingerprint: bytes, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 digest_bits: int = 128, salt: bytes = b"") -> None:
        if digest_bits not in (128, 256):
            raise ValueError(f"digest_bits must be 128 or 256, got {digest_bits}")
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self.fingerprint, self.chunk_tokens, self.salt = fingerprint, chunk_tokens, salt
        self.size = digest_bits // 8
        self.keys: list[bytes] = []

    def extend(self, token_ids: Sequence[int] | np.ndarray,
               extras: Mapping[int, bytes] | None = None) -> list[bytes]:
        """Keys of every full chunk of `token_ids` (which starts with the tokens already
        hashed); returns the whole chain."""
        T = self.chunk_tokens
        n = len(token_ids) // T
        if n <= len(self.keys):
            return self.keys
        tail = token_ids[len(self.keys) * T:n * T]
        ids = np.ascontiguousarray(np.asarray(tail, dtype="<u4"))
        if ids.ndim != 1:
            raise ValueError("token_ids must be one-dimensional")
        prev = self.keys[-1] if self.keys else b""
        for j in range(n - len(self.keys)):
            i = len(self.keys)
            h = hashlib.blake2b(digest_size=self.size)
            h.update(prev)
            h.update(self.fingerprint)
            h.update(ids[j * T:(j + 1) * T].data)
            if i == 0 and self.salt:
                h.update(b"\0salt" + len(self.salt).to_bytes(4, "little") + self.salt)
            extra = extras.get(i) if extras else None
            if extra:
                h.update(b"\0extra" + len(extra).to_bytes(4, "little") + extra)
            prev = h.digest()
            self.keys.append(prev)
        return self.keys
