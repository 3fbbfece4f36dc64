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

A key *file* is read as SPDK reads it, so that what SPDK would refuse is refused here,
when kvtierd's config is validated, rather than by the target mid-provisioning.  SPDK's
`keyring_file` module (`module/keyring/file/keyring.c`) wants an absolute path (checked
where the path goes to SPDK: `kvtier.daemon.spdk`), a file with no permission bits for
group or others, owned by the user reading it, of at most 200 bytes, and hands the whole
content to `nvme_tcp_parse_interchange_psk`, which requires the last character to be
the closing ':' -- so a key file ending with a newline (what `echo` or `nvme
gen-tls-key > f` write) is "Invalid format of PSK interchange".  `write_file` writes
exactly the interchange text.
"""

from __future__ import annotations

import base64
import binascii
import os
import shlex
import stat
import struct
import zlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "NVMeTLSkey-1:"
HASH_NONE, HASH_SHA256, HASH_SHA384 = 0, 1, 2
SUITES = {32: "TLS_AES_128_GCM_SHA256", 48: "TLS_AES_256_GCM_SHA384"}
# SPDK_TLS_PSK_MAX_LEN: the most SPDK reads from a key file (keyring_file_get_key refuses a
# larger file with ENOBUFS) and the longest interchange text its parser takes (one less).
MAX_FILE = 200


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
    """A configured PSK out of its interchange text, exactly as SPDK takes it
    (`nvme_tcp_parse_interchange_psk`): nothing before `NVMeTLSkey-1:`, nothing after the
    closing colon -- no newline, no whitespace.  PskError says what is wrong."""
    if text != text.strip():
        raise PskError("the key has a newline or whitespace around it; SPDK takes the text as "
                       "it is and refuses that (\"Invalid format of PSK interchange\"): "
                       "nothing may precede NVMeTLSkey-1: or follow the closing ':'")
    if "\0" in text:
        raise PskError("the key holds a NUL byte (SPDK would read only what precedes it)")
    t = text
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


def fix_hint(path: str, text: str = "\n") -> str:
    """A shell command that rewrites key file `path` (holding `text`) without what surrounds
    its key, in place, so that its mode and owner stay: the command substitution runs
    before the redirection truncates the file, and drops trailing newlines; `tr` drops
    whitespace anywhere (a valid key has none)."""
    q = shlex.quote(path)
    if text.lstrip() == text and text.rstrip("\n").rstrip() == text.rstrip("\n"):
        return f"printf %s \"$(cat {q})\" > {q}"
    return f"printf %s \"$(tr -d '[:space:]' < {q})\" > {q}"


def check_file_access(path: str, st: os.stat_result) -> None:
    """SPDK's keyring_file rule for a key file (`keyring_file_check_path`): no permission
    bits for group or others, owned by the user that reads it, at most SPDK's
    SPDK_TLS_PSK_MAX_LEN bytes."""
    if not stat.S_ISREG(st.st_mode):
        raise PskError(f"PSK file {path} is not a regular file")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PskError(f"PSK file {path} is accessible to group or others "
                       f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 0600 it")
    if st.st_uid != os.getuid():
        raise PskError(f"PSK file {path} is owned by uid {st.st_uid}, not by uid "
                       f"{os.getuid()} that reads it (SPDK's keyring refuses such a file "
                       f"too); chown it to the user that reads it")
    if st.st_size > MAX_FILE:
        raise PskError(f"PSK file {path} is {st.st_size} bytes; SPDK reads key files of at "
                       f"most {MAX_FILE} bytes, and an interchange-format key is under 100")


def read_file(path: str) -> ConfiguredPsk:
    """The PSK in `path`, read exactly as SPDK's keyring_file module and its interchange
    parser read it, so that a file SPDK would refuse is refused here first (at config
    validation) with what to do about it: the file's whole content is the key, with no
    trailing newline; mode 0600 (nothing for group or others); owned by the reader."""
    try:
        check_file_access(path, os.stat(path))  # before reading: the mode says more than EACCES
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise PskError(f"PSK file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise PskError(f"PSK file {path}: not an ASCII interchange-format key") from None
    if text.strip() != text and text.strip():
        head, tail = text[:len(text) - len(text.lstrip())], text[len(text.rstrip()):]
        extra = head + tail
        what = ("a newline" if extra == "\n" else "newlines" if not extra.strip("\n")
                else f"whitespace ({extra!r})")
        where = "after" if not head else "before" if not tail else "around"
        raise PskError(f"PSK file {path} has {what} {where} the key; SPDK's keyring reads "
                       f"the file as it is and refuses it (\"Invalid format of PSK "
                       f"interchange\"): the file must hold exactly NVMeTLSkey-1:HH:BASE64: "
                       f"-- rewrite it with `{fix_hint(path, text)}` (echo adds a newline; "
                       f"`kvtier pool gen-psk` writes none)")
    try:
        return parse(text)
    except PskError as e:
        raise PskError(f"PSK file {path}: {e}") from None


def write_file(path: str, key: ConfiguredPsk) -> None:
    """Create key file `path` holding exactly what SPDK reads: the interchange text with
    no newline, mode 0600.  An existing file is never overwritten (FileExistsError)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask left
        data = key.interchange().encode("ascii")
        if os.write(fd, data) != len(data):
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


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


__all__ = ["ConfiguredPsk", "PskError", "check_file_access", "fix_hint", "generate",
           "identity", "parse", "read_file", "retained_psk", "tls_psk", "write_file"]
