"""kvtier.client: the public side, imported by inference processes.

    from kvtier.client import Client, KVLayout, KVSaver, KVLoader, resume, finish_resume

Everything here is re-exported from the modules that implement it; the torch-dependent
names (the GPU data path: layouts, savers, loaders, paged caches) are imported on first use,
so `from kvtier.client import Client` works without torch.  The vLLM connector is
`kvtier.client.vllm.KvtierConnector` (it imports vLLM; docs/VLLM.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from kvtier.client.client import Client, PendingMap
from kvtier.client.crypto import DecryptError, FrameCipher, Keyring
from kvtier.client.errors import (
    BufferTooSmallError,
    CorruptDataError,
    DaemonIOError,
    DeadlineError,
    DisconnectedError,
    HandshakeError,
    InvalidRequestError,
    KvtierError,
    NoSpaceError,
    NotFoundError,
    PermissionDeniedError,
    ShuttingDownError,
    TimeoutError_,
    ValueTooLargeError,
)
from kvtier.client.keys import DEFAULT_CHUNK_TOKENS, ChunkChain, chunk_keys, model_fingerprint
from kvtier.client.protocol import Tier

_LAZY = {  # name -> module (needs torch)
    **dict.fromkeys(("KVLayout", "KVLoader", "KVSaver", "LoadReport", "SaveReport",
                     "ResumeResult", "ContiguousDestination", "CacheSource", "Destination",
                     "Source", "resume", "finish_resume", "build_cache", "register_arena",
                     "register_dram"), "kvtier.client.gpu"),
    **dict.fromkeys(("PagedKV", "PagedDestination", "PagedSource", "LayoutError"),
                    "kvtier.client.paged"),
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'kvtier.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CHUNK_TOKENS", "BufferTooSmallError", "ChunkChain", "Client", "CorruptDataError",
    "DaemonIOError", "DeadlineError", "DecryptError", "DisconnectedError", "FrameCipher",
    "HandshakeError", "InvalidRequestError", "Keyring", "KvtierError", "NoSpaceError",
    "NotFoundError", "PendingMap", "PermissionDeniedError", "ShuttingDownError", "Tier",
    "TimeoutError_", "ValueTooLargeError", "chunk_keys", "model_fingerprint", *_LAZY,
]
