"""The GPU data path: KV chunks between a model's cache and kvtierd (extra `gpu`).

Layout: a chunk is `chunk_tokens` tokens; its value has one frame per layer, each frame
K and V of that layer for those tokens: `[2, kv_heads, chunk_tokens, head_dim]` in the
model's dtype.  Keys are chained (kvtier.client.keys), so a prompt's longest stored
prefix is one LOOKUP.

* `register_arena` pins the client's shared arena with `cudaHostRegister`: copies between
  the arena and the GPU run at pinned-memory speed, and the daemon reads media straight
  into that same memory.
* `KVSaver` packs the cache on the GPU (one kernel per layer), copies one chunk at a time
  into double-buffered arena slots (D2H on a side stream) and PUTs each chunk while the
  next one is copied.
* `KVLoader` loads a stored prefix in *layer-group-major* order.  Chunks in the DRAM tier
  are MAPped: the daemon pins them in the tenant's DRAM memfd, which the client has mapped
  read-only and registered with CUDA (`register_dram`), and each is copied from there to
  the GPU in one DMA — no memcpy on any CPU.  Other chunks: the daemon fills arena slots
  with frames [l0, l1) of each chunk (many requests in flight), and each slot is copied
  on.  Every copy lands directly at its final place in the cache (one allocation laid out
  [layer, K/V, head, token, dim]), on a side stream; when a group's copies are queued a
  CUDA event is recorded.
  `attach_layer_waits` makes decoder layer L wait (on the GPU) only for its group's event,
  so the first layers compute while later layers are still arriving.
* `build_cache` / `resume` connect this to Hugging Face transformers' `DynamicCache`.

torch is imported here only; the rest of kvtier.client works without it.  On a CPU-only
machine the same code runs with plain copies (streams and events become no-ops).
"""

from __future__ import annotations

import collections
import os
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import numpy as np
import torch

from kvtier.client.arena import ArenaAllocator, ArenaFullError, Slot
from kvtier.client.client import Client
from kvtier.client.crypto import OVERHEAD, FrameCipher
from kvtier.client.errors import (
    InvalidRequestError,
    KvtierError,
    NoSpaceError,
    ValueTooLargeError,
)
from kvtier.client.h2d import Bytes, copy_rows
from kvtier.client.keys import chunk_keys, model_fingerprint
from kvtier.client.protocol import Completion, Tier

CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly
MAP_BATCH = 32  # keys per MAP request (the first DMA waits only for the first batch)
# ... and the first batches are smaller still: all batches go out at once and the daemon
# answers them in turn, so the first copy waits for the first answer.  Measured on an
# H100 (128k tokens, 1024 chunk-groups): 15-35 ms to the first answer with 32-key batches.
MAP_FIRST = (2, 4, 8, 16)


def _map_batches(chunks: Sequence[int]) -> list[Sequence[int]]:
    """`chunks` cut into MAP requests: MAP_FIRST's sizes, then MAP_BATCH each."""
    out, i = [], 0
    for n in MAP_FIRST:
        if i < len(chunks):
            out.append(chunks[i:i + n])
            i += n
    out += [chunks[j:j + MAP_BATCH] for j in range(i, len(chunks), MAP_BATCH)]
    return out


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    chunk_tokens: int = 256

    @property
    def itemsize(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def frame_bytes(self) -> int:
        return 2 * self.num_kv_heads * self.chunk_tokens * self.head_dim * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.num_layers * self.frame_bytes

    def fingerprint(self, model_name: str) -> bytes:
        return model_fingerprint(model_name, dtype=str(self.dtype), num_layers=self.num_layers,
                                 num_kv_heads=self.num_kv_heads, head_dim=self.head_dim)

    @classmethod
    def from_config(cls, cfg: Any, dtype: torch.dtype, chunk_tokens: int = 256) -> KVLayout:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", heads), head_dim,
                   dtype, chunk_tokens)


# -- pinned arena ------------------------------------------------------------------------------


def register_arena(client: Client) -> bool:
    """cudaHostRegister the client's arena (no-op without CUDA). Returns True if pinned."""
    if not torch.cuda.is_available() or getattr(client, "_cuda_registered", False):
        return bool(getattr(client, "_cuda_registered", False))
    ptr = torch.frombuffer(client.arena, dtype=torch.uint8).data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, client.arena.nbytes, 0)
    if int(err) != 0:
        raise KvtierError(f"cudaHostRegister of the arena failed: {err}")
    client._cuda_registered = True  # type: ignore[attr-defined]
    client._cuda_ptr = ptr  # type: ignore[attr-defined]
    # Unmapping registered memory behind the driver's back breaks later CUDA calls.
    client.on_close(lambda: unregister_arena(client))
    return True


def unregister_arena(client: Client) -> None:
    if getattr(client, "_cuda_registered", False):
        torch.cuda.cudart().cudaHostUnregister(client._cuda_ptr)  # type: ignore[attr-defined]
        client._cuda_registered = False  # type: ignore[attr-defined]


def dram_tensor(client: Client) -> torch.Tensor:
    """The tenant's DRAM tier as a uint8 CPU tensor over the client's mapping: MAPped
    values are copied from it, RESERVEd frames written into it."""
    t: torch.Tensor | None = getattr(client, "_dram_tensor", None)
    if t is None:
        if client.dram_writable:
            t = torch.frombuffer(client.dram, dtype=torch.uint8)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a read-only mapping: a copy source only
                t = torch.from_numpy(np.frombuffer(client.dram, dtype=np.uint8))
        client._dram_tensor = t  # type: ignore[attr-defined]
    return t


def register_dram(client: Client) -> bool:
    """cudaHostRegister the tenant's DRAM mapping, so MAPped values go to the GPU and saved
    chunks come from it at pinned speed.  False where CUDA is absent or registering fails
    (the loader then GETs DRAM hits through the arena, the saver PUTs through it)."""
    state = getattr(client, "_dram_registered", None)
    if state is not None:
        return bool(state)
    ok = False
    if torch.cuda.is_available():
        rt = torch.cuda.cudart()
        ptr = dram_tensor(client).data_ptr()
        # a read-only mapping (an older daemon's descriptor) needs cudaHostRegisterReadOnly
        flags = 0 if client.dram_writable else CUDA_HOST_REGISTER_READ_ONLY
        ok = int(rt.cudaHostRegister(ptr, client.dram_size, flags)) == 0
        if ok:
            client.on_close(lambda: rt.cudaHostUnregister(ptr))
        else:
            torch.cuda.cudart().cudaGetLastError()  # clear the sticky-free error state
    client._dram_registered = ok  # type: ignore[attr-defined]
    return ok


def _slot_tensor(slot: Slot, nbytes: int) -> torch.Tensor:
    return torch.frombuffer(slot.view[:nbytes], dtype=torch.uint8)


def _copy(dst: torch.Tensor, src: torch.Tensor, stream: Any, event: bool = True) -> Any:
    """dst <- src: on `stream` without blocking (returns the event that marks it done, if
    `event`), or synchronously when there is no stream (CPU)."""
    if stream is None:
        dst.copy_(src)
        return None
    with torch.cuda.stream(stream):
        # A strided destination as one 2-D DMA (kvtier.client.h2d); copy_ otherwise.
        if not copy_rows(dst, src, stream):
            dst.copy_(src, non_blocking=True)
        if not event:
            return None
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev


# -- reading and writing a transformers cache ---------------------------------------------------


def cache_layer(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of one layer, each [batch, kv_heads, seq, head_dim], across cache versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    k, v = cache[layer]
    return k, v


def build_cache(per_layer: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any = None,
                buffers: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """A transformers DynamicCache holding the given per-layer (K, V) tensors.

    `buffers`: per layer, the (K, V) buffers that the tensors are leading views of; new
    tokens are then written in place after them (while there is room) instead of
    `torch.cat`-ing the whole prefix on every forward.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, (k, v) in enumerate(per_layer):
        # update() would torch.cat the tensors (a copy, on the current stream, possibly
        # before a side stream filled them): initialise with nothing, then attach them.
        cache.update(k[..., :0, :], v[..., :0, :], i)
        layers = getattr(cache, "layers", None)
        if layers is not None:
            layers[i].keys, layers[i].values = k, v
            if buffers is not None:
                _grow_in_place(layers[i], *buffers[i])
        else:  # transformers < 4.56 keeps two lists
            legacy: Any = cache
            legacy.key_cache[i], legacy.value_cache[i] = k, v
    return cache


def _leading_view(t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether `t` is `buf[..., :n, :]` for some n (also n = 0)."""
    return (t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            and t.storage_offset() == buf.storage_offset() and t.stride() == buf.stride())


def _grow_in_place(layer: Any, kbuf: torch.Tensor, vbuf: torch.Tensor) -> None:
    """Make a cache layer append into (kbuf, vbuf) while its tensors are their leading
    views and there is room; anything else (crop and regrow, overflow) takes the layer's
    own update.

    The replacement holds the layer weakly and its class's update unbound: a closure over
    the layer (or its bound method) would make the layer a reference cycle, whose buffers
    -- a whole prefix, 58 GB at 1M tokens -- only the garbage collector gives back, long
    after the caller dropped the cache."""
    own = type(layer).update
    ref = weakref.ref(layer)

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        lay = ref()
        assert lay is not None  # called through the layer, which is alive
        keys = lay.keys
        n, m = keys.shape[-2], key_states.shape[-2]
        # Whether `keys` is still the buffer's leading view, by storage: an empty view's
        # data_ptr() is 0 (a cache that starts empty would never grow in place).
        if (not _leading_view(keys, kbuf) or n + m > kbuf.shape[-2]
                or key_states.shape[:-2] != kbuf.shape[:-2]):
            return own(lay, key_states, value_states, *args, **kwargs)  # type: ignore[no-any-return]
        kbuf[:, :, n:n + m].copy_(key_states)
        vbuf[:, :, n:n + m].copy_(value_states)
        lay.keys, lay.values = kbuf[:, :, :n + m], vbuf[:, :, :n + m]
        return lay.keys, lay.values

    layer.update = update


# -- saving ------------------------------------------------------------------------------------


@dataclass
class SaveReport:
    chunks: int = 0
    skipped: int = 0  # already stored
    bytes: int = 0
    seconds: float = 0.0
    # where the seconds went: waiting for a staging slot's D2H copy, and for a slot's
    # previous PUT to be acknowledged before the slot could be reused
    d2h_wait_s: float = 0.0
    put_wait_s: float = 0.0
    reserve_wait_s: float = 0.0  # in place: waiting for RESERVE answers
    in_place: bool = False  # written into the DRAM tier's reservations (no daemon copy)
    frame_crcs: bool = False  # in place: CRCs computed on the device, carried by COMMIT
    put_chunks: int = 0  # of those, chunks the DRAM tier had no room for: PUT instead


def _give_back(allocator: ArenaAllocator, held: list[Slot]) -> None:
    """Free `held` (arena slots of a saver or loader) and empty it: close() calls it, and
    a finalizer when the owner is collected unclosed (nothing of it can be reading or
    writing the slots then), so a saver made per save does not exhaust the arena."""
    for s in held:
        allocator.free(s)
    held.clear()


class KVSaver:
    def __init__(self, client: Client, layout: KVLayout, fingerprint: bytes, *,
                 slots: int = 2, cipher: FrameCipher | None = None,
                 in_place: bool | None = None, reserve_ahead: int = 8,
                 frame_crcs: bool | None = None) -> None:
        """`cipher`: seal every frame (AES-256-GCM, kvtier.client.crypto) before its PUT;
        required when the tenant's policy is `encryption = "on"`.

        `in_place` (default: wherever the tenant has a DRAM tier, and on a GPU where its
        mapping registers with CUDA): each chunk is RESERVEd in the DRAM tier
        `reserve_ahead` chunks ahead, copied from the GPU straight into its reservation
        (sealed there, for a cipher) and COMMITted -- the daemon copies nothing.  False:
        PUT through arena slots.

        `frame_crcs` (default: for unsealed chunks on a GPU): the frames' CRC32Cs are
        computed on the device from the staging buffer (kvtier.client.crc_gpu) and carried
        by the COMMIT, so the daemon does not read the frames at all; otherwise it reads
        them once for their CRCs.  True also on CPU tensors (Triton's interpreter, for
        tests); False: never."""
        if cipher is None and client.encryption == "on":
            raise KvtierError("this tenant's policy is encryption = \"on\": pass "
                              "cipher=FrameCipher(...) (or have the operator set \"off\")")
        self.client = client
        self.layout = layout
        self.fingerprint = fingerprint
        self.cipher = cipher
        n = layout.chunk_bytes
        self.slots = [client.allocator.alloc(n + 8 * layout.num_layers) for _ in range(slots)]
        sealed = n + layout.num_layers * (OVERHEAD + 8)
        self.sealed = [client.allocator.alloc(sealed) for _ in range(slots)] if cipher else []
        self._staging: list[torch.Tensor] = []
        self._staging_flat = torch.empty(0)
        self.in_place = in_place
        # RESERVE frame tables, one per reservation in flight
        self.tables = [client.allocator.alloc(8 * layout.num_layers)
                       for _ in range(max(1, reserve_ahead))] \
            if in_place is not False and client.dram_size and client.dram_writable else []
        self.frame_crcs = frame_crcs
        # In place, chunks are gathered (and their CRCs computed) `group` at a time, into
        # one half of the staging buffers while the other half's D2H copies run: one
        # launch per group instead of one per chunk (each costs ~0.1 ms of this thread).
        self.group = max(1, slots // 2)
        self._crcs: Any = None  # kvtier.client.crc_gpu.FrameCrcs, made at the first save
        self._crc_dev: torch.Tensor | None = None  # [CRC slots, group * layers] int32
        # CRC tables carried by COMMITs, a group's per slot: enough that a slot is
        # rewritten only once the COMMITs that read it (at most `slots` in flight, the
        # one whose D2H is queued, the next) were answered
        self.crc_slots = [client.allocator.alloc(4 * layout.num_layers * self.group)
                          for _ in range(-(-(slots + 2) // self.group) + 1)] \
            if self.tables else []
        # Given back by close(), or when the saver is dropped without it.
        self._held = [*self.slots, *self.sealed, *self.tables, *self.crc_slots]
        weakref.finalize(self, _give_back, client.allocator, self._held)
        register_arena(client)
        if self.tables and torch.cuda.is_available():
            # Pinning the whole DRAM mapping takes seconds at long context: once per
            # client, here at setup, not in the first save (cached on the client).
            register_dram(client)

    def close(self) -> None:
        _give_back(self.client.allocator, self._held)
        self.slots, self.sealed, self._staging, self.tables = [], [], [], []
        self.crc_slots, self._crcs, self._crc_dev = [], None, None
        self._staging_flat = torch.empty(0)

    def _device_crcs(self, dev: torch.device) -> Any:
        """The device CRC computer for this save's frames, or None (the daemon reads the
        frames for their CRCs): sealed chunks, frames not whole 64-byte lanes, no Triton,
        CPU tensors unless asked for."""
        lay = self.layout
        if self.frame_crcs is False or self.cipher is not None or not self.crc_slots:
            return None
        if dev.type != "cuda" and not self.frame_crcs:
            return None
        try:
            from kvtier.client import crc_gpu
        except ImportError:  # no Triton: the daemon computes them
            if self.frame_crcs:
                raise
            return None
        if not crc_gpu.supported(lay.frame_bytes):
            if self.frame_crcs:
                raise KvtierError(f"frames of {lay.frame_bytes} bytes: device CRCs need a "
                                  f"multiple of {crc_gpu.LANE_BYTES}")
            return None
        if self._crcs is None or self._crcs.device != dev:
            self._crcs = crc_gpu.FrameCrcs(dev, lay.frame_bytes)
            self._crc_dev = torch.zeros((len(self.crc_slots), self.group * lay.num_layers),
                                        dtype=torch.int32, device=dev)
        return self._crcs

    def _can_write_in_place(self, dev: torch.device) -> bool:
        if self.in_place is False or not self.tables:
            return False
        return dev.type != "cuda" or register_dram(self.client)

    def save(self, session: str, token_ids: Sequence[int] | torch.Tensor, cache: Any, *,
             ttl_s: int = 0) -> SaveReport:
        """Store every full chunk of `token_ids` whose KV is in `cache` (and not stored)."""
        t0 = time.perf_counter()
        lay = self.layout
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        keys = chunk_keys(ids, self.fingerprint, chunk_tokens=lay.chunk_tokens)
        if not keys:
            return SaveReport()
        k0, _ = cache_layer(cache, 0)
        n = min(len(keys), k0.shape[2] // lay.chunk_tokens)
        have, _ = self.client.lookup(keys[:n])
        rep = self.save_chunks(session, keys[have:n], CacheSource(cache, lay, have), ttl_s=ttl_s)
        rep.skipped = have
        rep.seconds = time.perf_counter() - t0
        return rep

    def save_chunks(self, session: str, keys: Sequence[bytes], source: Source, *,
                    ttl_s: int = 0) -> SaveReport:
        """PUT chunk c of `source` under keys[c], for every c.

        Staging is bounded whatever the prefix: each chunk is gathered (one kernel per
        layer, or one for all layers of a paged cache) into one of `slots` device
        buffers, copied to an arena slot on a side stream and PUT while the next chunk
        is gathered and copied; at most `slots` PUTs are in flight.  Nothing else of the
        prefix is copied on the device."""
        t0 = time.perf_counter()
        rep = SaveReport()
        if not keys:
            return rep
        dev = source.device
        if self._can_write_in_place(dev):
            try:
                self._save_in_place(session, keys, source, ttl_s, rep)
            except _NoReservation as e:
                if self.in_place:  # asked for explicitly: say why not
                    raise KvtierError(f"no DRAM reservation for the save: {e}") from None
                # a chunk larger than a DRAM segment, a full DRAM tier: through the arena
            else:
                rep.seconds = time.perf_counter() - t0
                return rep
        staging = self._staging_on(dev)
        cuda = dev.type == "cuda"
        stream = torch.cuda.Stream(device=dev) if cuda else None
        pending: list[Future[Completion] | None] = [None] * len(self.slots)
        try:
            for c, key in enumerate(keys):
                s = c % len(self.slots)
                fut, pending[s] = pending[s], None
                if fut is not None:
                    tw = time.perf_counter()
                    self.client.wait(fut, "put")
                    rep.put_wait_s += time.perf_counter() - tw
                # The staging buffer's previous D2H was waited for before its PUT went out.
                pending[s] = self._submit_put(session, key, c, source, staging[s], s, stream,
                                              ttl_s, rep)
        finally:
            errors = []
            for f in pending:
                if f is not None:
                    try:
                        self.client.wait(f, "put")
                    except KvtierError as e:
                        errors.append(e)
        if errors:
            raise errors[0]
        rep.seconds = time.perf_counter() - t0
        return rep

    def _save_in_place(self, session: str, keys: Sequence[bytes], source: Source,
                       ttl_s: int, rep: SaveReport) -> None:
        """save_chunks through DRAM reservations (see __init__); raises _NoReservation,
        having written nothing, if the first chunk cannot be reserved."""
        lay, client = self.layout, self.client
        dev = source.device
        staging = self._staging_on(dev)
        stream = torch.cuda.Stream(device=dev) if dev.type == "cuda" else None
        dram = dram_tensor(client)
        cipher = self.cipher
        crcs = self._device_crcs(dev)
        n, A, S = len(keys), len(self.tables), len(self.slots)
        G = self.group if cipher is None else 1
        lengths = [lay.frame_bytes + (OVERHEAD if cipher else 0)] * lay.num_layers
        total = sum(lengths)
        reserves: collections.deque[tuple[int, Future[Completion]]] = collections.deque()
        reserved: dict[int, bytes] = {}  # offset -> key: reserved, not committed
        commits: collections.deque[Future[Completion]] = collections.deque()
        copied: tuple[Any, int, int] | None = None  # (event, chunk, offset): D2H queued

        def reserve(c: int) -> None:
            req = client.reserve_request(session, keys[c], lengths, self.tables[c % A], ttl_s)
            reserves.append((c, client.submit(req)))

        def commit(ev: Any, c: int, off: int) -> None:
            if ev is not None:
                tw = time.perf_counter()
                ev.synchronize()  # the chunk is in DRAM
                rep.d2h_wait_s += time.perf_counter() - tw
            del reserved[off]
            commits.append(client.submit(client.commit_request(
                keys[c], off, crcs=self._crc_slot(c) if crcs is not None else None,
                frames=lay.num_layers)))
            rep.chunks += 1
            rep.bytes += lay.chunk_bytes
            while len(commits) > S:
                tw = time.perf_counter()
                client.wait(commits.popleft(), "commit")
                rep.put_wait_s += time.perf_counter() - tw

        errors: list[KvtierError] = []
        try:
            for c in range(min(A, n)):
                reserve(c)
            for c in range(n):
                if cipher is None and c % G == 0:  # the next group, gathered at once
                    self._stage_group(c, min(G, n - c), source, stream, crcs is not None)
                _, fut = reserves.popleft()
                tw = time.perf_counter()
                try:
                    off = client.wait(fut, "reserve").result
                except (ValueTooLargeError, NoSpaceError, InvalidRequestError) as e:
                    if c == 0:
                        raise _NoReservation(str(e)) from None
                    if isinstance(e, InvalidRequestError):
                        raise
                    # The DRAM tier is full of values still to be written behind: this
                    # chunk goes through the arena (the daemon writes it to media).
                    if c + A < n:
                        reserve(c + A)
                    if copied is not None:
                        commit(*copied)
                        copied = None
                    buf = staging[c % S] if cipher is not None else self._staged(c)
                    client.wait(self._submit_put(session, keys[c], c, source, buf,
                                                 c % S, stream, ttl_s, rep), "put")
                    rep.put_chunks += 1
                    continue
                rep.reserve_wait_s += time.perf_counter() - tw
                reserved[off] = keys[c]
                if c + A < n:
                    reserve(c + A)
                s = c % S
                # staging[s] was last read by chunk c - S's copy, waited for since
                if cipher is not None:
                    plain = self.slots[s]
                    self._to_host(c, source, staging[s], _slot_tensor(plain, lay.chunk_bytes),
                                  stream, rep, wait=True)
                    cipher.seal_into(session, keys[c], self._frames_of(plain),
                                     client.dram[off:off + total])
                    commit(None, c, off)
                    continue
                # gathered with its group; its slice of the staging buffer to DRAM
                ev = _copy(dram[off:off + lay.chunk_bytes],
                           self._staged(c).view(-1).view(torch.uint8), stream)
                if copied is not None:  # the previous chunk's copy ran meanwhile
                    commit(*copied)
                copied = (ev, c, off)
            if copied is not None:
                commit(*copied)
                copied = None
        finally:
            if copied is not None and copied[0] is not None:
                copied[0].synchronize()  # no DMA into a reservation given up below
            for _c, fut in reserves:
                try:
                    reserved[client.wait(fut, "reserve").result] = keys[_c]
                except KvtierError:
                    pass
            for off, key in reserved.items():
                try:
                    client.abort(key, off)
                except KvtierError as e:
                    errors.append(e)
            for f in commits:
                try:
                    client.wait(f, "commit")
                except KvtierError as e:
                    errors.append(e)
        if errors:
            raise errors[0]
        rep.in_place = True
        rep.frame_crcs = crcs is not None

    def _to_host(self, c: int, source: Source, staging: torch.Tensor, dst: torch.Tensor,
                 stream: Any, rep: SaveReport, *, wait: bool = False) -> Any:
        """Gather chunk c into `staging` and queue its copy into host memory `dst` (on
        `stream`, after the gather); the copy's event (None on the CPU), or, with `wait`,
        None once the copy is done."""
        source.gather(c, staging)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(source.device))
        ev = _copy(dst, staging.view(-1).view(torch.uint8), stream)
        if wait and ev is not None:
            tw = time.perf_counter()
            ev.synchronize()
            rep.d2h_wait_s += time.perf_counter() - tw
            return None
        return ev

    def _staged(self, c: int) -> torch.Tensor:
        """Chunk c's place in the staging buffers: slice c % group of its group's half."""
        G = self.group
        return self._staging_flat[((c // G) % 2) * G + c % G]

    def _crc_slot(self, c: int) -> Slot:
        """Where chunk c's CRCs are in the arena (its group's CRC slot)."""
        G, L = self.group, self.layout.num_layers
        slot = self.crc_slots[(c // G) % len(self.crc_slots)]
        at = (c % G) * 4 * L
        return Slot(slot.offset + at, 4 * L, slot.view[at:at + 4 * L])

    def _stage_group(self, c0: int, m: int, source: Source, stream: Any,
                     crcs: bool) -> None:
        """Gather chunks [c0, c0 + m) into their half of the staging buffers (one launch
        where the source can), and with `crcs` compute their frames' CRCs there and copy
        them to the group's CRC slot (on `stream`, or at once on the CPU).  The half was
        last read by D2H copies of two groups ago, all waited for by their COMMITs."""
        buf = self._staging_flat[((c0 // self.group) % 2) * self.group:][:m]
        gather_many(source, c0, m, buf)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(source.device))
        if not crcs:
            return
        assert self._crc_dev is not None
        k = (c0 // self.group) % len(self.crc_slots)
        frames = m * self.layout.num_layers
        host = torch.frombuffer(self.crc_slots[k].view[:4 * frames], dtype=torch.int32)
        if stream is None:
            self._crcs.compute_into(buf, frames, self._crc_dev[k])
            host.copy_(self._crc_dev[k][:frames])
            return
        with torch.cuda.stream(stream):
            self._crcs.compute_into(buf, frames, self._crc_dev[k])
            host.copy_(self._crc_dev[k][:frames], non_blocking=True)

    def _frames_of(self, slot: Slot) -> list[memoryview]:
        """A chunk's frames (one per layer) in an arena slot holding it."""
        fb = self.layout.frame_bytes
        return [slot.view[i * fb:(i + 1) * fb] for i in range(self.layout.num_layers)]

    def _submit_put(self, session: str, key: bytes, c: int, source: Source,
                    staging: torch.Tensor, s: int, stream: Any, ttl_s: int,
                    rep: SaveReport) -> Future[Completion]:
        """Chunk c through arena slot s: gathered, copied there (waited for: the PUT reads
        the slot), sealed into sealed slot s for a cipher, and PUT; the PUT's future."""
        lay = self.layout
        slot = self.slots[s]
        self._to_host(c, source, staging, _slot_tensor(slot, lay.chunk_bytes), stream, rep,
                      wait=True)
        lengths = [lay.frame_bytes] * lay.num_layers
        if self.cipher is not None:
            plain, slot = slot, self.sealed[s]
            lengths = self.cipher.seal_into(session, key, self._frames_of(plain), slot.view)
        fut = self.client.submit(self.client.put_request(session, key, slot, lengths,
                                                         ttl_s=ttl_s))
        rep.chunks += 1
        rep.bytes += lay.chunk_bytes
        return fut

    def _staging_on(self, dev: torch.device) -> list[torch.Tensor]:
        """One device buffer [layers, 2, heads, T, head_dim] per slot (views of one
        allocation, `_staging_flat`: two halves of `group` chunks), kept across saves."""
        lay = self.layout
        if not self._staging or self._staging[0].device != dev:
            n = max(len(self.slots), 2 * self.group)
            self._staging_flat = torch.empty((n, lay.num_layers, 2, lay.num_kv_heads,
                                              lay.chunk_tokens, lay.head_dim),
                                             dtype=lay.dtype, device=dev)
            self._staging = list(self._staging_flat[:len(self.slots)])
        return self._staging


class _NoReservation(Exception):
    """The DRAM tier refused a save's first reservation (too large, full, none)."""


# -- loading -----------------------------------------------------------------------------------


@dataclass
class LoadReport:
    chunks: int = 0
    tokens: int = 0
    bytes: int = 0
    lookup_s: float = 0.0
    mapped: int = 0  # chunk-groups copied straight from the DRAM mapping
    seconds: float = 0.0  # lookup until the last layer's data is on the device
    tiers: dict[str, int] = field(default_factory=dict)
    layer_groups: int = 1  # the groups it was copied in

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


class Destination(Protocol):
    """Where a load puts chunk c's frames [a, b) (shaped [b-a, 2, heads, T, head_dim]).

    `target` names the tensor a copy goes to; `flush` is called once a layer group's
    copies are queued (a staged destination scatters what it holds, on the copy stream).
    The two kinds: `ContiguousDestination` (one tensor, a transformers cache over it) and
    `kvtier.client.paged.PagedDestination` (vLLM's paged blocks)."""

    device: torch.device

    def target(self, c: int, a: int, b: int, stream: Any) -> torch.Tensor: ...

    def flush(self, stream: Any) -> None: ...

    def record_stream(self, stream: Any) -> None: ...


class StagedDestination(Destination, Protocol):
    """A destination that is not one tensor (paged blocks): sealed chunks opened on the
    GPU go to its `window` of `columns` chunks first, laid out like a contiguous cache, and
    `scatter_window` moves columns [0, len(chunks)) -- layers [a, b) of those chunks of the
    load -- to their places, on the current stream."""

    def window(self, columns: int) -> torch.Tensor: ...

    def scatter_window(self, window: torch.Tensor, a: int, b: int,
                       chunks: list[int]) -> None: ...


class ContiguousDestination:
    """kv [layer, K/V, batch, head, token, dim]: chunk c's frames [a, b) land at
    kv[a:b, :, 0, :, cT:(c+1)T] -- rows of one pitch, each copy straight to its place."""

    def __init__(self, kv: torch.Tensor, chunk_tokens: int) -> None:
        self.kv, self.T, self.device = kv, chunk_tokens, kv.device

    def target(self, c: int, a: int, b: int, stream: Any) -> torch.Tensor:
        return self.kv[a:b, :, 0, :, c * self.T:(c + 1) * self.T]

    def flush(self, stream: Any) -> None:
        return None

    def record_stream(self, stream: Any) -> None:
        self.kv.record_stream(stream)


class Source(Protocol):
    """Where a save reads chunk c (of the save) from: `gather(c, out)` writes its frames
    into out [layers, 2, heads, T, head_dim] on `device` (queued on the current stream)."""

    device: torch.device

    def gather(self, c: int, out: torch.Tensor) -> None: ...


def gather_many(source: Source, c0: int, n: int, out: torch.Tensor) -> None:
    """Chunks [c0, c0 + n) of `source` into out [n, layers, 2, heads, T, head_dim]: in one
    step where the source has `gather_many` (a paged cache: one index_select), else
    chunk by chunk."""
    many = getattr(source, "gather_many", None)
    if many is not None:
        many(c0, n, out)
        return
    for i in range(n):
        source.gather(c0 + i, out[i])


class CacheSource:
    """A transformers cache: chunk c of the save is tokens [(first+c)T, (first+c+1)T)."""

    def __init__(self, cache: Any, layout: KVLayout, first: int) -> None:
        self.cache, self.layout, self.first = cache, layout, first
        self.device = cache_layer(cache, 0)[0].device

    def gather(self, c: int, out: torch.Tensor) -> None:
        T = self.layout.chunk_tokens
        lo = (self.first + c) * T
        for li in range(self.layout.num_layers):
            k, v = cache_layer(self.cache, li)
            out[li, 0].copy_(k[0, :, lo:lo + T])
            out[li, 1].copy_(v[0, :, lo:lo + T])

    def gather_many(self, c0: int, n: int, out: torch.Tensor) -> None:
        """Chunks [c0, c0 + n) into out [n, L, 2, H, T, D]: two copies per layer."""
        T = self.layout.chunk_tokens
        lo = (self.first + c0) * T
        for li in range(self.layout.num_layers):
            for j, x in enumerate(cache_layer(self.cache, li)):
                src = x[0, :, lo:lo + n * T]  # [H, nT, D]
                out[:, li, j].copy_(src.reshape(src.shape[0], n, T, -1).transpose(0, 1))


DEFAULT_INFLIGHT = 16  # KVLoader's arena slots when the arena has room for them
ARENA_HEADROOM = 1 << 20  # and the arena it leaves free beside them, by default
# layer_groups="auto": one group per this many bytes of a load, at most AUTO_MAX_GROUPS.
# On an H200 (qwen2.5-7b, from the DRAM tier, docs/results/turn2-h200-long-context.md),
# turn 2 at 131,072 tokens (7.5 GB) took 0.169 / 0.160 / 0.158 s with 1 / 2 / 4 groups,
# at 409,600 (23.5 GB) 0.503 / 0.482 / 0.478 s: the layers of a group start computing
# while later groups are still copied, so what follows the last copy is one group's share
# of the new tokens' compute; each group costs a pass over the chunks to issue.
AUTO_GROUP_BYTES = 1 << 30
AUTO_MAX_GROUPS = 4


def _group_bounds(num_layers: int, groups: int) -> list[tuple[int, int]]:
    bounds = [round(g * num_layers / groups) for g in range(groups + 1)]
    return [(bounds[g], bounds[g + 1]) for g in range(groups)]


class KVLoader:
    """Loads stored prefixes into device tensors, layer group by layer group."""

    def __init__(self, client: Client, layout: KVLayout, fingerprint: bytes, *,
                 layer_groups: int | str = "auto", inflight: int | None = None,
                 map_dram: bool = True,
                 cipher: FrameCipher | None = None, session: str = "",
                 decrypt: str = "auto", gpu_batch: int = 8) -> None:
        """`layer_groups`: the layers are copied (and waited for by the forward) in this
        many groups; "auto" picks it per load, one group per AUTO_GROUP_BYTES up to
        AUTO_MAX_GROUPS (arena slots are then sized for whole chunks).

        `inflight`: arena slots, i.e. GETs in flight (DRAM hits that are MAPped need
        none).  Default: DEFAULT_INFLIGHT, or as many as the client's arena has room for
        with ARENA_HEADROOM left beside them if fewer (at least 2; a smaller arena is an
        error that says what size it needs).

        `map_dram`: copy DRAM-tier chunks straight from the tenant's DRAM mapping (on CUDA
        only where it can be registered); False: GET every chunk through the arena.

        `cipher`: the frames are sealed (kvtier.client.crypto); `session` names the session
        whose data key covers them (key scope `session`).  `decrypt` says where they are
        opened:

        * "gpu" (the default, "auto", on a CUDA device with Triton): the *ciphertext* goes to
          the device (one DMA per chunk from the DRAM mapping or an arena slot, into staging
          buffers of `gpu_batch` chunk-groups) and kvtier.client.gcm_gpu's kernels decrypt
          it into the cache and check every tag there.  The tags' verdict is read in
          `wait_all` / `finish_resume`, which raise `DecryptError`: nothing computed from
          the cache may leave before they return.
        * "cpu": each chunk is decrypted on all cores (straight out of the DRAM mapping, or
          out of the arena slot it was GET into) into a pinned slot that goes to the device;
          `load` itself raises `DecryptError`."""
        if decrypt not in ("auto", "gpu", "cpu"):
            raise ValueError(f'decrypt must be "auto", "gpu" or "cpu", got {decrypt!r}')
        if gpu_batch < 1:
            raise ValueError("gpu_batch must be at least 1")
        # The kernels write whole 16-byte blocks: rows (T * head_dim) and the cache's row
        # pitch (a multiple of head_dim) must be made of them.
        rows_fit = (layout.chunk_tokens * layout.head_dim * layout.itemsize) % 16 == 0 and \
            (layout.head_dim * layout.itemsize) % 16 == 0
        if decrypt == "gpu" and not rows_fit:
            raise ValueError(f'decrypt="gpu" needs head_dim * {layout.itemsize} bytes to be a '
                             f"multiple of 16 (head_dim {layout.head_dim})")
        gpu = cipher is not None and (decrypt == "gpu" or (
            decrypt == "auto" and rows_fit and torch.cuda.is_available()
            and _triton_present()))
        if layer_groups != "auto" and not (
                isinstance(layer_groups, int) and 1 <= layer_groups <= layout.num_layers):
            raise ValueError(f'layer_groups must be "auto" or in 1..{layout.num_layers}, '
                             f"got {layer_groups!r}")
        self.client = client
        self.layout = layout
        self.fingerprint = fingerprint
        self.auto_groups = layer_groups == "auto"
        # Slots and staging are sized for the largest group a load may use.
        self._set_groups(1 if isinstance(layer_groups, str) else layer_groups)
        self.cipher, self.session = cipher, session
        most = max(b - a for a, b in self.groups)
        biggest = most * layout.frame_bytes
        self.slot_bytes = biggest
        sealed = most * (layout.frame_bytes + OVERHEAD)
        sizes = [sealed if cipher else biggest] + \
            ([biggest] if cipher is not None and not gpu else [])
        self.slots: list[Slot] = []
        self.plain: list[Slot] = []
        try:
            for _ in range(DEFAULT_INFLIGHT if inflight is None else inflight):
                if inflight is None and len(self.slots) >= 2 and \
                        client.allocator.free_bytes < sum(sizes) + ARENA_HEADROOM:
                    break  # what the client's other requests need (LOOKUP keys, MAP tables)
                slot = client.allocator.alloc(sizes[0])
                try:
                    extra = [client.allocator.alloc(n) for n in sizes[1:]]
                except ArenaFullError:
                    client.allocator.free(slot)
                    raise
                self.slots.append(slot)
                self.plain += extra
        except ArenaFullError:
            if inflight is not None or len(self.slots) < 2:
                for x in self.slots + self.plain:
                    client.allocator.free(x)
                want = inflight or 2
                raise ArenaFullError(
                    f"the client's arena ({client.arena_size} bytes) has no room for {want} "
                    f"KVLoader slots of {sum(sizes)} bytes: connect with arena_size >= "
                    f"{want * sum(sizes) + (8 << 20)} (or pass a smaller inflight)") from None
        self._held = [*self.slots, *self.plain]  # see KVSaver
        weakref.finalize(self, _give_back, client.allocator, self._held)
        register_arena(client)
        # Chunks decrypted on the CPU are read straight out of the mapping: no need for the
        # GPU to reach it.
        self.map_dram = map_dram and ((cipher is not None and not gpu) or register_dram(client)
                                      or not torch.cuda.is_available())
        self.gpu_decrypt = gpu
        self.gpu_batch = gpu_batch
        self._opener: Any = None  # kvtier.client.gcm_gpu.GcmOpener, made at the first load
        self._staging: list[torch.Tensor] = []  # device buffers of sealed chunk-groups
        self._staged: list[Any] = []  # per staging buffer: event after its last kernel
        self.events: list[Any] = []
        self.buffers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._mapped: list[int] = []  # DRAM pins to release once the copies are done
        self._copied: Any = None  # CUDA event after the last copy out of the DRAM mapping

    def close(self) -> None:
        """Give back everything: DRAM pins, arena slots, and every device buffer the
        loader holds (the last load's cache, staging buffers, the GPU opener)."""
        self._release_maps()
        _give_back(self.client.allocator, self._held)
        self.slots, self.plain = [], []
        self.buffers, self.events = [], []
        self._staging, self._staged, self._opener = [], [], None

    def prepare(self, device: torch.device | str) -> float:
        """Get ready to load onto `device`, so that no turn pays for setting up: where
        sealed chunks are opened on the GPU, the opener's kernels are compiled (or loaded
        from Triton's on-disk cache) and its staging buffers allocated, by opening one
        frame of this layout sealed with a throwaway key, and checking its plaintext.

        Call it once the device is known (the vLLM connector does, when its I/O thread
        starts).  Returns the seconds it took; 0.0 where nothing is prepared (plain
        tenants, decryption on the CPU).  Without it the first encrypted load of a process
        compiles the kernels itself (seconds on a CUDA device)."""
        if not self.gpu_decrypt:
            return 0.0
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        from kvtier.client.crypto import FORMAT_VERSION, NONCE, frame_aad
        from kvtier.client.gcm_gpu import FrameBatch, GcmOpener

        assert self.cipher is not None
        t0 = time.perf_counter()
        dev = torch.device(device)
        opener, _ = self._device_opener(dev)
        lay = self.layout
        # The shapes the kernels are specialized on are the layout's: a frame of
        # frame_bytes, rows of chunk_tokens * head_dim, a 16-byte key id and value key.
        plain = np.random.default_rng().integers(0, 256, lay.frame_bytes, dtype=np.uint8)
        kid, dk, key = os.urandom(16), AESGCM.generate_key(bit_length=256), os.urandom(16)
        nonce = os.urandom(NONCE)
        sealed = nonce + AESGCM(dk).encrypt(
            nonce, plain.tobytes(), frame_aad(opener.tenant, kid, key, 0, FORMAT_VERSION))
        src = torch.frombuffer(bytearray(sealed), dtype=torch.uint8).to(dev)
        dst = torch.empty(lay.frame_bytes, dtype=torch.uint8, device=dev)
        row = lay.chunk_tokens * lay.head_dim * lay.itemsize
        frames = FrameBatch.of([0], [0], [key], [0])
        probe = GcmOpener(opener.tenant, dev)  # its throwaway key stays out of the loader's
        probe.open(kid, dk, FORMAT_VERSION, src, frames, lay.frame_bytes, dst, row, row)
        probe.check()
        if not torch.equal(dst.cpu(), torch.from_numpy(plain)):
            raise KvtierError(f"the GPU opener on {dev} returned wrong plaintext for a frame "
                              "it authenticated")
        return time.perf_counter() - t0

    def _device_opener(self, dev: torch.device) -> tuple[Any, int]:
        """The GCM opener for `dev` and its staging buffers (made once; remade for another
        device or a larger batch): (opener, bytes a staging buffer holds)."""
        from kvtier.client.gcm_gpu import GcmOpener

        assert self.cipher is not None
        if self._opener is None or self._opener.device != dev:
            self._opener = GcmOpener(self.cipher.tenant, dev)
            self._staging, self._staged = [], []
        most = max(b - a for a, b in self.groups)
        capacity = self.gpu_batch * most * (self.layout.frame_bytes + OVERHEAD)
        if not self._staging or self._staging[0].numel() < capacity:
            self._staging = [torch.empty(capacity + 16, dtype=torch.uint8, device=dev)
                             for _ in range(2 if dev.type == "cuda" else 1)]
            self._staged = [None] * len(self._staging)
        return self._opener, capacity

    def _set_groups(self, groups: int) -> None:
        self.groups = _group_bounds(self.layout.num_layers, groups)
        self.group_of = [g for g, (a, b) in enumerate(self.groups) for _ in range(a, b)]

    def groups_for(self, nbytes: int) -> int:
        """The number of layer groups a load of `nbytes` uses."""
        if not self.auto_groups:
            return len(self.groups)
        return max(1, min(nbytes // AUTO_GROUP_BYTES, AUTO_MAX_GROUPS, self.layout.num_layers))

    def _release_maps(self) -> None:
        if self._mapped:
            if self._copied is not None:
                self._copied.synchronize()
            maps, self._mapped, self._copied = self._mapped, [], None
            self.client.unmap(maps)

    def lookup(self, token_ids: Sequence[int] | torch.Tensor, session: str | None = None
               ) -> tuple[list[bytes], int, list[Any]]:
        # As an array: a 128k-token Python list costs ~10 ms to build and hash.
        ids = token_ids.detach().reshape(-1).to("cpu", torch.int64).numpy() \
            if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids, dtype=np.int64)
        keys = chunk_keys(ids, self.fingerprint, chunk_tokens=self.layout.chunk_tokens)
        if not keys:
            return [], 0, []
        hit, tiers = self.client.lookup(keys, session=session)
        return keys, hit, tiers

    def load(self, token_ids: Sequence[int] | torch.Tensor, device: torch.device | str,
             reserve_tokens: int = 0, session: str | None = None,
             ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], LoadReport]:
        """Per-layer (K, V) tensors [1, heads, n*T, D] on `device` for the stored prefix.

        `session` names the conversation whose turn this is (the daemon's reuse
        statistics; see `Client.lookup`).

        With `reserve_tokens`, each is a view of a buffer with room for that many more
        tokens (`self.buffers`), so a cache built on them can grow in place.

        Returns immediately after issuing the last copy on CUDA: `self.events[g]` marks
        group g's layers ready (use `attach_layer_waits`, or `wait_all`).
        """
        t0 = time.perf_counter()
        keys, hit, tiers = self.lookup(token_ids, session)
        lookup_s = time.perf_counter() - t0
        lay = self.layout
        n = hit
        T, H, D, L = lay.chunk_tokens, lay.num_kv_heads, lay.head_dim, lay.num_layers
        cap = n * T + max(0, reserve_tokens)
        # One allocation for the whole cache, [layer, K/V, batch, head, token, dim]: chunk
        # c's frames [a, b) land at kv[a:b, :, 0, :, cT:(c+1)T] — rows of one pitch, so
        # each copy goes straight to its final place (no staging tensor, no reshuffle).
        # The last load's cache is the caller's now: never hold two loads' buffers at once.
        self.buffers, self.events = [], []
        kv = torch.empty((L, 2, 1, H, cap, D), dtype=lay.dtype, device=torch.device(device))
        self.buffers = [(kv[li, 0], kv[li, 1]) for li in range(L)]
        out = [(kb[:, :, :n * T], vb[:, :, :n * T]) for kb, vb in self.buffers]
        rep = self.load_into(keys[:n], ContiguousDestination(kv, T), tiers[:n], t0=t0)
        rep.lookup_s = lookup_s
        return out, rep

    def load_into(self, keys: Sequence[bytes], dest: Destination,
                  tiers: Sequence[Tier] | None = None, *, t0: float | None = None,
                  ) -> LoadReport:
        """Load the chunks `keys` (chunk c of the load is keys[c]) into `dest`.

        `tiers` (from a LOOKUP) says which are in DRAM and worth a MAP; without it every
        key is MAPped first and what is not in DRAM is read with a GET.  Raises on a
        chunk that is missing or fails its check; the caller recomputes then.  Same
        asynchrony as `load`: `self.events` / `wait_all`."""
        rep = LoadReport()
        t0 = time.perf_counter() if t0 is None else t0
        n = len(keys)
        tiers = list(tiers) if tiers is not None else [Tier.DRAM] * n
        for t in tiers[:n]:
            rep.tiers[t.name.lower()] = rep.tiers.get(t.name.lower(), 0) + 1
        lay = self.layout
        dev = dest.device
        T, H, D, L = lay.chunk_tokens, lay.num_kv_heads, lay.head_dim, lay.num_layers

        def src(raw: torch.Tensor, a: int, b: int) -> torch.Tensor:
            return raw.view(lay.dtype).view(b - a, 2, H, T, D)

        cuda = dev.type == "cuda"
        self.events = []
        if n == 0:
            rep.seconds = time.perf_counter() - t0
            return rep
        if self.auto_groups:
            self._set_groups(self.groups_for(n * lay.chunk_bytes))
        rep.layer_groups = len(self.groups)
        stream = torch.cuda.Stream(device=dev) if cuda else None
        if cuda:
            assert stream is not None
            stream.wait_stream(torch.cuda.current_stream(dev))
        self._release_maps()
        self.events = [None] * len(self.groups)
        if stream is not None:
            dest.record_stream(stream)  # written there, allocated on the current stream
        done_in_group = [0] * len(self.groups)
        in_dram = [c for c in range(n) if tiers[c] == Tier.DRAM] if self.map_dram else []
        # DRAM hits: pinned where they lie, one DMA per layer group from the tenant's DRAM
        # mapping.  One MAP entry per chunk covers all its layers (the frames lie in a row),
        # so more layer groups cost no more MAP work.  MAP goes in batches, all submitted
        # up front: the first copies start as soon as the first batch is pinned, while the
        # daemon pins the rest.  Group 0's copies go out as the pins arrive, the other
        # groups' after it (stream order is group order: layer 0 waits for group 0 only).
        batches = _map_batches(in_dram)
        pending = [self.client.map_submit([keys[c] for c in cs]) for cs in batches]
        mapped: list[set[int]] = [set() for _ in self.groups]
        sealed_at: dict[tuple[int, int], tuple[int, int]] = {}  # (g, c) -> mapped sealed bytes
        per_frame = lay.frame_bytes + (OVERHEAD if self.cipher else 0)
        later: list[list[tuple[int, int]]] = [[] for _ in self.groups]  # (chunk, offset)
        bad: str | None = None

        def copy_mapped(g: int, c: int, off: int) -> None:
            a, b = self.groups[g]
            nbytes = (b - a) * per_frame
            _copy(dest.target(c, a, b, stream),
                  src(dram_tensor(self.client)[off:off + nbytes], a, b), stream, event=False)
            rep.bytes += nbytes
            mapped[g].add(c)
            done_in_group[g] += 1

        for cs, pm in zip(batches, pending, strict=True):
            for c, m in zip(cs, pm.result(), strict=True):
                if m is None:
                    continue  # not in DRAM any more: GET it below
                off, got = m
                self._mapped.append(off)
                if got != L * per_frame:
                    bad = f"chunk {c}: mapped {got} bytes, expected {L * per_frame}"
                    continue
                rep.mapped += len(self.groups)
                for g, (a, b) in enumerate(self.groups):
                    at = off + a * per_frame
                    if self.cipher is not None:  # decrypted from the mapping further down
                        sealed_at[(g, c)] = (at, (b - a) * per_frame)
                    elif bad is None and g == 0:
                        copy_mapped(g, c, at)
                    elif bad is None:
                        later[g].append((c, at))
        for g in range(len(self.groups)):
            if bad is None:
                for c, at in later[g]:
                    copy_mapped(g, c, at)
                if done_in_group[g] == n:
                    self._group_done(g, stream, dest)
        if bad is not None:
            self._copied = None
            if stream is not None:
                stream.synchronize()
            self._release_maps()
            raise KvtierError(bad)
        work = [(g, c) for g in range(len(self.groups)) for c in range(n) if c not in mapped[g]]
        work.sort(key=lambda gc: (gc[0], gc not in sealed_at))  # mapped first, group-major
        if self.gpu_decrypt:
            self._open_on_device(work, sealed_at, keys, dest, stream, done_in_group, n, rep)
            rep.chunks = n
            rep.tokens = n * T
            rep.seconds = time.perf_counter() - t0
            return rep
        # Slots move GET -> (decrypt) -> H2D; a slot is reused once its H2D has read it.
        q: collections.deque[tuple[int, int, int, Future[Completion]]] = collections.deque()
        dq: collections.deque[tuple[int, int, int, Future[None]]] = collections.deque()
        # Slots are reused oldest-freed first: the newest-freed one's H2D copy was queued a
        # moment ago, and waiting for it (below) would wait for every copy queued before
        # it -- the decrypts and GETs would go no faster than the copy queue drains.
        free = collections.deque(range(len(self.slots)))
        slot_free: list[Any] = [None] * len(self.slots)  # CUDA event: slot's H2D finished
        nxt = 0
        cipher = self.cipher
        depth = cipher.threads if cipher is not None else 0

        def decrypt(g: int, c: int, s: int, sealed: memoryview) -> None:
            assert cipher is not None
            a, b = self.groups[g]
            fb, plain = lay.frame_bytes, self.plain[s].view
            dq.append((g, c, s, cipher.submit_open(
                self.session, keys[c],
                [sealed[i * per_frame:(i + 1) * per_frame] for i in range(b - a)],
                [plain[i * fb:(i + 1) * fb] for i in range(b - a)], a)))

        def issue() -> None:
            nonlocal nxt
            while nxt < len(work) and free and (len(dq) < depth or not depth):
                g, c = work[nxt]
                s = free.popleft()
                if slot_free[s] is not None:
                    slot_free[s].synchronize()  # the slot's last H2D copy has read it
                a, b = self.groups[g]
                at = sealed_at.get((g, c))
                if at is not None:  # pinned in DRAM: decrypt straight out of the mapping
                    decrypt(g, c, s, self.client.dram[at[0]:at[0] + at[1]])
                else:
                    req = self.client.get_request(keys[c], self.slots[s], (b - a) * per_frame,
                                                  (a, b), 0)
                    q.append((g, c, s, self.client.submit(req)))
                nxt += 1

        def to_device(g: int, c: int, s: int) -> None:
            a, b = self.groups[g]
            nbytes = (b - a) * lay.frame_bytes
            host = self.plain[s] if cipher is not None else self.slots[s]
            slot_free[s] = _copy(dest.target(c, a, b, stream),
                                 src(_slot_tensor(host, nbytes), a, b), stream)
            free.append(s)
            rep.bytes += nbytes
            done_in_group[g] += 1
            if done_in_group[g] == n:
                self._group_done(g, stream, dest)

        def finish_oldest_decrypt() -> None:
            g, c, s, dfut = dq.popleft()
            dfut.result()  # DecryptError if a frame does not authenticate
            to_device(g, c, s)

        issue()
        while q or dq:
            if q and (not depth or len(dq) < depth):
                g, c, s, fut = q.popleft()
                self._wait_get(g, c, fut, per_frame)
                if cipher is None:
                    to_device(g, c, s)
                else:
                    # One task per chunk (its frames in turn): chunks decrypt in parallel
                    # on all cores while more GETs are in flight.
                    decrypt(g, c, s, self.slots[s].view)
            elif dq:
                finish_oldest_decrypt()
            while dq and dq[0][3].done():
                finish_oldest_decrypt()
            issue()
        self._mapped_copies_queued(stream)
        rep.chunks = n
        rep.tokens = n * T
        rep.seconds = time.perf_counter() - t0
        return rep

    def _wait_get(self, g: int, c: int, fut: Future[Completion], per_frame: int) -> int:
        """Wait for the GET of chunk c's group g; its byte count, checked."""
        comp = self.client.wait(fut, "get")
        a, b = self.groups[g]
        if comp.result != (b - a) * per_frame:
            raise KvtierError(f"chunk {c} layers [{a}, {b}): got {comp.result} bytes, "
                              f"expected {(b - a) * per_frame}")
        return int(comp.result)

    def _open_on_device(self, work: Sequence[tuple[int, int]],
                        sealed_at: dict[tuple[int, int], tuple[int, int]], keys: Sequence[bytes],
                        dest: Destination, stream: Any, done_in_group: list[int],
                        chunks: int, rep: LoadReport) -> None:
        """Sealed chunk-groups to the device and opened there (kvtier.client.gcm_gpu).

        Each chunk-group's sealed bytes are copied (on `stream`) into a staging buffer on the
        device -- from the DRAM mapping where it was MAPped, else from the arena slot a GET
        filled -- and every `gpu_batch` of them are decrypted into the cache by one kernel
        launch on a second stream, which waits for their copies only; a staging buffer is
        refilled once its kernels are done, a slot once its copy is.  The group events are
        recorded on the kernel stream.

        A contiguous destination is decrypted into in place.  A staged one (paged blocks)
        lends a window of `gpu_batch` chunks laid out like a contiguous cache: each batch
        is decrypted into the window's columns in batch order and scattered from there on
        the kernel stream, so the next batch's kernels overwrite the window only after."""
        from kvtier.client.crypto import FORMAT_VERSION
        from kvtier.client.gcm_gpu import FrameBatch

        cipher = self.cipher
        assert cipher is not None
        lay, dev = self.layout, dest.device
        H, T, D, isz = lay.num_kv_heads, lay.chunk_tokens, lay.head_dim, lay.itemsize
        staged: StagedDestination | None = None
        if isinstance(dest, ContiguousDestination):
            kv = dest.kv
        else:
            staged = cast(StagedDestination, dest)
            kv = staged.window(self.gpu_batch)
        cap = kv.shape[4]
        row_bytes, pitch = T * D * isz, cap * D * isz
        layer_bytes = 2 * H * pitch
        per_frame = lay.frame_bytes + OVERHEAD
        opener, capacity = self._device_opener(dev)
        opener.discard()  # an earlier load that failed before its check
        kid, dk = cipher.raw_data_key(self.session)
        kstream = torch.cuda.Stream(device=dev) if stream is not None else None
        if kstream is not None:
            kstream.wait_stream(torch.cuda.current_stream(dev))
            kv.record_stream(kstream)
            for t in self._staging:  # used on both side streams: not freed before they are
                t.record_stream(stream)
                t.record_stream(kstream)
        kv_bytes = kv.view(-1).view(torch.uint8)
        turn = 0
        # The batch being gathered: per chunk-group, its first frame's source offset,
        # destination offset, key, layers [a, b), group and chunk.
        batch: list[tuple[int, int, bytes, int, int, int, int]] = []
        used = 0

        def frames() -> FrameBatch:
            span = np.concatenate([np.arange(b - a) for (_, _, _, a, b, _, _) in batch])
            first = np.repeat(np.arange(len(batch)), [b - a for (_, _, _, a, b, _, _) in batch])
            src = np.array([x[0] for x in batch], dtype=np.int64)[first] + span * per_frame
            dst = np.array([x[1] for x in batch], dtype=np.int64)[first] + span * layer_bytes
            key = np.frombuffer(b"".join(x[2] for x in batch), dtype=np.uint8).reshape(
                len(batch), -1)[first]
            index = (np.array([x[3] for x in batch], dtype=np.uint32)[first] + span
                     ).astype(np.uint32)
            return FrameBatch(src, dst, key, index)

        def flush() -> None:
            nonlocal turn, used, batch
            if not batch:
                return
            s = turn % len(self._staging)
            if kstream is not None:
                assert stream is not None
                copied = torch.cuda.Event()
                copied.record(stream)
                kstream.wait_event(copied)
                with torch.cuda.stream(kstream):
                    opener.open(kid, dk, FORMAT_VERSION, self._staging[s], frames(),
                                lay.frame_bytes, kv_bytes, row_bytes, pitch,
                                upload_on=stream)  # behind this batch's copies, in order
                    if staged is not None:  # the window to its blocks, before it is reused
                        staged.scatter_window(kv, batch[0][3], batch[0][4],
                                              [x[6] for x in batch])
                    done = torch.cuda.Event()
                    done.record(kstream)
                self._staged[s] = done
            else:
                opener.open(kid, dk, FORMAT_VERSION, self._staging[s], frames(),
                            lay.frame_bytes, kv_bytes, row_bytes, pitch)
                if staged is not None:
                    staged.scatter_window(kv, batch[0][3], batch[0][4],
                                          [x[6] for x in batch])
            for *_, g, _c in batch:
                done_in_group[g] += 1
                if done_in_group[g] == chunks:
                    self._group_done(g, kstream)
            turn += 1
            used = 0
            batch = []

        # The staging copies go out by address (one cudaMemcpyAsync each, no tensors).
        raw = Bytes.on(stream)
        staging_at = [t.data_ptr() for t in self._staging]

        def stage(g: int, c: int, host: torch.Tensor, event: bool = False) -> Any:
            """Queue the copy of chunk c's group g (sealed, on the host) into the batch;
            with `event`, returns a CUDA event after it (None on the CPU)."""
            nonlocal used
            a, b = self.groups[g]
            nbytes = (b - a) * per_frame
            if used + nbytes > capacity or (batch and batch[-1][5] != g) or \
                    (staged is not None and len(batch) == self.gpu_batch):  # window full
                flush()
            s = turn % len(self._staging)
            if not batch and self._staged[s] is not None and stream is not None:
                stream.wait_event(self._staged[s])  # its last kernels have read it
            ev = None
            if raw is not None:
                raw(staging_at[s] + used, host.data_ptr(), nbytes)
                if event:
                    ev = torch.cuda.Event()
                    ev.record(stream)
            else:
                ev = _copy(self._staging[s][used:used + nbytes], host, stream,
                           event=event and stream is not None)
            col = len(batch) if staged is not None else c  # staged: the window's column
            batch.append((used, a * layer_bytes + col * row_bytes, keys[c], a, b, g, c))
            used += nbytes
            rep.bytes += (b - a) * lay.frame_bytes
            return ev

        q: collections.deque[tuple[int, int, int, Future[Completion]]] = collections.deque()
        free = collections.deque(range(len(self.slots)))
        slot_free: list[Any] = [None] * len(self.slots)
        nxt = 0
        while nxt < len(work) or q:
            while nxt < len(work):
                g, c = work[nxt]
                at = sealed_at.get((g, c))
                if at is not None:  # pinned in DRAM: straight out of the mapping
                    stage(g, c, dram_tensor(self.client)[at[0]:at[0] + at[1]])
                elif free:
                    s = free.popleft()
                    if slot_free[s] is not None:
                        slot_free[s].synchronize()  # its copy to the device has read it
                    a, b = self.groups[g]
                    req = self.client.get_request(keys[c], self.slots[s], (b - a) * per_frame,
                                                  (a, b), 0)
                    q.append((g, c, s, self.client.submit(req)))
                else:
                    break
                nxt += 1
            if not q:
                continue
            if not q[0][3].done():
                flush()  # the device works on what is staged while the GET completes
            g, c, s, fut = q.popleft()
            got = self._wait_get(g, c, fut, per_frame)
            slot_free[s] = stage(g, c, _slot_tensor(self.slots[s], got), event=True)
            free.append(s)
        flush()
        self._mapped_copies_queued(stream)

    def _mapped_copies_queued(self, stream: Any) -> None:
        """Every read of the DRAM mapping is queued (CUDA: an event marks when the pins can
        go) or done (CPU: they go now)."""
        if self._mapped and stream is not None:
            self._copied = torch.cuda.Event()
            self._copied.record(stream)
        elif self._mapped:
            self._release_maps()

    def _group_done(self, g: int, stream: Any, dest: Destination | None = None) -> None:
        """Every copy of group g is queued: an event on the side stream marks its layers
        ready (stream order: the event completes after those copies and, for a staged
        destination, the scatter that follows them)."""
        if dest is not None:
            dest.flush(stream)
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
            self.events[g] = ev

    def wait_all(self) -> None:
        """Make the current stream wait for every group; then release the DRAM pins
        (once the copies out of the DRAM mapping have completed)."""
        for ev in self.events:
            if ev is not None:
                torch.cuda.current_stream().wait_event(ev)
        self._release_maps()
        if self._opener is not None:
            self._opener.check()  # DecryptError for the first frame that did not open

    def synchronize(self) -> None:
        """Wait on the host until the last load is in place (every group's copies and, for
        a staged destination, its scatters); then release the DRAM pins and check the
        tags of chunks opened on the GPU (DecryptError).  For a thread that loads on
        behalf of an engine, whose streams must not wait for it."""
        for ev in self.events:
            if ev is not None:
                ev.synchronize()
        self._release_maps()
        if self._opener is not None:
            self._opener.check()

    def attach_layer_waits(self, layers: Sequence[torch.nn.Module]) -> Callable[[], None]:
        """Make each decoder layer wait (on the GPU) for its own group's data only.

        Returns a function that removes the hooks.
        """
        handles = []
        for li, layer in enumerate(layers):
            def hook(_mod: Any, _args: Any, li: int = li) -> None:
                g = self.group_of[li]
                if g < len(self.events) and self.events[g] is not None:
                    torch.cuda.current_stream().wait_event(self.events[g])
            handles.append(layer.register_forward_pre_hook(hook))

        def remove() -> None:
            for h in handles:
                h.remove()
        return remove


# -- transformers integration --------------------------------------------------------------------


def _triton_present() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    base = getattr(model, "model", model)
    layers: Sequence[torch.nn.Module] = base.layers
    return layers


@dataclass
class ResumeResult:
    cache: Any
    prefix_tokens: int  # tokens whose KV came from kvtier
    load: LoadReport


def resume(model: Any, loader: KVLoader, token_ids: torch.Tensor,
           reserve_tokens: int | None = None, session: str | None = None) -> ResumeResult:
    """Load the longest stored prefix of `token_ids` into a DynamicCache for `model`.

    The cache's layers fill asynchronously on CUDA; hooks on the decoder layers make each
    layer wait only for its own data.  Call `.cache` with model(..., past_key_values=...)
    or model.generate(..., past_key_values=...) on the *remaining* tokens (generate slices
    them itself).  The hooks stay until `loader.wait_all()` is called.

    The cache grows in place for `reserve_tokens` more tokens (default: the rest of the
    prompt plus 1024 to generate) instead of copying the whole prefix at every update.
    """
    device = next(model.parameters()).device
    if reserve_tokens is None:
        reserve_tokens = token_ids.numel() % loader.layout.chunk_tokens + 1024
    per_layer, rep = loader.load(token_ids.reshape(-1), device, reserve_tokens, session)
    if device.type == "cuda" and rep.chunks:
        remove = loader.attach_layer_waits(decoder_layers(model))
        loader._remove_hooks = remove  # type: ignore[attr-defined]
    cache = build_cache(per_layer, getattr(model, "config", None),
                        loader.buffers if rep.chunks else None)
    return ResumeResult(cache, rep.tokens, rep)


def finish_resume(loader: KVLoader) -> None:
    """After the first forward that used a resumed cache: drop hooks and DRAM pins."""
    remove = getattr(loader, "_remove_hooks", None)
    if remove is not None:
        remove()
        loader._remove_hooks = None  # type: ignore[attr-defined]
    loader.wait_all()
    loader.buffers = []  # the cache holds them: when it goes, they go


__all__ = ["KVLayout", "KVLoader", "KVSaver", "LoadReport", "ResumeResult", "SaveReport",
           "build_cache", "cache_layer", "decoder_layers", "dram_tensor", "finish_resume",
           "register_arena", "register_dram", "resume", "unregister_arena"]
