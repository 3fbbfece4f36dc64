"""The compact index against a plain dict model."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvtier.daemon.index import ROW, Index, split_key, split_keys

keys = st.binary(min_size=16, max_size=16)


@given(ops=st.lists(st.tuples(st.sampled_from(["put", "del", "bulkdel"]),
                              st.integers(0, 2), st.integers(0, 40)), max_size=300))
def test_index_matches_dict_model(ops: list[tuple[str, int, int]]) -> None:
    universe = [bytes([i]) * 16 for i in range(41)]
    ix = Index(capacity=16)
    model: dict[tuple[int, bytes], int] = {}
    for n, (op, t, ki) in enumerate(ops):
        k = universe[ki]
        k0, k1 = split_key(k)
        if op == "put":
            row, _ = ix.insert(t, k0, k1)
            ix.blocks[row] = 1
            ix.loc[row] = n
            model[(t, k)] = n
        elif op == "del":
            row = ix.find(t, k0, k1)
            assert (row >= 0) == ((t, k) in model)
            if row >= 0:
                ix.remove(row)
                del model[(t, k)]
        else:
            rows = ix.select(tenant=t)
            ix.remove_many(rows)
            for key in [m for m in model if m[0] == t]:
                del model[key]
        assert ix.count == len(model)
    for t in range(3):
        k0, k1 = split_keys(universe)
        rows = ix.lookup_many(t, k0, k1)
        for k, r in zip(universe, rows.tolist(), strict=True):
            if (t, k) in model:
                assert r >= 0 and int(ix.loc[r]) == model[(t, k)]
            else:
                assert r == -1


def test_bulk_load_then_lookup_and_growth() -> None:
    n = 50_000
    rows = np.zeros(n, dtype=ROW)
    rng = np.random.default_rng(1)
    rows["k0"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    rows["k1"] = np.arange(n, dtype=np.uint64)
    rows["blocks"] = 1
    rows["loc"] = np.arange(n)
    ix = Index()
    ix.bulk_load(rows[: n // 2])
    ix.bulk_load(rows[n // 2:])
    got = ix.lookup_many(0, rows["k0"].copy(), rows["k1"].copy())
    assert (ix.loc[got] == np.arange(n)).all()
    assert (ix.lookup_many(1, rows["k0"].copy(), rows["k1"].copy()) == -1).all()
    assert ix.nbytes / n < 80
