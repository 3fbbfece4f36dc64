"""The README's way in: kvtierd on its embedded default, a demo client, sd_notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def test_embedded_default_with_demo_client_and_sd_notify(tmp_path: Path) -> None:
    notify = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify))
    listener.settimeout(60)
    env = dict(os.environ, KVTIER_STATE_DIR=str(tmp_path), KVTIER_METRICS_PORT="0",
               NOTIFY_SOCKET=str(notify))
    d = subprocess.Popen([str(BIN / "kvtierd")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert listener.recv(100) == b"READY=1"
        assert (tmp_path / "kvtier.sock").exists()
        token = tmp_path / "default.token"
        assert token.stat().st_mode & 0o777 == 0o600
        r = subprocess.run([str(BIN / "kvtier"), "--socket", str(tmp_path / "kvtier.sock"),
                            "demo", "--state-dir", str(tmp_path), "--prompt-tokens", "2048"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all bytes match" in r.stdout and "8/10 chunks" in r.stdout
        st = subprocess.run([str(BIN / "kvtier"), "--socket", str(tmp_path / "kvtier.sock"),
                             "status"], capture_output=True, text=True, timeout=60, env=env)
        assert "AES-256-GCM" in r.stdout  # the embedded default tenant encrypts
        # 8 chunks and the tenant's wrapped data key
        assert st.returncode == 0 and "9 entries" in st.stdout
        bn = subprocess.run([str(BIN / "kvtier"), "--socket", str(tmp_path / "kvtier.sock"),
                             "bench", "--state-dir", str(tmp_path), "--size", "1M",
                             "--seconds", "1", "--json"], capture_output=True, text=True,
                            timeout=120, env=env)
        assert bn.returncode == 0, bn.stderr
        fig = json.loads(bn.stdout.strip().splitlines()[-1])
        assert fig["put_bytes_per_s"] > 0 and fig["get_bytes_per_s"] > 0
        assert 0 < fig["get_4k_p50_us"] <= fig["get_4k_p99_us"]
    finally:
        d.send_signal(signal.SIGTERM)
        _, err = d.communicate(timeout=60)
    assert d.returncode == 0, err
    assert listener.recv(100) == b"STOPPING=1"
    assert not (tmp_path / "kvtier.sock").exists()
    assert "kvtierd stopped" in err
