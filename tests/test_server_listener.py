"""Accepting and serving Mandos clients (mandos.server.listener), SERVER.md §6, §7, §9.

Everything is real: loopback sockets, GnuTLS handshakes, the asyncio event
loop (each test runs its own with ``asyncio.run``), Client and
ClientRegistry.  The connecting side is our TLS server role in threads (what
mandos-client does on the wire), or the real mandos-client programs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import errno
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from mandos import gnutls, keys, openpgp
from mandos.openpgp import GnuPGHome
from mandos.server import listener as listener_module
from mandos.server.client import Client, ClientObserver
from mandos.server.clients_conf import ClientConfig
from mandos.server.listener import Listener
from mandos.server.registry import ClientRegistry, ServerObserver

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
OUR_CLIENT = REPO / "plugins.d" / "mandos-client"
T = 10.0  # limit for peer steps that should be quick
SECRET = b"\x00not really OpenPGP\r\n\xff" * 50
PASSWORD = b"listener passphrase \x00\xff\n"


# -- keys -------------------------------------------------------------------------

class TLSKey:
    """A client's TLS key pair, its key ID and credentials presenting it."""

    def __init__(self) -> None:
        public_pem, private_pem = keys.generate_tls_keypair()
        self.public_pem = public_pem
        self.private_pem = bytes(private_pem)
        self.key_id = keys.key_id(serialization.load_pem_public_key(public_pem))
        self.creds = gnutls.RawPublicKeyCredentials(self.public_pem, self.private_pem)


@pytest.fixture(scope="module")
def alice() -> TLSKey:
    key = TLSKey()
    yield key
    key.creds.close()


@pytest.fixture(scope="module")
def bob() -> TLSKey:
    key = TLSKey()
    yield key
    key.creds.close()


@pytest.fixture(scope="module")
def stranger() -> TLSKey:
    key = TLSKey()
    yield key
    key.creds.close()


# -- the connecting side (blocking; run in threads) ---------------------------------

def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(T)
    sock.connect((host, port))
    sock.settimeout(None)
    return sock


def tls_fetch(sock: socket.socket, key: TLSKey,
              after_handshake: Callable[[], None] | None = None) -> bytes:
    """What mandos-client does after the version line: TLS server, read to close_notify."""
    with gnutls.Session(gnutls.Role.SERVER, key.creds) as session:
        session.set_transport(sock)
        session.set_handshake_timeout(T)
        session.handshake()
        if after_handshake is not None:
            after_handshake()
        data = session.recv_until_close_notify()  # raises without close_notify
        session.bye(gnutls.SHUT_RDWR)
        return data


def fetch(port: int, key: TLSKey, host: str = "127.0.0.1", version: bytes = b"1\r\n",
          after_handshake: Callable[[], None] | None = None) -> bytes:
    """One whole unlock attempt; the bytes received."""
    with connect(port, host) as sock:
        sock.sendall(version)
        return tls_fetch(sock, key, after_handshake)


def read_to_end(sock: socket.socket, timeout: float = T) -> bytes:
    """Everything until the server closes (b"" if it sends nothing)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def blocking(call: Callable, *args) -> object:
    """Run a blocking peer call in a thread of its own and await it."""
    future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(call(*args))
        except BaseException as err:
            future.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return await asyncio.wrap_future(future)


async def many(count: int, call: Callable, *args) -> list:
    """``count`` concurrent ``call(*args)``, each in its own thread; results or exceptions."""
    return await asyncio.gather(*(blocking(call, *args) for _ in range(count)),
                                return_exceptions=True)


async def eventually(predicate: Callable[[], bool], timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- the server side ------------------------------------------------------------------

async def no_checker(command: str) -> int:
    return 0


class Events(ClientObserver, ServerObserver):
    """Records client signals and server events."""

    def __init__(self) -> None:
        self.signals: list[tuple] = []
        self.not_found: list[tuple[str, str]] = []

    def client_signal(self, client, signal, *args) -> None:
        self.signals.append((client.name, signal, *args))

    def client_not_found(self, key_id: str, address: str) -> None:
        self.not_found.append((key_id, address))

    def named(self, signal: str) -> list[tuple]:
        return [s for s in self.signals if s[1] == signal]


def make_client(name: str, key: TLSKey, events: Events, **settings) -> Client:
    settings.setdefault("secret", SECRET)
    client = Client(ClientConfig(name=name, key_id=key.key_id, **settings), no_checker)
    client.observers.append(events)
    return client


@contextlib.asynccontextmanager
async def serving(*clients: Client, host: str = "127.0.0.1", events: Events | None = None,
                  **options):
    """A Listener on a fresh loopback port serving ``clients``."""
    registry = ClientRegistry()
    if events is not None:
        registry.observers.append(events)
    for client in clients:
        registry.add(client)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(listener_module.LISTEN_BACKLOG)
        listener = Listener(sock, registry, **options)
        await listener.start()
        try:
            yield listener
        finally:
            await listener.close()
            for client in clients:
                client.stop()
    finally:
        sock.close()


def run(coroutine) -> None:
    asyncio.run(asyncio.wait_for(coroutine, 50))


def tls_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mandos-tls")]


def logged(caplog, level: str, text: str) -> bool:
    return any(r.levelname == level and text in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True)
def _log_everything(caplog):
    caplog.set_level(logging.DEBUG, logger="mandos")


# -- delivery -------------------------------------------------------------------------

def test_a_known_client_gets_its_secret_byte_exact(alice, caplog):
    events = Events()
    secret = bytes(range(256)) * 200  # several TLS records

    async def main():
        client = make_client("alice", alice, events, secret=secret)
        async with serving(client) as listener:
            assert await blocking(fetch, listener.port, alice) == secret
            await eventually(lambda: events.named("GotSecret"))
            assert client.expires is not None

    run(main())
    assert logged(caplog, "INFO", "TCP connection from 127.0.0.1")
    assert logged(caplog, "INFO", "Sending secret to alice")
    assert not any(secret[:16] in r.getMessage().encode("latin-1", "replace")
                   for r in caplog.records)


def test_a_known_client_gets_its_secret_over_ipv6(alice):
    async def main():
        async with serving(make_client("alice", alice, Events()), host="::1") as listener:
            assert await blocking(fetch, listener.port, alice, "::1") == SECRET

    run(main())


def test_the_secret_counts_as_sent_before_the_peers_close_notify(alice):
    # GotSecret (and the longer expiry) as soon as the secret went out, even
    # while the bye still waits for a peer that is slow to answer it.
    events = Events()
    release = threading.Event()

    def slow_fetch(port: int) -> bytes:
        with connect(port) as sock:
            sock.sendall(b"1\r\n")
            with gnutls.Session(gnutls.Role.SERVER, alice.creds) as session:
                session.set_transport(sock)
                session.set_handshake_timeout(T)
                session.handshake()
                data = session.recv_until_close_notify()
                release.wait(T)
                session.bye(gnutls.SHUT_RDWR)
                return data

    async def main():
        async with serving(make_client("alice", alice, events)) as listener:
            task = asyncio.ensure_future(blocking(slow_fetch, listener.port))
            await eventually(lambda: events.named("GotSecret"), 5)
            assert listener.connections == 1 and not task.done()
            release.set()
            assert await task == SECRET

    run(main())


def test_the_secret_is_read_when_it_is_sent(alice):
    # A secret replaced (over D-Bus) while a connection waits is the one sent.
    async def main():
        client = make_client("alice", alice, Events(), approval_delay=datetime.timedelta(seconds=30))
        async with serving(client) as listener:
            task = asyncio.ensure_future(blocking(fetch, listener.port, alice))
            await eventually(lambda: client.approvals_pending == 1)
            client.set_secret(b"new secret")
            client.approve(True)
            assert await task == b"new secret"

    run(main())


# -- the version line (PROTOCOL.md §3.2) -------------------------------------------------

@pytest.mark.parametrize("line", [b"1\r\n", b"1\n", b"0\r\n", b"-1 and more\r\n"])
def test_version_lines_up_to_1_are_accepted(alice, line):
    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            assert await blocking(fetch, listener.port, alice, "127.0.0.1", line) == SECRET

    run(main())


@pytest.mark.parametrize("line", [b"2\r\n", b"x\r\n", b"\r\n", b"1" * 2000 + b"\r\n",
                                  b"GET / HTTP/1.0\r\n\r\n"])
def test_refused_version_lines_close_the_connection_without_tls(alice, caplog, line):
    def attempt(port: int) -> bytes:
        with connect(port) as sock:
            sock.sendall(line)
            return read_to_end(sock)

    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            # Nothing at all comes back: not even a TLS ClientHello.
            assert await blocking(attempt, listener.port) == b""
            # ... and the server goes on serving.
            assert await blocking(fetch, listener.port, alice) == SECRET

    run(main())
    assert logged(caplog, "ERROR", "Unknown protocol version from 127.0.0.1")


def test_a_connection_closed_before_the_version_line_is_refused(alice, caplog):
    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            await blocking(lambda: connect(listener.port).close())
            await eventually(lambda: listener.connections == 0 and logged(
                caplog, "ERROR", "Unknown protocol version"))
            assert await blocking(fetch, listener.port, alice) == SECRET

    run(main())


# -- identification and refusals (§3.4, §3.5) ----------------------------------------

def test_an_unknown_client_gets_zero_bytes_and_is_reported(alice, stranger, caplog):
    events = Events()

    async def main():
        async with serving(make_client("alice", alice, events), events=events) as listener:
            assert await blocking(fetch, listener.port, stranger) == b""

    run(main())
    assert events.not_found == [(stranger.key_id, "127.0.0.1")]
    assert logged(caplog, "INFO", f"Client not found for key ID {stranger.key_id}")


def test_an_ipv4_peer_on_a_dual_stack_socket_is_reported_ipv4_mapped(stranger):
    events = Events()

    async def main():
        # Bound to the IPv4-mapped loopback address: dual stack, loopback only.
        async with serving(host="::ffff:127.0.0.1", events=events) as listener:
            assert await blocking(fetch, listener.port, stranger, "127.0.0.1") == b""

    run(main())
    assert events.not_found == [(stranger.key_id, "::ffff:127.0.0.1")]


def test_a_disabled_client_gets_zero_bytes(alice):
    events = Events()

    async def main():
        async with serving(make_client("alice", alice, events, enabled=False)) as listener:
            assert await blocking(fetch, listener.port, alice) == b""

    run(main())
    assert events.named("Rejected") == [("alice", "Rejected", "Disabled")]
    assert not events.named("GotSecret")


def test_a_peer_without_a_raw_public_key_is_a_bad_certificate(alice, caplog, tmp_path):
    import ssl
    from test_server_protocol import x509_certificate

    cert, key = x509_certificate()
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")

    def x509_client(port: int) -> bytes:
        with connect(port) as sock:
            sock.sendall(b"1\r\n")
            sock.settimeout(T)
            with context.wrap_socket(sock, server_side=True) as tls:
                return tls.recv(100)  # b"" at close_notify

    async def main():
        async with serving(make_client("alice", alice, Events()),
                           priority="NORMAL:-VERS-ALL:+VERS-TLS1.3") as listener:
            # A bye with no data, and the server goes on serving.
            assert await blocking(x509_client, listener.port) == b""
            assert await blocking(x509_client, listener.port) == b""

    run(main())
    assert logged(caplog, "WARNING", "Bad certificate from 127.0.0.1")


# -- approval (SERVER.md §9) -----------------------------------------------------------

def test_approval_wait_holds_the_connection_open_until_approved(alice):
    events = Events()

    async def main():
        client = make_client("alice", alice, events, approved_by_default=False,
                             approval_delay=datetime.timedelta(seconds=30))
        async with serving(client) as listener:
            task = asyncio.ensure_future(blocking(fetch, listener.port, alice))
            await eventually(lambda: client.approvals_pending == 1)
            await asyncio.sleep(0.3)
            assert not task.done()  # still connected, nothing received yet
            assert listener.connections == 1
            assert listener.busy_slots == 0  # and no thread held for it
            client.approve(True)
            assert await task == SECRET

    run(main())
    assert [s[1] for s in events.signals] == ["NeedApproval", "GotSecret"]


def test_a_denied_client_gets_zero_bytes(alice):
    events = Events()

    async def main():
        client = make_client("alice", alice, events, approved_by_default=True,
                             approval_delay=datetime.timedelta(seconds=30))
        async with serving(client) as listener:
            task = asyncio.ensure_future(blocking(fetch, listener.port, alice))
            await eventually(lambda: client.approvals_pending == 1)
            client.approve(False)
            assert await task == b""

    run(main())
    assert events.named("Rejected") == [("alice", "Rejected", "Denied")]


def test_an_approval_timeout_with_approved_by_default_sends(alice):
    async def main():
        client = make_client("alice", alice, Events(), approved_by_default=True,
                             approval_delay=datetime.timedelta(seconds=0.3))
        async with serving(client) as listener:
            started = time.monotonic()
            assert await blocking(fetch, listener.port, alice) == SECRET
            assert time.monotonic() - started >= 0.3

    run(main())


def test_waiting_connections_hold_no_threads(alice, bob):
    # 100 connections wait for approval with a pool of 4 threads; another
    # known client is still served at once.
    events = Events()

    async def main():
        waiting = make_client("alice", alice, events, approved_by_default=False,
                              approval_delay=datetime.timedelta(seconds=40))
        other = make_client("bob", bob, events)
        async with serving(waiting, other, max_handshakes=4) as listener:
            tasks = asyncio.ensure_future(many(100, fetch, listener.port, alice))
            await eventually(lambda: waiting.approvals_pending == 100, 30)
            assert listener.busy_slots == 0
            assert len(tls_threads()) <= 4
            started = time.monotonic()
            assert await blocking(fetch, listener.port, bob) == SECRET
            assert time.monotonic() - started < 5
            waiting.approve(True)
            assert await tasks == [SECRET] * 100

    run(main())
    assert len(events.named("GotSecret")) == 101


def test_a_failed_send_is_logged_and_no_secret_counts_as_sent(alice, caplog):
    events = Events()

    def hang_up(sock: socket.socket) -> None:
        # Reset instead of a close_notify: SO_LINGER with a zero time.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def attempt(port: int) -> None:
        sock = connect(port)
        sock.sendall(b"1\r\n")
        with gnutls.Session(gnutls.Role.SERVER, alice.creds) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(T)
            session.handshake()
        hang_up(sock)
        sock.close()

    async def main():
        client = make_client("alice", alice, events, approved_by_default=False,
                             approval_delay=datetime.timedelta(seconds=30),
                             secret=b"x" * (4 << 20))
        async with serving(client) as listener:
            await blocking(attempt, listener.port)
            await eventually(lambda: client.approvals_pending == 1)
            await asyncio.sleep(0.1)
            client.approve(True)
            await eventually(lambda: listener.connections == 0)

    run(main())
    assert logged(caplog, "WARNING", "Sending the secret to alice (127.0.0.1) failed")
    assert not events.named("GotSecret")


# -- misbehaving peers ------------------------------------------------------------------

def test_a_garbage_handshake_is_logged_and_the_next_client_served(alice, caplog):
    def garbage(port: int) -> bytes:
        with connect(port) as sock:
            sock.sendall(b"1\r\n")
            sock.recv(10)  # the ClientHello has begun
            sock.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(range(256)))
            return read_to_end(sock)

    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            await blocking(garbage, listener.port)
            assert await blocking(fetch, listener.port, alice) == SECRET

    run(main())
    assert logged(caplog, "WARNING", "Handshake failed with 127.0.0.1")


def test_a_silent_client_is_dropped_after_the_timeout_without_blocking_others(alice, caplog):
    def silent(port: int) -> float:
        with connect(port) as sock:
            started = time.monotonic()
            assert read_to_end(sock) == b""
            return time.monotonic() - started

    async def main():
        async with serving(make_client("alice", alice, Events()), handshake_timeout=0.5,
                           max_handshakes=1) as listener:
            silent_ones = asyncio.ensure_future(many(3, silent, listener.port))
            await eventually(lambda: listener.connections == 3)
            started = time.monotonic()
            assert await blocking(fetch, listener.port, alice) == SECRET
            assert time.monotonic() - started < 0.5
            for waited in await silent_ones:
                assert 0.4 < waited < 3

    run(main())
    assert logged(caplog, "WARNING", "No protocol version line from 127.0.0.1")


def test_a_client_silent_in_the_handshake_is_dropped_after_the_timeout(alice, caplog):
    def silent_after_version(port: int) -> float:
        with connect(port) as sock:
            sock.sendall(b"1\r\n")
            started = time.monotonic()
            read_to_end(sock)  # the ClientHello, then the close
            return time.monotonic() - started

    async def main():
        async with serving(make_client("alice", alice, Events()), handshake_timeout=0.5,
                           max_handshakes=2) as listener:
            stalled = asyncio.ensure_future(blocking(silent_after_version, listener.port))
            await eventually(lambda: listener.busy_slots == 1)
            assert await blocking(fetch, listener.port, alice) == SECRET
            assert 0.4 < await stalled < 3

    run(main())
    assert logged(caplog, "WARNING", "Handshake failed with 127.0.0.1")


def test_a_peer_trickling_bytes_cannot_stretch_the_handshake(alice, caplog):
    # GnuTLS checks its time limit only when the peer pauses; the listener's
    # watchdog shuts the socket down under it.
    def trickle(port: int) -> float:
        with connect(port) as sock:
            sock.sendall(b"1\r\n")
            sock.recv(10)
            started = time.monotonic()
            # A TLS record header announcing 16 kB, then one byte at a time.
            sock.sendall(b"\x16\x03\x03\x40\x00")
            try:
                while time.monotonic() - started < 8:
                    sock.sendall(b"\x00")
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return time.monotonic() - started

    async def main():
        async with serving(make_client("alice", alice, Events()),
                           handshake_timeout=0.5) as listener:
            assert await blocking(trickle, listener.port) < 0.5 + 1.0 + 1.5

    run(main())
    assert logged(caplog, "WARNING", "time limit reached")


def test_an_unlock_is_not_held_up_by_delayed_acks(alice):
    # Without TCP_NODELAY on the server's side, a small write after
    # unacknowledged data waits for the peer's delayed ACK (40 ms).
    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            await blocking(fetch, listener.port, alice)  # warm up
            times = []
            for _ in range(7):
                started = time.monotonic()
                assert await blocking(fetch, listener.port, alice) == SECRET
                times.append(time.monotonic() - started)
            assert sorted(times)[3] < 0.030

    run(main())


# -- load ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_200_concurrent_unlocks_all_succeed(alice, bob):
    events = Events()

    async def main():
        clients = (make_client("alice", alice, events), make_client("bob", bob, events))
        async with serving(*clients) as listener:
            results = await asyncio.gather(many(100, fetch, listener.port, alice),
                                           many(100, fetch, listener.port, bob))
            assert results == [[SECRET] * 100] * 2

    run(main())
    assert len(events.named("GotSecret")) == 200


# -- shutdown ---------------------------------------------------------------------------------

def test_close_leaves_no_threads_or_tasks(alice, bob):
    async def main():
        before = set(asyncio.all_tasks())
        waiting = make_client("alice", alice, Events(), approved_by_default=False,
                              approval_delay=datetime.timedelta(seconds=30))
        peers = []
        async with serving(waiting, make_client("bob", bob, Events()),
                           max_handshakes=2) as listener:
            assert await blocking(fetch, listener.port, bob) == SECRET
            # One waiting for approval, one silent before its version line,
            # one silent in its handshake.
            peers.append(asyncio.ensure_future(blocking(fetch, listener.port, alice)))
            silent = await blocking(connect, listener.port)
            stalled = await blocking(connect, listener.port)
            stalled.sendall(b"1\r\n")
            await eventually(lambda: waiting.approvals_pending == 1
                             and listener.connections == 3 and listener.busy_slots == 1)
            assert tls_threads()
            started = time.monotonic()
        assert time.monotonic() - started < 3
        assert not tls_threads()
        assert set(asyncio.all_tasks()) - set(peers) == before
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("mandos")]
        assert waiting.approvals_pending == 0
        assert listener.connections == 0
        # Cut off without close_notify: the client discards the attempt.
        with pytest.raises(gnutls.GnuTLSError):
            await peers[0]
        assert await blocking(read_to_end, silent) == b""
        read_to_end(stalled)
        silent.close()
        stalled.close()

    run(main())


def test_serve_forever_returns_after_close(alice):
    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            server = asyncio.ensure_future(listener.serve_forever())
            assert await blocking(fetch, listener.port, alice) == SECRET
            assert not server.done()
        await asyncio.wait_for(server, 5)

    run(main())


def test_accepting_goes_on_after_running_out_of_descriptors(alice, caplog):
    async def main():
        loop = asyncio.get_running_loop()
        real_accept = loop.sock_accept
        failures = [OSError(errno.EMFILE, "Too many open files")]

        async def flaky_accept(sock):
            if failures:
                await asyncio.sleep(0.05)
                raise failures.pop()
            return await real_accept(sock)

        loop.sock_accept = flaky_accept
        async with serving(make_client("alice", alice, Events())) as listener:
            assert await blocking(fetch, listener.port, alice) == SECRET

    run(main())
    assert logged(caplog, "ERROR", "Cannot accept a connection: [Errno 24]")


def test_an_invalid_priority_is_refused_at_once():
    with socket.socket() as sock, pytest.raises(gnutls.GnuTLSError):
        Listener(sock, ClientRegistry(), "NO-SUCH-PRIORITY")


# -- real clients ------------------------------------------------------------------------------

class KeyFiles:
    """Key files of one client in a world-readable folder (clients drop to uid 65534)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.secret = b""
        self.key_id = ""

    def args(self, port: int) -> list[str]:
        d = self.directory
        return ["--connect", f"127.0.0.1:{port}", "--interface", "none",
                "--pubkey", str(d / "pubkey.txt"), "--seckey", str(d / "seckey.txt"),
                "--tls-pubkey", str(d / "tls-pubkey.pem"),
                "--tls-privkey", str(d / "tls-privkey.pem")]


@pytest.fixture(scope="module")
def key_files() -> KeyFiles:
    directory = Path(tempfile.mkdtemp(prefix="mandos-listener-test-"))
    os.chmod(directory, 0o755)
    files = KeyFiles(directory)
    try:
        with GnuPGHome() as home:
            # Curve keys: quick to make.
            fingerprint = openpgp.generate_openpgp_key(
                home, "listener.example", key_type="EDDSA", subkey_type="ECDH",
                key_curve="ed25519", subkey_curve="cv25519")
            public, secret = home.export_keys(fingerprint)
            files.secret = home.encrypt(PASSWORD, fingerprint)
        keys.write_key_file(directory / "pubkey.txt", public.encode(), mode=0o644)
        keys.write_key_file(directory / "seckey.txt", secret.encode(), mode=0o644)
        tls_public, tls_private = keys.generate_tls_keypair()
        keys.write_key_file(directory / "tls-pubkey.pem", tls_public, mode=0o644)
        keys.write_key_file(directory / "tls-privkey.pem", bytes(tls_private), mode=0o644)
        files.key_id = keys.key_id(serialization.load_pem_public_key(tls_public))
        yield files
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def unlock_with(program: Path, files: KeyFiles) -> bytes:
    events = Events()
    client = Client(ClientConfig(name="real", key_id=files.key_id, secret=files.secret),
                    no_checker)
    client.observers.append(events)
    async with serving(client) as listener:
        process = await asyncio.create_subprocess_exec(
            str(program), *files.args(listener.port), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, stderr.decode(errors="replace")
        assert events.named("GotSecret")
        return stdout


@pytest.mark.slow
def test_our_mandos_client_unlocks_from_the_listener(key_files):
    async def main():
        assert await unlock_with(OUR_CLIENT, key_files) == PASSWORD

    run(main())


@pytest.mark.slow
@pytest.mark.interop
def test_the_original_mandos_client_unlocks_from_the_listener(key_files):
    import peers

    try:
        program = peers.client_libdir() / "plugins.d" / "mandos-client"
    except peers.PeerUnavailable as err:
        pytest.skip(f"original mandos-client not available: {err}")

    async def main():
        assert await unlock_with(program, key_files) == PASSWORD

    run(main())


# -- the load driver (bench/load_driver.py) ---------------------------------------------------

def _load_driver():
    import importlib.util

    spec = importlib.util.spec_from_file_location("load_driver", REPO / "bench" / "load_driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_load_driver_counts_unlocks(alice, stranger, tmp_path):
    driver = _load_driver()
    files = {}
    for name, key in (("alice", alice), ("stranger", stranger)):
        (tmp_path / f"{name}.pub").write_bytes(key.public_pem)
        (tmp_path / f"{name}.key").write_bytes(key.private_pem)
        files[name] = (str(tmp_path / f"{name}.pub"), str(tmp_path / f"{name}.key"))

    async def main():
        async with serving(make_client("alice", alice, Events())) as listener:
            known = await blocking(driver.run_load, "127.0.0.1", listener.port,
                                   files["alice"], 4, None, 40)
            unknown = await blocking(driver.run_load, "127.0.0.1", listener.port,
                                     files["stranger"], 2, None, 6)
        return known, unknown

    known, unknown = asyncio.run(main())
    assert (known["attempts"], known["unlocks"], known["failures"]) == (40, 40, 0)
    assert known["median_ms"] > 0 and known["p99_ms"] >= known["median_ms"]
    assert (unknown["unlocks"], unknown["empty"]) == (0, 6)


def test_the_load_driver_refuses_targets_off_loopback():
    driver = _load_driver()
    for address in ("192.0.2.1", "2001:db8::1"):
        with pytest.raises(ValueError):
            driver.loopback_target(address, 1)
    assert driver.loopback_target("::ffff:127.0.0.1", 1)
