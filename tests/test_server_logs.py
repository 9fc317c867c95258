"""The server's logging: syslog lines, tags, debug output (SERVER.md §12)."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest

from mandos.server import logs
from mandos.server.settings import ServerSettings

REPO = Path(__file__).resolve().parent.parent
PID = os.getpid()
# Facility daemon (3) times 8 plus the syslog severity.
PRIORITY = {"CRITICAL": 26, "ERROR": 27, "WARNING": 28, "INFO": 30, "DEBUG": 31}


class Syslog:
    """A datagram socket standing in for the syslog daemon."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def lines(self, wait: float = 0.2) -> list[str]:
        """Everything received so far (waiting ``wait`` seconds for the first one)."""
        received = []
        self.sock.settimeout(wait)
        try:
            while True:
                received.append(self.sock.recv(65536).decode())
                self.sock.settimeout(0.05)
        except (TimeoutError, socket.timeout):
            return received

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)


@pytest.fixture
def root_logger():
    """Put the root logger back as it was after the test."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    logs.close()
    root.setLevel(level)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)


@pytest.fixture
def syslog(root_logger, monkeypatch):
    """A syslog listener at /dev/log, or at a temporary path if /dev/log is taken."""
    if os.path.exists("/dev/log"):
        path = os.path.join(tempfile.mkdtemp(prefix="mandos-log-"), "log")
        monkeypatch.setattr(logs, "DEV_LOG", path)
    else:
        path = "/dev/log"
    listener = Syslog(path)
    yield listener
    logs.close()
    if os.path.exists(path):
        listener.close()
    if path != "/dev/log":
        os.rmdir(os.path.dirname(path))


def expected(level: str, message: str, tag: str = "Mandos") -> str:
    return f"<{PRIORITY[level]}>{tag} [{PID}]: {level}: {message}\x00"


def test_syslog_line_format(syslog):
    logs.setup(ServerSettings())
    logging.getLogger("mandos.server.test").warning("hello %s", "world")
    assert syslog.lines() == [expected("WARNING", "hello world")]


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
def test_syslog_facility_daemon_and_level_names(syslog, level):
    logs.setup(ServerSettings(debuglevel="DEBUG"))
    logging.getLogger("mandos").log(getattr(logging, level), "m")
    assert syslog.lines() == [expected(level, "m")]


def test_default_threshold_is_warning(syslog):
    logs.setup(ServerSettings())
    log = logging.getLogger("mandos.server.client")
    log.info("not this")
    log.debug("nor this")
    log.error("this")
    assert syslog.lines() == [expected("ERROR", "this")]


def test_debuglevel_sets_the_threshold(syslog):
    logs.setup(ServerSettings(debuglevel="INFO"))
    log = logging.getLogger("mandos")
    log.debug("not this")
    log.info("this")
    assert syslog.lines() == [expected("INFO", "this")]


def test_debuglevel_above_warning_hides_warnings(syslog):
    logs.setup(ServerSettings(debuglevel="ERROR"))
    logging.getLogger("mandos").warning("hidden")
    assert syslog.lines() == []


def test_debug_logs_everything(syslog, capsys):
    logs.setup(ServerSettings(debug=True, debuglevel="ERROR"))
    logging.getLogger("mandos").debug("detail")
    assert syslog.lines() == [expected("DEBUG", "detail")]


def test_other_service_name_is_in_the_tag(syslog):
    logs.setup(ServerSettings(servicename="Office"))
    logging.getLogger("mandos").warning("x")
    assert syslog.lines() == [expected("WARNING", "x", "Mandos (Office)")]


def test_rename_changes_the_tag(syslog):
    logs.setup(ServerSettings())
    logs.set_service_name("Mandos #2")
    logging.getLogger("mandos").warning("renamed")
    logs.set_service_name("Mandos")
    logging.getLogger("mandos").warning("back")
    assert syslog.lines() == [expected("WARNING", "renamed", "Mandos (Mandos #2)"),
                              expected("WARNING", "back")]


def test_percent_in_the_service_name_is_literal(syslog):
    logs.setup(ServerSettings(servicename="100%(x)s %d"))
    logging.getLogger("mandos").warning("p")
    assert syslog.lines() == [expected("WARNING", "p", "Mandos (100%(x)s %d)")]


def test_setup_again_replaces_the_handlers(syslog):
    logs.setup(ServerSettings())
    logs.setup(ServerSettings(servicename="Second"))
    logging.getLogger("mandos").warning("once")
    assert syslog.lines() == [expected("WARNING", "once", "Mandos (Second)")]


def test_python_warnings_are_logged(syslog):
    logs.setup(ServerSettings())
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful now", UserWarning)
    (line,) = syslog.lines()
    assert line.startswith(f"<28>Mandos [{PID}]: WARNING: ")
    assert "UserWarning: careful now" in line


def test_debug_adds_stderr_in_its_own_format(syslog, capsys):
    logs.setup(ServerSettings(debug=True))
    logging.getLogger("mandos.server.client").info("on the terminal")
    err = capsys.readouterr().err
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} mandos \[{PID}\]: "
                        r"INFO: on the terminal\n", err), err
    assert syslog.lines() == [expected("INFO", "on the terminal")]


def test_program_name_in_the_stderr_format(syslog, capsys):
    logs.setup(ServerSettings(debug=True), program="mandos-test")
    logging.getLogger("x").warning("w")
    assert f" mandos-test [{PID}]: WARNING: w\n" in capsys.readouterr().err


def test_no_stderr_without_debug(syslog, capsys):
    logs.setup(ServerSettings(debuglevel="DEBUG"))
    logging.getLogger("mandos").warning("only syslog")
    assert capsys.readouterr().err == ""
    assert len(syslog.lines()) == 1


MISSING_SCRIPT = textwrap.dedent("""\
    import logging, sys
    from mandos.server import logs, settings
    logs.DEV_LOG = sys.argv[1]
    logs.setup(settings.ServerSettings())
    for n in range(3):
        logging.getLogger("mandos.server.client").warning("message %d", n)
    logging.getLogger("mandos").info("below the threshold")
    """)


def test_missing_dev_log_falls_back_to_stderr_without_tracebacks(tmp_path):
    result = subprocess.run([sys.executable, "-c", MISSING_SCRIPT, str(tmp_path / "no-log")],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 4, result.stderr
    assert "Cannot log to syslog" in lines[0] and "WARNING" in lines[0]
    for n, line in enumerate(lines[1:]):
        assert line.endswith(f"]: WARNING: message {n}")
        assert " mandos [" in line


def test_real_dev_log_is_the_default_address():
    assert logs.DEV_LOG == "/dev/log"


def test_lost_listener_is_reported_once_without_tracebacks(syslog, capsys):
    logs.setup(ServerSettings())
    logging.getLogger("mandos").warning("before")
    assert syslog.lines() == [expected("WARNING", "before")]
    syslog.close()
    for n in range(3):
        logging.getLogger("mandos").warning("after %d", n)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("cannot log to") == 1, err


def test_listener_coming_back_is_used_again(syslog, capsys):
    logs.setup(ServerSettings())
    syslog.close()
    logging.getLogger("mandos").warning("lost")
    again = Syslog(syslog.path)
    try:
        logging.getLogger("mandos").warning("found")
        assert again.lines() == [expected("WARNING", "found")]
    finally:
        again.close()
        syslog.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        syslog.sock.bind(syslog.path)  # for the fixture's clean-up
    assert capsys.readouterr().err.count("cannot log to") == 1


def test_close_removes_the_handlers(syslog):
    logs.setup(ServerSettings())
    logs.close()
    logging.getLogger("mandos").error("nowhere")
    assert syslog.lines(wait=0.1) == []
