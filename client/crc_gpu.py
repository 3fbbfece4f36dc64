"""CRC32C of KV frames on the GPU (Triton), where the bytes are before they leave it.

A save copies each chunk from the GPU straight into its DRAM reservation; the record's
frame CRCs then had to be computed by the daemon in one more pass over host memory, under
its GIL's hand-offs (docs/results/save-in-place.md: that pass and its per-request Python
held saves at 0.13-0.17 of the D2H rate).  Here they are computed from the staging buffer
on the GPU, and COMMIT carries them (docs/PROTOCOL.md, flag CRCS): no CPU reads the bytes.

CRC32C is affine over GF(2): crc(M) = L(M) ^ crc(0^n), L linear in M's bits.  A frame is
cut into lanes of LANE_WORDS 32-bit words; each lane's L (its bytes as a message of their
own, zero init) is computed serially with slicing-by-4 tables, and moved to its place in
the frame by multiplying with x^(8 * bytes after it) mod P -- a linear map on 32 bits,
applied as the XOR of the columns its set bits select (`_shift_columns`).  Two levels:
lanes within a program of LANES lanes, programs within the frame.  A frame is padded at
its front to a whole number of programs: leading zero bytes add nothing to L.

Everything is plain Triton, so the kernel runs on CPU tensors under `TRITON_INTERPRET=1`
(tests/test_crc_gpu.py checks it against the `crc32c` package the daemon uses).
"""

from __future__ import annotations

import functools

import crc32c
import numpy as np
import torch
import triton
import triton.language as tl

POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
LANE_WORDS = 16  # 64 bytes per lane, serial
LANES = 128  # lanes per program: 8 KiB of a frame
LANE_BYTES = 4 * LANE_WORDS
PROGRAM_BYTES = LANES * LANE_BYTES


@functools.cache
def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


@functools.cache
def _slicing_tables() -> np.ndarray:
    """T0..T3 of slicing-by-4, back to back (1024 entries)."""
    t0 = _byte_table()
    ts = [t0]
    for _ in range(3):
        prev = ts[-1]
        ts.append(((prev >> 8) ^ t0[prev & 0xFF]).astype(np.uint32))
    return np.concatenate(ts)


def _zero_bytes(x: np.ndarray, n: int) -> np.ndarray:
    """L's state after n more zero bytes, for each state in x (x * x^(8n) mod P)."""
    t0 = _byte_table()
    x = x.astype(np.uint32)
    for _ in range(n):
        x = (x >> 8) ^ t0[x & 0xFF]
    return x


@functools.cache
def _shift_bytes_tables(n: int) -> np.ndarray:
    """The map 'append n zero bytes' as four byte tables: U_k[b] = shift(b << 8k, n)."""
    b = np.arange(256, dtype=np.uint32)
    tables: np.ndarray = np.stack([_zero_bytes(b << np.uint32(8 * k), n) for k in range(4)])
    return tables


def _apply(u: np.ndarray, x: np.ndarray) -> np.ndarray:
    y: np.ndarray = (u[0][x & 0xFF] ^ u[1][(x >> 8) & 0xFF] ^ u[2][(x >> 16) & 0xFF]
                     ^ u[3][x >> 24]).astype(np.uint32)
    return y


def _shift_columns(count: int, step_bytes: int) -> np.ndarray:
    """Row i: the 32 columns of 'append (count - 1 - i) * step_bytes zero bytes' (column t
    is the image of bit t), so that row count - 1 is the identity."""
    u = _shift_bytes_tables(step_bytes)
    rows = np.empty((count, 32), dtype=np.uint32)
    rows[count - 1] = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for i in range(count - 2, -1, -1):
        rows[i] = _apply(u, rows[i + 1])
    return rows


@functools.cache
def _frame_constants(frame_bytes: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(lane columns [LANES, 32], program columns [programs, 32], programs, crc(0^n))."""
    programs = -(-frame_bytes // PROGRAM_BYTES)
    lanes = _shift_columns(LANES, LANE_BYTES)
    progs = _shift_columns(programs, PROGRAM_BYTES)
    zero = crc32c.crc32c(bytes(frame_bytes))
    return lanes, progs, programs, zero


def supported(frame_bytes: int) -> bool:
    """Whether frames of this length can have their CRCs computed here (whole lanes)."""
    return frame_bytes > 0 and frame_bytes % LANE_BYTES == 0


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit(do_not_specialize=["frame_words", "pad_words", "zero"])
def _crc_kernel(src_ptr, out_ptr, tab_ptr, lane_ptr, prog_ptr, frame_words, pad_words,
                zero, LANES: tl.constexpr, LANE_WORDS: tl.constexpr):
    """Program (f, p): lanes [p*LANES, (p+1)*LANES) of frame f (counted from its padded
    front); XORs their share of the frame's CRC into out[f]."""
    f = tl.program_id(0)
    p = tl.program_id(1)
    j = tl.arange(0, LANES)
    w0 = (p * LANES + j) * LANE_WORDS - pad_words  # the lane's first word in the frame
    base = src_ptr + f.to(tl.int64) * frame_words
    crc = tl.zeros([LANES], tl.uint32)
    for k in tl.static_range(LANE_WORDS):
        at = w0 + k
        w = tl.load(base + at, mask=at >= 0, other=0).to(tl.uint32, bitcast=True)
        x = crc ^ w
        crc = (tl.load(tab_ptr + 768 + (x & 255).to(tl.int32))
               ^ tl.load(tab_ptr + 512 + ((x >> 8) & 255).to(tl.int32))
               ^ tl.load(tab_ptr + 256 + ((x >> 16) & 255).to(tl.int32))
               ^ tl.load(tab_ptr + (x >> 24).to(tl.int32))).to(tl.uint32, bitcast=True)
    bits = tl.arange(0, 32).to(tl.uint32)
    set_ = ((crc[:, None] >> bits[None, :]) & 1) != 0
    cols = tl.load(lane_ptr + j[:, None] * 32 + tl.arange(0, 32)[None, :])
    cols = cols.to(tl.uint32, bitcast=True)
    part = tl.reduce(tl.reduce(tl.where(set_, cols, 0), 1, _xor), 0, _xor)
    pset = ((part >> bits) & 1) != 0
    pcols = tl.load(prog_ptr + p * 32 + tl.arange(0, 32)).to(tl.uint32, bitcast=True)
    share = tl.reduce(tl.where(pset, pcols, 0), 0, _xor)
    # the affine part of the CRC, once per frame
    share = tl.where(p == 0, share ^ zero.to(tl.uint32, bitcast=True), share)
    tl.atomic_xor(out_ptr + f, share.to(tl.int32, bitcast=True))


class FrameCrcs:
    """CRC32C of equal frames lying back to back in a device buffer, into an int32 tensor
    of one entry per frame (bit pattern of the unsigned CRC).  Constants are built once
    per frame length and kept on the device."""

    def __init__(self, device: torch.device, frame_bytes: int) -> None:
        if not supported(frame_bytes):
            raise ValueError(f"frames of {frame_bytes} bytes: not a multiple of "
                             f"{LANE_BYTES}")
        lanes, progs, self.programs, zero = _frame_constants(frame_bytes)
        self.frame_bytes = frame_bytes
        self.pad_words = (self.programs * PROGRAM_BYTES - frame_bytes) // 4
        self.zero = zero - (1 << 32) if zero >= 1 << 31 else zero  # as an int32 argument
        self.device = device
        as_i32 = functools.partial(_as_int32, device=device)
        self._tab = as_i32(_slicing_tables())
        self._lanes = as_i32(lanes.reshape(-1))
        self._progs = as_i32(progs.reshape(-1))

    def compute_into(self, data: torch.Tensor, n_frames: int, out: torch.Tensor) -> None:
        """out[:n_frames] = the CRCs of the n_frames frames at the start of `data` (any
        dtype, contiguous, on this device), queued on the current stream."""
        words = data.reshape(-1).view(torch.int32)
        if words.numel() * 4 < n_frames * self.frame_bytes:
            raise ValueError("data is shorter than its frames")
        out[:n_frames].zero_()
        _crc_kernel[(n_frames, self.programs)](
            words, out, self._tab, self._lanes, self._progs, self.frame_bytes // 4,
            self.pad_words, self.zero, LANES=LANES, LANE_WORDS=LANE_WORDS)


def _as_int32(a: np.ndarray, *, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32).copy()).to(device)
