"""A paged KV cache (vLLM's) as a destination and a source of kvtier chunks (extra `gpu`).

A stored chunk is `chunk_tokens` tokens with one frame per layer, `[2, kv_heads, T,
head_dim]` (kvtier.client.gpu): the same bytes whether a transformers `DynamicCache` or
vLLM's paged blocks produced them, so either engine resumes what the other saved.

vLLM hands the connector one tensor per attention layer, a `[blocks, heads, block_size,
content]` view whose strides depend on the attention backend and the resolved KV cache
layout (vLLM 0.32 standardised the logical shape; the physical order varies), with
content = K's head_dim elements followed by V's.  Nothing here assumes strides: shapes
are checked, strides are read from the tensors.  Where every layer is a view of one
allocation a constant stride apart -- what vLLM's allocator does -- the layers are
addressed as one 5-D view `[layer, block, head, token, content]`, so a scatter or gather
of many chunks and many layers is one indexing kernel instead of one per layer.

A chunk lands in `chunk_tokens / block_size` blocks.  Loading goes frame bytes -> a
staging tensor on the device (one contiguous DMA per chunk-group, from the arena or the
DRAM mapping) -> a scatter by block id into the paged cache; saving is the reverse
(gather by block id into a staging tensor, one D2H).  Staging is bounded: `batch`
chunk-groups per buffer, two buffers, whatever the prefix length.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.client.gpu import KVLayout


class LayoutError(ValueError):
    """The paged cache's tensors do not match the model layout kvtier was told about."""


def layer_index(name: str) -> int:
    """The decoder-layer number in a vLLM layer name (`model.layers.12.self_attn.attn`)."""
    nums = re.findall(r"\.(\d+)\.", f".{name}.")
    if not nums:
        raise LayoutError(f"no layer index in the layer name {name!r}")
    return int(nums[0])


@dataclass(frozen=True)
class PagedGeometry:
    """What the registered tensors say about the cache."""

    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    dtype: torch.dtype


def _as_layers(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The layers as one strided 5-D view [layer, block, head, token, content] over their
    common allocation, or None when they are not evenly spaced views of one storage."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    storage = first.untyped_storage().data_ptr()
    isz = first.element_size()
    gaps = {t.data_ptr() - p.data_ptr() for p, t in itertools.pairwise(tensors)}
    if (len(gaps) != 1 or any(t.untyped_storage().data_ptr() != storage for t in tensors)
            or any(t.stride() != first.stride() for t in tensors)):
        return None
    gap = gaps.pop()
    if gap <= 0 or gap % isz:
        return None
    return torch.as_strided(first, (len(tensors), *first.shape), (gap // isz, *first.stride()),
                            first.storage_offset())


class PagedKV:
    """The per-layer paged tensors of one model, in layer order."""

    def __init__(self, layers: Sequence[torch.Tensor], layout: KVLayout) -> None:
        if len(layers) != layout.num_layers:
            raise LayoutError(f"{len(layers)} KV cache tensors for a model of "
                              f"{layout.num_layers} layers")
        first = layers[0]
        if first.dim() != 4:
            raise LayoutError(f"a paged layer must be [blocks, heads, block_size, content]; "
                              f"got shape {tuple(first.shape)}")
        for t in layers:
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise LayoutError("the KV cache tensors differ in shape, dtype or device")
        B, H, N, C = first.shape
        D = layout.head_dim
        if layout.num_kv_heads != H or C != 2 * D:
            raise LayoutError(f"paged layers hold {H} heads of {C} elements; the model has "
                              f"{layout.num_kv_heads} KV heads of K+V = {2 * D}")
        if first.dtype != layout.dtype:
            raise LayoutError(f"the KV cache is {first.dtype}, the layout says {layout.dtype}")
        if layout.chunk_tokens % N:
            raise LayoutError(f"chunk_tokens ({layout.chunk_tokens}) must be a multiple of "
                              f"vLLM's block size ({N})")
        self.layout = layout
        self.layers = list(layers)
        self.geometry = PagedGeometry(B, H, N, D, first.dtype)
        self.device = first.device
        self.block_size = N
        self.blocks_per_chunk = layout.chunk_tokens // N
        self.stacked = _as_layers(self.layers)

    @classmethod
    def from_vllm(cls, kv_caches: Mapping[str, torch.Tensor], layout: KVLayout) -> PagedKV:
        """From `register_kv_caches`' dict: layers ordered by their index in the name; a
        layer that shares another's cache (cross-layer KV sharing) appears once."""
        seen: dict[int, tuple[int, torch.Tensor]] = {}
        for name, t in kv_caches.items():
            seen.setdefault(t.data_ptr(), (layer_index(name), t))
        return cls([t for _, t in sorted(seen.values(), key=lambda it: it[0])], layout)

    def block_ids(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(list(ids), dtype=torch.int64).to(self.device, non_blocking=True)

    # -- scatter (load) ---------------------------------------------------------------------

    def scatter(self, a: int, b: int, frames: torch.Tensor, blocks: torch.Tensor, *,
                whole: bool = True) -> None:
        """frames [n, b-a, 2, H, T, D] (n chunks, layers [a, b)) -> the paged cache at
        `blocks` [n, k] (k = blocks per chunk).  `whole=False`: some entries are < 0, and
        those blocks are left alone (the caller knows from its host-side table, so no
        device value is read back here: that would wait for the stream)."""
        n, H, k, N, D = frames.shape[0], self.geometry.num_kv_heads, self.blocks_per_chunk, \
            self.block_size, self.layout.head_dim
        # [n, l, 2, H, k, N, D] -> per K/V [l, n, k, H, N, D]: the destination's index order.
        parts = frames.view(n, b - a, 2, H, k, N, D).permute(2, 1, 0, 4, 3, 5, 6)
        self.scatter_parts(a, b, parts, blocks, whole=whole)

    def scatter_window(self, window: torch.Tensor, a: int, b: int, blocks: torch.Tensor, *,
                       whole: bool = True) -> None:
        """Columns [0, n) of a contiguous window [L, 2, 1, H, W*T, D] (layers [a, b) of n
        chunks, column j = chunk j of `blocks` [n, k]) -> the paged cache."""
        n, H, k, N, D = blocks.shape[0], self.geometry.num_kv_heads, self.blocks_per_chunk, \
            self.block_size, self.layout.head_dim
        cols = window[a:b, :, 0, :, :n * k * N]  # [l, 2, H, n*T, D]
        parts = cols.view(b - a, 2, H, n, k, N, D).permute(1, 0, 3, 4, 2, 5, 6)
        self.scatter_parts(a, b, parts, blocks, whole=whole)

    def scatter_parts(self, a: int, b: int, parts: torch.Tensor, blocks: torch.Tensor, *,
                      whole: bool = True) -> None:
        """parts [2 (K/V), b-a, n, k, H, N, D] -> layers [a, b) at `blocks` [n, k]."""
        n, k = blocks.shape
        H, N, D = self.geometry.num_kv_heads, self.block_size, self.layout.head_dim
        if not whole:
            sel = (blocks >= 0).reshape(-1).nonzero().squeeze(1)
            parts = parts.reshape(2, b - a, n * k, H, N, D)[:, :, sel]
            blocks = blocks.reshape(-1)[sel]
        if self.stacked is not None:
            dst = self.stacked[a:b]
            dst[:, blocks, :, :, :D] = parts[0]
            dst[:, blocks, :, :, D:] = parts[1]
            return
        for li in range(a, b):
            self.layers[li][blocks, :, :, :D] = parts[0, li - a]
            self.layers[li][blocks, :, :, D:] = parts[1, li - a]

    # -- gather (save) ----------------------------------------------------------------------

    def gather_many(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """The chunks at `blocks` [n, k] -> out [n, L, 2, H, T, D] (every layer): one
        index_select and two copies whatever n (each launch costs the caller ~0.1 ms)."""
        n = blocks.shape[0]
        L, H, k, N, D = self.layout.num_layers, self.geometry.num_kv_heads, \
            self.blocks_per_chunk, self.block_size, self.layout.head_dim
        view = out.view(n, L, 2, H, k, N, D)
        flat = blocks.reshape(-1)
        if self.stacked is not None:
            sel = self.stacked.index_select(1, flat).view(L, n, k, H, N, 2 * D)
            view[:, :, 0].copy_(sel[..., :D].permute(1, 0, 3, 2, 4, 5))
            view[:, :, 1].copy_(sel[..., D:].permute(1, 0, 3, 2, 4, 5))
            return
        for li, t in enumerate(self.layers):
            sel = t.index_select(0, flat).view(n, k, H, N, 2 * D)
            view[:, li, 0].copy_(sel[..., :D].permute(0, 2, 1, 3, 4))
            view[:, li, 1].copy_(sel[..., D:].permute(0, 2, 1, 3, 4))

    def gather(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """The chunk at `blocks` [k] -> out [L, 2, H, T, D] (every layer)."""
        L, H, k, N, D = self.layout.num_layers, self.geometry.num_kv_heads, \
            self.blocks_per_chunk, self.block_size, self.layout.head_dim
        view = out.view(L, 2, H, k, N, D)
        if self.stacked is not None:
            sel = self.stacked.index_select(1, blocks)  # [L, k, H, N, 2D]: one chunk
            view[:, 0].copy_(sel[..., :D].permute(0, 2, 1, 3, 4))
            view[:, 1].copy_(sel[..., D:].permute(0, 2, 1, 3, 4))
            return
        for li, t in enumerate(self.layers):
            sel = t.index_select(0, blocks)  # [k, H, N, 2D]
            view[li, 0].copy_(sel[..., :D].permute(1, 0, 2, 3))
            view[li, 1].copy_(sel[..., D:].permute(1, 0, 2, 3))


class PagedDestination:
    """A load's destination in a paged cache: chunk c of the load goes to `blocks[c]`.

    Copies land in staging buffers of `batch` chunk-groups on the cache's device; a full
    buffer, a change of layer group, or the end of a group is scattered into the blocks on
    the copy stream (stream order: a buffer is refilled only after its scatter ran)."""

    def __init__(self, paged: PagedKV, blocks: Sequence[Sequence[int]], *,
                 batch: int = 16, staging: list[torch.Tensor] | None = None) -> None:
        self.paged = paged
        self.device = paged.device
        lay = paged.layout
        k = paged.blocks_per_chunk
        for row in blocks:
            if len(row) != k:
                raise ValueError(f"a chunk takes {k} blocks, got {len(row)}")
        self.partial = {c for c, row in enumerate(blocks) if min(row) < 0}
        self.blocks = paged.block_ids([b for row in blocks for b in row]).view(len(blocks), k)
        self.batch = max(1, batch)
        self.frame_elems = 2 * lay.num_kv_heads * lay.chunk_tokens * lay.head_dim
        # Two buffers of `batch` chunks of every layer, allocated before the load's streams
        # use them (and kept by the caller across loads).
        self._staging = staging if staging is not None else []
        need = self.batch * lay.num_layers * self.frame_elems
        if len(self._staging) < 2 or any(t.numel() < need or t.device != self.device
                                         for t in self._staging[:2]):
            self._staging[:] = [torch.empty(need, dtype=lay.dtype, device=self.device)
                                for _ in range(2)]
        self._turn = 0
        self._sstream: Any = None  # CUDA: the scatter kernels' stream
        self._scattered: list[Any] = [None, None]  # per buffer: event after its last scatter
        self._last: Any = None
        self._pending: list[int] = []  # chunks staged in the current buffer
        self._group: tuple[int, int] | None = None
        self._used = 0

    def record_stream(self, stream: Any) -> None:
        """The paged cache is vLLM's (allocated once, never freed under a load); the
        staging buffers are reused across loads: mark them used on `stream`."""
        for t in self._staging:
            t.record_stream(stream)

    @property
    def staging(self) -> list[torch.Tensor]:
        """The staging buffers (a caller may keep them for the next load)."""
        return self._staging

    def target(self, c: int, a: int, b: int, stream: Any) -> torch.Tensor:
        """Where the copy of chunk c's frames [a, b) goes: [b-a, 2, H, T, D]."""
        if self._group is not None and (self._group != (a, b) or self._used == self.batch):
            self._scatter(stream)
        s = self._turn % 2
        if not self._pending and self._scattered[s] is not None and stream is not None:
            stream.wait_event(self._scattered[s])  # its last scatter has read it
        self._group = (a, b)
        buf = self._staging[s]
        per = (b - a) * self.frame_elems
        region = buf[self._used * per:(self._used + 1) * per]
        self._pending.append(c)
        self._used += 1
        lay = self.paged.layout
        return region.view(b - a, 2, lay.num_kv_heads, lay.chunk_tokens, lay.head_dim)

    def flush(self, stream: Any) -> None:
        """Scatter what is staged; afterwards `stream` is ordered after every scatter so
        far (an event the caller records on it marks the blocks filled)."""
        self._scatter(stream)
        if stream is not None and self._last is not None:
            stream.wait_event(self._last)

    def _scatter(self, stream: Any) -> None:
        """Scatter the staged batch into the blocks.  On CUDA on a stream of its own, after
        the batch's copies (an event on the copy stream): the copy engine goes on with the
        next batch, into the other buffer, while the kernel runs."""
        if not self._pending or self._group is None:
            return
        a, b = self._group
        lay = self.paged.layout
        n = len(self._pending)
        s = self._turn % 2
        buf = self._staging[s][:n * (b - a) * self.frame_elems]
        frames = buf.view(n, b - a, 2, lay.num_kv_heads, lay.chunk_tokens, lay.head_dim)
        p = self._pending
        whole = not self.partial.intersection(p)
        if stream is None:
            self.paged.scatter(a, b, frames, self._index(p), whole=whole)
        else:
            if self._sstream is None:
                self._sstream = torch.cuda.Stream(device=self.device)
                for t in self._staging:
                    t.record_stream(self._sstream)
            copied = torch.cuda.Event()
            copied.record(stream)
            self._sstream.wait_event(copied)
            with torch.cuda.stream(self._sstream):  # the index goes up in order with it
                self.paged.scatter(a, b, frames, self._index(p), whole=whole)
                done = torch.cuda.Event()
                done.record(self._sstream)
            self._scattered[s] = self._last = done
        self._pending, self._used, self._group = [], 0, None
        self._turn += 1

    def window(self, columns: int) -> torch.Tensor:
        """A contiguous cache of `columns` chunks, [L, 2, 1, H, columns*T, D], for sealed
        chunks opened on the GPU before they are scattered (kept in `staging`)."""
        lay = self.paged.layout
        shape = (lay.num_layers, 2, 1, lay.num_kv_heads, columns * lay.chunk_tokens,
                 lay.head_dim)
        if len(self._staging) < 3 or tuple(self._staging[2].shape) != shape:
            del self._staging[2:]
            self._staging.append(torch.empty(shape, dtype=lay.dtype, device=self.device))
        return self._staging[2]

    def scatter_window(self, window: torch.Tensor, a: int, b: int,
                       chunks: list[int]) -> None:
        """Columns [0, len(chunks)) of `window` are layers [a, b) of those chunks (of this
        load): to their blocks, on the current stream."""
        self.paged.scatter_window(window, a, b, self._index(chunks),
                                  whole=not self.partial.intersection(chunks))

    def _index(self, p: list[int]) -> torch.Tensor:
        n = len(p)
        if p == list(range(p[0], p[0] + n)):
            return self.blocks[p[0]:p[0] + n]
        return self.blocks[torch.as_tensor(p, device=self.device)]


class PagedSource:
    """A save's source in a paged cache: chunk c of the save is read from `blocks[c]`."""

    def __init__(self, paged: PagedKV, blocks: Sequence[Sequence[int]]) -> None:
        self.paged = paged
        k = paged.blocks_per_chunk
        for row in blocks:
            if len(row) != k:
                raise ValueError(f"a chunk takes {k} blocks, got {len(row)}")
        self.blocks = paged.block_ids([b for row in blocks for b in row]).view(len(blocks), k)
        self.device = paged.device

    def gather(self, c: int, out: torch.Tensor) -> None:
        self.paged.gather(self.blocks[c], out)

    def gather_many(self, c0: int, n: int, out: torch.Tensor) -> None:
        """Chunks [c0, c0 + n) into out [n, L, 2, H, T, D]: one index_select for all."""
        self.paged.gather_many(self.blocks[c0:c0 + n], out)


__all__ = ["LayoutError", "PagedDestination", "PagedGeometry", "PagedKV", "PagedSource",
           "layer_index"]
