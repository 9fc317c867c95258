"""Test helpers for multicast-DNS tests inside network namespaces.

A ``Lab`` makes "hosts" (one network namespace each) and plugs them into
"segments" (a bridge in a hub namespace); a ``Peer`` is a process run in
one of those namespaces (``ip netns exec``) whose stdout JSON lines become
events.  Everything is deleted again by ``Lab.close()``; nothing is ever
sent on the host's real interfaces.
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
from typing import Any, Callable, Self

import pytest


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
        pytest.fail(failure)


class Lab:
    """Network namespaces plugged into bridged segments; all deleted by close().

    Namespace names start with ``prefix``, the process id and a serial
    number.  Also a context manager that closes it on leaving.
    """

    _ids = itertools.count()

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
