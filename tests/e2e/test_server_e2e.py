"""Our mandos server end to end: ``bin/mandos`` as a real process (see our_server.py).

Clients are the original Debian mandos-client 1.8.16 and ours, keys come
from our mandos-keygen and from the original one, and the server is
controlled over a private system bus with dbus-fast or the original
mandos-ctl.  Every client gets a time limit: clients retry for ever.
Checkers are ``true`` unless a test names its own; every address is
loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from dbus_fast import DBusError, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

import peers
from original_server import (SERVER_USER, PrivateSystemBus, clients_conf_section,
                             make_world_temp, original_keygen, remove)
from our_server import MANDOS, PYTHON, OurServer

pytestmark = [pytest.mark.slow]
interop = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]
KEYGEN = REPO / "bin" / "mandos-keygen"
OUR_CLIENT = REPO / "plugins.d" / "mandos-client"
# Bytes that are not text and a final newline: all must arrive as they are.
PASSWORD = b"e2e \x00\xff passphrase\n"
FAST_KEYS = ("--type", "ed25519", "--subtype", "cv25519")

BUS_NAME = "se.recompile.Mandos"
CLIENT_INTERFACE = "se.recompile.Mandos.Client"
PROPERTIES = "org.freedesktop.DBus.Properties"


# -- keys ------------------------------------------------------------------------------


class Keys:
    """A client's key folder and the clients.conf section printed for it."""

    def __init__(self, folder: Path, section: str) -> None:
        self.folder = folder
        self.section = section

    @property
    def key_id(self) -> str:
        for line in self.section.splitlines():
            if line.startswith("key_id"):
                return line.split("=", 1)[1].strip()
        raise AssertionError("no key_id in the section")

    def conf(self, name: str = "host1", **settings: str) -> str:
        return clients_conf_section(name, self.section, **settings)


def our_keygen(*args: str) -> str:
    result = subprocess.run([str(KEYGEN), *args], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def folder_and_passfile(name: str, prefix: str, passphrase: bytes):
    """Two module-scoped fixtures, to be assigned to ``name`` and ``passfile``.

    ``name``: a folder from ``make_world_temp(prefix)``, removed afterwards;
    ``passfile``: a file "passfile" in it holding ``passphrase``.
    """

    @pytest.fixture(scope="module", name=name)
    def folder_fixture():
        path = make_world_temp(prefix)
        yield path
        remove(path)

    @pytest.fixture(scope="module", name="passfile")
    def passfile_fixture(request) -> Path:
        path = request.getfixturevalue(name) / "passfile"
        path.write_bytes(passphrase)
        return path

    return folder_fixture, passfile_fixture


keydir, passfile = folder_and_passfile("keydir", "mandos-e2e-keys-", PASSWORD)


@pytest.fixture(scope="module")
def our_keys(keydir, passfile) -> Keys:
    """Keys and section from our mandos-keygen (fast curve types)."""
    folder = keydir / "ours"
    our_keygen("--dir", str(folder), *FAST_KEYS, "--name", "ours")
    return Keys(folder, our_keygen("--dir", str(folder), "--passfile", str(passfile),
                                   "--no-ssh", "--name", "ours"))


@pytest.fixture(scope="module")
def original_keys(keydir, passfile) -> Keys:
    """Keys and section from the original mandos-keygen (RSA 2048, smaller than usual)."""
    folder = keydir / "original"
    folder.mkdir()
    original_keygen(folder, "--length", "2048", "--sublength", "2048")
    return Keys(folder, original_keygen(folder, "--passfile", str(passfile), "--no-ssh",
                                        "--name", "orig").stdout)


@pytest.fixture(scope="module")
def stranger_keys(keydir, passfile) -> Keys:
    """Keys of a client no server in this module knows."""
    folder = keydir / "stranger"
    our_keygen("--dir", str(folder), *FAST_KEYS, "--name", "stranger")
    return Keys(folder, our_keygen("--dir", str(folder), "--passfile", str(passfile),
                                   "--no-ssh", "--name", "stranger"))


# -- servers, buses, clients -----------------------------------------------------------


def world_folder(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def folder():
    path = make_world_temp("mandos-e2e-")
    yield path
    remove(path)


@pytest.fixture
def servers(folder):
    """Make OurServer objects in ``folder``; all are stopped at the end."""
    made: list[OurServer] = []

    def make(clients_conf: str = "", **options) -> OurServer:
        server = OurServer(world_folder(folder, f"server{len(made)}"), clients_conf,
                           **options)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


@pytest.fixture
def bus(folder):
    """A private system bus for this test."""
    with PrivateSystemBus(world_folder(folder, "bus")) as running:
        yield running.address


def original_client() -> Path:
    return peers.client_libdir() / "plugins.d" / "mandos-client"


CLIENTS = {"our-client": lambda: OUR_CLIENT, "original-client": original_client}


def client_args(client: Path, keys: Keys, address: str, *extra: str) -> list[str]:
    return [str(client), "--connect", address, "--interface", "none",
            "--pubkey", str(keys.folder / "pubkey.txt"),
            "--seckey", str(keys.folder / "seckey.txt"),
            "--tls-pubkey", str(keys.folder / "tls-pubkey.pem"),
            "--tls-privkey", str(keys.folder / "tls-privkey.pem"), *extra]


def unlock(client: Path, keys: Keys, address: str, timeout: float = 30) -> bytes:
    """Run a client to completion (it must get its password within ``timeout``)."""
    try:
        result = subprocess.run(client_args(client, keys, address), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"no password within {timeout} s: "
                             f"{(err.stderr or b'').decode(errors='replace')}") from None
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


class RetryingClient:
    """A client run in the background, for cases where it gets nothing and retries."""

    def __init__(self, client: Path, keys: Keys, address: str, retry: str = "0.5") -> None:
        self.process = subprocess.Popen(
            client_args(client, keys, address, "--retry", retry), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(self, timeout: float = 20) -> bytes:
        """Its password, once it has exited by itself."""
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the client got nothing within {timeout} s") from None
        assert self.process.returncode == 0, stderr.decode(errors="replace")
        return stdout

    def still_waiting(self) -> bytes:
        """Assert that it is still running; stop it; what it printed (should be nothing)."""
        assert self.process.poll() is None, "the client gave up or finished"
        self.process.send_signal(signal.SIGTERM)
        stdout, _ = self.process.communicate(timeout=15)
        return stdout

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


@pytest.fixture
def background():
    """Start RetryingClients; any left running are killed at the end."""
    started: list[RetryingClient] = []

    def start(*args, **kwargs) -> RetryingClient:
        client = RetryingClient(*args, **kwargs)
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


# -- D-Bus -----------------------------------------------------------------------------


def client_path(name: str) -> str:
    return "/clients/" + name.replace(".", "_").replace("-", "_")


async def _call(address: str, path: str, interface: str, member: str, signature: str,
                body: list) -> list:
    bus = await MessageBus(bus_address=address).connect()
    try:
        reply = await bus.call(Message(destination=BUS_NAME, path=path, interface=interface,
                                       member=member, signature=signature, body=body))
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        raise DBusError(reply.error_name, reply.body[0] if reply.body else "")
    return reply.body


def dbus_get(address: str, name: str, prop: str):
    """A property of client ``name``, as a plain value."""
    body = asyncio.run(asyncio.wait_for(_call(address, client_path(name), PROPERTIES, "Get",
                                              "ss", [CLIENT_INTERFACE, prop]), 10))
    return body[0].value


def dbus_set(address: str, name: str, prop: str, signature: str, value) -> None:
    asyncio.run(asyncio.wait_for(_call(address, client_path(name), PROPERTIES, "Set", "ssv",
                                       [CLIENT_INTERFACE, prop, Variant(signature, value)]),
                                 10))


def mandos_ctl(address: str, *args: str, program: Path | None = None
               ) -> subprocess.CompletedProcess:
    """The original mandos-ctl (or ``program``) on the private bus."""
    ctl = program or peers.unpacked_root() / "usr/sbin/mandos-ctl"
    return subprocess.run([PYTHON, str(ctl), *args], capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address,
                                               LC_ALL="C.UTF-8"))


def utc(text: str) -> datetime.datetime:
    """A D-Bus timestamp (naive UTC, ISO 8601)."""
    return datetime.datetime.fromisoformat(text)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def eventually(condition, timeout: float, what: str, step: float = 0.1):
    """Poll ``condition()`` until it is true; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


KEY_FIXTURES = {"our-keygen": "our_keys", "original-keygen": "original_keys"}


# == 1. the original client unlocks from our server ====================================


@interop
@pytest.mark.parametrize("ipv6", [True, False], ids=["ipv6", "ipv4"])
@pytest.mark.parametrize("keygen", ["our-keygen", "original-keygen"])
def test_original_client_unlocks_from_our_server(servers, request, keygen, ipv6):
    keys = request.getfixturevalue(KEY_FIXTURES[keygen])
    with servers(keys.conf("host1"), ipv6=ipv6) as server:
        assert unlock(original_client(), keys, server.address) == PASSWORD
        output = server.wait_for_log("Sending secret to host1")
        assert f"TCP connection from {'::1' if ipv6 else '127.0.0.1'}" in output


# == 2. our client unlocks from our server =============================================


@pytest.mark.parametrize("keygen", ["our-keygen", pytest.param("original-keygen",
                                                               marks=interop)])
def test_our_client_unlocks_from_our_server(servers, request, keygen):
    keys = request.getfixturevalue(KEY_FIXTURES[keygen])
    with servers(keys.conf("host1")) as server:
        assert unlock(OUR_CLIENT, keys, server.address) == PASSWORD
        server.wait_for_log("Sending secret to host1")


# == 3. unknown and disabled clients get nothing =======================================


@pytest.mark.parametrize("client", [
    "our-client", pytest.param("original-client", marks=interop)])
def test_unknown_client_gets_nothing_and_keeps_retrying(servers, our_keys, stranger_keys,
                                                        background, client):
    with servers(our_keys.conf("host1")) as server:
        running = background(CLIENTS[client](), stranger_keys, server.address)
        # Two refusals: the client came back after the first one.
        output = server.wait_for_log("Client not found for key ID", count=2)
        assert running.still_waiting() == b""
        assert stranger_keys.key_id.upper() in output.upper()
        assert "Sending secret" not in output


@pytest.mark.parametrize("client", [
    "our-client", pytest.param("original-client", marks=interop)])
def test_disabled_client_gets_nothing_and_keeps_retrying(servers, our_keys, background,
                                                         client):
    with servers(our_keys.conf("host1", enabled="false")) as server:
        running = background(CLIENTS[client](), our_keys, server.address)
        output = server.wait_for_log("Client host1 is disabled", count=2)
        assert running.still_waiting() == b""
        assert "Sending secret" not in output


def test_log_lines_go_to_syslog_when_it_listens(servers, our_keys, stranger_keys,
                                                 background):
    with servers(our_keys.conf("host1"), syslog=True) as server:
        running = background(OUR_CLIENT, stranger_keys, server.address)
        line = (f"<30>Mandos [{server.process.pid}]: INFO: Client not found for key ID "
                f"{stranger_keys.key_id.upper()}")
        eventually(lambda: line in server.syslog(), 10, "syslog line")
        running.kill()
        assert "Client not found" not in server.output()  # not --debug: syslog only


# == 4. approval over D-Bus ============================================================


APPROVAL = {"approval_delay": "PT30S", "approved_by_default": "false"}


@interop
def test_approve_with_mandos_ctl_gives_the_secret(servers, bus, our_keys, background):
    with servers(our_keys.conf("host1", **APPROVAL), bus=bus) as server:
        running = background(original_client(), our_keys, server.address)
        server.wait_for_log("Client host1 needs approval")
        dump = mandos_ctl(bus, "--dump-json", "host1")
        assert dump.returncode == 0, dump.stderr
        assert json.loads(dump.stdout)["host1"]["ApprovalPending"] is True
        assert mandos_ctl(bus, "--approve", "host1").returncode == 0
        assert running.finish() == PASSWORD
        server.wait_for_log("Sending secret to host1")
        assert dbus_get(bus, "host1", "ApprovalPending") is False
        assert dbus_get(bus, "host1", "LastApprovalRequest") != ""


@interop
def test_deny_with_mandos_ctl_gives_nothing_and_the_client_retries(servers, bus, our_keys,
                                                                   background):
    with servers(our_keys.conf("host1", **APPROVAL), bus=bus) as server:
        running = background(original_client(), our_keys, server.address)
        output = server.wait_for_log("Client host1 needs approval")
        connections = output.count("TCP connection from")
        assert mandos_ctl(bus, "--deny", "host1").returncode == 0
        server.wait_for_log("Client host1 was not approved")
        # The client comes back (--retry 0.5) and is refused or waits again.
        server.wait_for_log("TCP connection from", count=connections + 1)
        assert running.still_waiting() == b""
        assert "Sending secret" not in server.output()


@interop
@pytest.mark.parametrize("by_default", [False, True], ids=["denied", "approved"])
def test_approval_delay_runs_out(servers, our_keys, background, by_default):
    conf = our_keys.conf("host1", approval_delay="PT1S",
                         approved_by_default=str(by_default).lower())
    with servers(conf) as server:
        running = background(original_client(), our_keys, server.address, retry="0.5")
        if by_default:
            started = time.monotonic()
            assert running.finish() == PASSWORD
            assert time.monotonic() - started >= 0.9  # it did wait for the delay
            server.wait_for_log("Sending secret to host1")
        else:
            server.wait_for_log("Client host1 timed out waiting for approval", count=2)
            assert running.still_waiting() == b""
            assert "Sending secret" not in server.output()


# == 5. checkers =======================================================================


CHECKING = {"interval": "PT1S", "timeout": "PT3S"}


def test_successful_checker_keeps_the_client_enabled(servers, bus, our_keys):
    with servers(our_keys.conf("host1", checker="true", **CHECKING), bus=bus) as server:
        time.sleep(4.5)  # several intervals, and past the first timeout
        assert dbus_get(bus, "host1", "Enabled") is True
        last_ok = dbus_get(bus, "host1", "LastCheckedOK")
        assert last_ok and utcnow() - utc(last_ok) < datetime.timedelta(seconds=3)
        assert dbus_get(bus, "host1", "LastCheckerStatus") == 0
        assert server.output().count("Checker for host1 succeeded") >= 3


def test_failing_checker_disables_the_client(servers, bus, our_keys):
    with servers(our_keys.conf("host1", checker="false", **CHECKING), bus=bus) as server:
        assert dbus_get(bus, "host1", "Enabled") is True
        eventually(lambda: dbus_get(bus, "host1", "Enabled") is False, 8,
                   "client disabled")
        assert dbus_get(bus, "host1", "LastCheckedOK") == ""
        assert dbus_get(bus, "host1", "LastCheckerStatus") == 1
        assert "Checker for host1 failed" in server.output()


def checker_processes(marker: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``marker``."""
    found = []
    for process in psutil.process_iter():
        try:
            if (marker in " ".join(process.cmdline())
                    and process.status() != psutil.STATUS_ZOMBIE):
                found.append(process)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def hanging_checker():
    """A checker that sleeps for ever-ish; its command line finds its processes.

    Whatever is left of it is killed at the end of the test.
    """
    command = f"sleep 100.{secrets.randbelow(10**6):06d}1"
    yield command
    for process in checker_processes(command):
        try:
            process.kill()
        except psutil.Error:
            pass


def test_hanging_checker_disables_the_client_and_leaves_no_process(servers, bus, our_keys,
                                                                   hanging_checker):
    command = marker = hanging_checker
    with servers(our_keys.conf("host1", checker=command, **CHECKING), bus=bus) as server:
        eventually(lambda: checker_processes(marker), 5, "checker started")
        eventually(lambda: dbus_get(bus, "host1", "Enabled") is False, 8,
                   "client disabled")
        # Disabling kills the running checker.
        eventually(lambda: not checker_processes(marker), 8, "checker gone after disable")
        assert server.stop() == 0
    assert not checker_processes(marker)


def test_stopping_the_server_ends_a_running_checker(servers, our_keys, hanging_checker):
    command = marker = hanging_checker
    conf = our_keys.conf("host1", checker=command, interval="PT1S", timeout="PT1M")
    with servers(conf) as server:
        eventually(lambda: checker_processes(marker), 5, "checker started")
        assert server.stop() == 0
    assert not checker_processes(marker)


def test_checker_gets_the_host_shell_quoted(servers, folder, our_keys):
    out = world_folder(folder, "out")
    os.chown(out, SERVER_USER, SERVER_USER)
    result = out / "host"
    # One line per word the shell sees in the expansion of %(host)s.
    checker = f'for word in %%(host)s; do echo "[$word]"; done > {result}'
    conf = our_keys.conf("host1", host="check host.example", checker=checker, **CHECKING)
    with servers(conf):
        eventually(lambda: result.exists() and result.read_text(), 5, "checker ran")
    assert result.read_text() == "[check host.example]\n"


# == 6. extended timeout after the secret ==============================================


def test_secret_extends_the_timeout(servers, bus, our_keys, stranger_keys):
    settings = {"timeout": "PT2S", "extended_timeout": "PT30S", "checker": "false",
                "interval": "PT2S"}
    conf = our_keys.conf("host1", **settings) + stranger_keys.conf("idle", **settings)
    with servers(conf, bus=bus) as server:
        # Checkers are scheduled before the server listens: without a
        # secret, a client expires at most 2 intervals (4 s) after this.
        ready = time.monotonic()
        assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD
        expires = utc(dbus_get(bus, "host1", "Expires"))
        assert expires - utcnow() > datetime.timedelta(seconds=25)
        eventually(lambda: dbus_get(bus, "idle", "Enabled") is False, 8, "idle disabled")
        time.sleep(max(0.0, ready + 5.0 - time.monotonic()))
        assert dbus_get(bus, "host1", "Enabled") is True
        assert "Sending secret to host1" in server.output()


# == 7. persistent state ===============================================================


@pytest.mark.parametrize("how", ["dbus", "expiry"])
def test_disabled_client_stays_disabled_after_sigterm_and_restart(servers, bus, our_keys,
                                                                  how):
    settings = {"checker": "false", "interval": "PT1S"} if how == "expiry" else {}
    server = servers(our_keys.conf("host1", **settings), bus=bus).start()
    assert dbus_get(bus, "host1", "Enabled") is True
    if how == "dbus":
        dbus_set(bus, "host1", "Enabled", "b", False)
    else:
        eventually(lambda: dbus_get(bus, "host1", "Enabled") is False, 8, "client expired")
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    assert dbus_get(bus, "host1", "Enabled") is False
    assert dbus_get(bus, "host1", "Expires") == ""


def test_disabled_client_stays_disabled_after_kill_9_and_restart(servers, bus, our_keys):
    server = servers(our_keys.conf("host1"), bus=bus).start()
    dbus_set(bus, "host1", "Enabled", "b", False)
    time.sleep(0.5)
    server.stop(signal.SIGKILL)
    server.start()
    assert dbus_get(bus, "host1", "Enabled") is False


def test_no_restore_ignores_the_saved_state(servers, bus, our_keys):
    server = servers(our_keys.conf("host1"), bus=bus).start()
    dbus_set(bus, "host1", "Enabled", "b", False)
    assert server.stop() == 0
    server.start("--no-restore")
    assert dbus_get(bus, "host1", "Enabled") is True
    assert server.stop() == 0
    # ... and overwrote it at exit: a normal start now finds the client enabled.
    server.start()
    assert dbus_get(bus, "host1", "Enabled") is True


def test_edited_clients_conf_wins_over_the_saved_state(servers, bus, our_keys):
    server = servers(our_keys.conf("host1", timeout="PT5M"), bus=bus).start()
    dbus_set(bus, "host1", "Timeout", "t", 600_000)
    dbus_set(bus, "host1", "Host", "s", "runtime.example")
    assert server.stop() == 0
    server.write_clients_conf(our_keys.conf("host1", timeout="PT7M"))
    server.start()
    assert dbus_get(bus, "host1", "Timeout") == 420_000  # edited: the file wins
    assert dbus_get(bus, "host1", "Host") == "runtime.example"  # not edited: kept


# == 8. robustness =====================================================================


def _read_until_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the server closed the connection (reading what it sends)."""
    started = time.monotonic()
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout} s") from None
    return time.monotonic() - started


def abuse_garbage_line(sock: socket.socket) -> str:
    sock.sendall(b"\x00\xffGARBAGE " + secrets.token_bytes(64).replace(b"\n", b"") + b"\r\n")
    _read_until_closed(sock, 5)
    return "Unknown protocol version"


def abuse_endless_line(sock: socket.socket) -> str:
    try:
        sock.sendall(b"1" * 8192)
    except (BrokenPipeError, ConnectionResetError):
        pass
    _read_until_closed(sock, 5)
    return "Unknown protocol version"


def abuse_tls_client_hello(sock: socket.socket) -> str:
    # Mandos clients are TLS *servers*: a peer that starts a handshake as a
    # TLS client meets the server's own ClientHello.
    sock.sendall(b"1\r\n")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock.settimeout(5)
    with context.wrap_socket(sock, do_handshake_on_connect=False) as tls:
        try:
            tls.do_handshake()
        except TimeoutError:
            raise AssertionError("the server neither answered nor hung up") from None
        except OSError:  # ssl.SSLError included
            pass
        else:
            raise AssertionError("a TLS handshake between two TLS clients succeeded")
    return "Handshake failed"


def abuse_garbage_records(sock: socket.socket) -> str:
    sock.sendall(b"1\r\n")
    try:
        for _ in range(4):  # handshake records full of noise
            sock.sendall(b"\x16\x03\x03\x00\x80" + secrets.token_bytes(128))
    except (BrokenPipeError, ConnectionResetError):
        pass
    _read_until_closed(sock, 5)
    return "Handshake failed"


def abuse_silent_after_version(sock: socket.socket) -> str:
    sock.sendall(b"1\r\n")
    took = _read_until_closed(sock, 6)
    assert took < 4, f"dropped only after {took:.1f} s (--handshake-timeout 1)"
    return "Handshake failed"


def abuse_silent(sock: socket.socket) -> str:
    took = _read_until_closed(sock, 6)
    assert took < 4, f"dropped only after {took:.1f} s (--handshake-timeout 1)"
    return "No protocol version line"


def abuse_connect_and_close(sock: socket.socket) -> str:
    return "TCP connection from"


ABUSES = [abuse_garbage_line, abuse_endless_line, abuse_tls_client_hello,
          abuse_garbage_records, abuse_silent_after_version, abuse_silent,
          abuse_connect_and_close]


@pytest.fixture(scope="module")
def robust_server(our_keys):
    folder = make_world_temp("mandos-e2e-robust-")
    server = OurServer(world_folder(folder, "server"), our_keys.conf("host1"),
                       extra_args=("--handshake-timeout", "1"))
    try:
        with server:
            yield server
    finally:
        remove(folder)


@pytest.mark.parametrize("abuse", ABUSES, ids=lambda f: f.__name__[len("abuse_"):])
def test_server_survives_a_bad_peer(robust_server, our_keys, abuse):
    server = robust_server
    before = server.output()
    with socket.create_connection(("::1", server.port), timeout=10) as sock:
        expected_log = abuse(sock)
    eventually(lambda: expected_log in server.output()[len(before):], 5,
               f"{expected_log!r} logged")
    assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD
    assert server.running
    assert "Traceback" not in server.output()


def test_200_concurrent_unlocks(robust_server, our_keys):
    sys.path.insert(0, str(REPO / "bench"))
    from load_driver import run_load

    server = robust_server
    sent_before = server.output().count("Sending secret to host1")
    result = run_load("::1", server.port, (str(our_keys.folder / "tls-pubkey.pem"),
                                           str(our_keys.folder / "tls-privkey.pem")),
                      concurrency=200, duration=None, count=200)
    assert result["failures"] == 0, result["errors"]
    assert result["empty"] == 0
    assert result["unlocks"] == 200
    server.wait_for_log("Sending secret to host1", count=sent_before + 200)
    assert server.running
    assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD


# == 9. signals ========================================================================


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_stops_the_server_and_saves_the_state(servers, our_keys, signum):
    # A disabled client runs no checkers: nothing changes, nothing is saved
    # until the shutdown.
    server = servers(our_keys.conf("host1", enabled="false")).start()
    eventually(server.state_file.exists, 5, "state saved at start-up")
    time.sleep(0.2)
    server.state_file.unlink()
    assert server.stop(signum, timeout=10) == 0
    assert server.state_file.exists(), server.output()
    assert "host1" in server.state_file.read_text()
    assert "Traceback" not in server.output()


def test_sigterm_while_a_client_awaits_approval(servers, our_keys, background):
    with servers(our_keys.conf("host1", **APPROVAL)) as server:
        running = background(OUR_CLIENT, our_keys, server.address)
        server.wait_for_log("Client host1 needs approval")
        started = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "Sending secret" not in server.output()
        assert running.still_waiting() == b""


# == 10. inherited socket, readiness ===================================================


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.bind(("::1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize("fd, debug", [(0, False), (0, True), (3, False)],
                         ids=["fd0", "fd0-debug", "fd3"])
def test_inherited_listening_socket(servers, our_keys, fd, debug):
    # With --debug standard input becomes /dev/null: the socket must survive that.
    sock = listening_socket()
    port = sock.getsockname()[1]
    with sock:
        server = servers(our_keys.conf("host1"), port=port, listen_args=(f"--socket={fd}",),
                         stdin=sock.fileno(), wait=False, debug=debug,
                         redirections="3<&0 0</dev/null" if fd == 3 else "")
        server.start()
    # Only the server holds the socket now.
    server.wait_for_log(f"port {port}")
    assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD
    server.wait_for_log("Sending secret to host1")
    assert server.stop() == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_ready_notification(servers, folder, our_keys, kind):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        address = str(folder / "notify")
        notify.bind(address)
        os.chmod(address, 0o777)
    else:
        address = f"@mandos-e2e-{secrets.token_hex(8)}"
        notify.bind("\0" + address[1:])
    notify.settimeout(20)
    with notify:
        server = servers(our_keys.conf("host1"), env={"NOTIFY_SOCKET": address}, wait=False)
        with server:
            message = notify.recv(4096)
            assert b"READY=1" in message.split(b"\n")
            # Ready means listening: this connection is taken at once.
            with socket.create_connection(("::1", server.port), timeout=2):
                pass
            assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD
            assert server.stop() == 0
            assert b"STOPPING=1" in notify.recv(4096).split(b"\n")


# == 11. daemon mode ===================================================================


def test_daemon_mode_detaches_and_writes_the_pid_file(servers, folder, our_keys):
    pidfile = folder / "mandos.pid"
    server = servers(our_keys.conf("host1"), foreground=False, wait=False,
                     extra_args=("--pidfile", str(pidfile)))
    try:
        server.start()
        assert server.process.wait(timeout=20) == 0  # the launcher returns at once
        server.wait_listening()
        text = pidfile.read_text()
        assert text.endswith("\n")
        daemon_pid = int(text)
        daemon = psutil.Process(daemon_pid)
        assert daemon_pid != server.process.pid
        assert str(MANDOS) in daemon.cmdline()
        assert os.getsid(daemon_pid) != os.getsid(0)  # a session of its own
        assert daemon.ppid() != server.process.pid
        assert daemon.uids().effective == SERVER_USER
        assert daemon.cwd() == "/"
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{daemon_pid}/fd/{fd}") == "/dev/null"
        assert unlock(OUR_CLIENT, our_keys, server.address) == PASSWORD
        os.kill(daemon_pid, signal.SIGTERM)

        def gone() -> bool:
            try:
                return daemon.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        eventually(gone, 10, "daemon stopped")
        assert server.state_file.exists()
    finally:
        # Whatever is left of this test's daemon: its command line names its folder.
        for process in psutil.process_iter():
            try:
                if str(server.configdir) in process.cmdline():
                    process.kill()
            except psutil.Error:
                pass


# == 12. usage and configuration errors ================================================


def run_mandos(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(MANDOS), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--no-such-option"], "unrecognized arguments"),
    (["--no-zeroconf"], "needs port or socket"),
    (["--no-zeroconf", "--port", "none"], "--port"),
], ids=["bad-option", "no-zeroconf-without-port", "bad-port"])
def test_usage_errors_exit_2(folder, args, message):
    result = run_mandos("--foreground", "--configdir", str(folder), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("syslog", [
    False,
    True,
], ids=["no-syslog", "with-syslog"])
def test_bad_clients_conf_exits_1_with_a_message(servers, our_keys, syslog):
    server = servers(our_keys.conf("host1", timeout="5 parsecs"), syslog=syslog,
                     debuglevel=None, wait=False)
    server.start()
    assert server.process.wait(timeout=20) == 1
    output = server.output()
    assert "Traceback" not in output
    if syslog:
        assert "5 parsecs" in server.syslog()
    assert "host1" in output and "5 parsecs" in output, output
