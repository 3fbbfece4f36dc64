"""NVMe/TCP TLS pre-shared keys: the interchange format, the identity and the derivations.

What the NVMe/TCP transport specification (1.0c, 3.6.1.3, TLS 1.3 with a PSK, identity
version 0) asks for, as SPDK's host and target implement it (`include/spdk_internal/
nvme_tcp.h`), so a key configured on an SPDK target opens the same channel here:

* The *configured PSK* is exchanged as text, `NVMeTLSkey-1:HH:BASE64:`, where BASE64
  encodes the 32 or 48 key bytes followed by their CRC-32 (IEEE, little-endian) and HH is
  the hash of the retained-PSK derivation: 00 none (the configured PSK is used as is),
  01 SHA-256, 02 SHA-384.  The key length picks the cipher suite: 32 bytes
  TLS_AES_128_GCM_SHA256, 48 bytes TLS_AES_256_GCM_SHA384.
* The *PSK identity* is `NVMe0R0S <hostnqn> <subnqn>`, S = 1 for SHA-256, 2 for SHA-384.
* The *retained PSK* = HKDF(configured, salt "", info = HkdfLabel(len, "tls13 HostNQN",
  hostnqn)) with HH's hash, unless HH is 00.
* The *TLS PSK* (what TLS 1.3 gets as its external PSK) = HKDF(retained, salt "", info =
  HkdfLabel(len, "tls13 nvme-tls-psk", identity)) with the suite's hash.

HkdfLabel is RFC 8446's layout: a 2-byte big-endian length (SPDK writes the *input* key's
length there, equal to the output's for the keys it accepts), a length-prefixed label,
a length-prefixed context.  HKDF is extract-then-expand; an empty salt is the hash's
zero block, as RFC 5869 says.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import struct
import zlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "NVMeTLSkey-1:"
HASH_NONE, HASH_SHA256, HASH_SHA384 = 0, 1, 2
SUITES = {32: "TLS_AES_128_GCM_SHA256", 48: "TLS_AES_256_GCM_SHA384"}


class PskError(ValueError):
    """A PSK that cannot be used: malformed, a bad checksum, a file others can read."""


@dataclass(frozen=True)
class ConfiguredPsk:
    key: bytes  # 32 or 48 bytes
    hash_id: int  # HASH_NONE, HASH_SHA256 or HASH_SHA384: the retained-PSK derivation

    def __repr__(self) -> str:  # never the key itself
        return f"ConfiguredPsk({len(self.key)} bytes, hash {self.hash_id:02d})"

    @property
    def suite(self) -> str:
        return SUITES[len(self.key)]

    def interchange(self) -> str:
        """The key as `NVMeTLSkey-1:HH:BASE64:` (what `parse` reads back)."""
        crc = struct.pack("<I", zlib.crc32(self.key))
        return f"{PREFIX}{self.hash_id:02d}:{base64.b64encode(self.key + crc).decode()}:"

    def identity(self, hostnqn: str, subnqn: str) -> str:
        return identity(hostnqn, subnqn, len(self.key))

    def tls_psk(self, hostnqn: str, subnqn: str) -> tuple[str, bytes]:
        """(identity, TLS PSK) for this host and subsystem."""
        ident = self.identity(hostnqn, subnqn)
        retained = retained_psk(self, hostnqn)
        return ident, tls_psk(retained, ident, len(self.key))


def _hash(n: int) -> hashes.HashAlgorithm:
    return hashes.SHA256() if n == 32 else hashes.SHA384()


def parse(text: str) -> ConfiguredPsk:
    """A configured PSK out of its interchange text; PskError saying what is wrong."""
    t = text.strip()
    if not t.startswith(PREFIX) or not t.endswith(":") or t.count(":") != 3:
        raise PskError("a PSK must be in the interchange format NVMeTLSkey-1:HH:BASE64: "
                       "(HH 00, 01 or 02)")
    hh, b64 = t[len(PREFIX):-1].split(":")
    if hh not in ("00", "01", "02"):
        raise PskError(f"PSK hash {hh!r}: must be 00 (none), 01 (SHA-256) or 02 (SHA-384)")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise PskError("the PSK's key is not valid base64") from None
    if len(raw) - 4 not in SUITES:
        raise PskError(f"the PSK's key is {max(len(raw) - 4, 0)} bytes; it must be 32 or 48")
    key, crc = raw[:-4], struct.unpack("<I", raw[-4:])[0]
    if zlib.crc32(key) != crc:
        raise PskError("the PSK's CRC-32 does not match its key (mistyped or truncated)")
    hash_id = int(hh)
    if hash_id != HASH_NONE and {HASH_SHA256: 32, HASH_SHA384: 48}[hash_id] != len(key):
        # SPDK sizes the key by HH when HH is not 00 (nvme_tcp_parse_interchange_psk).
        raise PskError(f"a PSK with hash {hh} must have a "
                       f"{ {HASH_SHA256: 32, HASH_SHA384: 48}[hash_id]}-byte key")
    return ConfiguredPsk(key, hash_id)


def read_file(path: str) -> ConfiguredPsk:
    """The PSK in `path`, a file only its owner may read (as SPDK's keyring_file wants)."""
    try:
        st = os.stat(path)
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError as e:
        raise PskError(f"PSK file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise PskError(f"PSK file {path}: not an ASCII interchange-format key") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PskError(f"PSK file {path} is accessible to group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 0600 it")
    try:
        return parse(text)
    except PskError as e:
        raise PskError(f"PSK file {path}: {e}") from None


def generate(length: int = 32, hash_id: int = HASH_SHA256) -> ConfiguredPsk:
    if length not in SUITES:
        raise PskError("a PSK is 32 or 48 bytes")
    return ConfiguredPsk(os.urandom(length), hash_id)


def identity(hostnqn: str, subnqn: str, key_len: int) -> str:
    return f"NVMe0R{1 if key_len == 32 else 2:02d} {hostnqn} {subnqn}"


def _label(out_len: int, label: str, context: bytes) -> bytes:
    lab = label.encode()
    if len(context) > 255:
        raise PskError(f"HKDF context of {len(context)} bytes (at most 255)")
    return struct.pack(">HB", out_len, len(lab)) + lab + bytes([len(context)]) + context


def _hkdf(key: bytes, info: bytes, n: int) -> bytes:
    return HKDF(algorithm=_hash(n), length=n, salt=None, info=info).derive(key)


def retained_psk(psk: ConfiguredPsk, hostnqn: str) -> bytes:
    if psk.hash_id == HASH_NONE:
        return psk.key
    n = 32 if psk.hash_id == HASH_SHA256 else 48
    return _hkdf(psk.key, _label(len(psk.key), "tls13 HostNQN", hostnqn.encode()), n)


def tls_psk(retained: bytes, ident: str, key_len: int) -> bytes:
    return _hkdf(retained, _label(len(retained), "tls13 nvme-tls-psk", ident.encode()),
                 key_len)


__all__ = ["ConfiguredPsk", "PskError", "generate", "identity", "parse", "read_file",
           "retained_psk", "tls_psk"]
