from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Daemon
from hypothesis import HealthCheck, settings

# Without a GPU, Triton kernels (kvtier.client.gcm_gpu) run in Triton's interpreter on CPU
# tensors: the same kernel code, checked against `cryptography` (tests/test_gcm_gpu.py).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci", max_examples=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The vLLM connector's tests need vLLM, which lives in .venv-vllm (its CPU build pins its
# own torch): scripts/test runs them there; elsewhere they are not collected at all.
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_vllm*.py"]

# The largest test's pools (fallocated, so they take real blocks) plus what module-scoped
# fixtures keep; tmp dirs of passed tests go at once (pyproject: tmp_path_retention_policy).
# Measured peak of the whole suite: about 1 GiB (test_service_entry: the embedded default's
# 1 GiB pool). scripts/test picks a temp dir with this much room (SUITE_DISK_BYTES there).
DISK_NEEDED = 1280 << 20


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to start on a nearly full temp filesystem: otherwise tests fail one after
    another with ENOSPC in fixtures, far from the cause."""
    base = session.config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    if free < DISK_NEEDED:
        pytest.exit(f"{base}: {free / 2**30:.1f} GiB free; the suite needs "
                    f"{DISK_NEEDED / 2**30:.0f} GiB there (set TMPDIR or --basetemp to a "
                    f"filesystem with room)", returncode=2)


class FakeClock:
    """A controllable wall clock (unix seconds) for expiry tests."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool_path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "pool.img")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    from harness import Daemon

    d = Daemon(tmp_path)
    yield d
    if d.proc is not None:
        d.stop()
