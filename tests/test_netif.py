"""Tests for mandos.netif: interface choice, bring-up, link-local wait, take-down.

CLIENT.md §2.6 step 4, §2.6.1, §2.7, §2.15 and INTEROP.md (network
namespaces, DAD).  Every test that touches an interface does so in network
namespaces it creates and always deletes: the code under test runs in a
child process (``ip netns exec``) that prints its findings as JSON.  The
host's interfaces are never touched.  Setting an interface up lowers the
kernel console log level, which is global; it is restored after each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mandos import netif

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"  # Debian's, with python3-pyroute2 0.7
PRINTK = Path("/proc/sys/kernel/printk")

# Run in the namespace: sys.argv[1] is the repository, sys.argv[2] the test's
# code.  The code sees ``netif``, ``Privileges``, ``as_user`` and fills
# ``result``; the log messages are added as [level, text] pairs.
CHILD = r'''
import json, logging, os, sys, time
sys.path.insert(0, sys.argv[1])
messages = []

class Collect(logging.Handler):
    def emit(self, record):
        messages.append([record.levelname, record.getMessage()])

logging.getLogger().addHandler(Collect())
logging.getLogger().setLevel(logging.DEBUG)
from mandos import netif
from mandos.client.privileges import Privileges

def as_user(saved_root):
    """Become uid/gid 65534, keeping root as saved UID if asked (CLIENT.md §2.5)."""
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 0, 0) if saved_root else os.setresuid(65534, 65534, 65534)
    return Privileges()

def flags(name):
    return {link.name: link.flags for link in netif.links().values()}.get(name)

def if_inet6(name):
    """(address hex, flags) of the interface's IPv6 addresses, from /proc."""
    with open("/proc/net/if_inet6") as file:
        return [(f[0], int(f[4], 16)) for f in map(str.split, file) if f[5] == name]

result = {}
exec(compile(sys.argv[2], "<test>", "exec"))
result["log"] = messages
print(json.dumps(result), flush=True)
'''


def run(*argv: str) -> str:
    """Run a command; fail the test with its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


class Lab:
    """A client namespace and a peer namespace joined by veth pairs."""

    def __init__(self) -> None:
        tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.ns = f"mandos-netif-{tag}"
        self.peer_ns = f"mandos-netif-{tag}-peer"
        self.created: list[str] = []

    def create(self) -> None:
        for name in (self.ns, self.peer_ns):
            try:
                run("ip", "netns", "add", name)
            except AssertionError as err:
                pytest.fail(f"cannot create network namespace {name} "
                            f"(root and iproute2 are needed): {err}")
            self.created.append(name)

    def delete(self) -> None:
        for name in self.created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def ip(self, *argv: str, ns: str | None = None) -> str:
        return run("ip", "-n", ns or self.ns, *argv)

    def veth(self, name: str, *, up: bool = False, carrier: bool = True,
             dad: bool = True) -> None:
        """``name`` in the client namespace; its peer end in the peer namespace.

        ``carrier``: the peer end is up, so ``name`` is RUNNING once up.
        ``dad``: duplicate address detection on (the kernel default).
        """
        peer = f"p-{name.lstrip('.')}"
        run("ip", "link", "add", name, "netns", self.ns, "type", "veth",
            "peer", "name", peer, "netns", self.peer_ns)
        self.sysctl(f"net/ipv6/conf/{name}/accept_dad={1 if dad else 0}")
        if carrier:
            self.ip("link", "set", peer, "up", ns=self.peer_ns)
        if up:
            self.ip("link", "set", name, "up")

    def sysctl(self, setting: str) -> None:
        run("ip", "netns", "exec", self.ns, "sysctl", "-qw", setting)

    def flags(self, name: str) -> list[str]:
        """The interface's flags as iproute2 shows them (an independent view)."""
        return json.loads(self.ip("-j", "link", "show", "dev", name))[0]["flags"]

    def is_up(self, name: str) -> bool:
        return "UP" in self.flags(name)

    def child(self, code: str) -> dict:
        """Run ``code`` in the client namespace; its ``result`` as a dict."""
        return run_child(code, ["ip", "netns", "exec", self.ns])


def run_child(code: str, prefix: list[str] | None = None) -> dict:
    """Run ``code`` in a CHILD process (after ``prefix``); its ``result``."""
    argv = [*(prefix or []), PYTHON, "-c", CHILD, str(REPO), code]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"child failed:\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


@contextlib.contextmanager
def new_lab():
    """A Lab whose namespaces exist inside the block and are always deleted."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("the interface tests need root and iproute2 to create network namespaces")
    lab = Lab()
    try:
        lab.create()
        yield lab
    finally:
        lab.delete()


@pytest.fixture
def lab():
    """Fresh namespaces, always deleted afterwards."""
    with new_lab() as instance:
        yield instance


@pytest.fixture(autouse=True)
def console_level_restored():
    """Bringing interfaces up sets the (global) console log level: undo it."""
    saved = PRINTK.read_text().split()[0] if PRINTK.exists() else None
    try:
        yield saved
    finally:
        if saved is not None:
            PRINTK.write_text(saved)


def errors(result: dict) -> list[str]:
    return [text for level, text in result["log"] if level in ("ERROR", "CRITICAL")]


def warnings(result: dict) -> list[str]:
    return [text for level, text in result["log"] if level == "WARNING"]


# -- import cost --------------------------------------------------------------

def test_importing_netif_and_cleaning_the_list_do_not_load_pyroute2():
    code = ("netif.clean_interface_list(['lo', 'nosuch', 'none']); netif.index_of('lo')\n"
            "result['loaded'] = 'pyroute2' in sys.modules")
    result = run_child(code)
    assert result["loaded"] is False


# -- automatic choice (§2.6.1) ------------------------------------------------

@pytest.fixture(scope="module")
def choice():
    """One namespace with an interface for every rule, judged in both modes."""
    with new_lab() as lab:
        lab.veth("veth-b")                 # broadcast, down
        lab.veth("veth-a", carrier=False)  # broadcast, down; created later, sorts first
        lab.veth("veth-up", up=True)       # broadcast, up and running
        lab.veth(".veth-dot")              # broadcast, but a dot name
        lab.ip("link", "add", "ifb-noarp", "type", "ifb")        # BROADCAST|NOARP
        lab.ip("tuntap", "add", "mode", "tun", "tun-p2p")        # POINTOPOINT|NOARP
        lab.ip("tuntap", "add", "mode", "tun", "tun-arp")
        lab.ip("link", "set", "tun-arp", "arp", "on")            # POINTOPOINT only
        assert "NOARP" in lab.flags("ifb-noarp") and "BROADCAST" in lab.flags("ifb-noarp")
        assert {"POINTOPOINT", "NOARP"} <= set(lab.flags("tun-p2p"))
        assert "NOARP" not in lab.flags("tun-arp") and "BROADCAST" not in lab.flags("tun-arp")
        assert not lab.is_up("veth-a") and not lab.is_up("veth-b")
        result = lab.child("result['plain'] = netif.choose_automatically(False)\n"
                           "result['connect'] = netif.choose_automatically(True)")
        yield result


def test_broadcast_interfaces_are_chosen_in_sorted_order_up_or_down(choice):
    for mode in ("plain", "connect"):
        chosen = [name for name in choice[mode] if name.startswith("veth")]
        assert chosen == ["veth-a", "veth-b", "veth-up"]


def test_loopback_is_never_chosen(choice):
    assert "lo" not in choice["plain"] and "lo" not in choice["connect"]


def test_noarp_interface_is_not_chosen(choice):
    assert "ifb-noarp" not in choice["plain"] and "ifb-noarp" not in choice["connect"]


def test_point_to_point_is_chosen_only_with_connect(choice):
    assert "tun-p2p" not in choice["plain"]
    assert "tun-p2p" in choice["connect"]  # accepted before the NOARP rule
    assert "tun-arp" not in choice["plain"]  # no BROADCAST
    assert "tun-arp" in choice["connect"]


def test_names_beginning_with_a_dot_are_skipped(choice):
    assert ".veth-dot" not in choice["plain"] + choice["connect"]


def test_choice_is_exactly_the_acceptable_interfaces(choice):
    assert choice["plain"] == ["veth-a", "veth-b", "veth-up"]
    assert choice["connect"] == ["tun-arp", "tun-p2p", "veth-a", "veth-b", "veth-up"]


@pytest.mark.parametrize("flags, connect, accepted", [
    (0x1 | 0x8 | 0x10, True, False),  # loopback wins over point-to-point
    (0x2, False, True),
    (0x2 | 0x80, False, False),
    (0x10 | 0x80, True, True),
    (0x10 | 0x80, False, False),
    (0x0, True, False),              # neither broadcast nor point-to-point
    (0x2 | 0x1 | 0x40, False, True),  # up and running does not matter
])
def test_rejection_rules_in_order(flags, connect, accepted):
    assert (netif.rejection_reason(flags, connect) is None) is accepted


# -- cleaning the --interface list (§2.6 step 4) -------------------------------

def test_clean_list_drops_nonexisting_names_but_keeps_none(lab):
    lab.veth("veth0")
    result = lab.child(
        "result['cleaned'] = netif.clean_interface_list("
        "['veth0', '', 'nosuch', 'none', 'lo', '', 'none'])")
    assert result["cleaned"] == ["veth0", "none", "lo", "none"]
    assert len(warnings(result)) == 1 and "nosuch" in warnings(result)[0]


def test_clean_list_of_unknown_names_is_empty(lab):
    result = lab.child("result['cleaned'] = netif.clean_interface_list(['', 'eth9', 'x'])")
    assert result["cleaned"] == []


# -- bringing up (§2.7) --------------------------------------------------------

BRING_UP = """
netif.links()  # pyroute2 is imported before the clock starts
manager = netif.InterfaceManager(Privileges())
start = time.monotonic()
result['used'] = manager.bring_up(NAMES, DELAY)
result['elapsed'] = time.monotonic() - start
result['recorded'] = manager.brought_up
result['flags'] = {name: flags(name) for name in NAMES if name != 'none'}
"""


def bring_up(lab: Lab, names: list[str], delay: float, extra: str = "") -> dict:
    code = BRING_UP.replace("NAMES", repr(names)).replace("DELAY", repr(delay))
    return lab.child(code + extra)


def test_bringing_up_loads_pyroute2_without_its_package_init(lab):
    """The package's __init__ alone costs about 50 ms at every boot; a later
    ``import pyroute2`` still gets the real package."""
    lab.veth("veth0")
    result = bring_up(lab, ["veth0"], 5.0,
                      "result['init_ran'] = 'pyroute2' in sys.modules\n"
                      "import pyroute2\n"
                      "result['real_later'] = hasattr(pyroute2, 'IPRoute')")
    assert result["used"] == ["veth0"]
    assert result["init_ran"] is False
    assert result["real_later"] is True


def test_down_interface_with_link_is_brought_up_running_and_recorded(lab):
    lab.veth("veth0")
    assert not lab.is_up("veth0")
    result = bring_up(lab, ["veth0"], 5.0)
    assert result["used"] == ["veth0"]
    assert result["flags"]["veth0"] & 0x10041 == 0x10041  # UP, RUNNING, LOWER_UP
    assert result["elapsed"] < 2.0  # did not sit out the delay
    assert result["recorded"] == ["veth0"]
    assert {"UP", "LOWER_UP"} <= set(lab.flags("veth0"))
    assert errors(result) == []


def test_interface_without_link_is_waited_for_delay_then_used_anyway(lab):
    lab.veth("veth0", carrier=False)
    result = bring_up(lab, ["veth0"], 1.0)
    assert result["used"] == ["veth0"]
    assert 0.9 <= result["elapsed"] < 1.8, result["log"]
    assert result["flags"]["veth0"] & 0x10001 == 0x1  # UP, no carrier
    assert result["recorded"] == ["veth0"]
    assert errors(result) == []


def test_waits_for_several_interfaces_overlap(lab):
    lab.veth("veth0", carrier=False)
    lab.veth("veth1", carrier=False)
    result = bring_up(lab, ["veth0", "veth1"], 1.0)
    assert 0.9 <= result["elapsed"] < 1.8  # not 2 s
    assert result["recorded"] == ["veth0", "veth1"]


def test_running_is_noticed_at_once_through_link_events(lab):
    """The wait ends when the link comes, not at the next poll."""
    lab.veth("veth0", carrier=False)
    code = BRING_UP.replace("NAMES", "['veth0']").replace("DELAY", "20.0")
    # Polling every 30 s would make this test take 20 s: only a link
    # notification can end the wait early.
    code = ("netif.POLL_INTERVAL = 30\nprint(json.dumps({'ready': 1}), flush=True)\n"
            + code + "result['end'] = time.monotonic()\n")
    argv = ["ip", "netns", "exec", lab.ns, PYTHON, "-c", CHILD, str(REPO), code]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None
            assert json.loads(child.stdout.readline()) == {"ready": 1}
            time.sleep(0.7)  # the child is now waiting for RUNNING
            carrier_at = time.monotonic()  # CLOCK_MONOTONIC is system-wide
            lab.ip("link", "set", "p-veth0", "up", ns=lab.peer_ns)
            output, _ = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
    result = json.loads(output.splitlines()[-1])
    assert result["flags"]["veth0"] & 0x10041 == 0x10041
    assert 0 <= result["end"] - carrier_at < 0.5


def test_interfaces_after_first_none_are_used_but_not_brought_up(lab):
    lab.veth("veth0")
    lab.veth("veth1")
    result = bring_up(lab, ["veth0", "none", "veth1", "none"], 3.0)
    assert result["used"] == ["veth0", "veth1"]
    assert lab.is_up("veth0") and not lab.is_up("veth1")
    assert result["recorded"] == ["veth0"]


def test_none_alone_brings_nothing_up(lab):
    lab.veth("veth0")
    result = bring_up(lab, ["none"], 3.0)
    assert result["used"] == []
    assert result["elapsed"] < 0.5
    assert not lab.is_up("veth0")


def test_vanished_interface_is_reported_and_kept_in_the_list(lab):
    lab.veth("veth0")
    result = bring_up(lab, ["veth0", "gone0"], 3.0)
    assert result["used"] == ["veth0", "gone0"]
    assert any("gone0" in text and "no such interface" in text for text in errors(result))
    assert lab.is_up("veth0")


# -- taking down (§2.7, §2.15) -------------------------------------------------

def test_take_down_only_touches_interfaces_this_brought_up(lab):
    lab.veth("veth-was-up", up=True)
    lab.veth("veth-was-down")
    result = bring_up(lab, ["veth-was-up", "veth-was-down"], 3.0,
                      "result['taken'] = manager.take_down()\n"
                      "result['left'] = manager.brought_up\n")
    assert result["recorded"] == ["veth-was-down"]
    assert result["taken"] == ["veth-was-down"]
    assert result["left"] == []
    assert lab.is_up("veth-was-up")
    assert not lab.is_up("veth-was-down")


def test_take_down_skips_interfaces_already_down_or_gone(lab):
    lab.veth("veth0")
    lab.veth("veth1")
    result = bring_up(lab, ["veth0", "veth1"], 3.0,
                      "import subprocess\n"
                      "subprocess.run(['ip', 'link', 'set', 'veth0', 'down'], check=True)\n"
                      "subprocess.run(['ip', 'link', 'del', 'veth1'], check=True)\n"
                      "result['taken'] = manager.take_down()\n")
    assert result["recorded"] == ["veth0", "veth1"]
    assert result["taken"] == []
    assert errors(result) == []


# -- privileges (§2.5) ---------------------------------------------------------

def test_unprivileged_user_with_saved_root_raises_to_set_up_and_down(lab):
    lab.veth("veth0")
    result = lab.child(
        "privileges = as_user(saved_root=True)\n"
        "result['euid_before'] = os.geteuid()\n"
        "manager = netif.InterfaceManager(privileges)\n"
        "result['used'] = manager.bring_up(['veth0'], 3.0)\n"
        "result['euid_after_up'] = os.geteuid()\n"
        "result['up'] = flags('veth0')\n"
        "result['taken'] = manager.take_down()\n"
        "result['euid_after_down'] = os.geteuid()\n"
        "result['down'] = flags('veth0')\n")
    assert result["euid_before"] == 65534
    assert result["up"] & 0x10041 == 0x10041
    assert result["euid_after_up"] == 65534  # lowered again at once
    assert result["taken"] == ["veth0"]
    assert result["down"] & 0x1 == 0
    assert result["euid_after_down"] == 65534
    assert errors(result) == []


def test_take_down_keeps_privileges_a_caller_already_raised(lab):
    lab.veth("veth0")
    result = lab.child(
        "privileges = as_user(saved_root=True)\n"
        "manager = netif.InterfaceManager(privileges)\n"
        "manager.bring_up(['veth0'], 3.0)\n"
        "privileges.raise_()  # as the end sequence does around stop hooks\n"
        "result['taken'] = manager.take_down()\n"
        "result['euid'] = os.geteuid()\n")
    assert result["taken"] == ["veth0"]
    assert result["euid"] == 0


def test_without_saved_root_failure_is_logged_and_nothing_crashes(lab):
    lab.veth("veth0")
    result = lab.child(
        "privileges = as_user(saved_root=False)\n"
        "manager = netif.InterfaceManager(privileges)\n"
        "result['used'] = manager.bring_up(['veth0'], 0.5)\n"
        "result['recorded'] = manager.brought_up\n"
        "result['taken'] = manager.take_down()\n"
        "result['euid'] = os.geteuid()\n")
    assert result["used"] == ["veth0"]  # kept in the list of used interfaces
    assert result["recorded"] == [] and result["taken"] == []
    assert result["euid"] == 65534
    assert any("veth0" in text and "cannot become root" in text for text in errors(result))
    assert not lab.is_up("veth0")


# -- the console log level (§2.7 step 3) ---------------------------------------

def test_bringing_up_lowers_the_console_log_level_to_5(lab, console_level_restored):
    if console_level_restored is None:
        pytest.fail(f"{PRINTK} is missing: cannot observe the console log level")
    lab.veth("veth0")
    PRINTK.write_text("7")
    result = lab.child("privileges = as_user(saved_root=True)\n"
                       "netif.InterfaceManager(privileges).bring_up(['veth0'], 3.0)\n")
    assert PRINTK.read_text().split()[0] == "5"
    assert warnings(result) == []


def test_console_log_level_failure_is_only_reported(lab, console_level_restored):
    if console_level_restored is None:
        pytest.fail(f"{PRINTK} is missing: cannot observe the console log level")
    PRINTK.write_text("7")
    result = lab.child("as_user(saved_root=False)\n"
                       "result['quiet'] = netif.quiet_console()\n"
                       "result['on'] = netif.console_on()\n")
    assert result["quiet"] is False and result["on"] is False
    assert len(warnings(result)) == 2
    assert PRINTK.read_text().split()[0] == "7"


# -- waiting for a usable link-local address (INTEROP.md: DAD) -----------------

LINK_LOCAL = """
import threading
manager = netif.InterfaceManager(Privileges())
if not OPTIMISTIC:
    manager._optimistic_dad = lambda targets: None
manager.bring_up(['veth0'], 5.0 if AWAIT_ADDRESS else 0.2)
index = netif.index_of('veth0')
# The kernel adds the fe80:: address a moment after the carrier comes;
# start waiting only once it exists, so that a wait ignoring the
# tentative state would return at once and be caught.
while AWAIT_ADDRESS and not any(a.startswith('fe80') for a, f in if_inet6('veth0')):
    time.sleep(0.002)
result['tentative_at_start'] = any(
    a.startswith('fe80') and f & 0x40 for a, f in if_inet6('veth0'))
usable = {}
def watch():
    # An independent view: the first moment /proc shows a usable fe80:: address.
    while 'at' not in usable and time.monotonic() < start + TIMEOUT + 1:
        if any(a.startswith('fe80') and not f & 0x48 for a, f in if_inet6('veth0')):
            usable['at'] = time.monotonic()
        time.sleep(0.002)
start = time.monotonic()
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
result['start'] = start
result['ok'] = manager.wait_link_local(index, TIMEOUT, settled=SETTLED,
                                       should_stop=(lambda: True) if STOP else None)
result['end'] = time.monotonic()
result['elapsed'] = result['end'] - start
watcher.join()
result['usable_at'] = usable.get('at')
result['flags_at_end'] = [f for a, f in if_inet6('veth0') if a.startswith('fe80')]
result['optimistic_dad'] = open('/proc/sys/net/ipv6/conf/veth0/optimistic_dad').read().strip()
manager.take_down()
result['optimistic_dad_after'] = open('/proc/sys/net/ipv6/conf/veth0/optimistic_dad').read().strip()
"""


def link_local(lab: Lab, timeout: float, poll: float = 30, await_address: bool = True,
               optimistic: bool = False, settled: bool = False, stop: bool = False) -> dict:
    # With a long poll interval only an address notification ends the wait
    # early, so a blind wait would show up as a failure.
    code = (f"netif.POLL_INTERVAL = {poll}\nAWAIT_ADDRESS = {await_address}\n"
            f"OPTIMISTIC = {optimistic}\nSETTLED = {settled}\nSTOP = {stop}\n"
            + LINK_LOCAL.replace("TIMEOUT", repr(timeout)))
    return lab.child(code)


def test_link_local_wait_ends_as_soon_as_duplicate_detection_is_over(lab):
    lab.veth("veth0", dad=True)
    result = link_local(lab, 10.0)
    assert result["tentative_at_start"], "DAD did not run: the test proves nothing"
    assert result["ok"] is True
    assert result["flags_at_end"] and not any(f & 0x48 for f in result["flags_at_end"])
    assert result["usable_at"] is not None
    # Returned right after the address became usable, not before and not
    # after a fixed sleep.
    assert -0.01 <= result["end"] - result["usable_at"] < 0.2
    assert result["elapsed"] < 5.0


def test_interfaces_brought_up_use_optimistic_dad_and_get_it_restored(lab):
    """RFC 4429: the new link-local address may be used while DAD runs, so
    the wait ends at once; the interface's setting is restored afterwards."""
    lab.veth("veth0", dad=True)
    result = link_local(lab, 10.0, optimistic=True)
    assert result["ok"] is True
    assert result["elapsed"] < 0.5
    assert result["optimistic_dad"] == "1"
    assert result["optimistic_dad_after"] == "0"


def test_settled_wait_ends_with_duplicate_detection_even_if_optimistic(lab):
    """Before a connection the client waits for the end of detection: a
    neighbour ignores solicitations for an address under detection, so a
    connection from an optimistic address stalls (see wait_link_local)."""
    lab.veth("veth0", dad=True)
    result = link_local(lab, 10.0, optimistic=True, settled=True)
    assert result["tentative_at_start"], "DAD did not run: the test proves nothing"
    assert result["ok"] is True
    assert result["flags_at_end"] and not any(f & 0x48 for f in result["flags_at_end"])
    assert -0.01 <= result["end"] - result["usable_at"] < 0.2


def test_link_local_wait_ends_when_told_to_stop(lab):
    lab.veth("veth0", dad=True)
    result = link_local(lab, 10.0, settled=True, stop=True, poll=0.05)
    assert result["ok"] is False
    assert result["elapsed"] < 1.0


def test_link_local_wait_returns_at_once_without_duplicate_detection(lab):
    lab.veth("veth0", dad=False)
    result = link_local(lab, 10.0)
    assert result["ok"] is True
    assert result["elapsed"] < 0.2


def test_link_local_wait_gives_up_after_timeout(lab):
    lab.veth("veth0", carrier=False)  # no link: the address stays tentative
    result = link_local(lab, 0.6, poll=0.25, await_address=False)
    assert result["ok"] is False
    assert 0.55 <= result["elapsed"] < 1.2
