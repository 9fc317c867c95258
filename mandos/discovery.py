"""Finding Mandos servers by Zeroconf (PROTOCOL.md §2.2, CLIENT.md §2.9).

The client browses for ``_mandos._tcp.local.`` in-process, with
``zeroconf``, and publishes nothing: no host name, no address records, no
service.  A :class:`Browser` runs on one background thread of its own (an
asyncio loop) and reports every server it finds as a
:class:`~mandos.client.servers.ServerAddress`, through a callback or a
thread-safe queue.

How it is done, and why:

* One ``zeroconf`` instance per network interface and IP version, its
  sockets tied to that interface (``SO_BINDTODEVICE``).  An answer can then
  only have come from that link, over that IP version, so the interface
  index of every result is known.  That index is the scope of an IPv6
  link-local address, which is all a client in an initial RAM disk usually
  has; an address learnt on one link is never handed out for another.
* A service instance is resolved by the instance that saw it, asking for
  addresses of that instance's IP version only: what Avahi's resolver does
  for the original client when it resolves on the browse event's interface
  and protocol.  Every address is reported (link-local first); the caller
  de-duplicates anyway, and so does the browser itself.
* Interfaces and addresses are looked up again every half second: the
  client brings its interfaces up while browsing starts, and a link-local
  address is usable only once duplicate-address detection is over.
* "Removed" events (goodbyes, expiry) are ignored: a server is tried until
  one of them gives the password.  Updates (a server's new addresses) are
  resolved again and only new addresses reported.
* Nothing is ever registered, so a zeroconf instance sends nothing but
  queries, and closing it sends no goodbye packets.

``zeroconf`` (tens of milliseconds to import) is imported only by the
browser's thread, once it starts.
"""

from __future__ import annotations

import queue
import socket
import threading

from mandos import lazylog
from mandos.client.servers import ServerAddress

# typing.TYPE_CHECKING without importing typing (2 ms at boot); type
# checkers treat any constant of this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    import asyncio
    from typing import Any, Callable, Iterable

    from mandos.server.announce import Link
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

log = lazylog.get_logger(__name__)

SERVICE_TYPE = "_mandos._tcp.local."
RESCAN_INTERVAL = 0.5  # seconds between looks at the interfaces
RESOLVE_TIMEOUT = 3.0  # seconds to wait for a service's SRV and address records
START_TIMEOUT = 5.0  # seconds for a zeroconf instance to open its sockets
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

Interface = str | int  # a name ("eth0") or an index


class DiscoveryError(RuntimeError):
    """Browsing failed for good (zeroconf missing or broken)."""


def _order(addresses: Iterable[str], family: int) -> list[str]:
    """Link-local addresses first (what a client at boot can reach), else as given."""
    listed = list(dict.fromkeys(addresses))
    return sorted(listed, key=lambda a: not ServerAddress(a, 0, family).is_link_local())


class _LinkBrowser:
    """Browsing on one interface over one IP version; lives in the loop thread."""

    def __init__(self, link: Link, family: int,
                 deliver: Callable[[ServerAddress, str, str], None],
                 resolve_timeout: float) -> None:
        self.link = link
        self.family = family
        self.deliver = deliver
        self.resolve_timeout = resolve_timeout
        self.zeroconf: AsyncZeroconf | None = None
        self.browser: AsyncServiceBrowser | None = None
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()  # names updated while being resolved

    @property
    def label(self) -> str:
        return f"{self.link.name} ({'IPv6' if self.family == socket.AF_INET6 else 'IPv4'})"

    async def open(self) -> None:
        """Open the sockets on this link and start browsing; OSError if impossible."""
        from zeroconf import IPVersion, ServiceStateChange
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        if self.link.socket_address is None:
            raise OSError(f"no usable address on {self.link.name}")
        version = IPVersion.V6Only if self.family == socket.AF_INET6 else IPVersion.V4Only
        from mandos.server.announce import mdns_interface
        self.zeroconf = AsyncZeroconf(
            interfaces=[mdns_interface(self.link, self.family == socket.AF_INET6)],
            ip_version=version)
        engine = self.zeroconf.zeroconf.engine
        # zeroconf opened its sockets just now and starts reading them only
        # when this coroutine next yields: tie them to the link first, so
        # that nothing from another link ever reaches this instance's cache.
        sockets = [getattr(engine, "_listen_socket", None),
                   *getattr(engine, "_respond_sockets", ())]
        early = [s for s in sockets if isinstance(s, socket.socket)]
        for sock in early:
            self._tie(sock)
        await self.zeroconf.zeroconf.async_wait_for_start()
        if not engine.senders:
            raise OSError(f"cannot send mDNS queries on {self.link.name}")
        if not early:  # a zeroconf without those attributes: tie them late
            for transport in engine.readers:
                self._tie(transport.get_extra_info("socket"))

        def on_change(zeroconf: Any, service_type: str, name: str,
                      state_change: ServiceStateChange) -> None:
            if state_change is ServiceStateChange.Removed:
                log.debug("Zeroconf: %s is gone from %s (ignored)", name, self.label)
                return
            self._resolve_soon(name)

        self.browser = AsyncServiceBrowser(self.zeroconf.zeroconf, SERVICE_TYPE,
                                           handlers=[on_change])

    def _tie(self, sock: socket.socket) -> None:
        """Receive on this link only; drop whatever arrived before that."""
        sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, self.link.name.encode())
        # Packets queued before the option took effect may come from any link.
        blocking = sock.getblocking()
        sock.setblocking(False)
        try:
            while True:
                sock.recv(9000)
        except OSError:  # BlockingIOError: the queue is empty
            pass
        finally:
            sock.setblocking(blocking)

    def _resolve_soon(self, name: str) -> None:
        import asyncio

        if name in self._resolving:
            self._again.add(name)  # its records changed while we asked
            return
        task = asyncio.get_running_loop().create_task(self._resolve(name))
        self._resolving[name] = task

    async def _resolve(self, name: str) -> None:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo

        try:
            while True:
                self._again.discard(name)
                assert self.zeroconf is not None
                info = AsyncServiceInfo(SERVICE_TYPE, name)
                version = (IPVersion.V6Only if self.family == socket.AF_INET6
                           else IPVersion.V4Only)
                if not await info.async_request(self.zeroconf.zeroconf,
                                                self.resolve_timeout * 1000):
                    # Reported and otherwise ignored, as in the original; an
                    # update of the service's records brings another try.
                    log.warning("Zeroconf: cannot resolve %s on %s", name, self.label)
                elif info.port is not None:
                    addresses = info.parsed_addresses(version)
                    if not addresses:
                        log.debug("Zeroconf: %s has no %s address", name, self.label)
                    for address in _order(addresses, self.family):
                        self.deliver(ServerAddress(address, info.port, self.family,
                                                   self.link.index),
                                     name, info.server or "")
                if name not in self._again:
                    return
        except Exception:  # a resolver failure must not end browsing
            log.exception("Zeroconf: resolving %s on %s failed", name, self.label)
        finally:
            self._resolving.pop(name, None)

    async def close(self) -> None:
        """Stop browsing and close the sockets (nothing to say goodbye for)."""
        for task in list(self._resolving.values()):
            task.cancel()
        self._resolving.clear()
        if self.browser is not None:
            browser, self.browser = self.browser, None
            await browser.async_cancel()
        if self.zeroconf is not None:
            zeroconf, self.zeroconf = self.zeroconf, None
            await zeroconf.async_close()


class Browser:
    """Browses for Mandos servers on a background thread until closed.

    Every newly found (address, port, family, interface) is passed once to
    ``on_found``, called on the browser's thread (so it must be quick and
    thread-safe); without ``on_found`` the results are put in :attr:`found`,
    a thread-safe queue.  ``interfaces`` restricts browsing to those
    interfaces (names or indexes); None means every usable one (up,
    multicast-capable, neither loopback nor point-to-point).  ``ipv6`` and
    ``ipv4`` choose the IP versions browsed over.
    """

    def __init__(self, on_found: Callable[[ServerAddress], None] | None = None, *,
                 interfaces: Iterable[Interface] | None = None,
                 ipv6: bool = True, ipv4: bool = True,
                 rescan_interval: float = RESCAN_INTERVAL,
                 resolve_timeout: float = RESOLVE_TIMEOUT) -> None:
        self.found: queue.SimpleQueue[ServerAddress] = queue.SimpleQueue()
        self.on_found = on_found if on_found is not None else self.found.put
        self.interfaces = None if interfaces is None else set(interfaces)
        self.families = ([socket.AF_INET6] if ipv6 else []) + ([socket.AF_INET] if ipv4 else [])
        if not self.families:
            raise ValueError("browsing needs IPv6 or IPv4")
        self.rescan_interval = rescan_interval
        self.resolve_timeout = resolve_timeout
        self.failed: BaseException | None = None
        self._delivered: set[ServerAddress] = set()
        self._links: dict[tuple[int, int], _LinkBrowser] = {}
        self._unusable: dict[tuple[int, int], Link | None] = {}  # logged once each
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closing = False

    # -- the caller's side -------------------------------------------------
    def start(self) -> None:
        """Start browsing on a background thread; returns at once."""
        if self._thread is not None:
            raise RuntimeError("a Browser starts only once")
        self._thread = threading.Thread(target=self._run, name="mandos-zeroconf",
                                        daemon=True)
        self._thread.start()

    def wait_started(self, timeout: float | None = None) -> bool:
        """Wait until the first look at the interfaces is done (sockets open)."""
        return self._started.wait(timeout)

    @property
    def links(self) -> list[tuple[str, int]]:
        """(interface name, address family) of every link browsed on now."""
        return [(b.link.name, b.family) for b in list(self._links.values())]

    def check(self) -> None:
        """Raise DiscoveryError if browsing has failed for good."""
        if self.failed is not None:
            raise DiscoveryError(f"Zeroconf browsing failed: {self.failed}") from self.failed

    def close(self, timeout: float = 5.0) -> None:
        """Stop browsing and close every socket; waits up to ``timeout`` seconds."""
        self._closing = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop has already ended
                pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Browser:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the browser's thread ----------------------------------------------
    def _run(self) -> None:
        import asyncio

        try:
            asyncio.run(self._main())
        except BaseException as error:  # noqa: BLE001 - reported through check()
            self.failed = error
            log.error("Zeroconf browsing failed: %s", error)
        finally:
            self._started.set()

    async def _main(self) -> None:
        import asyncio

        try:
            import zeroconf  # noqa: F401 - fail early and clearly if missing
        except ImportError as error:
            raise DiscoveryError(f"cannot load zeroconf: {error}") from None
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            while not self._closing:
                await self._rescan()
                self._started.set()
                try:
                    await asyncio.wait_for(self._stop.wait(), self.rescan_interval)
                except asyncio.TimeoutError:
                    pass
        finally:
            browsers = list(self._links.values())
            self._links.clear()
            await asyncio.gather(*(b.close() for b in browsers), return_exceptions=True)

    def _wanted(self) -> dict[tuple[int, int], Link]:
        """The links to browse on now, by (interface index, family)."""
        from mandos.server.announce import find_links

        wanted: dict[tuple[int, int], Link] = {}
        for family in self.families:
            for index, link in find_links(family == socket.AF_INET6).items():
                if self.interfaces is None or {index, link.name} & self.interfaces:
                    wanted[(index, family)] = link
        return wanted

    async def _rescan(self) -> None:
        """Browse on the links present now; let go of those that are gone."""
        import asyncio

        wanted = self._wanted()
        for key, browser in list(self._links.items()):
            link = wanted.get(key)
            # Keep a link whose sockets' address is still there.
            if (link is not None and link.name == browser.link.name
                    and browser.link.socket_address in link.addresses):
                browser.link = link
                continue
            del self._links[key]
            log.debug("Zeroconf: no longer browsing on %s", browser.label)
            await browser.close()
        for key, link in wanted.items():
            if key in self._links:
                continue
            browser = _LinkBrowser(link, key[1], self._deliver, self.resolve_timeout)
            try:
                await asyncio.wait_for(browser.open(), START_TIMEOUT)
            except Exception as error:  # noqa: BLE001 - this link only; retried later
                await browser.close()
                if self._unusable.get(key) != link:
                    log.warning("Zeroconf: cannot browse on %s yet: %s", browser.label, error)
                self._unusable[key] = link
                continue
            self._unusable.pop(key, None)
            self._links[key] = browser
            log.debug("Zeroconf: browsing on %s", browser.label)

    def _deliver(self, server: ServerAddress, name: str, host: str) -> None:
        if server in self._delivered or self._closing:
            return
        self._delivered.add(server)
        log.debug("Zeroconf: Mandos server %r (host %s) found at %s on interface %d",
                  name, host, server, server.ifindex)
        try:
            self.on_found(server)
        except Exception:  # a listener's bug must not stop browsing
            log.exception("Zeroconf: the found-server callback failed")
