"""What the config check refuses, and that what it accepts starts (issue #22, item 9).

Every refusal names the key to change.  The limits on sizes are the engine's own: a
config at exactly a limit is built here the way kvtierd builds it at start (`Pool.format`
on a file of the configured geometry, `TieredStore.create_drams` over `dram_shares()`)
and takes a put -- into DRAM, for a DRAM tier -- and the engine is shown to store (or
cache) nothing one segment below it.  `config` is a leaf module (no trio, no NVMe-oF
host, no engine), checked in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.client.protocol import Tier
from kvtier.daemon import config as C
from kvtier.daemon import pool as pool_mod
from kvtier.daemon import superblock
from kvtier.daemon.blockdev import FileDevice, MemDevice
from kvtier.daemon.config import (
    Config,
    ConfigError,
    check_runtime,
    hash_token,
    load_config,
    min_dram_bytes,
    min_pool_bytes,
    verify_token,
)
from kvtier.daemon.errors import PoolFullError
from kvtier.daemon.pool import Pool
from kvtier.daemon.tiers import TieredStore

K, M = 1 << 10, 1 << 20
SALT, HASH = "00" * 16, "00" * 32


def th(n: int = 2**14, r: int = 8, p: int = 1, salt: str = SALT, h: str = HASH) -> str:
    return f"scrypt${n}${r}${p}${salt}${h}"


def tenant(tid: str, hash_: str | None = None, extra: str = "") -> str:
    return f'[[tenant]]\nid = "{tid}"\ntoken_hash = "{hash_ or th()}"\n{extra}\n'


def pool(size: str = "64M", seg: str = "4M", path: str = "pool0.img") -> str:
    return f'[[pool]]\npath = "{path}"\nsize = "{size}"\nsegment_size = "{seg}"\n'


def dram(size: str = "64M", seg: str = "4M") -> str:
    return f'[dram]\nsize = "{size}"\nsegment_size = "{seg}"\npopulate = false\n'


GOOD = dram() + pool() + tenant("a") + tenant("b")


def write(tmp_path: Path, body: str) -> Path:
    state = tmp_path / "state"
    path = tmp_path / "kvtier.toml"
    # top-level keys first: TOML puts anything after a table header into that table
    head = "" if "state_dir =" in body else f'state_dir = "{state}"\n'
    path.write_text(head + body)
    return path


def refused(tmp_path: Path, body: str, key: str) -> str:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    msg = str(e.value)
    assert msg.startswith(f"config {path}: {key}: "), msg
    return msg


# -- refused: (config, key named, what the message says) ---------------------------------------

NVMF = ('[[pool]]\nkind = "nvmf"\naddress = "127.0.0.1"\nsubnqn = "nqn.2016-06.io.spdk:x"\n'
        'size = "5M"\nsegment_size = "1M"\n')

REFUSED = {
    # pool geometry: Pool.format's rules, and 5 segments after the 1 MiB header zone
    "pool 4 segments": (dram() + pool("5M", "1M"), "pool[0].size",
                        "5242880 bytes hold 4 segment(s) of segment_size = 1048576"),
    "pool under 1 MiB": (dram() + pool("512K", "64K"), "pool[0].size", "hold 0 segment"),
    "pool segment not 4K": (dram() + pool("64M", "1000000"), "pool[0].segment_size",
                            "must be a multiple of 4096"),
    "pool segment < 64K": (dram() + pool("64M", "32K"), "pool[0].segment_size",
                           "from 64K to 1G"),
    "pool segment > 1G": (dram() + pool("8G", "2G"), "pool[0].segment_size",
                          "from 64K to 1G"),
    "pool segment > pool": (dram() + pool("8M", "16M"), "pool[0].segment_size",
                            "larger than the pool"),
    "pool size not 4K": (dram() + pool("10000000", "1M"), "pool[0].size",
                         "must be a multiple of 4096"),
    "nvmf size limit small": (dram() + NVMF, "pool[0].size", "hold 4 segment(s)"),
    # DRAM: segment sizes, and each tier's header zone + 5 segments
    "dram segment not 4K": (dram("64M", "1000000"), "dram.segment_size",
                            "must be a multiple of 4096"),
    "dram segment < 64K": (dram("64M", "16K"), "dram.segment_size", "from 64K to 1G"),
    "tenant dram 20M/4M": (dram("64M", "4M") + pool() + tenant("a", extra='dram = "20M"'),
                           "tenant[0].dram", "its DRAM tier of 20971520 bytes is smaller "
                                             "than 25165824 bytes"),
    "equal share 20M/4M": (dram("40M", "4M") + pool() + tenant("a") + tenant("b"),
                           "dram.size", "tenant 'a': its DRAM tier of 20971520 bytes"),
    "second tenant's share": (dram("64M", "4M") + pool() + tenant("a", extra='dram = "44M"')
                              + tenant("b"), "dram.size",
                              "tenant 'b': its DRAM tier of 20971520 bytes"),
    "default tenant's share": (dram("1280K", "64K") + pool(), "dram.size",
                               "tenant 'default': its DRAM tier of 1310720 bytes"),
    "tenants over dram.size": (dram("64M", "4M") + pool() + tenant("a", extra='dram = "68M"'),
                               "dram.size", "dram sizes add up to more than dram.size"),
    # token hashes nobody's token can match
    "hash garbage": (GOOD + tenant("c", "scrypt$x$y$z$zz$qq"), "tenant[2].token_hash",
                     "n must be a decimal number"),
    "hash 5 fields": (GOOD + tenant("c", "scrypt$16384$8$1$00"), "tenant[2].token_hash",
                      "must be a scrypt hash"),
    "hash not scrypt": (GOOD + tenant("c", th().replace("scrypt", "bcrypt")),
                        "tenant[2].token_hash", "must be a scrypt hash"),
    "hash n not 2^k": (GOOD + tenant("c", th(n=1000)), "tenant[2].token_hash",
                       "n must be a power of two > 1"),
    "hash n = 1": (GOOD + tenant("c", th(n=1)), "tenant[2].token_hash", "power of two"),
    "hash n signed": (GOOD + tenant("c", "scrypt$+16384$8$1$00$" + HASH),
                      "tenant[2].token_hash", "n must be a decimal"),
    "hash r = 0": (GOOD + tenant("c", th(r=0)), "tenant[2].token_hash", "at least 1"),
    "hash p = 0": (GOOD + tenant("c", th(p=0)), "tenant[2].token_hash", "at least 1"),
    "hash n >= 2^16r": (GOOD + tenant("c", th(n=2**16, r=1)), "tenant[2].token_hash",
                        "n must be below 2**(16*r)"),
    "hash memory": (GOOD + tenant("c", th(n=2**15, r=8)), "tenant[2].token_hash",
                    "bytes of memory"),
    "hash cost": (GOOD + tenant("c", th(n=2**14, r=8, p=33)), "tenant[2].token_hash",
                  "too slow"),
    "hash salt not hex": (GOOD + tenant("c", th(salt="zz")), "tenant[2].token_hash",
                          "salt must be hex"),
    "hash salt odd": (GOOD + tenant("c", th(salt="abc")), "tenant[2].token_hash",
                      "salt must be hex"),
    "hash salt empty": (GOOD + tenant("c", th(salt="")), "tenant[2].token_hash",
                        "salt must be hex"),
    "hash 31 bytes": (GOOD + tenant("c", th(h="00" * 31)), "tenant[2].token_hash",
                      "hash must be 64 hex digits"),
    "hash not hex": (GOOD + tenant("c", th(h="g" * 64)), "tenant[2].token_hash",
                     "hash must be 64 hex digits"),
    # thread counts, arenas, the socket path
    "io_threads": (GOOD + "[limits]\nio_threads = 100000\n", "limits.io_threads",
                   "must be 1..1024 (threads), got 100000"),
    "prefetch_threads": (GOOD + "[limits]\nprefetch_threads = 1025\n",
                         "limits.prefetch_threads", "must be 1..1024"),
    "hello_threads": (GOOD + "[limits]\nhello_threads = 5000\n", "limits.hello_threads",
                      "must be 1..1024"),
    "io_threads 0": (GOOD + "[limits]\nio_threads = 0\n", "limits.io_threads",
                     "must be positive"),
    "arena_default": (GOOD + '[limits]\narena_default = "1K"\n', "limits.arena_default",
                      "at least 4096"),
    "socket too long": (f'socket = "/tmp/{"s" * 120}.sock"\n' + GOOD, "socket",
                        "at most 107"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_naming_the_key(tmp_path: Path, name: str) -> None:
    body, key, want = REFUSED[name]
    msg = refused(tmp_path, body, key)
    assert want in msg, msg


def test_the_good_config_passes_both_checks_and_creates_nothing(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, GOOD)))
    before = sorted(os.listdir(tmp_path))
    check_runtime(cfg)
    assert sorted(os.listdir(tmp_path)) == before  # state_dir is creatable, not created


# -- refused by check_runtime (the filesystem) -------------------------------------------------


def _runtime(tmp_path: Path, body: str, key: str) -> str:
    path = write(tmp_path, body)
    cfg = load_config(str(path))  # the values alone are fine
    with pytest.raises(ConfigError) as e:
        check_runtime(cfg)
    msg = str(e.value)
    assert msg.startswith(f"config {path}: {key}: "), msg
    return msg


def test_missing_pool_directory_is_refused_not_created(tmp_path: Path) -> None:
    nodir = tmp_path / "nodir"
    msg = _runtime(tmp_path, dram() + pool(path=f"{nodir}/pool0.img"), "pool[0].path")
    assert f"directory {nodir} (of {nodir}/pool0.img) does not exist" in msg
    assert not nodir.exists()


@pytest.mark.parametrize("case", ["state_dir", "socket"])
def test_directory_under_a_file_is_refused(tmp_path: Path, case: str) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    where = f'state_dir = "{afile}/state"\n' if case == "state_dir" else \
        f'state_dir = "{tmp_path}"\nsocket = "{afile}/run/kvtier.sock"\n'
    msg = _runtime(tmp_path, where + dram() + pool(path=f"{tmp_path}/p.img"), case)
    assert f"{afile} (on the way to" in msg and "is not a directory" in msg


@pytest.mark.parametrize("case", ["state_dir", "socket", "pool"])
def test_unwritable_directory_is_refused(tmp_path: Path, case: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: let os.access answer as for a user
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(ro)
                            and mode & os.W_OK else real(path, mode))
    try:
        where = {"state_dir": f'state_dir = "{ro}/state"\n',
                 "socket": f'state_dir = "{tmp_path}"\nsocket = "{ro}/kvtier.sock"\n',
                 "pool": f'state_dir = "{tmp_path}"\n'}[case]
        path = f"{ro}/p.img" if case == "pool" else f"{tmp_path}/p.img"
        msg = _runtime(tmp_path, where + dram() + pool(path=path),
                       "pool[0].path" if case == "pool" else case)
        assert "not writable by uid" in msg
    finally:
        ro.chmod(0o700)


def test_socket_path_taken_by_a_file_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "kvtier.sock"
    sock.write_text("not a socket")
    msg = _runtime(tmp_path, f'socket = "{sock}"\n' + GOOD, "socket")
    assert "exists and is not a socket" in msg


@pytest.mark.parametrize("case,key,want", [
    ("never", "pool[0].format", 'does not exist and format = "never"'),
    ("no size", "pool[0].size", "no size is configured"),
    ("a directory", "pool[0].path", "not a regular file or block device"),
])
def test_pool_path_that_cannot_start(tmp_path: Path, case: str, key: str, want: str) -> None:
    p = tmp_path / "p.img"
    body = {"never": pool(path=str(p)) + 'format = "never"\n',
            "no size": f'[[pool]]\npath = "{p}"\n',
            "a directory": pool(path=str(p))}[case]
    if case == "a directory":
        p.mkdir()
    assert want in _runtime(tmp_path, dram() + body, key)


def test_check_config_command_runs_the_runtime_checks(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    from kvtier.daemon.main import main

    good = write(tmp_path, GOOD)
    assert main(["check-config", "--config", str(good)]) == 0
    bad = write(tmp_path, dram() + pool(path=f"{tmp_path}/nodir/p.img"))
    assert main(["check-config", "--config", str(bad)]) == 1
    assert "pool[0].path: directory" in capsys.readouterr().err
    assert not (tmp_path / "nodir").exists()


# -- accepted at the limits: built as kvtierd builds them, they work ----------------------------


def build(cfg: Config, tmp_path: Path) -> TieredStore:
    """The store pieces Service.run builds: the media pool formatted at the configured
    geometry on a file, the DRAM tiers over `dram_shares()` (the default tenant's when
    the config names none)."""
    p = cfg.pools[0]
    media = Pool.format(FileDevice(str(tmp_path / "media.img"), create_size=p.size),
                        segment_size=p.segment_size)
    shares = cfg.dram_shares() or {"default": cfg.dram_size // cfg.dram_segment_size
                                   * cfg.dram_segment_size}
    return TieredStore(TieredStore.create_drams(shares, cfg.dram_segment_size,
                                                cfg.dram_populate), media)


def fill(store: TieredStore, tenant: str, seg: int) -> None:
    """Puts worth several segments: every one lands in the media pool and in DRAM."""
    for i in range(12):
        key = i.to_bytes(16, "little")
        assert store.put(tenant, "s", key, [bytes([i]) * (seg // 3)]) == Tier.POOL
        assert store.drams[tenant].contains(tenant, key), (tenant, i)
        assert store.media.contains(tenant, key)
    out = bytearray(seg // 3)
    assert store.get_into(tenant, (11).to_bytes(16, "little"), out)[1] == Tier.DRAM


@pytest.mark.parametrize("seg", [64 * K, 1 * M, 4 * M])
def test_pool_and_dram_at_exactly_the_minimum_start_and_cache(tmp_path: Path,
                                                              seg: int) -> None:
    size, share = min_pool_bytes(seg), min_dram_bytes(seg)
    body = (dram(str(2 * share), str(seg)) + pool(str(size), str(seg), str(tmp_path / "m"))
            + tenant("a") + tenant("b"))
    cfg = load_config(str(write(tmp_path, body)))
    check_runtime(cfg)
    assert cfg.dram_shares() == {"a": share, "b": share}
    store = build(cfg, tmp_path)
    assert store.media.segment_count == C.MIN_POOL_SEGMENTS
    assert {t: d.segment_count for t, d in store.drams.items()} == \
        {"a": C.MIN_POOL_SEGMENTS, "b": C.MIN_POOL_SEGMENTS}
    fill(store, "a", seg)
    fill(store, "b", seg)
    # one segment less: refused, naming the key
    assert "pool[0].size" in refused(tmp_path, body.replace(f'size = "{size}"',
                                                            f'size = "{size - seg}"'),
                                     "pool[0].size")
    low = body.replace(f'size = "{2 * share}"', f'size = "{2 * share - 2 * seg}"')
    assert "is smaller than" in refused(tmp_path, low, "dram.size")


def test_one_segment_below_the_minimum_the_engine_stores_nothing(tmp_path: Path) -> None:
    """Why the minimum is 5 and not Pool.format's 4: a pool of 4 takes no put, so a DRAM
    tier of 4 segments behind the header caches nothing (every PUT goes to the media)."""
    seg = 4 * M
    media = Pool.format(FileDevice(str(tmp_path / "m"), create_size=min_pool_bytes(seg)),
                        segment_size=seg)
    small = Pool.format(FileDevice(str(tmp_path / "s"), create_size=min_pool_bytes(seg) - seg),
                        segment_size=seg)
    assert small.segment_count == C.MIN_POOL_SEGMENTS - 1
    with pytest.raises(PoolFullError):
        small.put("t", "s", b"k" * 16, [b"v" * 4096])
    drams = TieredStore.create_drams({"t": min_dram_bytes(seg) - seg}, seg, False)
    store = TieredStore(drams, media)
    for i in range(3):
        store.put("t", "s", i.to_bytes(16, "little"), [b"v" * 4096])
    assert media.lookup_many("t", [i.to_bytes(16, "little") for i in range(3)]).all()
    assert not drams["t"].lookup_many("t", [i.to_bytes(16, "little") for i in range(3)]).any()


def test_default_tenant_share_at_the_minimum(tmp_path: Path) -> None:
    seg = 64 * K
    body = dram(str(min_dram_bytes(seg)), "64K") + pool(str(min_pool_bytes(seg)), "64K",
                                                        str(tmp_path / "m"))
    cfg = load_config(str(write(tmp_path, body)))
    fill(build(cfg, tmp_path), "default", seg)


def test_thread_limits_at_the_bounds_start(tmp_path: Path) -> None:
    from kvtier.daemon.iosched import IoScheduler

    body = GOOD + "[limits]\nio_threads = 1024\nprefetch_threads = 1024\nhello_threads = 1\n"
    cfg = load_config(str(write(tmp_path, body)))
    assert (cfg.limits.io_threads, cfg.limits.prefetch_threads, cfg.limits.hello_threads) \
        == (1024, 1024, 1)
    IoScheduler(cfg.limits.io_threads, starvation_s=cfg.limits.starvation_s)


@pytest.mark.parametrize("n,r,p", [(2**15, 7, 1), (2**15, 1, 1), (2**16, 2, 1), (2, 1, 1)])
def test_accepted_hashes_at_the_bounds_verify(tmp_path: Path, n: int, r: int, p: int) -> None:
    """A hash the check accepts is one scrypt here computes: the right token logs in."""
    salt = os.urandom(16)
    h = hashlib.scrypt(b"tok", salt=salt, n=n, r=r, p=p, dklen=32)
    stored = th(n, r, p, salt.hex(), h.hex().upper() if n == 2 else h.hex())
    cfg = load_config(str(write(tmp_path, dram() + pool() + tenant("a", stored))))
    assert cfg.tenants[0].check_token("tok") and not cfg.tenants[0].check_token("tak")


def test_hash_token_output_is_accepted(tmp_path: Path) -> None:
    stored = hash_token("secret")
    cfg = load_config(str(write(tmp_path, dram() + pool() + tenant("a", stored))))
    assert verify_token("secret", cfg.tenants[0].token_hash)
    assert not verify_token("secret", "scrypt$x$y$z$zz$qq")
    # the cost bound itself is accepted (not computed here: about a second)
    load_config(str(write(tmp_path, dram() + pool() + tenant("c", th(2**14, 8, 32)))))


# -- the engine's limits, restated in config, are the engine's --------------------------------


def test_restated_engine_limits_match_the_engine(tmp_path: Path) -> None:
    from kvtier.daemon.policy import POLICIES

    assert C.HEADER_ZONE == superblock.HEADER_ZONE
    assert (C.MIN_SEGMENT, C.MAX_SEGMENT, C.PUT_RESERVE) == \
        (pool_mod.MIN_SEGMENT, pool_mod.MAX_SEGMENT, pool_mod.PUT_RESERVE)
    mem = MemDevice(1 << 20, populate=False)
    dev = FileDevice(str(tmp_path / "f"), create_size=1 << 20)
    assert mem.pool_block_size == dev.pool_block_size == C.POOL_BLOCK_SIZE
    mem.close()
    dev.close()
    assert set(C.POLICY_NAMES) == set(POLICIES)


def test_config_is_a_leaf_module() -> None:
    """Importing the config (kvtierd check-config, the client side's tools) pulls neither
    trio, the NVMe-oF host nor the DRAM policy (and so not the engine); nor does the
    PSK module it reads key files with."""
    for mod, banned in (
        ("kvtier.daemon.config", ("trio", "kvtier.daemon.nvmf.host", "kvtier.daemon.policy",
                                  "kvtier.daemon.pool", "numpy")),
        ("kvtier.daemon.nvmf.psk", ("trio", "kvtier.daemon.nvmf.host")),
    ):
        code = (f"import {mod}, sys; bad = [m for m in {banned!r} if m in sys.modules]; "
                f"assert not bad, bad")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, (mod, r.stderr)
