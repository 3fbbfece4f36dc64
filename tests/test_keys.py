"""Chained chunk keys (docs/FORMAT.md, "Chunk keys"): the chain, its salt and per-chunk
extras, and incremental hashing equal to hashing all at once."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvtier.client.keys import ChunkChain, chunk_keys, model_fingerprint

FP = model_fingerprint("m", dtype="torch.bfloat16", num_layers=2, num_kv_heads=1, head_dim=64)


def test_the_chain_is_the_documented_digest() -> None:
    ids = list(range(40))
    keys = chunk_keys(ids, FP, chunk_tokens=16)
    assert len(keys) == 2  # the trailing 8 tokens have no key
    prev = b""
    for i, k in enumerate(keys):
        h = hashlib.blake2b(digest_size=16)
        h.update(prev + FP + np.asarray(ids[16 * i:16 * (i + 1)], dtype="<u4").tobytes())
        assert k == h.digest()
        prev = k
    assert len(chunk_keys(ids, FP, chunk_tokens=16, digest_bits=256)[0]) == 32


@given(st.lists(st.integers(0, 2**32 - 1), max_size=200), st.lists(st.integers(1, 60),
                                                                  max_size=6))
def test_incremental_extension_equals_hashing_at_once(ids: list[int], cuts: list[int]) -> None:
    chain = ChunkChain(FP, chunk_tokens=8, salt=b"s")
    pos = 0
    for c in cuts:
        pos = min(len(ids), pos + c)
        chain.extend(ids[:pos])
    assert chain.extend(ids) == chunk_keys(ids, FP, chunk_tokens=8, salt=b"s")


def test_a_salt_changes_every_key_and_extras_change_their_chunk_onwards() -> None:
    ids = list(range(64))
    plain = chunk_keys(ids, FP, chunk_tokens=16)
    salted = chunk_keys(ids, FP, chunk_tokens=16, salt=b"cache_salt=x")
    assert not set(plain) & set(salted)
    assert chunk_keys(ids, FP, chunk_tokens=16, salt=b"cache_salt=y")[0] != salted[0]
    img = chunk_keys(ids, FP, chunk_tokens=16, extras={2: b"image-hash"})
    assert img[:2] == plain[:2] and not set(img[2:]) & set(plain[2:])
