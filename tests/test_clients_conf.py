"""clients.conf: syntax, expansion, per-client settings, checker rendering (SERVER.md §4)."""

from __future__ import annotations

import base64
import datetime
import logging
import sys
import textwrap
from pathlib import Path

import pytest

from mandos.server import clients_conf
from mandos.server.client import Client
from mandos.server.clients_conf import ClientConfig, ConfigError, render_checker

sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

td = datetime.timedelta
KEY = "a" * 64
SECRET = b"the secret \x00\xff"
B64 = base64.b64encode(SECRET).decode()
MINIMAL = f"key_id = {KEY}\nsecret = {B64}\n"


def parse(text: str) -> list[ClientConfig]:
    return clients_conf.parse(textwrap.dedent(text))


def one(text: str) -> ClientConfig:
    (client,) = parse(text)
    return client


def fatal(text: str) -> str:
    with pytest.raises(ConfigError) as error:
        parse(text)
    return str(error.value)


# --- syntax (§4.1) -------------------------------------------------------------------

def test_section_name_is_the_client_name():
    assert one(f"[my client.example]\n{MINIMAL}").name == "my client.example"


def test_clients_come_in_file_order():
    names = [c.name for c in parse(f"[b]\n{MINIMAL}[a]\n{MINIMAL}[c]\n{MINIMAL}")]
    assert names == ["b", "a", "c"]


def test_section_names_are_case_sensitive():
    assert [c.name for c in parse(f"[Host]\n{MINIMAL}[host]\n{MINIMAL}")] == ["Host", "host"]


def test_default_values_reach_every_client():
    clients = parse(f"[DEFAULT]\nhost = shared\ninterval = PT1M\n[a]\n{MINIMAL}[b]\n{MINIMAL}")
    assert [(c.host, c.interval) for c in clients] == [("shared", td(minutes=1))] * 2


def test_client_value_overrides_default():
    clients = parse(f"[DEFAULT]\nhost = shared\n[a]\n{MINIMAL}host = own\n[b]\n{MINIMAL}")
    assert [c.host for c in clients] == ["own", "shared"]


def test_only_upper_case_default_is_the_default_section():
    clients = parse(f"[default]\n{MINIMAL}host = x\n[a]\n{MINIMAL}")
    assert [(c.name, c.host) for c in clients] == [("default", "x"), ("a", "")]


def test_default_section_alone_gives_no_clients():
    assert parse(f"[DEFAULT]\n{MINIMAL}") == []


def test_keys_are_case_insensitive():
    client = one(f"[a]\nKEY_ID = {KEY}\nSecret = {B64}\nHost = h\nInterval = PT3M\n")
    assert (client.key_id, client.secret, client.host) == (KEY.upper(), SECRET, "h")
    assert client.interval == td(minutes=3)


def test_colon_separates_key_and_value():
    client = one(f"[a]\nkey_id: {KEY}\nsecret: {B64}\nhost:h\n")
    assert (client.key_id, client.host) == (KEY.upper(), "h")


def test_white_space_around_key_and_value_is_stripped():
    assert one(f"[a]\n{MINIMAL}host   =    spaced   \n").host == "spaced"


def test_continuation_lines_are_joined_with_newlines():
    assert one(f"[a]\n{MINIMAL}host = one\n  two\n\tthree\n").host == "one\ntwo\nthree"


def test_blank_lines_inside_a_value_are_kept_trailing_ones_dropped():
    client = one(f"[a]\n{MINIMAL}checker = one\n\n  two\n\n\n[b]\nhost = x\n")
    assert client.checker_command == "one\n\ntwo"


def test_whole_line_comments():
    client = one(f"# a comment\n; another\n[a]\n{MINIMAL}  # indented comment\nhost = h\n"
                 "; host = not this\n")
    assert client.host == "h"


def test_comment_lines_inside_a_continued_value_are_skipped():
    assert one(f"[a]\n{MINIMAL}host = one\n  # not part\n  two\n").host == "one\ntwo"


@pytest.mark.parametrize("value", ["h # not a comment", "h ; not a comment"])
def test_no_end_of_line_comments(value):
    assert one(f"[a]\n{MINIMAL}host = {value}\n").host == value


def test_duplicate_section_is_fatal():
    assert "a" in fatal(f"[a]\n{MINIMAL}[b]\n{MINIMAL}[a]\n{MINIMAL}")


def test_duplicate_key_is_fatal():
    fatal(f"[a]\n{MINIMAL}host = one\nhost = two\n")


def test_duplicate_key_differing_in_case_is_fatal():
    fatal(f"[a]\n{MINIMAL}host = one\nHOST = two\n")


def test_keys_before_any_section_are_fatal():
    fatal(f"host = x\n[a]\n{MINIMAL}")


def test_syntax_error_names_the_source():
    with pytest.raises(ConfigError, match="my.conf"):
        clients_conf.parse("garbage\n", source="my.conf")


def test_unknown_keys_are_ignored_but_kept_in_settings():
    client = one(f"[a]\n{MINIMAL}ssh_fingerprint = SHA256:xyz\n")
    assert client.settings["ssh_fingerprint"] == "SHA256:xyz"


# --- load-time expansion (§4.2) ----------------------------------------------------------

def test_expansion_from_the_same_section():
    assert one(f"[a]\n{MINIMAL}host = h\nchecker = ping %(host)s\n").checker_command == "ping h"


def test_expansion_from_default():
    client = one(f"[DEFAULT]\ndomain = example.org\n[a]\n{MINIMAL}host = a.%(domain)s\n")
    assert client.host == "a.example.org"


def test_expansion_in_default_uses_the_client_value():
    clients = parse(f"[DEFAULT]\nhost = d\nchecker = c %(host)s\n[a]\n{MINIMAL}host = s\n"
                    f"[b]\n{MINIMAL}")
    assert [c.checker_command for c in clients] == ["c s", "c d"]


def test_expansion_is_recursive():
    client = one(f"[a]\n{MINIMAL}x = X\ny = %(x)sY\nhost = %(y)sZ\n")
    assert client.host == "XYZ"


def test_expansion_deeper_than_the_limit_is_fatal():
    chain = "".join(f"k{i} = %(k{i + 1})s\n" for i in range(12)) + "k12 = end\n"
    assert "[a]" in fatal(f"[a]\n{MINIMAL}{chain}host = %(k0)s\n")


def test_unknown_keys_are_available_for_expansion():
    client = one(f"[a]\n{MINIMAL}ssh_fingerprint = fp\nchecker = check %(ssh_fingerprint)s\n")
    assert client.checker_command == "check fp"


def test_double_percent_is_a_literal_percent():
    assert one(f"[a]\n{MINIMAL}host = 100%%\n").host == "100%"


def test_double_percent_keeps_a_run_time_reference():
    client = one(f"[a]\n{MINIMAL}checker = ping %%(host)s\n")
    assert client.checker_command == "ping %(host)s"


def test_missing_key_in_expansion_is_fatal():
    assert "[a]" in fatal(f"[a]\n{MINIMAL}checker = ping %(nosuch)s\n")


@pytest.mark.parametrize("value", ["100%", "%x", "a % b", "%(host)"])
def test_bad_percent_is_fatal(value):
    assert "[a]" in fatal(f"[a]\n{MINIMAL}comment = {value}\n")


def test_built_in_default_checker_becomes_fping():
    assert one(f"[a]\n{MINIMAL}").checker_command == "fping -q -- %(host)s"


def test_expanded_settings_are_kept_as_text_without_the_secret():
    client = one(f"[DEFAULT]\nd = D\n[a]\n{MINIMAL}host = %(d)s\n")
    assert client.settings["host"] == "D"
    assert client.settings["d"] == "D"
    assert client.settings["checker"] == "fping -q -- %(host)s"
    assert client.settings["interval"] == "PT2M"
    assert "secret" not in client.settings


# --- per-client options (§4.3) -------------------------------------------------------------

def test_defaults_for_every_option():
    client = one(f"[a]\n{MINIMAL}")
    assert client.host == ""
    assert client.checker_command == "fping -q -- %(host)s"
    assert client.interval == td(minutes=2)
    assert client.timeout == td(minutes=5)
    assert client.extended_timeout == td(minutes=15)
    assert client.approval_delay == td(0)
    assert client.approval_duration == td(seconds=1)
    assert client.approved_by_default is True
    assert client.enabled is True
    assert client.fingerprint == ""
    assert client.secfile is None


def test_every_option_is_read():
    client = one(f"""\
        [a]
        {MINIMAL.splitlines()[0]}
        {MINIMAL.splitlines()[1]}
        fingerprint = 474d 4b94
        host = h.example
        checker = true
        interval = PT10S
        timeout = P1DT1H
        extended_timeout = PT30M
        approval_delay = PT20S
        approval_duration = PT2S
        approved_by_default = no
        enabled = false
        """)
    assert (client.fingerprint, client.host, client.checker_command) == (
        "474D4B94", "h.example", "true")
    assert (client.interval, client.timeout, client.extended_timeout) == (
        td(seconds=10), td(days=1, hours=1), td(minutes=30))
    assert (client.approval_delay, client.approval_duration) == (td(seconds=20), td(seconds=2))
    assert (client.approved_by_default, client.enabled) == (False, False)


def test_key_id_spaces_removed_and_upper_cased():
    client = one(f"[a]\nkey_id = ab cd  ef 01\nsecret = {B64}\n")
    assert client.key_id == "ABCDEF01"


def test_fingerprint_spaces_removed_and_upper_cased():
    client = one(f"[a]\nfingerprint = 474d 4b94 9787\nsecret = {B64}\n")
    assert (client.fingerprint, client.key_id) == ("474D4B949787", "")


def test_section_without_key_id_or_fingerprint_is_skipped_with_an_error(caplog):
    with caplog.at_level(logging.ERROR):
        clients = parse(f"[lost]\nsecret = {B64}\nkey_id =\nfingerprint =  \n[kept]\n{MINIMAL}")
    assert [c.name for c in clients] == ["kept"]
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "lost" in record.getMessage()


def test_skipped_section_needs_no_secret():
    assert parse("[lost]\nhost = x\n") == []


def test_secret_is_base64_across_continuation_lines():
    folded = "\n".join("    " + B64[i:i + 8] for i in range(0, len(B64), 8))
    client = one(f"[a]\nkey_id = {KEY}\nsecret =\n{folded}\n")
    assert client.secret == SECRET


def test_secret_ignores_characters_outside_the_base64_alphabet():
    client = one(f"[a]\nkey_id = {KEY}\nsecret = {B64[:4]} *{B64[4:]}\n")
    assert client.secret == SECRET


def test_broken_base64_is_fatal():
    assert "[a]" in fatal(f"[a]\nkey_id = {KEY}\nsecret = abcde\n")


def test_secfile_expands_tilde_and_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MANDOS_SECRETS", str(tmp_path / "vars"))
    (tmp_path / "vars").mkdir()
    (tmp_path / "home.bin").write_bytes(b"from home\n")
    (tmp_path / "vars" / "var.bin").write_bytes(b"\x00from var")
    home, var = parse(f"[h]\nkey_id = {KEY}\nsecfile = ~/home.bin\n"
                      f"[v]\nkey_id = {KEY}\nsecfile = $MANDOS_SECRETS/var.bin\n")
    assert (home.secfile, var.secfile) == (str(tmp_path / "home.bin"),
                                           str(tmp_path / "vars" / "var.bin"))
    assert home.secret == b"" and var.secret == b""  # read later
    clients_conf.load_secret(home)
    clients_conf.load_secret(var)
    assert (home.secret, var.secret) == (b"from home\n", b"\x00from var")


def test_secret_wins_over_secfile(tmp_path):
    client = one(f"[a]\n{MINIMAL}secfile = {tmp_path / 'nothing'}\n")
    assert client.secret == SECRET and client.secfile is None
    clients_conf.load_secret(client)
    assert client.secret == SECRET


def test_unreadable_secfile_is_fatal_when_loaded(tmp_path):
    client = one(f"[a]\nkey_id = {KEY}\nsecfile = {tmp_path / 'missing'}\n")
    with pytest.raises(ConfigError, match=r"\[a\]"):
        clients_conf.load_secret(client)


def test_neither_secret_nor_secfile_is_fatal():
    assert "[a]" in fatal(f"[a]\nkey_id = {KEY}\n")


@pytest.mark.parametrize("key", ["enabled", "approved_by_default"])
@pytest.mark.parametrize("value", ["maybe", "", "2"])
def test_bad_boolean_is_fatal_naming_the_section(key, value):
    message = fatal(f"[ok]\n{MINIMAL}[bad one]\n{MINIMAL}{key} = {value}\n")
    assert "[bad one]" in message


@pytest.mark.parametrize("value", ["1", "yes", "TRUE", "on", "0", "no", "False", "OFF"])
def test_booleans(value):
    expected = value.lower() in ("1", "yes", "true", "on")
    client = one(f"[a]\n{MINIMAL}enabled = {value}\napproved_by_default = {value}\n")
    assert (client.enabled, client.approved_by_default) == (expected, expected)


@pytest.mark.parametrize("key", ["timeout", "extended_timeout", "interval", "approval_delay",
                                 "approval_duration"])
@pytest.mark.parametrize("value", ["5 minutes", "1w2d", "PT1.5S", "pt5m", "P3000000D"])
def test_bad_duration_is_fatal_naming_the_section(key, value):
    assert "[bad]" in fatal(f"[bad]\n{MINIMAL}{key} = {value}\n")


def test_legacy_durations_are_accepted():
    client = one(f"[a]\n{MINIMAL}interval = 1m 30s\ntimeout = 1w 2d\napproval_delay =\n")
    assert (client.interval, client.timeout, client.approval_delay) == (
        td(seconds=90), td(days=9), td(0))


def test_repr_never_shows_the_secret():
    client = one(f"[a]\n{MINIMAL}")
    assert B64 not in repr(client) and repr(SECRET) not in repr(client)


def test_missing_file_is_no_clients_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert clients_conf.read_text(str(tmp_path / "clients.conf")) is None
    assert "No clients defined" in caplog.text


def test_read_text_reads_the_file(tmp_path):
    (tmp_path / "clients.conf").write_text(f"[a]\n{MINIMAL}")
    assert clients_conf.read_text(str(tmp_path / "clients.conf")) == f"[a]\n{MINIMAL}"


# --- run-time checker rendering (§4.2) ------------------------------------------------------

@pytest.mark.parametrize("value, rendered", [
    ("plain.example", "plain.example"),
    ("a-b.c@d%e+f=g:h,i/j_k", "a-b.c@d%e+f=g:h,i/j_k"),
    ("two words", "'two words'"),
    ("it's", "'it'\"'\"'s'"),
    ("", "''"),
    ("$(reboot)", "'$(reboot)'"),
    ("a;b", "'a;b'"),
    ("ü", "'ü'"),
])
def test_every_value_is_shell_quoted(value, rendered):
    assert render_checker("ping %(host)s", {"host": value}) == f"ping {rendered}"


@pytest.mark.parametrize("value, rendered", [
    (td(minutes=5), "0:05:00"),
    (td(days=1, hours=2, minutes=3, seconds=4), "'1 day, 2:03:04'"),
    (td(days=2), "'2 days, 0:00:00'"),
    (datetime.datetime(2024, 1, 2, 3, 4, 5, 6), "'2024-01-02 03:04:05.000006'"),
    (datetime.datetime(2024, 1, 2, 3, 4, 5), "'2024-01-02 03:04:05'"),
    (True, "True"),
    (False, "False"),
    (None, "None"),
    (42, "42"),
])
def test_python_renderings(value, rendered):
    assert render_checker("%(x)s", {"x": value}) == rendered


def test_unknown_attribute_is_a_key_error():
    with pytest.raises(KeyError):
        render_checker("ping %(secret)s", {"host": "h"})


def test_literal_percent_in_a_checker_needs_four_in_the_file():
    client = one(f"[a]\n{MINIMAL}host = h\nchecker = echo 100%%%% %%(host)s\n")
    assert render_checker(client.checker_command, {"host": "h"}) == "echo 100% h"


ALLOWED = ("approval_delay", "approval_duration", "created", "enabled", "expires", "key_id",
           "fingerprint", "host", "interval", "last_approval_request", "last_checked_ok",
           "last_enabled", "name", "timeout")


def test_every_allowed_attribute_of_a_client():
    config = one(f"[my client]\n{MINIMAL}host = h x\nfingerprint = ff\n")
    client = Client(config, checker_runner=None,
                    now=lambda: datetime.datetime(2024, 1, 2, 3, 4, 5, 6))
    template = " ".join(f"{name}=%({name})s" for name in ALLOWED)
    assert render_checker(template, client.checker_attributes()) == (
        "approval_delay=0:00:00 approval_duration=0:00:01 "
        "created='2024-01-02 03:04:05.000006' enabled=True "
        "expires='2024-01-02 03:09:05.000006' "
        f"key_id={KEY.upper()} fingerprint=FF host='h x' interval=0:02:00 "
        "last_approval_request=None last_checked_ok=None "
        "last_enabled='2024-01-02 03:04:05.000006' name='my client' timeout=0:05:00")


@pytest.mark.parametrize("name", ["secret", "checker_command", "extended_timeout",
                                  "approved_by_default", "last_checker_status",
                                  "dbus_object_path"])
def test_other_client_attributes_are_not_allowed(name):
    client = Client(one(f"[a]\n{MINIMAL}"), checker_runner=None)
    with pytest.raises(KeyError):
        render_checker(f"%({name})s", client.checker_attributes())


def test_dbus_object_path_when_d_bus_is_on():
    client = Client(one(f"[a]\n{MINIMAL}"), checker_runner=None)
    client.extra_checker_attributes["dbus_object_path"] = "/clients/a"
    assert render_checker("%(dbus_object_path)s", client.checker_attributes()) == "/clients/a"


# --- a section written by the original mandos-keygen -------------------------------------------

@pytest.mark.interop
def test_section_from_the_original_keygen_parses(debian_peers, tmp_path):
    from original_server import original_keygen

    keys = tmp_path / "keys"
    keys.mkdir()
    original_keygen(keys, "--force")
    passfile = tmp_path / "pass"
    passfile.write_bytes(b"pass phrase\x01")
    section = original_keygen(keys, "--passfile", str(passfile), "--no-ssh").stdout

    lines = section.splitlines()
    key_id = next(line.split("=", 1)[1].strip() for line in lines if line.startswith("key_id"))
    fingerprint = next(line.split("=", 1)[1].strip() for line in lines
                       if line.startswith("fingerprint"))
    start = next(i for i, line in enumerate(lines) if line.startswith("secret"))
    body = []
    for line in lines[start + 1:]:
        if not line.startswith((" ", "\t")):
            break
        body.append(line.strip())
    by_hand = base64.b64decode("".join(body), validate=True)

    client = one(section)
    assert client.key_id == key_id.upper() and len(client.key_id) == 64
    assert client.fingerprint == fingerprint.replace(" ", "").upper()
    assert client.secret == by_hand and len(by_hand) > 100
