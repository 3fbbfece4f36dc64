"""The real server: vLLM's OpenAI-compatible API server with kvtier's connector, one
completion request over HTTP on 127.0.0.1, twice.  vLLM's own prefix cache is off, so the
second request's prefix can only come from kvtier: kvtierd's metrics show the MAPs that
carried it, and the tokens equal the first (recomputed) answer's."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from harness import TOKENS, Daemon
from vllm_support import BLOCK, CHUNK, VOCAB, make_model, prompt_keys, transfer_config

from kvtier.client.client import Client

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if body is not None else raw.decode()


def _maps(metrics_port: int) -> float:
    text = _http(f"http://127.0.0.1:{metrics_port}/metrics")
    m = re.search(r'^kvtier_ops_total\{op="map",status="ok"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_vllm_serve_resumes_from_kvtier(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model")
    mport = _free_port()
    daemon = Daemon(tmp_path / "kvtierd", tenants={"bob": {}},
                    extra=f'[metrics]\naddress = "127.0.0.1"\nport = {mport}\n')
    daemon.dir.mkdir()
    daemon.start()
    token_file = tmp_path / "bob.token"
    token_file.write_text(TOKENS["bob"])
    port = _free_port()
    log = open(tmp_path / "vllm.log", "wb")  # noqa: SIM115 - the server's lifetime
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "4096", "--block-size", str(BLOCK), "--no-enable-prefix-caching",
         "--kv-transfer-config", transfer_config(daemon.socket, "bob", str(token_file))],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
            try:
                _http(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up"
                time.sleep(0.5)
        ids = [(7 * i + 3) % (VOCAB - 1) + 1 for i in range(4 * CHUNK + 21)]
        body = {"model": str(model), "prompt": ids, "max_tokens": 8, "temperature": 0,
                "return_token_ids": True}
        first = _http(f"http://127.0.0.1:{port}/v1/completions", body)
        keys = prompt_keys(model, ids)
        with Client.connect(daemon.socket, "bob", TOKENS["bob"], arena_size=4 << 20) as c:
            until = time.monotonic() + 60
            while c.lookup(keys)[0] < len(keys):  # the save runs after the answer
                assert time.monotonic() < until, "turn 1 was never saved"
                time.sleep(0.05)
        maps_before = _maps(mport)
        second = _http(f"http://127.0.0.1:{port}/v1/completions", body)
        assert second["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert _maps(mport) > maps_before  # the prefix came from kvtier's DRAM tier
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        daemon.stop()
