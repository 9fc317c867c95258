"""Zeroconf publication of the server (PROTOCOL.md §2.1, SERVER.md §7).

The server announces one DNS-SD service, ``NAME._mandos._tcp.local.``, with
the port it really listens on, an empty TXT record and this host's addresses
of one IP version only: IPv6 by default, IPv4 when IPv6 is disabled.  Clients
(``mandos-client``, which browses with an embedded Avahi core) find it by
multicast DNS.

How it is done, and why:

* One ``zeroconf`` responder per network interface.  Each answers on its own
  link with that link's addresses only, the way Avahi does: a client on one
  link must never be handed the IPv6 link-local address of another link,
  which it could not reach (it takes the first address it resolves).  The
  responder's sockets are bound to their device, so a query or an answer
  seen on another link neither reaches it nor ends up in its cache.
* IPv6 link-local addresses are published, first, along with any others:
  clients in an initial RAM disk usually have nothing else.
* Interfaces and addresses are looked up again every few seconds, so links
  that come up (or finish duplicate-address detection) after start-up are
  announced too, and address changes are published.
* The instance name is probed before it is announced.  If it is taken
  anywhere, the service is renamed everywhere the way Avahi renames
  (``Mandos``, ``Mandos #2``, ``Mandos #3``, ...), the new name is logged and
  passed to ``on_rename``; after 32768 renames the announcer gives up, which
  is fatal for the server.

``zeroconf`` is imported only when an announcer starts, so a server running
with Zeroconf disabled never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import re
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # pragma: no cover - for type hints only
    from zeroconf import ServiceInfo
    from zeroconf.asyncio import AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_mandos._tcp.local."
DEFAULT_SERVICE_NAME = "Mandos"
MAX_RENAMES = 32768
RESCAN_INTERVAL = 5.0  # seconds between looks at the interfaces
# RFC 6763 §6.1 forbids a TXT record with no strings at all; an "empty" one
# holds a single empty string.  This is also what Avahi sends for an empty
# TXT list, so the wire image matches the original server's.
EMPTY_TXT = b"\x00"
# A DNS label, and so a service instance name, is at most 63 bytes.
MAX_LABEL_BYTES = 63

# Interface flags (<linux/if.h>) and the ioctl that reads them.
_SIOCGIFFLAGS = 0x8913
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8
_IFF_POINTOPOINT = 0x10
_IFF_MULTICAST = 0x1000
# IPv6 address flags as /proc/net/if_inet6 shows them (<linux/if_addr.h>).
_IFA_F_OPTIMISTIC = 0x04
_IFA_F_DADFAILED = 0x08
_IFA_F_DEPRECATED = 0x20
_IFA_F_TENTATIVE = 0x40
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class AnnounceError(RuntimeError):
    """Publishing failed for good (too many renames); the server must exit."""


def alternative_name(name: str) -> str:
    """The next name to try after ``name`` collided, in Avahi's style.

    ``Mandos`` becomes ``Mandos #2``, ``Mandos #2`` becomes ``Mandos #3``.
    The base is shortened (never inside a UTF-8 sequence) when the result
    would not fit in a DNS label.
    """
    match = re.fullmatch(r"(.*) #([0-9]+)", name, flags=re.DOTALL)
    if match:
        base, number = match.group(1), int(match.group(2)) + 1
    else:
        base, number = name, 2
    suffix = f" #{number}"
    room = MAX_LABEL_BYTES - len(suffix.encode())
    base = base.encode()[:room].decode(errors="ignore")
    return base + suffix


@dataclass(frozen=True)
class Link:
    """One network interface the service can be published on."""

    index: int
    name: str
    addresses: tuple[str, ...]  # what is published; IPv6 link-local first
    # A usable address of the link (None: not usable yet).  IPv6 sockets
    # are opened by interface index (see mdns_interface), so an address
    # shared with another interface (a bridge and its port share their
    # link-local address) is fine; an IPv4 address names the interface and
    # must belong to it alone.
    socket_address: str | None


def interface_flags(name: str) -> int | None:
    """The ``IFF_*`` flags of interface ``name``, or None if it does not exist."""
    request = struct.pack("16sH22x", name.encode()[:15], 0)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock, _SIOCGIFFLAGS, request)
    except OSError:
        return None
    return struct.unpack_from("16sH", reply)[1]


def _usable_interface(name: str) -> bool:
    """Up, multicast-capable, neither loopback nor point-to-point (Avahi's rule)."""
    flags = interface_flags(name)
    if flags is None:
        return False
    return (bool(flags & _IFF_UP) and bool(flags & _IFF_MULTICAST)
            and not flags & (_IFF_LOOPBACK | _IFF_POINTOPOINT))


def _ipv6_addresses() -> list[tuple[str, int, str, int]]:
    """(interface, index, address, flags) of every IPv6 address, from /proc."""
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as table:
            lines = table.read().splitlines()
    except FileNotFoundError:  # IPv6 disabled in the kernel
        return []
    result = []
    for line in lines:
        fields = line.split()
        if len(fields) != 6:
            continue
        hex_address, hex_index, _prefix, _scope, hex_flags, name = fields
        address = str(ipaddress.IPv6Address(bytes.fromhex(hex_address)))
        result.append((name, int(hex_index, 16), address, int(hex_flags, 16)))
    return result


def _ipv4_addresses() -> list[tuple[str, int, str]]:
    """(interface, index, address) of every IPv4 address."""
    # ifaddr (getifaddrs through ctypes) is what zeroconf itself uses to
    # list addresses, so it is loaded anyway once publishing starts.
    import ifaddr

    result = []
    for adapter in ifaddr.get_adapters():
        # getifaddrs reports alias labels ("eth0:1") as names.
        name = adapter.name.split(":", 1)[0]
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                result.append((name, index, ip.ip))
    return result


def find_links(use_ipv6: bool = True, interface: str | None = None) -> dict[int, Link]:
    """The interfaces to publish on, by index, with their addresses.

    Only interfaces that are up and multicast-capable count, and only
    addresses usable now: IPv6 addresses that are still tentative, or whose
    duplicate-address detection failed, are left for a later look, except
    optimistic ones (RFC 4429), which may be used while detection runs;
    mandos-client makes the link-local address of an interface it brings up
    optimistic, and so browses at once instead of a second or two later.
    With ``interface`` set, only that interface is considered.
    """
    owners: dict[str, set[int]] = {}
    per_link: dict[int, tuple[str, list[tuple[tuple[int, ...], str]]]] = {}
    if use_ipv6:
        for position, (name, index, address, flags) in enumerate(_ipv6_addresses()):
            owners.setdefault(address, set()).add(index)
            if flags & _IFA_F_DADFAILED:
                continue
            if flags & _IFA_F_TENTATIVE and not flags & _IFA_F_OPTIMISTIC:
                continue
            link_local = ipaddress.IPv6Address(address).is_link_local
            # Link-local first, deprecated last, otherwise the kernel's order.
            rank = (0 if link_local else 1, 1 if flags & _IFA_F_DEPRECATED else 0, position)
            per_link.setdefault(index, (name, []))[1].append((rank, address))
    else:
        for position, (name, index, address) in enumerate(_ipv4_addresses()):
            owners.setdefault(address, set()).add(index)
            per_link.setdefault(index, (name, []))[1].append(((position,), address))

    links: dict[int, Link] = {}
    for index, (name, ranked) in per_link.items():
        if interface is not None and name != interface:
            continue
        if not _usable_interface(name):
            continue
        addresses = tuple(address for _rank, address in sorted(ranked))
        if use_ipv6:
            socket_address = addresses[0] if addresses else None
        else:
            unique = [address for address in addresses if owners[address] == {index}]
            socket_address = unique[0] if unique else None
        links[index] = Link(index, name, addresses, socket_address)
    return links


def mdns_interface(link: Link, ipv6: bool):
    """How to name ``link`` to zeroconf: by interface index for IPv6 (so an
    address shared with another interface is no problem), by address for
    IPv4."""
    return link.index if ipv6 else link.socket_address


def _host_name() -> str:
    """This host's mDNS name: the first label of its host name, in ``.local.``."""
    label = socket.gethostname().split(".", 1)[0] or "localhost"
    return f"{label}.local."


class _LinkResponder:
    """The zeroconf responder of one interface: its sockets and its registration."""

    def __init__(self, link: Link, use_ipv6: bool) -> None:
        self.link = link
        self.use_ipv6 = use_ipv6
        self.zeroconf: AsyncZeroconf | None = None
        self.info: ServiceInfo | None = None
        self.name: str | None = None  # the instance name registered now
        self._announcing: asyncio.Future[Any] | None = None

    async def open(self) -> None:
        """Open the mDNS sockets of this link; OSError if that is impossible."""
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        if self.link.socket_address is None:
            raise OSError(f"no usable address on {self.link.name}")
        version = IPVersion.V6Only if self.use_ipv6 else IPVersion.V4Only
        self.zeroconf = AsyncZeroconf(interfaces=[mdns_interface(self.link, self.use_ipv6)],
                                      ip_version=version)
        engine = self.zeroconf.zeroconf.engine
        await self.zeroconf.zeroconf.async_wait_for_start()
        if not engine.senders:
            raise OSError(f"cannot send mDNS on {self.link.name}")
        # By default a socket that joined the mDNS group gets the group's
        # traffic from every interface; tie ours to this link so the
        # responder of each link sees, caches and answers only its own.
        for transport in engine.readers:
            sock = transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE,
                                self.link.name.encode())
            except OSError as error:
                # Still works, but the responders of different links may
                # then take each other's answers for a rival's.
                log.warning("Cannot tie an mDNS socket to %s: %s", self.link.name, error)

    def _service_info(self, name: str, port: int, host: str) -> ServiceInfo:
        from zeroconf import ServiceInfo

        return ServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port,
                           properties=EMPTY_TXT, server=host,
                           parsed_addresses=list(self.link.addresses))

    async def register(self, name: str, port: int, host: str) -> None:
        """Probe for ``name`` and announce it.  NonUniqueNameException if taken."""
        assert self.zeroconf is not None
        info = self._service_info(name, port, host)
        self._announcing = await self.zeroconf.async_register_service(info)
        self.info, self.name = info, name

    async def update(self, link: Link, port: int, host: str) -> None:
        """Publish the changed addresses of the same link."""
        self.link = link
        if self.name is None or self.zeroconf is None:
            return
        self._stop_announcing()
        self.info = self._service_info(self.name, port, host)
        self._announcing = await self.zeroconf.async_update_service(self.info)

    def _stop_announcing(self) -> None:
        # zeroconf repeats an announcement in a background task; left
        # running, it would re-announce a name already withdrawn.
        if self._announcing is not None:
            self._announcing.cancel()
            self._announcing = None

    async def withdraw(self) -> None:
        """Unpublish the registered name, with goodbye packets."""
        self._stop_announcing()
        if self.zeroconf is not None and self.info is not None:
            info, self.info, self.name = self.info, None, None
            goodbyes = await self.zeroconf.async_unregister_service(info)
            await goodbyes

    async def close(self) -> None:
        """Say goodbye (if registered) and close the sockets."""
        self._stop_announcing()
        if self.zeroconf is not None:
            zeroconf, self.zeroconf = self.zeroconf, None
            self.info = self.name = None
            # Unregisters whatever is still registered, sending goodbyes.
            await zeroconf.async_close()


class Announcer:
    """Publishes the server with Zeroconf until stopped."""

    def __init__(self, service_name: str = DEFAULT_SERVICE_NAME, port: int | None = None,
                 use_ipv6: bool = True, interface: str | None = None,
                 on_rename: Callable[[str], None] | None = None, *,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 max_renames: int = MAX_RENAMES,
                 rescan_interval: float = RESCAN_INTERVAL) -> None:
        """Prepare, but do not publish yet.

        ``port`` is the port the listening socket is really bound to.
        ``interface`` limits publication to that interface (empty: all).
        ``on_rename(new_name)`` is called after every rename.  ``on_fatal``
        gets the error when the service can no longer be published after
        start-up (too many renames during a later look at the interfaces);
        ``start()`` raises such errors itself instead.
        """
        if port is None or not 0 < port < 65536:
            raise ValueError(f"invalid port to publish: {port!r}")
        self.name = service_name
        self.port = port
        self.use_ipv6 = use_ipv6
        self.interface = interface or None
        self.on_rename = on_rename
        self.on_fatal = on_fatal
        self.max_renames = max_renames
        self.rescan_interval = rescan_interval
        self.renames = 0
        self.host = _host_name()
        self._responders: dict[int, _LinkResponder] = {}
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = False
        # Links that could not be opened, so a lasting problem is logged
        # once and not at every look.
        self._failed: dict[int, Link] = {}

    @property
    def links(self) -> list[Link]:
        """The links the service is currently published on."""
        return [r.link for r in self._responders.values() if r.info is not None]

    async def start(self) -> None:
        """Publish on every usable link, and keep watching for new ones.

        Returns once the name has been probed and announced on the links
        present now.  Raises AnnounceError when no free name is found.
        """
        if self._watcher is not None or self._stopped:
            raise RuntimeError("an Announcer starts only once")
        try:
            async with self._lock:
                await self._refresh()
        except BaseException:
            await self.stop()
            raise
        if self._stopped:  # stop() was called while the first look ran
            return
        if not self._responders:
            where = f"interface {self.interface}" if self.interface else "any interface"
            log.warning("No usable %s address on %s yet; will keep looking",
                        "IPv6" if self.use_ipv6 else "IPv4", where)
        self._watcher = asyncio.create_task(self._watch(), name="zeroconf-watcher")

    async def stop(self) -> None:
        """Withdraw the service (goodbye packets on every link) and close."""
        self._stopped = True
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        async with self._lock:
            responders = list(self._responders.values())
            self._responders.clear()
            await asyncio.gather(*(r.close() for r in responders))

    async def _watch(self) -> None:
        """Look at the interfaces again now and then."""
        while True:
            await asyncio.sleep(self.rescan_interval)
            try:
                async with self._lock:
                    await self._refresh()
            except AnnounceError as error:
                if self.on_fatal is not None:
                    self.on_fatal(error)
                return
            except Exception:  # keep publishing on the links that work
                log.exception("Zeroconf: looking at the network interfaces failed")

    def _find_links(self) -> dict[int, Link]:
        return find_links(self.use_ipv6, self.interface)

    def _new_responder(self, link: Link) -> _LinkResponder:
        return _LinkResponder(link, self.use_ipv6)

    async def _refresh(self) -> None:
        """Bring the published links in line with the interfaces now."""
        wanted = self._find_links()
        for index, responder in list(self._responders.items()):
            link = wanted.get(index)
            if link is not None and link == responder.link:
                continue
            if (link is not None and link.name == responder.link.name
                    and responder.link.socket_address in link.addresses):
                try:
                    await responder.update(link, self.port, self.host)
                    continue
                except Exception as error:
                    self._note_failure(link, error)
            # Gone, or its sockets' address is gone: start that link afresh.
            del self._responders[index]
            await responder.close()
        new = []
        for index, link in wanted.items():
            if index in self._responders:
                continue
            responder = self._new_responder(link)
            try:
                await responder.open()
            except Exception as error:
                await responder.close()
                self._note_failure(link, error)
                continue
            self._failed.pop(index, None)
            new.append(responder)
        if new:
            await self._publish(new)

    async def _publish(self, new: list[_LinkResponder]) -> None:
        """Register the name on new links; on a collision rename everywhere."""
        from zeroconf import NonUniqueNameException

        for responder in new:
            self._responders[responder.link.index] = responder
        pending = new
        while pending:
            results = await asyncio.gather(
                *(r.register(self.name, self.port, self.host) for r in pending),
                return_exceptions=True)
            collided = False
            for responder, result in zip(pending, results):
                if isinstance(result, NonUniqueNameException):
                    collided = True
                elif isinstance(result, BaseException):
                    self._responders.pop(responder.link.index, None)
                    await responder.close()
                    self._note_failure(responder.link, result)
            if not collided:
                break
            # One name on every link, as with Avahi's entry group.
            await self._withdraw(self._responders.values())
            self._rename()
            pending = list(self._responders.values())

    def _note_failure(self, link: Link, error: BaseException) -> None:
        if self._failed.get(link.index) != link:
            log.warning("Zeroconf: cannot publish on %s yet: %s", link.name, error)
        self._failed[link.index] = link

    @staticmethod
    async def _withdraw(responders: Iterable[_LinkResponder]) -> None:
        await asyncio.gather(*(r.withdraw() for r in list(responders)))

    def _rename(self) -> None:
        """Move on to the next name; AnnounceError when out of renames."""
        if self.renames >= self.max_renames:
            log.critical("No free Zeroconf service name found after %d renames",
                         self.renames)
            raise AnnounceError(f"no free Zeroconf service name after {self.renames} renames")
        old, self.name = self.name, alternative_name(self.name)
        self.renames += 1
        log.info("Zeroconf service name %r is taken; now publishing as %r", old, self.name)
        if self.on_rename is not None:
            try:
                self.on_rename(self.name)
            except Exception:  # a listener's bug must not stop publication
                log.exception("Zeroconf rename listener failed")
