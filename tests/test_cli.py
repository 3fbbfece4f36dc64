"""The two command lines as a user runs them: real processes, real pool files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.pool import Pool

BIN = Path(sys.executable).parent


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=120, env=env or dict(os.environ))


def test_kvtierd_demo_round_trip_and_reopen(tmp_path: Path) -> None:
    args = ("kvtierd", "demo", "--state-dir", str(tmp_path), "--pool-size", "192M",
            "--segment-size", "16M", "--prompt-tokens", "4096")
    first = run(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "all bytes match" in first.stdout and "formatted" in first.stdout
    again = run(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reopened" in again.stdout and "all bytes match" in again.stdout


def test_pool_format_info_scrub_and_corruption(tmp_path: Path) -> None:
    path = str(tmp_path / "p.img")
    r = run("kvtier", "pool", "format", path, "--size", "16M", "--segment-size", "1M")
    assert r.returncode == 0 and "formatted" in r.stdout
    d = run("kvtierd", "demo", "--state-dir", str(tmp_path), "--pool-size", "160M",
            "--segment-size", "16M", "--prompt-tokens", "1024")
    assert d.returncode == 0, d.stderr
    demo_pool = str(tmp_path / "pool0.img")
    info = run("kvtier", "pool", "info", demo_pool, "--json")
    assert info.returncode == 0, info.stderr
    st = json.loads(info.stdout)
    assert st["entries"] == 4 and st["tenants"]["demo"]["entries"] == 4
    assert run("kvtier", "pool", "scrub", demo_pool).returncode == 0
    # Damage one payload byte of the first record: scrub must name it and fail.
    pool = Pool.open(FileDevice(demo_pool))
    at = pool.entries()[0].offset + 4096 + 1000  # inside the first frame of a record
    pool.close(checkpoint=False)
    with open(demo_pool, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))
    bad = run("kvtier", "pool", "scrub", demo_pool)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    r = run("kvtier", "pool", "info", str(tmp_path / "missing"))
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run("kvtier", "pool", "format", str(tmp_path / "x"), "--size", "3M")
    assert r.returncode == 1 and "at least 4" in r.stderr
    r = run("kvtierd", "demo", "--state-dir", str(tmp_path / "d"), "--segment-size", "1M",
            "--pool-size", "16M")
    assert r.returncode == 1 and "does not fit in a segment" in r.stderr
    assert "Traceback" not in r.stderr
    r = run("kvtier", "pool", "format", str(tmp_path / "y"), "--size", "lots")
    assert r.returncode == 2 and "not a size" in r.stderr
    (tmp_path / "junk").write_bytes(b"\1" * (4 << 20))
    r = run("kvtier", "pool", "info", str(tmp_path / "junk"))
    assert r.returncode == 1 and "not a kvtier pool" in r.stderr
