"""mandos-ctl without a server: options and usage rules, TIME, table and JSON (SERVER.md §15).

The D-Bus side is tested against our real server in
tests/e2e/test_ctl_differential.py.
"""

from __future__ import annotations

import json

import pytest

import mandos
from mandos.ctl import bus, durations, main, options, output, selfcheck
from mandos.ctl.options import (APPROVE, APPROVE_BY_DEFAULT, BUMP_TIMEOUT, DENY,
                                DENY_BY_DEFAULT, DISABLE, ENABLE, IS_ENABLED, REMOVE,
                                START_CHECKER, STOP_CHECKER, Kind)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) without a server; (status, stdout, stderr)."""
    status = main.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def parse(*argv: str):
    return options.parse(list(argv))


# -- options -------------------------------------------------------------------------


@pytest.mark.parametrize("argv, action", [
    (["-e"], ENABLE), (["--enable"], ENABLE), (["-d"], DISABLE), (["--disable"], DISABLE),
    (["-b"], BUMP_TIMEOUT), (["--bump-timeout"], BUMP_TIMEOUT),
    (["--start-checker"], START_CHECKER), (["--stop-checker"], STOP_CHECKER),
    (["-V"], IS_ENABLED), (["--is-enabled"], IS_ENABLED), (["-r"], REMOVE),
    (["--remove"], REMOVE), (["--approve-by-default"], APPROVE_BY_DEFAULT),
    (["--deny-by-default"], DENY_BY_DEFAULT), (["-A"], APPROVE), (["--approve"], APPROVE),
    (["-D"], DENY), (["--deny"], DENY),
])
def test_every_flag_and_its_short_form_is_one_action(argv, action):
    assert parse(*argv, "web1").actions == [action]


@pytest.mark.parametrize("argv, prop, value", [
    (["-c", "fping -q -- %(host)s"], "Checker", "fping -q -- %(host)s"),
    (["--checker=true"], "Checker", "true"),
    (["-t", "PT5M"], "Timeout", 300000), (["--timeout", "5m"], "Timeout", 300000),
    (["--extended-timeout", "PT15M"], "ExtendedTimeout", 900000),
    (["-i", "PT2M"], "Interval", 120000), (["--interval", "1w 2d"], "Interval", 777600000),
    (["--approval-delay", "PT30S"], "ApprovalDelay", 30000),
    (["--approval-duration", "1s"], "ApprovalDuration", 1000),
    (["-H", "192.0.2.7"], "Host", "192.0.2.7"), (["--host", "web1.example"], "Host",
                                                 "web1.example"),
])
def test_every_setting_option_sets_its_property(argv, prop, value):
    (action,) = parse(*argv, "web1").actions
    assert (action.kind, action.prop, action.value) == (Kind.SET, prop, value)


def test_actions_keep_the_command_line_order():
    opts = parse("-i", "PT1M", "-e", "-t", "PT1H", "-b", "web1", "db")
    assert [(a.prop, a.value) for a in opts.actions] == [
        ("Interval", 60000), ("Enabled", True), ("Timeout", 3600000), ("LastCheckedOK", "")]
    assert opts.client == ["web1", "db"]


def test_long_options_may_be_abbreviated():
    assert parse("--ena", "--extended=PT1M", "web1").actions[0] == ENABLE


@pytest.mark.parametrize("first, second", [
    ("--enable", "--disable"), ("-e", "-d"), ("--start-checker", "--stop-checker"),
    ("--approve-by-default", "--deny-by-default"), ("--approve", "--deny"), ("-A", "-D"),
])
def test_mutually_exclusive_pairs_are_usage_errors(capsys, first, second):
    status, out, err = run(capsys, first, second, "web1")
    assert status == 2 and out == ""
    assert "not allowed with" in err


@pytest.mark.parametrize("argv, message", [
    (["-e"], "actions require client names or --all"),
    (["-V"], "actions require client names or --all"),
    (["-t", "PT1M"], "actions require client names or --all"),
    (["-v", "-e", "web1"], "--verbose cannot be combined with actions"),
    (["-v", "-a", "-d"], "--verbose cannot be combined with actions"),
    (["-j", "-v"], "--dump-json cannot be combined with --verbose or actions"),
    (["-j", "-e", "web1"], "--dump-json cannot be combined with --verbose or actions"),
    (["-a"], "--all requires an action"),
    (["-j", "-a"], "--all requires an action"),
    (["-V", "web1", "db"], "--is-enabled requires exactly one client name"),
    (["-r", "-e", "web1"], "--remove can only be combined with --deny"),
    (["-r", "-A", "web1"], "--remove can only be combined with --deny"),
    (["-r", "-r", "web1"], "--remove can only be combined with --deny"),
])
def test_usage_rules_exit_2_with_a_message(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert (status, out) == (2, "")
    assert err.startswith("usage: mandos-ctl")
    assert err.endswith(f"mandos-ctl: error: {message}\n")


@pytest.mark.parametrize("argv", [
    [], ["web1"], ["-v"], ["-v", "web1"], ["-j"], ["-j", "web1", "db"], ["-e", "web1"],
    ["-e", "-a"], ["-a", "-e", "web1"], ["-V", "web1"], ["-r", "web1"], ["-r", "-a"],
    ["-r", "-D", "web1"], ["-D", "-r", "-a"], ["--debug", "-j"], ["-e", "-i", "PT1M", "web1"],
])
def test_usage_allowed(argv):
    assert options.usage_problem(options.make_parser().parse_args(argv)) is None


def test_deviation_is_enabled_with_all_and_no_name_is_a_usage_error(capsys):
    # The original accepts it and tests whichever client the server lists first.
    status, _, err = run(capsys, "-V", "--all")
    assert status == 2
    assert "--is-enabled requires exactly one client name" in err


def test_deny_after_remove_runs_before_it():
    order = main.execution_order(parse("-r", "-D", "web1").actions)
    assert order == [DENY, REMOVE]
    order = main.execution_order(parse("-D", "-r", "web1").actions)
    assert order == [DENY, REMOVE]
    assert main.execution_order(parse("-e", "-i", "PT1M", "web1").actions)[0] == ENABLE


def test_help_exits_0(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert out.startswith("usage: mandos-ctl") and "--dump-json" in out


def test_deviation_version_is_ours(capsys):
    # The original prints "mandos-ctl 1.8.16".
    assert run(capsys, "--version") == (0, f"mandos-ctl {mandos.__version__}\n", "")


def test_unknown_option_is_a_usage_error(capsys):
    status, _, err = run(capsys, "--frobnicate")
    assert status == 2 and "unrecognized arguments" in err


# -- TIME ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, milliseconds", [
    ("PT5M", 300000), ("PT0S", 0), ("PT1S", 1000), ("P1W", 604800000), ("P3D", 259200000),
    ("P1DT3M20S", 86600000), ("PT1H30M", 5400000), ("P1M", 28 * 86400000),
    ("P1Y", 364 * 86400000), ("PT60M", 3600000), ("PT24H", 86400000),
    ("5m", 300000), ("7d", 604800000), ("60s", 60000), ("24h", 86400000), ("1w", 604800000),
    ("5m 30s", 330000), ("1w 2d 3h 4m 5s", 788645000), ("1w2d", 777600000),
    (" 10s ", 10000), ("1s1s", 2000), ("0s", 0),
])
def test_valid_times(text, milliseconds):
    assert durations.parse_time(text) == milliseconds


@pytest.mark.parametrize("text", [
    "P", "PT", "P1D2W", "P2W2H", "PT1S2M", "P1H2S", "pt5m", "PT1.5S", "1D", "5M", "5 m",
    "m", "5x", "1w 2", "five minutes", "-5m", "5m,", "５m",
])
def test_invalid_times(text):
    with pytest.raises(ValueError, match="invalid TIME"):
        durations.parse_time(text)


@pytest.mark.parametrize("text", ["300", "abc", ""])
def test_deviation_bare_digits_and_other_text_are_refused(capsys, text):
    # The original takes "300" as 300 ms and "abc" or "" as zero, which
    # disables a client at once when given as its timeout.
    status, out, err = run(capsys, "-t", text, "web1")
    assert (status, out) == (2, "")
    assert f"argument -t/--timeout: invalid TIME {text!r}" in err
    assert "RFC 3339" in err and "1w 2d" in err


def test_deviation_older_form_is_accepted_without_a_warning(capsys):
    # The original warns '... - Parsing as pre-1.6.1 interval instead'.
    opts = parse("-i", "1w2d", "web1")
    assert opts.actions[0].value == 777600000
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("option", ["--extended-timeout", "--interval",
                                    "--approval-delay", "--approval-duration"])
def test_every_time_option_refuses_bad_values(capsys, option):
    status, _, err = run(capsys, option, "300", "web1")
    assert status == 2 and "invalid TIME '300'" in err


@pytest.mark.parametrize("text", ["P99999999999Y", "999999999999w", "PT99999999999999999999S"])
def test_durations_too_long_to_represent_are_usage_errors(capsys, text):
    status, _, err = run(capsys, "--interval", text, "web1")
    assert status == 2 and f"invalid TIME {text!r}: too long" in err


def test_durations_beyond_1000_years_are_usage_errors(capsys):
    """The server refuses them as well; they would overflow its date arithmetic."""
    assert durations.parse_time("P365000D") == 365000 * 86_400_000
    status, _, err = run(capsys, "--timeout", "P365001D", "web1")
    assert status == 2 and "invalid TIME 'P365001D': longer than 1000 years" in err


# -- the secret ------------------------------------------------------------------------

SECRET = b"\x00top secret\xff\n-----BEGIN PGP MESSAGE-----"


def test_secret_is_read_as_bytes_and_never_shown(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    (action,) = parse("--secret", str(path), "web1").actions
    assert (action.kind, action.prop) == (Kind.SET, "Secret")
    assert bytes(action.value) == SECRET
    for text in (repr(action), str(action), repr(action.value), str(action.value),
                 repr(parse("-s", str(path), "web1"))):
        assert "top secret" not in text and "\\x00" not in text
    assert f"<secret, {len(SECRET)} bytes>" in repr(action)


def test_debug_line_of_a_secret_write_withholds_the_value():
    line = bus.describe_call("/clients/web1", bus.PROPERTIES_INTERFACE, "Set",
                             [bus.CLIENT_INTERFACE, "Secret", SECRET])
    assert "top secret" not in line
    assert line == ("D-Bus: se.recompile.Mandos:/clients/web1:org.freedesktop.DBus."
                    "Properties.Set('se.recompile.Mandos.Client', 'Secret', <secret withheld>)")


def test_debug_line_shows_other_values():
    from dbus_fast import Variant
    line = bus.describe_call("/clients/web1", bus.PROPERTIES_INTERFACE, "Set",
                             [bus.CLIENT_INTERFACE, "Interval", Variant("t", 60000)])
    assert line.endswith(".Set('se.recompile.Mandos.Client', 'Interval', 60000)")


def test_unreadable_secret_file_is_a_usage_error(capsys, tmp_path):
    status, _, err = run(capsys, "-s", str(tmp_path / "missing"), "web1")
    assert status == 2
    assert "argument -s/--secret: cannot read" in err and "No such file" in err


def test_every_writable_property_has_its_dbus_type():
    props = {action.prop for action in (ENABLE, BUMP_TIMEOUT, START_CHECKER,
                                        APPROVE_BY_DEFAULT)}
    props |= {"Checker", "Timeout", "ExtendedTimeout", "Interval", "ApprovalDelay",
              "ApprovalDuration", "Host", "Secret"}
    assert props == set(bus.PROPERTY_SIGNATURES)
    assert bus.PROPERTY_SIGNATURES["Secret"] == "ay"
    assert {bus.PROPERTY_SIGNATURES[p] for p in ("Timeout", "Interval")} == {"t"}


# -- selecting clients -----------------------------------------------------------------

CLIENTS = {"/clients/web1": {"Name": "web1"}, "/clients/db_server": {"Name": "db-server"},
           "/clients/a": {"Name": "a"}}


def test_no_names_select_all_clients_in_server_order():
    assert list(main.select(CLIENTS, [])) == ["/clients/web1", "/clients/db_server",
                                               "/clients/a"]


def test_names_select_exactly_in_the_order_given():
    assert list(main.select(CLIENTS, ["a", "web1", "a"])) == ["/clients/a", "/clients/web1"]


@pytest.mark.parametrize("name", ["nope", "db_server", "WEB1", "web"])
def test_unknown_client_name(name):
    with pytest.raises(main.ClientNotFound) as caught:
        main.select(CLIENTS, ["web1", name])
    assert str(caught.value) == f"Client not found on server: {name!r}"


# -- table -----------------------------------------------------------------------------


def client(name: str, **values) -> dict:
    """All 20 properties, as a freshly started enabled client has them."""
    base = {"Name": name, "Enabled": True, "Timeout": 300000, "LastCheckedOK": "",
            "Created": "2024-05-01T09:00:00", "Interval": 120000, "Host": "",
            "KeyID": "", "Fingerprint": "", "CheckerRunning": False,
            "LastEnabled": "2024-05-01T09:00:00", "ApprovalPending": False,
            "ApprovedByDefault": True, "LastApprovalRequest": "", "ApprovalDelay": 0,
            "ApprovalDuration": 1000, "Checker": "fping -q -- %(host)s",
            "ExtendedTimeout": 900000, "Expires": "2024-05-01T09:05:00.5",
            "LastCheckerStatus": -2}
    base.update(values)
    return base


def test_table_example_of_the_spec_with_trailing_padding():
    clients = [client("web1", LastCheckedOK="2024-05-01T10:00:00.123456"),
               client("db-server", Enabled=False, Timeout=93785000)]
    assert output.table(clients) == (
        "Name      Enabled Timeout    Last Successful Check     \n"
        "web1      Yes     00:05:00   2024-05-01T10:00:00.123456\n"
        "db-server No      1T02:03:05                           \n")


def test_columns_are_as_wide_as_their_headers_at_least():
    assert output.table([client("a")]) == (
        "Name Enabled Timeout  Last Successful Check\n"
        "a    Yes     00:05:00                      \n")


def test_verbose_table_has_all_columns_in_order():
    text = output.table([client("a", KeyID="AB", Fingerprint="CD", CheckerRunning=True,
                                LastCheckerStatus=0, ApprovalDelay=30000)], verbose=True)
    header, row, end = text.split("\n")
    assert end == ""
    assert header == (
        "Name Enabled Timeout  Last Successful Check Created             Interval Host "
        "Key ID Fingerprint Check Is Running Last Enabled        Approval Is Pending "
        "Approved By Default Last Approval Request Approval Delay Approval Duration "
        "Checker              Extended Timeout Expires               Last Checker Status")
    assert row == (
        "a    Yes     00:05:00                       2024-05-01T09:00:00 00:02:00      "
        "AB     CD          Yes              2024-05-01T09:00:00 No                  "
        "Yes                                       00:00:30       00:00:01          "
        "fping -q -- %(host)s 00:15:00         2024-05-01T09:05:00.5 0                  ")
    assert len(header) == len(row)


@pytest.mark.parametrize("milliseconds, text", [
    (0, "00:00:00"), (999, "00:00:00"), (1999, "00:00:01"), (300000, "00:05:00"),
    (3599000, "00:59:59"), (86399999, "23:59:59"), (86400000, "1T00:00:00"),
    (93785000, "1T02:03:05"), (1209600000, "14T00:00:00"), (360000000, "4T04:00:00"),
])
def test_duration_cells(milliseconds, text):
    assert output.duration_cell(milliseconds) == text
    assert output.cell("Interval", milliseconds) == text


@pytest.mark.parametrize("key, value, text", [
    ("Enabled", True, "Yes"), ("Enabled", False, "No"), ("ApprovalPending", True, "Yes"),
    ("LastCheckerStatus", -1, "-1"), ("LastCheckerStatus", 0, "0"), ("Expires", "", ""),
    ("Checker", "true", "true"), ("ExtendedTimeout", 900000, "00:15:00"),
])
def test_cells(key, value, text):
    assert output.cell(key, value) == text


def test_deviation_empty_server_gives_the_header_line_only():
    # The original fails with a traceback (max() of a single number).
    assert output.table([]) == "Name Enabled Timeout Last Successful Check\n"


# -- JSON ------------------------------------------------------------------------------


def test_json_dump_layout():
    clients = [client("web1", LastCheckedOK="2024-05-01T10:00:00.123456"),
               client("db-server", Enabled=False, Timeout=93785000, Expires="")]
    text = output.dump_json(clients)
    lines = text.split("\n")
    assert lines[:3] == ["{", '    "web1": {', '        "Name": "web1",']
    assert lines[3:6] == ['        "Enabled": true,', '        "Timeout": 300000,',
                          '        "LastCheckedOK": "2024-05-01T10:00:00.123456",']
    assert '        "LastCheckerStatus": -2' in lines
    assert lines[22:24] == ["    },", '    "db-server": {']
    assert '        "Expires": "",' in lines
    assert lines[-3:] == ["    }", "}", ""]
    assert not any(line.endswith(" ") for line in lines)
    data = json.loads(text)
    assert list(data) == ["web1", "db-server"]
    assert list(data["web1"]) == list(output.ALL_KEYS)
    assert data["db-server"]["Timeout"] == 93785000


def test_json_dump_of_no_clients():
    assert output.dump_json([]) == "{}\n"


def test_json_dump_drops_properties_that_are_not_shown():
    data = json.loads(output.dump_json([client("a", ObjectPath="/clients/a")]))
    assert "ObjectPath" not in data["a"] and len(data["a"]) == 20


# -- --check ---------------------------------------------------------------------------


def test_deviation_check_runs_the_self_check(capsys):
    # The original runs its own unit tests.
    status, out, _ = run(capsys, "--check")
    lines = out.splitlines()
    assert status == 0
    assert len(lines) == len(selfcheck.CHECKS)
    assert all(line.startswith("ok   ") for line in lines)


def test_check_reports_a_failure(capsys, monkeypatch):
    monkeypatch.setattr(output, "table", lambda clients, verbose=False: "broken\n")
    status, out, _ = run(capsys, "--check")
    assert status == 1
    assert "FAIL table layout and duration cells (SERVER.md §15.2 example): got 'broken\\n'" \
        in out
    assert out.count("ok   ") == len(selfcheck.CHECKS) - 1


# -- no bus ----------------------------------------------------------------------------


def test_unreachable_bus_is_a_message_and_exit_1(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/nothing")
    status, out, err = run(capsys, "web1")
    assert (status, out) == (1, "")
    assert err.startswith("Could not connect to Mandos server: ")
    assert err.count("\n") == 1
