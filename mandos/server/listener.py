"""Accepting Mandos client connections and serving each one concurrently.

Everything runs on the server's asyncio event loop (DESIGN.md §3 item 7):
each connection is a task.  The blocking GnuTLS calls (handshake, sending,
bye) run in a bounded thread pool; at most ``max_handshakes`` connections
are in such a call at once, and the rest queue for a slot without holding
a thread.  Reading the version line and waiting for an approval happen on
the loop and hold neither a thread nor a slot, so many clients waiting for
a human to approve them cost only their sockets.

Steps per connection, and their logs, follow SERVER.md §6 and §12.  The
listening socket belongs to the caller, who binds it and calls
``listen()``; use a generous backlog such as :data:`LISTEN_BACKLOG`.

Deliberate difference from the original: every wait for the peer before the
approval procedure has a time limit (``handshake_timeout``, used for the
version line, for the handshake, and for each wait while sending and
closing), so that peers that connect and stall cannot use up threads,
slots or descriptors for ever.  The approval wait itself is bounded by the
client's ``approval_delay``, as in the original.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import socket
from collections.abc import Callable
from typing import TypeVar

from mandos import gnutls
from mandos.server import protocol
from mandos.server.registry import ClientRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")

# For main's listen() call.  The original's backlog of 5 makes the kernel
# drop SYNs when many machines boot at once (each dropped SYN costs its
# client a one-second retransmission); connections are accepted quickly here,
# so a longer queue costs nothing.
LISTEN_BACKLOG = 128
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_MAX_HANDSHAKES = 64
# Time after a blocking call's own time limit at which the connection's
# socket is shut down under it.  GnuTLS checks its limits only when the peer
# pauses, so a peer trickling bytes could otherwise stretch them.
_WATCHDOG_GRACE = 1.0
# How much of a peer's version line goes into a log message.
_LOGGED_LINE = 80
# Pause after accept() failed for lack of descriptors or memory: the
# pending connection stays queued, and retrying at once would spin.
_ACCEPT_PAUSE = 0.1
_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# accept() errors that mean the listening socket is gone: stop accepting.
_ACCEPT_FATAL_ERRORS = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)


class Listener:
    """Serves Mandos clients on an already bound and listening socket.

    ``registry`` finds clients by key ID and reports unknown ones;
    ``priority`` is the GnuTLS priority string (checked here: an invalid one
    raises :class:`mandos.gnutls.GnuTLSError`).  ``handshake_timeout`` (s)
    bounds each wait for the peer; ``max_handshakes`` is the number of worker
    threads, i.e. of connections in a blocking TLS call at once.
    """

    def __init__(self, sock: socket.socket, registry: ClientRegistry,
                 priority: str = gnutls.DEFAULT_PRIORITY, *,
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_handshakes: int = DEFAULT_MAX_HANDSHAKES) -> None:
        if handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be positive")
        if max_handshakes < 1:
            raise ValueError("max_handshakes must be at least 1")
        self._sock = sock
        self._registry = registry
        self._priority = priority
        self._timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        # One set of (empty) certificate credentials serves every session.
        self._credentials = gnutls.CertificateCredentials()
        try:
            # Fail now, at start-up, rather than on every connection.
            gnutls.Session(gnutls.Role.CLIENT, self._credentials, priority).close()
        except BaseException:
            self._credentials.close()
            raise
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_handshakes, thread_name_prefix="mandos-tls")
        # The executor has as many threads as there are slots, so a job that
        # holds a slot never waits in the executor's queue.
        self._slots = asyncio.Semaphore(max_handshakes)
        self._busy = 0
        self._accept_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    # -- information -----------------------------------------------------------

    @property
    def socket(self) -> socket.socket:
        """The listening socket (still the caller's to close)."""
        return self._sock

    @property
    def port(self) -> int:
        """The port the socket listens on."""
        return self._sock.getsockname()[1]

    @property
    def connections(self) -> int:
        """Connections being served now (including those awaiting approval)."""
        return len(self._tasks)

    @property
    def busy_slots(self) -> int:
        """Connections in a blocking TLS call now (at most ``max_handshakes``)."""
        return self._busy

    # -- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Start accepting connections (in a task; returns at once)."""
        if self._closed:
            raise RuntimeError("listener is closed")
        if self._accept_task is None:
            self._sock.setblocking(False)  # required by loop.sock_accept()
            self._accept_task = asyncio.get_running_loop().create_task(
                self._accept_loop(), name="mandos accept")

    async def serve_forever(self) -> None:
        """Start if needed, and return only when accepting has stopped."""
        await self.start()
        assert self._accept_task is not None
        try:
            await asyncio.shield(self._accept_task)
        except asyncio.CancelledError:
            if not self._closed:
                raise

    async def close(self) -> None:
        """Stop accepting, end every connection, wait for them and the threads.

        Connections in a TLS call are aborted (their socket is shut down);
        those waiting for approval are cancelled.  The listening socket is
        left open for its owner to close.
        """
        self._closed = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Every job has finished (the tasks wait for theirs), so this is quick.
        self._executor.shutdown(wait=True)
        self._credentials.close()

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- accepting -------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(self._sock)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the peer gave up while queued
            except OSError as err:
                if err.errno in _ACCEPT_FATAL_ERRORS:
                    log.error("Cannot accept connections any more: %s", err)
                    return
                log.error("Cannot accept a connection: %s", err)
                if err.errno in _ACCEPT_RESOURCE_ERRORS:
                    await asyncio.sleep(_ACCEPT_PAUSE)
                continue
            task = loop.create_task(self._serve(sock, address),
                                    name=f"mandos connection {address[0]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one connection --------------------------------------------------------

    async def _serve(self, sock: socket.socket, address: tuple) -> None:
        # The peer's IP address as a string: on a dual-stack IPv6 socket an
        # IPv4 peer reads "::ffff:192.0.2.1", as in the original; a
        # link-local one may carry "%interface".
        peer = str(address[0])
        log.info("TCP connection from %s", peer)
        try:
            # The exchange is a few small messages, each its own send(); with
            # Nagle's algorithm one that follows unacknowledged data (the
            # close_notify after the secret, for one) waits for the peer's
            # delayed ACK, 40 ms on Linux: most of an unlock's time.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not TCP (a socket handed over by the caller)
            pass
        conn = protocol.Connection(sock, self._credentials, self._priority,
                                   timeout=self._timeout, peer=peer)
        try:
            await self._converse(conn, peer)
        except asyncio.CancelledError:
            raise
        except OSError as err:
            log.warning("Connection from %s failed: %s", peer, err)
        except Exception:
            # A bug must cost one connection, never the server.
            log.exception("Unexpected error serving %s", peer)
        finally:
            conn.close()

    async def _converse(self, conn: protocol.Connection, peer: str) -> None:
        # 1. The version line, read on the loop: a peer that says nothing
        # holds no thread and no slot, and only for the time limit.
        try:
            async with asyncio.timeout(self._timeout):
                line = await self._read_version_line(conn.sock)
        except TimeoutError:
            log.warning("No protocol version line from %s within %g s", peer, self._timeout)
            return
        except protocol.BadVersionLine as err:
            log.error("Unknown protocol version from %s: %s: %r", peer, err,
                      err.line[:_LOGGED_LINE])
            return
        # %r and a length limit: the line is the peer's choice, and must not
        # put control characters or kilobytes into the log.
        log.debug("Protocol version line from %s: %r", peer, line[:_LOGGED_LINE])
        try:
            protocol.parse_version_line(line)
        except protocol.BadVersionLine as err:
            log.error("Unknown protocol version from %s: %s: %r", peer, err,
                      line[:_LOGGED_LINE])
            return

        # 2. TLS handshake and key ID, in a worker thread.
        conn.sock.setblocking(True)  # the worker threads use blocking calls
        try:
            key_id = await self._in_thread(conn, conn.handshake)
        except protocol.HandshakeFailed as err:
            log.warning("Handshake failed with %s: %s%s", peer, err,
                        " (time limit reached)" if conn.aborted else "")
            return
        except protocol.BadCertificate as err:
            log.warning("Bad certificate from %s: %s", peer, err)
            await self._in_thread(conn, conn.bye)
            return
        log.debug("Key ID of %s: %s", peer, key_id)

        # 3. Who is it?
        client = self._registry.find_by_key_id(key_id)
        if client is None:
            self._registry.not_found(key_id, peer)
            await self._in_thread(conn, conn.bye)
            return

        # 4. The approval procedure, on the loop; may wait a long time.
        if not await client.may_have_secret():
            await self._in_thread(conn, conn.bye)
            return

        # 5. The secret as it is now (it may have been changed while waiting),
        # then close_notify, which marks the end of the secret.  It counts
        # as sent once sent: the bye only waits for the peer's close_notify.
        # (A secret is a few kilobytes: one time limit is ample to send it.)
        try:
            await self._in_thread(conn, conn.send, client.secret)
        except protocol.SendFailed as err:
            log.warning("Sending the secret to %s (%s) failed: %s", client.name, peer, err)
            return
        client.secret_sent()
        await self._in_thread(conn, conn.bye)

    async def _read_version_line(self, sock: socket.socket) -> bytes:
        buffer = bytearray()
        while True:
            line = protocol.read_version_line_nowait(sock, buffer)
            if line is not None:
                return line
            await _readable(sock)

    async def _in_thread(self, conn: protocol.Connection, call: Callable[..., T],
                         *args: object) -> T:
        """Run a blocking TLS call of ``conn`` in a worker thread, holding a slot.

        The call's own time limit (plus a grace period) is enforced by
        aborting the connection under it.  If this task is
        cancelled, the call is aborted too, and waited for before the
        cancellation goes on: the connection must not be closed while a
        thread still uses it.
        """
        loop = asyncio.get_running_loop()
        async with self._slots:
            self._busy += 1
            future = asyncio.wrap_future(self._executor.submit(call, *args))
            watchdog = loop.call_later(self._timeout + _WATCHDOG_GRACE, conn.abort)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                conn.abort()
                while not future.done():
                    try:
                        await asyncio.wait({future})
                    except asyncio.CancelledError:
                        pass
                if not future.cancelled():
                    future.exception()  # mark it retrieved: expected after an abort
                raise
            finally:
                watchdog.cancel()
                self._busy -= 1


async def _readable(sock: socket.socket) -> None:
    """Wait until ``sock`` has something to read (or is closed)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
