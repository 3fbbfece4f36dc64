"""KEKs in a PKCS#11 token (SoftHSM2): the same code a real HSM uses."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import TOKENS, Daemon

from kvtier.client.client import Client
from kvtier.client.crypto import DecryptError, FrameCipher
from kvtier.client.errors import KvtierError

pytest.importorskip("pkcs11")
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
pytestmark = pytest.mark.skipif(
    not os.path.exists(MODULE) or shutil.which("softhsm2-util") is None,
    reason="SoftHSM2 (Debian softhsm2) is not installed")


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh SoftHSM2 token, labelled `kvtier`, PIN 1234 (one per test module: the
    library reads its configuration once per process)."""
    d = tmp_path_factory.mktemp("softhsm")
    (d / "tokens").mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {d / 'tokens'}\nobjectstore.backend = file\n"
                    "log.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "kvtier",
                    "--pin", "1234", "--so-pin", "5678"], check=True, capture_output=True)
    yield "kvtier"
    if old is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = old


def test_keys_wrapped_in_the_token_protect_frames(token: str, tmp_path: Path) -> None:
    from pkcs11 import Attribute

    from kvtier.client.hsm import Pkcs11Keyring

    kr = Pkcs11Keyring(MODULE, token, "1234")
    d = Daemon(tmp_path, tenants={"alice": {"encryption": "on"}, "bob": {}}).start()
    try:
        with Client.connect(d.socket, "alice", TOKENS["alice"]) as c:
            cipher = FrameCipher(c, kr, "alice")
            cipher.put("s", b"k" * 16, [b"in the clear" * 1000])
            assert kr.current("alice") == 1
            assert kr.rotate("alice") == 2  # a new generation, generated in the token
            cipher.put("s2", b"j" * 16, [b"second" * 10])
            cipher.forget()
            assert cipher.get("s", b"k" * 16) == [b"in the clear" * 1000]
            assert cipher.get("s2", b"j" * 16) == [b"second" * 10]
            stored = c.get(b"k" * 16)
            assert b"in the clear" not in stored
            cipher.close()
        key = kr._key("alice", 1)
        assert key[Attribute.SENSITIVE] and not key[Attribute.EXTRACTABLE]
        # A wrapped key moved to another tenant does not unwrap.
        with pytest.raises(DecryptError):
            kr.unwrap("bob", kr.wrap("alice", b"x" * 32, b"aad"), b"aad")
        with pytest.raises(DecryptError):
            kr.unwrap("alice", kr.wrap("alice", b"x" * 32, b"aad"), b"other aad")
    finally:
        d.stop()
        kr.close()


def test_a_wrong_pin_is_a_clear_error(token: str) -> None:
    from kvtier.client.hsm import Pkcs11Keyring

    with pytest.raises(KvtierError, match="PKCS#11"):
        Pkcs11Keyring(MODULE, token, "0000")
