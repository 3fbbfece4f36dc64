"""kvtierd configuration: a TOML file, validated at start.

Every error names the file, the key (as a dotted path, e.g. `pool[1].segment_size`) and
the problem.  With no file the embedded default is used: a DRAM tier plus one file pool
under the state dir, and one tenant (`default`) whose token is kept in
`<state_dir>/default.token` (created 0600 on first start).  docs/OPERATIONS.md lists
every key.

Validation is in two steps: `parse_config` checks everything the values alone decide
(what `Pool.format`, the DRAM tiers and the token checks would refuse at start, or accept
and then never use), and `check_runtime` what the filesystem decides (directories that
must exist or be creatable).  `kvtierd check-config` runs both.

A leaf module: it imports neither trio, the NVMe-oF host nor the engine (tests/
test_config_checks.py checks that), so the engine's limits it checks against are
restated below, and a test holds them equal to the engine's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any

from kvtier.daemon.nvmf import psk
from kvtier.daemon.nvmf.target_config import NvmfTargetConfig, default_hostnqn
from kvtier.daemon.sizes import parse_size

# The DRAM policies (kvtier.daemon.policy.POLICIES, which checks it has exactly these).
POLICY_NAMES = ("lru", "reuse")

# The engine's geometry (kvtier.daemon.superblock, kvtier.daemon.pool).
HEADER_ZONE = 1 << 20  # a pool's superblocks; its segments start after it
POOL_BLOCK_SIZE = 4096  # the pool block size: segments and file pools are multiples of it
MIN_SEGMENT = 64 << 10
MAX_SEGMENT = 1 << 30
PUT_RESERVE = 2  # free segments a put leaves beyond a checkpoint's (cleaner, META)
# The fewest segments a pool -- media or DRAM -- needs to take a put at all: the checkpoint
# `Pool.format` writes, room for the next checkpoint (one segment for a pool this small),
# PUT_RESERVE, and one to write into.  `Pool.format` takes 4, but a pool of 4 refuses every
# put (PoolFullError): a media pool stores nothing, a DRAM tier caches nothing.
MIN_POOL_SEGMENTS = 1 + 1 + PUT_RESERVE + 1
MAX_THREADS = 1024  # limits.io_threads, prefetch_threads, hello_threads: 1..MAX_THREADS
SOCKET_PATH_MAX = 107  # bytes of a Unix socket path (sun_path, less its NUL)
# Token hashes: what OpenSSL's scrypt (hashlib) accepts -- 128 * r * (n + 2 + p) bytes of
# memory at most, its default maxmem; n < 2**(16 * r) -- and a bound on the cost of one
# check (n * r * p; `kvtier token hash` makes 2**17): 32 times that, about 1 s a HELLO.
SCRYPT_MAX_MEM = 32 << 20
SCRYPT_MAX_COST = 1 << 22


def min_pool_bytes(segment_size: int) -> int:
    """The smallest media pool of `segment_size` segments that takes puts."""
    return HEADER_ZONE + MIN_POOL_SEGMENTS * segment_size


def min_dram_bytes(segment_size: int) -> int:
    """The smallest DRAM tier (a whole number of segments) that caches anything: the
    header zone, rounded up to whole segments, plus MIN_POOL_SEGMENTS."""
    return (-(-HEADER_ZONE // segment_size) + MIN_POOL_SEGMENTS) * segment_size


class ConfigError(Exception):
    """The configuration is invalid; the message names the key and the problem."""


# The SPDK TCP transport kvtier provisions (`[pool.provision]` max_io_size, io_unit_size).
# SPDK's default is 128 KiB per command, so a 1 MiB pool read or write went out as 8
# commands, each with its own capsule and response (and R2T, for writes); at 1 MiB a
# command, 1 MiB QD8 through kvtier's host ran at 1.82 GB/s for reads and for writes
# instead of 1.21 and 1.09 (docs/OPERATIONS.md).  A command's data is made of up to 16
# io_unit_size buffers (SPDK_NVMF_MAX_SGL_ENTRIES).
MAX_IO_SIZE = 1 << 20
IO_UNIT_SIZE = 128 << 10


@dataclass
class NvmfPoolConfig(NvmfTargetConfig):
    """Where an `nvmf` pool's namespace is, how to talk to it (the host's own settings),
    and how to provision it (see docs/OPERATIONS.md)."""

    provision: dict[str, Any] | None = None  # SPDK JSON-RPC provisioning (daemon/spdk.py)


@dataclass
class PoolConfig:
    name: str
    kind: str  # "file" or "nvmf"
    path: str  # file pools: the file or block device; nvmf pools: ""
    size: int  # file: size to create; nvmf: use at most this much of the namespace (0: all)
    segment_size: int
    direct: str = "auto"
    nvmf: NvmfPoolConfig | None = None
    # When the daemon may format: "if-missing" (create the file when it does not exist;
    # the default), "if-empty" (also a zero-length file or a namespace with no pool on it)
    # or "never" (only open a pool that is already there).
    format: str = "if-missing"


@dataclass
class TenantConfig:
    id: str
    token_hash: str  # "scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>"
    allowed_uids: list[int] | None = None  # None: any uid
    dram_size: int | None = None  # its private DRAM tier; None: an equal share of the rest
    retention_s: float | None = None  # sessions idle longer than this are purged; None: kept
    encryption: str = "on"  # "on": clients must seal frames (kvtier.client.crypto); "off"
    key_scope: str = "tenant"  # data keys per "tenant" or per "session"
    quota: int | None = None  # bytes of media pool space; None: no quota
    bandwidth: int | None = None  # bytes/s of GET + PUT payload; None: unlimited
    iops: int | None = None  # GET + PUT requests per second; None: unlimited
    weight: float = 1.0  # its share of contended I/O threads within a class (fair queueing)
    max_clients: int | None = None  # clients at once; None: limits.max_clients_per_tenant

    def check_token(self, token: str) -> bool:
        return verify_token(token, self.token_hash)


@dataclass
class Limits:
    arena_default: int = 256 << 20
    arena_max: int = 1 << 30
    ring_entries: int = 1024
    max_clients: int = 256
    max_clients_per_tenant: int = 128  # a tenant's own cap ([[tenant]] max_clients overrides)
    max_unauthenticated: int = 64  # connections that have not finished HELLO, at once
    max_unauthenticated_per_uid: int = 8  # ... of them from one uid
    hello_threads: int = 2  # token checks (scrypt) running at once
    auth_failures_before_lockout: int = 8  # a uid's failed HELLOs in a row before it waits
    control_timeout_s: float = 10.0  # for HELLO, and for any half-sent control message
    inflight_per_client: int = 64
    io_threads: int = 8
    prefetch_threads: int = 4  # promotions in flight at once (the `prefetch` I/O class)
    stalled_client_timeout_s: float = 30.0  # drop a client whose completion ring stays full
    sweep_interval_s: float = 10.0  # expiry sweep and retention, this often
    starvation_s: float = 0.05  # a lower I/O class waits at most about this long
    low_class_nice: int = 10  # write and background work run this much nicer (0: off)


@dataclass
class PolicyConfig:
    """The DRAM policy (kvtier.daemon.policy) and what its statistics may hold."""

    name: str = "reuse"  # "reuse" (predicted next use) or "lru"
    horizon_s: float = 60.0  # pre-promote sessions expected back within this
    fill: float = 0.9  # ...while the sessions due first fill this share of DRAM
    tracked_sessions: int = 100_000
    tracked_keys: int = 200_000


@dataclass
class Config:
    state_dir: str
    socket: str
    ack: str = "media"  # "memory": ack once in DRAM; "media": once written to the pool
    dram_size: int = 512 << 20
    dram_segment_size: int = 16 << 20
    dram_populate: bool = True  # fault the DRAM tier in at start (fast first writes)
    pools: list[PoolConfig] = field(default_factory=list)
    tenants: list[TenantConfig] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    admin_uids: list[int] = field(default_factory=lambda: [0])
    metrics_address: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics endpoint
    fuse_mountpoint: str | None = None  # the admin tree (kvtier.fuse); None: not mounted
    fuse_admin_gid: int = 0  # group that may read tenants/ in the admin tree
    source: str = "<embedded default>"

    def dram_shares(self) -> dict[str, int]:
        """Each tenant's private DRAM tier size: its `dram` if set, else an equal share of
        what `[dram] size` has left, in whole segments.  Raises ConfigError, naming the key
        to change, if the explicit sizes exceed `[dram] size` or a tier is too small to
        cache anything (`min_dram_bytes`: the header zone and MIN_POOL_SEGMENTS segments)."""
        seg = self.dram_segment_size
        index = {t.id: i for i, t in enumerate(self.tenants)}
        fixed = {t.id: t.dram_size for t in self.tenants if t.dram_size is not None}
        rest = [t.id for t in self.tenants if t.dram_size is None]
        total = sum(v for v in fixed.values() if v is not None)
        left = self.dram_size - total
        if left < 0:
            raise ConfigError(f"config {self.source}: dram.size: the tenants' dram sizes add "
                              f"up to more than dram.size ({self.dram_size} bytes): {total} "
                              f"bytes")
        shares = {k: v for k, v in fixed.items() if v is not None}
        for tid in rest:
            shares[tid] = left // len(rest) // seg * seg
        for tid, size in shares.items():
            self._check_dram_tier(tid, size, f"tenant[{index[tid]}].dram" if tid in fixed
                                  else None)
        return shares

    def _check_dram_tier(self, tid: str, size: int, key: str | None) -> None:
        """`key`: the tenant's own `dram`; None: its tier is an equal share of dram.size."""
        seg = self.dram_segment_size
        need = min_dram_bytes(seg)
        if size >= need:
            return
        want = f'`dram = "{_size_text(need)}"` or more'
        how = f"set {want}" if key else f"raise dram.size, or give the tenant {want}"
        raise ConfigError(
            f"config {self.source}: {key or 'dram.size'}: tenant {tid!r}: its DRAM tier of "
            f"{size} bytes is smaller than {need} bytes, the least that caches anything "
            f"(the {HEADER_ZONE >> 20} MiB header zone in whole segments, then "
            f"{MIN_POOL_SEGMENTS} segments of dram.segment_size = {seg}; a smaller tier "
            f"sends every PUT to the media pool): {how}")

    def max_clients_of(self, tenant: TenantConfig) -> int:
        """How many clients of `tenant` may be connected at once."""
        if tenant.max_clients is not None:
            return tenant.max_clients
        return self.limits.max_clients_per_tenant

    def tenant(self, tenant_id: str) -> TenantConfig | None:
        for t in self.tenants:
            if t.id == tenant_id:
                return t
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with secrets removed (for status and the FUSE tree)."""
        return {
            "source": self.source, "state_dir": self.state_dir, "socket": self.socket,
            "ack": self.ack, "dram": {"size": self.dram_size,
                                      "segment_size": self.dram_segment_size,
                                      "populate": self.dram_populate},
            "pools": [asdict(p) for p in self.pools],
            "tenants": [{"id": t.id, "allowed_uids": t.allowed_uids, "dram": t.dram_size,
                         "retention_s": t.retention_s, "encryption": t.encryption,
                         "key_scope": t.key_scope, "quota": t.quota,
                         "bandwidth": t.bandwidth, "iops": t.iops, "weight": t.weight,
                         "max_clients": t.max_clients,
                         "token_hash": "<redacted>"}
                        for t in self.tenants],
            "limits": vars(self.limits), "policy": asdict(self.policy),
            "admin_uids": self.admin_uids,
            "metrics": {"address": self.metrics_address, "port": self.metrics_port},
            "fuse": {"mountpoint": self.fuse_mountpoint, "admin_gid": self.fuse_admin_gid},
        }


# -- tokens ------------------------------------------------------------------------------------

_SCRYPT = (2**14, 8, 1)


def hash_token(token: str) -> str:
    """A salted scrypt hash of a tenant token, as stored in the config."""
    n, r, p = _SCRYPT
    salt = secrets.token_bytes(16)
    h = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${salt.hex()}${h.hex()}"


_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


def parse_token_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, hash) of a `scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>` token hash.
    ValueError says what is wrong: a hash this accepts is one a token can match."""
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("must be a scrypt hash, scrypt$<n>$<r>$<p>$<salt hex>$<hash hex>")
    for name, text in zip("nrp", parts[1:4], strict=True):
        if not (text.isascii() and text.isdigit()) or len(text) > 20:
            raise ValueError(f"{name} must be a decimal number, got {text[:24]!r}")
    n, r, p = (int(v) for v in parts[1:4])
    if n < 2 or n & (n - 1):
        raise ValueError(f"n must be a power of two > 1, got {n}")
    if r < 1 or p < 1:
        raise ValueError(f"r and p must be at least 1, got r={r}, p={p}")
    if n >= 1 << min(16 * r, 64):
        raise ValueError(f"n must be below 2**(16*r) = {1 << 16 * r}, got {n}")
    if 128 * r * (n + 2 + p) > SCRYPT_MAX_MEM:
        raise ValueError(f"n={n}, r={r}, p={p} need {128 * r * (n + 2 + p)} bytes of memory "
                         f"(128*r*(n+2+p)); scrypt here allows {SCRYPT_MAX_MEM}")
    if n * r * p > SCRYPT_MAX_COST:
        raise ValueError(f"n*r*p = {n * r * p} makes every HELLO too slow; at most "
                         f"{SCRYPT_MAX_COST} (`kvtier token hash` uses {2**14 * 8})")
    salt, want = parts[4], parts[5]
    if not _HEX.fullmatch(salt):
        raise ValueError(f"salt must be hex digits (at least one byte), got {salt!r}")
    if len(want) != 64 or not _HEX.fullmatch(want):
        raise ValueError(f"hash must be 64 hex digits (32 bytes), got {want!r}")
    return n, r, p, bytes.fromhex(salt), bytes.fromhex(want)


def verify_token(token: str, stored: str) -> bool:
    try:
        n, r, p, salt, want = parse_token_hash(stored)
        h = hashlib.scrypt(token.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    except ValueError:
        return False
    return hmac.compare_digest(h, want)


# -- loading -----------------------------------------------------------------------------------


class _Reader:
    """Typed access to a TOML table that reports errors with the key's dotted path."""

    def __init__(self, source: str, table: dict[str, Any], path: str = "") -> None:
        self.source, self.table, self.path = source, table, path
        self.used: set[str] = set()

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"config {self.source}: {self._name(key)}: {problem}")

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        self.used.add(key)
        if key not in self.table:
            if required:
                raise self.fail(key, "is required")
            return default
        v = self.table[key]
        if (kind is int and isinstance(v, bool)) or not isinstance(v, kind):
            raise self.fail(key, f"must be {kind.__name__}, got {type(v).__name__} {v!r}")
        return v

    def size(self, key: str, default: int | None = None, required: bool = False) -> int:
        self.used.add(key)
        if key not in self.table:
            if required or default is None:
                raise self.fail(key, "is required")
            return default
        v = self.table[key]
        try:
            n = parse_size(v) if isinstance(v, str | int) and not isinstance(v, bool) else None
        except ValueError as e:
            raise self.fail(key, str(e)) from None
        if n is None:
            raise self.fail(key, f"must be a size like 64M, got {v!r}")
        return n

    def sub(self, key: str, value: Any, index: int | None = None) -> _Reader:
        name = f"{key}[{index}]" if index is not None else key
        if not isinstance(value, dict):
            raise self.fail(name, "must be a table")
        return _Reader(self.source, value, self._name(name))

    def check_unknown(self) -> None:
        extra = sorted(set(self.table) - self.used)
        if extra:
            raise self.fail(extra[0], "unknown key (typo?)")


def default_state_dir() -> str:
    env = os.environ.get("KVTIER_STATE_DIR")
    if env:
        return env
    return "/var/lib/kvtier" if os.geteuid() == 0 else os.path.join(os.getcwd(), ".state")


def default_config(state_dir: str | None = None) -> Config:
    state = state_dir or default_state_dir()
    return Config(
        state_dir=state, socket=os.path.join(state, "kvtier.sock"),
        pools=[PoolConfig("pool0", "file", os.path.join(state, "pool0.img"), 1 << 30, 64 << 20)],
        tenants=[], source="<embedded default>")


def ensure_default_tenant(cfg: Config) -> str:
    """The embedded default's tenant `default`: its token lives in a 0600 file."""
    path = os.path.join(cfg.state_dir, "default.token")
    if not os.path.exists(path):
        os.makedirs(cfg.state_dir, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    with open(path) as f:
        token = f.read().strip()
    if cfg.tenant("default") is None:
        cfg.tenants.append(TenantConfig("default", hash_token(token), None))
    return token


def check_runtime(cfg: Config) -> None:
    """What the filesystem decides about `cfg`, checked as the user calling it (run
    `kvtierd check-config` as kvtierd's user): ConfigError naming the key.

    * `state_dir` and the directory of `socket`: existing directories this user may
      create files in, or creatable (their nearest existing ancestor is); an existing
      `socket` must be a socket (kvtierd removes a stale one at start) and an existing
      `<state_dir>/audit.log` writable.
    * file pools: the directory of `path` must exist (kvtierd does not create it), unless
      it is `state_dir` (created at start, before the pool is opened); a missing `path`
      needs a writable directory, `size`, and a `format` other than "never"; an existing
      one must be a regular file or block device, readable and writable.
    """
    _check_socket_path(cfg)

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"config {cfg.source}: {key}: {problem}")

    def creatable_dir(key: str, path: str) -> None:
        probe = os.path.abspath(path)
        while not os.path.lexists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise fail(key, f"{probe} (on the way to {path}) is not a directory")
        if os.access(probe, os.W_OK | os.X_OK):
            return
        if probe == os.path.abspath(path):
            raise fail(key, f"directory {path} is not writable by uid {os.geteuid()}")
        raise fail(key, f"directory {path} does not exist, and {probe}, where it would be "
                        f"created, is not writable by uid {os.geteuid()}")

    creatable_dir("state_dir", cfg.state_dir)
    audit = os.path.join(cfg.state_dir, "audit.log")
    if os.path.exists(audit) and not os.access(audit, os.R_OK | os.W_OK):
        raise fail("state_dir", f"{audit} is not readable and writable by uid {os.geteuid()}")
    creatable_dir("socket", os.path.dirname(os.path.abspath(cfg.socket)))
    try:
        st = os.lstat(cfg.socket)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise fail("socket", f"{cfg.socket} exists and is not a socket (kvtierd would "
                                 f"remove it to listen there)")
    for i, p in enumerate(cfg.pools):
        if p.kind != "file":
            continue
        key = f"pool[{i}]"
        parent = os.path.dirname(os.path.abspath(p.path))
        in_state = parent == os.path.abspath(cfg.state_dir)  # checked above
        if not in_state and not os.path.isdir(parent):
            raise fail(f"{key}.path", f"directory {parent} (of {p.path}) does not exist; "
                                      f"kvtierd does not create it: create it, or fix the "
                                      f"path")
        if not os.path.lexists(p.path):
            if p.format == "never":
                raise fail(f"{key}.format", f'{p.path} does not exist and format = "never" '
                                            f"(kvtierd only opens a pool that is there)")
            if not p.size:
                raise fail(f"{key}.size", f"{p.path} does not exist and no size is "
                                          f"configured to create it")
            if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
                raise fail(f"{key}.path", f"{p.path} does not exist and its directory "
                                          f"{parent} is not writable by uid {os.geteuid()}")
            continue
        try:
            mode = os.stat(p.path).st_mode
        except OSError as e:
            raise fail(f"{key}.path", f"{p.path}: {e.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise fail(f"{key}.path", f"{p.path} is not a regular file or block device")
        if not os.access(p.path, os.R_OK | os.W_OK):
            raise fail(f"{key}.path", f"{p.path} is not readable and writable by uid "
                                      f"{os.geteuid()}")


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path}: not valid TOML: {e}") from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], source: str) -> Config:
    r = _Reader(source, data)
    state = r.get("state_dir", str, default_state_dir())
    cfg = Config(state_dir=state, socket=r.get("socket", str, os.path.join(state, "kvtier.sock")),
                 source=source)
    cfg.ack = r.get("ack", str, "media")
    if cfg.ack not in ("memory", "media"):
        raise r.fail("ack", f'must be "memory" or "media", got {cfg.ack!r}')
    cfg.admin_uids = _uids(r, "admin_uids", [0]) or []
    if "dram" in data:
        d = r.sub("dram", data["dram"])
        cfg.dram_size = d.size("size", cfg.dram_size)
        cfg.dram_segment_size = _segment_size(d, "segment_size", cfg.dram_segment_size)
        cfg.dram_populate = d.get("populate", bool, True)
        d.check_unknown()
        r.used.add("dram")
    if cfg.dram_size < 8 * cfg.dram_segment_size:
        raise r.fail("dram.size", f"must hold at least 8 segments of {cfg.dram_segment_size} "
                                  f"bytes, got {cfg.dram_size}")
    pools = r.get("pool", list, [])
    names = set()
    for i, p in enumerate(pools):
        pr = r.sub("pool", p, i)
        name = pr.get("name", str, f"pool{i}")
        if name in names:
            raise pr.fail("name", f"duplicate pool name {name!r}")
        names.add(name)
        kind = pr.get("kind", str, "file")
        if kind not in ("file", "nvmf"):
            raise pr.fail("kind", f'unknown pool kind {kind!r} (supported: "file", "nvmf")')
        size, seg = pr.size("size", 0), _segment_size(pr, "segment_size", 64 << 20)
        if size:
            _check_pool_size(pr, kind, size, seg)
        if kind == "nvmf":
            cfg.pools.append(PoolConfig(name, kind, "", size, seg, nvmf=_nvmf_pool(pr),
                                        format=_format_mode(pr)))
            pr.check_unknown()
            continue
        ppath = pr.get("path", str, required=True)
        if not os.path.isabs(ppath):
            ppath = os.path.join(state, ppath)
        direct = pr.get("direct", str, "auto")
        if direct not in ("auto", "on", "off"):
            raise pr.fail("direct", f'must be "auto", "on" or "off", got {direct!r}')
        cfg.pools.append(PoolConfig(name, kind, ppath, size, seg, direct,
                                    format=_format_mode(pr)))
        pr.check_unknown()
    if not cfg.pools:
        cfg.pools = default_config(state).pools
    tenants = r.get("tenant", list, [])
    for i, t in enumerate(tenants):
        tr = r.sub("tenant", t, i)
        tid = tr.get("id", str, required=True)
        if not tid or len(tid.encode()) > 255 or "/" in tid:
            raise tr.fail("id", f"must be 1..255 bytes without '/', got {tid!r}")
        if cfg.tenant(tid):
            raise tr.fail("id", f"duplicate tenant {tid!r}")
        th = tr.get("token_hash", str, required=True)
        try:
            parse_token_hash(th)
        except ValueError as e:
            raise tr.fail("token_hash", f"{e} (make one with `kvtier token hash`)") from None
        uids = _uids(tr, "allowed_uids", None)
        tdram = tr.size("dram", 0) if "dram" in tr.table else None
        if tdram is not None and tdram % cfg.dram_segment_size:
            raise tr.fail("dram", f"must be a multiple of dram.segment_size "
                                  f"({cfg.dram_segment_size}), got {tdram}")
        retention = _duration(tr, "retention") if "retention" in tr.table else None
        enc = tr.get("encryption", str, "on")
        if enc not in ("on", "off"):
            raise tr.fail("encryption", f'must be "on" or "off", got {enc!r}')
        scope = tr.get("key_scope", str, "tenant")
        if scope not in ("tenant", "session"):
            raise tr.fail("key_scope", f'must be "tenant" or "session", got {scope!r}')
        tc = TenantConfig(tid, th, uids, tdram, retention, enc, scope)
        if "quota" in tr.table:
            tc.quota = tr.size("quota")
        if "bandwidth" in tr.table:
            tc.bandwidth = tr.size("bandwidth")
        if "iops" in tr.table:
            tc.iops = tr.get("iops", int)
        if "max_clients" in tr.table:
            tc.max_clients = tr.get("max_clients", int)
        tr.used.add("weight")
        weight = tr.table.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise tr.fail("weight", f"must be a positive number, got {weight!r}")
        tc.weight = float(weight)
        for key, val in (("quota", tc.quota), ("bandwidth", tc.bandwidth), ("iops", tc.iops),
                         ("max_clients", tc.max_clients)):
            if val is not None and val <= 0:
                raise tr.fail(key, f"must be positive, got {val}")
        cfg.tenants.append(tc)
        tr.check_unknown()
    if "limits" in data:
        lr = r.sub("limits", data["limits"])
        lim = cfg.limits
        lim.arena_default = lr.size("arena_default", lim.arena_default)
        lim.arena_max = lr.size("arena_max", lim.arena_max)
        for k in ("ring_entries", "max_clients", "max_clients_per_tenant",
                  "max_unauthenticated", "max_unauthenticated_per_uid", "hello_threads",
                  "auth_failures_before_lockout", "inflight_per_client", "io_threads",
                  "prefetch_threads"):
            v = lr.get(k, int, getattr(lim, k))
            if v <= 0:
                raise lr.fail(k, f"must be positive, got {v}")
            if k.endswith("_threads") and v > MAX_THREADS:
                raise lr.fail(k, f"must be 1..{MAX_THREADS} (threads), got {v}")
            setattr(lim, k, v)
        lr.used.add("stalled_client_timeout_s")
        stall = lr.table.get("stalled_client_timeout_s", lim.stalled_client_timeout_s)
        if isinstance(stall, bool) or not isinstance(stall, int | float) or stall <= 0:
            raise lr.fail("stalled_client_timeout_s", f"must be a positive number of "
                                                      f"seconds, got {stall!r}")
        lim.stalled_client_timeout_s = float(stall)
        if "control_timeout_s" in lr.table:
            lim.control_timeout_s = _duration(lr, "control_timeout_s")
        if "sweep_interval_s" in lr.table:
            lim.sweep_interval_s = _duration(lr, "sweep_interval_s")
        if "starvation_s" in lr.table:
            lim.starvation_s = _duration(lr, "starvation_s")
        lim.low_class_nice = lr.get("low_class_nice", int, lim.low_class_nice)
        if not 0 <= lim.low_class_nice <= 19:
            raise lr.fail("low_class_nice", f"must be in 0..19 (0: off), got "
                                            f"{lim.low_class_nice}")
        if lim.ring_entries & (lim.ring_entries - 1):
            raise lr.fail("ring_entries", f"must be a power of two, got {lim.ring_entries}")
        if lim.arena_default > lim.arena_max:
            raise lr.fail("arena_default", "must not exceed arena_max")
        if lim.arena_default < 4096:  # HELLO refuses arenas below a page
            raise lr.fail("arena_default", f"must be at least 4096, got {lim.arena_default}")
        lr.check_unknown()
        r.used.add("limits")
    if "policy" in data:
        cfg.policy = _policy(r.sub("policy", data["policy"]))
        r.used.add("policy")
    if "metrics" in data:
        mr = r.sub("metrics", data["metrics"])
        cfg.metrics_address = mr.get("address", str, cfg.metrics_address)
        cfg.metrics_port = mr.get("port", int, 0)
        if not 0 <= cfg.metrics_port <= 65535:
            raise mr.fail("port", f"must be 0..65535, got {cfg.metrics_port}")
        mr.check_unknown()
        r.used.add("metrics")
    if "fuse" in data:
        fr = r.sub("fuse", data["fuse"])
        mp = fr.get("mountpoint", str, required=True)
        if not os.path.isabs(mp):
            raise fr.fail("mountpoint", f"must be an absolute path, got {mp!r}")
        cfg.fuse_mountpoint = mp
        cfg.fuse_admin_gid = fr.get("admin_gid", int, 0)
        if cfg.fuse_admin_gid < 0:
            raise fr.fail("admin_gid", f"must be a group id, got {cfg.fuse_admin_gid}")
        fr.check_unknown()
        r.used.add("fuse")
    r.check_unknown()
    _check_socket_path(cfg)
    if cfg.tenants:
        cfg.dram_shares()
    else:  # the embedded default tenant (`ensure_default_tenant`) gets all of it
        cfg._check_dram_tier("default", cfg.dram_size // cfg.dram_segment_size
                             * cfg.dram_segment_size, None)
    return cfg


def _size_text(n: int) -> str:
    """`n` bytes as a config size ("24M", "1344K", or bytes)."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _segment_size(r: _Reader, key: str, default: int) -> int:
    seg = r.size(key, default)
    if seg % POOL_BLOCK_SIZE or not MIN_SEGMENT <= seg <= MAX_SEGMENT:
        raise r.fail(key, f"must be a multiple of {POOL_BLOCK_SIZE} from 64K to 1G "
                          f"({MIN_SEGMENT}..{MAX_SEGMENT} bytes), got {seg}")
    return seg


def _check_pool_size(pr: _Reader, kind: str, size: int, seg: int) -> None:
    """What `Pool.format` needs of a pool of `size` bytes (an nvmf pool's limit is rounded
    down to whole blocks), and enough segments to take puts."""
    if kind == "file" and size % POOL_BLOCK_SIZE:
        raise pr.fail("size", f"must be a multiple of {POOL_BLOCK_SIZE}, got {size}")
    if seg > size:
        raise pr.fail("segment_size", f"{seg} bytes is larger than the pool (size = {size})")
    usable = size - size % POOL_BLOCK_SIZE - HEADER_ZONE
    if usable < MIN_POOL_SEGMENTS * seg:
        raise pr.fail("size", f"{size} bytes hold {max(usable // seg, 0)} segment(s) of "
                              f"segment_size = {seg} "
                              f"after the {HEADER_ZONE >> 20} MiB header zone; a "
                              f"pool needs at least {MIN_POOL_SEGMENTS} to store anything: "
                              f"size >= {min_pool_bytes(seg)}")


def _check_socket_path(cfg: Config) -> None:
    n = len(os.fsencode(cfg.socket))
    if n > SOCKET_PATH_MAX:
        raise ConfigError(f"config {cfg.source}: socket: {cfg.socket} is {n} bytes; a Unix "
                          f"socket path has at most {SOCKET_PATH_MAX}: set a shorter socket "
                          f"(or state_dir)")


_FORMAT_MODES = ("if-missing", "if-empty", "never")


def _format_mode(pr: _Reader) -> str:
    mode: str = pr.get("format", str, "if-missing")
    if mode not in _FORMAT_MODES:
        raise pr.fail("format", f"must be one of {', '.join(map(repr, _FORMAT_MODES))}, "
                                f"got {mode!r}")
    return mode


def _policy(pr: _Reader) -> PolicyConfig:
    pc = PolicyConfig()
    pc.name = pr.get("name", str, pc.name)
    if pc.name not in POLICY_NAMES:
        raise pr.fail("name", f"must be one of {', '.join(POLICY_NAMES)}, got {pc.name!r}")
    if "horizon_s" in pr.table:
        pc.horizon_s = _duration(pr, "horizon_s")
    pr.used.add("fill")
    fill = pr.table.get("fill", pc.fill)
    if isinstance(fill, bool) or not isinstance(fill, int | float) or not 0 < fill <= 1:
        raise pr.fail("fill", f"must be a number in (0, 1], got {fill!r}")
    pc.fill = float(fill)
    for k in ("tracked_sessions", "tracked_keys"):
        v = pr.get(k, int, getattr(pc, k))
        if v <= 0:
            raise pr.fail(k, f"must be positive, got {v}")
        setattr(pc, k, v)
    pr.check_unknown()
    return pc


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


_PROVISION_BDEVS = ("aio", "malloc", "nvme")


def _nvmf_pool(pr: _Reader) -> NvmfPoolConfig:
    d = NvmfPoolConfig  # the host's defaults
    n = NvmfPoolConfig(
        address=pr.get("address", str, required=True),
        port=pr.get("port", int, 4420),
        subnqn=pr.get("subnqn", str, required=True),
        hostnqn=pr.get("hostnqn", str, "") or default_hostnqn(),
        nsid=pr.get("nsid", int, d.nsid),
        queues=pr.get("queues", int, d.queues),
        queue_depth=pr.get("queue_depth", int, d.queue_depth),
        header_digest=pr.get("header_digest", bool, d.header_digest),
        data_digest=pr.get("data_digest", bool, d.data_digest),
        kato_ms=pr.get("keep_alive_ms", int, d.kato_ms),
    )
    if "psk_file" in pr.table:
        n.psk_file = pr.get("psk_file", str, required=True)
        try:
            n.psk = psk.read_file(n.psk_file)
        except psk.PskError as e:
            raise pr.fail("psk_file", str(e)) from None
    if "io_timeout" in pr.table:
        n.io_timeout_s = _duration(pr, "io_timeout")
    if "connect_timeout" in pr.table:
        n.connect_timeout_s = _duration(pr, "connect_timeout")
    if not 0 < n.port < 65536:
        raise pr.fail("port", f"must be 1..65535, got {n.port}")
    for key, val, lo, hi in (("nsid", n.nsid, 1, 0xFFFFFFFE), ("queues", n.queues, 1, 64),
                             ("queue_depth", n.queue_depth, 1, 1024),
                             ("keep_alive_ms", n.kato_ms, 0, 3_600_000)):
        if not lo <= val <= hi:
            raise pr.fail(key, f"must be {lo}..{hi}, got {val}")
    for key, nqn in (("subnqn", n.subnqn), ("hostnqn", n.hostnqn)):
        if not nqn.startswith("nqn.") or len(nqn.encode()) > 223:
            raise pr.fail(key, f'must be an NQN ("nqn.yyyy-mm.domain:...", at most 223 '
                               f'bytes), got {nqn!r}')
    if n.io_timeout_s <= 0 or n.connect_timeout_s <= 0:
        raise pr.fail("io_timeout", "timeouts must be positive")
    if "provision" in pr.table:
        pr.used.add("provision")
        pv = pr.sub("provision", pr.table["provision"])
        prov: dict[str, Any] = {"rpc": pv.get("rpc", str, "/var/tmp/spdk.sock"),
                                "serial_number": pv.get("serial_number", str, "KVTIER0001"),
                                "allow_hosts": pv.get("allow_hosts", list, [n.hostnqn]),
                                "timeout_s": (_duration(pv, "timeout") if "timeout" in pv.table
                                              else 60.0)}
        prov["psk_name"] = pv.get("psk_name", str, "")
        prov["psk_path"] = pv.get("psk_path", str, "")
        if (prov["psk_name"] or prov["psk_path"]) and not n.psk_file:
            raise pv.fail("psk_name" if prov["psk_name"] else "psk_path",
                          "TLS keys need the pool's psk_file")
        prov["max_io_size"] = pv.size("max_io_size", MAX_IO_SIZE)
        prov["io_unit_size"] = pv.size("io_unit_size", IO_UNIT_SIZE)
        if prov["io_unit_size"] % 4096 or prov["io_unit_size"] <= 0:
            raise pv.fail("io_unit_size", "must be a positive multiple of 4096")
        if prov["max_io_size"] % prov["io_unit_size"] or \
                not 1 <= prov["max_io_size"] // prov["io_unit_size"] <= 16:
            raise pv.fail("max_io_size", "must be 1 to 16 times io_unit_size (SPDK's limit "
                                         "on a command's buffers)")
        bdev = pv.get("bdev", dict, required=True)
        br = pv.sub("bdev", bdev)
        bkind = br.get("kind", str, required=True)
        if bkind not in _PROVISION_BDEVS:
            raise br.fail("kind", f"must be one of {', '.join(_PROVISION_BDEVS)}, got {bkind!r}")
        b: dict[str, Any] = {"kind": bkind, "name": br.get("name", str, required=True)}
        if bkind == "aio":
            b["filename"] = br.get("filename", str, required=True)
            b["block_size"] = br.get("block_size", int, 4096)
        elif bkind == "malloc":
            b["size"] = br.size("size", required=True)
            b["block_size"] = br.get("block_size", int, 4096)
        else:
            b["traddr"] = br.get("traddr", str, required=True)
            b["trtype"] = br.get("trtype", str, "PCIe")
        br.check_unknown()
        prov["bdev"] = b
        pv.check_unknown()
        n.provision = prov
    return n


def _duration(r: _Reader, key: str) -> float:
    """A period: seconds as a number, or a string like "90s", "30m", "12h", "30d", "2w"."""
    r.used.add(key)
    v = r.table[key]
    if isinstance(v, bool):
        raise r.fail(key, f"not a duration: {v!r}")
    if isinstance(v, int | float):
        secs = float(v)
    elif isinstance(v, str) and v[:-1].replace(".", "", 1).isdigit() and v[-1] in _UNITS:
        secs = float(v[:-1]) * _UNITS[v[-1]]
    else:
        raise r.fail(key, f'not a duration (seconds, or e.g. "12h", "30d"): {v!r}')
    if secs <= 0:
        raise r.fail(key, f"must be positive, got {v!r}")
    return secs


def _uids(r: _Reader, key: str, default: list[int] | None) -> list[int] | None:
    v = r.get(key, list, default)
    if v is None:
        return None
    if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in v):
        raise r.fail(key, f"must be a list of non-negative integers, got {v!r}")
    return list(v)
