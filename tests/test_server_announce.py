"""Tests for the server's Zeroconf announcement (PROTOCOL.md §2.1, SERVER.md §7, §12).

The network tests use real multicast DNS, but only inside network
namespaces they create and delete: "hosts" (one namespace each) plugged
into "segments" (a bridge in a hub namespace).  The announcer, the
browsers and the packet capture run as separate processes in those
namespaces (``ip netns exec``) and report JSON lines on stdout.  Nothing
is ever sent on the real host's interfaces.

One test runs Debian's original ``mandos-client`` 1.8.16 as the browsing
peer, to show it discovers the announcement.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from zeroconf import NonUniqueNameException

from mandos.server.announce import (AnnounceError, Announcer, Link, alternative_name)
from mdns_lab import PYTHON, REPO, Lab, Peer, announcer_argv, lab_fixture, one_link

SERVICE_TYPE = "_mandos._tcp.local."
HOST = socket.gethostname().split(".", 1)[0] + ".local."
TYPE_A, TYPE_PTR, TYPE_TXT, TYPE_AAAA, TYPE_SRV, TYPE_NSEC = 1, 12, 16, 28, 33, 47
RESCAN = 0.3  # seconds; the announcers under test look at interfaces this often

# --------------------------------------------------------------------------
# Programs run inside the namespaces.  Each prints JSON lines on stdout.

BROWSER = r"""
import asyncio, json, signal
from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    zc = AsyncZeroconf(ip_version=IPVersion.All)
    tasks = set()

    async def resolve(service_type, name):
        info = AsyncServiceInfo(service_type, name)
        if await info.async_request(zc.zeroconf, 3000):
            emit("resolved", name=name, port=info.port, text=info.text.hex(),
                 server=info.server, ipv4=info.parsed_addresses(IPVersion.V4Only),
                 ipv6=info.parsed_addresses(IPVersion.V6Only))

    def on_change(zeroconf, service_type, name, state_change):
        if state_change is ServiceStateChange.Removed:
            emit("removed", name=name)
            return
        emit("seen", name=name)
        task = asyncio.ensure_future(resolve(service_type, name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, "_mandos._tcp.local.", handlers=[on_change])
    emit("ready")
    await stop.wait()
    await browser.async_cancel()
    await zc.async_close()

asyncio.run(main())
"""

FIND_LINKS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from mandos.server.announce import find_links
links = find_links(sys.argv[2] == "ipv6", sys.argv[3] or None)
print(json.dumps({"event": "links",
                  "links": {l.name: list(l.addresses) for l in links.values()}}), flush=True)
"""


# --------------------------------------------------------------------------
# Namespaces and processes: this module's programs in the lab of mdns_lab.

class AnnounceLab(Lab):
    """The lab with the announcer under test, browsers and a packet capture."""

    capture_details = True  # TTLs and data of the records are looked at

    def announcer(self, namespace: str, *, name: str = "Mandos", port: int = 4711,
                  ipv6: bool = True, interface: str | None = None,
                  wait: bool = True) -> Peer:
        peer = self.spawn(namespace, announcer_argv(name, port, ipv6=ipv6, interface=interface,
                                                    rescan=RESCAN),
                          f"announcer in {namespace}")
        if wait:
            peer.started = peer.wait_for(lambda e: e["event"] == "started", 15, "start")
        return peer

    def browser(self, namespace: str) -> Peer:
        peer = self.spawn(namespace, [PYTHON, "-c", BROWSER], f"browser in {namespace}")
        peer.wait_for(lambda e: e["event"] == "ready", 10, "readiness")
        return peer


@pytest.fixture
def lab() -> Iterator[AnnounceLab]:
    """A fresh set of namespaces, always deleted afterwards."""
    yield from lab_fixture(AnnounceLab, "mandos-ann", "the Zeroconf tests need root and "
                           "iproute2 to create network namespaces")


def resolved(name: str = "Mandos", **expected: Any) -> Callable[[dict[str, Any]], bool]:
    """A predicate for the browser's resolution of ``name`` with ``expected`` fields."""
    full = f"{name}.{SERVICE_TYPE}"
    return lambda e: (e["event"] == "resolved" and e["name"] == full
                      and all(e[key] == value for key, value in expected.items()))


def server_packets(capture: Peer, *sources: str) -> list[dict[str, Any]]:
    """Captured packets sent from any of the server's addresses ``sources``."""
    return [e for e in capture.events if e["event"] == "packet" and e["source"] in sources]


# --------------------------------------------------------------------------
# Names (no network needed).

def test_first_alternative_name_appends_number_2():
    assert alternative_name("Mandos") == "Mandos #2"


def test_alternative_names_count_up():
    assert alternative_name("Mandos #2") == "Mandos #3"
    assert alternative_name("Mandos #9") == "Mandos #10"
    assert alternative_name("Mandos #32768") == "Mandos #32769"
    assert alternative_name("Server 2") == "Server 2 #2"


def test_alternative_name_fits_in_a_dns_label():
    long = "Ä" * 40  # 80 bytes of UTF-8
    name = alternative_name(long)
    assert len(name.encode()) <= 63
    assert name.endswith(" #2") and set(name[:-3]) == {"Ä"}
    assert alternative_name(name) == name[:-1] + "3"


def test_port_must_be_given():
    with pytest.raises(ValueError):
        Announcer("Mandos")
    with pytest.raises(ValueError):
        Announcer("Mandos", 0)
    with pytest.raises(ValueError):
        Announcer("Mandos", 65536)


# --------------------------------------------------------------------------
# Renaming logic with a stand-in network that reports collisions.

class FakeResponder:
    """Stands in for one link's zeroconf responder; names in ``taken`` collide."""

    def __init__(self, link: Link, taken: Callable[[str], bool], log: list[str]) -> None:
        self.link = link
        self.info: object | None = None
        self.name: str | None = None
        self._taken = taken
        self._log = log

    async def open(self) -> None:
        pass

    async def register(self, name: str, port: int, host: str) -> None:
        self._log.append(name)
        if self._taken(name):
            raise NonUniqueNameException
        self.info, self.name = object(), name

    async def update(self, link: Link, port: int, host: str) -> None:
        self.link = link

    async def withdraw(self) -> None:
        self.info = self.name = None

    async def close(self) -> None:
        self.info = self.name = None


class FakeNetworkAnnouncer(Announcer):
    """An Announcer on two fake links where the names ``taken`` collide."""

    def __init__(self, taken: Callable[[str], bool], **kwargs: Any) -> None:
        super().__init__("Mandos", 4711, **kwargs)
        self.tried: list[str] = []
        self.taken = taken

    def _find_links(self) -> dict[int, Link]:
        return {2: Link(2, "eth0", ("fe80::1",), "fe80::1"),
                3: Link(3, "eth1", ("fe80::2",), "fe80::2")}

    def _new_responder(self, link: Link) -> FakeResponder:  # type: ignore[override]
        return FakeResponder(link, self.taken, self.tried)


def test_each_collision_moves_to_the_next_name_on_every_link(caplog):
    renamed: list[str] = []
    announcer = FakeNetworkAnnouncer(lambda name: name in {"Mandos", "Mandos #2"},
                                     on_rename=renamed.append)

    async def scenario() -> list[str | None]:
        await announcer.start()
        names = [r.name for r in announcer._responders.values()]
        await announcer.stop()
        return names

    with caplog.at_level(logging.INFO, logger="mandos.server.announce"):
        names = asyncio.run(scenario())
    assert renamed == ["Mandos #2", "Mandos #3"]
    assert announcer.name == "Mandos #3" and announcer.renames == 2
    assert names == ["Mandos #3", "Mandos #3"]
    renames_logged = [r for r in caplog.records if "Mandos #3" in r.getMessage()]
    assert renames_logged and all(r.levelno == logging.INFO for r in renames_logged)


def test_gives_up_after_32768_renames(caplog):
    renamed: list[str] = []
    announcer = FakeNetworkAnnouncer(lambda name: True, on_rename=renamed.append)
    assert announcer.max_renames == 32768
    with caplog.at_level(logging.CRITICAL, logger="mandos.server.announce"):
        with pytest.raises(AnnounceError):
            asyncio.run(announcer.start())
    assert announcer.renames == 32768
    assert len(renamed) == 32768 and renamed[-1] == "Mandos #32769"
    # the original name plus one try per rename, on each of the two links
    assert len(announcer.tried) == 2 * 32769
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


# --------------------------------------------------------------------------
# Which interfaces and addresses are published (in a namespace).

def test_only_usable_interfaces_and_addresses_are_found(lab):
    """Up, multicast, not loopback; IPv6 not tentative unless optimistic;
    link-local first."""
    server = lab.host("srv")
    lab.plug(server, "eth0", "lan")
    lab.plug(server, "eth1", "lan", dad=True, carrier=False)  # DAD can never finish
    lab.plug(server, "eth2", "lan", up=False)
    lab.plug(server, "eth3", "lan", dad=True, carrier=False)  # nor here, but optimistic
    for setting in ("optimistic_dad", "use_optimistic"):
        lab.sysctl(server, f"net.ipv6.conf.eth3.{setting}=1")
    lab.ip(server, "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad")
    lab.ip(server, "addr", "add", "fd00:78::1/64", "dev", "eth1")
    lab.ip(server, "addr", "add", "fd00:79::1/64", "dev", "eth2", "nodad")
    lab.ip(server, "addr", "add", "fd00:7a::1/64", "dev", "eth3", "optimistic")
    for ifname, address in (("eth0", "10.77.0.1/24"), ("eth2", "10.77.2.1/24")):
        lab.ip(server, "addr", "add", address, "dev", ifname)
    link_local = lab.link_local(server, "eth0")
    assert any(flags & 0x40 for _a, flags in lab.ipv6_addresses(server, "eth1"))
    assert [flags & 0x44 for _a, flags in lab.ipv6_addresses(server, "eth3")] == [0x44]

    def found(family: str, interface: str = "") -> dict[str, list[str]]:
        peer = lab.spawn(server, [PYTHON, "-c", FIND_LINKS, str(REPO), family, interface],
                         "find_links")
        return peer.wait_for(lambda e: e["event"] == "links", 10)["links"]

    assert found("ipv6") == {"eth0": [link_local, "fd00:77::1"], "eth3": ["fd00:7a::1"]}
    assert found("ipv4") == {"eth0": ["10.77.0.1"]}
    assert found("ipv6", "eth2") == {}
    assert found("ipv6", "lo") == {}


# --------------------------------------------------------------------------
# What a browser on the link sees.

def test_service_is_published_with_real_port_and_empty_txt(lab):
    server, client, _address = one_link(lab)
    browser = lab.browser(client)
    lab.announcer(server, port=40123)
    event = browser.wait_for(resolved(), 10, "resolution")
    assert event["port"] == 40123
    assert event["text"] == "00"  # one empty string: the empty TXT record of RFC 6763
    assert event["server"] == HOST


def test_link_local_ipv6_address_published_by_default(lab):
    server, client, address = one_link(lab, ipv4=True)
    browser = lab.browser(client)
    lab.announcer(server)
    event = browser.wait_for(resolved(), 10, "resolution")
    assert event["ipv6"] == [address]
    assert event["ipv4"] == []


def test_ipv6_announcement_never_uses_ipv4(lab):
    """Dual-stack link, default settings: only IPv6 packets, only AAAA records."""
    server, client, address = one_link(lab, ipv4=True)
    capture = lab.capture(client, "eth0")
    browser = lab.browser(client)
    lab.announcer(server)
    browser.wait_for(resolved(), 10, "resolution")
    capture.collect(0.5)
    packets = server_packets(capture, address, "10.77.0.1")
    assert packets and all(p["family"] == 6 for p in packets)
    types = {r["type"] for p in packets for r in p["records"] if r["name"] == HOST}
    assert TYPE_AAAA in types and TYPE_A not in types
    addresses = {r["data"] for p in packets for r in p["records"] if r["type"] == TYPE_AAAA}
    assert addresses == {address}


def test_ipv4_only_when_ipv6_is_disabled(lab):
    server, client, address = one_link(lab, ipv4=True)
    capture = lab.capture(client, "eth0")
    browser = lab.browser(client)
    lab.announcer(server, ipv6=False)
    event = browser.wait_for(resolved(), 10, "resolution")
    assert event["ipv4"] == ["10.77.0.1"] and event["ipv6"] == []
    capture.collect(0.5)
    packets = server_packets(capture, address, "10.77.0.1")
    assert packets and all(p["family"] == 4 for p in packets)
    types = {r["type"] for p in packets for r in p["records"] if r["name"] == HOST}
    assert TYPE_A in types and TYPE_AAAA not in types


def test_nothing_but_the_service_is_published(lab):
    server, client, address = one_link(lab)
    capture = lab.capture(client, "eth0")
    browser = lab.browser(client)
    lab.announcer(server)
    browser.wait_for(resolved(), 10, "resolution")
    capture.collect(1.0)
    sent = {(r["name"], r["type"]) for p in server_packets(capture, address)
            for r in p["records"]}
    instance = f"Mandos.{SERVICE_TYPE}"
    required = {(SERVICE_TYPE, TYPE_PTR), (instance, TYPE_SRV), (instance, TYPE_TXT),
                (HOST, TYPE_AAAA)}
    # An NSEC record is how zeroconf answers "no A record" to a query.
    assert required <= sent <= required | {(HOST, TYPE_NSEC)}


def test_interface_setting_limits_publication_to_that_interface(lab):
    server, client_a, client_b = lab.host("srv"), lab.host("cla"), lab.host("clb")
    lab.plug(server, "eth0", "a")
    lab.plug(server, "eth1", "b")
    lab.plug(client_a, "eth0", "a")
    lab.plug(client_b, "eth0", "b")
    eth1 = lab.link_local(server, "eth1")
    lab.link_local(server, "eth0")
    browser_a, browser_b = lab.browser(client_a), lab.browser(client_b)
    started = lab.announcer(server, interface="eth1")
    assert started.started["links"] == ["eth1"]
    event = browser_b.wait_for(resolved(), 10, "resolution")
    assert event["ipv6"] == [eth1]
    assert not [e for e in browser_a.collect(2.0) if e["event"] != "ready"]


def test_each_link_is_told_only_its_own_addresses(lab):
    """A link-local address of one link is useless on another."""
    server, client_a, client_b = lab.host("srv"), lab.host("cla"), lab.host("clb")
    lab.plug(server, "eth0", "a")
    lab.plug(server, "eth1", "b")
    lab.plug(client_a, "eth0", "a")
    lab.plug(client_b, "eth0", "b")
    eth0, eth1 = lab.link_local(server, "eth0"), lab.link_local(server, "eth1")
    browser_a, browser_b = lab.browser(client_a), lab.browser(client_b)
    lab.announcer(server)
    assert browser_a.wait_for(resolved(), 10, "resolution")["ipv6"] == [eth0]
    assert browser_b.wait_for(resolved(), 10, "resolution")["ipv6"] == [eth1]
    browser_a.collect(1.0)
    assert {tuple(e["ipv6"]) for e in browser_a.events if e["event"] == "resolved"} \
        == {(eth0,)}


def test_link_coming_up_later_gets_the_same_name(lab):
    """The responders of two links never take each other for a rival."""
    server, client_a, client_b = lab.host("srv"), lab.host("cla"), lab.host("clb")
    lab.plug(server, "eth0", "a")
    lab.plug(server, "eth1", "b", up=False)
    lab.plug(client_a, "eth0", "a")
    lab.plug(client_b, "eth0", "b")
    lab.link_local(server, "eth0")
    lab.link_local(client_b, "eth0")
    browser_a, browser_b = lab.browser(client_a), lab.browser(client_b)
    announcer = lab.announcer(server)
    assert announcer.started["links"] == ["eth0"]
    browser_a.wait_for(resolved(), 10, "resolution on link a")
    lab.ip(server, "link", "set", "eth1", "up")
    eth1 = lab.link_local(server, "eth1")
    assert browser_b.wait_for(resolved(), 10, "resolution on link b")["ipv6"] == [eth1]
    browser_b.collect(0.5)
    assert not [e for e in announcer.events if e["event"] == "renamed"]
    assert not [e for e in browser_b.events if e["event"] == "resolved"
                and e["name"] != f"Mandos.{SERVICE_TYPE}"]


def test_addresses_that_appear_later_are_published(lab):
    server, client = lab.host("srv"), lab.host("cli")
    lab.plug(server, "eth0", "lan", addrgen=False)  # no address at all yet
    lab.plug(client, "eth0", "lan")
    lab.link_local(client, "eth0")
    browser = lab.browser(client)
    started = lab.announcer(server)
    assert started.started["links"] == []
    lab.ip(server, "addr", "add", "fe80::77/64", "dev", "eth0", "nodad")
    browser.wait_for(resolved(ipv6=["fe80::77"]), 10, "resolution")
    lab.ip(server, "addr", "add", "fd00:77::1/64", "dev", "eth0", "nodad")
    # (the order of addresses a browser reports is its cache's, not the packet's)
    browser.wait_for(lambda e: resolved()(e) and sorted(e["ipv6"]) == ["fd00:77::1", "fe80::77"],
                     10, "re-resolution")


# --------------------------------------------------------------------------
# Collisions and goodbyes on a real link.

def test_name_collision_renames_to_mandos_2(lab):
    first, second, client = lab.host("srv1"), lab.host("srv2"), lab.host("cli")
    for namespace in (first, second, client):
        lab.plug(namespace, "eth0", "lan")
    for namespace in (first, second, client):
        lab.link_local(namespace, "eth0")
    browser = lab.browser(client)
    original = lab.announcer(first, port=4711)
    assert original.started["name"] == "Mandos"
    browser.wait_for(resolved("Mandos", port=4711), 10, "first resolution")
    newcomer = lab.announcer(second, port=4712)
    assert [e["name"] for e in newcomer.events if e["event"] == "renamed"] == ["Mandos #2"]
    assert newcomer.started == {"event": "started", "name": "Mandos #2", "links": ["eth0"]}
    assert any(line.startswith("INFO:") and "'Mandos #2'" in line for line in newcomer.stderr)
    browser.wait_for(resolved("Mandos #2", port=4712), 10, "second resolution")
    assert not [e for e in original.events if e["event"] == "renamed"]


def test_further_collisions_rename_to_mandos_3(lab):
    hosts = [lab.host(f"srv{n}") for n in (1, 2, 3)] + [lab.host("cli")]
    for namespace in hosts:
        lab.plug(namespace, "eth0", "lan")
    for namespace in hosts:
        lab.link_local(namespace, "eth0")
    browser = lab.browser(hosts[3])
    for number, namespace in enumerate(hosts[:2]):
        lab.announcer(namespace, port=4711 + number)
        browser.wait_for(resolved(("Mandos", "Mandos #2")[number]), 10, "resolution")
    third = lab.announcer(hosts[2], port=4713)
    assert [e["name"] for e in third.events if e["event"] == "renamed"] \
        == ["Mandos #2", "Mandos #3"]
    assert third.started["name"] == "Mandos #3"
    browser.wait_for(resolved("Mandos #3", port=4713), 10, "third resolution")


def test_stop_sends_goodbyes(lab):
    server, client, address = one_link(lab)
    capture = lab.capture(client, "eth0")
    browser = lab.browser(client)
    announcer = lab.announcer(server)
    browser.wait_for(resolved(), 10, "resolution")
    os.killpg(announcer.process.pid, signal.SIGTERM)
    announcer.wait_for(lambda e: e["event"] == "stopped", 5, "stop")
    stopped = time.monotonic()
    browser.wait_for(lambda e: e["event"] == "removed" and e["name"] == f"Mandos.{SERVICE_TYPE}",
                     5, "removal")
    # The PTR record lives 75 minutes; only a goodbye removes it this fast.
    assert time.monotonic() - stopped < 5
    capture.collect(0.3)
    goodbyes = [r for p in server_packets(capture, address) for r in p["records"]
                if r["type"] == TYPE_PTR and r["ttl"] == 0]
    assert goodbyes


# --------------------------------------------------------------------------
# The original Debian client as the browsing peer.

@pytest.fixture(scope="module")
def dummy_client_keys(debian_peers):
    """Key files for the original client, from the original mandos-keygen."""
    folder = Path(tempfile.mkdtemp(prefix="mandos-ann-keys-"))
    try:
        subprocess.run([str(debian_peers / "usr/sbin/mandos-keygen"), "--dir", str(folder),
                        "--force"], check=True, capture_output=True)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.interop
def test_original_client_discovers_the_announcement(lab, debian_peers, dummy_client_keys,
                                                    tmp_path):
    client_program = (debian_peers / "usr/lib/x86_64-linux-gnu/mandos/plugins.d"
                      / "mandos-client")
    server, client = lab.host("srv"), lab.host("cli")
    lab.plug(server, "eth0", "lan")
    lab.plug(client, "eth0", "lan", up=False)  # the client brings it up itself
    address = lab.link_local(server, "eth0")
    lab.announcer(server, port=40124)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    keys = dummy_client_keys
    env = dict(os.environ, TMPDIR=str(tmp_path))
    original = lab.spawn(client, [
        str(client_program), "--interface", "eth0", "--debug",
        "--network-hook-dir", str(hooks),
        "--pubkey", str(keys / "pubkey.txt"), "--seckey", str(keys / "seckey.txt"),
        "--tls-pubkey", str(keys / "tls-pubkey.pem"),
        "--tls-privkey", str(keys / "tls-privkey.pem")], "original mandos-client", env)
    match = original.wait_for_stderr(r'Mandos server "([^"]*)" found on (\S+) '
                                     r'\(([0-9a-f:.]+), (\d+)\) on port (\d+)', 30)
    print(match.group(0))
    assert match.group(1) == "Mandos"
    assert match.group(3) == address
    assert match.group(5) == "40124"
    original.terminate()
