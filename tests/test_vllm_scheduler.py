"""The connector's scheduler side inside vLLM's own `Scheduler` (DeviceConfig("cpu")), no
model run: a real kvtierd holds a prompt's chunks; vLLM's scheduler must park the request
in WAITING_FOR_REMOTE_KVS with a load of exactly those chunks into the request's blocks,
then compute only the rest once the worker reports the load done; a failed load must be
recomputed from scratch and not offered again."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from harness import TOKENS, Daemon  # noqa: E402
from vllm_support import BLOCK, CHUNK, VOCAB, make_model, prompt_keys  # noqa: E402

from kvtier.client.client import Client  # noqa: E402

pytestmark = pytest.mark.timeout(300)
NUM_BLOCKS = 256


def _scheduler(model: Path, daemon: Daemon, token_file: Path, **extra: Any) -> Any:
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=str(model), dtype="float32", max_model_len=4096,
                               skip_tokenizer_init=True)
    cache_config = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = NUM_BLOCKS
    cfg = VllmConfig(
        model_config=model_config, cache_config=cache_config,
        scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4096,
                                         max_model_len=4096, is_encoder_decoder=False),
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier.client.vllm",
            kv_role="kv_both", kv_connector_extra_config={
                "socket": daemon.socket, "tenant": "bob", "token_file": str(token_file),
                "model_id": "tiny-qwen2", "chunk_tokens": CHUNK, **extra}))
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(
            [f"model.layers.{i}.self_attn.attn" for i in range(2)],
            FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=64,
                              dtype=torch.float32))])
    return Scheduler(vllm_config=cfg, kv_cache_config=kv_cache_config,
                     structured_output_manager=StructuredOutputManager(cfg), block_size=BLOCK)


def _request(rid: str, ids: list[int]) -> Any:
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    return Request(request_id=rid, prompt_token_ids=ids,
                   sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                   block_hasher=get_request_block_hasher(BLOCK, sha256))


def _worker_says(sched: Any, out: Any, **kv: Any) -> None:
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    mro = ModelRunnerOutput(req_ids=[], req_id_to_index={},
                            kv_connector_output=KVConnectorOutput(**kv))
    sched.update_from_output(out, mro)


@pytest.fixture
def setup(tmp_path: Path) -> Any:
    model = make_model(tmp_path / "model")
    daemon = Daemon(tmp_path / "kvtierd", tenants={"bob": {}})
    daemon.dir.mkdir()
    daemon.start()
    token_file = tmp_path / "bob.token"
    token_file.write_text(TOKENS["bob"])
    yield model, daemon, token_file
    daemon.stop()


def _store(daemon: Daemon, keys: list[bytes]) -> None:
    with Client.connect(daemon.socket, "bob", TOKENS["bob"], arena_size=8 << 20) as c:
        for k in keys:  # the scheduler only looks up: contents do not matter here
            c.put("vllm", k, [b"x" * 64, b"y" * 64])


def test_async_load_then_only_the_rest_is_computed(setup: Any) -> None:
    from vllm.v1.request import RequestStatus

    model, daemon, token_file = setup
    rng = random.Random(0)
    ids = [rng.randrange(1, VOCAB) for _ in range(5 * CHUNK + 30)]
    keys = prompt_keys(model, ids)
    _store(daemon, keys[:3])  # 3 of its 5 full chunks are stored
    sched = _scheduler(model, daemon, token_file)
    req = _request("r1", ids)
    sched.add_request(req)
    out = sched.schedule()
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert out.num_scheduled_tokens.get("r1") is None  # nothing computed while it loads
    meta = out.kv_connector_metadata
    assert len(meta.loads) == 1 and not meta.saves
    job = meta.loads[0]
    assert job.req_id == "r1" and job.keys == keys[:3]
    blocks = sched.kv_cache_manager.get_blocks("r1").get_block_ids()[0]
    k = CHUNK // BLOCK
    assert job.blocks == [blocks[c * k:(c + 1) * k] for c in range(3)]
    _worker_says(sched, out, finished_recving={"r1"})
    out = sched.schedule()
    assert req.status == RequestStatus.RUNNING
    # vLLM computes the rest of the prompt only, and kvtier saves the chunks that fill.
    assert out.num_scheduled_tokens["r1"] == len(ids) - 3 * CHUNK
    saves = out.kv_connector_metadata.saves
    assert [s.keys for s in saves] == [keys[3:5]]
    blocks = sched.kv_cache_manager.get_blocks("r1").get_block_ids()[0]
    assert saves[0].blocks == [blocks[c * k:(c + 1) * k] for c in range(3, 5)]


def test_a_failed_load_is_recomputed_and_not_offered_again(setup: Any) -> None:
    from vllm.v1.request import RequestStatus

    model, daemon, token_file = setup
    rng = random.Random(1)
    ids = [rng.randrange(1, VOCAB) for _ in range(3 * CHUNK + 10)]
    _store(daemon, prompt_keys(model, ids))
    sched = _scheduler(model, daemon, token_file)
    req = _request("r2", ids)
    sched.add_request(req)
    out = sched.schedule()
    job = out.kv_connector_metadata.loads[0]
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    bad = {b for row in job.blocks for b in row}
    _worker_says(sched, out, finished_recving={"r2"}, invalid_block_ids=bad)
    out = sched.schedule()
    assert out.num_scheduled_tokens["r2"] == len(ids)  # all of it, from scratch
    assert not out.kv_connector_metadata.loads


def test_whole_prompt_stored_leaves_a_block_to_compute(setup: Any) -> None:
    model, daemon, token_file = setup
    rng = random.Random(2)
    ids = [rng.randrange(1, VOCAB) for _ in range(2 * CHUNK)]
    _store(daemon, prompt_keys(model, ids))
    sched = _scheduler(model, daemon, token_file)
    sched.add_request(_request("r3", ids))
    out = sched.schedule()
    job = out.kv_connector_metadata.loads[0]
    assert len(job.keys) == 2 and job.blocks[1][-1] == -1  # the last block: vLLM's
    _worker_says(sched, out, finished_recving={"r3"})
    assert sched.schedule().num_scheduled_tokens["r3"] == BLOCK


def test_kvtierd_down_means_no_load_and_no_wait(setup: Any) -> None:
    model, daemon, token_file = setup
    ids = list(range(1, 2 * CHUNK + 5))
    daemon.stop()
    sched = _scheduler(model, daemon, token_file)
    sched.add_request(_request("r4", ids))
    out = sched.schedule()
    assert out.num_scheduled_tokens["r4"] == len(ids)
    assert not out.kv_connector_metadata.loads
    daemon.start()  # for the fixture's stop


def test_bad_connector_config_is_refused_by_name(setup: Any) -> None:
    model, daemon, token_file = setup
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config key"):
        _scheduler(model, daemon, token_file, chunk_size=256)
    with pytest.raises(ValueError, match="multiple of vLLM's block size"):
        _scheduler(model, daemon, token_file, chunk_tokens=BLOCK + 32)
    with pytest.raises(ValueError, match="save_slots must be at least 1"):
        _scheduler(model, daemon, token_file, save_slots=0)
