"""One connection attempt: TCP, the version line, TLS, the encrypted secret.

The Mandos client is the TLS *server* here: it presents its raw public key
and does not authenticate its peer; the secret is protected end to end by
OpenPGP encryption to this machine's key.  This module only speaks the
protocol; retry policy and decryption belong to the caller.
"""

import _socket  # not socket: see mandos/client/servers.py
import errno

from mandos.client.servers import ServerAddress
from mandos import lazylog

log = lazylog.get_logger(__name__)

PROTOCOL_VERSION_LINE = b"1\r\n"
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 30.0
# A secret is an OpenPGP message of a few kilobytes; refuse absurd amounts.
MAX_SECRET_SIZE = 1024 * 1024


class Connection(_socket.socket):
    """A TCP socket that closes at the end of a ``with`` block."""

    __slots__ = ()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AttemptFailed(Exception):
    """This attempt did not produce data; try again later."""


class Unreachable(AttemptFailed):
    """connect() failed with "network/host unreachable" (a route may help)."""


def connect(server: ServerAddress, timeout: float = CONNECT_TIMEOUT) -> Connection:
    """Open the TCP connection to ``server``; raises AttemptFailed."""
    try:
        # Numeric addresses only, as the original: no name look-ups, no
        # "127.1" shorthand, no empty address meaning "any".
        _socket.inet_pton(server.family, server.address)
    except (OSError, ValueError):
        raise AttemptFailed(f"Bad address: {server.address}") from None
    if server.family == _socket.AF_INET6 and server.is_link_local() and not server.ifindex:
        raise AttemptFailed("IPv6 link-local address is incomplete without a "
                            "network interface")
    try:
        sock = Connection(server.family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError as err:
        raise AttemptFailed(f"socket: {err.strerror}") from None
    try:
        sock.settimeout(timeout)
        sock.connect(server.sockaddr())
        sock.settimeout(None)
        # Small TLS flights must go out at once: with Nagle's algorithm a
        # flight can wait for the peer's delayed ACK (tens of milliseconds).
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        # A server that vanishes while we wait (its approval delay may be
        # long) must not hold us forever: let TCP keep-alive notice.
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_KEEPCNT, 3)
    except (_socket.gaierror, ValueError) as err:
        sock.close()
        raise AttemptFailed(f"bad address {server.address!r}: {err}") from None
    except TimeoutError:
        sock.close()
        raise AttemptFailed(f"connecting to {server} timed out") from None
    except OSError as err:
        sock.close()
        if err.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise Unreachable(f"{server}: {err.strerror}") from None
        raise AttemptFailed(f"connect to {server}: {err.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def send_version(sock: _socket.socket) -> None:
    """Send the protocol version line; raises AttemptFailed."""
    try:
        sock.sendall(PROTOCOL_VERSION_LINE)
    except OSError as err:
        raise AttemptFailed(f"sending the protocol version: {err.strerror}") from None


def fetch_secret(sock: _socket.socket, credentials: "gnutls.CertificateCredentials",
                 priority: str, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 after_handshake=None, should_abort=None,
                 version_sent: bool = False) -> bytes:
    """Speak the protocol over a connected socket; return the received bytes.

    The version line is sent first unless ``version_sent`` says the caller
    did that (see ``send_version``).  ``after_handshake()``, if given, is
    called once the TLS handshake is done, while the server decides and
    sends.  ``should_abort()`` is asked whenever a blocking TLS call is
    interrupted; true abandons the attempt.

    Returns the data only if the server ended the TLS stream with
    close_notify; zero bytes (the server's way of saying no) raise
    AttemptFailed, as does every TLS error.
    """
    if not version_sent:
        send_version(sock)
    # Imported here: connecting first lets the server start its side of
    # the handshake while ctypes and the library load.
    from mandos import gnutls
    try:
        with gnutls.Session(gnutls.Role.SERVER, credentials, priority) as session:
            session.set_transport(sock)
            session.set_handshake_timeout(handshake_timeout)
            session.handshake(should_abort)
            log.debug("TLS handshake done: %s", session.description())
            if after_handshake is not None:
                after_handshake()
            data = session.recv_until_close_notify(limit=MAX_SECRET_SIZE,
                                                   should_abort=should_abort)
            try:
                session.bye(gnutls.SHUT_RDWR, should_abort)
            except gnutls.GnuTLSError as err:
                log.debug("Closing the TLS session: %s", err)
    except gnutls.GnuTLSError as err:
        raise AttemptFailed(f"TLS: {err}") from None
    if not data:
        raise AttemptFailed("the server sent nothing (unknown, disabled or "
                            "unapproved client)")
    return data
