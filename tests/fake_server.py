"""A scriptable stand-in for a Mandos server, for testing mandos-client.

It speaks the real protocol with our own GnuTLS binding: the Mandos server
is the TLS *client* (``Role.CLIENT``) and the machine asking for its
password is the TLS server.  Each accepted connection is handed to a
*scenario*, a function of a :class:`Connection`, which decides what the
server does: read the version line, shake hands, send a secret properly or
improperly, stall, or misbehave in some other way.  Every connection is
recorded (time, version line, key ID, outcome) so that tests can count
attempts and measure the pauses between them.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from mandos import gnutls, keys

Scenario = Callable[["Connection"], None]


class Connection:
    """One accepted TCP connection and what the scenario learned from it."""

    def __init__(self, server: "FakeServer", sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.number = number  # 0 for the first connection
        self.accepted_at = time.monotonic()
        self.version_line: bytes | None = None
        self.session: gnutls.Session | None = None
        self.protocol: str | None = None
        self.peer_der: bytes | None = None
        self.key_id: str | None = None
        self.early_bytes: bytes | None = None
        self.outcome = "open"
        self.error: BaseException | None = None

    # --- steps a scenario can take ---------------------------------------

    def read_version_line(self, limit: int = 100) -> bytes:
        """Read up to and including the first LF, one byte at a time.

        One byte at a time so that nothing the client might send after the
        line is consumed here.
        """
        line = bytearray()
        while len(line) < limit:
            byte = self.sock.recv(1)
            if not byte:
                break
            line += byte
            if byte == b"\n":
                break
        self.version_line = bytes(line)
        return self.version_line

    def bytes_waiting(self, wait: float = 0.3) -> bytes:
        """What the client sends within ``wait`` seconds (peeked, not consumed)."""
        ready, _, _ = select.select([self.sock], [], [], wait)
        if not ready:
            self.early_bytes = b""
        else:
            try:
                self.early_bytes = self.sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                self.early_bytes = b""
        return self.early_bytes

    def handshake(self, priority: str = gnutls.DEFAULT_PRIORITY) -> gnutls.Session:
        """TLS handshake as the TLS client; records the peer's key and key ID."""
        session = gnutls.Session(gnutls.Role.CLIENT, self.server.credentials, priority)
        self.session = session
        session.set_transport(self.sock)
        session.set_handshake_timeout(20)
        session.handshake()
        self.protocol = session.protocol_version()
        self.peer_der = session.peer_raw_public_key_der()
        self.key_id = keys.key_id(self.peer_der)
        return session

    def send_properly(self, data: bytes) -> None:
        """Send ``data`` (may be empty), then close_notify, then wait for the peer's."""
        assert self.session is not None
        if data:
            self.session.send_all(data)
        self.session.bye(gnutls.SHUT_RDWR)
        self.outcome = "sent" if data else "sent nothing"

    def send_then_drop(self, data: bytes) -> None:
        """Send ``data``, then close the TCP connection without close_notify."""
        assert self.session is not None
        self.session.send_all(data)
        time.sleep(0.05)  # let the records reach the peer before the FIN
        self.sock.shutdown(socket.SHUT_RDWR)
        self.outcome = "dropped"

    def stall(self) -> None:
        """Hold the connection open, sending nothing, until the server stops."""
        self.outcome = "stalled"
        self.server.stopping.wait()

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        try:
            self.sock.close()
        except OSError:
            pass


# --- ready-made scenarios ----------------------------------------------------

def send_secret(secret: bytes) -> Scenario:
    """The normal case: version line, handshake, secret, close_notify."""
    def scenario(conn: Connection) -> None:
        conn.read_version_line()
        conn.handshake()
        conn.send_properly(secret)
    return scenario


def not_approved(conn: Connection) -> None:
    """An unknown, disabled or denied client: a TLS session carrying zero bytes."""
    conn.read_version_line()
    conn.handshake()
    conn.send_properly(b"")


def secret_without_close_notify(secret: bytes) -> Scenario:
    """The secret, followed by a TCP close instead of close_notify."""
    def scenario(conn: Connection) -> None:
        conn.read_version_line()
        conn.handshake()
        conn.send_then_drop(secret)
    return scenario


def close_before_tls(conn: Connection) -> None:
    """Read the version line and hang up (an unsupported protocol version)."""
    conn.read_version_line()
    conn.outcome = "closed before TLS"


def garbage_instead_of_client_hello(conn: Connection) -> None:
    """Answer the version line with bytes that are not a TLS record."""
    conn.read_version_line()
    conn.sock.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(range(256)))
    # Wait for the client to give up on the handshake before closing.
    select.select([conn.sock], [], [], 5)
    conn.outcome = "sent garbage"


def stall_before_tls(conn: Connection) -> None:
    """Read the version line, then never start TLS."""
    conn.read_version_line()
    conn.stall()


def stall_after_handshake(conn: Connection) -> None:
    """Shake hands, then keep the session open without sending (awaiting approval)."""
    conn.read_version_line()
    conn.handshake()
    conn.stall()


def in_turn(*scenarios: Scenario) -> Scenario:
    """Connection n gets ``scenarios[n]``; the last one is repeated."""
    def scenario(conn: Connection) -> None:
        scenarios[min(conn.number, len(scenarios) - 1)](conn)
    return scenario


class FakeServer:
    """Listens on a loopback address; runs ``scenario`` for each connection in a thread.

    With ``listen=False`` the socket is only bound (connections to it are
    refused) until :meth:`listen` is called.
    """

    def __init__(self, scenario: Scenario, host: str = "127.0.0.1", *,
                 listen: bool = True) -> None:
        self.scenario = scenario
        self.host = host
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.credentials = gnutls.CertificateCredentials()
        self.connections: list[Connection] = []
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.listener = socket.socket(self.family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.port = self.listener.getsockname()[1]
        self.acceptor: threading.Thread | None = None
        if listen:
            self.listen()

    @property
    def address(self) -> str:
        """The ``--connect`` argument for this server."""
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def listen(self) -> None:
        self.listener.listen(5)
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            with self.lock:
                conn = Connection(self, sock, len(self.connections))
                self.connections.append(conn)
                self.changed.notify_all()
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: Connection) -> None:
        try:
            self.scenario(conn)
        except (gnutls.GnuTLSError, OSError) as err:
            conn.error = err
            conn.outcome = f"failed: {err}"
        finally:
            conn.close()
            with self.lock:
                self.changed.notify_all()

    # --- observations -----------------------------------------------------

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.connections)

    def wait_for_connections(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` connections were accepted."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.connections) >= count, timeout)

    def wait_until(self, predicate: Callable[["FakeServer"], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds (checked whenever a connection changes)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.05))
            return True

    def stop(self) -> None:
        self.stopping.set()
        if self.acceptor is not None:
            self.acceptor.join(5)
        self.listener.close()
        for thread in self.threads:
            thread.join(5)
        self.credentials.close()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
