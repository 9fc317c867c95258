"""The server's logging: syslog, and standard error in debug mode (SERVER.md §12).

Messages go to syslog through ``/dev/log`` (facility daemon) as
``Mandos [PID]: LEVEL: message``, or ``Mandos (NAME) [PID]: LEVEL: message``
when the Zeroconf service name is not ``Mandos``.  With ``--debug`` they
also go to standard error as ``TIMESTAMP mandos [PID]: LEVEL: message``.
Python warnings are logged too.

Deliberate difference from the original: without a syslog listener at
``/dev/log`` the original prints a traceback for every message; here one
warning says so and the messages go to standard error instead.  If the
listener goes away later, one line on standard error says so, not one
traceback per message.
"""

from __future__ import annotations

import logging
import logging.handlers
import socket
import sys
from typing import Protocol

DEV_LOG = "/dev/log"
SERVICE_NAME = "Mandos"

log = logging.getLogger(__name__)

_handlers: list[logging.Handler] = []
_syslog: "_SyslogHandler | None" = None


class _Settings(Protocol):
    debug: bool
    servicename: str

    @property
    def log_level(self) -> int: ...


class _SyslogHandler(logging.handlers.SysLogHandler):
    """A syslog handler that reports a lost listener once, without a traceback."""

    def __init__(self, address: str) -> None:
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        self._failing = False
        self._failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if not self._failed_now:
            self._failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if not self._failing:
            self._failing = True
            error = sys.exc_info()[1]
            try:
                sys.stderr.write(f"mandos: cannot log to {self.address}: {error}\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass


def _syslog_format(name: str) -> str:
    tag = SERVICE_NAME if name == SERVICE_NAME else f"{SERVICE_NAME} ({name})"
    # The name is data, not a format: a "%" in it must stay a "%".
    return tag.replace("%", "%%") + " [%(process)d]: %(levelname)s: %(message)s"


def _syslog_unavailable(address: str) -> OSError | None:
    """Why nothing listens at ``address``, or None if something does."""
    error: OSError | None = None
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(address)
                return None
            except OSError as err:
                error = err
    return error


def _stderr_handler(program: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        program.replace("%", "%%").join(("%(asctime)s ", " [%(process)d]: %(levelname)s: "
                                          "%(message)s"))))
    return handler


def setup(settings: _Settings, program: str = "mandos") -> None:
    """Configure the root logger from ``settings`` (debug, log_level, servicename).

    Calling it again replaces what an earlier call set up.
    """
    global _syslog
    close()
    root = logging.getLogger()
    problem = _syslog_unavailable(DEV_LOG)
    if problem is None:
        _syslog = _SyslogHandler(DEV_LOG)
        _syslog.setFormatter(logging.Formatter(_syslog_format(settings.servicename)))
        _handlers.append(_syslog)
    if settings.debug or problem is not None:
        _handlers.append(_stderr_handler(program))
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)
    if problem is not None:
        log.warning("Cannot log to syslog at %s (%s); logging to standard error",
                    DEV_LOG, problem.strerror or problem)


def logs_to_stderr() -> bool:
    """Whether log messages also go to standard error."""
    return any(isinstance(handler, logging.StreamHandler)
               and getattr(handler, "stream", None) is sys.stderr for handler in _handlers)


def set_service_name(name: str) -> None:
    """Tag syslog lines with the service name ``name`` (after a Zeroconf rename)."""
    if _syslog is not None:
        _syslog.setFormatter(logging.Formatter(_syslog_format(name)))


def close() -> None:
    """Remove and close the handlers :func:`setup` installed."""
    global _syslog
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    _syslog = None
    logging.captureWarnings(False)
