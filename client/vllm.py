"""kvtier's KV connector for vLLM (extra `vllm`): a vLLM server resumes from kvtier.

Load it out of tree:

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvtierConnector",
        "kv_connector_module_path": "kvtier.client.vllm", "kv_role": "kv_both",
        "kv_connector_extra_config": {"socket": "/run/kvtier/kvtier.sock",
                                      "tenant": "team-a", "token_file": "/etc/kvtier/a.token"}}'

docs/VLLM.md lists every key of `kv_connector_extra_config`.

**Scheduler side** (vLLM's scheduler process).  When a request arrives its prompt is cut
into chained chunk keys (kvtier.client.keys; vLLM's `cache_salt` and a LoRA adapter salt
the chain, image hashes enter the chunks that hold their placeholders), one LOOKUP finds
the stored prefix and a PREFETCH hint goes out for it at once, so chunks on media are on
their way to DRAM while the request waits for a slot.  `get_num_new_matched_tokens`
offers the stored prefix beyond vLLM's own prefix cache (never the last prompt token:
vLLM must compute at least one) as an *asynchronous* load: the request waits in
WAITING_FOR_REMOTE_KVS while the GPU serves the others.  Each step's metadata names, per
request, the chunks to load (keys, destination block ids) and the chunks that became
full this step (keys, source block ids) to save.  A request with saves in flight keeps
its blocks after it finishes until the worker says they are saved.

**Worker side** (each vLLM worker).  `register_kv_caches` reads every layer's tensor,
shape and strides (kvtier.client.paged; nothing is assumed about vLLM's layout).  One
I/O thread runs the loads (first) and the saves through kvtier.client.gpu's pipeline:
DRAM hits are MAPped and copied from the tenant's read-only DRAM mapping, misses go
through the arena, each chunk-group is one contiguous copy into a bounded staging buffer
on the device and one scatter by block id into the paged cache; a save gathers a chunk
by block id into a staging buffer, copies it to an arena slot and PUTs it while the next
is gathered.  A load that fails (a chunk missing, failing its CRC or its tag, kvtierd
gone) reports its blocks in `get_block_ids_with_load_errors`, and vLLM recomputes them.

Why saves run after the step and not in `save_kv_layer`: a chunked-prefill step of 8k
tokens holds 32 chunks (470 MB for a 7B model); gathering them layer by layer during the
forward needs an arena slot for every chunk of the step at once, and one kernel per
layer.  After the step, one gather per chunk covers all layers, staging stays at a few
chunks, and the copies and PUTs overlap the next steps' forwards instead of this one's.

**Failures never fail a request.**  kvtierd absent, restarting or over quota: lookups
report no hit, saves are dropped, the connector logs once and reconnects with backoff.
It also sets vLLM's `kv_load_failure_policy` to "recompute" (kvtier is a cache: a lost
chunk means recomputing it) unless `on_load_error = "vllm"` keeps vLLM's own setting.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvtier.client.client import Client
from kvtier.client.errors import DisconnectedError, HandshakeError, KvtierError
from kvtier.client.gpu import KVLayout, KVLoader, KVSaver
from kvtier.client.keys import DEFAULT_CHUNK_TOKENS, ChunkChain
from kvtier.client.paged import PagedDestination, PagedKV, PagedSource
from kvtier.client.protocol import Tier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvtier.vllm")
if not log.handlers:  # vLLM's own loggers do not propagate to ours
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvtier.vllm] %(message)s"))
    log.addHandler(_h)
    log.setLevel(os.environ.get("KVTIER_LOG_LEVEL", "INFO"))

TESTED_VLLM = ("0.32.0",)
ARENA_MAX = 1 << 30  # kvtierd's limit on one client's arena


# -- configuration ------------------------------------------------------------------------------


def _size(v: Any, key: str) -> int:
    if isinstance(v, int):
        return v
    s = str(v).strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(s)
    except ValueError:
        raise ValueError(f"kvtier connector: {key} = {v!r} is not a size (e.g. 256M)") from None


@dataclass
class ConnectorConfig:
    """`kv_connector_extra_config`, checked (docs/VLLM.md)."""

    socket: str = "/run/kvtier/kvtier.sock"
    tenant: str = "default"
    token: str | None = None
    token_file: str | None = None
    model_id: str | None = None  # what the chunk keys' fingerprint names the model by
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    session: str = "vllm"  # the kvtier session saves go to (per request: kv_transfer_params)
    ttl_s: int = 0
    load: bool = True
    save: bool = True
    prefetch: bool = True
    prefetch_deadline_ms: int = 2000
    arena_size: int = 0  # 0: sized from the model's chunk size
    inflight: int = 8  # GETs in flight per load
    load_batch: int = 16  # chunk-groups per staging buffer on the device
    save_slots: int = 4  # PUTs in flight
    keyring: str | None = None  # a local keyring file (kvtier.client.crypto.Keyring)
    pkcs11_module: str | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin: str | None = None
    pkcs11_pin_file: str | None = None
    decrypt: str = "auto"  # where sealed chunks are opened (kvtier.client.gpu.KVLoader)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0
    timeout_s: float = 30.0
    on_load_error: str = "recompute"

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"kvtier connector: unknown kv_connector_extra_config key(s) "
                             f"{unknown}; known: {sorted(known)}")
        cfg = cls()
        for k, v in extra.items():
            default = getattr(cfg, k)
            if k == "arena_size":
                v = _size(v, k)
            elif isinstance(default, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"kvtier connector: {k} must be true or false, got {v!r}")
            elif isinstance(default, int):
                try:
                    v = int(v)
                except (TypeError, ValueError):
                    raise ValueError(f"kvtier connector: {k} must be an integer, "
                                     f"got {v!r}") from None
            elif isinstance(default, float):
                v = float(v)
            setattr(cfg, k, v)
        if cfg.chunk_tokens <= 0:
            raise ValueError("kvtier connector: chunk_tokens must be positive")
        if cfg.on_load_error not in ("recompute", "vllm"):
            raise ValueError('kvtier connector: on_load_error must be "recompute" or "vllm"')
        if cfg.decrypt not in ("auto", "gpu", "cpu"):
            raise ValueError('kvtier connector: decrypt must be "auto", "gpu" or "cpu"')
        for k in ("inflight", "load_batch", "save_slots"):
            if getattr(cfg, k) < 1:
                raise ValueError(f"kvtier connector: {k} must be at least 1")
        if cfg.token is None and cfg.token_file is None and "KVTIER_TOKEN" not in os.environ:
            raise ValueError("kvtier connector: set token_file (or token, or KVTIER_TOKEN)")
        return cfg

    def read_token(self) -> str:
        if self.token is not None:
            return self.token
        if self.token_file is not None:
            try:
                with open(self.token_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise KvtierError(f"kvtier connector: token_file {self.token_file}: "
                                  f"{e.strerror}") from e
        return os.environ["KVTIER_TOKEN"]


def layout_of(vllm_config: VllmConfig, chunk_tokens: int) -> KVLayout:
    """The KV layout one worker holds (its tensor-parallel share of the heads)."""
    mc, pc = vllm_config.model_config, vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", None):
        raise ValueError(f"kvtier connector: kv_cache_dtype {cache_dtype!r} is not supported "
                         '(only "auto": the model\'s dtype)')
    return KVLayout(mc.get_num_layers(pc), mc.get_num_kv_heads(pc), mc.get_head_size(),
                    mc.dtype, chunk_tokens)


def fingerprints(vllm_config: VllmConfig, cfg: ConnectorConfig, layout: KVLayout
                 ) -> list[bytes]:
    """The chunk-key fingerprint of each tensor-parallel rank (each stores its heads)."""
    name = cfg.model_id or vllm_config.model_config.model
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp == 1:
        return [layout.fingerprint(name)]
    from kvtier.client.keys import model_fingerprint

    return [model_fingerprint(name, dtype=str(layout.dtype), num_layers=layout.num_layers,
                              num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                              extra=f"tp{r}/{tp}") for r in range(tp)]


def request_salt(request: Any) -> bytes:
    """What separates requests whose tokens match but whose KV differs."""
    parts = []
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(b"cache_salt=" + str(salt).encode())
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(b"lora=" + str(getattr(lora, "lora_name", "")).encode() + b"@" +
                     str(getattr(lora, "lora_path", "")).encode())
    return b"\0".join(parts)


def request_extras(request: Any, chunk_tokens: int) -> dict[int, bytes]:
    """Chunk index -> the identifiers of the multimodal inputs placed in that chunk."""
    out: dict[int, list[bytes]] = collections.defaultdict(list)
    for f in getattr(request, "mm_features", None) or []:
        pos = f.mm_position
        first = pos.offset // chunk_tokens
        last = (pos.offset + max(pos.length, 1) - 1) // chunk_tokens
        for c in range(first, last + 1):
            out[c].append(str(f.identifier).encode())
    return {c: b"|".join(v) for c, v in out.items()}


# -- the connection: reconnects with backoff, logs once per outage ------------------------------


class Link:
    """A Client that comes back: `get()` returns it, or None while kvtierd is unreachable
    (retried after a backoff that doubles up to reconnect_max_s)."""

    def __init__(self, cfg: ConnectorConfig, arena_size: int, what: str,
                 on_connect: Callable[[Client], None] | None = None) -> None:
        self.cfg, self.arena_size, self.what = cfg, arena_size, what
        self.on_connect = on_connect
        self._client: Client | None = None
        self._lock = threading.Lock()
        self._next_try = 0.0
        self._backoff = cfg.reconnect_min_s
        self._down_logged = False
        self.generation = 0  # bumped at every (re)connect

    def get(self) -> Client | None:
        with self._lock:
            if self._client is not None:
                return self._client
            now = time.monotonic()
            if now < self._next_try:
                return None
            try:
                c = Client.connect(self.cfg.socket, self.cfg.tenant, self.cfg.read_token(),
                                   arena_size=self.arena_size, timeout=self.cfg.timeout_s)
                if self.on_connect is not None:
                    try:
                        self.on_connect(c)
                    except BaseException:
                        c.close()
                        raise
            except (KvtierError, OSError) as e:
                self._next_try = now + self._backoff
                self._backoff = min(self._backoff * 2, self.cfg.reconnect_max_s)
                if not self._down_logged:
                    level = logging.ERROR if isinstance(e, HandshakeError) else logging.WARNING
                    log.log(level, "%s: kvtierd at %s unavailable (%s); vLLM recomputes "
                            "until it is back (retrying every <= %.0f s)", self.what,
                            self.cfg.socket, e, self.cfg.reconnect_max_s)
                    self._down_logged = True
                return None
            if self._down_logged:
                log.warning("%s: reconnected to kvtierd at %s", self.what, self.cfg.socket)
            self._down_logged = False
            self._backoff = self.cfg.reconnect_min_s
            self._client = c
            self.generation += 1
            return c

    def failed(self, client: Client, err: BaseException) -> None:
        """An operation on `client` failed: drop it if the connection is what failed."""
        if not isinstance(err, (DisconnectedError, OSError)):
            return
        with self._lock:
            if self._client is not client:
                return
            self._client = None
            self._next_try = time.monotonic() + self._backoff
            if not self._down_logged:
                log.warning("%s: lost kvtierd (%s); vLLM recomputes until it is back",
                            self.what, err)
                self._down_logged = True
        try:
            client.close()
        except Exception:
            pass

    def close(self) -> None:
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()


# -- metadata (scheduler -> worker) -------------------------------------------------------------


@dataclass
class ChunkJob:
    req_id: str
    session: str
    keys: list[bytes]
    blocks: list[list[int]]  # per chunk, its block ids (-1: leave that block alone)


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    loads: list[ChunkJob] = field(default_factory=list)
    saves: list[ChunkJob] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)


# -- scheduler side -----------------------------------------------------------------------------


@dataclass
class _ReqState:
    request: Any
    chains: list[ChunkChain]
    session: str
    hit: int = 0  # chunks stored at the lookup
    looked_up: bool = False
    local: int = 0  # tokens vLLM had in its own cache at the last match
    blocks: list[int] = field(default_factory=list)
    saved: int = 0  # chunks stored or queued for saving
    has_saves: bool = False
    extras: dict[int, bytes] = field(default_factory=dict)
    load: bool = True  # kv_transfer_params {"kvtier_load": false} opts a request out
    load_blocks: set[int] = field(default_factory=set)  # blocks its last load fills
    load_failed: bool = False  # a load failed: vLLM recomputes, kvtier offers no more


class Scheduler:
    def __init__(self, vllm_config: VllmConfig, cfg: ConnectorConfig) -> None:
        self.cfg = cfg
        self.block_size = vllm_config.cache_config.block_size
        if cfg.chunk_tokens % self.block_size:
            raise ValueError(f"kvtier connector: chunk_tokens ({cfg.chunk_tokens}) must be a "
                             f"multiple of vLLM's block size ({self.block_size})")
        self.layout = layout_of(vllm_config, cfg.chunk_tokens)
        self.fps = fingerprints(vllm_config, cfg, self.layout)
        self.link = Link(cfg, 4 << 20, "kvtier scheduler")
        self.reqs: dict[str, _ReqState] = {}
        self.loads: list[ChunkJob] = []

    def _state(self, request: Any) -> _ReqState:
        st = self.reqs.get(request.request_id)
        if st is None:
            salt = request_salt(request)
            chains = [ChunkChain(fp, chunk_tokens=self.cfg.chunk_tokens, salt=salt)
                      for fp in self.fps]
            params = getattr(request, "kv_transfer_params", None) or {}
            session = str(params.get("kvtier_session") or self.cfg.session)
            st = _ReqState(request, chains, session,
                           extras=request_extras(request, self.cfg.chunk_tokens),
                           load=bool(params.get("kvtier_load", True)))
            for ch in chains:
                ch.extend(request.prompt_token_ids or [], st.extras)
            self.reqs[request.request_id] = st
        return st

    def _lookup(self, st: _ReqState) -> None:
        """One LOOKUP per rank's chain (the usable prefix is the shortest), then a PREFETCH
        hint for what is not in DRAM.  Once per request: repeated matches reuse it."""
        if st.looked_up or not self.cfg.load or not st.load:
            return
        c = self.link.get()
        if c is None or not st.chains[0].keys:
            st.looked_up = c is not None
            return
        try:
            hit: int | None = None
            cold: list[bytes] = []
            for ch in st.chains:
                n, tiers = c.lookup(ch.keys, session=st.session)
                hit = n if hit is None else min(hit, n)
                cold += [k for k, t in zip(ch.keys[:n], tiers[:n], strict=True)
                         if t != Tier.DRAM]
            st.hit = hit or 0
            st.saved = st.hit
            st.looked_up = True
            if cold and self.cfg.prefetch:
                c.prefetch_submit(cold, deadline_ms=self.cfg.prefetch_deadline_ms)
        except KvtierError as e:
            self.link.failed(c, e)
            log.debug("lookup failed: %s", e)

    def on_new_request(self, request: Any) -> None:
        self._lookup(self._state(request))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        st = self._state(request)
        self._lookup(st)
        st.local = num_computed_tokens
        if st.load_failed:
            return 0, False
        prompt = len(request.prompt_token_ids or [])
        usable = min(st.hit * self.cfg.chunk_tokens,
                     (prompt - 1) // self.block_size * self.block_size)
        ext = usable - num_computed_tokens
        if ext <= 0:
            return 0, False
        return ext, True

    def update_state_after_alloc(self, request: Any, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        st = self._state(request)
        if num_external_tokens <= 0:
            return
        ids = list(blocks.get_block_ids()[0])
        T, bs = self.cfg.chunk_tokens, self.block_size
        k = T // bs
        lo, hi = st.local, st.local + num_external_tokens
        first, last = lo // T, (hi + T - 1) // T
        rows = []
        for c in range(first, last):
            row = []
            for i in range(k):
                b = c * k + i
                tok = b * bs
                row.append(ids[b] if lo <= tok and tok + bs <= hi and b < len(ids) else -1)
            rows.append(row)
        st.load_blocks = {b for row in rows for b in row if b >= 0}
        self.loads.append(ChunkJob(request.request_id, st.session,
                                   st.chains[0].keys[first:last], rows))

    def update_connector_output(self, out: Any) -> None:
        """Loads that failed (their blocks come back invalid): vLLM recomputes those
        requests, and kvtier does not offer them the same load again."""
        bad = set(getattr(out, "invalid_block_ids", None) or ())
        if not bad:
            return
        for st in self.reqs.values():
            if st.load_blocks & bad:
                st.load_failed = True
                st.load_blocks = set()

    def build_connector_meta(self, so: SchedulerOutput) -> KvtierMetadata:
        meta = KvtierMetadata(loads=self.loads, preempted=sorted(so.preempted_req_ids or ()))
        self.loads = []
        for r in so.scheduled_new_reqs:
            st = self.reqs.get(r.req_id)
            if st is not None:
                st.blocks = list(r.block_ids[0])
                self._queue_saves(st, r.num_computed_tokens + so.num_scheduled_tokens[r.req_id],
                                  meta)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self.reqs.get(rid)
            if st is None:
                continue
            new = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.blocks = list(new[0]) if new is not None else []
            elif new is not None:
                st.blocks += new[0]
            self._queue_saves(st, cached.num_computed_tokens[i] + so.num_scheduled_tokens[rid],
                              meta)
        return meta

    def _queue_saves(self, st: _ReqState, computed: int, meta: KvtierMetadata) -> None:
        """The chunks that are full once this step ran, not stored yet, to be saved."""
        if not self.cfg.save:
            return
        tokens = st.request.all_token_ids
        T, k = self.cfg.chunk_tokens, self.cfg.chunk_tokens // self.block_size
        full = min(computed, len(tokens)) // T
        full = min(full, len(st.blocks) // k)
        if full <= st.saved:
            return
        keys = st.chains[0].extend(tokens, st.extras)  # each rank's chain grows alike
        for ch in st.chains[1:]:
            ch.extend(tokens, st.extras)
        rows = [st.blocks[c * k:(c + 1) * k] for c in range(st.saved, full)]
        meta.saves.append(ChunkJob(st.request.request_id, st.session,
                                   keys[st.saved:full], rows))
        st.saved = full
        st.has_saves = True

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, None]:
        st = self.reqs.pop(request.request_id, None)
        # Blocks with saves in flight stay allocated until the worker reports them done.
        return (st is not None and st.has_saves), None

    def close(self) -> None:
        self.link.close()


# -- worker side --------------------------------------------------------------------------------


def _keyring(cfg: ConnectorConfig) -> Any:
    if cfg.pkcs11_module:
        from kvtier.client.hsm import Pkcs11Keyring

        pin = cfg.pkcs11_pin
        if pin is None and cfg.pkcs11_pin_file:
            with open(cfg.pkcs11_pin_file) as f:
                pin = f.read().strip()
        if not cfg.pkcs11_token_label or pin is None:
            raise KvtierError("kvtier connector: pkcs11_module needs pkcs11_token_label and "
                              "pkcs11_pin or pkcs11_pin_file")
        return Pkcs11Keyring(cfg.pkcs11_module, cfg.pkcs11_token_label, pin)
    if cfg.keyring:
        from kvtier.client.crypto import Keyring

        return Keyring(cfg.keyring)
    return None


def _tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, RuntimeError):  # no model-parallel group
        return 0


@dataclass
class _Job:
    kind: str  # "load" | "save"
    spec: ChunkJob
    ready: Any = None  # CUDA event after the forward that wrote a save's blocks


class Worker:
    def __init__(self, vllm_config: VllmConfig, cfg: ConnectorConfig) -> None:
        self.cfg = cfg
        self.layout = layout_of(vllm_config, cfg.chunk_tokens)
        self.fp = fingerprints(vllm_config, cfg, self.layout)[_tp_rank()]
        lay = self.layout
        # The loader's GET slots, the saver's plain and sealed slots, and room for the
        # small requests (lookups, key lists) beside them.
        need = (cfg.inflight + 2 * cfg.save_slots) * (lay.chunk_bytes + lay.num_layers * 64)
        arena = cfg.arena_size or max(16 << 20, -(-(need + (4 << 20)) // 4096) * 4096)
        if arena % 4096 or arena > ARENA_MAX:
            raise ValueError(f"kvtier connector: arena_size {arena} must be a multiple of 4 KiB "
                             f"and at most {ARENA_MAX >> 30} GiB (chunks of "
                             f"{lay.chunk_bytes >> 20} MiB x (inflight + 2 x save_slots) need "
                             f"{need >> 20} MiB: lower inflight, save_slots or chunk_tokens)")
        self.paged: PagedKV | None = None
        self._keyring: Any = None
        self._tools: tuple[int, KVLoader, KVSaver] | None = None
        self.link = Link(cfg, arena, "kvtier worker")
        self._cv = threading.Condition()
        self._saves_queue: collections.deque[_Job] = collections.deque()
        self._loads_queue: collections.deque[_Job] = collections.deque()
        self._saves_pending: collections.Counter[str] = collections.Counter()
        self._had_saves: set[str] = set()  # requests with saves queued (held by vLLM)
        self._finished_reqs: set[str] = set()  # finished in the scheduler, saves may run
        self._done_recving: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._staging: list[torch.Tensor] = []

    # vLLM calls ----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.paged = PagedKV.from_vllm(kv_caches, self.layout)
        g = self.paged.geometry
        log.info("kvtier worker: %d layers of %d blocks x %d tokens x %d heads x %d (%s, "
                 "strides %s, %s), chunks of %d tokens", self.layout.num_layers, g.num_blocks,
                 g.block_size, g.num_kv_heads, g.head_dim, g.dtype,
                 tuple(self.paged.layers[0].stride()),
                 "one allocation" if self.paged.stacked is not None else "per layer",
                 self.layout.chunk_tokens)
        self._thread = threading.Thread(target=self._run, name="kvtier-io", daemon=True)
        self._thread.start()

    def start_load(self, meta: KvtierMetadata) -> None:
        if not meta.loads:
            return
        with self._cv:
            for spec in meta.loads:
                self._loads_queue.append(_Job("load", spec))
            self._cv.notify()

    def queue_saves(self, meta: KvtierMetadata) -> None:
        if not meta.saves:
            return
        ready = None
        if self.paged is not None and self.paged.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.paged.device))
        with self._cv:
            for spec in meta.saves:
                self._saves_queue.append(_Job("save", spec, ready))
                self._saves_pending[spec.req_id] += 1
                self._had_saves.add(spec.req_id)
            self._cv.notify()

    def handle_preemptions(self, meta: KvtierMetadata) -> None:
        """A preempted request's blocks are about to be reused: its saves must have read
        them first."""
        if not meta.preempted:
            return
        wanted = set(meta.preempted)
        with self._cv:
            self._cv.wait_for(lambda: self._stop or not any(
                self._saves_pending[r] for r in wanted))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests whose saves are all done, requests whose loads are done).  Only a
        request that had saves was held back by `request_finished`, so only those are
        reported as sent."""
        with self._cv:
            self._finished_reqs |= finished_req_ids & self._had_saves
            sent = {r for r in self._finished_reqs if not self._saves_pending[r]}
            self._finished_reqs -= sent
            self._had_saves -= sent
            for r in sent:
                self._saves_pending.pop(r, None)
            recv, self._done_recving = self._done_recving, set()
        return sent, recv

    def take_failed_blocks(self) -> set[int]:
        with self._cv:
            out, self._failed_blocks = self._failed_blocks, set()
        return out

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._drop_tools()
        self.link.close()

    # the I/O thread ------------------------------------------------------------------------

    def _next(self) -> _Job | None:
        with self._cv:
            self._cv.wait_for(lambda: self._stop or self._saves_queue or self._loads_queue)
            if self._stop:
                return None
            return (self._loads_queue or self._saves_queue).popleft()

    def _run(self) -> None:
        stream = None
        if self.paged is not None and self.paged.device.type == "cuda":
            torch.cuda.set_device(self.paged.device)
            stream = torch.cuda.Stream(device=self.paged.device)
        self._prepare()
        while True:
            job = self._next()
            if job is None:
                return
            try:
                if stream is not None:
                    with torch.cuda.stream(stream):
                        self._do(job, stream)
                else:
                    self._do(job, None)
            finally:
                with self._cv:
                    if job.kind == "save":
                        self._saves_pending[job.spec.req_id] -= 1
                    else:
                        self._done_recving.add(job.spec.req_id)
                    self._cv.notify_all()

    def _tools_for(self, c: Client) -> tuple[KVLoader, KVSaver]:
        if self._tools is not None and self._tools[0] == self.link.generation:
            return self._tools[1], self._tools[2]
        self._drop_tools()
        cipher = None
        if c.encryption == "on":
            if self._keyring is None:
                self._keyring = _keyring(self.cfg)
            if self._keyring is None:
                raise KvtierError(f"tenant {self.cfg.tenant!r} must encrypt: set keyring or "
                                  "pkcs11_* in kv_connector_extra_config")
            from kvtier.client.crypto import FrameCipher

            cipher = FrameCipher(c, self._keyring, self.cfg.tenant)
        loader = KVLoader(c, self.layout, self.fp, layer_groups=1, inflight=self.cfg.inflight,
                          cipher=cipher, decrypt=self.cfg.decrypt)
        saver = KVSaver(c, self.layout, self.fp, slots=self.cfg.save_slots, cipher=cipher)
        self._tools = (self.link.generation, loader, saver)
        if self.paged is not None:  # kernels compiled now, not by a request's load
            took = loader.prepare(self.paged.device)
            if took:
                log.info("kvtier worker: the GPU opener is ready on %s (%.2f s)",
                         self.paged.device, took)
        return loader, saver

    def _prepare(self) -> None:
        """Make the loader and saver before the first request, where the daemon answers
        (otherwise the first job does, as after every reconnection)."""
        c = self.link.get()
        if c is None:
            return
        try:
            self._tools_for(c)
        except Exception as e:
            self.link.failed(c, e)
            self._drop_tools()
            log.warning("kvtier worker: setting up the loader failed (%s: %s); the first "
                        "request retries", type(e).__name__, e)

    def _drop_tools(self) -> None:
        if self._tools is not None:
            _, loader, saver = self._tools
            self._tools = None
            for t in (loader, saver):
                try:
                    t.close()
                except Exception:
                    pass

    def _do(self, job: _Job, stream: Any) -> None:
        spec = job.spec
        assert self.paged is not None
        c = self.link.get()
        if c is None:
            if job.kind == "load":
                self._load_failed(spec, "kvtierd unavailable")
            return  # a save is dropped: a later miss, never a wrong answer
        try:
            loader, saver = self._tools_for(c)
            if job.kind == "load":
                t0 = time.perf_counter()
                loader.session = spec.session
                dest = PagedDestination(self.paged, spec.blocks, batch=self.cfg.load_batch,
                                        staging=self._staging)
                rep = loader.load_into(spec.keys, dest)
                loader.synchronize()
                log.debug("loaded %d chunks (%d MB) for %s in %.3f s", rep.chunks,
                          rep.bytes >> 20, spec.req_id, time.perf_counter() - t0)
            else:
                if job.ready is not None:
                    torch.cuda.current_stream().wait_event(job.ready)
                have, _ = c.lookup(spec.keys)  # another request may have stored them
                src = PagedSource(self.paged, spec.blocks[have:])
                saver.save_chunks(spec.session, spec.keys[have:], src, ttl_s=self.cfg.ttl_s)
        except Exception as e:
            self.link.failed(c, e)
            if isinstance(e, (DisconnectedError, OSError)):
                self._drop_tools()
            if job.kind == "load":
                self._load_failed(spec, f"{type(e).__name__}: {e}")
            else:
                log.warning("kvtier: saving %d chunks of %s failed: %s", len(spec.keys),
                            spec.req_id, e)

    def _load_failed(self, spec: ChunkJob, why: str) -> None:
        blocks = {b for row in spec.blocks for b in row if b >= 0}
        log.warning("kvtier: load of %d chunks for %s failed (%s); vLLM recomputes them",
                    len(spec.keys), spec.req_id, why)
        with self._cv:
            self._failed_blocks |= blocks


# -- the connector vLLM loads -------------------------------------------------------------------


class KvtierConnector(KVConnectorBase_V1):
    """vLLM's `KVConnectorBase_V1`, backed by kvtierd (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.cfg = ConnectorConfig.from_extra(self._kv_transfer_config.kv_connector_extra_config)
        groups = len(getattr(kv_cache_config, "kv_cache_groups", None) or [None])
        if groups != 1:
            raise ValueError(f"kvtier connector: this model has {groups} KV cache groups "
                             "(hybrid attention); only models with one are supported")
        self.scheduler: Scheduler | None = None
        self.worker: Worker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = Scheduler(vllm_config, self.cfg)
            if self.cfg.on_load_error == "recompute":
                # Read by vLLM's scheduler right after it made this connector.
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
            try:
                import vllm

                if vllm.__version__ not in TESTED_VLLM:
                    log.warning("kvtier connector: tested with vLLM %s, running on %s",
                                ", ".join(TESTED_VLLM), vllm.__version__)
            except ImportError:  # pragma: no cover - vLLM imported us
                pass
        else:
            self.worker = Worker(vllm_config, self.cfg)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a later miss, never wrong output

    # worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self.worker is not None and isinstance(kv_connector_metadata, KvtierMetadata):
            self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are asynchronous: a request is scheduled only once all its layers are in
        # its blocks, so no forward ever waits on a layer here.
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        # Saved after the step, from the paged blocks (module docstring: why).
        return None

    def wait_for_save(self) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvtierMetadata)
        self.worker.queue_saves(meta)

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        sent, recv = self.worker.get_finished(finished_req_ids)
        return (sent or None), (recv or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_failed_blocks() if self.worker is not None else set()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

    # scheduler side ------------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        if self.scheduler is not None:
            self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)


__all__ = ["ChunkJob", "ConnectorConfig", "KvtierConnector", "KvtierMetadata", "Link",
           "Scheduler", "Worker", "fingerprints", "layout_of", "request_extras",
           "request_salt"]
