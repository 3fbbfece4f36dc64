"""CRC32C of frames on the GPU (kvtier.client.crc_gpu) against the `crc32c` package the
daemon checks frames with: the same Triton kernel, compiled on a CUDA machine and
interpreted on CPU tensors elsewhere (conftest sets TRITON_INTERPRET=1 where there is no
GPU)."""

from __future__ import annotations

import crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.client.crc_gpu import LANE_BYTES, PROGRAM_BYTES, FrameCrcs, supported

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _crcs(data: torch.Tensor, frame_bytes: int, n: int) -> list[int]:
    out = torch.full((n + 1,), 7, dtype=torch.int32, device=DEV)  # stale values
    FrameCrcs(DEV, frame_bytes).compute_into(data, n, out)
    assert int(out[n]) == 7  # nothing past the frames asked for
    return [int(x) & 0xFFFFFFFF for x in out[:n].cpu()]


def _want(raw: bytes, frame_bytes: int, n: int) -> list[int]:
    return [crc32c.crc32c(raw[i * frame_bytes:(i + 1) * frame_bytes]) for i in range(n)]


@settings(max_examples=8, deadline=None)
@given(lanes=st.integers(1, 2 * PROGRAM_BYTES // LANE_BYTES + 3), n=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_frame_crcs_match_crc32c(lanes: int, n: int, seed: int) -> None:
    """Whole programs, a program and a bit (the padded front), one lane."""
    fb = lanes * LANE_BYTES
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (n * fb + 100,), dtype=torch.uint8, generator=g)
    assert _crcs(data.to(DEV), fb, n) == _want(data.numpy().tobytes(), fb, n)


def test_edge_patterns_and_other_dtypes() -> None:
    fb = PROGRAM_BYTES + 3 * LANE_BYTES
    for fill in (0x00, 0xFF, 0x80):
        data = torch.full((2 * fb,), fill, dtype=torch.uint8)
        assert _crcs(data.to(DEV), fb, 2) == _want(data.numpy().tobytes(), fb, 2)
    # a bf16 KV chunk [layers, 2, heads, tokens, dim]: frames are its layers
    kv = torch.randn(3, 2, 2, 16, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    fb = kv[0].numel() * 2
    raw = kv.view(torch.uint8).numpy().tobytes()
    assert _crcs(kv.to(DEV), fb, 3) == _want(raw, fb, 3)


def test_lengths_it_cannot_do_are_refused() -> None:
    assert not supported(0) and not supported(100) and supported(LANE_BYTES)
    with pytest.raises(ValueError, match="multiple of 64"):
        FrameCrcs(DEV, 100)
    with pytest.raises(ValueError, match="shorter"):
        FrameCrcs(DEV, 4096).compute_into(torch.zeros(4096, dtype=torch.uint8, device=DEV),
                                          2, torch.zeros(2, dtype=torch.int32, device=DEV))
