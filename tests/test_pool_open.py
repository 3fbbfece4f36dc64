"""Opening the media pool at start (kvtier.daemon.pool_open): `[[pool]] format` modes,
atomic first format (SIGKILL at every step of it), geometry checks, superblock fallback
logging, nvmf namespaces."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nvmf_support import HOSTNQN, InProcessTarget

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.config import Config, NvmfPoolConfig, PoolConfig, parse_config
from kvtier.daemon.errors import CorruptionError
from kvtier.daemon.pool import Pool
from kvtier.daemon.pool_open import (
    FORMATTING_SUFFIX,
    PoolOpenError,
    open_media_pool,
    open_nvmf_pool,
)
from kvtier.daemon.superblock import SB_B_OFFSET, superblock_present

MiB = 1 << 20
KEY = bytes(range(16))
VALUE = b"kvtier" * 1000
MODES = ("if-missing", "if-empty", "never")
STATES = ("missing", "zero-length", "unformatted", "pool")


def config(state_dir: Path, mode: str = "if-missing", **pool: Any) -> Config:
    table: dict[str, Any] = {"path": "pool.img", "size": "8M", "segment_size": "1M",
                             "format": mode}
    table.update(pool)
    table = {k: v for k, v in table.items() if v is not None}
    return parse_config({"state_dir": str(state_dir), "pool": [table]}, "test.toml")


def make_pool(path: str, size: int = 8 * MiB, segment_size: int = MiB) -> None:
    pool = Pool.format(FileDevice(path, create_size=size), segment_size=segment_size)
    pool.put("t", "s", KEY, [VALUE])
    pool.close()


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x10]))


def prepare(path: str, state: str) -> None:
    if state == "zero-length":
        open(path, "wb").close()
    elif state == "unformatted":  # 6 MiB of noise (not the configured 8 MiB)
        with open(path, "wb") as f:
            f.write(np.random.default_rng(7).integers(0, 256, 6 * MiB, np.uint8).tobytes())
    elif state == "pool":
        make_pool(path)


def expected(mode: str, state: str) -> str:
    if state == "pool":
        return "open"
    if state == "missing":
        return "refuse" if mode == "never" else "format"
    return "format" if mode == "if-empty" else "refuse"


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("mode", MODES)
def test_format_modes(tmp_path: Path, mode: str, state: str) -> None:
    cfg = config(tmp_path, mode)
    path = cfg.pools[0].path
    prepare(path, state)
    before = digest(path) if os.path.exists(path) else None
    want = expected(mode, state)
    if want == "refuse":
        hint = ('does not exist and format = "never"' if state == "missing" else
                'set format = "if-empty"')
        with pytest.raises(PoolOpenError, match=hint):
            open_media_pool(cfg)
        # nothing touched: no file created, none formatted
        assert (digest(path) if os.path.exists(path) else None) == before
        assert not os.path.exists(path + FORMATTING_SUFFIX)
        return
    pool = open_media_pool(cfg)
    try:
        assert pool.dev.name == path
        assert (pool.sb.device_size, pool.sb.segment_size) == (8 * MiB, MiB)
        if want == "open":
            out = bytearray(len(VALUE))
            pool.get_into("t", KEY, out)
            assert out == VALUE
        else:
            assert pool.entries() == []
    finally:
        pool.close()
    assert not os.path.exists(path + FORMATTING_SUFFIX)
    pool = open_media_pool(config(tmp_path, "never"))  # a pool now, in every mode
    pool.close()


def test_missing_directory_is_an_error_not_created(tmp_path: Path) -> None:
    cfg = config(tmp_path, path=str(tmp_path / "nodir" / "pool.img"))
    with pytest.raises(PoolOpenError, match=r"directory .*nodir.* does not exist"):
        open_media_pool(cfg)
    assert not (tmp_path / "nodir").exists()


def test_missing_file_without_size(tmp_path: Path) -> None:
    with pytest.raises(PoolOpenError, match="no size is configured"):
        open_media_pool(config(tmp_path, size=None))


def test_failed_format_leaves_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.pools[0].size = 2 * MiB  # 1 MiB + 1 segment: too small (parse_config refuses it)
    with pytest.raises(Exception, match="at least 4"):
        open_media_pool(cfg)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("with_pool", [False, True])
def test_stale_formatting_file_is_removed(tmp_path: Path, with_pool: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path)
    path = cfg.pools[0].path
    if with_pool:
        make_pool(path)
    with open(path + FORMATTING_SUFFIX, "wb") as f:
        f.write(b"\0" * 3 * MiB)
    caplog.set_level(logging.WARNING, logger="kvtierd")
    pool = open_media_pool(cfg)
    try:
        assert not os.path.exists(path + FORMATTING_SUFFIX)
        assert any("removing" in r.getMessage() and FORMATTING_SUFFIX in r.getMessage()
                   and r.levelno == logging.WARNING for r in caplog.records)
        assert pool.contains("t", KEY) == with_pool
    finally:
        pool.close()


@pytest.mark.parametrize("key,value,shown", [
    ("size", "16M", r"size = 16777216 .*formatted with 8388608 bytes.*set size = \"8M\""),
    ("size", "6M", r"size = 6291456 .*formatted with 8388608 bytes"),
    ("segment_size", "512K",
     r"segment_size = 524288 .*segments of 1048576 bytes.*set segment_size = \"1M\""),
])
def test_changed_geometry_is_refused(tmp_path: Path, key: str, value: str,
                                     shown: str) -> None:
    open_media_pool(config(tmp_path)).close()
    with pytest.raises(PoolOpenError, match=shown):
        open_media_pool(config(tmp_path, **{key: value}))
    # size not set: whatever the pool has
    pool = open_media_pool(config(tmp_path, size=None))
    assert pool.sb.device_size == 8 * MiB
    pool.close()


@pytest.mark.parametrize("damaged,used", [("A", "B"), ("B", "A")])
def test_damaged_superblock_copy_is_logged(tmp_path: Path, damaged: str, used: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path)
    path = cfg.pools[0].path
    make_pool(path)
    flip(path, (0 if damaged == "A" else SB_B_OFFSET) + 20)
    caplog.set_level(logging.WARNING, logger="kvtierd")
    pool = open_media_pool(cfg)
    try:
        assert pool.recovery.superblock_used == used
        assert pool.contains("t", KEY)
    finally:
        pool.close()
    msgs = [r.getMessage() for r in caplog.records
            if r.name == "kvtierd" and r.levelno == logging.WARNING]
    assert any(f"superblock copy {damaged} was not used" in m and "checksum mismatch" in m
               and f"opened from copy {used}" in m for m in msgs), msgs
    caplog.clear()
    open_media_pool(cfg).close()  # the close's checkpoint rewrote both copies
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_both_superblocks_damaged_is_refused_not_reformatted(tmp_path: Path) -> None:
    cfg = config(tmp_path, "if-empty")
    path = cfg.pools[0].path
    make_pool(path)
    flip(path, 20)
    flip(path, SB_B_OFFSET + 20)
    before = digest(path)
    with pytest.raises(CorruptionError, match="both superblock copies are damaged"):
        open_media_pool(cfg)
    assert digest(path) == before


# -- SIGKILL during the first start's format ---------------------------------------------------

# Runs open_media_pool in a child that announces each step of the format (device open,
# write, flush, fsync, truncate, rename) on stdout before taking it, pausing a little, so
# that the parent can kill it just before, during or just after any step.
CHILD = r"""
import json, os, sys, time
from kvtier.daemon import blockdev, pool_open
from kvtier.daemon.config import parse_config

PAUSE = float(sys.argv[2])

def step(what):
    sys.stdout.write(what + "\n")
    sys.stdout.flush()
    if PAUSE:
        time.sleep(PAUSE)

def hooked(name, fn):
    def wrapper(*a, **kw):
        step(name)
        return fn(*a, **kw)
    return wrapper

D = blockdev.FileDevice
D.__init__ = hooked("open", D.__init__)
D.writev = hooked("write", D.writev)
D.flush = hooked("flush", D.flush)
for name in ("fsync", "rename", "truncate", "unlink"):
    setattr(os, name, hooked(name, getattr(os, name)))
pool = pool_open.open_media_pool(parse_config(json.loads(sys.argv[1]), "child.toml"))
sys.stdout.write("opened\n")
sys.stdout.flush()
os._exit(0)
"""


def _child(table: dict[str, Any], pause: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(table), str(pause)],
                            stdout=subprocess.PIPE, text=True)


def _steps(table: dict[str, Any]) -> int:
    """How many steps an uninterrupted start takes before the pool is open."""
    p = _child(table, 0.0)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0 and out.splitlines()[-1] == "opened", out
    return len(out.splitlines()) - 1


@pytest.mark.parametrize("initial,mode,rounds", [("missing", "if-missing", 8),
                                                 ("zero-length", "if-empty", 6)])
def test_sigkill_during_first_format(tmp_path: Path, initial: str, mode: str,
                                     rounds: int) -> None:
    """Killed at any step of the first start's format, the next start succeeds: it
    formats afresh or opens the finished pool (and `<path>` is never half-formatted)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)

    def setup(d: Path) -> dict[str, Any]:
        d.mkdir()
        table = {"state_dir": str(d), "pool": [{"path": "pool.img", "size": "4M",
                                                 "segment_size": "256K", "format": mode}]}
        if initial == "zero-length":
            open(d / "pool.img", "wb").close()
        return table

    total = _steps(setup(tmp_path / "calibrate"))
    assert total >= 10
    outcomes = []
    for i in range(rounds):
        d = tmp_path / f"round{i}"
        table = setup(d)
        path = str(d / "pool.img")
        k = rng.randint(i * total // rounds, (i + 1) * total // rounds)
        child = _child(table, 0.003)
        assert child.stdout is not None
        for _ in range(k):
            if not child.stdout.readline():
                break
        time.sleep(rng.uniform(0, 0.004))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        where = f"seed {seed}, round {i}, killed after step {k} of {total}"
        if initial == "missing" and os.path.exists(path):
            dev = FileDevice(path)  # renamed into place: a complete pool
            try:
                assert superblock_present(dev), where
            finally:
                dev.close()
        pool = open_media_pool(parse_config(table, "test.toml"))
        try:
            assert (pool.sb.device_size, pool.sb.segment_size) == (4 * MiB, 256 << 10), where
            pool.put("t", "s", KEY, [VALUE])
        finally:
            pool.close()
        assert not os.path.exists(path + FORMATTING_SUFFIX), where
        pool = open_media_pool(parse_config(table, "test.toml"))
        assert pool.contains("t", KEY), where
        pool.close()
        outcomes.append(k)
    assert len(outcomes) == rounds


# -- nvmf ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nvmf_target() -> Iterator[InProcessTarget]:
    yield InProcessTarget()


def nvmf_pool(t: InProcessTarget, nqn: str, mode: str, segment_size: int = MiB) -> PoolConfig:
    return PoolConfig("remote0", "nvmf", "", 0, segment_size, format=mode,
                      nvmf=NvmfPoolConfig("127.0.0.1", t.port, nqn, HOSTNQN,
                                          io_timeout_s=5.0, connect_timeout_s=3.0))


def test_nvmf_blank_namespace(nvmf_target: InProcessTarget, tmp_path: Path) -> None:
    """A blank namespace is formatted under "if-missing" (like a missing file) and refused
    under "never"; a pool on it is opened, with its geometry checked."""
    blank = nvmf_target.namespace(str(tmp_path / "blank.img"), 8 * MiB)
    with pytest.raises(PoolOpenError, match=r'holds no kvtier pool.*format = "never"'):
        open_nvmf_pool(nvmf_pool(nvmf_target, blank, "never"))
    nqn = nvmf_target.namespace(str(tmp_path / "ns.img"), 8 * MiB)
    pool = open_nvmf_pool(nvmf_pool(nvmf_target, nqn, "if-missing"))
    try:
        assert (pool.sb.device_size, pool.sb.segment_size) == (8 * MiB, MiB)
        pool.put("t", "s", KEY, [VALUE])
    finally:
        pool.close()
    with pytest.raises(PoolOpenError, match="segment_size = 2097152"):
        open_nvmf_pool(nvmf_pool(nvmf_target, nqn, "never", segment_size=2 * MiB))
    pool = open_nvmf_pool(nvmf_pool(nvmf_target, nqn, "never"))
    try:
        assert pool.contains("t", KEY)
    finally:
        pool.close()
