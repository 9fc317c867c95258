"""mandos-client-iprouteadddel (CLIENT.md §3), run in private network namespaces.

Every run of the helper that could reach the kernel happens inside a
network namespace created here (``ip netns exec``), so the host's routing
table is never touched.  The namespaces are deleted again in teardown.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from mandos import routehelper

REPO = Path(__file__).resolve().parent.parent
HELPER = REPO / "plugin-helpers" / "mandos-client-iprouteadddel"
PREFIX = "Mandos plugin helper mandos-client-iprouteadddel: "
PYTHON = "/usr/bin/python3"
EX_USAGE, EX_OSERR = 64, 71

_serial = itertools.count()


class Namespace:
    """A network namespace of our own; ``close()`` deletes it."""

    def __init__(self, tag: str) -> None:
        self.name = f"mandos-{tag}-{os.getpid()}-{next(_serial)}"
        if os.geteuid() != 0:
            pytest.fail("these tests need root to create network namespaces "
                        f"(running as uid {os.geteuid()})")
        try:
            subprocess.run(["ip", "netns", "add", self.name], check=True,
                           capture_output=True, text=True, timeout=10)
        except FileNotFoundError:
            pytest.fail("the ip command (iproute2) is needed for network namespaces")
        except subprocess.CalledProcessError as err:
            pytest.fail(f"cannot create network namespace {self.name}: {err.stderr.strip()}")

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        """``ip -n NAME ARGS``; fails the test if it fails."""
        result = subprocess.run(["ip", "-n", self.name, *args], capture_output=True,
                                text=True, timeout=10)
        if result.returncode != 0:
            pytest.fail(f"ip -n {self.name} {' '.join(args)}: {result.stderr.strip()}")
        return result

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the namespace, capturing text output."""
        kwargs.setdefault("timeout", 30)
        return subprocess.run(["ip", "netns", "exec", self.name, *argv],
                              capture_output=True, text=True, **kwargs)

    def routes(self, family: int = 4, table: str = "main") -> list[dict]:
        """The routes of ``table`` in detail (``ip -d -j route``)."""
        out = self.ip(f"-{family}", "-d", "-j", "route", "show", "table", table).stdout
        return json.loads(out) if out.strip() else []

    def boot_routes(self, family: int = 4) -> list[dict]:
        """Routes with protocol "boot": the ones the helper makes."""
        return [r for r in self.routes(family) if r.get("protocol") == "boot"]

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True,
                       timeout=10)


@pytest.fixture(scope="module")
def rt_namespace():
    """A namespace with a veth pair va/vb, both up."""
    namespace = Namespace("rt")
    try:
        namespace.ip("link", "add", "va", "type", "veth", "peer", "name", "vb")
        namespace.ip("link", "set", "va", "up")
        namespace.ip("link", "set", "vb", "up")
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def ns(rt_namespace):
    """The test namespace; routes of protocol boot are flushed afterwards."""
    yield rt_namespace
    for family in ("-4", "-6"):
        subprocess.run(["ip", "-n", rt_namespace.name, family, "route", "flush",
                        "proto", "boot"], capture_output=True, timeout=10)


def helper(ns: Namespace, *args: str) -> subprocess.CompletedProcess:
    """Run the installed launcher with ``args`` inside ``ns``."""
    return ns.run([str(HELPER), *args])


def find(routes: list[dict], dst: str) -> list[dict]:
    return [r for r in routes if r.get("dst") == dst]


# --- what gets added ---------------------------------------------------------

def test_add_makes_ipv4_host_route_proto_boot_scope_link_via_interface(ns):
    result = helper(ns, "add", "10.9.8.7", "va")
    assert result.returncode == 0, result.stderr
    (route,) = find(ns.routes(4), "10.9.8.7")
    assert route["dev"] == "va"
    assert route["protocol"] == "boot"
    assert route["scope"] == "link"
    assert route.get("type", "unicast") == "unicast"
    assert "gateway" not in route and "via" not in route


def test_add_makes_ipv6_host_route_proto_boot_via_interface(ns):
    result = helper(ns, "add", "2001:db8:5::7", "va")
    assert result.returncode == 0, result.stderr
    (route,) = find(ns.routes(6), "2001:db8:5::7")
    assert route["dev"] == "va"
    assert route["protocol"] == "boot"
    assert route.get("type", "unicast") == "unicast"
    assert "gateway" not in route and "via" not in route


def test_route_goes_into_the_main_table_only(ns):
    assert helper(ns, "add", "10.9.8.6", "va").returncode == 0
    everywhere = find(ns.routes(4, table="all"), "10.9.8.6")
    assert len(everywhere) == 1
    assert everywhere[0].get("table", "main") == "main"


@pytest.mark.parametrize("family, address", [(4, "10.9.8.5"), (6, "2001:db8:5::5")])
def test_delete_removes_the_route(ns, family, address):
    assert helper(ns, "add", address, "va").returncode == 0
    assert find(ns.routes(family), address)
    result = helper(ns, "delete", address, "va")
    assert result.returncode == 0, result.stderr
    assert not find(ns.routes(family), address)


@pytest.mark.parametrize("family, address", [(4, "10.9.8.4"), (6, "2001:db8:5::4")])
def test_add_is_exclusive(ns, family, address):
    assert helper(ns, "add", address, "va").returncode == 0
    again = helper(ns, "add", address, "va")
    assert again.returncode == EX_OSERR
    assert len(find(ns.routes(family), address)) == 1


def test_add_never_replaces_someone_elses_route(ns):
    ns.ip("route", "add", "10.9.8.3", "dev", "va", "proto", "static")
    try:
        assert helper(ns, "add", "10.9.8.3", "va").returncode == EX_OSERR
        (route,) = find(ns.routes(4), "10.9.8.3")
        assert route["protocol"] == "static"
    finally:
        ns.ip("route", "del", "10.9.8.3", "dev", "va")


def test_delete_leaves_routes_of_other_protocols_alone(ns):
    ns.ip("route", "add", "10.9.8.2", "dev", "va", "proto", "static")
    try:
        assert helper(ns, "delete", "10.9.8.2", "va").returncode == EX_OSERR
        assert find(ns.routes(4), "10.9.8.2")
    finally:
        ns.ip("route", "del", "10.9.8.2", "dev", "va")


def test_delete_of_a_missing_route_is_a_netlink_failure(ns):
    result = helper(ns, "delete", "10.9.8.1", "va")
    assert result.returncode == EX_OSERR
    assert result.stderr.startswith(PREFIX)


@pytest.mark.parametrize("command", ["add", "delete"])
def test_unknown_interface_is_a_netlink_failure(ns, command):
    result = helper(ns, command, "10.9.7.1", "nosuchif0")
    assert result.returncode == EX_OSERR
    assert "nosuchif0" in result.stderr
    assert not ns.boot_routes(4)


@pytest.mark.parametrize("address, dst", [
    ("10.20.0.0/16", "10.20.0.0/16"),
    ("10.9.6.1/32", "10.9.6.1"),
    ("2001:db8:7::/48", "2001:db8:7::/48"),
    ("2001:db8:7::9/128", "2001:db8:7::9"),
])
def test_prefix_length_is_honoured(ns, address, dst):
    result = helper(ns, "add", address, "va")
    assert result.returncode == 0, result.stderr
    family = 6 if ":" in address else 4
    (route,) = find(ns.routes(family), dst)
    assert route["protocol"] == "boot"
    assert helper(ns, "delete", address, "va").returncode == 0
    assert not find(ns.routes(family), dst)


def test_prefix_with_host_bits_is_refused_by_the_kernel(ns):
    assert helper(ns, "add", "10.21.0.5/16", "va").returncode == EX_OSERR
    assert not ns.boot_routes(4)


@pytest.mark.parametrize("add, delete", [("ADD", "DELETE"), ("Add", "DeLeTe")])
def test_command_word_is_case_insensitive(ns, add, delete):
    assert helper(ns, add, "10.9.5.1", "va").returncode == 0
    assert find(ns.routes(4), "10.9.5.1")
    assert helper(ns, delete, "10.9.5.1", "va").returncode == 0
    assert not find(ns.routes(4), "10.9.5.1")


# --- bad arguments (64), before any netlink work ---------------------------------

@pytest.mark.parametrize("address", [
    "10.9.4.256", "10.9.4", "host.example", "", "fe80::1%va", "10.9.4.1/33",
    "2001:db8::/129", "10.9.4.1/", "10.9.4.1/x", "10.9.4.1/+8", "10.9.4.1/ 8",
    "10.9.4.1/0016", " 10.9.4.1", "2001:db8::1::2",
])
def test_unparsable_address_is_a_usage_error(ns, address):
    result = helper(ns, "add", address, "va")
    assert result.returncode == EX_USAGE, result.stderr
    assert not ns.boot_routes(4) and not ns.boot_routes(6)


@pytest.mark.parametrize("command", ["replace", "del", "remove", "", "list", "addx"])
def test_unknown_command_is_a_usage_error(ns, command):
    result = helper(ns, command, "10.9.3.1", "va")
    assert result.returncode == EX_USAGE
    assert not ns.boot_routes(4)


@pytest.mark.parametrize("args", [
    [], ["add"], ["add", "10.9.2.1"], ["add", "10.9.2.1", "va", "extra"],
    ["--debug", "add", "10.9.2.1"],
])
def test_wrong_argument_count_is_a_usage_error(ns, args):
    result = helper(ns, *args)
    assert result.returncode == EX_USAGE
    assert not ns.boot_routes(4)


@pytest.mark.parametrize("option", ["--frob", "-x", "--debug=yes"])
def test_unknown_option_is_a_usage_error(ns, option):
    result = helper(ns, option, "add", "10.9.2.2", "va")
    assert result.returncode == EX_USAGE
    assert not ns.boot_routes(4)


# --- --debug and messages -------------------------------------------------------

@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_debug_is_accepted_anywhere(ns, position):
    args = ["add", "10.9.1.1", "va"]
    args.insert(position, "--debug")
    result = helper(ns, *args)
    assert result.returncode == 0, result.stderr
    assert find(ns.routes(4), "10.9.1.1")
    assert result.stderr, "--debug should describe the work"
    assert all(line.startswith(PREFIX) for line in result.stderr.splitlines())


def test_success_is_quiet_without_debug(ns):
    result = helper(ns, "add", "10.9.1.2", "va")
    assert result.returncode == 0
    assert result.stderr == "" and result.stdout == ""


@pytest.mark.parametrize("args", [["frob", "10.9.1.3", "va"], ["add", "bad", "va"],
                                  ["add", "10.9.1.3", "nosuchif0"], ["add"]])
def test_messages_are_prefixed(ns, args):
    result = helper(ns, *args)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines
    assert all(line.startswith(PREFIX) for line in lines), result.stderr
    assert result.stdout == ""


def test_needs_root(ns):
    result = ns.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                     str(HELPER), "add", "10.9.1.4", "va"])
    assert result.returncode == EX_OSERR, result.stderr
    assert not find(ns.routes(4), "10.9.1.4")


def test_help_goes_to_stdout_and_exits_0(ns):
    result = helper(ns, "--help")
    assert result.returncode == 0
    assert "add|delete ADDRESS INTERFACE" in result.stdout


# --- the request itself and the program's shape ----------------------------

@pytest.mark.parametrize("command, address", [("add", "10.9.0.1"), ("delete", "10.9.0.1/24"),
                                              ("add", "2001:db8::1"),
                                              ("delete", "2001:db8::/64")])
def test_request_is_unicast_main_boot_link_with_interface_as_only_hop(command, address):
    """The IPv6 kernel does not report scope: check the message itself."""
    from pyroute2.netlink.rtnl.rtmsg import rtmsg
    request = routehelper.parse_args([command, address, "lo"])
    message = rtmsg(routehelper.build_message(request, ifindex=7))
    message.decode()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    assert message["family"] == family
    assert message["dst_len"] == int(address.partition("/")[2] or (128 if ":" in address else 32))
    assert message["table"] == 254
    assert message["proto"] == 3      # RTPROT_BOOT
    assert message["scope"] == 253    # RT_SCOPE_LINK
    assert message["type"] == 1       # RTN_UNICAST
    attrs = dict(message["attrs"])
    assert attrs["RTA_OIF"] == 7
    assert attrs["RTA_DST"] == address.partition("/")[0]
    assert "RTA_GATEWAY" not in attrs and "RTA_MULTIPATH" not in attrs
    flags = message["header"]["flags"]
    exclusive_create = 0x200 | 0x400
    if command == "add":
        assert message["header"]["type"] == 24
        assert flags & exclusive_create == exclusive_create
    else:
        assert message["header"]["type"] == 25
        assert flags & exclusive_create == 0


def test_double_dash_ends_options():
    request = routehelper.parse_args(["--debug", "--", "add", "10.9.0.2", "va"])
    assert (request.command, request.interface, request.debug) == ("add", "va", True)
    with pytest.raises(routehelper.UsageError):
        routehelper.parse_args(["--", "--debug", "add", "10.9.0.2", "va"])


def test_launcher_is_a_thin_executable():
    mode = HELPER.stat().st_mode
    assert stat.S_IMODE(mode) == 0o755
    text = HELPER.read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    assert "from mandos.routehelper import main" in text


def test_pyroute2_is_loaded_lazily_and_without_its_package_init():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import mandos.routehelper as r\n"
        "assert 'pyroute2' not in sys.modules, 'imported at module load'\n"
        "assert r.main(['frob', '10.0.0.1', 'lo']) == 64\n"
        "assert 'pyroute2' not in sys.modules, 'imported for bad arguments'\n"
        "r.build_message(r.parse_args(['add', '10.0.0.1', 'lo']), 1)\n"
        "assert 'pyroute2.netlink.rtnl.rtmsg' in sys.modules\n"
        "assert 'pyroute2' not in sys.modules, 'package __init__ ran or stand-in left'\n"
        "import pyroute2\n"
        "assert hasattr(pyroute2, 'IPRoute'), 'a later import gets the real package'\n"
        "print('ok')\n"
    )
    result = subprocess.run([PYTHON, "-I", "-c", code, str(REPO)], capture_output=True,
                            text=True, timeout=30)
    assert result.stdout.strip() == "ok", result.stderr
