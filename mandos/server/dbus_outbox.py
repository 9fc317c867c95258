"""Sending D-Bus messages in order, at the pace the socket takes them.

dbus-fast 1.84 (Debian 12) has two faults in its asyncio writer that a
busy server meets (both fixed upstream later): when messages queue up it
sends the newest first, and when the socket's send buffer is full it takes
the ``EAGAIN`` of ``send()`` for a broken connection and disconnects.  A
burst of signals (many clients at start-up, a ``GetManagedObjects`` reply
while signals go out) fills the buffer of a Unix socket easily.

:class:`Outbox` keeps its own queue and gives dbus-fast one message at a
time, only when the previous one has been written completely and the
socket has room, so that dbus-fast's writer never queues and never writes
into a full socket.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import select

from dbus_fast import Message
from dbus_fast.aio import MessageBus

log = logging.getLogger(__name__)


class Outbox:
    """Sends messages strictly in order, one at a time, never into a full socket.

    While the socket is full, the queue waits and the socket is looked at
    again every few milliseconds.
    """

    RETRY_DELAY = 0.002

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._queue: collections.deque[Message] = collections.deque()
        self._writing: asyncio.Future | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # dbus-fast offers no public way to the socket; _sock is its attribute.
        self._poll = select.poll()
        self._poll.register(bus._sock.fileno(), select.POLLOUT)

    def send(self, message: Message) -> None:
        """Queue ``message``; it goes out after everything queued before it."""
        if not self._bus.connected:
            return
        self._queue.append(message)
        self._idle.clear()
        self._pump()

    def _room(self) -> bool:
        return bool(self._poll.poll(0))  # POLLOUT, or an error that send() will report

    def _pump(self) -> None:
        while self._writing is None and self._retry is None and self._queue:
            if not self._room():
                self._retry = asyncio.get_running_loop().call_later(self.RETRY_DELAY,
                                                                    self._retried)
                return
            message = self._queue.popleft()
            try:
                future = self._bus.send(message)
            except Exception:  # e.g. a value that cannot be marshalled
                log.exception("Could not send D-Bus message %s.%s",
                              message.interface, message.member)
                continue
            if future.done():
                self._check(future)
            else:
                self._writing = future
                future.add_done_callback(self._written)
        if self._writing is None and self._retry is None and not self._queue:
            self._idle.set()

    def _retried(self) -> None:
        self._retry = None
        self._pump()

    def _written(self, future: asyncio.Future) -> None:
        self._writing = None
        self._check(future)
        self._pump()

    def _check(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is not None:
            if self._queue:
                log.warning("D-Bus connection failed, %d messages not sent: %s",
                            len(self._queue), future.exception())
            self._queue.clear()

    def close(self) -> None:
        """Forget whatever is still queued."""
        self._queue.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Wait until everything queued has been written (or ``timeout`` passes)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("D-Bus: %d messages not sent before closing", len(self._queue))
