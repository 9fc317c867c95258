"""Our mandos-ctl against the original Debian one (1.8.16), on our real server.

Both run as processes against ``bin/mandos`` on a private system bus
(see our_server.py).  Reading commands run on one shared server and must
give the same standard output and exit status.  Each state-changing
command line runs on a fresh server per program, both started from the same
``clients.conf``, and the resulting client properties (read with ``-j``;
timestamps reduced to set or not, since the two servers run at different
moments) must be the same.  Approval, denial and a new secret are checked
by their effect on a real client; one test runs ours against the original
server's D-Bus interface.  The deliberate differences have tests that say
so.

Clients have ``interval = P1D`` so that no scheduled checker runs during a
test; checkers are ``true``.
"""

from __future__ import annotations

import base64
import configparser
import json
from pathlib import Path

import pytest

import mandos
from original_server import OriginalServer, PrivateSystemBus, make_world_temp, remove
from our_server import OurServer
from test_server_e2e import (APPROVAL, OUR_CLIENT, PASSWORD, background, bus,  # noqa: F401
                             eventually, folder, keydir, mandos_ctl, original_client,
                             our_keygen, our_keys, passfile, servers, unlock, world_folder)

pytestmark = [pytest.mark.interop]

REPO = Path(__file__).resolve().parents[2]
OUR_CTL = REPO / "bin" / "mandos-ctl"

DEFAULTS = "checker = true\ninterval = P1D"
# Names of different lengths; one client disabled; made-up key IDs and fingerprints
# (the original server needs both).
CLIENTS_CONF = """\
[a]
key_id = 0af87b3151b128f711cd3d454e6de12f9ac782980afb0a6095165b8abe6d6174
fingerprint = 30F1AA9C2B9C8E4D71F1E86A0D7EE1B5E2C0F0B3
secret = aGVsbG8=
host = a.example

[web1]
key_id = 1af87b3151b128f711cd3d454e6de12f9ac782980afb0a6095165b8abe6d6174
fingerprint = 40F1AA9C2B9C8E4D71F1E86A0D7EE1B5E2C0F0B3
secret = aGVsbG8=
host = web1.example
approval_delay = PT10S

[db-server.example]
key_id = 2af87b3151b128f711cd3d454e6de12f9ac782980afb0a6095165b8abe6d6174
fingerprint = 50F1AA9C2B9C8E4D71F1E86A0D7EE1B5E2C0F0B3
secret = aGVsbG8=
enabled = false
timeout = P1DT2H3M5S
"""
TIMESTAMPS = ("Created", "LastCheckedOK", "LastEnabled", "LastApprovalRequest", "Expires")


def ours(address: str, *args: str):
    """Our mandos-ctl on the private bus."""
    return mandos_ctl(address, *args, program=OUR_CTL)


def original(address: str, *args: str):
    """The original mandos-ctl on the private bus."""
    return mandos_ctl(address, *args)


# -- reading: one shared server ----------------------------------------------------------


@pytest.fixture(scope="module")
def shared_bus():
    """A bus with our server and the three clients; tests here must not change them."""
    path = make_world_temp("mandos-ctl-e2e-")
    try:
        with PrivateSystemBus(world_folder(path, "bus")) as running, \
                OurServer(world_folder(path, "server"), CLIENTS_CONF, defaults=DEFAULTS,
                          bus=running.address):
            yield running.address
    finally:
        remove(path)


READING = [
    [], ["-v"], ["-j"], ["--verbose"], ["--dump-json"], ["web1"], ["db-server.example", "a"],
    ["-v", "a", "web1"], ["-j", "db-server.example"], ["web1", "web1"],
    ["nope"], ["a", "nope"], ["-j", "nope"], ["-V", "a"], ["-V", "db-server.example"],
    ["--is-enabled", "web1"], ["-V", "nope"],
    # usage errors: exit 2 before anything is read
    ["-e"], ["-a"], ["-j", "-v"], ["-v", "-e", "a"], ["-e", "-d", "a"], ["-r", "-e", "a"],
    ["-V", "a", "web1"], ["-j", "-e", "a"],
]


@pytest.mark.parametrize("args", READING, ids=lambda args: " ".join(args) or "(none)")
def test_same_output_and_status(shared_bus, args):
    theirs, mine = original(shared_bus, *args), ours(shared_bus, *args)
    assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout), mine.stderr


def test_unknown_client_same_message(shared_bus):
    theirs, mine = original(shared_bus, "web1", "nope"), ours(shared_bus, "web1", "nope")
    assert mine.stderr == theirs.stderr == "Client not found on server: 'nope'\n"


@pytest.mark.parametrize("name, status", [("web1", 0), ("db-server.example", 1)])
def test_is_enabled_prints_nothing(shared_bus, name, status):
    result = ours(shared_bus, "--is-enabled", name)
    assert (result.returncode, result.stdout, result.stderr) == (status, "", "")


def test_no_server_on_the_bus(folder):
    with PrivateSystemBus(world_folder(folder, "bus")) as empty:
        for args in ([], ["-j"], ["-e", "web1"]):
            theirs, mine = original(empty.address, *args), ours(empty.address, *args)
            assert (mine.returncode, mine.stdout, mine.stderr) == (
                theirs.returncode, theirs.stdout, theirs.stderr)
            assert mine.returncode == 1
            assert mine.stderr.startswith("Could not connect to Mandos server: ")


# -- changing: a fresh server for each program ---------------------------------------


def settled_state(address: str) -> dict:
    """The clients' properties once no checker runs; timestamps as set or not."""
    def read():
        result = ours(address, "-j")
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        return None if any(c["CheckerRunning"] for c in data.values()) else [data]
    (data,) = eventually(read, 10, "all checkers finished")
    return {name: {key: bool(value) if key in TIMESTAMPS else value
                   for key, value in properties.items()}
            for name, properties in data.items()}


def outcome(parent: Path, name: str, ctl, steps: list[list[str]]) -> tuple[list, dict]:
    """Run each step with ``ctl`` on a fresh server; the finished processes and the state."""
    with PrivateSystemBus(world_folder(parent, f"{name}-bus")) as running, \
            OurServer(world_folder(parent, name), CLIENTS_CONF, defaults=DEFAULTS,
                      bus=running.address):
        results = [ctl(running.address, *step) for step in steps]
        return results, settled_state(running.address)


def statuses(results: list) -> list[tuple[int, str]]:
    return [(result.returncode, result.stdout) for result in results]


@pytest.fixture(scope="module")
def initial_state() -> dict:
    """The state of a fresh server, as settled_state() gives it."""
    path = make_world_temp("mandos-ctl-e2e-")
    try:
        return outcome(path, "initial", ours, [])[1]
    finally:
        remove(path)


@pytest.fixture
def secret_file(folder) -> Path:
    path = folder / "new-secret"
    path.write_bytes(b"\x85\x01\x0c new secret \x00\xff")
    return path


CHANGES = {
    "enable": [["-e", "db-server.example"]],
    "disable": [["--disable", "web1"]],
    "disable-all": [["-d", "--all"]],
    "bump-timeout": [["-b", "a", "db-server.example"]],
    "start-checker": [["--start-checker", "web1"]],
    "stop-checker": [["-c", "sleep 30", "--start-checker", "a"], ["--stop-checker", "a"]],
    "checker": [["-c", "ping -c1 %(host)s", "a"]],
    "checker-long": [["--checker=ssh-keyscan %(host)s", "--all"]],
    "timeout": [["-t", "PT1H", "web1"]],
    "timeout-older-form": [["--timeout", "1w 2d", "a"]],
    "extended-timeout": [["--extended-timeout", "PT30M", "a", "web1"]],
    "interval": [["-i", "PT1M", "web1"]],
    "deny-then-approve-by-default": [["--deny-by-default", "-a"],
                                     ["--approve-by-default", "web1"]],
    "approval-delay": [["--approval-delay", "PT30S", "a"]],
    "approval-duration": [["--approval-duration", "5m", "web1"]],
    "host": [["-H", "192.0.2.7", "web1"], ["--host", "", "a"]],
    "secret": [["-s", "SECRET_FILE", "web1"]],
    "remove": [["-r", "web1"]],
    "remove-all": [["--remove", "--all"]],
    "deny-and-remove": [["-r", "-D", "a"]],
    "approve-and-deny-no-request": [["-A", "a"], ["-D", "web1"]],
    "enable-and-interval": [["-e", "-i", "PT1M", "db-server.example"]],
    "many-at-once": [["-d", "-t", "PT2H", "-H", "h.example", "--approval-delay", "1m",
                      "--deny-by-default", "-c", "false", "a", "web1"]],
    "is-enabled-after-enable": [["-e", "-V", "db-server.example"],
                                ["-V", "db-server.example"]],
}


# Cases whose effect -j cannot show.
INVISIBLE = {"secret", "approve-and-deny-no-request"}


@pytest.mark.parametrize("name", list(CHANGES))
def test_same_resulting_state(folder, secret_file, initial_state, name):
    steps = [[str(secret_file) if arg == "SECRET_FILE" else arg for arg in step]
             for step in CHANGES[name]]
    their_results, their_state = outcome(folder, "original", original, steps)
    my_results, my_state = outcome(folder, "ours", ours, steps)
    assert statuses(my_results) == statuses(their_results), [r.stderr for r in my_results]
    assert my_state == their_state
    assert (my_state == initial_state) == (name in INVISIBLE)


def approvals_and_removals(result) -> list[str]:
    """The --debug lines of Approve and RemoveClient calls (the same in both programs)."""
    return [line for line in result.stderr.splitlines()
            if ".Approve(" in line or ".RemoveClient(" in line]


def test_deny_runs_before_remove_as_in_the_original(folder):
    step = ["--debug", "-r", "-D", "a", "web1"]
    (theirs,), _ = outcome(folder, "original", original, [step])
    (mine,), _ = outcome(folder, "ours", ours, [step])
    lines = approvals_and_removals(mine)
    assert lines == [
        "D-Bus: se.recompile.Mandos:/clients/a:se.recompile.Mandos.Client.Approve(False)",
        "D-Bus: se.recompile.Mandos:/clients/web1:se.recompile.Mandos.Client.Approve(False)",
        "D-Bus: se.recompile.Mandos:/:se.recompile.Mandos.RemoveClient('/clients/a')",
        "D-Bus: se.recompile.Mandos:/:se.recompile.Mandos.RemoveClient('/clients/web1')"]
    their_lines = approvals_and_removals(theirs)
    # The original removes in no particular order.
    assert their_lines[:2] == lines[:2] and sorted(their_lines[2:]) == lines[2:]


# -- the deliberate differences ------------------------------------------------------


@pytest.mark.parametrize("value, their_timeout", [("300", 300), ("abc", 0)])
def test_deviation_bad_time_is_refused_where_the_original_guesses(folder, value,
                                                                  their_timeout):
    # After a successful check the client expires one timeout (5 min) from now.
    steps = [["-b", "web1"], ["-t", value, "web1"]]
    their_results, their_state = outcome(folder, "original", original, steps)
    my_results, my_state = outcome(folder, "ours", ours, steps)
    assert statuses(their_results) == [(0, ""), (0, "")]
    assert their_state["web1"]["Timeout"] == their_timeout  # 300 ms, or zero
    if their_timeout == 0:
        assert their_state["web1"]["Enabled"] is False  # disabled at once
    assert statuses(my_results) == [(0, ""), (2, "")]
    assert f"invalid TIME {value!r}" in my_results[1].stderr
    assert (my_state["web1"]["Timeout"], my_state["web1"]["Enabled"]) == (300000, True)


def test_deviation_long_durations(folder):
    steps = [["-t", "P30D", "a"], ["-t", "P3000000D", "web1"]]  # the second is too long
    their_results, their_state = outcome(folder, "original", original, steps)
    my_results, my_state = outcome(folder, "ours", ours, steps)
    # The original sends durations as 32-bit integers, so 30 days do not fit,
    # and any failed call ends it with a traceback.
    assert [result.returncode for result in their_results] == [1, 1]
    assert all("Traceback" in result.stderr for result in their_results)
    assert their_state["a"]["Timeout"] == 300000
    # Ours sends 30 days; more than 1000 years is refused before any call.
    assert statuses(my_results) == [(0, ""), (2, "")]
    assert "longer than 1000 years" in my_results[1].stderr
    assert my_state["a"]["Timeout"] == 30 * 86400000
    assert my_state["web1"]["Timeout"] == their_state["web1"]["Timeout"]


def test_deviation_version(shared_bus):
    assert original(shared_bus, "--version").stdout == "mandos-ctl 1.8.16\n"
    assert ours(shared_bus, "--version").stdout == f"mandos-ctl {mandos.__version__}\n"


def test_deviation_is_enabled_with_all(shared_bus):
    assert original(shared_bus, "-V", "--all").returncode == 0  # "a", listed first
    mine = ours(shared_bus, "-V", "--all")
    assert mine.returncode == 2 and "exactly one client name" in mine.stderr


def test_deviation_table_of_no_clients(folder):
    with PrivateSystemBus(world_folder(folder, "bus")) as running, \
            OurServer(world_folder(folder, "server"), "", bus=running.address):
        theirs, mine = original(running.address), ours(running.address)
        assert theirs.returncode == 1 and "Traceback" in theirs.stderr
        assert (mine.returncode, mine.stdout) == (
            0, "Name Enabled Timeout Last Successful Check\n")
        assert ours(running.address, "-j").stdout == original(running.address,
                                                              "-j").stdout == "{}\n"


def test_deviation_debug_never_shows_the_secret(shared_bus, secret_file):
    # Setting a secret on the shared server is harmless: nothing reads it.
    theirs = original(shared_bus, "--debug", "-s", str(secret_file), "web1")
    mine = ours(shared_bus, "--debug", "-s", str(secret_file), "web1")
    assert theirs.returncode == mine.returncode == 0
    assert "new secret" in theirs.stderr  # the original shows it
    assert "new secret" not in mine.stderr
    assert mine.stderr.splitlines() == [
        "D-Bus: se.recompile.Mandos:/:org.freedesktop.DBus.ObjectManager"
        ".GetManagedObjects()",
        "D-Bus: se.recompile.Mandos:/clients/web1:org.freedesktop.DBus.Properties"
        ".Set('se.recompile.Mandos.Client', 'Secret', <secret withheld>)"]


# -- with a real client ----------------------------------------------------------------


def test_approve_gives_the_waiting_client_its_secret(servers, bus, our_keys, background):
    with servers(our_keys.conf("host1", **APPROVAL), bus=bus) as server:
        running = background(original_client(), our_keys, server.address)
        server.wait_for_log("Client host1 needs approval")
        theirs, mine = original(bus, "-j"), ours(bus, "-j")
        assert mine.stdout == theirs.stdout
        assert json.loads(mine.stdout)["host1"]["ApprovalPending"] is True
        assert ours(bus, "--approve", "host1").returncode == 0
        assert running.finish() == PASSWORD
        server.wait_for_log("Sending secret to host1")


def test_deny_refuses_the_waiting_client(servers, bus, our_keys, background):
    with servers(our_keys.conf("host1", **APPROVAL), bus=bus) as server:
        running = background(original_client(), our_keys, server.address)
        server.wait_for_log("Client host1 needs approval")
        assert ours(bus, "-D", "host1").returncode == 0
        server.wait_for_log("Client host1 was not approved")
        assert running.still_waiting() == b""
        assert "Sending secret" not in server.output()


def test_new_secret_reaches_the_client_and_no_output(servers, bus, our_keys, folder):
    new_password = b"a new \x00 passphrase\n"
    (folder / "new-passfile").write_bytes(new_password)
    section = our_keygen("--dir", str(our_keys.folder), "--passfile",
                         str(folder / "new-passfile"), "--no-ssh", "--name", "host1")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(section)
    secret = base64.b64decode("".join(parser["host1"]["secret"].split()))
    (folder / "secret.bin").write_bytes(secret)
    with servers(our_keys.conf("host1"), bus=bus) as server:
        result = ours(bus, "--debug", "--secret", str(folder / "secret.bin"), "host1")
        assert result.returncode == 0 and result.stdout == ""
        assert "<secret withheld>" in result.stderr
        for shown in (repr(secret)[2:40], base64.b64encode(secret)[:30].decode(),
                      secret.hex()[:30]):
            assert shown not in result.stderr
        assert unlock(OUR_CLIENT, our_keys, server.address) == new_password


# -- with the original server ----------------------------------------------------------


@pytest.mark.slow
def test_ours_works_with_the_original_server(folder):
    conf = "interval = P1D\n\n" + CLIENTS_CONF  # still in [DEFAULT]
    with OriginalServer(world_folder(folder, "original-server"), conf, dbus=True) as server:
        address = server.bus_address
        eventually(lambda: original(address).returncode == 0, 20, "the server on the bus")
        for args in ([], ["-v"], ["-j"], ["db-server.example", "a"], ["nope"]):
            theirs, mine = original(address, *args), ours(address, *args)
            assert (mine.returncode, mine.stdout) == (theirs.returncode, theirs.stdout)
        mine = ours(address, "-e", "-i", "PT1M", "-t", "1w2d", "--host", "h", "db-server.example")
        assert mine.returncode == 0, mine.stderr
        dump = json.loads(original(address, "-j").stdout)
        assert [dump["db-server.example"][key] for key in ("Enabled", "Interval", "Timeout",
                                                            "Host")] == [
            True, 60000, 777600000, "h"]
        # 1000 years is a TIME ours accepts, but the original server cannot
        # add it to the current date: a failed call, reported with the
        # server's error (dbus-python puts the server's traceback in it)
        # and no traceback of our own.
        failed = ours(address, "-t", "P365000D", "web1")
        assert failed.returncode == 1
        assert failed.stderr.startswith("Failed to access Mandos server through D-Bus:\n")
        assert "OverflowError" in failed.stderr
        assert "mandos/ctl/" not in failed.stderr
        assert ours(address, "-r", "-D", "a").returncode == 0
        assert sorted(json.loads(original(address, "-j").stdout)) == ["db-server.example",
                                                                      "web1"]
