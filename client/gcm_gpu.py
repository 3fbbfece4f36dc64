"""AES-256-GCM opening of sealed frames on the GPU (Triton), into their final place.

The CPU path (`FrameCipher.open_into`) decrypts every frame on the host and then copies
the plaintext to the GPU: on a 16-core host that is ~3x slower than the plain zero-copy
load, and the plaintext KV passes through host memory.  Here the *ciphertext* goes to the
GPU instead (the same one DMA per chunk as an unencrypted load, out of the tenant's
registered DRAM mapping or an arena slot), and one kernel per batch of frames

* runs AES-256 in counter mode (T-tables, 14 rounds) over each 16-byte block, XORs the
  keystream into the ciphertext and writes the plaintext straight into the KV cache (rows
  of a strided destination, like the loader's 2-D copies), and
* multiplies each ciphertext block by its power of H in GF(2^128) (carry-less products
  from integer multiplies with holes, as BearSSL's constant-time `ghash_ctmul64`) and
  XOR-reduces them: GHASH is a sum, so blocks need no order.

A second small kernel adds the AAD blocks, the length block and E_K(J0), and compares
the result with each frame's stored tag.  The frames' flags stay on the GPU; `check()`
reads them (one synchronisation) and raises `DecryptError` naming the first bad frame.

What the GPU gets is what the client process holds anyway: the data key's round keys and
H.  Nothing here changes the stored format (docs/SECURITY.md: frames are
`nonce | ciphertext | tag`, AAD = version, index, DK id, key, tenant).

Everything is plain Triton, so the same kernels run on CPU tensors under
`TRITON_INTERPRET=1` (tests/test_gcm_gpu.py checks them against `cryptography`).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from kvtier.client.crypto import DecryptError, frame_aad

GHASH_BLOCK = 256  # 16-byte blocks per program of the decrypt kernel
FINISH_BLOCK = 16  # frames per program of the tag kernel
POW_BLOCK = 256  # powers of H per program
MAX_AAD_BLOCKS = 8  # AAD up to 128 bytes (version, index, DK id, a 32-byte key, tenant)


# -- AES tables and key schedule (host side) ------------------------------------------------------


def _xtime(b: int) -> int:
    b <<= 1
    return (b ^ 0x11B) if b & 0x100 else b


def _gmul8(a: int, b: int) -> int:
    p = 0
    while b:
        if b & 1:
            p ^= a
        a, b = _xtime(a), b >> 1
    return p


def _sbox() -> list[int]:
    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if _gmul8(a, b) == 1:
                inv[a] = b
                break
    out = []
    for a in range(256):
        x = inv[a]
        s = x
        for _ in range(4):
            x = ((x << 1) | (x >> 7)) & 0xFF
            s ^= x
        out.append(s ^ 0x63)
    return out


SBOX = _sbox()


def _tables() -> np.ndarray:
    """[T0 | T1 | T2 | T3 | S]: T_k[b] is column k of MixColumns times S(b), as a
    little-endian word (row r in bits 8r..8r+7), so a state column is one LE uint32."""
    mix = ((2, 3, 1, 1), (1, 2, 3, 1), (1, 1, 2, 3), (3, 1, 1, 2))
    t = np.zeros(5 * 256, dtype=np.uint32)
    for b in range(256):
        s = SBOX[b]
        for k in range(4):
            t[k * 256 + b] = sum(_gmul8(s, mix[r][k]) << (8 * r) for r in range(4))
        t[4 * 256 + b] = s
    return t


TABLES = _tables()


def round_keys(key: bytes) -> np.ndarray:
    """AES-256's 60 round-key words (FIPS-197 key expansion), as little-endian uint32."""
    if len(key) != 32:
        raise ValueError(f"AES-256 needs a 32-byte key, got {len(key)}")
    w = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(w[i - 1])
        if i % 8 == 0:
            t = [SBOX[b] for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            t = [SBOX[b] for b in t]
        w.append([a ^ b for a, b in zip(w[i - 8], t, strict=True)])
    return np.frombuffer(bytes(b for word in w for b in word), dtype="<u4").copy()


def gf_mul(x: int, y: int) -> int:
    """GF(2^128) product in GCM's bit order (SP 800-38D, Algorithm 1); the reference."""
    r, z, v = 0xE1 << 120, 0, y
    for i in range(128):
        if (x >> (127 - i)) & 1:
            z ^= v
        v = (v >> 1) ^ r if v & 1 else v >> 1
    return z


# -- kernels -----------------------------------------------------------------------------------


@triton.jit
def _bswap32(x):
    return ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)


@triton.jit
def _be64(w0, w1):
    """Bytes 0..7 (two LE words) as a big-endian 64-bit integer."""
    return (_bswap32(w0).to(tl.uint64) << 32) | _bswap32(w1).to(tl.uint64)


@triton.jit
def _tab(tab_ptr, k: tl.constexpr, idx):
    return tl.load(tab_ptr + (k * 256 + idx.to(tl.int32))).to(tl.uint32, bitcast=True)


@triton.jit
def _rk(rk_ptr, i):
    return tl.load(rk_ptr + i).to(tl.uint32, bitcast=True)


@triton.jit
def _aes256(s0, s1, s2, s3, rk_ptr, tab_ptr):
    """AES-256 encryption of blocks given as four LE column words each."""
    s0 = s0 ^ _rk(rk_ptr, 0)
    s1 = s1 ^ _rk(rk_ptr, 1)
    s2 = s2 ^ _rk(rk_ptr, 2)
    s3 = s3 ^ _rk(rk_ptr, 3)
    for r in range(1, 14):
        t0 = (_tab(tab_ptr, 0, s0 & 0xFF) ^ _tab(tab_ptr, 1, (s1 >> 8) & 0xFF)
              ^ _tab(tab_ptr, 2, (s2 >> 16) & 0xFF) ^ _tab(tab_ptr, 3, s3 >> 24)
              ^ _rk(rk_ptr, 4 * r))
        t1 = (_tab(tab_ptr, 0, s1 & 0xFF) ^ _tab(tab_ptr, 1, (s2 >> 8) & 0xFF)
              ^ _tab(tab_ptr, 2, (s3 >> 16) & 0xFF) ^ _tab(tab_ptr, 3, s0 >> 24)
              ^ _rk(rk_ptr, 4 * r + 1))
        t2 = (_tab(tab_ptr, 0, s2 & 0xFF) ^ _tab(tab_ptr, 1, (s3 >> 8) & 0xFF)
              ^ _tab(tab_ptr, 2, (s0 >> 16) & 0xFF) ^ _tab(tab_ptr, 3, s1 >> 24)
              ^ _rk(rk_ptr, 4 * r + 2))
        t3 = (_tab(tab_ptr, 0, s3 & 0xFF) ^ _tab(tab_ptr, 1, (s0 >> 8) & 0xFF)
              ^ _tab(tab_ptr, 2, (s1 >> 16) & 0xFF) ^ _tab(tab_ptr, 3, s2 >> 24)
              ^ _rk(rk_ptr, 4 * r + 3))
        s0, s1, s2, s3 = t0, t1, t2, t3
    o0 = (_tab(tab_ptr, 4, s0 & 0xFF) | (_tab(tab_ptr, 4, (s1 >> 8) & 0xFF) << 8)
          | (_tab(tab_ptr, 4, (s2 >> 16) & 0xFF) << 16) | (_tab(tab_ptr, 4, s3 >> 24) << 24))
    o1 = (_tab(tab_ptr, 4, s1 & 0xFF) | (_tab(tab_ptr, 4, (s2 >> 8) & 0xFF) << 8)
          | (_tab(tab_ptr, 4, (s3 >> 16) & 0xFF) << 16) | (_tab(tab_ptr, 4, s0 >> 24) << 24))
    o2 = (_tab(tab_ptr, 4, s2 & 0xFF) | (_tab(tab_ptr, 4, (s3 >> 8) & 0xFF) << 8)
          | (_tab(tab_ptr, 4, (s0 >> 16) & 0xFF) << 16) | (_tab(tab_ptr, 4, s1 >> 24) << 24))
    o3 = (_tab(tab_ptr, 4, s3 & 0xFF) | (_tab(tab_ptr, 4, (s0 >> 8) & 0xFF) << 8)
          | (_tab(tab_ptr, 4, (s1 >> 16) & 0xFF) << 16) | (_tab(tab_ptr, 4, s2 >> 24) << 24))
    return (o0 ^ _rk(rk_ptr, 56), o1 ^ _rk(rk_ptr, 57), o2 ^ _rk(rk_ptr, 58),
            o3 ^ _rk(rk_ptr, 59))


@triton.jit
def _rev64(x):
    x = ((x >> 1) & 0x5555555555555555) | ((x & 0x5555555555555555) << 1)
    x = ((x >> 2) & 0x3333333333333333) | ((x & 0x3333333333333333) << 2)
    x = ((x >> 4) & 0x0F0F0F0F0F0F0F0F) | ((x & 0x0F0F0F0F0F0F0F0F) << 4)
    x = ((x >> 8) & 0x00FF00FF00FF00FF) | ((x & 0x00FF00FF00FF00FF) << 8)
    x = ((x >> 16) & 0x0000FFFF0000FFFF) | ((x & 0x0000FFFF0000FFFF) << 16)
    return (x >> 32) | (x << 32)


@triton.jit
def _bmul64(x, y):
    """Low 64 bits of the carry-less product x*y: integer products of operands with three
    zero bits between the ones, so carries never reach the next bit of the same class."""
    m1 = 0x1111111111111111
    x0 = x & m1
    x1 = x & (m1 << 1)
    x2 = x & (m1 << 2)
    x3 = x & (m1 << 3)
    y0 = y & m1
    y1 = y & (m1 << 1)
    y2 = y & (m1 << 2)
    y3 = y & (m1 << 3)
    z0 = (x0 * y0) ^ (x1 * y3) ^ (x2 * y2) ^ (x3 * y1)
    z1 = (x0 * y1) ^ (x1 * y0) ^ (x2 * y3) ^ (x3 * y2)
    z2 = (x0 * y2) ^ (x1 * y1) ^ (x2 * y0) ^ (x3 * y3)
    z3 = (x0 * y3) ^ (x1 * y2) ^ (x2 * y1) ^ (x3 * y0)
    return (z0 & m1) | (z1 & (m1 << 1)) | (z2 & (m1 << 2)) | (z3 & (m1 << 3))


@triton.jit
def _gfmul(y1, y0, h1, h0):
    """(y1:y0) * (h1:h0) in GF(2^128), GCM's bit order; halves are big-endian 64-bit.
    Karatsuba on the halves; the high half of each 64x64 product is the reversed low half
    of the reversed operands' product."""
    y0r = _rev64(y0)
    y1r = _rev64(y1)
    h0r = _rev64(h0)
    h1r = _rev64(h1)
    z0 = _bmul64(y0, h0)
    z1 = _bmul64(y1, h1)
    z2 = _bmul64(y0 ^ y1, h0 ^ h1)
    z0h = _bmul64(y0r, h0r)
    z1h = _bmul64(y1r, h1r)
    z2h = _bmul64(y0r ^ y1r, h0r ^ h1r)
    z2 ^= z0 ^ z1
    z2h ^= z0h ^ z1h
    z0h = _rev64(z0h) >> 1
    z1h = _rev64(z1h) >> 1
    z2h = _rev64(z2h) >> 1
    v0 = z0
    v1 = z0h ^ z2
    v2 = z1 ^ z2h
    v3 = z1h
    v3 = (v3 << 1) | (v2 >> 63)
    v2 = (v2 << 1) | (v1 >> 63)
    v1 = (v1 << 1) | (v0 >> 63)
    v0 = v0 << 1
    v2 ^= v0 ^ (v0 >> 1) ^ (v0 >> 2) ^ (v0 >> 7)
    v1 ^= (v0 << 63) ^ (v0 << 62) ^ (v0 << 57)
    v3 ^= v1 ^ (v1 >> 1) ^ (v1 >> 2) ^ (v1 >> 7)
    v2 ^= (v1 << 63) ^ (v1 << 62) ^ (v1 << 57)
    return v3, v2


@triton.jit(do_not_specialize=["n"])
def _powers_kernel(out_ptr, h_ptr, n, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """out[k] = H^k (two int64: high, low half), k < n, by square and multiply."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    b1 = tl.zeros([BLOCK], tl.uint64) + tl.load(h_ptr).to(tl.uint64, bitcast=True)
    b0 = tl.zeros([BLOCK], tl.uint64) + tl.load(h_ptr + 1).to(tl.uint64, bitcast=True)
    r1 = tl.zeros([BLOCK], tl.uint64) + (1 << 63)  # the polynomial 1 is the first bit
    r0 = tl.zeros([BLOCK], tl.uint64)
    for bit in range(BITS):
        m1, m0 = _gfmul(r1, r0, b1, b0)
        take = ((k >> bit) & 1) == 1
        r1 = tl.where(take, m1, r1)
        r0 = tl.where(take, m0, r0)
        b1, b0 = _gfmul(b1, b0, b1, b0)
    tl.store(out_ptr + 2 * k, r1.to(tl.int64, bitcast=True), mask=mask)
    tl.store(out_ptr + 2 * k + 1, r0.to(tl.int64, bitcast=True), mask=mask)


@triton.jit(do_not_specialize=["n_blocks", "row_words", "pitch_words", "parts"])
def _open_kernel(src_ptr, dst_ptr, frames_ptr, rk_ptr, tab_ptr, pow_ptr, part_ptr,
                 n_blocks, row_words, pitch_words, parts,
                 BLOCK: tl.constexpr):
    """Program (f, p): blocks [p*BLOCK, (p+1)*BLOCK) of frame f.  Decrypts them into the
    destination and leaves the XOR of C_q * H^(n_blocks+1-q) in part[f, p]."""
    f = tl.program_id(0)
    p = tl.program_id(1)
    q = p * BLOCK + tl.arange(0, BLOCK)
    mask = q < n_blocks
    base = tl.load(frames_ptr + 2 * f)  # word offset of the frame (its nonce) in src
    out = tl.load(frames_ptr + 2 * f + 1)  # word offset of its plaintext in dst
    n0 = tl.load(src_ptr + base).to(tl.uint32, bitcast=True)
    n1 = tl.load(src_ptr + base + 1).to(tl.uint32, bitcast=True)
    n2 = tl.load(src_ptr + base + 2).to(tl.uint32, bitcast=True)
    ct = src_ptr + base + 3 + 4 * q
    c0 = tl.load(ct, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c1 = tl.load(ct + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c2 = tl.load(ct + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    c3 = tl.load(ct + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)
    zero = tl.zeros([BLOCK], tl.uint32)
    k0, k1, k2, k3 = _aes256(zero + n0, zero + n1, zero + n2,
                             _bswap32((q + 2).to(tl.uint32)), rk_ptr, tab_ptr)
    w = 4 * q
    at = dst_ptr + out + (w // row_words) * pitch_words + (w % row_words)
    tl.store(at, (c0 ^ k0).to(tl.int32, bitcast=True), mask=mask)
    tl.store(at + 1, (c1 ^ k1).to(tl.int32, bitcast=True), mask=mask)
    tl.store(at + 2, (c2 ^ k2).to(tl.int32, bitcast=True), mask=mask)
    tl.store(at + 3, (c3 ^ k3).to(tl.int32, bitcast=True), mask=mask)
    e = tl.where(mask, n_blocks + 1 - q, 0)
    p1 = tl.load(pow_ptr + 2 * e, mask=mask, other=0).to(tl.uint64, bitcast=True)
    p0 = tl.load(pow_ptr + 2 * e + 1, mask=mask, other=0).to(tl.uint64, bitcast=True)
    g1, g0 = _gfmul(_be64(c0, c1), _be64(c2, c3), p1, p0)
    g1 = tl.where(mask, g1, 0)
    g0 = tl.where(mask, g0, 0)
    slot = part_ptr + 2 * (f * parts + p)
    tl.store(slot, tl.xor_sum(g1, axis=0).to(tl.int64, bitcast=True))
    tl.store(slot + 1, tl.xor_sum(g0, axis=0).to(tl.int64, bitcast=True))


@triton.jit(do_not_specialize=["n_frames", "n_blocks", "aad_blocks", "len1", "len0"])
def _tag_kernel(src_ptr, frames_ptr, aad_ptr, rk_ptr, tab_ptr, pow_ptr, part_ptr, bad_ptr,
                n_frames, n_blocks, aad_blocks, len1, len0,
                PARTS: tl.constexpr, PARTS_P2: tl.constexpr, A_MAX: tl.constexpr,
                BLOCK: tl.constexpr):
    """Per frame: GHASH = the parts + AAD blocks * H^(a+c+2-i) + length block * H; tag =
    GHASH ^ E_K(J0); bad[f] = 1 where it differs from the stored tag."""
    f = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = f < n_frames
    # The decrypt kernel's parts of each frame, as one [frames, parts] tile (every load in
    # flight at once), XOR-reduced along the parts.
    p = tl.arange(0, PARTS_P2)
    slot = part_ptr + 2 * (f[:, None] * PARTS + p[None, :])
    both = mask[:, None] & (p[None, :] < PARTS)
    a1 = tl.xor_sum(tl.load(slot, mask=both, other=0).to(tl.uint64, bitcast=True), axis=1)
    a0 = tl.xor_sum(tl.load(slot + 1, mask=both, other=0).to(tl.uint64, bitcast=True), axis=1)
    for i in range(A_MAX):
        use = mask & ((f * 0 + i) < aad_blocks)  # a tensor compare (interpreters differ)
        x1 = tl.load(aad_ptr + 2 * (f * A_MAX + i), mask=use, other=0).to(tl.uint64,
                                                                            bitcast=True)
        x0 = tl.load(aad_ptr + 2 * (f * A_MAX + i) + 1, mask=use, other=0).to(tl.uint64,
                                                                                bitcast=True)
        e = tl.where(use, aad_blocks + n_blocks + 1 - i, 0)
        p1 = tl.load(pow_ptr + 2 * e, mask=use, other=0).to(tl.uint64, bitcast=True)
        p0 = tl.load(pow_ptr + 2 * e + 1, mask=use, other=0).to(tl.uint64, bitcast=True)
        g1, g0 = _gfmul(x1, x0, p1, p0)
        a1 ^= tl.where(use, g1, 0)
        a0 ^= tl.where(use, g0, 0)
    hp1 = tl.load(pow_ptr + 2).to(tl.uint64, bitcast=True)  # H^1
    hp0 = tl.load(pow_ptr + 3).to(tl.uint64, bitcast=True)
    zero64 = tl.zeros([BLOCK], tl.uint64)
    l1, l0 = _gfmul(zero64 + len1.to(tl.uint64), zero64 + len0.to(tl.uint64),
                    zero64 + hp1, zero64 + hp0)
    a1 ^= l1
    a0 ^= l0
    base = tl.load(frames_ptr + 2 * f, mask=mask, other=0)
    n0 = tl.load(src_ptr + base, mask=mask, other=0).to(tl.uint32, bitcast=True)
    n1 = tl.load(src_ptr + base + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    n2 = tl.load(src_ptr + base + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    one = tl.zeros([BLOCK], tl.uint32) + (1 << 24)  # be32(1) as a LE word
    j0, j1, j2, j3 = _aes256(n0, n1, n2, one, rk_ptr, tab_ptr)
    tag = src_ptr + base + 3 + 4 * n_blocks
    t0 = tl.load(tag, mask=mask, other=0).to(tl.uint32, bitcast=True)
    t1 = tl.load(tag + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
    t2 = tl.load(tag + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
    t3 = tl.load(tag + 3, mask=mask, other=0).to(tl.uint32, bitcast=True)
    ok = ((a1 ^ _be64(j0, j1)) == _be64(t0, t1)) & ((a0 ^ _be64(j2, j3)) == _be64(t2, t3))
    tl.store(bad_ptr + f, tl.where(ok, 0, 1).to(tl.int32), mask=mask)


# -- host side -------------------------------------------------------------------------------------


@dataclass
class FrameBatch:
    """Sealed frames to open in one launch, as arrays (one row per frame): where each lies
    in the staged source (`src`, bytes), where its plaintext goes in the destination
    (`dst`, bytes), and what its AAD names (`keys` [F, key bytes], `index`)."""

    src: np.ndarray
    dst: np.ndarray
    keys: np.ndarray
    index: np.ndarray

    @classmethod
    def of(cls, src: Sequence[int], dst: Sequence[int], keys: Sequence[bytes],
           index: Sequence[int]) -> FrameBatch:
        klen = len(keys[0]) if keys else 0
        if any(len(k) != klen for k in keys):
            raise ValueError("frames of one batch need keys of one length")
        return cls(np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64),
                   np.frombuffer(b"".join(bytes(k) for k in keys), dtype=np.uint8
                                 ).reshape(len(keys), klen),
                   np.asarray(index, dtype=np.uint32))

    def __len__(self) -> int:
        return int(self.src.shape[0])


class _KeyState:
    def __init__(self, dk: bytes, device: torch.device) -> None:
        self.rk = torch.from_numpy(round_keys(dk).view(np.int32)).to(device)
        h = Cipher(algorithms.AES(dk), modes.ECB()).encryptor().update(bytes(16))
        self.h = torch.tensor(struct.unpack(">qq", h), dtype=torch.int64, device=device)
        self.powers: torch.Tensor | None = None


class GcmOpener:
    """Opens one tenant's sealed frames on `device` (CUDA, or CPU tensors under
    TRITON_INTERPRET=1).  `open` queues the kernels for a batch on the current stream;
    `check` waits for them and raises `DecryptError` for the first frame that failed."""

    def __init__(self, tenant: str, device: torch.device | str) -> None:
        self.tenant = tenant
        self.device = torch.device(device)
        self.tables = torch.from_numpy(TABLES.view(np.int32)).to(self.device)
        self._keys: dict[bytes, _KeyState] = {}
        self._flags: list[tuple[torch.Tensor, tuple[FrameBatch, Any]]] = []

    def _key(self, kid: bytes, dk: bytes, max_power: int) -> _KeyState:
        st = self._keys.get(kid)
        if st is None:
            st = self._keys[kid] = _KeyState(dk, self.device)
        if st.powers is None or st.powers.shape[0] <= max_power:
            n = max_power + 1
            out = torch.empty((n, 2), dtype=torch.int64, device=self.device)
            grid = (triton.cdiv(n, POW_BLOCK),)
            _powers_kernel[grid](out, st.h, n, BITS=max(1, n.bit_length()),
                                 BLOCK=POW_BLOCK)
            st.powers = out
        return st

    def _aad_blocks(self, kid: bytes, frames: FrameBatch, version: int
                    ) -> tuple[np.ndarray, int, int]:
        """[F, MAX_AAD_BLOCKS, 2] big-endian halves of each frame's zero-padded AAD: the
        rows of `crypto.frame_aad`, built for the whole batch at once (checked against it
        on the first frame)."""
        tenant = self.tenant.encode()
        klen = frames.keys.shape[1]
        la = 6 + len(kid) + klen + len(tenant)
        blocks = -(-la // 16)
        if blocks > MAX_AAD_BLOCKS:
            raise ValueError(f"AAD of {la} bytes: at most {16 * MAX_AAD_BLOCKS} on the GPU")
        raw = np.zeros((len(frames), MAX_AAD_BLOCKS * 16), dtype=np.uint8)
        raw[:, 0:2] = np.frombuffer(struct.pack("<H", version), dtype=np.uint8)
        raw[:, 2:6] = frames.index.astype("<u4").view(np.uint8).reshape(-1, 4)
        raw[:, 6:6 + len(kid)] = np.frombuffer(kid, dtype=np.uint8)
        raw[:, 6 + len(kid):6 + len(kid) + klen] = frames.keys
        raw[:, 6 + len(kid) + klen:la] = np.frombuffer(tenant, dtype=np.uint8)
        want = frame_aad(self.tenant, kid, frames.keys[0].tobytes(), int(frames.index[0]),
                         version)
        if raw[0, :la].tobytes() != want:
            raise AssertionError("the GPU's AAD layout differs from crypto.frame_aad")
        return raw.view(">u8").astype(np.int64).reshape(len(frames), MAX_AAD_BLOCKS, 2), \
            blocks, la

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self.device.type != "cuda":
            return t
        # Pinned, so the copy is queued on the stream instead of waiting for it.
        return t.pin_memory().to(self.device, non_blocking=True)

    def open(self, kid: bytes, dk: bytes, version: int, src: torch.Tensor,
             frames: FrameBatch, plain_bytes: int, dst: torch.Tensor,
             row_bytes: int, row_pitch: int, label: Any = None,
             upload_on: Any = None) -> None:
        """Queue the opening of `frames` (each `nonce | plain_bytes of ciphertext | tag` in
        `src`) into `dst` on the current stream: plaintext byte i of a frame goes to `dst`
        byte `frame.dst + (i // row_bytes) * row_pitch + i % row_bytes`.

        `src` and `dst` are device tensors whose bytes are addressed from their start;
        `plain_bytes`, `row_bytes`, `row_pitch` and the destinations must be multiples of
        16, the sources of 4.  Nothing is checked until `check()`.

        The batch's frame table is copied to the device on `upload_on` (a CUDA stream;
        the current one if None), and the kernels wait for that copy.  A caller that
        stages the sealed bytes on a copy stream passes it: an upload on the kernel
        stream would queue in the copy engine behind the *next* batch's staging copies,
        so each batch's kernels would start only once the next batch was staged and the
        copy engine would idle while they ran (traced on the H200 machine: 140 ms of
        copies and 47 ms of kernels overlapping for 5 ms)."""
        if not len(frames):
            return
        if plain_bytes % 16 or row_bytes % 16 or row_pitch % 16 or plain_bytes == 0:
            raise ValueError("frames, rows and pitch must be whole 16-byte blocks")
        if (frames.src % 4).any() or (frames.dst % 16).any():
            raise ValueError("a frame's source must be 4-byte and its destination "
                             "16-byte aligned")
        c = plain_bytes // 16
        aad, a, la = self._aad_blocks(kid, frames, version)
        st = self._key(kid, dk, a + c + 1)
        # One upload for the batch's frame table and AAD blocks (both int64).
        f = len(frames)
        table = np.empty(2 * f + aad.size, dtype=np.int64)
        table[0:2 * f:2], table[1:2 * f:2] = frames.src // 4, frames.dst // 4
        table[2 * f:] = aad.reshape(-1)
        if upload_on is not None and self.device.type == "cuda":
            here = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(upload_on):
                table_t = self._upload(table)
                uploaded = torch.cuda.Event()
                uploaded.record(upload_on)
            here.wait_event(uploaded)
            table_t.record_stream(here)
        else:
            table_t = self._upload(table)
        frames_t, aad_t = table_t[:2 * f], table_t[2 * f:]
        parts = triton.cdiv(c, GHASH_BLOCK)
        dev = self.device
        part = torch.empty((len(frames), parts, 2), dtype=torch.int64, device=dev)
        bad = torch.empty(len(frames), dtype=torch.int32, device=dev)
        assert st.powers is not None
        words_src, words_dst = src.view(torch.int32), dst.view(torch.int32)
        _open_kernel[(len(frames), parts)](
            words_src, words_dst, frames_t, st.rk, self.tables, st.powers, part,
            c, row_bytes // 4, row_pitch // 4, parts, BLOCK=GHASH_BLOCK)
        _tag_kernel[(triton.cdiv(len(frames), FINISH_BLOCK),)](
            words_src, frames_t, aad_t, st.rk, self.tables, st.powers, part, bad,
            len(frames), c, a, 8 * la, 8 * plain_bytes,
            PARTS=parts, PARTS_P2=triton.next_power_of_2(parts), A_MAX=MAX_AAD_BLOCKS,
            BLOCK=FINISH_BLOCK)
        self._flags.append((bad, (frames, label)))

    def check(self) -> int:
        """Wait for every queued batch; DecryptError for the first frame that failed to
        authenticate.  Returns the number of frames checked."""
        flags, self._flags = self._flags, []
        if not flags:
            return 0
        bad = torch.cat([b for b, _ in flags]).cpu().numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            for b, (frames, label) in flags:
                if i < b.numel():
                    where = f" ({label})" if label is not None else ""
                    raise DecryptError(
                        f"tenant {self.tenant!r} key {frames.keys[i].tobytes().hex()} "
                        f"frame {int(frames.index[i])}{where}: authentication failed on the "
                        f"GPU (tampered, swapped with another frame, or moved from another "
                        f"key)")
                i -= b.numel()
        return int(bad.size)

    def discard(self) -> None:
        """Forget queued batches without checking them (a load that failed otherwise)."""
        self._flags = []


__all__ = ["FrameBatch", "GcmOpener", "gf_mul", "round_keys"]
