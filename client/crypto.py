"""Client-side encryption of KV frames: AES-256-GCM, data keys wrapped by a tenant KEK.

Nothing leaves the inference process in the clear: every frame is sealed here before its
PUT, and the daemon, its DRAM tier, its pools and the admin tree only ever hold
ciphertext and *wrapped* data keys.

* **Keys.**  A tenant's key-encryption keys (KEKs, by generation) live in a KMS; the
  provider here is `Keyring`, a local 0600 JSON file created on first use (the embedded
  default).  A data key (DK) is 32 random bytes, wrapped with AES-256-GCM under the
  tenant's current KEK and stored in kvtierd as an ordinary value: scope `tenant` (one DK
  for all the tenant's sessions, in the reserved session `~keys`) or `session` (one DK per
  session, stored *in* that session).  `Keyring.rotate` starts a new KEK generation: new
  DKs are wrapped with it, old wrapped DKs stay readable.
* **Frames.**  A sealed frame is `nonce (12) | ciphertext | tag (16)`.  Nonces are 96
  random bits from the OS for every frame (never a counter that a restart could reset);
  a DK seals far fewer than 2^32 frames, where random nonces stay safe.  The AAD binds
  the format version, tenant, the DK's id, the value's key and the frame's index, so a
  frame edited, swapped with another frame, or moved under another key fails to open.
* **Crypto-erase.**  Purging a session (session scope) or a tenant deletes the wrapped
  DK together with the data in one durable purge record: from then on nothing can decrypt
  what may still sit in freed space, DRAM or page cache.

`FrameCipher.open_into` decrypts into caller memory (e.g. a pinned arena slot);
`cryptography`'s AESGCM releases the GIL on large buffers, so `open_many` runs frames in
parallel threads.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvtier.client.client import Client
from kvtier.client.errors import KvtierError, NotFoundError
from kvtier.client.protocol import KEYS_SESSION

FORMAT_VERSION = 1
NONCE, TAG = 12, 16
OVERHEAD = NONCE + TAG


def frame_aad(tenant: str, kid: bytes, key: bytes, index: int,
              version: int = FORMAT_VERSION) -> bytes:
    """The AAD a frame is sealed under: format version, frame index, DK id, value key,
    tenant (docs/SECURITY.md)."""
    return struct.pack("<HI", version, index) + kid + bytes(key) + tenant.encode()


class DecryptError(KvtierError):
    """A frame or a wrapped key failed authentication: tampered, swapped, moved, or its
    key is gone (crypto-erased)."""


class KeyProvider(Protocol):
    """Where a tenant's KEKs live: `Keyring` (a local file) or `hsm.Pkcs11Keyring`."""

    def current(self, tenant: str) -> int: ...

    def rotate(self, tenant: str) -> int: ...

    def wrap(self, tenant: str, dk: bytes, aad: bytes) -> bytes: ...

    def unwrap(self, tenant: str, blob: bytes, aad: bytes) -> bytes: ...


class Keyring:
    """The local KMS provider: per-tenant KEK generations in a 0600 JSON file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": 1, "keks": {}}, f)
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise KvtierError(f"keyring {path}: mode {oct(st.st_mode & 0o777)} lets others "
                              f"read it; chmod 600")
        with open(path) as f:
            self._data: dict[str, Any] = json.load(f)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def current(self, tenant: str) -> int:
        with self._lock:
            gens = self._data["keks"].setdefault(tenant, {})
            if not gens:
                gens["1"] = base64.b64encode(secrets.token_bytes(32)).decode()
                self._save()
            return max(int(g) for g in gens)

    def rotate(self, tenant: str) -> int:
        with self._lock:
            gens = self._data["keks"].setdefault(tenant, {})
            gen = max((int(g) for g in gens), default=0) + 1
            gens[str(gen)] = base64.b64encode(secrets.token_bytes(32)).decode()
            self._save()
            return gen

    def _kek(self, tenant: str, gen: int) -> AESGCM:
        try:
            return AESGCM(base64.b64decode(self._data["keks"][tenant][str(gen)]))
        except KeyError:
            raise DecryptError(f"keyring {self.path}: no KEK generation {gen} for tenant "
                               f"{tenant!r}") from None

    def wrap(self, tenant: str, dk: bytes, aad: bytes) -> bytes:
        gen = self.current(tenant)
        nonce = os.urandom(NONCE)
        return struct.pack("<I", gen) + nonce + self._kek(tenant, gen).encrypt(nonce, dk, aad)

    def unwrap(self, tenant: str, blob: bytes, aad: bytes) -> bytes:
        (gen,) = struct.unpack_from("<I", blob)
        try:
            return self._kek(tenant, gen).decrypt(blob[4:4 + NONCE], blob[4 + NONCE:], aad)
        except InvalidTag:
            raise DecryptError(f"wrapped data key of tenant {tenant!r} failed to unwrap "
                               f"(tampered, or not this tenant's)") from None


WRAPPED_KEY_MAX = 4096  # bytes: a data key as any keyring wraps it (AES-GCM, PKCS#11, KMS)


class FrameCipher:
    """Seals and opens one tenant's frames; data keys come from kvtierd (wrapped)."""

    def __init__(self, client: Client, keyring: KeyProvider, tenant: str, *,
                 scope: str | None = None, threads: int = 0) -> None:
        """`scope`: data key per "tenant" or per "session"; default: the tenant's policy."""
        scope = scope or client.key_scope
        if scope not in ("tenant", "session"):
            raise ValueError(f'scope must be "tenant" or "session", got {scope!r}')
        self.client, self.keyring, self.tenant, self.scope = client, keyring, tenant, scope
        self._keys: dict[str, tuple[bytes, AESGCM]] = {}
        self._raw: dict[bytes, bytes] = {}  # key id -> DK, for GPU opening (gcm_gpu)
        self.threads = threads or os.cpu_count() or 4
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kvtier-crypt")

    def close(self) -> None:
        self._pool.shutdown()

    # -- data keys -------------------------------------------------------------------------------

    def _dk_where(self, session: str) -> tuple[str, bytes]:
        scope_id = session if self.scope == "session" else ""
        kid = hashlib.blake2b(b"kvtier-dk\0" + self.tenant.encode() + b"\0" +
                              scope_id.encode(), digest_size=16).digest()
        return (session if self.scope == "session" else KEYS_SESSION), kid

    def data_key(self, session: str, *, create: bool) -> tuple[bytes, AESGCM]:
        """(key id, cipher) of the DK that covers `session`; created and stored (wrapped)
        on first use when `create`.  DecryptError if it is gone (crypto-erased)."""
        where, kid = self._dk_where(session)
        cached = self._keys.get(where)
        if cached is not None:
            return cached
        aad = b"kvtier-dk-v1\0" + self.tenant.encode() + b"\0" + kid
        try:
            # a wrapped 32-byte key: a small read, not the arena quarter a GET of an
            # unknown size asks for (a loader holding most of the arena left no room)
            blob = self.client.get(kid, size=WRAPPED_KEY_MAX)
            dk = self.keyring.unwrap(self.tenant, blob, aad)
        except NotFoundError:
            if not create:
                raise DecryptError(f"tenant {self.tenant!r}: the data key for "
                                   f"{where!r} is gone (purged: crypto-erased)") from None
            dk = secrets.token_bytes(32)
            self.client.put(where, kid, [self.keyring.wrap(self.tenant, dk, aad)])
        entry = (kid, AESGCM(dk))
        self._keys[where] = entry
        self._raw[kid] = dk
        return entry

    def raw_data_key(self, session: str) -> tuple[bytes, bytes]:
        """(key id, the DK itself) for `session`: what a GPU opener (kvtier.client.gcm_gpu)
        expands into round keys.  DecryptError if it is gone (crypto-erased)."""
        kid, _ = self.data_key(session, create=False)
        return kid, self._raw[kid]

    def forget(self) -> None:
        """Drop cached data keys (after a purge, or to re-read them from kvtierd)."""
        self._keys.clear()
        self._raw.clear()

    # -- frames ----------------------------------------------------------------------------------

    def _aad(self, kid: bytes, key: bytes, index: int) -> bytes:
        return frame_aad(self.tenant, kid, key, index)

    def seal(self, session: str, key: bytes, frames: Sequence[Any]) -> list[bytes]:
        kid, aes = self.data_key(session, create=True)

        def one(i: int) -> bytes:
            nonce = os.urandom(NONCE)
            return nonce + aes.encrypt(nonce, memoryview(frames[i]).cast("B"),
                                       self._aad(kid, key, i))
        return list(self._pool.map(one, range(len(frames))))

    def open_many(self, session: str, key: bytes, frames: Sequence[Any],
                  first_index: int = 0) -> list[bytes]:
        """Plaintext of sealed frames (frame `first_index + j` of the value), in parallel."""
        kid, aes = self.data_key(session, create=False)

        def one(j: int) -> bytes:
            out = bytearray(max(0, memoryview(frames[j]).nbytes - OVERHEAD))
            self._open_one(aes, kid, key, first_index + j, frames[j], memoryview(out))
            return bytes(out)
        return list(self._pool.map(one, range(len(frames))))

    def seal_into(self, session: str, key: bytes, frames: Sequence[Any],
                  out: memoryview) -> list[int]:
        """Seal `frames` back to back into `out` (e.g. an arena slot, for a PUT with no
        further copy); returns the sealed frame lengths."""
        kid, aes = self.data_key(session, create=True)
        views = [memoryview(f).cast("B") for f in frames]
        lengths = [v.nbytes + OVERHEAD for v in views]
        if sum(lengths) > out.nbytes:
            raise ValueError(f"{sum(lengths)} sealed bytes do not fit in {out.nbytes}")
        starts = [sum(lengths[:i]) for i in range(len(views))]

        def one(i: int) -> None:
            o = out[starts[i]:starts[i] + lengths[i]]
            nonce = os.urandom(NONCE)
            o[:NONCE] = nonce
            aes.encrypt_into(nonce, views[i], self._aad(kid, key, i), o[NONCE:])
        list(self._pool.map(one, range(len(views))))
        return lengths

    def _open_one(self, aes: AESGCM, kid: bytes, key: bytes, index: int, frame: Any,
                  out: memoryview) -> None:
        f = memoryview(frame).cast("B")
        try:
            aes.decrypt_into(f[:NONCE], f[NONCE:], self._aad(kid, key, index), out)
        except InvalidTag:
            raise DecryptError(f"tenant {self.tenant!r} key {bytes(key).hex()} frame {index}: "
                               f"authentication failed (tampered, swapped with another frame, "
                               f"or moved from another key)") from None

    def open_into(self, session: str, key: bytes, frames: Sequence[Any],
                  outs: Sequence[memoryview], first_index: int = 0) -> None:
        """Decrypt sealed frames straight into `outs` (e.g. pinned memory bound for a GPU),
        in parallel threads."""
        kid, aes = self.data_key(session, create=False)
        list(self._pool.map(lambda j: self._open_one(aes, kid, key, first_index + j,
                                                     frames[j], outs[j]), range(len(frames))))

    def submit_open(self, session: str, key: bytes, frames: Sequence[Any],
                    outs: Sequence[memoryview], first_index: int = 0) -> Future[None]:
        """`open_into` as one background task (frames in turn): for loaders that keep
        many values decrypting at once, one per core."""
        kid, aes = self.data_key(session, create=False)

        def run() -> None:
            for j, frame in enumerate(frames):
                self._open_one(aes, kid, key, first_index + j, frame, outs[j])
        return self._pool.submit(run)

    # -- whole values through the client ---------------------------------------------------------

    def put(self, session: str, key: bytes, frames: Sequence[Any], *, ttl_s: int = 0) -> None:
        self.client.put(session, key, self.seal(session, key, frames), ttl_s=ttl_s)

    def get(self, session: str, key: bytes) -> list[bytes]:
        """The value's plaintext frames (decrypted straight out of the arena slot)."""
        with self.client.get_slot(key) as (view, lengths):
            frames, pos = [], 0
            for n in lengths:
                frames.append(view[pos:pos + n])
                pos += n
            return self.open_many(session, key, frames)


__all__ = ["OVERHEAD", "DecryptError", "FrameCipher", "KeyProvider", "Keyring", "frame_aad"]
