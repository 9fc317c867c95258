"""Tests for mandos.gnutls: real handshakes over real sockets, no mocks.

The TLS server role is the Mandos client (it presents an Ed25519 raw public
key); the TLS client role is the Mandos server (it presents nothing and
computes the peer's key ID).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import gc
import hashlib
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from mandos import gnutls
from mandos.gnutls import GnuTLSError, Role, Session

# A broken timeout or abort would otherwise hang on a silent peer.
pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parent.parent
T = 5.0  # generous per-step timeout so that a broken peer cannot hang a test
HEADER = Path("/usr/include/gnutls/gnutls.h")
# TLS 1.2 allows renegotiation, which TLS 1.3 removed.
TLS12_PRIORITY = "NORMAL:-VERS-ALL:+VERS-TLS1.2:!CTYPE-X.509:+CTYPE-RAWPK"


@dataclass(frozen=True)
class Key:
    public_pem: bytes
    private_pem: bytes
    spki_der: bytes


def make_key() -> Key:
    """An Ed25519 key pair in the form mandos-keygen writes it."""
    private = ed25519.Ed25519PrivateKey.generate()
    public = private.public_key()
    return Key(
        public.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo),
        private.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
        public.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo))


@pytest.fixture(scope="module")
def key() -> Key:
    return make_key()


@pytest.fixture(scope="module")
def server_creds(key: Key):
    with gnutls.RawPublicKeyCredentials(key.public_pem,
                                        key.private_pem) as creds:
        yield creds


@pytest.fixture(scope="module")
def client_creds():
    with gnutls.CertificateCredentials() as creds:
        yield creds


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def open_session(role: Role, creds, sock, priority=gnutls.DEFAULT_PRIORITY,
                 session_class=Session) -> Session:
    session = session_class(role, creds, priority)
    session.set_transport(sock)
    session.set_handshake_timeout(T)
    session.set_read_timeout(T)
    return session


def mandos_client_side(creds, sock, priority=gnutls.DEFAULT_PRIORITY):
    """TLS server role: handshake, read until close_notify, bye."""
    with open_session(Role.SERVER, creds, sock, priority) as session:
        session.handshake()
        data = session.recv_until_close_notify()
        session.bye(gnutls.SHUT_RDWR)
        return session.protocol_version(), data


def mandos_server_side(creds, sock, payload: bytes,
                       priority=gnutls.DEFAULT_PRIORITY):
    """TLS client role: handshake, read the peer's key, send, bye."""
    with open_session(Role.CLIENT, creds, sock, priority) as session:
        session.handshake()
        der = session.peer_raw_public_key_der()
        session.send_all(payload)
        session.bye(gnutls.SHUT_RDWR)
        return session.protocol_version(), der


def outcome(future: concurrent.futures.Future):
    """The result of *future*, or the exception it raised."""
    try:
        return future.result(timeout=3 * T)
    except Exception as exc:
        return exc


def expected_key_id(key: Key) -> str:
    return hashlib.sha256(key.spki_der).hexdigest().upper()


# -- library loading and constants --------------------------------------------

def test_import_does_not_load_the_library():
    code = ("import sys, mandos.gnutls as g\n"
            "maps = lambda: open('/proc/self/maps').read()\n"
            "print('libgnutls' in maps(), 'subprocess' in sys.modules,"
            " 'cryptography' in sys.modules)\n"
            "g.library_version()\n"
            "print('libgnutls' in maps())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False", "False", "True"]


def test_version_check():
    version = gnutls.library_version()
    assert gnutls.check_version(gnutls.MINIMUM_VERSION) == version
    assert gnutls.check_version("99.0.0") is None
    cli = subprocess.run(["gnutls-cli", "--version"], capture_output=True,
                         text=True, check=True).stdout
    assert re.search(rf"\b{re.escape(version)}\b", cli)


def test_error_constants_are_the_library_codes():
    lib = gnutls._library()
    names = [name for name in vars(gnutls) if name.startswith("E_")]
    assert "E_PREMATURE_TERMINATION" in names and len(names) > 15
    for name in names:
        assert lib.gnutls_strerror_name(getattr(gnutls, name)).decode() \
            == "GNUTLS_" + name
    assert lib.gnutls_strerror(gnutls.E_PREMATURE_TERMINATION).decode() \
        == "The TLS connection was non-properly terminated."


@pytest.mark.skipif(not HEADER.exists(), reason="libgnutls28-dev not present")
def test_flag_constants_match_the_header():
    header = HEADER.read_text()
    values = {name: eval(value, {}) for name, value in re.findall(
        r"^\s*(GNUTLS_[A-Z0-9_]+)\s*=\s*([0-9()<x ]+),?\s*(?:/\*.*)?$",
        header, re.M)}
    for ours, theirs in [
            ("_GNUTLS_SERVER", "GNUTLS_SERVER"),
            ("_GNUTLS_CLIENT", "GNUTLS_CLIENT"),
            ("_GNUTLS_NO_SIGNAL", "GNUTLS_NO_SIGNAL"),
            ("_GNUTLS_NO_TICKETS", "GNUTLS_NO_TICKETS"),
            ("_GNUTLS_ENABLE_RAWPK", "GNUTLS_ENABLE_RAWPK"),
            ("_GNUTLS_CRD_CERTIFICATE", "GNUTLS_CRD_CERTIFICATE"),
            ("_GNUTLS_CERT_IGNORE", "GNUTLS_CERT_IGNORE"),
            ("_GNUTLS_X509_FMT_PEM", "GNUTLS_X509_FMT_PEM"),
            ("_GNUTLS_CRT_RAWPK", "GNUTLS_CRT_RAWPK"),
            ("SHUT_RDWR", "GNUTLS_SHUT_RDWR"),
            ("SHUT_WR", "GNUTLS_SHUT_WR")]:
        assert getattr(gnutls, ours) == values[theirs], ours
    # An enum without explicit values: CLIENT, SERVER, OURS, PEERS.
    targets = re.search(r"GNUTLS_CTYPE_CLIENT,\s*GNUTLS_CTYPE_SERVER,"
                        r"\s*GNUTLS_CTYPE_OURS,\s*GNUTLS_CTYPE_PEERS", header)
    assert targets and gnutls._GNUTLS_CTYPE_PEERS == 3
    usage = dict(re.findall(r"#define (GNUTLS_KEY_\w+)\s+(\d+)", header))
    assert gnutls._KEY_USAGE == (int(usage["GNUTLS_KEY_DIGITAL_SIGNATURE"])
                                 | int(usage["GNUTLS_KEY_KEY_ENCIPHERMENT"]))


def test_key_id_is_upper_case_sha256_of_spki():
    # PROTOCOL.md §4.3 worked example and the refused empty-input ID.
    pem = (b"-----BEGIN PUBLIC KEY-----\n"
           b"MCowBQYDK2VwAyEAzONgZlfR1dPfUzKIe2y7vcamNc6Kgh1/lSu8A53yRko=\n"
           b"-----END PUBLIC KEY-----\n")
    der = serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert gnutls.key_id_from_spki_der(der) == (
        "0AF87B3151B128F711CD3D454E6DE12F9AC782980AFB0A6095165B8ABE6D6174")
    assert gnutls.key_id_from_spki_der(b"") == (
        "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855")


# -- the protocol exchange ----------------------------------------------------

def test_socketpair_exchange_is_tls13_and_key_id_matches(
        key, server_creds, client_creds, pool):
    a, b = socket.socketpair()
    with a, b:
        client = pool.submit(mandos_client_side, server_creds, a)
        server = pool.submit(mandos_server_side, client_creds, b, b"secret")
        version, der = server.result(timeout=3 * T)
        assert client.result(timeout=3 * T) == ("TLS1.3", b"secret")
    assert version == "TLS1.3"
    assert der == key.spki_der
    assert gnutls.key_id_from_spki_der(der) == expected_key_id(key)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1"])
def test_tcp_exchange_after_version_line(address, key, server_creds,
                                         client_creds, pool):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        listener = socket.create_server((address, 0), family=family)
    except OSError as exc:  # e.g. a container without IPv6
        pytest.skip(f"cannot listen on {address}: {exc}")
    payload = os.urandom(3000)

    def serve():
        conn, _ = listener.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n"):  # not a byte past the LF
                line += conn.recv(1)
            assert line == b"1\r\n"
            return mandos_server_side(client_creds, conn, payload)

    def connect():
        with socket.create_connection((address, listener.getsockname()[1]),
                                      timeout=T) as conn:
            conn.settimeout(None)
            conn.sendall(b"1\r\n")
            return mandos_client_side(server_creds, conn)

    with listener:
        server = pool.submit(serve)
        client = pool.submit(connect)
        assert client.result(timeout=3 * T) == ("TLS1.3", payload)
        version, der = server.result(timeout=3 * T)
    assert gnutls.key_id_from_spki_der(der) == expected_key_id(key)


def test_zero_bytes_then_close_notify_reads_as_empty(server_creds,
                                                     client_creds, pool):
    a, b = socket.socketpair()
    with a, b:
        client = pool.submit(mandos_client_side, server_creds, a)
        pool.submit(mandos_server_side, client_creds, b, b"").result(3 * T)
        assert client.result(timeout=3 * T) == ("TLS1.3", b"")


def test_tcp_close_without_close_notify_discards_data(server_creds,
                                                      client_creds, pool):
    a, b = socket.socketpair()

    def send_and_drop():
        with open_session(Role.CLIENT, client_creds, b) as session:
            session.handshake()
            session.send_all(b"partial secret")
            b.shutdown(socket.SHUT_RDWR)  # no gnutls_bye: no close_notify

    with a, b:
        client = pool.submit(mandos_client_side, server_creds, a)
        pool.submit(send_and_drop).result(timeout=3 * T)
        error = outcome(client)
    assert isinstance(error, GnuTLSError)
    assert error.code == gnutls.E_PREMATURE_TERMINATION
    assert error.function == "gnutls_record_recv"
    assert "non-properly terminated" in str(error)
    assert "gnutls_record_recv" in str(error)


def test_payload_spanning_many_records(server_creds, client_creds, pool):
    payload = os.urandom(200_000)
    a, b = socket.socketpair()
    with a, b:
        client = pool.submit(mandos_client_side, server_creds, a)
        pool.submit(mandos_server_side, client_creds, b, payload).result(
            3 * T)
        assert client.result(timeout=3 * T) == ("TLS1.3", payload)


def test_receive_limit(server_creds, client_creds, pool):
    a, b = socket.socketpair()

    def limited():
        with open_session(Role.SERVER, server_creds, a) as session:
            session.handshake()
            return session.recv_until_close_notify(limit=1000)

    with a, b:
        client = pool.submit(limited)
        server = pool.submit(mandos_server_side, client_creds, b,
                             os.urandom(5000))
        error = outcome(client)
        a.shutdown(socket.SHUT_RDWR)  # let the sender finish
        outcome(server)
    assert isinstance(error, GnuTLSError)
    assert error.code == gnutls.E_LARGE_PACKET
    assert "more than 1000 bytes" in str(error)


def test_rehandshake_is_honoured(key, server_creds, client_creds, pool):
    handshakes = []

    class CountingSession(Session):
        def handshake(self, should_abort=None):
            handshakes.append(self.role)
            super().handshake(should_abort)

    def reader():
        with open_session(Role.SERVER, server_creds, a, TLS12_PRIORITY,
                          CountingSession) as session:
            session.handshake()
            data = session.recv_until_close_notify()
            session.bye()
            return data

    def writer():
        with open_session(Role.CLIENT, client_creds, b,
                          TLS12_PRIORITY) as session:
            session.handshake()
            session.send_all(b"before ")
            session.handshake()  # client-initiated renegotiation
            session.send_all(b"after")
            session.bye()
            return (session.protocol_version(),
                    session.peer_raw_public_key_der())

    a, b = socket.socketpair()
    with a, b:
        client = pool.submit(reader)
        assert pool.submit(writer).result(3 * T) == ("TLS1.2", key.spki_der)
        assert client.result(timeout=3 * T) == b"before after"
    assert handshakes == [Role.SERVER, Role.SERVER]


def test_sessions_in_many_threads_share_credentials(key, server_creds,
                                                    client_creds, pool):
    pairs = [socket.socketpair() for _ in range(8)]
    try:
        futures = [(pool.submit(mandos_client_side, server_creds, a),
                    pool.submit(mandos_server_side, client_creds, b,
                                b"secret %d" % i))
                   for i, (a, b) in enumerate(pairs)]
        for i, (client, server) in enumerate(futures):
            assert client.result(timeout=3 * T)[1] == b"secret %d" % i
            assert server.result(timeout=3 * T)[1] == key.spki_der
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_non_blocking_sockets(key, server_creds, client_creds, pool):
    payload = os.urandom(100_000)
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(T)  # a Python timeout makes the descriptor non-blocking
        b.setblocking(False)
        client = pool.submit(mandos_client_side, server_creds, a)
        _, der = pool.submit(mandos_server_side, client_creds, b,
                             payload).result(3 * T)
        assert client.result(timeout=3 * T) == ("TLS1.3", payload)
    assert der == key.spki_der


# -- failures -----------------------------------------------------------------

def test_garbage_instead_of_client_hello(server_creds):
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"GET / HTTP/1.1\r\nHost: mandos\r\n\r\n")
        b.shutdown(socket.SHUT_WR)
        with open_session(Role.SERVER, server_creds, a) as session:
            with pytest.raises(GnuTLSError) as info:
                session.handshake()
    error = info.value
    assert error.code < 0 and error.function == "gnutls_handshake"
    text = gnutls._library().gnutls_strerror(error.code).decode()
    assert str(error).startswith(f"gnutls_handshake: {text}")


def test_truncated_client_hello(server_creds, client_creds, pool):
    # Capture a genuine ClientHello record, then replay only half of it.
    a, b = socket.socketpair()
    with a, b:
        def hello():
            with open_session(Role.CLIENT, client_creds, b) as session:
                session.handshake()
        attempt = pool.submit(hello)
        record = a.recv(5)
        length = int.from_bytes(record[3:5], "big")
        while len(record) < 5 + length:
            record += a.recv(5 + length - len(record))
        assert record[0] == 22 and record[5] == 1  # handshake, ClientHello
    assert isinstance(outcome(attempt), GnuTLSError)
    a, b = socket.socketpair()
    with a, b:
        b.sendall(record[:len(record) // 2])
        b.shutdown(socket.SHUT_WR)
        with open_session(Role.SERVER, server_creds, a) as session:
            with pytest.raises(GnuTLSError) as info:
                session.handshake()
    assert info.value.function == "gnutls_handshake"
    assert info.value.code in (gnutls.E_PREMATURE_TERMINATION,
                               gnutls.E_UNEXPECTED_PACKET_LENGTH,
                               gnutls.E_PULL_ERROR)


def test_client_role_rejects_garbage_reply(client_creds):
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"\x15\x03\x03\x00\x02garbage" * 4)
        with open_session(Role.CLIENT, client_creds, a) as session:
            with pytest.raises(GnuTLSError) as info:
                session.handshake()
    assert info.value.function == "gnutls_handshake"


def test_bad_priority_string_names_the_position(client_creds):
    with pytest.raises(GnuTLSError) as info:
        Session(Role.CLIENT, client_creds, "SECURE128:+BOGUS:!RSA")
    assert info.value.code == gnutls.E_INVALID_REQUEST
    assert info.value.function == "gnutls_priority_set_direct"
    assert "position 10" in str(info.value) and "+BOGUS" in str(info.value)
    assert client_creds._users == 0  # the failed session let go of them


@pytest.mark.parametrize("which", ["garbage public", "garbage private",
                                   "empty", "private as public",
                                   "encrypted private"])
def test_unusable_pem_key_is_rejected(which, key):
    encrypted = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"password"))
    public, private = {
        "garbage public": (b"not a key", key.private_pem),
        "garbage private": (key.public_pem, b"-----BEGIN PRIVATE KEY-----\n"
                            b"AAAA\n-----END PRIVATE KEY-----\n"),
        "empty": (b"", b""),
        "private as public": (key.private_pem, key.private_pem),
        "encrypted private": (key.public_pem, encrypted),
    }[which]
    with pytest.raises(GnuTLSError) as info:
        gnutls.RawPublicKeyCredentials(public, private)
    assert info.value.code < 0
    assert info.value.function == "gnutls_certificate_set_rawpk_key_mem"


def test_mismatched_key_pair_fails_the_handshake(client_creds, pool):
    one, other = make_key(), make_key()
    a, b = socket.socketpair()
    with gnutls.RawPublicKeyCredentials(one.public_pem,
                                        other.private_pem) as creds, a, b:
        client = pool.submit(mandos_client_side, creds, a)
        server = pool.submit(mandos_server_side, client_creds, b, b"x")
        server_error = outcome(server)
        b.close()
        client_error = outcome(client)
    # The CertificateVerify signature does not match the presented key.
    assert isinstance(server_error, GnuTLSError)
    assert server_error.function == "gnutls_handshake"
    assert isinstance(client_error, GnuTLSError)


def test_key_files(tmp_path, key, client_creds, pool):
    public, private = tmp_path / "tls-pubkey.pem", tmp_path / "tls-privkey.pem"
    public.write_bytes(key.public_pem)
    private.write_bytes(key.private_pem)
    a, b = socket.socketpair()
    with gnutls.RawPublicKeyCredentials.from_files(public, private) as creds, \
            a, b:
        client = pool.submit(mandos_client_side, creds, a)
        _, der = pool.submit(mandos_server_side, client_creds, b,
                             b"s").result(3 * T)
        assert client.result(timeout=3 * T) == ("TLS1.3", b"s")
    assert gnutls.key_id_from_spki_der(der) == expected_key_id(key)


def test_missing_key_files_name_both_files(tmp_path):
    public, private = tmp_path / "nope-pub.pem", tmp_path / "nope-priv.pem"
    with pytest.raises(GnuTLSError) as info:
        gnutls.RawPublicKeyCredentials.from_files(public, private)
    assert info.value.code == gnutls.E_FILE_ERROR
    assert str(public) in str(info.value) and str(private) in str(info.value)


def test_server_role_without_a_key_fails_the_handshake(client_creds, pool):
    a, b = socket.socketpair()
    with a, b, gnutls.CertificateCredentials() as no_key:
        client = pool.submit(mandos_client_side, no_key, a)
        server = pool.submit(mandos_server_side, client_creds, b, b"")
        client_error = outcome(client)
        a.close()  # as the Mandos client does after a failed attempt
        server_error = outcome(server)
    assert isinstance(client_error, GnuTLSError)
    assert client_error.code == gnutls.E_UNSUPPORTED_CERTIFICATE_TYPE
    assert isinstance(server_error, GnuTLSError)
    assert server_error.function == "gnutls_handshake"


@pytest.mark.parametrize("blocking", [True, False])
def test_handshake_timeout_with_silent_peer(blocking, server_creds):
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(blocking)
        with Session(Role.SERVER, server_creds) as session:
            session.set_transport(a)
            session.set_handshake_timeout(0.3)
            started = time.monotonic()
            with pytest.raises(GnuTLSError) as info:
                session.handshake()
            elapsed = time.monotonic() - started
    assert info.value.code == gnutls.E_TIMEDOUT
    assert 0.25 <= elapsed < 3


def _handshake_then_silence(client_creds, sock, done: threading.Event) -> None:
    """A peer that shakes hands and then sends nothing until ``done``."""
    with open_session(Role.CLIENT, client_creds, sock) as session:
        session.handshake()
        done.wait(3 * T)


def test_read_timeout_with_silent_peer(server_creds, client_creds, pool):
    a, b = socket.socketpair()
    done = threading.Event()
    with a, b:
        peer = pool.submit(_handshake_then_silence, client_creds, b, done)
        try:
            with open_session(Role.SERVER, server_creds, a) as session:
                session.handshake()
                session.set_read_timeout(0.3)
                started = time.monotonic()
                with pytest.raises(GnuTLSError) as info:
                    session.recv_until_close_notify()
                elapsed = time.monotonic() - started
        finally:
            done.set()
        peer.result(timeout=3 * T)
    assert info.value.code == gnutls.E_TIMEDOUT
    assert 0.25 <= elapsed < 3


def test_should_abort_ends_an_interrupted_handshake(server_creds):
    # A signal interrupts the blocking read (E_INTERRUPTED); the handshake
    # is retried until should_abort() says stop.
    interrupts = []
    main = threading.get_ident()
    stop = threading.Event()

    def poke():
        while not stop.wait(0.05):
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1,
                             lambda *_: interrupts.append(1))
    poker = threading.Thread(target=poke)
    a, b = socket.socketpair()
    try:
        with a, b, Session(Role.SERVER, server_creds) as session:
            session.set_transport(a)
            session.set_handshake_timeout(T)  # ends the test if abort fails
            poker.start()
            with pytest.raises(gnutls.Aborted) as info:
                session.handshake(should_abort=lambda: len(interrupts) >= 3)
    finally:
        stop.set()
        if poker.is_alive():
            poker.join()
        signal.signal(signal.SIGUSR1, previous)
    assert info.value.code == gnutls.E_INTERRUPTED
    assert isinstance(info.value, GnuTLSError)
    assert len(interrupts) >= 3


def test_should_abort_is_asked_while_the_peer_is_silent(server_creds):
    # No signal at all: a quiet peer still hands control back now and then.
    asked = []
    a, b = socket.socketpair()
    with a, b, Session(Role.SERVER, server_creds) as session:
        session.set_transport(a)
        session.set_handshake_timeout(T)
        started = time.monotonic()
        with pytest.raises(gnutls.Aborted) as info:
            session.handshake(should_abort=lambda: asked.append(1) or
                              time.monotonic() - started > 0.3)
        elapsed = time.monotonic() - started
    assert info.value.code == gnutls.E_AGAIN
    assert len(asked) >= 2 and elapsed < 2


class Stop(BaseException):
    """What a signal handler raises, like mandos-client's Terminated."""


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")
def test_signal_is_seen_through_should_abort_while_logging(server_creds):
    # With library logging on, a signal handler may run inside the log
    # callback, where ctypes swallows its exception.  The flag it sets is
    # still seen through should_abort().
    received = []
    main = threading.get_ident()

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Stop()

    previous = signal.signal(signal.SIGUSR1, handler)
    poke = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGUSR1))
    gnutls.enable_debug_logging(11)
    a, b = socket.socketpair()
    try:
        with a, b, Session(Role.SERVER, server_creds) as session:
            session.set_transport(a)
            session.set_handshake_timeout(T)
            started = time.monotonic()
            poke.start()
            with pytest.raises((gnutls.Aborted, Stop)):
                session.handshake(should_abort=lambda: bool(received))
            elapsed = time.monotonic() - started
    finally:
        poke.cancel()
        gnutls.disable_debug_logging()
        signal.signal(signal.SIGUSR1, previous)
    assert received and elapsed < 2


def test_socket_timeouts_only_while_something_is_to_be_checked(
        server_creds, client_creds, pool):
    # No wake-ups (and no debug-log noise) for a plain blocking read.
    a, b = socket.socketpair()
    original = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    wake = struct.pack("@ll", 0, 200_000)

    def reader(**kwargs):
        return session_a.recv_until_close_notify(**kwargs)

    def observed_during(future) -> bytes:
        time.sleep(0.3)
        assert not future.done()
        return a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)

    with a, b, Session(Role.SERVER, server_creds) as session_a, \
            Session(Role.CLIENT, client_creds) as session_b:
        session_a.set_transport(a)
        session_b.set_transport(b)
        handshake = pool.submit(session_a.handshake)
        session_b.handshake()
        handshake.result(timeout=T)
        plain = pool.submit(reader)
        assert observed_during(plain) == original
        session_b.send_all(b"one")
        session_b.bye(gnutls.SHUT_WR)
        assert plain.result(timeout=T) == b"one"
    a, b = socket.socketpair()
    with a, b, Session(Role.SERVER, server_creds) as session_a, \
            Session(Role.CLIENT, client_creds) as session_b:
        session_a.set_transport(a)
        session_b.set_transport(b)
        handshake = pool.submit(session_a.handshake)
        session_b.handshake()
        handshake.result(timeout=T)
        watched = pool.submit(reader, should_abort=lambda: False)
        assert observed_during(watched) == wake
        session_b.bye(gnutls.SHUT_WR)
        assert watched.result(timeout=T) == b""
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            16) == original


# -- resources ----------------------------------------------------------------

def test_context_managers_free_and_credentials_outlive_sessions():
    creds = gnutls.CertificateCredentials()
    session = Session(Role.CLIENT, creds)
    creds.close()
    assert not creds.closed  # still in use by the session
    with pytest.raises(ValueError):
        Session(Role.CLIENT, creds)  # but no new users
    with session:
        pass
    assert session.closed and creds.closed
    session.close()  # idempotent
    with pytest.raises(ValueError):
        session.handshake()


@pytest.mark.parametrize("as_fd", [False, True])
def test_socket_is_left_as_found(as_fd, server_creds, client_creds, pool):
    a, b = socket.socketpair()
    with a, b, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        before = a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        fds = len(os.listdir("/proc/self/fd"))
        server = pool.submit(mandos_server_side, client_creds, b, b"x")
        assert mandos_client_side(server_creds, a.fileno() if as_fd else a
                                  ) == ("TLS1.3", b"x")
        server.result(timeout=3 * T)
        gc.collect()
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            16) == before
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            16) == before
        assert len(os.listdir("/proc/self/fd")) == fds
        b.sendall(b"plain")  # still open and blocking
        assert a.recv(5) == b"plain"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_bye_rdwr_waits_for_the_peers_close_notify(server_creds,
                                                    client_creds, pool):
    a, b = socket.socketpair()
    done = threading.Event()
    with a, b:
        peer = pool.submit(_handshake_then_silence, client_creds, b, done)
        try:
            with open_session(Role.SERVER, server_creds, a) as session:
                session.handshake()
                session.set_read_timeout(0.3)
                session.bye(gnutls.SHUT_WR)  # does not wait
                with pytest.raises(GnuTLSError) as info:
                    session.bye(gnutls.SHUT_RDWR)
        finally:
            done.set()
        peer.result(timeout=3 * T)
    assert info.value.code == gnutls.E_TIMEDOUT
    assert info.value.function == "gnutls_bye"


def test_dh_params(client_creds):
    pem = subprocess.run(["certtool", "--get-dh-params"], capture_output=True,
                         check=True).stdout
    pem = pem[pem.index(b"-----BEGIN DH PARAMETERS-----"):]
    with gnutls.CertificateCredentials() as creds:
        creds.set_dh_params_pem(pem)
        creds.generate_dh_params(1024)  # replaces the first ones
        with pytest.raises(GnuTLSError) as info:
            creds.set_dh_params_pem(b"-----BEGIN DH PARAMETERS-----\nAAAA\n"
                                    b"-----END DH PARAMETERS-----\n")
    assert info.value.function == "gnutls_dh_params_import_pkcs3"


# -- logging ------------------------------------------------------------------

def test_debug_logging_reaches_the_logger_without_secrets(
        server_creds, client_creds, pool, caplog):
    caplog.set_level(logging.DEBUG, logger="mandos.gnutls")
    payload = b"THE-SECRET-PAYLOAD"
    gnutls.enable_debug_logging(99)
    try:
        a, b = socket.socketpair()
        with a, b:
            client = pool.submit(mandos_client_side, server_creds, a)
            pool.submit(mandos_server_side, client_creds, b, payload).result(
                3 * T)
            assert client.result(timeout=3 * T)[1] == payload
    finally:
        gnutls.disable_debug_logging()
    records = [r for r in caplog.records if r.name == "mandos.gnutls"]
    assert len(records) > 50
    assert all(r.levelno == logging.DEBUG for r in records)
    text = "\n".join(r.getMessage() for r in records)
    assert "HSK" in text  # handshake messages are there
    assert "WRITE KEY" not in text and "SECRET" not in text
    assert payload.hex() not in text.lower()
    caplog.clear()
    a, b = socket.socketpair()
    with a, b:
        client = pool.submit(mandos_client_side, server_creds, a)
        pool.submit(mandos_server_side, client_creds, b, b"").result(3 * T)
        client.result(timeout=3 * T)
    assert not [r for r in caplog.records if r.name == "mandos.gnutls"]


# -- interoperability with the GnuTLS command-line tools ----------------------

@contextlib.contextmanager
def gnutls_serv(*args: str):
    """Run gnutls-serv on a free local port; yield a connected socket."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    serv = subprocess.Popen(["gnutls-serv", "-p", str(port), *args],
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + T
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and serv.poll() is None
                time.sleep(0.02)
        with conn:
            yield conn
    finally:
        serv.terminate()
        serv.wait()


def test_server_role_against_gnutls_cli(server_creds):
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        cli = subprocess.Popen(
            ["gnutls-cli", "--priority", gnutls.DEFAULT_PRIORITY,
             "--no-ca-verification", "-p", str(listener.getsockname()[1]),
             "127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        try:
            listener.settimeout(T)
            conn, _ = listener.accept()
            conn.settimeout(None)
            with conn, open_session(Role.SERVER, server_creds,
                                    conn) as session:
                session.handshake()
                assert session.protocol_version() == "TLS1.3"
                cli.stdin.write(b"from gnutls-cli\n")
                cli.stdin.close()  # gnutls-cli then sends close_notify
                data = session.recv_until_close_notify()
                session.bye()
            out = cli.stdout.read().decode()
            assert cli.wait(timeout=T) == 0
        finally:
            if cli.poll() is None:
                cli.kill()
                cli.wait()
    assert data == b"from gnutls-cli\n"
    assert "Raw Public Key" in out and "TLS1.3" in out


def test_client_role_against_gnutls_serv(tmp_path, key, client_creds):
    (tmp_path / "pub.pem").write_bytes(key.public_pem)
    (tmp_path / "priv.pem").write_bytes(key.private_pem)
    with gnutls_serv("--priority", gnutls.DEFAULT_PRIORITY,
                     "--rawpkkeyfile", str(tmp_path / "priv.pem"),
                     "--rawpkfile", str(tmp_path / "pub.pem"),
                     "--disable-client-cert", "--echo") as conn, \
            open_session(Role.CLIENT, client_creds, conn) as session:
        session.handshake()
        der = session.peer_raw_public_key_der()
        session.send_all(b"echo me\n")
        session.bye(gnutls.SHUT_WR)
        echoed = session.recv_until_close_notify()
    assert der == key.spki_der
    assert gnutls.key_id_from_spki_der(der) == expected_key_id(key)
    assert echoed == b"echo me\n"


def test_x509_peer_is_not_a_raw_public_key(tmp_path, client_creds):
    # PROTOCOL.md §3.4: a peer certificate that is not a raw public key is
    # a "bad certificate"; the binding reports it instead of returning DER.
    private = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "peer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, None))
    (tmp_path / "cert.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with gnutls_serv("--x509certfile", str(tmp_path / "cert.pem"),
                     "--x509keyfile", str(tmp_path / "key.pem"),
                     "--disable-client-cert") as conn, \
            open_session(Role.CLIENT, client_creds, conn,
                         "NORMAL:-VERS-ALL:+VERS-TLS1.3") as session:
        session.handshake()
        with pytest.raises(GnuTLSError) as info:
            session.peer_raw_public_key_der()
    assert info.value.code == gnutls.E_UNSUPPORTED_CERTIFICATE_TYPE


def test_key_pair_matches_tells_belonging_pairs_from_strangers():
    """A raw-key pair is checked for belonging together (GnuTLS does not, on load)."""
    from mandos import keys
    public, private = keys.generate_tls_keypair()
    other_public, _ = keys.generate_tls_keypair()
    assert gnutls.key_pair_matches(public, bytes(private))
    assert not gnutls.key_pair_matches(other_public, bytes(private))
    with pytest.raises(gnutls.GnuTLSError):
        gnutls.key_pair_matches(b"not a key", bytes(private))
