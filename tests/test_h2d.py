"""The row plan behind the loader's 2-D host-to-device copies (kvtier.client.h2d).

The DMA itself needs a GPU (the turn-2 benchmark checks its result bit for bit there);
what can go wrong without one is the plan: these tests check, on CPU tensors, that the
rows it describes are exactly the destination view's elements, in order."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvtier.client.h2d import Rows, copy_rows, plan  # noqa: E402


def through_plan(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Write src into dst's storage as the plan's rows (what the 2-D DMA does)."""
    rows = plan(dst)
    assert rows is not None
    item = dst.element_size()
    flat = dst.untyped_storage()
    whole = torch.empty(0, dtype=dst.dtype).set_(flat)
    view = whole.as_strided((rows.height, rows.width // item), (rows.pitch // item, 1),
                            dst.storage_offset())
    view.copy_(src.reshape(rows.height, -1))


@pytest.mark.parametrize("layers,groups,heads,chunk,dim,cap,chunk_index", [
    (28, 2, 4, 256, 128, 3 * 256 + 1024, 1),  # qwen2.5-7b, 2 layer groups, room to grow
    (32, 4, 8, 256, 128, 2 * 256 + 300, 0),  # llama-3.1-8b, 4 groups
    (4, 1, 2, 16, 8, 64, 3),  # the last chunk of a buffer without room
    (4, 4, 1, 16, 8, 48, 1),  # one head, one layer per group
])
def test_the_plan_covers_exactly_the_loaders_destination(layers: int, groups: int,
                                                         heads: int, chunk: int, dim: int,
                                                         cap: int, chunk_index: int) -> None:
    kv = torch.zeros((layers, 2, 1, heads, cap, dim), dtype=torch.bfloat16)
    per = layers // groups
    for g in range(groups):
        a, b, c = g * per, (g + 1) * per, chunk_index
        dst = kv[a:b, :, 0, :, c * chunk:(c + 1) * chunk]
        src = torch.randn(dst.shape).to(torch.bfloat16)
        want = kv.clone()
        want[a:b, :, 0, :, c * chunk:(c + 1) * chunk] = src
        through_plan(dst, src)
        assert torch.equal(kv, want)
        rows = plan(dst)
        assert rows == Rows(chunk * dim * 2, (b - a) * 2 * heads, cap * dim * 2) \
            or cap == chunk


def test_contiguous_views_are_one_row() -> None:
    t = torch.zeros(6, 5, 4)
    assert plan(t) == Rows(6 * 5 * 4 * 4, 1, 6 * 5 * 4 * 4)
    assert plan(t[2:4]) == Rows(2 * 5 * 4 * 4, 1, 2 * 5 * 4 * 4)


def test_views_that_are_not_rows_of_one_pitch_have_no_plan() -> None:
    t = torch.zeros(6, 5, 4)
    assert plan(t[:, :, :2]) == Rows(2 * 4, 6 * 5, 4 * 4)  # rows of 2 floats, pitch 4
    assert plan(t[:, 1:4, :2]) is None  # rows of 2 elements, pitches 4 and 20: two strides
    assert plan(t.transpose(0, 2)) is None  # innermost dim not contiguous
    assert plan(torch.zeros(3, 1).expand(3, 4)) is None  # broadcast
    assert plan(torch.zeros(0, 4)) is None


def test_copy_rows_declines_what_it_cannot_dma() -> None:
    """On the CPU (or with a non-contiguous source) nothing is issued: the caller falls
    back to Tensor.copy_."""
    dst = torch.zeros(4, 8)[:, :4]
    assert copy_rows(dst, torch.ones(4, 4), stream=None) is False
    assert torch.equal(dst, torch.zeros(4, 4))


def test_bytes_needs_a_stream() -> None:
    from kvtier.client.h2d import Bytes
    assert Bytes.on(None) is None  # no CUDA stream (the CPU path): the caller copies tensors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bytes_copies_by_address_on_its_stream() -> None:
    from kvtier.client.h2d import Bytes
    stream = torch.cuda.Stream()
    copy = Bytes.on(stream)
    assert copy is not None
    src = (torch.arange(1 << 20, dtype=torch.int32) * 7).view(torch.uint8).pin_memory()
    dst = torch.zeros(src.numel() + 64, dtype=torch.uint8, device="cuda")
    copy(dst.data_ptr() + 32, src.data_ptr() + 16, src.numel() - 16)
    stream.synchronize()
    assert copy.issued == 1
    assert torch.equal(dst[32:32 + src.numel() - 16].cpu(), src[16:])
    assert not dst[:32].any() and not dst[32 + src.numel() - 16:].any()
