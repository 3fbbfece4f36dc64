"""A promotion (media -> DRAM) that read a value before it was overwritten, deleted or
purged never installs that older value in DRAM (it would be served after the newer
write was acknowledged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtier.daemon.blockdev import FileDevice
from kvtier.daemon.pool import Pool
from kvtier.daemon.tiers import TieredStore

KEY = bytes(range(16))


@pytest.mark.parametrize("change", ["put", "delete", "purge"])
def test_a_stale_promotion_is_dropped(tmp_path: Path, change: str) -> None:
    media = Pool.format(FileDevice(str(tmp_path / "p.img"), create_size=32 << 20),
                        segment_size=1 << 20)
    store = TieredStore({"t": TieredStore.create_dram(8 << 20, 1 << 20, False)}, media)
    store.put("t", "s", KEY, [np.full(5000, 1, np.uint8)])
    store.drams["t"].delete("t", KEY)  # evicted from DRAM: the next read promotes it
    # A promotion reads the old value from media...
    version = store._version("t", KEY)
    old = np.empty(5000, np.uint8)
    r = media.get_into("t", KEY, old)
    # ...then the key changes before it installs its copy.
    if change == "put":
        store.put("t", "s", KEY, [np.full(7000, 2, np.uint8)])
        store.drams["t"].delete("t", KEY)
    elif change == "delete":
        store.delete("t", KEY)
    else:
        store.purge_session("t", "s")
    store._promote_from("t", KEY, old, r, version)
    assert not store.drams["t"].contains("t", KEY)
    if change == "put":
        buf = np.empty(8192, np.uint8)
        got, _ = store.get_into("t", KEY, buf)
        assert got.nbytes == 7000 and buf[0] == 2
    # Without a change in between, the same promotion installs its copy.
    store.put("t", "s", KEY, [np.full(3000, 3, np.uint8)])
    store.drams["t"].delete("t", KEY)
    assert store.promote_bytes("t", KEY) == 3000
    assert store.drams["t"].contains("t", KEY)
    store.drams["t"].close(checkpoint=False)
    media.close()
