"""mandos-client's direct-route work-around (CLIENT.md §2.11 steps 6 and 14, §2.14).

Rules about *when* the helper runs and *how* it is started are checked with
a stand-in helper that only reports what it got (it never touches a
route).  The real thing is checked end to end in two network namespaces of
our own: a "server" whose interface has only the global address
2001:db8:1::1/64 and a "client" whose interface has only its link-local
address, so the client gets "network unreachable" until it adds a host
route with the real helper.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from mandos import lazylog
from mandos.client import route
from mandos.client.attempt import AttemptFailed, Unreachable
from mandos.client.privileges import Privileges
from mandos.client.servers import ServerAddress
from test_routehelper import Namespace

REPO = Path(__file__).resolve().parent.parent
HELPER_DIR = REPO / "plugin-helpers"
PYTHON = "/usr/bin/python3"
RECORD = "FAKE-ROUTE-HELPER "

# Reports its arguments, IDs and descriptors on standard output, as one
# line; optionally writes its PID to a file and sleeps, or exits non-zero.
FAKE_HELPER = f"""#!{PYTHON} -I
import json, os, sys, time
action = sys.argv[1] if len(sys.argv) > 1 else ""
devnull = os.stat("/dev/null")
stdin = os.fstat(0)
out, err = os.fstat(1), os.fstat(2)
print({RECORD!r} + json.dumps({{
    "args": sys.argv[1:],
    "resuid": os.getresuid(), "resgid": os.getresgid(), "groups": os.getgroups(),
    "stdin_is_devnull": (stdin.st_rdev, stdin.st_ino) == (devnull.st_rdev, devnull.st_ino),
    "stdout_is_stderr": (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino),
    "marker": os.environ.get("ROUTE_TEST_MARKER"),
}}), flush=True)
pidfile = os.environ.get("FAKE_HELPER_PIDFILE")
if pidfile:
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    os.close(1)  # nobody waits for output from here on
    os.close(2)
    time.sleep(60)
sys.exit(int(os.environ.get("FAKE_HELPER_EXIT_" + action, "0")))
"""


@pytest.fixture(autouse=True)
def _debug_logging(caplog):
    """Route messages reach logging (and caplog) whatever ran before."""
    saved = lazylog._threshold, lazylog._setup
    lazylog.configure(lazylog.DEBUG)
    caplog.set_level(logging.DEBUG)
    yield
    lazylog._threshold, lazylog._setup = saved


@pytest.fixture
def fake_helper_dir(public_tmp, monkeypatch) -> Path:
    """MANDOSPLUGINHELPERDIR pointing at the stand-in helper."""
    directory = public_tmp / "helpers"
    directory.mkdir()
    directory.chmod(0o755)
    path = directory / route.HELPER_NAME
    path.write_text(FAKE_HELPER)
    path.chmod(0o755)
    monkeypatch.setenv(route.HELPER_DIR_VARIABLE, str(directory))
    return directory


@pytest.fixture
def privileges() -> Privileges:
    return Privileges()


def records(text: str) -> list[dict]:
    """The stand-in helper's reports found in captured stderr."""
    return [json.loads(line[len(RECORD):]) for line in text.splitlines()
            if line.startswith(RECORD)]


def wait_for_file(path: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def pidfile(public_tmp, monkeypatch):
    """Makes the stand-in helper sleep; a survivor is killed afterwards."""
    path = public_tmp / "helper.pid"
    monkeypatch.setenv("FAKE_HELPER_PIDFILE", str(path))
    yield path
    if path.exists() and not process_gone(int(path.read_text())):
        os.kill(int(path.read_text()), signal.SIGKILL)


# --- how the helper is run (§2.14) ------------------------------------------------

def test_no_helper_dir_variable_means_no_route(monkeypatch, privileges, caplog):
    monkeypatch.delenv(route.HELPER_DIR_VARIABLE, raising=False)
    assert not route.run_route_helper("add", "2001:db8:1::1", "eth9", debug=False,
                                      privileges=privileges)
    assert any(route.HELPER_DIR_VARIABLE in r.getMessage() and r.levelname == "DEBUG"
               for r in caplog.records)


def test_helper_gets_action_address_interface(fake_helper_dir, privileges, capfd):
    assert route.run_route_helper("add", "2001:db8:1::1", "eth9", debug=False,
                                  privileges=privileges)
    (record,) = records(capfd.readouterr().err)
    assert record["args"] == ["add", "2001:db8:1::1", "eth9"]


def test_debug_mode_adds_debug_as_fifth_argument(fake_helper_dir, privileges, capfd):
    assert route.run_route_helper("delete", "192.0.2.9", "eth9", debug=True,
                                  privileges=privileges)
    (record,) = records(capfd.readouterr().err)
    assert record["args"] == ["delete", "192.0.2.9", "eth9", "--debug"]


def test_helper_runs_as_full_root_without_groups(fake_helper_dir, privileges, capfd):
    assert route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                  privileges=privileges)
    (record,) = records(capfd.readouterr().err)
    assert record["resuid"] == [0, 0, 0]
    assert record["resgid"] == [0, 0, 0]
    assert record["groups"] == []


def test_helper_stdin_is_devnull_and_stdout_is_stderr(fake_helper_dir, privileges, capfd):
    assert route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                  privileges=privileges)
    captured = capfd.readouterr()
    (record,) = records(captured.err)  # its standard output arrived on our stderr
    assert record["stdin_is_devnull"] and record["stdout_is_stderr"]
    assert RECORD not in captured.out


def test_helper_inherits_the_environment(fake_helper_dir, privileges, capfd, monkeypatch):
    monkeypatch.setenv("ROUTE_TEST_MARKER", "inherited")
    assert route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                  privileges=privileges)
    (record,) = records(capfd.readouterr().err)
    assert record["marker"] == "inherited"


def test_nonzero_exit_is_failure_and_reported(fake_helper_dir, privileges, monkeypatch,
                                              caplog):
    monkeypatch.setenv("FAKE_HELPER_EXIT_add", "71")
    assert not route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                      privileges=privileges)
    assert any("exit status 71" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


@pytest.mark.parametrize("missing", ["directory", "helper"])
def test_missing_helper_makes_child_exit_unavailable(public_tmp, monkeypatch, privileges,
                                                     caplog, missing):
    directory = public_tmp / "nonexistent" if missing == "directory" else public_tmp
    monkeypatch.setenv(route.HELPER_DIR_VARIABLE, str(directory))
    assert not route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                      privileges=privileges)
    assert any("exit status 69" in r.getMessage() for r in caplog.records)


def test_stop_request_before_start_runs_nothing(fake_helper_dir, privileges, capfd):
    assert not route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                      privileges=privileges, should_stop=lambda: True)
    assert records(capfd.readouterr().err) == []


def test_stop_request_while_waiting_kills_the_helper(fake_helper_dir, privileges, pidfile):
    started = time.monotonic()
    result = route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                    privileges=privileges, should_stop=pidfile.exists)
    assert result is False
    assert time.monotonic() - started < 20  # the helper would sleep 60 s
    assert process_gone(int(pidfile.read_text()))


class _Interrupted(BaseException):
    pass


def test_signal_while_waiting_kills_the_helper_and_propagates(fake_helper_dir, privileges,
                                                              pidfile):
    """As mandos-client's SIGTERM handler: it raises in the main thread."""

    def handler(signum, frame):
        raise _Interrupted()

    def send_sigterm() -> None:
        if wait_for_file(pidfile):
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    sender = threading.Thread(target=send_sigterm)
    try:
        sender.start()
        with pytest.raises(_Interrupted):
            route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                                   privileges=privileges)
        sender.join()
    finally:
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    assert process_gone(int(pidfile.read_text()))


# --- when a route is tried (§2.11 step 6) and removed (step 14) ------------------

class FakeConnect:
    """connect() stand-in: raises the given exceptions in turn, then connects."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.sockets: list[socket.socket] = []

    def __call__(self, server: ServerAddress) -> socket.socket:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        ours, theirs = socket.socketpair()
        self.sockets += [ours, theirs]
        return ours

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


GLOBAL6 = ServerAddress("2001:db8:1::1", 4711, socket.AF_INET6, 1)


def test_unreachable_global_address_gets_route_retry_and_route_removal(
        fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("network unreachable"))
    try:
        attempt_route = route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                                 debug=False, privileges=privileges)
        with attempt_route as sock:
            assert connect.calls == 2
            assert attempt_route.route_added
            assert [r["args"] for r in records(capfd.readouterr().err)] == [
                ["add", "2001:db8:1::1", "eth9"]]
            assert sock is connect.sockets[0]
        assert sock.fileno() == -1  # closed at the end of the attempt
        assert [r["args"] for r in records(capfd.readouterr().err)] == [
            ["delete", "2001:db8:1::1", "eth9"]]
    finally:
        connect.close()


def test_route_is_removed_when_the_attempt_fails_later(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("network unreachable"))
    try:
        with pytest.raises(AttemptFailed):
            with route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                          debug=True, privileges=privileges):
                raise AttemptFailed("TLS handshake failed")
        assert [r["args"][0] for r in records(capfd.readouterr().err)] == ["add", "delete"]
    finally:
        connect.close()


@pytest.mark.parametrize("server, connect_mode", [
    (ServerAddress("fe80::1", 4711, socket.AF_INET6, 1), False),
    (ServerAddress("febf::1", 4711, socket.AF_INET6, 1), False),
    (ServerAddress("169.254.3.4", 4711, socket.AF_INET, 1), False),
    (ServerAddress("2001:db8:1::1", 4711, socket.AF_INET6, 0), False),
    (ServerAddress("192.0.2.1", 4711, socket.AF_INET, 0), False),
    (GLOBAL6, True),
], ids=["ipv6-link-local", "ipv6-link-local-top", "ipv4-link-local", "no-interface",
        "ipv4-no-interface", "connect-mode"])
def test_no_route_for_link_local_unknown_interface_or_connect_mode(
        fake_helper_dir, privileges, capfd, server, connect_mode):
    unreachable = Unreachable("network unreachable")
    connect = FakeConnect(unreachable)
    with pytest.raises(Unreachable) as raised:
        route.connect_with_route(connect, server, "eth9", connect_mode=connect_mode,
                                 debug=False, privileges=privileges)
    assert raised.value is unreachable
    assert connect.calls == 1
    assert records(capfd.readouterr().err) == []


def test_route_is_tried_for_global_ipv4_too(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("host unreachable"))
    server = ServerAddress("192.0.2.1", 4711, socket.AF_INET, 1)
    try:
        with route.connect_with_route(connect, server, "eth9", connect_mode=False,
                                      debug=False, privileges=privileges):
            pass
        assert [r["args"] for r in records(capfd.readouterr().err)] == [
            ["add", "192.0.2.1", "eth9"], ["delete", "192.0.2.1", "eth9"]]
    finally:
        connect.close()


def test_other_connect_failures_get_no_route(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(AttemptFailed("connection refused"))
    with pytest.raises(AttemptFailed):
        route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                 debug=False, privileges=privileges)
    assert connect.calls == 1
    assert records(capfd.readouterr().err) == []


def test_failed_route_add_is_plain_failure(fake_helper_dir, privileges, capfd, monkeypatch):
    monkeypatch.setenv("FAKE_HELPER_EXIT_add", "71")
    unreachable = Unreachable("network unreachable")
    connect = FakeConnect(unreachable)
    with pytest.raises(Unreachable) as raised:
        route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                 debug=False, privileges=privileges)
    assert raised.value is unreachable
    assert connect.calls == 1  # no second try
    assert [r["args"][0] for r in records(capfd.readouterr().err)] == ["add"]


def test_failed_retry_removes_the_route_at_once(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("network unreachable"),
                          Unreachable("still unreachable"))
    with pytest.raises(Unreachable, match="still"):
        route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                 debug=False, privileges=privileges)
    assert connect.calls == 2  # retried once, not more
    assert [r["args"][0] for r in records(capfd.readouterr().err)] == ["add", "delete"]


def test_failed_route_delete_is_only_reported(fake_helper_dir, privileges, monkeypatch,
                                              caplog):
    monkeypatch.setenv("FAKE_HELPER_EXIT_delete", "71")
    connect = FakeConnect(Unreachable("network unreachable"))
    try:
        with route.connect_with_route(connect, GLOBAL6, "eth9", connect_mode=False,
                                      debug=False, privileges=privileges):
            pass
    finally:
        connect.close()
    assert any("delete" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


def test_interface_name_defaults_to_the_servers_interface(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("network unreachable"))
    try:
        with route.connect_with_route(connect, GLOBAL6, connect_mode=False, debug=False,
                                      privileges=privileges):
            pass
    finally:
        connect.close()
    name = socket.if_indextoname(GLOBAL6.ifindex)
    assert [r["args"][2] for r in records(capfd.readouterr().err)] == [name, name]


def test_helper_gets_the_address_in_canonical_form(fake_helper_dir, privileges, capfd):
    connect = FakeConnect(Unreachable("network unreachable"))
    server = ServerAddress("2001:DB8:1:0:0::1", 4711, socket.AF_INET6, 1)
    try:
        with route.connect_with_route(connect, server, "eth9", connect_mode=False,
                                      debug=False, privileges=privileges):
            pass
    finally:
        connect.close()
    assert [r["args"][1] for r in records(capfd.readouterr().err)] == ["2001:db8:1::1"] * 2


# --- for real, in network namespaces --------------------------------------------

SERVER_ADDRESS = "2001:db8:1::1"
PORT = 4711
GREETING = "mandos-route-test"

LISTENER = f"""
import socket
sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("::", {PORT}))
sock.listen(5)
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    conn.sendall({GREETING!r}.encode())
    conn.close()
"""

# One attempt from inside the client namespace, as mandos-client makes it.
CLIENT = """
import json, os, socket, subprocess, sys
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
import logging
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(relativeCreated)d ms %(message)s")
if cfg.get("uids"):
    os.setresgid(65534, 65534, 65534)
    os.setresuid(*cfg["uids"])
from mandos.client import attempt, route
from mandos.client.privileges import Privileges
from mandos.client.servers import ServerAddress
privileges = Privileges()

def boot_routes():
    out = subprocess.run(["ip", "-6", "-d", "-j", "route", "show", "table", "main"],
                         capture_output=True, text=True, check=True).stdout
    return [r for r in json.loads(out) if r.get("protocol") == "boot"]

ifindex = socket.if_nametoindex("vc") if cfg["with_ifindex"] else 0
server = ServerAddress(cfg["address"], cfg["port"], socket.AF_INET6, ifindex)
result = {"euid": os.geteuid()}
try:
    attempt.connect(server).close()
    result["plain"] = "connected"
except attempt.Unreachable:
    result["plain"] = "unreachable"
except attempt.AttemptFailed as err:
    result["plain"] = str(err)
try:
    with route.connect_with_route(attempt.connect, server, "vc",
                                  connect_mode=cfg["connect_mode"], debug=True,
                                  privileges=privileges) as sock:
        result["routes_during"] = boot_routes()
        result["received"] = sock.recv(100).decode()
        result["euid_during"] = os.geteuid()
    result["outcome"] = "connected"
except attempt.Unreachable:
    result["outcome"] = "unreachable"
result["routes_after"] = boot_routes()
print(json.dumps(result))
"""


class Link:
    """Server and client namespaces joined by a veth pair vs <-> vc."""

    def __init__(self) -> None:
        self.server = Namespace("rts")
        self.client = None
        self.listener = None
        try:
            self.client = Namespace("rtc")
            for namespace in (self.server, self.client):
                # Addresses usable at once, without duplicate detection.
                result = namespace.run(["sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                                        "net.ipv6.conf.default.accept_dad=0"])
                assert result.returncode == 0, result.stderr
            self.client.ip("link", "add", "vc", "type", "veth", "peer", "name", "vs",
                           "netns", self.server.name)
            self.server.ip("addr", "add", f"{SERVER_ADDRESS}/64", "dev", "vs", "nodad")
            self.server.ip("link", "set", "vs", "up")
            self.client.ip("link", "set", "vc", "up")
            self.server_link_local = self._link_local(self.server, "vs")
            self._link_local(self.client, "vc")
            self.listener = subprocess.Popen(
                ["ip", "netns", "exec", self.server.name, PYTHON, "-c", LISTENER],
                stdout=subprocess.PIPE, text=True)
            assert self.listener.stdout.readline().strip() == "ready"
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _link_local(namespace: Namespace, device: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = namespace.ip("-6", "-j", "addr", "show", "dev", device).stdout
            for interface in json.loads(out):
                for info in interface.get("addr_info", []):
                    if (info.get("scope") == "link" and not info.get("tentative")):
                        return info["local"]
            time.sleep(0.05)
        pytest.fail(f"no link-local address on {device}")

    def attempt(self, address: str = SERVER_ADDRESS, *, connect_mode: bool = False,
                with_ifindex: bool = True, uids: list[int] | None = None,
                helper_dir: str | None = str(HELPER_DIR)) -> dict:
        """Run one connect_with_route() in the client namespace; its report."""
        env = {k: v for k, v in os.environ.items() if k != route.HELPER_DIR_VARIABLE}
        if helper_dir is not None:
            env[route.HELPER_DIR_VARIABLE] = helper_dir
        cfg = {"address": address, "port": PORT, "connect_mode": connect_mode,
               "with_ifindex": with_ifindex, "uids": uids}
        result = self.client.run([PYTHON, "-c", CLIENT, str(REPO), json.dumps(cfg)], env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        report["stderr"] = result.stderr
        return report

    def close(self) -> None:
        if self.listener is not None:
            self.listener.terminate()
            self.listener.wait(timeout=10)
            self.listener.stdout.close()
        for namespace in (self.client, self.server):
            if namespace is not None:
                namespace.close()


@pytest.fixture(scope="module")
def link():
    link = Link()
    try:
        yield link
    finally:
        link.close()


def is_route_to_server(entry: dict) -> bool:
    return (entry.get("dst") == SERVER_ADDRESS and entry.get("dev") == "vc"
            and entry.get("protocol") == "boot" and "gateway" not in entry)


def test_global_address_on_another_prefix_gets_host_route_and_connects(link):
    report = link.attempt()
    assert report["plain"] == "unreachable"  # the problem the work-around solves
    assert report["outcome"] == "connected", report["stderr"]
    assert report["received"] == GREETING
    assert [r for r in report["routes_during"] if is_route_to_server(r)]
    assert report["routes_after"] == []


def test_link_local_target_needs_and_gets_no_route(link):
    report = link.attempt(link.server_link_local)
    assert report["plain"] == "connected"
    assert report["outcome"] == "connected"
    assert report["routes_during"] == [] and report["routes_after"] == []


def test_connect_mode_adds_no_route(link):
    report = link.attempt(connect_mode=True)
    assert report["outcome"] == "unreachable"
    assert report["routes_after"] == []
    assert "iprouteadddel" not in report["stderr"]


def test_no_interface_index_adds_no_route(link):
    report = link.attempt(with_ifindex=False)
    assert report["outcome"] == "unreachable"
    assert "iprouteadddel" not in report["stderr"]


@pytest.mark.parametrize("helper_dir", ["/nonexistent/plugin-helpers", None],
                         ids=["missing-helper", "variable-unset"])
def test_missing_helper_is_a_plain_failure(link, helper_dir):
    report = link.attempt(helper_dir=helper_dir)
    assert report["outcome"] == "unreachable"
    assert report["routes_after"] == []


def test_unprivileged_client_with_saved_root_still_runs_helper_as_root(link):
    """Real UID 65534, saved UID 0 (setresuid(65534, 0, 0), then Privileges)."""
    report = link.attempt(uids=[65534, 0, 0])
    assert report["euid"] == 65534 and report["euid_during"] == 65534
    assert report["outcome"] == "connected", report["stderr"]
    assert [r for r in report["routes_during"] if is_route_to_server(r)]
    assert report["routes_after"] == []


# --- privileges with the stand-in helper, in a child process ----------------------

PRIVILEGED = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
os.setresgid(65534, 65534, 65534)
os.setresuid(*cfg["uids"])
from mandos.client import route
from mandos.client.privileges import Privileges
privileges = Privileges()
pidfile = os.environ.get("FAKE_HELPER_PIDFILE")
stop = (lambda: os.path.exists(pidfile)) if pidfile else (lambda: False)
ok = route.run_route_helper("add", "192.0.2.9", "eth9", debug=False,
                            privileges=privileges, should_stop=stop)
print(json.dumps({"ok": ok, "euid": os.geteuid()}))
"""


def run_privileged(uids: list[int], env_extra: dict | None = None) -> tuple[dict, str]:
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([PYTHON, "-c", PRIVILEGED, str(REPO), json.dumps({"uids": uids})],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_saved_root_helper_is_full_root(fake_helper_dir):
    report, stderr = run_privileged([65534, 0, 0])
    assert report == {"ok": True, "euid": 65534}
    (record,) = records(stderr)
    assert record["resuid"] == [0, 0, 0]
    assert record["resgid"] == [0, 0, 0]
    assert record["groups"] == []


def test_helper_runs_anyway_when_root_cannot_be_had(fake_helper_dir):
    report, stderr = run_privileged([65534, 65534, 65534])
    assert report["ok"] is True
    (record,) = records(stderr)
    assert record["resuid"] == [65534, 65534, 65534]
    assert "raise privileges" in stderr


def test_root_helper_is_killed_from_lowered_privileges(fake_helper_dir, pidfile):
    started = time.monotonic()
    report, stderr = run_privileged([65534, 0, 0])
    assert report == {"ok": False, "euid": 65534}
    assert time.monotonic() - started < 20, "the helper was not stopped"
    assert process_gone(int(pidfile.read_text()))
