"""One connection attempt: TCP, the version line, TLS, the encrypted secret.

The Mandos client is the TLS *server* here: it presents its raw public key
and does not authenticate its peer; the secret is protected end to end by
OpenPGP encryption to this machine's key.  This module only speaks the
protocol; retry policy and decryption belong to the caller.
"""

import errno
import socket

from mandos import gnutls
from mandos.client.servers import ServerAddress
from mandos import lazylog

log = lazylog.get_logger(__name__)

PROTOCOL_VERSION_LINE = b"1\r\n"
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 30.0
# A secret is an OpenPGP message of a few kilobytes; refuse absurd amounts.
MAX_SECRET_SIZE = 1024 * 1024


class AttemptFailed(Exception):
    """This attempt did not produce data; try again later."""


class Unreachable(AttemptFailed):
    """connect() failed with "network/host unreachable" (a route may help)."""


def connect(server: ServerAddress, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    """Open the TCP connection to ``server``; raises AttemptFailed."""
    try:
        # Numeric addresses only, as the original: no name look-ups, no
        # "127.1" shorthand, no empty address meaning "any".
        socket.inet_pton(server.family, server.address)
    except (OSError, ValueError):
        raise AttemptFailed(f"Bad address: {server.address}") from None
    if server.family == socket.AF_INET6 and server.is_link_local() and not server.ifindex:
        raise AttemptFailed("IPv6 link-local address is incomplete without a "
                            "network interface")
    try:
        sock = socket.socket(server.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as err:
        raise AttemptFailed(f"socket: {err.strerror}") from None
    try:
        sock.settimeout(timeout)
        sock.connect(server.sockaddr())
        sock.settimeout(None)
        # Small TLS flights must go out at once: with Nagle's algorithm a
        # flight can wait for the peer's delayed ACK (tens of milliseconds).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A server that vanishes while we wait (its approval delay may be
        # long) must not hold us forever: let TCP keep-alive notice.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except (socket.gaierror, ValueError) as err:
        sock.close()
        raise AttemptFailed(f"bad address {server.address!r}: {err}") from None
    except socket.timeout:
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


def fetch_secret(sock: socket.socket, credentials: "gnutls.CertificateCredentials",
                 priority: str, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 after_handshake=None, should_abort=None) -> bytes:
    """Speak the protocol over a connected socket; return the received bytes.

    ``after_handshake()``, if given, is called once the TLS handshake is
    done, while the server decides and sends.  ``should_abort()`` is asked
    whenever a blocking TLS call is interrupted; true abandons the attempt.

    Returns the data only if the server ended the TLS stream with
    close_notify; zero bytes (the server's way of saying no) raise
    AttemptFailed, as does every TLS error.
    """
    try:
        sock.sendall(PROTOCOL_VERSION_LINE)
    except OSError as err:
        raise AttemptFailed(f"sending the protocol version: {err.strerror}") from None
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
