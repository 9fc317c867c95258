"""The wire protocol of one connection, server side (PROTOCOL.md §3).

A Mandos client connects, sends a protocol version line in plain text and
then expects a TLS handshake in which *we* are the TLS client and it
presents its raw public key.  We identify it by the key ID (SHA-256 of its
DER SubjectPublicKeyInfo), and then either send its secret or nothing, and
always end with close_notify.

This module only speaks that protocol; what to send to whom is decided by
the caller (:mod:`mandos.server.listener`).  The TLS calls block, so a
:class:`Connection` is meant to be driven from a worker thread, one call at
a time; :meth:`Connection.abort` is the one method safe to call from any
thread while another call is running.  The version line can be read either
blocking (:func:`read_version_line`) or step by step from a non-blocking
socket (:func:`read_version_line_nowait`), so that an event loop can wait
for it without tying up a thread.

Deliberate differences from the original, both protecting the server from
its peers:
- the version line may be at most :data:`MAX_VERSION_LINE` bytes (the
  original reads an unbounded line into memory);
- every wait has a time limit (the original has none, so a peer that
  connects and says nothing holds its server process for ever).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

from mandos import gnutls

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
# Longest version line (LF included) we read.  A real client sends three
# bytes; the limit keeps a peer from making us buffer without bound.
MAX_VERSION_LINE = 1024

__all__ = [
    "PROTOCOL_VERSION", "MAX_VERSION_LINE", "ProtocolError", "BadVersionLine",
    "TimedOut", "HandshakeFailed", "BadCertificate", "SendFailed",
    "parse_version_line", "read_version_line_nowait", "read_version_line",
    "Connection",
]


class ProtocolError(Exception):
    """The conversation with a peer cannot go on; the message says why."""


class BadVersionLine(ProtocolError):
    """The version line is missing, too long, or names an unknown version.

    ``line`` holds what was read of it (for a debug log; the peer chose it).
    """

    def __init__(self, message: str, line: bytes = b"") -> None:
        super().__init__(message)
        self.line = line


class TimedOut(ProtocolError):
    """The peer did not send what we waited for in time."""


class HandshakeFailed(ProtocolError):
    """The TLS handshake failed (the connection is closed without a bye)."""


class BadCertificate(ProtocolError):
    """The peer presented no raw public key (wrong type, or none)."""


class SendFailed(ProtocolError):
    """The secret could not be sent."""


# -- the version line (PROTOCOL.md §3.2) ---------------------------------------

def parse_version_line(line: bytes) -> int:
    """The protocol version a line announces; BadVersionLine if it is refused.

    The first whitespace-separated field must be a base-10 integer of at
    most :data:`PROTOCOL_VERSION`.  Lower numbers (0, negative ones) are
    accepted and whatever follows the first field is ignored, as by the
    original (a quirk kept for compatibility).  The field is parsed as the
    original parses it, with Python's ``int()`` on the UTF-8 text.
    """
    try:
        fields = line.decode("utf-8").split()
    except UnicodeDecodeError:
        raise BadVersionLine("version line is not UTF-8 text", line) from None
    if not fields:
        raise BadVersionLine("empty version line", line)
    try:
        version = int(fields[0])
    except ValueError:
        raise BadVersionLine("version is not a number", line) from None
    if version > PROTOCOL_VERSION:
        raise BadVersionLine(f"unknown protocol version {version}", line)
    return version


def _consume(sock: socket.socket, count: int) -> bytes:
    """Take ``count`` bytes that a MSG_PEEK has just shown to be waiting."""
    taken = bytearray()
    while len(taken) < count:
        try:
            chunk = sock.recv(count - len(taken), socket.MSG_DONTWAIT)
        except InterruptedError:
            continue
        except BlockingIOError:
            # Peeked bytes of a stream socket cannot vanish; this is not TCP.
            raise ProtocolError("peeked bytes were not there to read") from None
        if not chunk:
            raise ProtocolError("peeked bytes were not there to read")
        taken += chunk
    return bytes(taken)


def read_version_line_nowait(sock: socket.socket, buffer: bytearray,
                             limit: int = MAX_VERSION_LINE) -> bytes | None:
    """One non-blocking step of reading the version line into ``buffer``.

    Returns the whole line (LF included) once it is there, None if more
    must be waited for (wait until the socket is readable and call again
    with the same buffer).  Raises BadVersionLine if the peer closed the
    connection first or the line grows beyond ``limit`` bytes.

    Never reads past the LF: the bytes after it belong to TLS.  It looks at
    the waiting bytes with MSG_PEEK and takes only those up to the LF; bytes
    without an LF among them are all part of the line and are taken, so
    that the next readiness wait waits for new bytes.
    """
    try:
        # Never look beyond the limit: a peer cannot make us buffer more.
        peeked = sock.recv(limit - len(buffer), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    if not peeked:
        raise BadVersionLine("connection closed before the end of the version line",
                             bytes(buffer))
    end = peeked.find(b"\n")
    buffer += _consume(sock, len(peeked) if end < 0 else end + 1)
    if end >= 0:
        return bytes(buffer)
    if len(buffer) >= limit:
        raise BadVersionLine(f"version line longer than {limit} bytes", bytes(buffer))
    return None


def read_version_line(sock: socket.socket, limit: int = MAX_VERSION_LINE,
                      timeout: float | None = None) -> bytes:
    """Read the version line, LF included, waiting at most ``timeout`` seconds.

    Blocking (it polls; the socket may be blocking or not).  Raises
    BadVersionLine (see :func:`read_version_line_nowait`) or TimedOut.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    buffer = bytearray()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        line = read_version_line_nowait(sock, buffer, limit)
        if line is not None:
            return line
        wait = None
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise TimedOut(f"no version line within {timeout} s")
        poller.poll(None if wait is None else wait * 1000)


# -- TLS and the rest of the conversation ---------------------------------------

class Connection:
    """One accepted connection: its socket and (after :meth:`handshake`) its TLS session.

    Owns both: :meth:`close` (or leaving the ``with`` block) frees the
    session and closes the socket.  ``timeout`` bounds the handshake and
    each later wait for the peer (sending, and its close_notify after
    ours), so that a silent or stalling peer cannot hold a worker thread
    for ever; None means no limit, as in the original.  ``peer`` is only
    used in log messages.
    """

    def __init__(self, sock: socket.socket, credentials: gnutls.CertificateCredentials,
                 priority: str = gnutls.DEFAULT_PRIORITY, *,
                 timeout: float | None = None, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer
        self.session: gnutls.Session | None = None
        self._credentials = credentials
        self._priority = priority
        self._timeout = timeout
        self._aborted = threading.Event()

    # -- steps, in order ------------------------------------------------

    def handshake(self) -> str:
        """Do the TLS handshake as TLS client; return the peer's key ID.

        The key ID is 64 upper-case hex digits.  Raises HandshakeFailed (the
        caller then closes without a bye) or BadCertificate (the session is
        up: the caller should :meth:`bye`).
        """
        if self.session is not None:
            raise ValueError("handshake already done")
        try:
            session = gnutls.Session(gnutls.Role.CLIENT, self._credentials, self._priority)
        except gnutls.GnuTLSError as err:
            raise HandshakeFailed(str(err)) from None
        self.session = session
        try:
            session.set_transport(self.sock)
            session.set_handshake_timeout(self._timeout)
            session.set_read_timeout(self._timeout)
            session.handshake(self._aborted.is_set)
        except (gnutls.GnuTLSError, OSError) as err:
            raise HandshakeFailed(str(err)) from None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("TLS session with %s: %s", self.peer, session.description())
        try:
            # GnuTLS has parsed this key and checked the handshake signature
            # made with it, so the peer holds the matching private key.
            der = session.peer_raw_public_key_der()
        except gnutls.GnuTLSError as err:
            raise BadCertificate(str(err)) from None
        return gnutls.key_id_from_spki_der(der)

    def send(self, data: bytes) -> None:
        """Send ``data`` as it is: no length, framing or terminator.

        Raises SendFailed if it could not be sent; do not :meth:`bye` then
        (GnuTLS sessions are unusable after a send error, and a peer that
        stopped reading would only make us wait again).  The end of the data
        is marked only by the close_notify of the :meth:`bye` that follows.
        """
        session = self._live_session()
        try:
            session.send_all(data, self._aborted.is_set)
        except (gnutls.GnuTLSError, OSError) as err:
            raise SendFailed(str(err)) from None

    def send_secret(self, secret: bytes) -> None:
        """:meth:`send` the secret, then :meth:`bye`."""
        self.send(secret)
        self.bye()

    def bye(self) -> bool:
        """Send close_notify and wait for the peer's; True if that worked.

        Errors are only logged: by now nothing depends on them.  Without
        data before it, this is how every refusal looks on the wire.
        """
        session = self._live_session()
        try:
            session.bye(gnutls.SHUT_RDWR, self._aborted.is_set)
        except (gnutls.GnuTLSError, OSError) as err:
            log.warning("TLS bye with %s failed: %s", self.peer, err)
            return False
        return True

    # -- life cycle ------------------------------------------------------------

    def abort(self) -> None:
        """Make a running (or any later) TLS call give up soon; any thread.

        Besides the flag GnuTLS checks every fraction of a second, the
        socket is shut down, so that even a call kept busy by a peer that
        trickles bytes returns at once.
        """
        self._aborted.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more, or closed
            pass

    @property
    def aborted(self) -> bool:
        """:meth:`abort` was called."""
        return self._aborted.is_set()

    def _live_session(self) -> gnutls.Session:
        if self.session is None:
            raise ValueError("no TLS session: handshake first")
        return self.session

    def close(self) -> None:
        """Free the TLS session (sending nothing) and close the socket; idempotent."""
        if self.session is not None:
            self.session.close()
            self.session = None
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
