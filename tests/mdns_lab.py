"""Test helpers for multicast-DNS tests inside network namespaces.

A ``Lab`` makes "hosts" (one network namespace each) and plugs them into
"segments" (a bridge in a hub namespace); a ``Peer`` is a process run in
one of those namespaces (``ip netns exec``) whose stdout JSON lines become
events.  Everything is deleted again by ``Lab.close()``; nothing is ever
sent on the host's real interfaces.

The programs run in those namespaces by more than one test module live
here too: our server's announcer alone (``ANNOUNCER``), a packet capture
(``CAPTURE``) and the files and wrapper for a namespace-private
avahi-daemon (``AVAHI_CONF``, ``AVAHI_SERVICE``, ``AVAHI_WRAPPER``).
tests/e2e/netns.py uses them as well, also from the benchmarks: hence
pytest is imported only where a test is failed.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Iterator, Self

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's, with python3-zeroconf

# --------------------------------------------------------------------------
# Programs run inside the namespaces.  Each prints JSON lines on stdout.

# Our server's announcer alone: argv[1] is the repository, argv[2] the
# options (JSON: see announcer_argv); nothing listens on the port.
ANNOUNCER = r"""
import asyncio, json, logging, signal, sys
sys.path.insert(0, sys.argv[1])
from mandos.server.announce import Announcer
options = json.loads(sys.argv[2])
logging.basicConfig(level=logging.INFO, format="%(levelname)s:%(name)s:%(message)s")

def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    announcer = Announcer(options["name"], options["port"], use_ipv6=options["ipv6"],
                          interface=options["interface"],
                          on_rename=lambda name: emit("renamed", name=name),
                          rescan_interval=options["rescan"])
    await announcer.start()
    emit("started", name=announcer.name, links=[link.name for link in announcer.links])
    await stop.wait()
    await announcer.stop()
    emit("stopped")

asyncio.run(main())
"""


def announcer_argv(name: str, port: int, *, ipv6: bool = True, interface: str | None = None,
                   rescan: float = 0.3) -> list[str]:
    """The command line of ``ANNOUNCER``: events "started" (name, links), "renamed", "stopped"."""
    options = {"name": name, "port": port, "ipv6": ipv6, "interface": interface,
               "rescan": rescan}
    return [PYTHON, "-c", ANNOUNCER, str(REPO), json.dumps(options)]


# The multicast DNS packets seen on one interface (argv[1]), over IPv6 and
# IPv4: an event "packet" each, with the answer records as [name, type]
# or, with "details", as a dict with ttl and data; with "questions", the
# questions as [name, type] too (options in argv[2], JSON).
CAPTURE = r"""
import json, select, signal, socket, struct, sys
from zeroconf import DNSIncoming
ifname = sys.argv[1]
options = json.loads(sys.argv[2])
index = socket.if_nametoindex(ifname)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

def listener(family, group):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::", 5353))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                        socket.inet_pton(family, group) + struct.pack("@I", index))
    else:
        sock.bind(("0.0.0.0", 5353))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
                        + struct.pack("@i", index))
    return sock

def describe(record):
    if not options["details"]:
        return [record.name, record.type]
    data = None
    if record.type in (1, 28):
        data = socket.inet_ntop(socket.AF_INET if record.type == 1 else socket.AF_INET6,
                                record.address)
    elif record.type == 12:
        data = record.alias
    elif record.type == 33:
        data = [record.server, record.port]
    elif record.type == 16:
        data = record.text.hex()
    elif record.type == 47:
        data = sorted(record.rdtypes)
    return {"name": record.name, "type": record.type, "ttl": record.ttl, "data": data}

sockets = {listener(socket.AF_INET6, "ff02::fb"): 6, listener(socket.AF_INET, "224.0.0.251"): 4}
print(json.dumps({"event": "ready"}), flush=True)
while True:
    for sock in select.select(list(sockets), [], [])[0]:
        data, source = sock.recvfrom(9000)
        message = DNSIncoming(data)
        packet = {"event": "packet", "family": sockets[sock], "source": source[0],
                  "response": message.is_response()}
        if options["questions"]:
            packet["questions"] = [[q.name, q.type] for q in message.questions]
        packet["records"] = [describe(r) for r in message.answers]
        print(json.dumps(packet), flush=True)
"""

# avahi-daemon as the original Mandos server drives it: service "Mandos",
# type _mandos._tcp, empty TXT list.  A static service file says the same
# as the original's D-Bus AddService call.
AVAHI_CONF = """\
[server]
use-ipv4=yes
use-ipv6=yes
allow-interfaces={interfaces}
enable-dbus={dbus}
ratelimit-interval-usec=1000000
ratelimit-burst=1000
[wide-area]
enable-wide-area=no
[publish]
publish-hinfo=no
publish-workstation=no
[reflector]
[rlimits]
"""
AVAHI_SERVICE = """\
<?xml version="1.0" standalone='no'?>
<!DOCTYPE service-group SYSTEM "avahi-service.dtd">
<service-group>
  <name>{name}</name>
  <service protocol="{protocol}">
    <type>_mandos._tcp</type>
    <port>{port}</port>
  </service>
</service-group>
"""
# The daemon's run-time folder and its services folder made private to it:
# a tmpfs on /run and a bind mount on /etc/avahi/services, in a mount
# namespace of its own (``unshare --mount sh -c AVAHI_WRAPPER avahi
# SERVICES CONFIG``), so nothing of the host's is used or changed.
AVAHI_WRAPPER = """\
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/avahi-daemon
mount --bind "$1" /etc/avahi/services
exec avahi-daemon --no-chroot --no-rlimits --file="$2"
"""


def write_avahi_files(folder: Path, interfaces: str,
                      services: Iterable[tuple[str, int, str]] = (), *,
                      dbus: bool = False) -> tuple[Path, Path]:
    """avahi-daemon's configuration and services folder, made in ``folder``.

    The daemon uses ``interfaces`` only, and its D-Bus API if ``dbus``;
    the services folder holds a static service file per (name, port,
    protocol) in ``services``, protocol "ipv6", "ipv4" or "any".  Returns
    (configuration file, services folder).
    """
    services_folder = folder / "services"
    services_folder.mkdir(exist_ok=True)
    for number, (name, port, protocol) in enumerate(services):
        (services_folder / f"mandos{number}.service").write_text(
            AVAHI_SERVICE.format(name=name, port=port, protocol=protocol))
    config = folder / "avahi-daemon.conf"
    config.write_text(AVAHI_CONF.format(interfaces=interfaces, dbus="yes" if dbus else "no"))
    return config, services_folder


# --------------------------------------------------------------------------
# Processes and namespaces.

class Peer:
    """A process in a namespace; its stdout JSON lines become events."""

    def __init__(self, argv: list[str], label: str, env: dict[str, str] | None = None) -> None:
        self.label = label
        self.events: list[dict[str, Any]] = []
        self.started: dict[str, Any] | None = None  # an announcer's "started" event
        self.stderr: list[str] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._eof = False
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env,
                                        start_new_session=True)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "text", "line": line.rstrip("\n")}
            self._queue.put(event)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line.rstrip("\n"))

    def _drain(self, timeout: float) -> None:
        """Move the queued events to ``events``, waiting up to ``timeout`` for one."""
        if self._eof:
            time.sleep(max(timeout, 0))
            return
        try:
            event = self._queue.get(timeout=max(timeout, 0.001))
            while True:
                if event is None:
                    self._eof = True
                    return
                self.events.append(event)
                event = self._queue.get_nowait()
        except queue.Empty:
            pass

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10,
                 what: str = "event") -> dict[str, Any]:
        """The first event (past or future) satisfying ``predicate``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if predicate(event):
                    return event
            seen = len(self.events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._drain(min(remaining, 0.1))
        raise AssertionError(f"{self.label}: no {what} within {timeout} s; "
                             f"events: {self.events}; stderr: {self.stderr[-30:]}")

    def collect(self, seconds: float) -> list[dict[str, Any]]:
        """All events after waiting ``seconds`` more."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self._drain(min(remaining, 0.1))
        self._drain(0)
        return self.events

    def found(self) -> list[dict[str, Any]]:
        """The "found" events so far."""
        return [e for e in self.events if e["event"] == "found"]

    def wait_for_stderr(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first stderr line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stderr):
                match = re.search(pattern, line)
                if match:
                    return match
            time.sleep(0.1)
        raise AssertionError(f"{self.label}: no stderr line like {pattern!r} within "
                             f"{timeout} s; stderr: {self.stderr[-40:]}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the process group."""
        os.killpg(self.process.pid, signum)

    def terminate(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; by process group id."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)


def require_namespaces(failure: str) -> None:
    """Fail the test with ``failure`` unless network namespaces can be made."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        import pytest
        pytest.fail(failure)


class Lab:
    """Network namespaces plugged into bridged segments; all deleted by close().

    Namespace names start with ``prefix``, the process id and a serial
    number.  Also a context manager that closes it on leaving.
    """

    _ids = itertools.count()
    capture_questions = False
    capture_details = False

    def __init__(self, prefix: str) -> None:
        self.prefix = f"{prefix}-{os.getpid()}-{next(self._ids)}"
        self.namespaces: list[str] = []
        self.peers: list[Peer] = []
        self.folders: list[Path] = []  # temporary folders, removed by close()
        self.hub: str | None = None
        self._plugs = itertools.count()
        self._segments: set[str] = set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------
    def run(self, *argv: str) -> str:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return result.stdout

    def ip(self, namespace: str, *argv: str) -> str:
        return self.run("ip", "-n", namespace, *argv)

    def exec(self, namespace: str, *argv: str) -> str:
        return self.run("ip", "netns", "exec", namespace, *argv)

    def sysctl(self, namespace: str, setting: str) -> None:
        self.exec(namespace, "sysctl", "-qw", setting)

    # -- building ----------------------------------------------------------
    def host(self, role: str) -> str:
        """A new namespace with loopback up."""
        name = f"{self.prefix}-{role}"
        try:
            self.run("ip", "netns", "add", name)
        except RuntimeError as error:
            import pytest
            pytest.fail(f"cannot create network namespace {name} (root and iproute2 are "
                        f"needed for the Zeroconf tests): {error}")
        self.namespaces.append(name)
        self.ip(name, "link", "set", "lo", "up")
        return name

    def segment(self, name: str) -> None:
        """A bridge in the hub namespace, flooding multicast like a plain hub."""
        if self.hub is None:
            self.hub = self.host("hub")
            self.sysctl(self.hub, "net.ipv6.conf.default.disable_ipv6=1")
        self.ip(self.hub, "link", "add", f"br-{name}", "type", "bridge", "mcast_snooping", "0")
        self.ip(self.hub, "link", "set", f"br-{name}", "up")
        self._segments.add(name)

    def plug(self, namespace: str, ifname: str, segment: str, *, up: bool = True,
             dad: bool = False, addrgen: bool = True, carrier: bool = True) -> None:
        """Connect ``namespace`` to ``segment`` through its new interface ``ifname``."""
        if segment not in self._segments:
            self.segment(segment)
        assert self.hub is not None
        peer = f"p{next(self._plugs)}"
        self.run("ip", "link", "add", ifname, "netns", namespace, "type", "veth",
                 "peer", "name", peer, "netns", self.hub)
        self.ip(self.hub, "link", "set", peer, "master", f"br-{segment}")
        if not dad:  # link-local addresses usable at once
            self.sysctl(namespace, f"net.ipv6.conf.{ifname}.accept_dad=0")
        if not addrgen:
            self.ip(namespace, "link", "set", ifname, "addrgenmode", "none")
        if carrier:
            self.ip(self.hub, "link", "set", peer, "up")
        if up:
            self.ip(namespace, "link", "set", ifname, "up")

    def ipv6_addresses(self, namespace: str, ifname: str) -> list[tuple[str, int]]:
        """(address, flags) of the IPv6 addresses of an interface."""
        result = []
        for line in self.exec(namespace, "cat", "/proc/net/if_inet6").splitlines():
            fields = line.split()
            if fields[5] == ifname:
                address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
                result.append((address, int(fields[4], 16)))
        return result

    def link_local(self, namespace: str, ifname: str, timeout: float = 10) -> str:
        """The interface's link-local address, once it is usable (not tentative)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for address, flags in self.ipv6_addresses(namespace, ifname):
                if address.startswith("fe80:") and not flags & 0x40:
                    return address
            time.sleep(0.05)
        raise AssertionError(f"{ifname} in {namespace} got no link-local address")

    # -- processes ---------------------------------------------------------
    def spawn(self, namespace: str, argv: list[str], label: str,
              env: dict[str, str] | None = None) -> Peer:
        """Run ``argv`` in ``namespace``; terminated by close()."""
        peer = Peer(["ip", "netns", "exec", namespace, *argv], label, env)
        self.peers.append(peer)
        return peer

    def capture(self, namespace: str, ifname: str) -> Peer:
        """``CAPTURE`` on ``ifname`` in ``namespace``, ready when returned.

        It reports questions if the class's ``capture_questions`` is true,
        and records in detail if its ``capture_details`` is.
        """
        options = {"questions": self.capture_questions, "details": self.capture_details}
        peer = self.spawn(namespace, [PYTHON, "-c", CAPTURE, ifname, json.dumps(options)],
                          f"capture in {namespace}")
        peer.wait_for(lambda e: e["event"] == "ready", 10, "readiness")
        return peer

    def close(self) -> None:
        """Terminate the peers, then delete the namespaces and the folders."""
        try:
            for peer in reversed(self.peers):
                peer.terminate()
        finally:
            for name in reversed(self.namespaces):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)


def lab_fixture(kind: type[Lab], prefix: str, failure: str) -> Iterator[Lab]:
    """The body of a ``lab`` fixture: a ``kind`` lab, always closed afterwards.

    The test fails with ``failure`` if network namespaces cannot be made.
    """
    require_namespaces(failure)
    with kind(prefix) as instance:
        yield instance


def one_link(lab: Lab, *, ipv4: bool = False) -> tuple[str, str, str]:
    """Server and client hosts on one segment: (server ns, client ns, server link-local)."""
    server, client = lab.host("srv"), lab.host("cli")
    lab.plug(server, "eth0", "lan")
    lab.plug(client, "eth0", "lan")
    if ipv4:
        lab.ip(server, "addr", "add", "10.77.0.1/24", "dev", "eth0")
        lab.ip(client, "addr", "add", "10.77.0.2/24", "dev", "eth0")
    address = lab.link_local(server, "eth0")
    lab.link_local(client, "eth0")
    return server, client, address
