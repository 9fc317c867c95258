"""The server's command line and mandos.conf (SERVER.md §2, §3)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mandos
from mandos.server import settings
from mandos.server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
PRIORITY = "SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL:+VERS-TLS1.3:%PROFILE_ULTRA"


@pytest.fixture
def configdir(tmp_path: Path) -> Path:
    return tmp_path


def load(configdir: Path, *argv: str, conf: str | None = None) -> ServerSettings:
    """Write ``conf`` as mandos.conf (if given) and load the settings."""
    if conf is not None:
        (configdir / "mandos.conf").write_text(textwrap.dedent(conf))
    return settings.load([*argv, "--configdir", str(configdir)])


def usage_error(capsys, configdir: Path, *argv: str, conf: str | None = None) -> str:
    """Load, expecting exit status 2; return what was printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        load(configdir, *argv, conf=conf)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# --- defaults ------------------------------------------------------------------------

def test_missing_file_means_all_defaults(configdir):
    result = load(configdir)
    assert result == ServerSettings(configdir=str(configdir), pidfile=result.pidfile)
    assert (result.interface, result.address, result.port, result.socket) == ("", "", None, None)
    assert (result.debug, result.foreground, result.check) == (False, False, False)
    assert (result.use_dbus, result.use_ipv6, result.restore, result.zeroconf) == (
        True, True, True, True)
    assert result.servicename == "Mandos"
    assert result.statedir == "/var/lib/mandos"
    assert result.debuglevel == ""
    assert result.handshake_timeout == 30
    assert result.max_handshakes == 64


def test_default_priority_is_the_raw_public_key_string(configdir):
    assert load(configdir).priority == PRIORITY
    assert settings.DEFAULT_PRIORITY == PRIORITY


def test_default_configdir_is_etc_mandos():
    assert ServerSettings().configdir == "/etc/mandos"
    assert settings._parser().parse_args([]).configdir == "/etc/mandos"


def test_empty_file_means_all_defaults(configdir):
    result = load(configdir, conf="")
    assert result == ServerSettings(configdir=str(configdir), pidfile=result.pidfile)
    assert load(configdir, conf="[DEFAULT]\n") == result


def test_pidfile_default_is_run_mandos_pid(monkeypatch):
    monkeypatch.setattr(os.path, "isdir", lambda path: path == "/run")
    assert settings.default_pidfile() == "/run/mandos.pid"


def test_pidfile_default_is_var_run_without_run(monkeypatch):
    monkeypatch.setattr(os.path, "isdir", lambda path: False)
    assert settings.default_pidfile() == "/var/run/mandos.pid"
    assert ServerSettings().pidfile == "/var/run/mandos.pid"


# --- every command-line option ---------------------------------------------------------

@pytest.mark.parametrize("argv, field, value", [
    (["--interface", "eth0"], "interface", "eth0"),
    (["-i", "eth1"], "interface", "eth1"),
    (["--address", "::1"], "address", "::1"),
    (["-a", "::FFFF:192.0.2.1"], "address", "::FFFF:192.0.2.1"),
    (["--port", "4711"], "port", 4711),
    (["-p", "1"], "port", 1),
    (["--port=65535"], "port", 65535),
    (["--check"], "check", True),
    (["--debug"], "debug", True),
    (["--debuglevel", "INFO"], "debuglevel", "INFO"),
    (["--priority", "NORMAL:%COMPAT"], "priority", "NORMAL:%COMPAT"),
    (["--servicename", "Other"], "servicename", "Other"),
    (["--no-dbus"], "use_dbus", False),
    (["--no-ipv6"], "use_ipv6", False),
    (["--no-restore"], "restore", False),
    (["--socket", "7"], "socket", 7),
    (["--statedir", "/tmp/state"], "statedir", "/tmp/state"),
    (["--foreground"], "foreground", True),
    (["--no-zeroconf", "--port", "9"], "zeroconf", False),
    (["--handshake-timeout", "2.5"], "handshake_timeout", 2.5),
    (["--max-handshakes", "3"], "max_handshakes", 3),
    (["--pidfile", "/tmp/x.pid"], "pidfile", "/tmp/x.pid"),
])
def test_every_command_line_option(configdir, argv, field, value):
    assert getattr(load(configdir, *argv), field) == value


def test_configdir_option_says_where_mandos_conf_is(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "mandos.conf").write_text("[DEFAULT]\nservicename = A\n")
    result = settings.load(["--configdir", str(tmp_path / "a")])
    assert (result.configdir, result.servicename) == (str(tmp_path / "a"), "A")


@pytest.mark.parametrize("argv, field, value", [
    (["--inter", "eth0"], "interface", "eth0"),
    (["--addr=::1"], "address", "::1"),
    (["--po", "80"], "port", 80),
    (["--debugl", "error"], "debuglevel", "ERROR"),
    (["--prio", "NONE"], "priority", "NONE"),
    (["--serv", "X"], "servicename", "X"),
    (["--no-d"], "use_dbus", False),
    (["--no-i"], "use_ipv6", False),
    (["--no-r"], "restore", False),
    (["--so", "5"], "socket", 5),
    (["--state", "/s"], "statedir", "/s"),
    (["--fore"], "foreground", True),
    (["--no-z", "-p", "1"], "zeroconf", False),
    (["--hand", "1"], "handshake_timeout", 1.0),
    (["--max", "2"], "max_handshakes", 2),
    (["--pid", "/p"], "pidfile", "/p"),
])
def test_long_options_may_be_abbreviated(configdir, argv, field, value):
    assert getattr(load(configdir, *argv), field) == value


def test_ambiguous_abbreviation_is_a_usage_error(capsys, configdir):
    assert "ambiguous" in usage_error(capsys, configdir, "--no-")


def test_unknown_option_is_a_usage_error(capsys, configdir):
    assert "--frobnicate" in usage_error(capsys, configdir, "--frobnicate")


@pytest.mark.parametrize("argv", [["--port", "x"], ["--port", ""], ["--port", "-1"],
                                  ["--port", "65536"], ["--socket", "x"], ["--socket", "-1"],
                                  ["--port"]])
def test_bad_port_or_socket_on_the_command_line_is_a_usage_error(capsys, configdir, argv):
    usage_error(capsys, configdir, *argv)


@pytest.mark.parametrize("value", ["0", "-1", "x", "nan", "inf", ""])
def test_handshake_timeout_must_be_positive_seconds(capsys, configdir, value):
    assert "handshake-timeout" in usage_error(capsys, configdir, "--handshake-timeout", value)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "x"])
def test_max_handshakes_must_be_a_positive_integer(capsys, configdir, value):
    assert "max-handshakes" in usage_error(capsys, configdir, "--max-handshakes", value)


def test_version_prints_mandos_and_the_version(capsys, configdir):
    with pytest.raises(SystemExit) as exit_info:
        load(configdir, "--version")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"mandos {mandos.__version__}\n"


def test_short_version_option(capsys, configdir):
    with pytest.raises(SystemExit) as exit_info:
        load(configdir, "-v")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("mandos ")


def test_help_exits_0_and_documents_the_added_options(capsys, configdir):
    with pytest.raises(SystemExit) as exit_info:
        load(configdir, "--help")
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for option in ("--handshake-timeout", "--max-handshakes", "--pidfile", "--no-zeroconf",
                   "--socket", "--debuglevel"):
        assert option in out
    assert "default: 30" in out and "default: 64" in out


# --- mandos.conf ---------------------------------------------------------------------

@pytest.mark.parametrize("line, field, value", [
    ("interface = eth0", "interface", "eth0"),
    ("address = ::1", "address", "::1"),
    ("port = 4711", "port", 4711),
    ("debug = true", "debug", True),
    ("priority = NORMAL", "priority", "NORMAL"),
    ("servicename = Office", "servicename", "Office"),
    ("use_dbus = false", "use_dbus", False),
    ("use_ipv6 = no", "use_ipv6", False),
    ("debuglevel = info", "debuglevel", "INFO"),
    ("restore = off", "restore", False),
    ("socket = 9", "socket", 9),
    ("statedir = /srv/state", "statedir", "/srv/state"),
    ("foreground = yes", "foreground", True),
    ("zeroconf = 0\nport = 1", "zeroconf", False),
])
def test_every_file_key(configdir, line, field, value):
    assert getattr(load(configdir, conf=f"[DEFAULT]\n{line}\n"), field) == value


def test_file_keys_are_case_insensitive_and_accept_colon(configdir):
    result = load(configdir, conf="[DEFAULT]\nPort: 12\nServiceName=X\n")
    assert (result.port, result.servicename) == (12, "X")


@pytest.mark.parametrize("argv, line, field, value", [
    (["--interface", "eth1"], "interface = eth0", "interface", "eth1"),
    (["--address", "::2"], "address = ::1", "address", "::2"),
    (["--port", "2"], "port = 1", "port", 2),
    (["--priority", "B"], "priority = A", "priority", "B"),
    (["--servicename", "B"], "servicename = A", "servicename", "B"),
    (["--debuglevel", "error"], "debuglevel = info", "debuglevel", "ERROR"),
    (["--statedir", "/b"], "statedir = /a", "statedir", "/b"),
    (["--socket", "4"], "socket = 3", "socket", 4),
    (["--debug"], "debug = false", "debug", True),
    (["--foreground"], "foreground = false", "foreground", True),
    (["--no-dbus"], "use_dbus = true", "use_dbus", False),
    (["--no-ipv6"], "use_ipv6 = true", "use_ipv6", False),
    (["--no-restore"], "restore = true", "restore", False),
    (["--no-zeroconf", "-p", "3"], "zeroconf = true", "zeroconf", False),
])
def test_command_line_wins_over_the_file(configdir, argv, line, field, value):
    assert getattr(load(configdir, *argv, conf=f"[DEFAULT]\n{line}\n"), field) == value


@pytest.mark.parametrize("line, field, value", [
    ("debug = true", "debug", True), ("foreground = true", "foreground", True),
    ("use_dbus = false", "use_dbus", False), ("use_ipv6 = false", "use_ipv6", False),
    ("restore = false", "restore", False),
])
def test_file_value_stands_when_the_command_line_is_silent(configdir, line, field, value):
    assert getattr(load(configdir, "--port", "1", conf=f"[DEFAULT]\n{line}\n"), field) == value


@pytest.mark.parametrize("text, value", [
    ("1", True), ("yes", True), ("true", True), ("on", True), ("YES", True), ("True", True),
    ("On", True), ("0", False), ("no", False), ("false", False), ("off", False),
    ("FALSE", False), ("No", False),
])
def test_booleans_accepted(configdir, text, value):
    result = load(configdir, "--port", "1", conf=f"[DEFAULT]\nuse_dbus = {text}\n"
                  f"restore = {text}\nzeroconf = {text}\nuse_ipv6 = {text}\n")
    assert (result.use_dbus, result.restore, result.zeroconf, result.use_ipv6) == (value,) * 4


@pytest.mark.parametrize("key", ["debug", "use_dbus", "use_ipv6", "restore", "foreground",
                                 "zeroconf"])
@pytest.mark.parametrize("text", ["maybe", "2", "", "y", "enabled"])
def test_booleans_rejected(capsys, configdir, key, text):
    err = usage_error(capsys, configdir, conf=f"[DEFAULT]\n{key} = {text}\n")
    assert key in err and "boolean" in err


@pytest.mark.parametrize("line", ["port = x", "port = 1.5", "port = -1", "port = 65536",
                                  "socket = x", "socket = -2", "socket = 0x3"])
def test_bad_port_or_socket_in_the_file_is_fatal(capsys, configdir, line):
    err = usage_error(capsys, configdir, conf=f"[DEFAULT]\n{line}\n")
    assert line.split()[0] in err


def test_empty_port_and_socket_in_the_file_mean_unset(configdir):
    result = load(configdir, conf="[DEFAULT]\nport =\nsocket =\n")
    assert (result.port, result.socket) == (None, None)


def test_port_and_socket_are_integers(configdir):
    result = load(configdir, conf="[DEFAULT]\nport = 0080\nsocket = 3\n")
    assert (result.port, result.socket) == (80, 3)


def test_sections_other_than_default_are_ignored(configdir):
    result = load(configdir, conf="""\
        [DEFAULT]
        servicename = Used
        [server]
        port = 99
        servicename = Ignored
        [default]
        interface = eth9
        """)
    assert (result.servicename, result.port, result.interface) == ("Used", None, "")


def test_unknown_keys_are_ignored(configdir):
    result = load(configdir, conf="[DEFAULT]\nfrobnicate = yes\nhandshake_timeout = 1\n"
                  "pidfile = /x\n")
    assert result.handshake_timeout == 30
    assert result.pidfile != "/x"


def test_keys_before_any_section_are_fatal(capsys, configdir):
    usage_error(capsys, configdir, conf="port = 1\n")


def test_duplicate_key_is_fatal(capsys, configdir):
    usage_error(capsys, configdir, conf="[DEFAULT]\nport = 1\nport = 2\n")


def test_unreadable_file_is_fatal(capsys, configdir):
    (configdir / "mandos.conf").mkdir()
    assert "mandos.conf" in usage_error(capsys, configdir)


def test_percent_in_priority_is_taken_literally(configdir):
    result = load(configdir, conf="[DEFAULT]\npriority = NORMAL:%PROFILE_ULTRA:%(x)s:%%\n")
    assert result.priority == "NORMAL:%PROFILE_ULTRA:%(x)s:%%"


def test_string_values_are_taken_literally(configdir):
    result = load(configdir, conf="[DEFAULT]\nservicename = 100% %(port)s\n")
    assert result.servicename == "100% %(port)s"


def test_comments_are_not_values(configdir):
    result = load(configdir, conf="[DEFAULT]\n# port = 1\n; servicename = X\n")
    assert (result.port, result.servicename) == (None, "Mandos")


# --- derived rules ---------------------------------------------------------------------

def test_debug_implies_foreground(configdir):
    assert load(configdir, "--debug").foreground is True


def test_debug_in_the_file_implies_foreground(configdir):
    assert load(configdir, conf="[DEFAULT]\ndebug = yes\nforeground = no\n").foreground


@pytest.mark.parametrize("argv, conf, level", [
    ([], "", logging.WARNING),
    (["--debuglevel", "info"], "", logging.INFO),
    ([], "debuglevel = Critical", logging.CRITICAL),
    (["--debug", "--debuglevel", "error"], "", logging.DEBUG),
    ([], "debug = on\ndebuglevel = error", logging.DEBUG),
])
def test_log_level_is_warning_debuglevel_or_debug(configdir, argv, conf, level):
    assert load(configdir, *argv, conf=f"[DEFAULT]\n{conf}\n").log_level == level


def test_unknown_debuglevel_is_a_usage_error(capsys, configdir):
    assert "LOUD" in usage_error(capsys, configdir, "--debuglevel", "LOUD")


def test_unknown_debuglevel_in_the_file_is_fatal(capsys, configdir):
    assert "debuglevel" in usage_error(capsys, configdir, conf="[DEFAULT]\ndebuglevel = x\n")


def test_no_zeroconf_needs_port_or_socket(capsys, configdir):
    assert "needs port or socket" in usage_error(capsys, configdir, "--no-zeroconf")


def test_no_zeroconf_from_the_file_needs_port_or_socket(capsys, configdir):
    usage_error(capsys, configdir, conf="[DEFAULT]\nzeroconf = false\n")


def test_no_zeroconf_port_zero_is_not_enough(capsys, configdir):
    usage_error(capsys, configdir, "--no-zeroconf", "--port", "0")


@pytest.mark.parametrize("argv, conf", [
    (["--no-zeroconf", "--port", "1"], ""),
    (["--no-zeroconf", "--socket", "0"], ""),
    (["--no-zeroconf"], "port = 5"),
    (["--no-zeroconf"], "socket = 3"),
    ([], "zeroconf = no\nsocket = 0"),
])
def test_no_zeroconf_with_port_or_socket_is_fine(configdir, argv, conf):
    assert load(configdir, *argv, conf=f"[DEFAULT]\n{conf}\n").zeroconf is False


# --- the inherited socket ----------------------------------------------------------------

def test_socket_fd_is_none_without_a_socket():
    assert settings.socket_fd(ServerSettings()) is None


def test_socket_fd_above_2_is_used_as_it_is():
    first, second = socket.socketpair()
    try:
        given = ServerSettings(socket=first.fileno())
        assert settings.socket_fd(given) == first.fileno()
        assert given.socket == first.fileno()
    finally:
        first.close()
        second.close()


MOVE_SCRIPT = textwrap.dedent("""\
    import fcntl, os, socket, sys
    from mandos.server import settings
    given = settings.load(sys.argv[1:])
    fd = settings.socket_fd(given)
    assert settings.socket_fd(given) == fd, "not stable"
    same = os.fstat(fd).st_ino == os.fstat(0).st_ino
    cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sock = socket.socket(fileno=fd)
    sock.sendall(b"still here")
    print(fd, same, cloexec)
    """)


@pytest.mark.parametrize("where", ["command line", "file"])
def test_socket_fd_0_is_moved_above_2_with_close_on_exec(tmp_path, where):
    """A socket on stdin (``--socket=0``) survives stdin being pointed at /dev/null."""
    if where == "file":
        (tmp_path / "mandos.conf").write_text("[DEFAULT]\nsocket = 0\n")
    argv = ["--configdir", str(tmp_path)] + (["--socket=0"] if where == "command line" else [])
    parent, child = socket.socketpair()
    try:
        result = subprocess.run([sys.executable, "-c", MOVE_SCRIPT, *argv], stdin=child,
                                capture_output=True, text=True, cwd=REPO, timeout=30)
        assert result.returncode == 0, result.stderr
        fd, same, cloexec = result.stdout.split()
        assert int(fd) >= 3 and same == "True" and cloexec == "True"
        assert parent.recv(100) == b"still here"
    finally:
        parent.close()
        child.close()


def test_socket_fd_dup_in_process_restoring_stdin():
    """The same rule in this process, with the real stdin put back afterwards."""
    saved = os.dup(0)
    first, second = socket.socketpair()
    try:
        os.dup2(first.fileno(), 0)
        given = ServerSettings(socket=0)
        fd = settings.socket_fd(given)
        try:
            assert fd >= 3 and given.socket == fd
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.write(fd, b"x")
            assert second.recv(1) == b"x"
        finally:
            os.close(fd)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        first.close()
        second.close()


def test_no_expansion_in_booleans_either(capsys, configdir):
    usage_error(capsys, configdir, conf="[DEFAULT]\nflag = no\nuse_dbus = %(flag)s\n")
