"""Trying the servers that Zeroconf finds until one gives the password.

CLIENT.md §2.9 describes the original's way: one attempt at a time, each
server tried when found and then kept in a ring that is walked every
``--retry`` seconds.  One unreachable server then holds up all the others
for as long as its connection takes to fail.  Here instead:

* a newly found server is tried at once, concurrently with whatever else
  is being tried (a few worker threads; an attempt spends its time waiting
  for the network or inside GnuTLS, which releases the interpreter lock);
* the first attempt that yields a password wins: :meth:`AttemptScheduler.run`
  returns it and every other attempt is abandoned, its outcome discarded;
* a server whose attempt failed is tried again ``retry`` seconds after
  that attempt ended, each server on its own clock, forever;
* the same server (address, port, family, interface) found twice is
  tried once: repeated announcements do not multiply the attempts;
* a stop request (``should_stop()`` true) or an exception in the calling
  thread (a signal handler's) ends everything within ``poll_interval``.

What ``try_server`` must be
---------------------------
``try_server(server)`` makes one attempt and returns the password (bytes)
or None for "failed, try again later"; whatever it raises ends
:meth:`~AttemptScheduler.run`, which re-raises it in the calling thread
(fatal set-up errors, the termination signal's exception).  It runs on a
worker thread, several at a time, so:

* its waits must be bounded (connect and handshake timeouts), or a dead
  server keeps a worker busy;
* it must not print or write the password: the caller does that once,
  with what ``run`` returns;
* anything it shares must be safe to use from several threads at once.
  The OpenPGP process is reached through one channel, so decryption must
  be serialised: either under a lock of the caller's, or by passing it as
  ``finish``, which the scheduler calls one at a time, and never for an
  attempt already abandoned;
* to end promptly when abandoned, it may ask :func:`abandoned` (for
  instance in GnuTLS's ``should_abort``) and register its connection with
  :func:`track`, which shuts the socket down on abandonment so that a
  blocked read returns at once.  Both are harmless outside a worker.

An abandoned attempt may still be running when ``run`` returns (the caller
writes the password without waiting for it).  :meth:`AttemptScheduler.close`
(or leaving the ``with`` block) waits for them, for a bounded time: do that
before freeing what they use, such as the TLS credentials.
"""

from __future__ import annotations

import itertools
import queue
import socket
import threading
import time

from mandos import lazylog
from mandos.client.servers import ServerAddress

# typing.TYPE_CHECKING without importing typing (2 ms at boot); type
# checkers treat any constant of this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Any, Callable, Iterable

    TryServer = Callable[[ServerAddress], bytes | None]

log = lazylog.get_logger(__name__)

MAX_CONCURRENT = 8  # attempts at once; more servers wait for a free worker
POLL_INTERVAL = 0.05  # seconds between looks at should_stop() and the queue
LINGER = 2.0  # seconds close() waits for abandoned attempts to end


def _key(server: ServerAddress) -> tuple[Any, ...]:
    """What makes two found servers the same one (addresses compared as numbers)."""
    try:
        address: Any = socket.inet_pton(server.family, server.address)
    except (OSError, ValueError):
        address = server.address
    return (server.family, address, server.port, server.ifindex)


class _Attempt:
    """One attempt at one server, as its worker thread and the scheduler see it."""

    def __init__(self, server: ServerAddress) -> None:
        self.server = server
        self.abandoned = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            sockets, self._sockets = self._sockets, []
            for sock in sockets:
                _shut_down(sock)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if self.abandoned:
                _shut_down(sock)
            else:
                self._sockets.append(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)


def _shut_down(sock: socket.socket) -> None:
    # shutdown() rather than close(): it wakes a thread blocked on the
    # socket (its read returns end-of-file) and leaves the descriptor, whose
    # number could otherwise be reused under that thread, to its owner.
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_current = threading.local()


def abandoned() -> bool:
    """True in an attempt's thread once the scheduler has given up on it."""
    attempt: _Attempt | None = getattr(_current, "attempt", None)
    return attempt is not None and attempt.abandoned


class track:  # noqa: N801 - used like a function: ``with track(sock):``
    """While in this block, abandoning the calling attempt shuts ``sock`` down.

    Close the socket only after the block (``with connect(...) as sock,
    track(sock):`` does it in that order).  Outside a worker it does nothing.
    """

    __slots__ = ("sock", "attempt")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.attempt: _Attempt | None = getattr(_current, "attempt", None)

    def __enter__(self) -> socket.socket:
        if self.attempt is not None:
            self.attempt.track(self.sock)
        return self.sock

    def __exit__(self, *exc_info: object) -> None:
        if self.attempt is not None:
            self.attempt.untrack(self.sock)


class _Server:
    """A distinct server and its retry clock."""

    __slots__ = ("address", "order", "due", "tries", "attempt")

    def __init__(self, address: ServerAddress, order: int, due: float) -> None:
        self.address = address
        self.order = order  # when it was found, among the servers
        self.due = due  # monotonic time of its next attempt
        self.tries = 0
        self.attempt: _Attempt | None = None  # the one running now


class AttemptScheduler:
    """Runs attempts at the servers it is given until one gives the password."""

    def __init__(self, try_server: TryServer, retry: float, *,
                 finish: Callable[[bytes], bytes | None] | None = None,
                 max_concurrent: int = MAX_CONCURRENT,
                 poll_interval: float = POLL_INTERVAL) -> None:
        """``retry``: seconds between the end of a failed attempt at a server
        and the next one.  ``finish(data)``, if given, turns what a
        successful ``try_server`` returned into the password (or None: the
        attempt failed after all); calls to it never overlap.
        """
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.try_server = try_server
        self.retry = max(0.0, retry)
        self.finish = finish
        self.max_concurrent = max_concurrent
        self.poll_interval = poll_interval
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._servers: dict[tuple[Any, ...], _Server] = {}
        self._running: dict[_Attempt, threading.Thread] = {}
        self._finish_lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._state_lock = threading.Lock()  # guards _running for close()
        self._running_run = False

    # -- feeding -----------------------------------------------------------
    def add(self, server: ServerAddress) -> None:
        """A server was found.  Thread-safe; wakes ``run`` at once."""
        self._events.put(("found", server))

    def _feed(self, servers: Iterable[ServerAddress]) -> None:
        try:
            for server in servers:
                self.add(server)
        except Exception:  # a broken source must not go unnoticed
            log.exception("Reading the found servers failed")

    # -- the loop ----------------------------------------------------------
    def run(self, should_stop: Callable[[], bool] = lambda: False,
            discovered: Iterable[ServerAddress] | queue.SimpleQueue[ServerAddress]
            | queue.Queue[ServerAddress] | None = None) -> bytes | None:
        """Try servers until one gives the password; return it.

        Servers come from :meth:`add` and from ``discovered``: a queue
        (looked at every ``poll_interval``) or any iterable (read on a
        thread of its own, so it may block between servers).  Returns None
        once ``should_stop()`` is true.  Whatever ``try_server``,
        ``finish`` or ``should_stop`` raise is raised here.  Every attempt
        still running is abandoned on the way out.
        """
        if self._running_run:
            raise RuntimeError("AttemptScheduler.run is already running")
        self._running_run = True
        source = None
        if discovered is not None:
            if hasattr(discovered, "get_nowait"):
                source = discovered
            else:
                threading.Thread(target=self._feed, args=(discovered,),
                                 name="mandos-servers", daemon=True).start()
        try:
            while True:
                if should_stop():
                    log.debug("Stopped while trying servers")
                    return None
                if source is not None:
                    self._drain(source)  # type: ignore[arg-type]
                timeout = self._start_due(time.monotonic())
                try:
                    event = self._events.get(timeout=timeout)
                except queue.Empty:
                    continue
                result = self._handle(event)
                if result is not None:
                    return result
        finally:
            self._running_run = False
            self.abandon()

    def _drain(self, source: queue.SimpleQueue[ServerAddress]) -> None:
        while True:
            try:
                self._found(source.get_nowait())
            except queue.Empty:
                return

    def _handle(self, event: tuple[Any, ...]) -> bytes | None:
        if event[0] == "found":
            self._found(event[1])
            return None
        _kind, attempt, result, error = event
        entry = self._servers[_key(attempt.server)]
        with self._state_lock:
            self._running.pop(attempt, None)
        entry.attempt = None
        if error is not None:
            raise error
        if result is not None:
            log.debug("Got the password from %s", attempt.server)
            return result
        entry.due = time.monotonic() + self.retry
        log.debug("Trying %s again in %g seconds", attempt.server, self.retry)
        return None

    def _found(self, server: ServerAddress) -> None:
        key = _key(server)
        if key in self._servers:
            log.debug("Already trying %s", server)
            return
        self._servers[key] = _Server(server, next(self._numbers), time.monotonic())

    def _start_due(self, now: float) -> float:
        """Start the attempts that are due; return how long to wait for events."""
        idle = [s for s in self._servers.values() if s.attempt is None]
        due = [s for s in idle if s.due <= now]
        # Servers never tried go first, then the longest overdue.
        due.sort(key=lambda s: (s.tries > 0, s.due, s.order))
        for entry in due:
            if len(self._running) >= self.max_concurrent:
                break
            self._start(entry)
        wait = self.poll_interval
        if len(self._running) < self.max_concurrent:
            waiting = [s.due for s in idle if s.attempt is None and s.due > now]
            if waiting:
                wait = min(wait, max(0.0, min(waiting) - now))
        return wait

    def _start(self, entry: _Server) -> None:
        attempt = _Attempt(entry.address)
        entry.attempt = attempt
        entry.tries += 1
        thread = threading.Thread(target=self._work, args=(attempt,), daemon=True,
                                  name=f"mandos-attempt-{entry.order}")
        with self._state_lock:
            self._running[attempt] = thread
        log.debug("Trying %s (attempt %d)", entry.address, entry.tries)
        thread.start()

    def _work(self, attempt: _Attempt) -> None:
        """One attempt, on its own thread; the outcome goes back to ``run``."""
        _current.attempt = attempt
        result: bytes | None = None
        error: BaseException | None = None
        try:
            result = self.try_server(attempt.server)
            if result is not None and self.finish is not None:
                with self._finish_lock:
                    result = None if attempt.abandoned else self.finish(result)
        except BaseException as caught:  # noqa: BLE001 - handed to the caller's thread
            error = caught
        finally:
            _current.attempt = None
        if attempt.abandoned:
            if error is not None:
                log.debug("An abandoned attempt at %s ended with %r", attempt.server, error)
            with self._state_lock:
                self._running.pop(attempt, None)
            return
        self._events.put(("done", attempt, result, error))

    # -- ending ------------------------------------------------------------
    def abandon(self) -> None:
        """Give up every running attempt (their outcomes are discarded)."""
        with self._state_lock:
            attempts = list(self._running)
        for attempt in attempts:
            attempt.abandon()
        for entry in self._servers.values():
            entry.attempt = None

    def close(self, timeout: float = LINGER) -> bool:
        """Abandon what still runs and wait up to ``timeout`` seconds for it to end.

        True when no attempt is left running.
        """
        self.abandon()
        deadline = time.monotonic() + timeout
        while True:
            with self._state_lock:
                threads = list(self._running.values())
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.debug("%d abandoned attempt(s) still running", len(alive))
                return False
            alive[0].join(remaining)

    def __enter__(self) -> AttemptScheduler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run(discovered: Iterable[ServerAddress] | queue.SimpleQueue[ServerAddress]
        | queue.Queue[ServerAddress],
        try_server: TryServer, retry: float, should_stop: Callable[[], bool], *,
        finish: Callable[[bytes], bytes | None] | None = None,
        max_concurrent: int = MAX_CONCURRENT, linger: float = LINGER) -> bytes | None:
    """Try the ``discovered`` servers until one gives the password; return it.

    None if ``should_stop()`` became true first.  Abandoned attempts are
    waited for (up to ``linger`` seconds) before returning.  See the module
    documentation for what ``try_server`` must be.
    """
    scheduler = AttemptScheduler(try_server, retry, finish=finish,
                                 max_concurrent=max_concurrent)
    try:
        return scheduler.run(should_stop, discovered)
    finally:
        scheduler.close(linger)
