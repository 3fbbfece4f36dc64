"""A KEK provider on a PKCS#11 token (an HSM; SoftHSM2 in tests): extra `hsm`.

Same interface as `kvtier.client.crypto.Keyring` (`current`, `rotate`, `wrap`, `unwrap`),
so `FrameCipher` takes either.  The tenant's KEKs are AES-256 keys generated *inside* the
token (label `kvtier-kek-<tenant>-<generation>`), sensitive and not extractable: wrapping
and unwrapping a data key is an AES-GCM operation the token performs, and the KEK's bytes
never exist outside it.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import NoSuchKey, PKCS11Error
from pkcs11.mechanisms import GCMParams

from kvtier.client.crypto import NONCE, DecryptError
from kvtier.client.errors import KvtierError


class Pkcs11Keyring:
    def __init__(self, module: str, token_label: str, pin: str) -> None:
        try:
            self._lib = pkcs11.lib(module)
            token = self._lib.get_token(token_label=token_label)
            self._session: Any = token.open(user_pin=pin, rw=True)
        except (PKCS11Error, RuntimeError, OSError) as e:
            raise KvtierError(f"PKCS#11 {module} token {token_label!r}: "
                              f"{type(e).__name__} {e}".rstrip()) from e
        self._lock = threading.Lock()
        self.label = token_label

    def close(self) -> None:
        self._session.close()

    def _key(self, tenant: str, gen: int) -> Any:
        return self._session.get_key(label=f"kvtier-kek-{tenant}-{gen}", key_type=KeyType.AES,
                                     object_class=ObjectClass.SECRET_KEY)

    def _generations(self, tenant: str) -> list[int]:
        prefix = f"kvtier-kek-{tenant}-"
        gens = []
        for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = obj.label or ""
            if label.startswith(prefix) and label[len(prefix):].isdigit():
                gens.append(int(label[len(prefix):]))
        return sorted(gens)

    def _generate(self, tenant: str, gen: int) -> None:
        self._session.generate_key(KeyType.AES, 256, label=f"kvtier-kek-{tenant}-{gen}",
                                   store=True, template={Attribute.SENSITIVE: True,
                                                         Attribute.EXTRACTABLE: False})

    def current(self, tenant: str) -> int:
        with self._lock:
            gens = self._generations(tenant)
            if not gens:
                self._generate(tenant, 1)
                return 1
            return gens[-1]

    def rotate(self, tenant: str) -> int:
        with self._lock:
            gen = (self._generations(tenant) or [0])[-1] + 1
            self._generate(tenant, gen)
            return gen

    def wrap(self, tenant: str, dk: bytes, aad: bytes) -> bytes:
        gen = self.current(tenant)
        nonce = os.urandom(NONCE)
        with self._lock:
            ct = self._key(tenant, gen).encrypt(dk, mechanism=Mechanism.AES_GCM,
                                                mechanism_param=GCMParams(nonce, aad, 128))
        return struct.pack("<I", gen) + nonce + bytes(ct)

    def unwrap(self, tenant: str, blob: bytes, aad: bytes) -> bytes:
        (gen,) = struct.unpack_from("<I", blob)
        nonce = blob[4:4 + NONCE]
        with self._lock:
            try:
                key = self._key(tenant, gen)
            except NoSuchKey:
                raise DecryptError(f"PKCS#11 token {self.label!r}: no KEK generation {gen} "
                                   f"for tenant {tenant!r}") from None
            try:
                return bytes(key.decrypt(blob[4 + NONCE:], mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad, 128)))
            except PKCS11Error:
                raise DecryptError(f"wrapped data key of tenant {tenant!r} failed to unwrap "
                                   f"in token {self.label!r} (tampered, or not this "
                                   f"tenant's)") from None


__all__ = ["Pkcs11Keyring"]
