"""The boot network path end to end: interface down → discovery → passphrase.

Every test builds "hosts" out of network namespaces (tests/e2e/netns.py)
and deletes them afterwards.  The client host's interface ``eth0`` starts
DOWN, as at boot.  mandos-client runs in the client host without
``--connect``: it must bring the interface up, wait for a usable IPv6
link-local address (duplicate-address detection is on, with the kernel's
default settings, unless a test says otherwise), find the server by mDNS,
connect over IPv6 link-local, print the passphrase, and take the interface
down again on its way out (it brought it up).

Two ways of joining hosts are used:

* a **cable**: the two hosts joined directly by a veth pair.  The server's
  side then has no carrier until the client brings its side up, so the
  server gets its link-local address only at that moment (as a server
  cabled directly to the booting machine would);
* a **switch**: each host plugged into a bridge in a hub namespace, which
  keeps the server's link up whatever the client does (as a switch port
  would).  Used where three hosts share a link, where the server must be
  announcing before the client starts, and for IPv4.

Every client run has a timeout, and runs with a private ``/run`` whose
``/run/tmp`` is a folder of the test (clients make their GnuPG home there)
so that the test can see whether a GnuPG home was left behind; after the
run, no process may be left in the client host (a gpg-agent would be).

Servers: our ``bin/mandos`` with Zeroconf, or the original Debian server
(1.8.16) announcing through an avahi-daemon of the server host (with a
namespace-private system D-Bus), each host with a host name of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

import netns
from netns import Host, Lab, Process

pytestmark = [pytest.mark.slow]
interop = pytest.mark.interop

PASSWORD = b"boot network passphrase \x01\xfe"
CLIENT_TIMEOUT = 90  # seconds; a client run that takes longer has failed
PORT = 4711


# --------------------------------------------------------------------------
# Fixtures and utilities.

@pytest.fixture(scope="module")
def keyring():
    """The client's key files and clients.conf sections (ours and a stranger's)."""
    folder = Path(tempfile.mkdtemp(prefix="mandos-boot-keys-", dir=netns.FOLDER_BASE))
    os.chmod(folder, 0o755)
    try:
        keys, section = netns.make_keys(folder, "bootclient", PASSWORD, bits=2048)
        _other, stranger = netns.make_keys(folder, "stranger", b"not ours", bits=2048)
        yield keys, section, stranger
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def keys(keyring) -> Path:
    return keyring[0]


@pytest.fixture
def section(keyring) -> str:
    return keyring[1]


@pytest.fixture
def lab():
    try:
        instance = Lab("boot")
    except netns.NetnsError as error:
        pytest.fail(f"these tests need network namespaces: {error}")
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture
def hooks(lab) -> Path:
    """An empty network hook directory."""
    path = lab.folder("mandos-boot-hooks-")
    return path


def cable(lab: Lab, *, client_dad: bool = True) -> tuple[Host, Host]:
    """Server and client host joined by a veth pair; the client's side is down."""
    server = lab.host("srv", hostname="mandos-server")
    client = lab.host("cli", hostname="booting-client", dad=client_dad)
    lab.veth(server, "eth0", client, "eth0", b_up=False)
    return server, client


def switched(lab: Lab, *servers: str, client_dad: bool = True) -> tuple[list[Host], Host]:
    """Server hosts (roles ``servers``, each up and with a usable link-local
    address) and a client host (interface down), all on one switch."""
    hosts = []
    for role in servers:
        host = lab.host(role, hostname=f"{role}-host")
        lab.plug(host, "eth0")
        hosts.append(host)
    client = lab.host("cli", hostname="booting-client", dad=client_dad)
    lab.plug(client, "eth0", up=False)
    for host in hosts:
        host.link_local("eth0")
    return hosts, client


class ClientRun:
    """One mandos-client run in the client host, with a private /run/tmp.

    The client makes its GnuPG home in /run/tmp when that exists; a private
    /run with our folder as /run/tmp shows whether anything is left behind
    (a private /tmp would also hide a checkout that lives under /tmp).
    """

    def __init__(self, lab: Lab, host: Host, argv: list[str], *,
                 env: dict[str, str] | None = None, label: str = "mandos-client") -> None:
        self.lab = lab
        self.host = host
        self.tmp = lab.folder("mandos-boot-tmp-")
        os.chmod(self.tmp, 0o1777)
        self.process: Process = host.spawn(argv, label, env=env or netns.client_env(),
                                           tmpfs=["/run"], binds={"/run/tmp": self.tmp})
        self.status: int | None = None

    @property
    def elapsed(self) -> float:
        assert self.process.ended is not None
        return self.process.ended - self.process.started

    def wait(self, timeout: float = CLIENT_TIMEOUT) -> int:
        status = self.process.wait(timeout)
        if status is None:
            self.process.kill_group(grace=2)
            pytest.fail(f"{self.process.label} did not finish within {timeout} s:\n"
                        f"{self.log()}\n{self.others()}")
        self.status = status
        return status

    def log(self, lines: int = 80) -> str:
        interesting = [line for line in self.process.stderr
                       if "GNUPG:" not in line and "gpg:" not in line]
        return "\n".join(interesting[-lines:])

    def others(self, lines: int = 15) -> str:
        """The end of what the lab's other processes (servers, daemons) wrote."""
        return "\n".join(f"--- {p.label}:\n{p.tail(lines)}" for p in self.lab.processes
                         if p is not self.process)

    def assert_unlocked(self, timeout: float = CLIENT_TIMEOUT) -> None:
        status = self.wait(timeout)
        assert status == 0 and self.process.stdout == PASSWORD, (
            f"exit status {status}, output {self.process.stdout!r}:\n{self.log()}\n"
            f"{self.others()}")

    def assert_cleaned_up(self, ifname: str = "eth0") -> None:
        """Interface down again, no GnuPG home left, no process left."""
        assert self.host.exists(ifname), f"{ifname} vanished"
        assert not self.host.is_up(ifname), f"{ifname} was left up:\n{self.log()}"
        assert list(self.tmp.iterdir()) == [], "left in /run/tmp: " + ", ".join(
            str(p.relative_to(self.tmp)) for p in self.tmp.rglob("*"))
        # gpg-agent ends soon after its home is removed; give it a moment.
        netns.wait_until(lambda: not self.host.pids(), 5)
        left = self.host.process_names()
        assert not left, f"processes left in the client host: {left}"


def ours(keys: Path, hooks: Path, **options) -> list[str]:
    return netns.client_command("ours", keys, hooks, debug=True, **options)


def original(keys: Path, hooks: Path, **options) -> list[str]:
    return netns.client_command("original", keys, hooks, debug=True, **options)


def found_lines(run: ClientRun) -> list[str]:
    return [line for line in run.process.stderr if "Zeroconf: Mandos server" in line]


def server_folder(lab: Lab, name: str) -> Path:
    return lab.folder(f"mandos-boot-{name}-")


def original_server(lab: Lab, host: Host, clients_conf: str, *, ipv6: bool = True
                    ) -> Process:
    """The original server announcing through avahi-daemon and a private system bus."""
    folder = server_folder(lab, "original")
    _bus_process, bus = netns.start_system_bus(host, folder / "bus")
    netns.start_avahi(host, folder / "avahi", "eth0", bus=bus)
    return netns.start_original_server(host, folder / "server", clients_conf, bus,
                                       port=PORT, ipv6=ipv6)


INTERFACE_CHOICES = pytest.mark.parametrize("interface", [None, "eth0"],
                                            ids=["automatic", "eth0"])


# --------------------------------------------------------------------------
# Our client, our server.

@INTERFACE_CHOICES
def test_our_client_unlocks_from_our_server(lab, keys, section, hooks, interface):
    server, client = cable(lab)
    served = netns.start_our_server(server, server_folder(lab, "ours"), section, port=PORT)
    run = ClientRun(lab, client, ours(keys, hooks, interface=interface))
    run.assert_unlocked()
    log = run.log(400)
    assert "Took interface eth0 up" in log
    assert "Zeroconf: browsing on eth0 (IPv6)" in log
    # Browsing starts on the optimistic address, while duplicate detection
    # runs; the connection waits for its end (a peer cannot resolve an
    # address under detection, so connecting earlier stalls).
    browsing = log.index("Zeroconf: browsing on eth0 (IPv6)")
    settled = log.index("(duplicate detection over)")
    assert browsing < settled < log.index("Connecting to [fe80:")
    server_address = server.link_local("eth0")
    assert re.search(rf"found at \[{re.escape(server_address)}%\d+\]:{PORT}", log), log
    assert "Sending secret to bootclient" in served.output()
    client_address = re.search(r"TCP connection from (\S+)", served.output()).group(1)
    assert client_address.startswith("fe80:")  # IPv6 link-local
    run.assert_cleaned_up()


# --------------------------------------------------------------------------
# The original programs as peers.

@interop
@INTERFACE_CHOICES
def test_our_client_unlocks_from_the_original_server_via_avahi(lab, keys, section, hooks,
                                                               interface):
    server, client = cable(lab)
    served = original_server(lab, server, section)
    run = ClientRun(lab, client, ours(keys, hooks, interface=interface))
    run.assert_unlocked()
    server_address = server.link_local("eth0")
    assert re.search(rf"found at \[{re.escape(server_address)}%\d+\]:{PORT}",
                     run.log(400)), run.log()
    assert "Sending secret to bootclient" in served.output()
    run.assert_cleaned_up()


@interop
@INTERFACE_CHOICES
def test_original_client_unlocks_from_our_server(lab, keys, section, hooks, interface):
    server, client = cable(lab)
    served = netns.start_our_server(server, server_folder(lab, "ours"), section, port=PORT)
    run = ClientRun(lab, client, original(keys, hooks, interface=interface),
                    label="original mandos-client")
    run.assert_unlocked()
    server_address = server.link_local("eth0")
    assert re.search(rf'Mandos server "Mandos" found on mandos-server\.local '
                     rf'\({re.escape(server_address)}, \d+\) on port {PORT}',
                     run.log(400)), run.log()
    assert "Sending secret to bootclient" in served.output()
    run.assert_cleaned_up()


# --------------------------------------------------------------------------
# Several servers, late servers.

DEAD_KINDS = ["nothing-listens", "hung", "unknown-key"]


@pytest.mark.parametrize("dead", DEAD_KINDS)
def test_a_dead_server_does_not_hold_up_the_unlock(lab, keyring, keys, section, hooks, dead):
    """Two servers are announced; the one found first is dead.

    To be sure the dead one is really tried first, it is announced alone
    until the client is busy with it; only then does the live server start
    (and announce itself).  Dead means: announced but nothing listens on
    its port; or a "hung" server that accepts connections and never
    answers; or a real server that does not know our key.  The passphrase
    must come from the live server within 5 s of its start.
    """
    (dead_host, live_host), client = switched(lab, "dead", "live", client_dad=False)
    folder = server_folder(lab, "dead")
    if dead == "unknown-key":
        netns.start_our_server(dead_host, folder, keyring[2], port=PORT)
    else:
        netns.start_announcer(dead_host, folder, "Mandos", PORT)
        if dead == "hung":
            netns.start_silent_listener(dead_host, folder, PORT)
    dead_address = dead_host.link_local("eth0")
    run = ClientRun(lab, client, ours(keys, hooks))
    run.process.wait_for_output(rf"Trying \[{re.escape(dead_address)}%\d+\]:{PORT}", 30)
    live_start = time.monotonic()
    netns.start_our_server(live_host, server_folder(lab, "live"), section, port=PORT,
                           extra=["--servicename", "Live"])
    run.assert_unlocked()
    took = run.process.ended - live_start
    assert took < 5.0, f"unlocked {took:.1f} s after the live server started:\n{run.log()}"
    assert len(found_lines(run)) == 2, run.log()
    run.assert_cleaned_up()


def test_a_server_that_appears_after_the_client_started_is_used(lab, keys, section, hooks):
    """The server starts 2 s after the client (which is searching by then)."""
    (server,), client = switched(lab, "srv")
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"))
    time.sleep(2)
    assert run.process.poll() is None, run.log()
    started = time.monotonic()
    netns.start_our_server(server, server_folder(lab, "late"), section, port=PORT)
    run.assert_unlocked()
    took = run.process.ended - started
    assert took < 10, f"unlocked {took:.1f} s after the server started:\n{run.log()}"
    run.assert_cleaned_up()


def test_ipv4_only_announcement(lab, keys, section, hooks):
    """Our server with --no-ipv6 announces and listens over IPv4 only.

    The client needs an IPv4 address for that.  It is put on the client's
    interface while that is still down (the kernel keeps it, and it becomes
    usable the moment the interface goes up), so the client still brings
    the interface up itself, as at boot where the boot scripts' ``ip=``
    handling configures IPv4 before mandos-client runs.  Both hosts are on
    a switch, with addresses from 192.0.2.0/24.
    """
    (server,), client = switched(lab, "srv")
    server.ip("addr", "add", "192.0.2.1/24", "dev", "eth0")
    client.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
    served = netns.start_our_server(server, server_folder(lab, "ipv4"), section, port=PORT,
                                    ipv6=False)
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"))
    run.assert_unlocked()
    assert re.search(rf"found at 192\.0\.2\.1:{PORT}", run.log(400)), run.log()
    assert re.search(r"TCP connection from (::ffff:)?192\.0\.2\.2\b", served.output()), \
        served.tail()
    assert not client.is_up("eth0")
    assert client.ip("-4", "addr", "show", "dev", "eth0").count("192.0.2.2/24") == 1
    run.assert_cleaned_up()


def bridged_server_host(lab: Lab) -> tuple[Host, Host]:
    """A server host whose eth0 is the port of a bridge br0 (as on a host of
    virtual machines), and a client host, on one switch."""
    server = lab.host("srv", hostname="mandos-server")
    lab.plug(server, "eth0", up=False)
    client = lab.host("cli", hostname="booting-client")
    lab.plug(client, "eth0", up=False)
    server.ip("link", "add", "br0", "type", "bridge")
    server.ip("link", "set", "eth0", "master", "br0")
    server.ip("link", "set", "eth0", "up")
    server.ip("link", "set", "br0", "up")
    server.link_local("br0")
    return server, client


def test_our_server_on_a_bridged_host_is_found(lab, keys, section, hooks):
    server, client = bridged_server_host(lab)
    served = netns.start_our_server(server, server_folder(lab, "bridged"), section, port=PORT)
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"))
    # The original server needs about 3 s here (see the next test).
    run.assert_unlocked(timeout=25)
    assert "Sending secret to bootclient" in served.output()
    run.assert_cleaned_up()


@interop
def test_original_server_on_a_bridged_host_is_found(lab, keys, section, hooks):
    """The same set-up with the original server (Avahi publishes on br0)."""
    server, client = bridged_server_host(lab)
    folder = server_folder(lab, "original")
    _bus_process, bus = netns.start_system_bus(server, folder / "bus")
    netns.start_avahi(server, folder / "avahi", "br0", bus=bus)
    served = netns.start_original_server(server, folder / "server", section, bus, port=PORT)
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"))
    run.assert_unlocked()
    assert re.search(rf"found at \[{re.escape(server.link_local('br0'))}%\d+\]:{PORT}",
                     run.log(400)), run.log()
    assert "Sending secret to bootclient" in served.output()
    run.assert_cleaned_up()


# --------------------------------------------------------------------------
# Network hooks, the route helper.

def bridge_hook(hooks: Path, client: Host) -> None:
    """Our example bridge hook and a bridge.conf making br0 out of eth0."""
    shutil.copy(netns.REPO / "network-hooks.d" / "bridge", hooks / "bridge")
    os.chmod(hooks / "bridge", 0o755)
    (hooks / "bridge.conf").write_text(
        f'BRIDGE=br0\nPORT_ADDRESSES="{client.mac("eth0")}"\n')


def bridge_index(run: ClientRun, client: Host) -> int | None:
    """br0's interface index, read while the client runs (None if never seen)."""
    netns.wait_until(lambda: client.exists("br0") or run.process.poll() is not None, 30)
    return (client.link("br0") or {}).get("ifindex")


def test_bridge_hook_builds_the_interface_the_client_uses(lab, keys, section, hooks):
    """Our example hook network-hooks.d/bridge enslaves eth0 to a new br0.

    The client runs without --interface: the hooks run before the
    automatic choice, so br0 already exists and is chosen (eth0, its port,
    too).  It finds the server through br0; after it exits, the hook's
    stop mode has deleted the bridge and taken eth0 down again.
    """
    server, client = cable(lab)
    bridge_hook(hooks, client)
    served = netns.start_our_server(server, server_folder(lab, "bridge"), section, port=PORT)
    run = ClientRun(lab, client, ours(keys, hooks))
    br0_index = bridge_index(run, client)
    # The original needs about 5 s here (see the next test).
    run.assert_unlocked(timeout=30)
    log = run.log(400)
    assert "Zeroconf: browsing on br0 (IPv6)" in log
    assert re.search(rf"found at \[fe80::[0-9a-f:]+%{br0_index}\]:{PORT} on interface "
                     rf"{br0_index}", log), log
    assert "Sending secret to bootclient" in served.output()
    assert not client.exists("br0"), "the bridge was left behind"
    assert client.master("eth0") is None
    run.assert_cleaned_up()


@interop
def test_bridge_hook_with_the_original_client(lab, keys, section, hooks):
    """The same set-up with the original client, for comparison."""
    server, client = cable(lab)
    bridge_hook(hooks, client)
    served = netns.start_our_server(server, server_folder(lab, "bridge"), section, port=PORT)
    run = ClientRun(lab, client, original(keys, hooks), label="original mandos-client")
    bridge_index(run, client)
    run.assert_unlocked()
    assert re.search(r'Mandos server "Mandos" found on mandos-server\.local '
                     r'\(fe80::[0-9a-f:]+, \d+\) on port', run.log(400)), run.log()
    assert "Sending secret to bootclient" in served.output()
    assert not client.exists("br0"), "the bridge was left behind"
    assert client.master("eth0") is None
    run.assert_cleaned_up()


def test_route_helper_reaches_a_server_announced_by_its_global_address(lab, keys, section,
                                                                       hooks):
    """The server host has a global address; Avahi then announces only that.

    The server host's eth0 has its link-local address and 2001:db8:1::1/64;
    avahi-daemon there publishes a static Mandos service (as the original
    server would through D-Bus) and, as it does, only the global address.
    Our server listens on that port without announcing itself.  The
    client has nothing but its link-local address, so connecting gives
    "network unreachable" until the route helper (MANDOSPLUGINHELPERDIR =
    the repository's plugin-helpers) adds a host route through eth0.  The
    route is gone after the run.
    """
    (server,), client = switched(lab, "srv")
    server.ip("addr", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad")
    folder = server_folder(lab, "route")
    served = netns.start_our_server(server, folder / "server", section, port=PORT,
                                    zeroconf=False)
    netns.start_avahi(server, folder / "avahi", "eth0", services=[("Mandos", PORT, "ipv6")])
    env = netns.client_env(MANDOSPLUGINHELPERDIR=str(netns.HELPER_DIR))
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"), env=env)
    run.assert_unlocked()
    log = run.log(400)
    assert re.search(rf"found at \[2001:db8:1::1\]:{PORT}", log), log
    assert "Added route 2001:db8:1::1/128 dev eth0" in log
    assert "Deleted route 2001:db8:1::1/128 dev eth0" in log
    assert "Sending secret to bootclient" in served.output()
    assert not [r for r in client.routes() if r.get("dst", "").startswith("2001:db8:1::1")]
    run.assert_cleaned_up()


# --------------------------------------------------------------------------
# Signals.

def test_sigterm_while_searching_ends_the_client_cleanly(lab, keys, hooks):
    """No server at all: SIGTERM while browsing ends the client by SIGTERM
    within 2 s, with its interface down, no GnuPG home and no gpg-agent left."""
    _server, client = cable(lab)
    run = ClientRun(lab, client, ours(keys, hooks, interface="eth0"))
    run.process.wait_for_output(r"Zeroconf: browsing on eth0", 30)
    time.sleep(0.5)
    assert run.process.poll() is None, run.log()
    assert client.is_up("eth0")
    signalled = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    status = run.process.wait(10)
    ended = time.monotonic()
    assert status == -signal.SIGTERM, f"exit status {status}:\n{run.log()}"
    assert ended - signalled < 2.0, f"took {ended - signalled:.2f} s after SIGTERM"
    assert run.process.stdout == b""
    run.assert_cleaned_up()
