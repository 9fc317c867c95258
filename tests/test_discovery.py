"""Tests for Zeroconf discovery of Mandos servers (PROTOCOL.md §2.2, CLIENT.md §2.9).

Real multicast DNS, but only inside network namespaces the tests create and
always delete: "hosts" (one namespace each) plugged into "segments" (a
bridge in a hub namespace).  The browser under test, the announcers (our
server's, or an avahi-daemon as the original server uses) and the packet
capture run as processes in those namespaces (``ip netns exec``) and report
JSON lines on stdout.  Nothing is ever sent on the real host's interfaces.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from mandos.discovery import Browser, DiscoveryError, _order
from mdns_lab import (AVAHI_WRAPPER, PYTHON, REPO, Lab, Peer, announcer_argv, lab_fixture,
                      one_link, write_avahi_files)

SERVICE_TYPE = "_mandos._tcp.local."
TYPE_PTR, TYPE_SRV, TYPE_TXT, TYPE_A, TYPE_AAAA = 12, 33, 16, 1, 28

# --------------------------------------------------------------------------
# Programs run inside the namespaces.  Each prints JSON lines on stdout.

BROWSER = r"""
import json, signal, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from mandos.discovery import Browser
options = json.loads(sys.argv[2])
printing = threading.Lock()

def emit(event, **fields):
    with printing:
        print(json.dumps({"event": event, **fields}), flush=True)

def found(server):
    emit("found", address=server.address, port=server.port,
         family=6 if server.family == socket.AF_INET6 else 4,
         ifindex=server.ifindex, ifname=socket.if_indextoname(server.ifindex))

done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
browser = Browser(found, interfaces=options["interfaces"], ipv6=options["ipv6"],
                  ipv4=options["ipv4"], rescan_interval=0.2)
browser.start()
browser.wait_started(10)
emit("ready", links=sorted(f"{name}/{6 if family == socket.AF_INET6 else 4}"
                           for name, family in browser.links),
     indexes={name: socket.if_nametoindex(name) for _, name in socket.if_nameindex()})
done.wait()
browser.close()
emit("closed", alive=browser._thread.is_alive(), failed=repr(browser.failed),
     threads=sorted(t.name for t in threading.enumerate()))
"""


# --------------------------------------------------------------------------
# Namespaces and processes: this module's programs in the lab of mdns_lab.

class DiscoveryLab(Lab):
    """The lab with the browser under test, announcers and a packet capture."""

    capture_questions = True  # the browser's queries are what is looked at

    def browser(self, namespace: str, *, interfaces: list[str | int] | None = None,
                ipv6: bool = True, ipv4: bool = True) -> Peer:
        """The browser under test, ready (its sockets open) when returned."""
        options = {"interfaces": interfaces, "ipv6": ipv6, "ipv4": ipv4}
        peer = self.spawn(namespace, [PYTHON, "-c", BROWSER, str(REPO), json.dumps(options)],
                          f"browser in {namespace}")
        peer.wait_for(lambda e: e["event"] == "ready", 15, "readiness")
        return peer

    def announcer(self, namespace: str, *, name: str = "Mandos", port: int = 4711,
                  ipv6: bool = True, hostname: str = "mandos-server") -> Peer:
        """Our server's announcer, once it has announced.

        Each runs with a host name of its own (a UTS namespace), as separate
        server machines would: two servers under one name would answer for
        each other's address records.
        """
        peer = self.spawn(namespace, ["unshare", "--uts", "sh", "-c",
                                      'hostname "$0" && exec "$@"', hostname,
                                      *announcer_argv(name, port, ipv6=ipv6)],
                          f"announcer in {namespace}")
        peer.wait_for(lambda e: e["event"] == "started", 15, "start")
        return peer

    def avahi(self, namespace: str, interface: str, *, name: str, port: int) -> Peer:
        """A namespace-private avahi-daemon publishing a Mandos service over IPv6."""
        folder = Path(tempfile.mkdtemp(prefix="mandos-avahi-"))
        self.folders.append(folder)
        config, services = write_avahi_files(folder, interface, [(name, port, "ipv6")])
        return self.spawn(namespace, ["unshare", "--mount", "sh", "-c", AVAHI_WRAPPER,
                                      "avahi", str(services), str(config)],
                          f"avahi-daemon in {namespace}")


@pytest.fixture
def lab() -> Iterator[DiscoveryLab]:
    """A fresh set of namespaces, always deleted afterwards."""
    yield from lab_fixture(DiscoveryLab, "mandos-disc", "the discovery tests need root and "
                           "iproute2 to create network namespaces")


def is_found(**expected: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["event"] == "found" and all(e[k] == v for k, v in expected.items())


def client_index(browser: Peer, ifname: str) -> int:
    ready = next(e for e in browser.events if e["event"] == "ready")
    return ready["indexes"][ifname]


# --------------------------------------------------------------------------
# Without a network.

def test_zeroconf_is_imported_only_when_browsing_starts():
    code = ("import sys; import mandos.discovery; "
            "print(any(m == 'zeroconf' or m.startswith('zeroconf.') for m in sys.modules))")
    result = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_link_local_addresses_are_reported_first():
    assert _order(["fd00::1", "fe80::2", "2001:db8::3", "fe80::4"], socket.AF_INET6) \
        == ["fe80::2", "fe80::4", "fd00::1", "2001:db8::3"]
    assert _order(["10.0.0.1", "169.254.1.1", "10.0.0.1"], socket.AF_INET) \
        == ["169.254.1.1", "10.0.0.1"]


def test_a_broken_zeroconf_is_reported_by_check(monkeypatch):
    """Browsing that cannot work at all is fatal for the caller, not silent."""
    monkeypatch.setitem(sys.modules, "zeroconf", None)  # "import zeroconf" fails
    browser = Browser()
    browser.start()
    assert browser.wait_started(5)
    browser.close()
    with pytest.raises(DiscoveryError, match="zeroconf"):
        browser.check()
    assert not browser.links


def test_browsing_needs_an_ip_version():
    with pytest.raises(ValueError):
        Browser(ipv6=False, ipv4=False)


# --------------------------------------------------------------------------
# Our server's announcement, found on a real (namespaced) link.

def test_finds_the_port_and_a_link_local_address_scoped_to_the_interface(lab):
    server, client, address = one_link(lab)
    browser = lab.browser(client)
    assert browser.events[0]["links"] == ["eth0/6"]
    lab.announcer(server, port=40123)
    event = browser.wait_for(is_found(), 10, "the server")
    assert event == {"event": "found", "address": address, "port": 40123, "family": 6,
                     "ifindex": client_index(browser, "eth0"), "ifname": "eth0"}


def test_ipv4_only_announcement_is_found_over_ipv4(lab):
    server, client, _address = one_link(lab, ipv4=True)
    browser = lab.browser(client)
    assert browser.events[0]["links"] == ["eth0/4", "eth0/6"]
    lab.announcer(server, port=40124, ipv6=False)
    event = browser.wait_for(is_found(), 10, "the server")
    assert (event["address"], event["port"], event["family"], event["ifname"]) \
        == ("10.77.0.1", 40124, 4, "eth0")
    browser.collect(1.0)
    assert len(browser.found()) == 1  # no IPv6 result: nothing was announced over IPv6


def test_two_servers_give_two_results(lab):
    first, second, client = lab.host("srv1"), lab.host("srv2"), lab.host("cli")
    for namespace in (first, second, client):
        lab.plug(namespace, "eth0", "lan")
    addresses = {lab.link_local(first, "eth0"): 40001, lab.link_local(second, "eth0"): 40002}
    lab.link_local(client, "eth0")
    browser = lab.browser(client)
    lab.announcer(first, name="Mandos", port=40001, hostname="server-1")
    lab.announcer(second, name="Other", port=40002, hostname="server-2")
    for address, port in addresses.items():
        browser.wait_for(is_found(address=address, port=port), 10, f"server {address}")
    browser.collect(0.5)
    assert len(browser.found()) == 2


def test_the_same_server_seen_again_is_reported_once(lab):
    """A restarted server says goodbye and announces itself anew: one result."""
    server, client, address = one_link(lab)
    browser = lab.browser(client)
    announcer = lab.announcer(server, port=40125)
    browser.wait_for(is_found(address=address, port=40125), 10, "the server")
    announcer.signal()
    announcer.wait_for(lambda e: e["event"] == "stopped", 10, "stop")
    lab.announcer(server, port=40125)
    browser.collect(1.5)
    assert len(browser.found()) == 1


def test_a_server_that_announces_after_browsing_started_is_found(lab):
    server, client, address = one_link(lab)
    browser = lab.browser(client)
    browser.collect(2.0)  # the browser's first queries go unanswered
    assert not browser.found()
    lab.announcer(server, port=40126)
    browser.wait_for(is_found(address=address, port=40126), 10, "the late server")


def test_interface_restriction_limits_browsing_to_that_interface(lab):
    """Client on two links, a server on each: restricted, only one is seen."""
    server_a, server_b, client = lab.host("srva"), lab.host("srvb"), lab.host("cli")
    lab.plug(server_a, "eth0", "a")
    lab.plug(server_b, "eth0", "b")
    lab.plug(client, "eth0", "a")
    lab.plug(client, "eth1", "b")
    address_a, address_b = lab.link_local(server_a, "eth0"), lab.link_local(server_b, "eth0")
    lab.link_local(client, "eth0")
    lab.link_local(client, "eth1")
    everywhere = lab.browser(client)
    restricted = lab.browser(client, interfaces=["eth1"])
    assert restricted.events[0]["links"] == ["eth1/6"]
    lab.announcer(server_a, name="A", port=40127, hostname="server-a")
    lab.announcer(server_b, name="B", port=40128, hostname="server-b")
    # Each address comes with the index of the link it was seen on.
    everywhere.wait_for(is_found(address=address_a, port=40127, ifname="eth0"), 10, "A")
    everywhere.wait_for(is_found(address=address_b, port=40128, ifname="eth1"), 10, "B")
    restricted.wait_for(is_found(address=address_b, port=40128, ifname="eth1"), 10, "B")
    restricted.collect(1.0)
    everywhere.collect(0)
    assert len(restricted.found()) == 1
    assert len(everywhere.found()) == 2


def test_browsing_publishes_nothing_and_closes_cleanly(lab):
    """On the wire the browser only ever asks; it answers nothing, not even on close."""
    server, client, address = one_link(lab, ipv4=True)
    observer = lab.host("obs")
    lab.plug(observer, "eth0", "lan")
    lab.link_local(observer, "eth0")
    capture = lab.capture(observer, "eth0")
    client_address = lab.link_local(client, "eth0")
    browser = lab.browser(client)
    lab.announcer(server, port=40129)
    browser.wait_for(is_found(address=address), 10, "the server")
    browser.collect(1.0)
    browser.signal()
    closed = browser.wait_for(lambda e: e["event"] == "closed", 5, "closing")
    assert not closed["alive"] and closed["failed"] == "None"
    assert "mandos-zeroconf" not in closed["threads"]
    capture.collect(1.0)
    packets = [e for e in capture.events if e["event"] == "packet"]
    mine = [p for p in packets if p["source"] in (client_address, "10.77.0.2")]
    assert any(p["questions"] for p in mine)  # it did browse, over IPv6 and IPv4
    assert {p["family"] for p in mine} == {4, 6}
    assert all(not p["response"] for p in mine)
    # The only records a query may carry are known answers: the server's own.
    server_records = {tuple(r) for p in packets if p["source"] == address
                      for r in p["records"]}
    assert {tuple(r) for p in mine for r in p["records"]} <= server_records


# --------------------------------------------------------------------------
# The original server's way of announcing: avahi-daemon.

def test_service_published_by_avahi_daemon_is_found(lab):
    if shutil.which("avahi-daemon") is None:
        pytest.fail("avahi-daemon is not installed (Debian package avahi-daemon; "
                    "scripts/install-deps installs it)")
    server, client, address = one_link(lab)
    browser = lab.browser(client)
    avahi = lab.avahi(server, "eth0", name="Mandos", port=40130)
    event = browser.wait_for(is_found(port=40130), 20, "the avahi-published server")
    assert (event["address"], event["family"], event["ifname"]) == (address, 6, "eth0")
    assert avahi.process.poll() is None, avahi.stderr
