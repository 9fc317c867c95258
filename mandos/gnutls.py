"""ctypes binding to libgnutls: the few TLS calls Mandos makes, for both roles.

Roles are reversed in Mandos.  The machine that boots (the Mandos *client*)
opens the TCP connection but is the TLS **server**: it presents an RFC 7250
raw public key.  The Mandos *server* is the TLS **client**: it presents
nothing and identifies its peer by the SHA-256 of the peer's DER
SubjectPublicKeyInfo (the key ID).

The library is loaded on first use, not at import.  Every GnuTLS return code
is checked; failures raise :class:`GnuTLSError` carrying GnuTLS's own message
and the name of the failing function.  This module decides no policy: keys,
priorities, timeouts and log levels are chosen by its callers.

Thread-safety: global initialisation happens once under a lock; a
:class:`Session` must be used by one thread at a time; credentials may be
shared by sessions running in several threads.
"""

from __future__ import annotations

# Only C modules besides ctypes: the client loads this on the boot path,
# where the Python wrappers socket, threading and enum cost milliseconds.
import _socket
import _thread
import ctypes
import os
import select
import struct
import time
from mandos import lazylog

# typing.TYPE_CHECKING without importing typing; see mandos/openpgp.py.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

__all__ = [
    "DEFAULT_PRIORITY", "MINIMUM_VERSION", "SHUT_RDWR", "SHUT_WR", "Role",
    "GnuTLSError", "Aborted", "CertificateCredentials",
    "RawPublicKeyCredentials", "Session", "check_version", "library_version",
    "key_id_from_spki_der", "enable_debug_logging", "disable_debug_logging",
]

log = lazylog.get_logger("mandos.gnutls")

DEFAULT_PRIORITY = ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL"
                    ":+VERS-TLS1.3:%PROFILE_ULTRA")
# First GnuTLS release with RFC 7250 raw public keys (GNUTLS_ENABLE_RAWPK).
MINIMUM_VERSION = "3.6.6"
_SONAME = "libgnutls.so.30"

# Values from <gnutls/gnutls.h> (GnuTLS 3.7.9).
E_SUCCESS = 0
E_LARGE_PACKET = -7
E_UNSUPPORTED_VERSION_PACKET = -8
E_UNEXPECTED_PACKET_LENGTH = -9
E_FATAL_ALERT_RECEIVED = -12
E_UNEXPECTED_PACKET = -15
E_WARNING_ALERT_RECEIVED = -16
E_DECRYPTION_FAILED = -24
E_AGAIN = -28
E_INSUFFICIENT_CREDENTIALS = -32
E_BASE64_DECODING_ERROR = -34
E_REHANDSHAKE = -37
E_NO_CERTIFICATE_FOUND = -49
E_INVALID_REQUEST = -50
E_INTERRUPTED = -52
E_PUSH_ERROR = -53
E_PULL_ERROR = -54
E_CERTIFICATE_KEY_MISMATCH = -60
E_UNSUPPORTED_CERTIFICATE_TYPE = -61
E_FILE_ERROR = -64
E_PREMATURE_TERMINATION = -110
E_TIMEDOUT = -319

SHUT_RDWR = 0  # send close_notify and wait for the peer's
SHUT_WR = 1  # send close_notify only

_GNUTLS_SERVER = 1
_GNUTLS_CLIENT = 1 << 1
_GNUTLS_NO_SIGNAL = 1 << 6
_GNUTLS_NO_TICKETS = 1 << 10
_GNUTLS_ENABLE_RAWPK = 1 << 18
_GNUTLS_CRD_CERTIFICATE = 1
_GNUTLS_CERT_IGNORE = 0
_GNUTLS_X509_FMT_PEM = 1
_GNUTLS_CTYPE_PEERS = 3
_GNUTLS_CRT_RAWPK = 3
# The key usage the original client declares for its TLS key.
_KEY_USAGE = 128 | 32  # GNUTLS_KEY_DIGITAL_SIGNATURE | KEY_ENCIPHERMENT
_RECORD_SIZE = 16384  # largest TLS plaintext record
# How often a blocked call returns to Python to check should_abort() and its
# deadline (see Session.set_transport).
_WAKE_INTERVAL = 0.2
_WAKE_OPTIONS = (_socket.SO_RCVTIMEO, _socket.SO_SNDTIMEO)
_TIMEVAL = "@ll"  # struct timeval on Linux: tv_sec, tv_usec


class Role:
    """TLS roles; each value is the gnutls_init() role flag."""

    SERVER = _GNUTLS_SERVER  # the Mandos client: presents its raw public key
    CLIENT = _GNUTLS_CLIENT  # the Mandos server: presents nothing


class GnuTLSError(Exception):
    """A GnuTLS call failed.

    ``code`` is the GnuTLS error code (negative), or 0 when the failure was
    found by this module rather than reported by the library; ``function``
    names the failing GnuTLS function when there is one.
    """

    def __init__(self, code: int, message: str,
                 function: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.function = function


class Aborted(GnuTLSError):
    """A blocked operation was abandoned because should_abort() said so."""


class _Datum(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_uint)]


_LOG_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p)
_FREE_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p)

_vp = ctypes.c_void_p
_int = ctypes.c_int
_uint = ctypes.c_uint
_str = ctypes.c_char_p
_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "gnutls_check_version": (_str, [_str]),
    "gnutls_global_init": (_int, []),
    "gnutls_strerror": (_str, [_int]),
    "gnutls_strerror_name": (_str, [_int]),
    "gnutls_global_set_log_function": (None, [_LOG_FUNC]),
    "gnutls_global_set_log_level": (None, [_int]),
    "gnutls_certificate_allocate_credentials": (_int, [ctypes.POINTER(_vp)]),
    "gnutls_certificate_free_credentials": (None, [_vp]),
    "gnutls_certificate_set_rawpk_key_mem": (_int, [
        _vp, ctypes.POINTER(_Datum), ctypes.POINTER(_Datum), _int, _str,
        _uint, _vp, _uint, _uint]),
    "gnutls_certificate_set_rawpk_key_file": (_int, [
        _vp, _str, _str, _int, _str, _uint, _vp, _uint, _uint, _uint]),
    "gnutls_certificate_set_dh_params": (None, [_vp, _vp]),
    "gnutls_dh_params_init": (_int, [ctypes.POINTER(_vp)]),
    "gnutls_dh_params_deinit": (None, [_vp]),
    "gnutls_dh_params_import_pkcs3":
        (_int, [_vp, ctypes.POINTER(_Datum), _int]),
    "gnutls_dh_params_generate2": (_int, [_vp, _uint]),
    "gnutls_init": (_int, [ctypes.POINTER(_vp), _uint]),
    "gnutls_deinit": (None, [_vp]),
    "gnutls_priority_set_direct": (_int, [_vp, _vp, ctypes.POINTER(_vp)]),
    "gnutls_credentials_set": (_int, [_vp, _int, _vp]),
    "gnutls_certificate_server_set_request": (None, [_vp, _int]),
    # gnutls_transport_set_int() is a macro for this one.
    "gnutls_transport_set_int2": (None, [_vp, _int, _int]),
    "gnutls_handshake": (_int, [_vp]),
    "gnutls_record_send": (ctypes.c_ssize_t, [_vp, _vp, ctypes.c_size_t]),
    "gnutls_record_recv": (ctypes.c_ssize_t, [_vp, _vp, ctypes.c_size_t]),
    "gnutls_record_get_direction": (_int, [_vp]),
    "gnutls_bye": (_int, [_vp, _int]),
    "gnutls_protocol_get_version": (_int, [_vp]),
    "gnutls_protocol_get_name": (_str, [_int]),
    "gnutls_certificate_type_get2": (_int, [_vp, _int]),
    "gnutls_certificate_get_peers":
        (ctypes.POINTER(_Datum), [_vp, ctypes.POINTER(_uint)]),
    "gnutls_session_get_desc": (_vp, [_vp]),
    "gnutls_privkey_init": (_int, [ctypes.POINTER(_vp)]),
    "gnutls_privkey_deinit": (None, [_vp]),
    "gnutls_privkey_import_x509_raw":
        (_int, [_vp, ctypes.POINTER(_Datum), _int, _str, _uint]),
    "gnutls_pubkey_init": (_int, [ctypes.POINTER(_vp)]),
    "gnutls_pubkey_deinit": (None, [_vp]),
    "gnutls_pubkey_import": (_int, [_vp, ctypes.POINTER(_Datum), _int]),
    "gnutls_pubkey_import_privkey": (_int, [_vp, _vp, _uint, _uint]),
    "gnutls_pubkey_get_key_id":
        (_int, [_vp, _uint, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)]),
}

_init_lock = _thread.allocate_lock()
_lib: ctypes.CDLL | None = None
_free: Callable[[int], None] = _FREE_FUNC()
# GnuTLS keeps only a raw pointer to the log callback, so the ctypes object
# must stay referenced here for as long as it is installed.
_log_callback: object | None = None


def _load() -> ctypes.CDLL:
    """Open libgnutls, declare prototypes, check the version, initialise."""
    global _free
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        from ctypes import util  # imports subprocess: only on this path
        name = util.find_library("gnutls")
        if name is None:
            raise GnuTLSError(0, f"cannot load GnuTLS: {_SONAME} not found")
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise GnuTLSError(0, f"cannot load GnuTLS ({name}): {exc}")
    for fname, (restype, argtypes) in _PROTOTYPES.items():
        func = getattr(lib, fname)
        func.restype = restype
        func.argtypes = argtypes
    if not lib.gnutls_check_version(MINIMUM_VERSION.encode()):
        found = (lib.gnutls_check_version(None) or b"?").decode()
        raise GnuTLSError(0, f"GnuTLS {found} is too old: raw public keys"
                             f" need GnuTLS >= {MINIMUM_VERSION}")
    _check(lib, "gnutls_global_init", lib.gnutls_global_init())
    # gnutls_free is a variable holding a function pointer, not a function.
    _free = _FREE_FUNC(_vp.in_dll(lib, "gnutls_free").value)
    return lib


def _library() -> ctypes.CDLL:
    global _lib
    lib = _lib
    if lib is None:
        with _init_lock:
            if _lib is None:
                _lib = _load()
            lib = _lib
    return lib


def _error(lib: ctypes.CDLL, function: str, code: int,
           extra: str = "") -> GnuTLSError:
    text = (lib.gnutls_strerror(code) or b"unknown error").decode(
        errors="replace")
    name = (lib.gnutls_strerror_name(code) or b"?").decode(errors="replace")
    return GnuTLSError(code, f"{function}: {text} ({name}){extra}", function)


def _check(lib: ctypes.CDLL, function: str, code: int) -> int:
    if code < 0:
        raise _error(lib, function, code)
    return code


def _datum(buffer: ctypes.Array) -> _Datum:
    """A datum over a create_string_buffer() result, without its final NUL."""
    return _Datum(ctypes.cast(buffer, _vp), len(buffer) - 1)


def check_version(required: str | None = None) -> str | None:
    """Return the library's version if it is at least *required*, else None.

    With *required* None, return the library's version unconditionally.
    """
    found = _library().gnutls_check_version(
        None if required is None else required.encode())
    return None if found is None else found.decode()


def library_version() -> str:
    """The version string of the loaded libgnutls, e.g. ``"3.7.9"``."""
    return check_version() or "?"


def key_id_from_spki_der(der: bytes) -> str:
    """Mandos key ID: upper-case hex SHA-256 of a DER SubjectPublicKeyInfo."""
    import hashlib  # not needed on the client's boot path

    return hashlib.sha256(der).hexdigest().upper()


_GNUTLS_KEYID_USE_SHA256 = 1 << 0


def key_pair_matches(public_pem: bytes, private_pem: bytes) -> bool:
    """Whether the private key belongs to the public key (both PEM).

    GnuTLS loads a raw-key pair without checking this; a mismatched pair
    would only show up as handshakes the server cannot verify.  Raises
    GnuTLSError if either key cannot be parsed.
    """
    lib = _library()
    privkey, derived, given = _vp(), _vp(), _vp()
    private = ctypes.create_string_buffer(private_pem, len(private_pem) + 1)
    public = ctypes.create_string_buffer(public_pem, len(public_pem) + 1)
    _check(lib, "gnutls_privkey_init", lib.gnutls_privkey_init(ctypes.byref(privkey)))
    try:
        _check(lib, "gnutls_privkey_import_x509_raw", lib.gnutls_privkey_import_x509_raw(
            privkey, ctypes.byref(_datum(private)), _GNUTLS_X509_FMT_PEM, None, 0))
        _check(lib, "gnutls_pubkey_init", lib.gnutls_pubkey_init(ctypes.byref(derived)))
        _check(lib, "gnutls_pubkey_init", lib.gnutls_pubkey_init(ctypes.byref(given)))
        _check(lib, "gnutls_pubkey_import_privkey",
               lib.gnutls_pubkey_import_privkey(derived, privkey, 0, 0))
        _check(lib, "gnutls_pubkey_import", lib.gnutls_pubkey_import(
            given, ctypes.byref(_datum(public)), _GNUTLS_X509_FMT_PEM))
        ids = []
        for pubkey in (derived, given):
            buffer = ctypes.create_string_buffer(64)
            size = ctypes.c_size_t(len(buffer))
            _check(lib, "gnutls_pubkey_get_key_id", lib.gnutls_pubkey_get_key_id(
                pubkey, _GNUTLS_KEYID_USE_SHA256, buffer, ctypes.byref(size)))
            ids.append(buffer.raw[:size.value])
        return ids[0] == ids[1]
    finally:
        ctypes.memset(private, 0, len(private))
        for handle, free in ((derived, lib.gnutls_pubkey_deinit),
                             (given, lib.gnutls_pubkey_deinit),
                             (privkey, lib.gnutls_privkey_deinit)):
            if handle.value:
                free(handle)


# GnuTLS logs traffic keys and IVs ("INT: CLIENT WRITE KEY ...") at exactly
# this message level, whenever the configured level is 9 or more.
_SECRET_LOG_LEVEL = 9


def _log_from_library(level: int, message: bytes | None) -> None:
    if level == _SECRET_LOG_LEVEL:
        return
    try:
        text = (message or b"").decode(errors="replace").rstrip("\n")
        log.debug("gnutls[%d]: %s", level, text)
    except Exception:  # an exception must never unwind through C frames
        pass


def enable_debug_logging(level: int = 11) -> None:
    """Route libgnutls's own log messages to the ``mandos.gnutls`` logger.

    *level* is GnuTLS's log level (0 off, 11 everything; the original uses
    the maximum in debug mode).  Records are emitted at DEBUG.  Messages of
    GnuTLS level 9, which carry key material, are dropped; GnuTLS does not
    log application data at any level.
    """
    global _log_callback
    lib = _library()
    with _init_lock:
        if _log_callback is None:
            _log_callback = _LOG_FUNC(_log_from_library)
            lib.gnutls_global_set_log_function(_log_callback)
        lib.gnutls_global_set_log_level(level)


def disable_debug_logging() -> None:
    """Stop library logging (the callback stays installed but silent)."""
    _library().gnutls_global_set_log_level(0)


class _LibraryObject:
    """A GnuTLS object freed by ``close()``: at the end of a ``with`` block,
    or when garbage-collected while still holding its handle."""

    _handle = None  # set by subclasses; None also before their __init__ got far

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._handle is not None:
            self.close()


class CertificateCredentials(_LibraryObject):
    """GnuTLS certificate credentials holding no key of their own.

    This is what the Mandos server (the TLS client) uses: it presents no
    certificate, but certificate credentials are what lets GnuTLS negotiate
    a certificate type and receive the peer's raw public key.  Credentials
    may be shared by many sessions; :meth:`close` defers freeing until the
    last session using them is closed.
    """

    def __init__(self) -> None:
        self._lib = _library()
        self._lock = _thread.allocate_lock()
        self._users = 0
        self._closing = False
        self._dh_params: int | None = None
        handle = _vp()
        _check(self._lib, "gnutls_certificate_allocate_credentials",
               self._lib.gnutls_certificate_allocate_credentials(
                   ctypes.byref(handle)))
        self._handle: int | None = handle.value

    def set_dh_params_pem(self, pem: bytes) -> None:
        """Parse PEM PKCS#3 DH parameters and attach them (TLS < 1.3 only)."""
        buffer = ctypes.create_string_buffer(pem, len(pem) + 1)
        self._set_dh_params(
            "gnutls_dh_params_import_pkcs3",
            lambda params: self._lib.gnutls_dh_params_import_pkcs3(
                params, ctypes.byref(_datum(buffer)), _GNUTLS_X509_FMT_PEM))

    def generate_dh_params(self, bits: int) -> None:
        """Generate DH parameters of *bits* bits and attach them (slow)."""
        self._set_dh_params(
            "gnutls_dh_params_generate2",
            lambda params: self._lib.gnutls_dh_params_generate2(params, bits))

    def _set_dh_params(self, function: str,
                       fill: Callable[[int], int]) -> None:
        handle = self._live_handle()
        params = _vp()
        _check(self._lib, "gnutls_dh_params_init",
               self._lib.gnutls_dh_params_init(ctypes.byref(params)))
        try:
            _check(self._lib, function, fill(params.value))
        except BaseException:
            self._lib.gnutls_dh_params_deinit(params.value)
            raise
        # GnuTLS stores only the pointer, so the parameters live as long as
        # the credentials; replaced ones are freed after the switch.
        self._lib.gnutls_certificate_set_dh_params(handle, params.value)
        if self._dh_params is not None:
            self._lib.gnutls_dh_params_deinit(self._dh_params)
        self._dh_params = params.value

    def _live_handle(self) -> int:
        if self._handle is None or self._closing:
            raise ValueError("credentials are closed")
        return self._handle

    def _attach(self) -> int:
        with self._lock:
            handle = self._live_handle()
            self._users += 1
            return handle

    def _detach(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closing and self._users == 0:
                self._free_now()

    def _free_now(self) -> None:
        if self._handle is not None:
            self._lib.gnutls_certificate_free_credentials(self._handle)
            self._handle = None
        if self._dh_params is not None:
            self._lib.gnutls_dh_params_deinit(self._dh_params)
            self._dh_params = None

    @property
    def closed(self) -> bool:
        """True once the GnuTLS object has actually been freed."""
        return self._handle is None

    def close(self) -> None:
        """Free now, or when the last session using these credentials ends."""
        with self._lock:
            self._closing = True
            if self._users == 0:
                self._free_now()


class RawPublicKeyCredentials(CertificateCredentials):
    """Credentials presenting an RFC 7250 raw public key (the Mandos client).

    *public_pem* is a ``-----BEGIN PUBLIC KEY-----`` (SubjectPublicKeyInfo)
    block, *private_pem* an unencrypted PKCS#8 or traditional private key.
    GnuTLS 3.7 does not check that the two belong together; a mismatched
    pair shows up as a failed handshake on the peer's side.
    """

    def __init__(self, public_pem: bytes, private_pem: bytes) -> None:
        super().__init__()
        public = ctypes.create_string_buffer(public_pem, len(public_pem) + 1)
        private = ctypes.create_string_buffer(private_pem,
                                              len(private_pem) + 1)
        try:
            self._key_loaded(
                "gnutls_certificate_set_rawpk_key_mem",
                self._lib.gnutls_certificate_set_rawpk_key_mem(
                    self._handle, ctypes.byref(_datum(public)),
                    ctypes.byref(_datum(private)), _GNUTLS_X509_FMT_PEM,
                    None, _KEY_USAGE, None, 0, 0))
        finally:
            ctypes.memset(private, 0, len(private))

    @classmethod
    def from_files(cls, public_path: str | os.PathLike[str],
                   private_path: str | os.PathLike[str]
                   ) -> RawPublicKeyCredentials:
        """Load the key pair from PEM files, read by GnuTLS itself."""
        self = cls.__new__(cls)
        CertificateCredentials.__init__(self)
        self._key_loaded(
            "gnutls_certificate_set_rawpk_key_file",
            self._lib.gnutls_certificate_set_rawpk_key_file(
                self._handle, os.fsencode(public_path),
                os.fsencode(private_path), _GNUTLS_X509_FMT_PEM, None,
                _KEY_USAGE, None, 0, 0, 0),
            f" [{os.fsdecode(public_path)}, {os.fsdecode(private_path)}]")
        return self

    def _key_loaded(self, function: str, code: int, extra: str = "") -> None:
        if code < 0:
            self.close()
            raise _error(self._lib, function, code, extra)


class Session(_LibraryObject):
    """One TLS session over a connected stream socket.

    ``Role.SERVER`` is the Mandos client: it presents the raw public key of
    its :class:`RawPublicKeyCredentials` and requests no certificate.
    ``Role.CLIENT`` is the Mandos server: it presents nothing and does not
    verify the peer (see :meth:`peer_raw_public_key_der`).
    """

    def __init__(self, role: Role, credentials: CertificateCredentials,
                 priority: str = DEFAULT_PRIORITY) -> None:
        self._lib = _library()
        self._handle: int | None = None
        self._credentials: CertificateCredentials | None = None
        self._sock: _socket.socket | None = None
        self._own_sock = False
        self._saved_timeouts: dict[int, bytes] = {}
        self._waking = False
        self._fd = -1
        self._handshake_timeout: float | None = None
        self._read_timeout: float | None = None
        if role not in (Role.SERVER, Role.CLIENT):
            raise ValueError(f"unknown TLS role {role!r}")
        self.role = role
        # NO_TICKETS: no session resumption on either end, as the original.
        # NO_SIGNAL: a peer closing mid-send gives EPIPE, never SIGPIPE.
        flags = (self.role | _GNUTLS_ENABLE_RAWPK | _GNUTLS_NO_TICKETS
                 | _GNUTLS_NO_SIGNAL)
        handle = _vp()
        _check(self._lib, "gnutls_init",
               self._lib.gnutls_init(ctypes.byref(handle), flags))
        self._handle = handle.value
        try:
            self._set_priority(priority)
            cred_handle = credentials._attach()
            self._credentials = credentials
            _check(self._lib, "gnutls_credentials_set",
                   self._lib.gnutls_credentials_set(
                       self._handle, _GNUTLS_CRD_CERTIFICATE, cred_handle))
            if self.role == Role.SERVER:
                self._lib.gnutls_certificate_server_set_request(
                    self._handle, _GNUTLS_CERT_IGNORE)
            # Role.CLIENT: no gnutls_session_set_verify_cert(), so GnuTLS does
            # no trust validation.  That is the protocol: the Mandos server
            # identifies the peer by its key alone, and TLS 1.3's
            # CertificateVerify still proves the peer holds the private key.
        except BaseException:
            self.close()
            raise

    def _set_priority(self, priority: str) -> None:
        text = ctypes.create_string_buffer(priority.encode())
        err_pos = _vp()
        code = self._lib.gnutls_priority_set_direct(
            self._handle, ctypes.cast(text, _vp), ctypes.byref(err_pos))
        if code < 0:
            extra = ""
            if err_pos.value:
                offset = err_pos.value - ctypes.addressof(text)
                extra = (f" in priority string at position {offset}:"
                         f" {priority.encode()[offset:].decode()!r}")
            raise _error(self._lib, "gnutls_priority_set_direct", code, extra)

    def _live(self) -> int:
        if self._handle is None:
            raise ValueError("TLS session is closed")
        return self._handle

    def set_transport(self, sock: _socket.socket | int) -> None:
        """Run the session over *sock* (a socket or a file descriptor).

        The socket stays the caller's to close (a descriptor is duplicated
        until :meth:`close`).  Blocking sockets are the normal case;
        non-blocking ones (and sockets with a Python timeout) work too, by
        polling.

        While a call has a timeout or a should_abort() callback, the session
        sets the socket's SO_RCVTIMEO and SO_SNDTIMEO to a fraction of a
        second (restored afterwards), so that a blocked GnuTLS call returns
        E_AGAIN to Python now and then to check them.  GnuTLS's own timeouts
        are not used: GnuTLS restarts its poll() after a signal, which would
        leave should_abort() unasked for as long as the timeout.
        """
        session = self._live()
        self._restore_socket()
        if isinstance(sock, int):
            self._sock = _socket.socket(fileno=os.dup(sock))
            self._own_sock = True
        else:
            self._sock, self._own_sock = sock, False
        self._fd = self._sock.fileno()
        for option in _WAKE_OPTIONS:
            self._saved_timeouts[option] = self._sock.getsockopt(
                _socket.SOL_SOCKET, option, struct.calcsize(_TIMEVAL))
        self._lib.gnutls_transport_set_int2(session, self._fd, self._fd)

    def _wake_up_now_and_then(self, wake: bool) -> None:
        if wake == self._waking or self._sock is None:
            return
        self._waking = wake
        interval = struct.pack(_TIMEVAL, 0, int(_WAKE_INTERVAL * 1e6))
        try:
            for option in _WAKE_OPTIONS:
                self._sock.setsockopt(
                    _socket.SOL_SOCKET, option,
                    interval if wake else self._saved_timeouts[option])
        except OSError:  # closed by the caller; GnuTLS will report that
            pass

    def _restore_socket(self) -> None:
        self._wake_up_now_and_then(False)
        sock, self._sock = self._sock, None
        self._saved_timeouts.clear()
        if sock is not None and self._own_sock:
            sock.close()

    def set_handshake_timeout(self, seconds: float | None) -> None:
        """Give up a handshake after *seconds* (None: never).

        Checked, to within a fifth of a second, whenever the peer is quiet;
        a peer trickling bytes without pause can stretch it.
        """
        self._handshake_timeout = seconds

    def set_read_timeout(self, seconds: float | None) -> None:
        """After the handshake, give up when the peer has sent nothing (or
        taken none of our data) for *seconds* (None: never)."""
        self._read_timeout = seconds

    def _retrying(self, function: str, call: Callable[[], int],
                  should_abort: Callable[[], bool] | None,
                  timeout: float | None) -> int:
        """Call *call* until it returns neither E_AGAIN nor E_INTERRUPTED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._wake_up_now_and_then(deadline is not None
                                   or should_abort is not None)
        try:
            while True:
                code = call()
                if code >= 0:
                    return code
                if code not in (E_AGAIN, E_INTERRUPTED):
                    raise _error(self._lib, function, code)
                if should_abort is not None and should_abort():
                    raise Aborted(code, f"{function}: aborted by caller",
                                  function)
                if deadline is not None and time.monotonic() >= deadline:
                    raise _error(self._lib, function, E_TIMEDOUT)
                if code == E_AGAIN and not os.get_blocking(self._fd):
                    self._wait_for_socket(deadline)
        finally:
            self._wake_up_now_and_then(False)

    def _wait_for_socket(self, deadline: float | None) -> None:
        wanted = (select.POLLOUT
                  if self._lib.gnutls_record_get_direction(self._live())
                  else select.POLLIN)
        wait = _WAKE_INTERVAL
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        poller = select.poll()
        poller.register(self._fd, wanted)
        poller.poll(wait * 1000)

    def handshake(self, should_abort: Callable[[], bool] | None = None
                  ) -> None:
        """Perform the TLS handshake.

        Interrupted and would-block results are retried, unless
        *should_abort()* then returns true, which raises :class:`Aborted`.
        """
        self._retrying("gnutls_handshake",
                       lambda: self._lib.gnutls_handshake(self._live()),
                       should_abort, self._handshake_timeout)

    def send_all(self, data: bytes,
                 should_abort: Callable[[], bool] | None = None) -> None:
        """Send all of *data* as application data."""
        size = len(data)
        buffer = (ctypes.c_char * size).from_buffer_copy(data)
        base = ctypes.addressof(buffer)
        sent = 0
        try:
            while sent < size:
                sent += self._retrying(
                    "gnutls_record_send",
                    lambda: self._lib.gnutls_record_send(
                        self._live(), base + sent, size - sent),
                    should_abort, self._read_timeout)
        finally:
            ctypes.memset(buffer, 0, size)

    def recv_until_close_notify(
            self, limit: int | None = None,
            should_abort: Callable[[], bool] | None = None) -> bytes:
        """Read application data until the peer's close_notify; return it all.

        Any error ends the read and discards what was received, including a
        TCP close without close_notify (E_PREMATURE_TERMINATION): without
        close_notify a man in the middle could cut the stream short and have
        a truncated secret taken for the whole one.  A re-handshake request
        is honoured.  More than *limit* bytes raise E_LARGE_PACKET.
        """
        received = bytearray()
        chunk = ctypes.create_string_buffer(_RECORD_SIZE)
        try:
            while True:
                try:
                    count = self._retrying(
                        "gnutls_record_recv",
                        lambda: self._lib.gnutls_record_recv(
                            self._live(), chunk, _RECORD_SIZE),
                        should_abort, self._read_timeout)
                except GnuTLSError as exc:
                    if exc.code != E_REHANDSHAKE:
                        raise
                    self.handshake(should_abort)
                    continue
                if count == 0:  # close_notify
                    return bytes(received)
                received += chunk.raw[:count]
                if limit is not None and len(received) > limit:
                    raise _error(self._lib, "gnutls_record_recv",
                                 E_LARGE_PACKET,
                                 f" (more than {limit} bytes received)")
        finally:
            received[:] = bytes(len(received))
            ctypes.memset(chunk, 0, _RECORD_SIZE)

    def bye(self, how: int = SHUT_RDWR,
            should_abort: Callable[[], bool] | None = None) -> None:
        """Send close_notify; with SHUT_RDWR also wait for the peer's."""
        self._retrying("gnutls_bye",
                       lambda: self._lib.gnutls_bye(self._live(), how),
                       should_abort, self._read_timeout)

    def protocol_version(self) -> str:
        """Negotiated protocol name, e.g. ``"TLS1.3"``."""
        version = self._lib.gnutls_protocol_get_version(self._live())
        return (self._lib.gnutls_protocol_get_name(version)
                or b"unknown").decode()

    def description(self) -> str:
        """GnuTLS's summary of the negotiated parameters, for debug logs."""
        pointer = self._lib.gnutls_session_get_desc(self._live())
        if not pointer:
            return ""
        try:
            return ctypes.string_at(pointer).decode(errors="replace")
        finally:
            _free(pointer)

    def peer_raw_public_key_der(self) -> bytes:
        """The peer's raw public key as DER SubjectPublicKeyInfo.

        Raises GnuTLSError if the peer's certificate type is not a raw
        public key or it sent none.  GnuTLS has parsed this key and checked
        the handshake signature made with it; no trust decision is made.
        """
        session = self._live()
        ctype = self._lib.gnutls_certificate_type_get2(session,
                                                       _GNUTLS_CTYPE_PEERS)
        if ctype != _GNUTLS_CRT_RAWPK:
            raise _error(self._lib, "gnutls_certificate_type_get2",
                         E_UNSUPPORTED_CERTIFICATE_TYPE,
                         f" (peer certificate type {ctype})")
        count = _uint(0)
        peers = self._lib.gnutls_certificate_get_peers(session,
                                                       ctypes.byref(count))
        if not peers or count.value < 1 or not peers[0].data:
            raise _error(self._lib, "gnutls_certificate_get_peers",
                         E_NO_CERTIFICATE_FOUND)
        return ctypes.string_at(peers[0].data, peers[0].size)

    @property
    def closed(self) -> bool:
        """True once the session has been freed."""
        return self._handle is None

    def close(self) -> None:
        """Free the session (gnutls_deinit) and restore the socket's
        timeouts; idempotent.  Sends nothing and leaves the socket open."""
        if self._handle is not None:
            self._lib.gnutls_deinit(self._handle)
            self._handle = None
        if self._credentials is not None:
            self._credentials._detach()
            self._credentials = None
        self._restore_socket()
