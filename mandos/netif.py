"""Network interfaces for mandos-client: choose, bring up, wait, take down.

This is CLIENT.md §2.6 steps 4, 9-10, §2.6.1, §2.7 and the interface part of
§2.15.  Interface state is read and changed through rtnetlink (pyroute2), so
no ``ip`` command and no ioctl is needed at boot.

Start-up time matters here: this module runs in the initramfs before the
disk can be unlocked.  Importing pyroute2 costs over 100 ms, whichever of its
modules is named, because its package ``__init__`` loads nearly all of it;
the parts used here are loaded without it (see mandos.pyroute2_parts, about
60 ms), and only inside the functions that talk netlink:
:func:`clean_interface_list` and :func:`index_of` use the standard library
and never load it.

Change notifications come from a plain rtnetlink socket subscribed to the
kernel's multicast groups.  Their content is ignored: a notification only
means "look again", and the state is then read by a fresh query.  That way a
lost notification (socket overrun) costs at most one poll interval, and no
message parsing depends on a particular pyroute2 version.

Root is needed only to set an interface up or down and to change the
console log level; each of those happens inside a short block with raised
privileges (see :class:`_Raised`).
"""

import os
import _socket  # not socket: see mandos/client/servers.py
import time

from mandos import lazylog

log = lazylog.get_logger(__name__)

# Interface flags as the kernel reports them in ifi_flags (linux/if.h).
IFF_UP = 0x1
IFF_BROADCAST = 0x2
IFF_LOOPBACK = 0x8
IFF_POINTOPOINT = 0x10
IFF_RUNNING = 0x40
IFF_NOARP = 0x80
IFF_LOWER_UP = 0x10000

# IPv6 address flags (linux/if_addr.h).
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40

RT_SCOPE_LINK = 253

# rtnetlink multicast groups as bind() masks (linux/rtnetlink.h).
RTMGRP_LINK = 0x1
RTMGRP_IPV6_IFADDR = 0x100

#: How often state is re-read even without a notification (CLIENT.md §2.7
#: step 4 polls at this interval; here it is only the fallback).
POLL_INTERVAL = 0.25

#: Console log level while interfaces come up: link-state messages (INFO,
#: level 6) then stay off the console and do not garble password prompts.
CONSOLE_LOG_LEVEL = 5
_SYSLOG_ACTION_CONSOLE_ON = 7
_SYSLOG_ACTION_CONSOLE_LEVEL = 8

#: The special interface name that ends the list of interfaces to bring up.
NONE = "none"


class Link:
    """One network interface as rtnetlink describes it."""

    __slots__ = ("index", "name", "flags")

    def __init__(self, index: int, name: str, flags: int) -> None:
        self.index = index
        self.name = name
        self.flags = flags

    def __repr__(self) -> str:
        return f"Link({self.index}, {self.name!r}, {self.flags:#x})"


# -- netlink access ---------------------------------------------------------

def _iproute_class():
    """pyroute2's rtnetlink socket class, imported on first use (it is slow)."""
    from mandos import pyroute2_parts
    return pyroute2_parts.load("pyroute2.iproute.linux").IPRoute


def _netlink_errors() -> tuple:
    """The exceptions a failed pyroute2 request raises."""
    from mandos import pyroute2_parts
    return (pyroute2_parts.load("pyroute2.netlink.exceptions").NetlinkError, OSError)


def _read_links(ipr) -> dict[str, Link]:
    """All interfaces of the current network namespace, by name."""
    links = {}
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        if name is not None:
            links[name] = Link(msg["index"], name, msg["flags"])
    return links


def links() -> dict[str, Link]:
    """All interfaces of the current network namespace, by name."""
    ipr = _iproute_class()()
    try:
        return _read_links(ipr)
    finally:
        ipr.close()


class _LinkEvents:
    """Sleeps until rtnetlink announces a change in ``groups``, or a timeout.

    Created *before* the state is first read, so that a change happening
    between the read and the wait still ends the wait at once.  If the
    subscription cannot be made, waiting degrades to sleeping.
    """

    def __init__(self, groups: int) -> None:
        try:
            self._sock: _socket.socket | None = _socket.socket(
                _socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_NONBLOCK,
                _socket.NETLINK_ROUTE)
        except OSError as err:
            log.debug("No netlink notifications (%s); polling instead", err.strerror)
            self._sock = None
            return
        try:
            self._sock.bind((0, groups))
        except OSError as err:
            log.debug("No netlink notifications (%s); polling instead", err.strerror)
            self.close()

    def wait(self, timeout: float) -> None:
        """Return after a notification or after ``timeout`` seconds."""
        if timeout <= 0:
            return
        if self._sock is None:
            time.sleep(timeout)
            return
        import select
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.poll(int(timeout * 1000) + 1)
        self._drain()

    def _drain(self) -> None:
        """Discard queued notifications: only their arrival matters."""
        assert self._sock is not None
        while True:
            try:
                self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                # ENOBUFS: notifications were lost.  Harmless, the caller
                # reads the current state anyway.
                continue

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "_LinkEvents":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- privileges and the console ---------------------------------------------

class _Raised:
    """Effective root for one block, then back to the previous effective UID.

    Root is held only around the kernel requests that need it, so that a bug
    in the rest of the client, which handles data from the network, cannot
    act as root.  The previous effective UID is restored rather than always
    lowered, so a caller that already raised privileges (the end sequence
    runs the stop hooks and the take-down in one raised stretch) keeps them.
    """

    def __init__(self, privileges) -> None:
        self._privileges = privileges
        self._was_root = False
        self.raised = False

    def __enter__(self) -> bool:
        self._was_root = os.geteuid() == 0
        self.raised = self._privileges.raise_()
        return self.raised

    def __exit__(self, *exc) -> None:
        if self.raised and not self._was_root:
            self._privileges.lower()


def _syslog_action(action: int, level: int) -> bool:
    """Call syslog(2) (glibc's klogctl); report and return False on failure."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.klogctl(action, None, level)
    except (OSError, AttributeError) as err:
        log.warning("Could not call klogctl: %s", err)
        return False
    if result < 0:
        errno = ctypes.get_errno()
        log.warning("syslog(2) action %d failed: %s", action, os.strerror(errno))
        return False
    return True


def quiet_console() -> bool:
    """Lower the kernel console log level to 5 (needs root; failures reported).

    Interfaces going up make the kernel print link-state messages at INFO
    level; on a console with a password prompt they would garble it.
    """
    return _syslog_action(_SYSLOG_ACTION_CONSOLE_LEVEL, CONSOLE_LOG_LEVEL)


def console_on() -> bool:
    """syslog(2) action 7 ("console on"), issued after :func:`quiet_console`.

    Meant as a restore; current kernels only undo an earlier "console off"
    with it, so the level set by :func:`quiet_console` stays (CLIENT.md §2.7).
    """
    return _syslog_action(_SYSLOG_ACTION_CONSOLE_ON, 0)


# -- choosing interfaces ----------------------------------------------------

def index_of(name: str) -> int:
    """The interface index of ``name``, or 0 if there is no such interface."""
    try:
        return _socket.if_nametoindex(name)
    except (OSError, ValueError):
        return 0


def clean_interface_list(names: list[str]) -> list[str]:
    """Drop names of interfaces that do not exist (CLIENT.md §2.6 step 4).

    The literal ``none`` is kept.  Empty names (from stray commas) vanish
    silently; every other dropped name is reported.  An empty result means
    "choose automatically".
    """
    cleaned = []
    for name in names:
        if not name:
            continue
        if name != NONE and not index_of(name):
            log.warning("Not using nonexisting interface %r", name)
            continue
        cleaned.append(name)
    return cleaned


def rejection_reason(flags: int, connect_mode: bool) -> str | None:
    """Why an interface with ``flags`` is not chosen automatically, or None.

    The rules of CLIENT.md §2.6.1, in their order.  Whether the interface
    is up does not matter: it is brought up afterwards.
    """
    if flags & IFF_LOOPBACK:
        return "is a loopback interface"
    if connect_mode and flags & IFF_POINTOPOINT:
        return None  # a point-to-point link can reach the --connect address
    if not flags & IFF_BROADCAST:
        return "is not a broadcast interface"
    if flags & IFF_NOARP:
        return "is a NOARP interface"
    return None


def choose_automatically(connect_mode: bool) -> list[str]:
    """Names of the interfaces to use when none were given (CLIENT.md §2.6.1).

    Interfaces are taken in sorted name order, skipping names that begin
    with a dot.  The names and flags come from one rtnetlink dump, so each
    name is judged by the flags it had at that moment.  Unlike the ioctl
    the original uses, netlink works without IPv6, so the absence of IPv6
    does not make every interface unusable here.
    """
    chosen = []
    all_links = links()
    for name in sorted(all_links):
        if name.startswith("."):
            continue
        reason = rejection_reason(all_links[name].flags, connect_mode)
        if reason is None:
            log.debug("Interface %s is acceptable", name)
            chosen.append(name)
        else:
            log.debug("Rejecting interface %s: it %s", name, reason)
    return chosen


# -- bringing interfaces up and down ----------------------------------------

def _usable_link_local(ipr, ifindex: int, settled: bool = False
                       ) -> tuple[str | None, bool]:
    """(usable link-local address or None, whether duplicate detection failed).

    ``settled``: only an address whose duplicate detection is over counts,
    not an optimistic one (see InterfaceManager.wait_link_local).
    """
    dad_failed = False
    for msg in ipr.get_addr(family=_socket.AF_INET6):
        if msg["index"] != ifindex or msg["scope"] != RT_SCOPE_LINK:
            continue
        # IFA_FLAGS holds all 32 bits; the header field only the low 8.
        flags = msg.get_attr("IFA_FLAGS")
        if flags is None:
            flags = msg["flags"]
        if flags & IFA_F_DADFAILED:
            dad_failed = True
            continue
        # An optimistic address may be used while detection still runs.
        if flags & IFA_F_TENTATIVE and (settled or not flags & IFA_F_OPTIMISTIC):
            continue
        return msg.get_attr("IFA_ADDRESS"), dad_failed
    return None, dad_failed


def _is_running(flags: int) -> bool:
    """Whether an UP interface has its link (RUNNING, and the carrier too).

    RUNNING alone is not enough: for a device created a moment ago the
    kernel has not yet worked out its operational state ("unknown", which
    counts as running) and reports RUNNING even without a carrier, until its
    deferred link-state work runs, up to a second later.  LOWER_UP is the
    carrier itself; devices without carrier detection always have it.
    """
    return flags & (IFF_RUNNING | IFF_LOWER_UP) == IFF_RUNNING | IFF_LOWER_UP


class InterfaceManager:
    """Brings interfaces up, waits for them, and takes down what it raised.

    ``privileges`` is a :class:`mandos.client.privileges.Privileges` (or
    anything with ``raise_()`` returning a bool and ``lower()``).
    """

    index_of = staticmethod(index_of)

    def __init__(self, privileges) -> None:
        self._privileges = privileges
        # Interfaces this program set UP, by index: only these are ever
        # taken down again (CLIENT.md §2.7).
        self._brought_up: list[Link] = []
        self._sysctls: list[tuple[str, str]] = []  # (path, old value) to restore

    @property
    def brought_up(self) -> list[str]:
        """Names of the interfaces that :meth:`take_down` will take down."""
        return [link.name for link in self._brought_up]

    def bring_up(self, names: list[str], delay: float) -> list[str]:
        """Bring up the interfaces before the first ``none`` (CLIENT.md §2.7).

        Each one that is down is set UP; then this waits until each is
        RUNNING, for at most ``delay`` seconds.  The waits overlap, so
        several interfaces without a link cost ``delay`` in all rather than
        ``delay`` each.  Failures are reported, never raised.  Returns the
        list of interfaces to use: ``names`` without any ``none``.
        """
        used = [name for name in names if name != NONE]
        to_raise = names[:names.index(NONE)] if NONE in names else list(names)
        if not to_raise:
            return used
        # Subscribe before looking, so no change can slip in between.
        with _LinkEvents(RTMGRP_LINK) as events:
            current = links()
            chosen: dict[int, Link] = {}  # in list order, each interface once
            for name in to_raise:
                link = current.get(name)
                if link is None:
                    log.error("Could not bring up %s: no such interface", name)
                    continue
                if link.flags & IFF_UP:
                    log.debug("Interface %s is already up", name)
                chosen.setdefault(link.index, link)
            down = [link for link in chosen.values() if not link.flags & IFF_UP]
            if down:
                self._optimistic_dad(down)
                self._set_state(down, up=True)
            self._wait_running(list(chosen.values()), time.monotonic() + delay, events)
        return used

    def _optimistic_dad(self, targets: list[Link]) -> None:
        """Let new link-local addresses be used while DAD runs (RFC 4429).

        Only for interfaces we are about to bring up: their link-local
        address is created then, and would otherwise be unusable for the
        one to two seconds of duplicate address detection.  Detection still
        happens; a duplicate is still found and dropped.  The old settings
        are restored when the interface is taken down again.
        """
        with _Raised(self._privileges) as raised:
            if not raised:
                return
            for link in targets:
                for setting in ("optimistic_dad", "use_optimistic"):
                    path = f"/proc/sys/net/ipv6/conf/{link.name}/{setting}"
                    try:
                        with open(path) as file:
                            old = file.read().strip()
                        if old == "0":
                            with open(path, "w") as file:
                                file.write("1")
                            self._sysctls.append((path, old))
                    except OSError as err:
                        log.debug("Could not set %s: %s", path, err.strerror)

    def _restore_sysctls(self) -> None:
        for path, old in reversed(self._sysctls):
            try:
                with open(path, "w") as file:
                    file.write(old)
            except OSError as err:
                log.debug("Could not restore %s: %s", path, err.strerror)
        self._sysctls.clear()

    def _wait_running(self, waiting: list[Link], deadline: float,
                      events: _LinkEvents) -> None:
        """Wait until each interface is RUNNING, but not past ``deadline``."""
        pending = {link.index: link.name for link in waiting}
        while pending:
            by_index = {link.index: link for link in links().values()}
            for index, name in list(pending.items()):
                link = by_index.get(index)
                if link is None:
                    log.debug("Interface %s disappeared", name)
                    del pending[index]
                elif _is_running(link.flags):
                    log.debug("Interface %s is running", name)
                    del pending[index]
            remaining = deadline - time.monotonic()
            if pending and remaining <= 0:
                log.debug("Not running after the delay, going on: %s",
                          ", ".join(pending.values()))
                return
            if pending:
                events.wait(min(remaining, POLL_INTERVAL))

    def _set_state(self, targets: list[Link], up: bool) -> None:
        """Set UP (or clear it) on each target with raised privileges.

        The record of interfaces to take down at exit is updated after each
        single success, so that a signal arriving in between leaves it
        right.  Failures are reported.
        """
        state = "up" if up else "down"
        iproute = _iproute_class()  # imported unprivileged, before raising
        errors = _netlink_errors()
        with _Raised(self._privileges) as raised:
            if not raised:
                log.error("Could not take %s %s: cannot become root",
                          ", ".join(link.name for link in targets), state)
                return
            if up:
                quiet_console()
            try:
                # The socket is opened with root's credentials too: the
                # kernel may check the opener's capabilities, not only the
                # sender's.
                ipr = iproute()
                try:
                    for link in targets:
                        try:
                            ipr.link("set", index=link.index, state=state)
                        except errors as err:
                            log.error("Could not take %s %s: %s", link.name, state, err)
                            continue
                        log.debug("Took interface %s %s", link.name, state)
                        self._forget(link.index)
                        if up:
                            self._brought_up.append(link)
                finally:
                    ipr.close()
            except errors as err:
                log.error("Could not take %s %s: %s",
                          ", ".join(link.name for link in targets), state, err)
            finally:
                if up:
                    console_on()

    def _forget(self, index: int) -> None:
        """Remove interface ``index`` from the take-down record."""
        self._brought_up[:] = [link for link in self._brought_up if link.index != index]

    def wait_link_local(self, ifindex: int, timeout: float, settled: bool = False,
                        should_stop=None) -> bool:
        """Wait until interface ``ifindex`` has a usable IPv6 link-local address.

        Usable means duplicate address detection is over, or the address is
        optimistic (RFC 4429): enough for multicast DNS.  A connection from
        a merely tentative address fails, and the original then waits a
        whole retry interval.  ``settled`` waits for the end of detection
        even for an optimistic address: a neighbour cannot resolve an
        address under detection (RFC 4862 §5.4.3 has it ignore such
        solicitations), so a TCP connection from it stalls for one to two
        seconds, more than the rest of the detection takes.  Returns True as
        soon as there is one, False after ``timeout`` seconds or when
        ``should_stop()``, asked at least every POLL_INTERVAL, is true.
        """
        deadline = time.monotonic() + timeout
        iproute = _iproute_class()
        warned = False
        with _LinkEvents(RTMGRP_IPV6_IFADDR | RTMGRP_LINK) as events:
            ipr = iproute()
            try:
                while True:
                    address, dad_failed = _usable_link_local(ipr, ifindex, settled)
                    if address is not None:
                        log.debug("Interface %d has the link-local address %s%s",
                                  ifindex, address,
                                  " (duplicate detection over)" if settled else "")
                        return True
                    if dad_failed and not warned:
                        log.warning("Duplicate address detection failed for the "
                                    "link-local address of interface %d", ifindex)
                        warned = True
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        log.debug("Interface %d has no usable link-local address",
                                  ifindex)
                        return False
                    if should_stop is not None and should_stop():
                        return False
                    events.wait(min(remaining, POLL_INTERVAL))
            finally:
                ipr.close()

    def take_down(self) -> list[str]:
        """Clear UP on every interface this brought up that is still UP.

        Interfaces that were already up are never touched (CLIENT.md §2.7,
        §2.15).  Returns the names taken down; those that could not be taken
        down stay in :attr:`brought_up`.
        """
        if not self._brought_up:
            return []
        by_index = {link.index: link for link in links().values()}
        targets = []
        for mine in list(self._brought_up):
            link = by_index.get(mine.index)
            if link is None:
                log.debug("Interface %s is gone; not taking it down", mine.name)
                self._forget(mine.index)
            elif not link.flags & IFF_UP:
                log.debug("Interface %s is already down", link.name)
                self._forget(mine.index)
            else:
                targets.append(link)
        if targets:
            self._set_state(targets, up=False)
        if self._sysctls:
            with _Raised(self._privileges) as raised:
                if raised:
                    self._restore_sysctls()
        remaining = {link.index for link in self._brought_up}
        return [link.name for link in targets if link.index not in remaining]
