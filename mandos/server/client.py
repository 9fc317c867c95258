"""One client's run-time state and the policy that decides about its secret.

A client is *enabled* while it has been seen alive recently: every
successful checker run pushes its expiry ``timeout`` into the future, and
when the expiry passes the client is disabled.  A disabled client never gets
its secret.  With an ``approval_delay``, a connecting client also waits for a
human decision (SERVER.md §8, §9).

Everything here runs on the server's asyncio event loop.  Other parts of
the server (D-Bus, persistence) follow changes through
:class:`ClientObserver` callbacks; this module knows nothing about them.

Deliberate differences from the original (each has a test):
- disabling a client is logged, and wakes connections waiting for approval
  (they are then refused at once);
- a client disabled while its connection waited for approval does not get
  its secret when the wait runs out, even if ``approved_by_default``;
- sending the secret never shortens the expiry (``extended_timeout`` only
  lengthens it);
- a new approval decision cancels the reset timer of the previous one, so
  an earlier decision can no longer cut a later one short;
- ``last_approval_request`` is updated whether or not D-Bus is on.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Callable

from mandos import timespec
from mandos.server.clients_conf import ClientConfig, render_checker

log = logging.getLogger(__name__)

NO_CHECKER_YET = -2
CHECKER_KILLED_BY_SIGNAL = -1


def utcnow() -> datetime.datetime:
    """Naive UTC now, the original's timestamp convention."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class ClientObserver:
    """Receives a client's changes; subclasses override what they need."""

    def property_changed(self, client: "Client", name: str) -> None:
        """Attribute ``name`` of ``client`` has a new value."""

    def client_signal(self, client: "Client", signal: str, *args) -> None:
        """An event: CheckerCompleted, CheckerStarted, GotSecret, NeedApproval, Rejected."""


class Client:
    """A configured client, its run-time state, and the rules that change it.

    Attribute names follow SERVER.md §8.1.  ``checker_runner(command)`` is a
    coroutine function that runs one checker and returns its wait status
    (see :mod:`mandos.server.checker`); tests give a fake one.
    """

    # Attributes whose changes observers hear about.
    OBSERVED = ("host", "checker_command", "timeout", "extended_timeout", "interval",
                "approval_delay", "approval_duration", "approved_by_default", "enabled",
                "last_enabled", "expires", "last_checked_ok", "last_checker_status",
                "last_approval_request", "approvals_pending", "checker_running", "secret")

    # A server may have thousands of clients: no per-instance __dict__.
    __slots__ = ("name", "key_id", "fingerprint", "secret", "host", "checker_command",
                 "timeout", "extended_timeout", "interval", "approval_delay",
                 "approval_duration", "approved_by_default", "enabled", "_now",
                 "created", "last_enabled", "expires", "last_checked_ok",
                 "last_checker_status", "last_checker_signal", "last_approval_request",
                 "approved", "approvals_pending", "current_checker_command",
                 "observers", "_run_checker", "_checker_task", "_checker_timer",
                 "_disable_timer", "_approval_reset", "_waiters",
                 "extra_checker_attributes")

    def __init__(self, config: ClientConfig, checker_runner: Callable,
                 now: Callable[[], datetime.datetime] = utcnow) -> None:
        self.name = config.name
        self.key_id = config.key_id
        self.fingerprint = config.fingerprint
        self.secret = config.secret
        self.host = config.host
        self.checker_command = config.checker_command
        self.timeout = config.timeout
        self.extended_timeout = config.extended_timeout
        self.interval = config.interval
        self.approval_delay = config.approval_delay
        self.approval_duration = config.approval_duration
        self.approved_by_default = config.approved_by_default
        self.enabled = config.enabled
        self._now = now
        self.created = now()
        self.last_enabled = self.created if self.enabled else None
        self.expires = self.created + self.timeout if self.enabled else None
        self.last_checked_ok: datetime.datetime | None = None
        self.last_checker_status = NO_CHECKER_YET
        self.last_checker_signal: int | None = None
        self.last_approval_request: datetime.datetime | None = None
        self.approved: bool | None = None
        self.approvals_pending = 0
        self.current_checker_command: str | None = None
        self.observers: list[ClientObserver] = []
        self._run_checker = checker_runner
        self._checker_task: asyncio.Task | None = None
        self._checker_timer: asyncio.TimerHandle | None = None
        self._disable_timer: asyncio.TimerHandle | None = None
        self._approval_reset: asyncio.TimerHandle | None = None
        self._waiters: set[asyncio.Future] = set()
        self.extra_checker_attributes: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"<Client {self.name!r} {'enabled' if self.enabled else 'disabled'}>"

    # -- observation ------------------------------------------------------

    def _set(self, name: str, value) -> None:
        if getattr(self, name) != value:
            setattr(self, name, value)
            self._changed(name)

    def _changed(self, name: str) -> None:
        for observer in list(self.observers):
            observer.property_changed(self, name)

    def _signal(self, signal: str, *args) -> None:
        for observer in list(self.observers):
            observer.client_signal(self, signal, *args)

    @property
    def checker_running(self) -> bool:
        """A checker process is running now."""
        return self._checker_task is not None and not self._checker_task.done()

    # -- enable and disable (§8.2) -----------------------------------------

    def enable(self) -> None:
        """Enable; the first checker runs one interval from now."""
        if self.enabled:
            return
        self._set("enabled", True)
        self._set("last_enabled", self._now())
        log.info("Client %s enabled", self.name)
        self.init_checker(randomize=False)
        self._wake_waiters()

    def disable(self, quiet: bool = False) -> None:
        """Disable: no more checkers, no secret, waiting connections refused."""
        if not self.enabled:
            return
        self._cancel(self._disable_timer)
        self._disable_timer = None
        self._set("expires", None)
        self._cancel(self._checker_timer)
        self._checker_timer = None
        self.stop_checker()
        self._set("enabled", False)
        if not quiet:
            log.info("Client %s disabled", self.name)
        self._wake_waiters()

    # -- expiry (§8.5) ----------------------------------------------------

    def _schedule_disable(self) -> None:
        self._cancel(self._disable_timer)
        self._disable_timer = None
        if self.expires is None:
            return
        delay = (self.expires - self._now()).total_seconds()
        loop = asyncio.get_running_loop()
        self._disable_timer = loop.call_later(max(delay, 0), self._expired)

    def _expired(self) -> None:
        self._disable_timer = None
        if self.enabled:
            log.info("Client %s has expired: not seen alive since %s", self.name,
                     self.last_checked_ok or "it was enabled")
            self.disable(quiet=True)

    def bump_timeout(self, duration: datetime.timedelta | None = None,
                     only_extend: bool = False) -> None:
        """Set the expiry to now + ``duration`` (default ``timeout``), if enabled."""
        if not self.enabled:
            return
        expires = self._now() + (self.timeout if duration is None else duration)
        if only_extend and self.expires is not None and self.expires > expires:
            return
        self._set("expires", expires)
        self._schedule_disable()

    def checked_ok(self) -> None:
        """The client was seen alive (a checker succeeded, or CheckedOK())."""
        self._set("last_checked_ok", self._now())
        self._set("last_checker_status", 0)
        self.bump_timeout()

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        """New ``timeout``: the expiry moves by the difference."""
        old = self.timeout
        self._set("timeout", timeout)
        if self.enabled and self.expires is not None:
            expires = self.expires + (timeout - old)
            self._set("expires", expires)
            if expires <= self._now():
                self.disable()
            else:
                self._schedule_disable()

    def set_interval(self, interval: datetime.timedelta) -> None:
        """New ``interval``: checkers now repeat at it, starting with one now."""
        self._set("interval", interval)
        if self.enabled and self._checker_timer is not None:
            self._repeat_checker(interval)
            self.start_checker()

    # -- checkers (§8.3, §8.4) ----------------------------------------------

    def init_checker(self, randomize: bool) -> None:
        """Schedule checkers; ``randomize`` spreads the first one over one interval."""
        self._cancel(self._checker_timer)
        interval_ms = timespec.milliseconds(self.interval)
        if randomize:
            delay = datetime.timedelta(milliseconds=random.randint(0, max(interval_ms, 0)))
        else:
            delay = self.interval
        loop = asyncio.get_running_loop()
        if randomize:
            self._checker_timer = loop.call_later(delay.total_seconds(), self._first_checker)
        else:
            self._checker_timer = loop.call_later(delay.total_seconds(), self._scheduled_checker)
        self._set("expires", self._now() + delay + self.interval)
        self._schedule_disable()

    def _first_checker(self) -> None:
        self.start_checker()
        self._repeat_checker(self.interval)
        expires = self._now() + self.interval
        if self.expires is None or expires > self.expires:
            self._set("expires", expires)

    def _repeat_checker(self, interval: datetime.timedelta) -> None:
        self._cancel(self._checker_timer)
        loop = asyncio.get_running_loop()
        self._checker_timer = loop.call_later(interval.total_seconds(), self._scheduled_checker)

    def _scheduled_checker(self) -> None:
        self._repeat_checker(self.interval)
        if self.enabled:
            self.start_checker()

    def checker_attributes(self) -> dict[str, object]:
        """What ``%(attr)s`` in a checker command may name (SERVER.md §4.2)."""
        attributes = {name: getattr(self, name) for name in (
            "approval_delay", "approval_duration", "created", "enabled", "expires",
            "key_id", "fingerprint", "host", "interval", "last_approval_request",
            "last_checked_ok", "last_enabled", "name", "timeout")}
        attributes.update(self.extra_checker_attributes)
        return attributes

    def start_checker(self) -> bool:
        """Start a checker unless one is running; True if one was started.

        A slow checker is never killed for being slow: the next scheduled
        run is skipped instead.
        """
        if self.checker_running:
            return False
        try:
            command = render_checker(self.checker_command, self.checker_attributes())
        except (KeyError, ValueError, TypeError) as err:
            log.error("Could not format the checker command %r of client %s: %s",
                      self.checker_command, self.name, err)
            return False
        self.current_checker_command = command
        log.info("Starting checker %r for %s", command, self.name)
        self._checker_task = asyncio.get_running_loop().create_task(
            self._checker(command), name=f"checker {self.name}")
        self._signal("CheckerStarted", command)
        self._changed("checker_running")
        return True

    async def _checker(self, command: str) -> None:
        try:
            status = await self._run_checker(command)
        except asyncio.CancelledError:
            # Killed by stop_checker(), which told the observers: no result,
            # no CheckerCompleted.
            raise
        except OSError as err:
            log.error("Could not run checker %r for %s: %s", command, self.name, err)
            self._checker_task = None
            self._changed("checker_running")
            return
        self._checker_task = None
        self._changed("checker_running")
        self._checker_done(command, status)

    def _checker_done(self, command: str, wait_status: int) -> None:
        if wait_status >= 0 and wait_status & 0x7F == 0:
            exit_code = wait_status >> 8
            self._signal("CheckerCompleted", exit_code, wait_status, command)
            if exit_code == 0:
                log.info("Checker for %s succeeded", self.name)
                self.checked_ok()
            else:
                log.info("Checker for %s failed", self.name)
                self._set("last_checker_status", exit_code)
        else:
            signal_number = wait_status & 0x7F
            log.warning("Checker for %s crashed?", self.name)
            self.last_checker_signal = signal_number
            self._set("last_checker_status", CHECKER_KILLED_BY_SIGNAL)
            # The original's rendering of "killed by signal S": (-1 << 8) | S
            self._signal("CheckerCompleted", -1, (-1 << 8) | signal_number, command)

    def stop_checker(self) -> None:
        """Kill a running checker (its whole process group); no result counts."""
        if self.checker_running:
            self._checker_task.cancel()
            self._checker_task = None
            self._changed("checker_running")
        self._checker_task = None

    # -- approval and the secret (§9) ----------------------------------------

    def approve(self, approved: bool) -> None:
        """A decision for every connection waiting now or in ``approval_duration``."""
        self.approved = approved
        self._cancel(self._approval_reset)
        loop = asyncio.get_running_loop()
        self._approval_reset = loop.call_later(self.approval_duration.total_seconds(),
                                               self._reset_approval)
        # Waiters get the decision itself: with a very short approval_duration
        # the reset may run before they do.
        self._wake_waiters(approved)

    def _reset_approval(self) -> None:
        self._approval_reset = None
        self.approved = None

    def _wake_waiters(self, decision: bool | None = None) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(decision)

    async def may_have_secret(self) -> bool:
        """Run the approval procedure for one connection; True: send the secret.

        Emits Rejected with the reason when the answer is no.
        """
        pending = self.approval_delay > datetime.timedelta(0)
        if pending:
            self._set("approvals_pending", self.approvals_pending + 1)
        remaining = self.approval_delay.total_seconds()
        try:
            while True:
                if not self.enabled:
                    log.info("Client %s is disabled", self.name)
                    self._signal("Rejected", "Disabled")
                    return False
                if self.approved or not pending:
                    return True
                if self.approved is None:
                    log.info("Client %s needs approval", self.name)
                    self._set("last_approval_request", self._now())
                    self._signal("NeedApproval", timespec.milliseconds(self.approval_delay),
                                 self.approved_by_default)
                else:
                    log.warning("Client %s was not approved", self.name)
                    self._signal("Rejected", "Denied")
                    return False
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.add(waiter)
                started = time.monotonic()
                try:
                    decision = await asyncio.wait_for(waiter, remaining)
                except asyncio.TimeoutError:
                    if not self.enabled:
                        continue  # refused as disabled at the top of the loop
                    if self.approved_by_default:
                        return True
                    log.warning("Client %s timed out waiting for approval", self.name)
                    self._signal("Rejected", "Approval timed out")
                    return False
                finally:
                    self._waiters.discard(waiter)
                remaining -= time.monotonic() - started
                if decision is not None and self.enabled:
                    if decision:
                        return True
                    log.warning("Client %s was not approved", self.name)
                    self._signal("Rejected", "Denied")
                    return False
        finally:
            if pending:
                self._set("approvals_pending", self.approvals_pending - 1)

    def secret_sent(self) -> None:
        """The secret went out: the machine is booting, give it extra time."""
        log.info("Sending secret to %s", self.name)
        self.bump_timeout(self.extended_timeout, only_extend=True)
        self._signal("GotSecret")

    # Settings that take effect by being stored (D-Bus property writes).
    PLAIN_SETTINGS = ("host", "checker_command", "extended_timeout", "approval_delay",
                      "approval_duration", "approved_by_default")

    def set_setting(self, name: str, value) -> None:
        """Store a new value of one of PLAIN_SETTINGS (observers are told)."""
        if name not in self.PLAIN_SETTINGS:
            raise KeyError(name)
        self._set(name, value)

    def set_secret(self, secret: bytes) -> None:
        """Replace the secret (for the next connection)."""
        self.secret = bytes(secret)
        self._changed("secret")

    # -- shutdown ---------------------------------------------------------

    def stop(self) -> None:
        """Cancel every timer and checker (server shutdown or removal)."""
        for handle in (self._checker_timer, self._disable_timer, self._approval_reset):
            self._cancel(handle)
        self._checker_timer = self._disable_timer = self._approval_reset = None
        self.stop_checker()

    @staticmethod
    def _cancel(handle) -> None:
        if handle is not None:
            handle.cancel()
