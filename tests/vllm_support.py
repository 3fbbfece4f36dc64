"""Shared pieces of the vLLM connector tests and benchmark: a tiny random-weight Qwen2 saved
with `save_pretrained` (no hub), the connector's kv-transfer config, and the chunk keys a
prompt is stored under (computed here exactly as the connector computes them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_ID = "tiny-qwen2"
VOCAB = 512
BLOCK = 64  # vLLM's block size (the CPU backend takes multiples of 32)
CHUNK = 128  # kvtier chunk tokens: two blocks


def make_model(path: Path, *, layers: int = 2, hidden: int = 128, heads: int = 2,
               kv_heads: int = 1, head_dim: int = 64, max_len: int = 8192) -> Path:
    """A random-weight Qwen2 whose greedy tokens vary (untied, wide initialisation)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=max_len, tie_word_embeddings=False,
                      initializer_range=0.2, torch_dtype="float32")
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).to(torch.float32).save_pretrained(path)
    save_tokenizer(path)
    return path


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer built here: word `wN` is token N (for `vllm serve`, whose
    OpenAI endpoints take text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0",
                            eos_token="w1").save_pretrained(path)


def words(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def transfer_config(socket: str, tenant: str, token_file: str, **extra: Any) -> str:
    cfg = {"socket": socket, "tenant": tenant, "token_file": token_file, "model_id": MODEL_ID,
           "chunk_tokens": CHUNK, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
           "timeout_s": 10.0, **extra}
    return json.dumps({"kv_connector": "KvtierConnector",
                       "kv_connector_module_path": "kvtier.client.vllm",
                       "kv_role": "kv_both", "kv_connector_extra_config": cfg})


def prompt_keys(model_dir: Path, token_ids: list[int], salt: str | None = None) -> list[bytes]:
    """The chunk keys the connector stores `token_ids` under (tensor parallel size 1)."""
    import torch

    from kvtier.client.gpu import KVLayout
    from kvtier.client.keys import chunk_keys

    cfg = json.loads((model_dir / "config.json").read_text())
    layout = KVLayout(cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"],
                      torch.float32, CHUNK)
    return chunk_keys(token_ids, layout.fingerprint(MODEL_ID), chunk_tokens=CHUNK,
                      salt=(b"cache_salt=" + salt.encode()) if salt else b"")


def reset_prefix_cache(llm: Any, timeout: float = 60.0) -> None:
    """Empty vLLM's own prefix cache, so that a prefix can only come from kvtier.

    vLLM refuses while finished requests still hold blocks -- the connector keeps them
    until their saves are done, and they are let go at the engine's next step: step it
    with a one-token request until the reset goes through."""
    import time

    from vllm import SamplingParams

    deadline = time.monotonic() + timeout
    while not llm.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise AssertionError("vLLM's prefix cache could not be reset: blocks still held")
        llm.generate([{"prompt_token_ids": [1]}], SamplingParams(max_tokens=1),
                     use_tqdm=False)
