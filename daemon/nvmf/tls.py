"""TLS 1.3 with an external PSK, sans-IO, over the system's OpenSSL (libssl.so.3).

NVMe/TCP's secure channel is TLS 1.3 authenticated by a pre-shared key alone (no
certificates; `kvtier.daemon.nvmf.psk` derives the key and its identity).  Python's `ssl`
module cannot offer an external PSK before 3.13, so this module binds the few OpenSSL
calls it needs through ctypes -- the library Python's own `ssl` is built on, the same
one SPDK's `ssl` socket layer uses, with the same session-callback mechanism
(`SSL_set_psk_use_session_callback` on the host, `..._find_session_callback` on the
target).

`TlsSession` touches no socket: ciphertext goes in with `receive_bytes` and comes out of
`take_output`, through OpenSSL memory BIOs; plaintext goes in with `write` (straight out
of the caller's buffer) and comes out with `read_into` (decrypted straight into the
caller's buffer).  The I/O layer around it (the host's queues, the test target) moves
bytes between it and a socket.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import numpy as np

SSL_ERROR_SSL, SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE = 1, 2, 3
SSL_ERROR_SYSCALL, SSL_ERROR_ZERO_RETURN = 5, 6
SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION = 123, 124
TLS1_3_VERSION = 0x0304
SUITE_IDS = {"TLS_AES_128_GCM_SHA256": b"\x13\x01", "TLS_AES_256_GCM_SHA384": b"\x13\x02"}
MAX_IDENTITY = 512

_p = ctypes.c_void_p
# int cb(SSL *, const EVP_MD *, const unsigned char **id, size_t *idlen, SSL_SESSION **)
_USE_SESSION = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.POINTER(_p),
                                ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_p))
# int cb(SSL *, const unsigned char *id, size_t idlen, SSL_SESSION **)
_FIND_SESSION = ctypes.CFUNCTYPE(ctypes.c_int, _p, _p, ctypes.c_size_t, ctypes.POINTER(_p))


class TlsError(Exception):
    """The TLS channel failed: a handshake refused (wrong key or identity), a record that
    does not authenticate, or the peer's alert; the message carries OpenSSL's reason."""


class TlsUnavailable(TlsError):
    """This machine's OpenSSL cannot do TLS 1.3 with an external PSK."""


@functools.cache
def _lib() -> Any:
    names = [ctypes.util.find_library("ssl"), "libssl.so.3"]
    for name in [n for n in names if n]:
        try:
            lib = ctypes.CDLL(name)
            lib.SSL_set_psk_use_session_callback  # noqa: B018 -- OpenSSL >= 1.1.1
        except (OSError, AttributeError):
            continue
        break
    else:
        raise TlsUnavailable("no libssl with TLS 1.3 external PSKs (OpenSSL >= 1.1.1) found")
    sig: dict[str, tuple[Any, list[Any]]] = {
        "TLS_method": (_p, []),
        "SSL_CTX_new": (_p, [_p]),
        "SSL_CTX_free": (None, [_p]),
        "SSL_CTX_ctrl": (ctypes.c_long, [_p, ctypes.c_int, ctypes.c_long, _p]),
        "SSL_CTX_set_ciphersuites": (ctypes.c_int, [_p, ctypes.c_char_p]),
        "SSL_CTX_set_num_tickets": (ctypes.c_int, [_p, ctypes.c_size_t]),
        "SSL_new": (_p, [_p]),
        "SSL_free": (None, [_p]),
        "SSL_set_connect_state": (None, [_p]),
        "SSL_set_accept_state": (None, [_p]),
        "SSL_set_bio": (None, [_p, _p, _p]),
        "SSL_set_psk_use_session_callback": (None, [_p, _USE_SESSION]),
        "SSL_set_psk_find_session_callback": (None, [_p, _FIND_SESSION]),
        "SSL_do_handshake": (ctypes.c_int, [_p]),
        "SSL_get_error": (ctypes.c_int, [_p, ctypes.c_int]),
        "SSL_read_ex": (ctypes.c_int, [_p, _p, ctypes.c_size_t,
                                       ctypes.POINTER(ctypes.c_size_t)]),
        "SSL_write_ex": (ctypes.c_int, [_p, _p, ctypes.c_size_t,
                                        ctypes.POINTER(ctypes.c_size_t)]),
        "SSL_CIPHER_find": (_p, [_p, ctypes.c_char_p]),
        "SSL_get_current_cipher": (_p, [_p]),
        "SSL_CIPHER_get_name": (ctypes.c_char_p, [_p]),
        "SSL_SESSION_new": (_p, []),
        "SSL_SESSION_free": (None, [_p]),
        "SSL_SESSION_set1_master_key": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_size_t]),
        "SSL_SESSION_set_cipher": (ctypes.c_int, [_p, _p]),
        "SSL_SESSION_set_protocol_version": (ctypes.c_int, [_p, ctypes.c_int]),
        "BIO_s_mem": (_p, []),
        "BIO_new": (_p, [_p]),
        "BIO_write": (ctypes.c_int, [_p, _p, ctypes.c_int]),
        "BIO_read": (ctypes.c_int, [_p, _p, ctypes.c_int]),
        "BIO_ctrl_pending": (ctypes.c_size_t, [_p]),
        "ERR_get_error": (ctypes.c_ulong, []),
        "ERR_clear_error": (None, []),
        "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _errors(lib: Any) -> str:
    out = []
    while (e := lib.ERR_get_error()) != 0:
        buf = ctypes.create_string_buffer(256)
        lib.ERR_error_string_n(e, buf, len(buf))
        out.append(buf.value.decode(errors="replace").split(":")[-1] or hex(e))
    return "; ".join(out)


def _address(buf: Any) -> tuple[int, int, Any]:
    """(address, length, keep-alive) of a contiguous buffer, read-only ones included."""
    a = np.frombuffer(buf, dtype=np.uint8)
    return a.ctypes.data, a.size, a


class TlsSession:
    """One TLS 1.3 connection authenticated by a PSK, sans-IO.

    `client=True` is the host: it offers `identity` with `key` under `suite`.  On the
    target (`client=False`), `keys` maps the identities it accepts to (key, suite); an
    unknown identity fails the handshake."""

    def __init__(self, *, client: bool, suite: str = "TLS_AES_128_GCM_SHA256",
                 identity: str = "", key: bytes = b"",
                 keys: dict[str, tuple[bytes, str]] | None = None) -> None:
        if suite not in SUITE_IDS:
            raise TlsError(f"cipher suite {suite}: NVMe/TCP uses "
                           f"{' or '.join(SUITE_IDS)}")
        lib = self._lib = _lib()
        self.client = client
        self.peer_identity = ""
        self._keys = dict(keys or {})
        self._ident = identity.encode()
        if client and not (self._ident and key):
            raise TlsError("a TLS client needs its PSK identity and key")
        if len(self._ident) > MAX_IDENTITY:
            raise TlsError(f"PSK identity of {len(self._ident)} bytes")
        self._key, self._suite = key, suite
        self._ctx = lib.SSL_CTX_new(lib.TLS_method())
        self._ssl: int | None = None
        if not self._ctx:
            raise TlsError(f"SSL_CTX_new failed: {_errors(lib)}")
        try:
            ok = (lib.SSL_CTX_ctrl(self._ctx, SSL_CTRL_SET_MIN_PROTO_VERSION, TLS1_3_VERSION,
                                   None) == 1
                  and lib.SSL_CTX_ctrl(self._ctx, SSL_CTRL_SET_MAX_PROTO_VERSION,
                                       TLS1_3_VERSION, None) == 1)
            suites = ":".join([suite] if client else SUITE_IDS).encode()
            if not ok or lib.SSL_CTX_set_ciphersuites(self._ctx, suites) != 1:
                raise TlsUnavailable(f"this OpenSSL cannot do TLS 1.3 with {suite}: "
                                     f"{_errors(lib)}")
            lib.SSL_CTX_set_num_tickets(self._ctx, 0)  # a PSK connection resumes nothing
            ssl = lib.SSL_new(self._ctx)
            if not ssl:
                raise TlsError(f"SSL_new failed: {_errors(lib)}")
            self._ssl = ssl
            self._in, self._out = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
            lib.SSL_set_bio(ssl, self._in, self._out)  # the SSL owns both BIOs now
            if client:
                self._cb: Any = _USE_SESSION(self._use_session)
                lib.SSL_set_psk_use_session_callback(ssl, self._cb)
                lib.SSL_set_connect_state(ssl)
            else:
                self._cb = _FIND_SESSION(self._find_session)
                lib.SSL_set_psk_find_session_callback(ssl, self._cb)
                lib.SSL_set_accept_state(ssl)
        except BaseException:
            self.close()
            raise
        self.established = False
        self._failure: str | None = None

    # -- the PSK, handed to OpenSSL as a session ----------------------------------------------

    def _session(self, key: bytes, suite: str) -> int:
        lib = self._lib
        cipher = lib.SSL_CIPHER_find(self._ssl, SUITE_IDS[suite])
        sess = lib.SSL_SESSION_new()
        if (not cipher or not sess or lib.SSL_SESSION_set1_master_key(sess, key, len(key)) != 1
                or lib.SSL_SESSION_set_cipher(sess, cipher) != 1
                or lib.SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION) != 1):
            if sess:
                lib.SSL_SESSION_free(sess)
            return 0
        return int(sess)

    def _use_session(self, ssl: int, md: int, idp: Any, idlen: Any, sessp: Any) -> int:
        try:
            sess = self._session(self._key, self._suite)
            if not sess:
                return 0
            self._ident_buf = ctypes.create_string_buffer(self._ident, len(self._ident))
            idp[0] = ctypes.cast(self._ident_buf, _p)
            idlen[0] = len(self._ident)
            sessp[0] = sess
            return 1
        except Exception:  # never unwind through OpenSSL
            return 0

    def _find_session(self, ssl: int, idp: int, idlen: int, sessp: Any) -> int:
        try:
            ident = ctypes.string_at(idp, idlen).decode(errors="replace")
            self.peer_identity = ident
            entry = self._keys.get(ident)
            if entry is None:
                self._failure = f"unknown PSK identity {ident!r}"
                sessp[0] = None
                return 1  # no session: the handshake fails for want of a key
            sess = self._session(*entry)
            sessp[0] = sess or None
            return 1 if sess else 0
        except Exception:
            return 0

    # -- bytes in and out -----------------------------------------------------------------------

    def receive_bytes(self, data: Any) -> None:
        """Ciphertext from the peer."""
        addr, n, keep = _address(data)
        while n:
            k = self._lib.BIO_write(self._in, addr, min(n, 1 << 30))
            if k <= 0:
                raise TlsError("OpenSSL refused incoming bytes")
            addr, n = addr + k, n - k
        del keep

    def pending_output(self) -> int:
        return int(self._lib.BIO_ctrl_pending(self._out))

    def take_output(self) -> bytearray:
        """Ciphertext for the peer (possibly empty)."""
        n = self.pending_output()
        out = bytearray(n)
        if n:
            addr = ctypes.addressof((ctypes.c_char * n).from_buffer(out))
            got = self._lib.BIO_read(self._out, addr, n)
            del out[max(got, 0):]
        return out

    def _fail(self, what: str, ret: int) -> None:
        lib = self._lib
        err = lib.SSL_get_error(self._ssl, ret)
        if err in (SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE):
            return
        why = _errors(lib) or {SSL_ERROR_ZERO_RETURN: "the peer closed the channel",
                               SSL_ERROR_SYSCALL: "the channel ended mid-record"}.get(
                                   err, f"SSL error {err}")
        if self._failure:
            why = f"{self._failure} ({why})"
        raise TlsError(f"TLS {what} failed: {why}")

    def handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is complete."""
        if self.established:
            return True
        self._lib.ERR_clear_error()
        ret = self._lib.SSL_do_handshake(self._ssl)
        if ret == 1:
            self.established = True
            return True
        self._fail("handshake", ret)
        return False

    @property
    def cipher(self) -> str:
        c = self._lib.SSL_get_current_cipher(self._ssl)
        return self._lib.SSL_CIPHER_get_name(c).decode() if c else ""

    def write(self, data: Any) -> None:
        """Encrypt `data` (any contiguous buffer, read straight from it) into records for
        the peer; they wait in `take_output`."""
        addr, n, keep = _address(data)
        done = ctypes.c_size_t()
        while n:
            self._lib.ERR_clear_error()
            ret = self._lib.SSL_write_ex(self._ssl, addr, n, ctypes.byref(done))
            if ret != 1:
                self._fail("write", 0)
                raise TlsError("TLS write could not proceed")
            addr, n = addr + done.value, n - done.value
        del keep

    def read_into(self, buf: Any) -> int:
        """Decrypt what has arrived into `buf` (a writable buffer); the byte count, 0 when
        a whole record has not arrived yet.  TlsError on a record that does not
        authenticate, an alert, or the peer's close."""
        mv = memoryview(buf)
        if mv.readonly:
            raise TypeError("read_into needs a writable buffer")
        addr, n, keep = _address(mv)
        got = ctypes.c_size_t()
        self._lib.ERR_clear_error()
        ret = self._lib.SSL_read_ex(self._ssl, addr, n, ctypes.byref(got))
        del keep
        if ret == 1:
            return int(got.value)
        self._fail("read", 0)
        return 0

    def close(self) -> None:
        lib = self._lib
        if self._ssl:
            lib.SSL_free(self._ssl)
            self._ssl = None
        if self._ctx:
            lib.SSL_CTX_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["TlsError", "TlsSession", "TlsUnavailable"]
