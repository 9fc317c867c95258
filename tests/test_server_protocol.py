"""The server's side of one connection (mandos.server.protocol), PROTOCOL.md §3.

Real sockets (socket pairs and loopback TCP), real GnuTLS handshakes.  The
peer is our own TLS server role (what mandos-client does) in a thread, or
Python's ``ssl`` module where a peer must present an X.509 certificate.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mandos import gnutls, keys
from mandos.server import protocol
from mandos.server.protocol import (BadCertificate, BadVersionLine, Connection,
                                    HandshakeFailed, SendFailed, TimedOut)

pytestmark = pytest.mark.timeout(30)

T = 5.0  # generous limit for steps that should be quick


# -- helpers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_key() -> tuple[bytes, bytes, str]:
    """A client's TLS key pair as mandos-keygen writes it, and its key ID."""
    public_pem, private_pem = keys.generate_tls_keypair()
    key_id = keys.key_id(serialization.load_pem_public_key(public_pem))
    return public_pem, bytes(private_pem), key_id


@pytest.fixture
def server_creds():
    with gnutls.CertificateCredentials() as creds:
        yield creds


@pytest.fixture
def pair():
    """A connected pair of stream sockets: (ours, the peer's)."""
    ours, theirs = socket.socketpair()
    try:
        yield ours, theirs
    finally:
        ours.close()
        theirs.close()


class Peer(threading.Thread):
    """Runs ``action(sock)`` in a thread; keeps its result or exception."""

    def __init__(self, sock: socket.socket, action: Callable[[socket.socket], object]) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.action = action
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.action(self.sock)
        except BaseException as err:  # reported by outcome()
            self.error = err

    def outcome(self, timeout: float = T) -> object:
        self.join(timeout)
        assert not self.is_alive(), "peer still running"
        if self.error is not None:
            raise self.error
        return self.result


def mandos_client(tls_key) -> Callable[[socket.socket], bytes]:
    """The TLS side of mandos-client: handshake, read until close_notify, bye."""
    def action(sock: socket.socket) -> bytes:
        with gnutls.RawPublicKeyCredentials(tls_key[0], tls_key[1]) as creds, \
                gnutls.Session(gnutls.Role.SERVER, creds) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(T)
            session.set_read_timeout(T)
            session.handshake()
            data = session.recv_until_close_notify()
            session.bye(gnutls.SHUT_RDWR)
            return data
    return action


def x509_certificate() -> tuple[bytes, bytes]:
    """A self-signed ECDSA certificate and its key, PEM."""
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-raw-key")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(private.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            private.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


# -- the version line: acceptance (§3.2) ------------------------------------------

@pytest.mark.parametrize("line, version", [
    (b"1\r\n", 1),
    (b"1\n", 1),
    (b"0\r\n", 0),
    (b"-7\r\n", -7),  # quirk: every integer <= 1 is accepted
    (b"  1 and whatever follows\r\n", 1),
    (b"1\t2\r\n", 1),
])
def test_version_line_with_an_integer_at_most_1_is_accepted(line, version):
    assert protocol.parse_version_line(line) == version


@pytest.mark.parametrize("line", [
    b"2\r\n", b"10\r\n", b"x\r\n", b"1.0\r\n", b"\r\n", b"\n", b"", b"   \r\n",
    b"\xff\xfe\r\n", b"one\r\n",
])
def test_version_line_that_is_empty_not_an_integer_or_above_1_is_refused(line):
    with pytest.raises(BadVersionLine):
        protocol.parse_version_line(line)


# -- the version line: reading -------------------------------------------------------

def test_reading_the_version_line_stops_at_the_lf(pair):
    ours, theirs = pair
    after = b"\x16\x03\x01 these bytes are TLS"
    theirs.sendall(b"1\r\n" + after)
    assert protocol.read_version_line(ours, timeout=T) == b"1\r\n"
    theirs.close()
    rest = b""
    while chunk := ours.recv(100):
        rest += chunk
    assert rest == after


def test_nonblocking_reading_waits_for_the_rest_of_a_split_line(pair):
    ours, theirs = pair
    ours.setblocking(False)
    buffer = bytearray()
    assert protocol.read_version_line_nowait(ours, buffer) is None  # nothing yet
    theirs.sendall(b"1")
    assert protocol.read_version_line_nowait(ours, buffer) is None
    assert buffer == b"1"
    theirs.sendall(b"\r")
    assert protocol.read_version_line_nowait(ours, buffer) is None
    theirs.sendall(b"\nTLS")
    assert protocol.read_version_line_nowait(ours, buffer) == b"1\r\n"
    assert ours.recv(100) == b"TLS"


def test_blocking_reading_assembles_a_trickled_line(pair):
    ours, theirs = pair

    def trickle(sock: socket.socket) -> None:
        for byte in b"1\r\nX":
            sock.sendall(bytes([byte]))
            time.sleep(0.05)

    peer = Peer(theirs, trickle)
    assert protocol.read_version_line(ours, timeout=T) == b"1\r\n"
    peer.outcome()
    assert ours.recv(10) == b"X"


def test_a_line_of_exactly_the_limit_is_read(pair):
    ours, theirs = pair
    line = b"1" + b" " * (protocol.MAX_VERSION_LINE - 3) + b"\r\n"
    assert len(line) == protocol.MAX_VERSION_LINE
    theirs.sendall(line + b"next")
    assert protocol.read_version_line(ours, timeout=T) == line
    assert ours.recv(10) == b"next"


def test_an_overlong_line_is_refused_without_reading_beyond_the_limit(pair):
    ours, theirs = pair
    theirs.sendall(b"1" * 3000 + b"\r\n")
    with pytest.raises(BadVersionLine) as info:
        protocol.read_version_line(ours, timeout=T)
    assert len(info.value.line) == protocol.MAX_VERSION_LINE
    ours.setblocking(False)
    rest = ours.recv(10000)
    assert len(rest) == 3002 - protocol.MAX_VERSION_LINE


def test_a_closed_connection_before_the_lf_is_refused(pair):
    ours, theirs = pair
    theirs.sendall(b"1\r")
    theirs.shutdown(socket.SHUT_WR)
    with pytest.raises(BadVersionLine) as info:
        protocol.read_version_line(ours, timeout=T)
    assert info.value.line == b"1\r"


def test_a_silent_peer_times_out(pair):
    ours, _ = pair
    started = time.monotonic()
    with pytest.raises(TimedOut):
        protocol.read_version_line(ours, timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 2


# -- TLS: handshake and key ID (§3.3, §3.4) -----------------------------------------

def test_handshake_gives_the_key_id_of_the_clients_public_key(pair, server_creds, tls_key):
    ours, theirs = pair
    peer = Peer(theirs, mandos_client(tls_key))
    with Connection(ours, server_creds, timeout=T) as conn:
        key_id = conn.handshake()
        assert key_id == tls_key[2]
        assert len(key_id) == 64 and key_id == key_id.upper()
        assert conn.session.protocol_version() == "TLS1.3"
        conn.bye()
    assert peer.outcome() == b""


def test_secret_arrives_byte_exact_and_ends_with_close_notify(pair, server_creds, tls_key):
    ours, theirs = pair
    # Several TLS records' worth, every byte value, and a NUL at each end.
    secret = b"\x00" + bytes(range(256)) * 300 + b"\r\n\x00"
    peer = Peer(theirs, mandos_client(tls_key))
    with Connection(ours, server_creds, timeout=T) as conn:
        conn.handshake()
        conn.send_secret(secret)
    # recv_until_close_notify returns only if the stream ended with close_notify.
    assert peer.outcome() == secret


def test_bye_without_data_is_a_clean_empty_session(pair, server_creds, tls_key):
    ours, theirs = pair
    peer = Peer(theirs, mandos_client(tls_key))
    with Connection(ours, server_creds, timeout=T) as conn:
        conn.handshake()
        assert conn.bye() is True
    assert peer.outcome() == b""


def test_bye_errors_are_only_logged(pair, server_creds, tls_key, caplog):
    ours, theirs = pair

    def hang_up_after_handshake(sock: socket.socket) -> None:
        with gnutls.RawPublicKeyCredentials(tls_key[0], tls_key[1]) as creds, \
                gnutls.Session(gnutls.Role.SERVER, creds) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(T)
            session.handshake()
        sock.close()  # no close_notify

    peer = Peer(theirs, hang_up_after_handshake)
    with Connection(ours, server_creds, timeout=T, peer="peer-x") as conn:
        conn.handshake()
        peer.outcome()
        assert conn.bye() is False
    assert any(r.levelname == "WARNING" and "peer-x" in r.getMessage()
               for r in caplog.records)


def test_garbage_instead_of_tls_fails_the_handshake(pair, server_creds):
    ours, theirs = pair
    theirs.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(range(256)))
    with Connection(ours, server_creds, timeout=T) as conn:
        with pytest.raises(HandshakeFailed):
            conn.handshake()


def test_a_silent_peer_fails_the_handshake_after_the_timeout(pair, server_creds):
    ours, _ = pair
    started = time.monotonic()
    with Connection(ours, server_creds, timeout=0.5) as conn:
        with pytest.raises(HandshakeFailed):
            conn.handshake()
    assert 0.4 <= time.monotonic() - started < 3


def test_abort_ends_a_handshake_that_has_no_time_limit(pair, server_creds):
    ours, _ = pair
    conn = Connection(ours, server_creds, timeout=None)
    threading.Timer(0.3, conn.abort).start()
    started = time.monotonic()
    with conn, pytest.raises(HandshakeFailed):
        conn.handshake()
    assert time.monotonic() - started < 3
    assert conn.aborted


def test_a_peer_presenting_x509_is_a_bad_certificate(tmp_path, server_creds):
    cert, key = x509_certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        theirs, _ = server.accept()

    def x509_server(sock: socket.socket) -> bytes:
        sock.settimeout(T)
        with context.wrap_socket(sock, server_side=True) as tls:
            data = tls.recv(100)  # b"" at close_notify
            return data

    peer = Peer(theirs, x509_server)
    # A priority that lets X.509 be negotiated at all; ours excludes it.
    with Connection(ours, server_creds, "NORMAL:-VERS-ALL:+VERS-TLS1.3", timeout=T) as conn:
        with pytest.raises(BadCertificate):
            conn.handshake()
        conn.bye()
    assert peer.outcome() == b""


def test_sending_to_a_vanished_peer_fails(pair, server_creds, tls_key):
    ours, theirs = pair

    def hang_up_after_handshake(sock: socket.socket) -> None:
        with gnutls.RawPublicKeyCredentials(tls_key[0], tls_key[1]) as creds, \
                gnutls.Session(gnutls.Role.SERVER, creds) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(T)
            session.handshake()
        sock.close()

    peer = Peer(theirs, hang_up_after_handshake)
    with Connection(ours, server_creds, timeout=T) as conn:
        conn.handshake()
        peer.outcome()
        with pytest.raises(SendFailed):
            # Enough to overflow the socket buffer of a closed peer.
            conn.send_secret(b"s" * (4 << 20))


# -- ownership ------------------------------------------------------------------------

def test_connection_frees_its_session_and_closes_its_socket(pair, server_creds, tls_key):
    ours, theirs = pair
    peer = Peer(theirs, mandos_client(tls_key))
    with Connection(ours, server_creds, timeout=T) as conn:
        conn.handshake()
        session = conn.session
        conn.bye()
    peer.outcome()
    assert session.closed
    assert conn.session is None
    assert ours.fileno() == -1
    conn.close()  # idempotent


def test_credentials_are_freed_once_the_connections_are_closed(pair, tls_key):
    ours, theirs = pair
    creds = gnutls.CertificateCredentials()
    peer = Peer(theirs, mandos_client(tls_key))
    conn = Connection(ours, creds, timeout=T)
    conn.handshake()
    creds.close()  # deferred: a session still uses them
    assert not creds.closed
    conn.bye()
    conn.close()
    peer.outcome()
    assert creds.closed


def test_nothing_but_the_wire_protocol_lives_here():
    # One concern per module: no registry, client policy or event loop.
    source = Path(protocol.__file__).read_text()
    for name in ("registry", "asyncio", "may_have_secret", "mandos.server.client"):
        assert name not in source
