"""AES-256-GCM opening on the GPU (kvtier.client.gcm_gpu) against `cryptography`: the
same Triton kernels, compiled on a CUDA machine and interpreted on CPU tensors elsewhere
(conftest sets TRITON_INTERPRET=1 where there is no GPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.client.crypto import FORMAT_VERSION, NONCE, OVERHEAD, DecryptError, frame_aad
from kvtier.client.gcm_gpu import FrameBatch, GcmOpener, gf_mul, round_keys

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TENANT = "alice"
KID = bytes(range(16))


def _seal(dk: bytes, key: bytes, index: int, plain: bytes) -> bytes:
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(dk).encrypt(nonce, plain, frame_aad(TENANT, KID, key, index))


def _stage(sealed: list[bytes]) -> tuple[torch.Tensor, list[int]]:
    offs, pos = [], 0
    for s in sealed:
        offs.append(pos)
        pos += len(s)
    buf = np.frombuffer(b"".join(sealed) + bytes(-pos % 4), dtype=np.uint8).copy()
    return torch.from_numpy(buf).to(DEV), offs


def test_round_keys_and_gf_mul_match_the_references() -> None:
    # FIPS-197 appendix A.3: the last round-key word of the AES-256 example key.
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    assert int(round_keys(key)[59]).to_bytes(4, "little").hex() == "706c631e"
    # GHASH by the reference multiply gives the tag `cryptography` gives (any key, IV).
    dk, iv, plain = os.urandom(32), os.urandom(12), os.urandom(64)
    sealed = AESGCM(dk).encrypt(iv, plain, b"aad")
    ecb = Cipher(algorithms.AES(dk), modes.ECB()).encryptor()
    h = int.from_bytes(ecb.update(bytes(16)), "big")
    y = 0
    for blk in (b"aad".ljust(16, b"\0"), *(sealed[i:i + 16] for i in range(0, 64, 16)),
                (24).to_bytes(8, "big") + (512).to_bytes(8, "big")):
        y = gf_mul(y ^ int.from_bytes(blk, "big"), h)
    ej0 = int.from_bytes(ecb.update(iv + b"\0\0\0\1"), "big")
    assert (y ^ ej0).to_bytes(16, "big") == sealed[64:]


@settings(max_examples=8)
@given(st.integers(1, 6), st.sampled_from([16, 48, 256, 4096]), st.integers(0, 3))
def test_frames_open_into_rows_exactly_as_cryptography(n_frames: int, plain: int,
                                                       pad_rows: int) -> None:
    dk = os.urandom(32)
    rng = np.random.default_rng(plain * 7 + n_frames)
    frames = [rng.integers(0, 256, plain, dtype=np.uint8).tobytes() for _ in range(n_frames)]
    keys = [os.urandom(16) for _ in range(n_frames)]
    sealed = [_seal(dk, keys[i], i + 3, frames[i]) for i in range(n_frames)]
    src, offs = _stage(sealed)
    # Destination rows of 16 bytes with a pitch: the frames land interleaved.
    row, pitch = 16, 16 * (1 + pad_rows)
    rows = plain // row
    dst = torch.zeros(n_frames * rows * pitch + 64, dtype=torch.uint8, device=DEV)
    refs = FrameBatch.of(offs, [i * rows * pitch for i in range(n_frames)], keys,
                         [i + 3 for i in range(n_frames)])
    op = GcmOpener(TENANT, DEV)
    op.open(KID, dk, FORMAT_VERSION, src, refs, plain, dst, row, pitch)
    assert op.check() == n_frames
    got = dst.cpu().numpy()
    for i, f in enumerate(frames):
        for r in range(rows):
            at = i * rows * pitch + r * pitch
            assert got[at:at + row].tobytes() == f[r * row:(r + 1) * row]
    assert not got[n_frames * rows * pitch:].any()


@pytest.mark.parametrize("what", ["ciphertext", "tag", "nonce", "swapped", "moved", "key"])
def test_tampering_is_caught_and_named(what: str) -> None:
    dk = os.urandom(32)
    keys = [b"k" * 16, b"j" * 16]
    plain = [bytes([i]) * 512 for i in range(2)]
    sealed = [bytearray(_seal(dk, keys[i], i, plain[i])) for i in range(2)]
    refs_keys = list(keys)
    index = [0, 1]
    if what == "ciphertext":
        sealed[1][NONCE + 100] ^= 1
    elif what == "tag":
        sealed[1][-1] ^= 0x80
    elif what == "nonce":
        sealed[1][0] ^= 4
    elif what == "swapped":  # frame 0's bytes where frame 1 should be
        sealed = [sealed[1], sealed[0]]
    elif what == "moved":  # a frame of another value
        refs_keys[1] = b"x" * 16
    elif what == "key":
        dk_other = os.urandom(32)
        sealed[1] = bytearray(_seal(dk_other, keys[1], 1, plain[1]))
    src, offs = _stage([bytes(s) for s in sealed])
    dst = torch.zeros(1024, dtype=torch.uint8, device=DEV)
    op = GcmOpener(TENANT, DEV)
    op.open(KID, dk, FORMAT_VERSION, src,
            FrameBatch.of(offs, [0, 512], refs_keys, index),
            512, dst, 512, 512, label="chunk 7")
    with pytest.raises(DecryptError, match=r"frame [01] .*chunk 7.*authentication failed"):
        op.check()
    # An untouched batch afterwards is fine (the flags of the bad one are gone).
    good = [_seal(dk, keys[0], 0, plain[0])]
    src, offs = _stage(good)
    op.open(KID, dk, FORMAT_VERSION, src, FrameBatch.of([0], [0], keys[:1], [0]), 512, dst,
            512, 512)
    assert op.check() == 1
    assert dst[:512].cpu().numpy().tobytes() == plain[0]


def test_bad_geometry_is_refused() -> None:
    op = GcmOpener(TENANT, DEV)
    src = torch.zeros(64 + OVERHEAD, dtype=torch.uint8, device=DEV)
    dst = torch.zeros(64, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="16-byte"):
        op.open(KID, bytes(32), 1, src, FrameBatch.of([0], [0], [b"k" * 16], [0]), 40, dst,
                40, 40)
    with pytest.raises(ValueError, match="aligned"):
        op.open(KID, bytes(32), 1, src, FrameBatch.of([2], [0], [b"k" * 16], [0]), 64, dst,
                64, 64)
    with pytest.raises(ValueError, match="one length"):
        FrameBatch.of([0, 64], [0, 64], [b"k" * 16, b"k" * 32], [0, 1])
    with pytest.raises(ValueError, match="32-byte key"):
        round_keys(bytes(16))
