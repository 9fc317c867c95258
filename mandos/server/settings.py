"""The server's settings: command line and ``mandos.conf`` (SERVER.md §2, §3).

``mandos.conf`` (in ``--configdir``) is read with :mod:`configparser`; only
its ``[DEFAULT]`` section counts, values are taken literally (``%`` needs no
doubling), and unknown keys are ignored.  Options given on the command line
win over the file.  The boolean options of the command line can only switch
a feature on (``--debug``, ``--foreground``) or off (``--no-...``).

Usage errors, and errors in ``mandos.conf``, end the program with status 2
(the original stops with a traceback for the latter).  Beyond the original
options there are ``--handshake-timeout``, ``--max-handshakes`` and
``--pidfile``; they exist only on the command line.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import fcntl
import logging
import math
import os

import mandos

# Copy of mandos.gnutls.DEFAULT_PRIORITY: importing the TLS binding here
# would load libgnutls before anything needs it.
DEFAULT_PRIORITY = ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL"
                    ":+VERS-TLS1.3:%PROFILE_ULTRA")
DEFAULT_CONFIGDIR = "/etc/mandos"
DEFAULT_STATEDIR = "/var/lib/mandos"
DEFAULT_SERVICENAME = "Mandos"
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_MAX_HANDSHAKES = 64
LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

_BOOLEANS = ("debug", "use_dbus", "use_ipv6", "restore", "foreground", "zeroconf")
_STRINGS = ("interface", "address", "priority", "servicename", "statedir", "debuglevel")
_INTEGERS = ("port", "socket")


def default_pidfile() -> str:
    """``/run/mandos.pid``, or ``/var/run/mandos.pid`` where ``/run`` is absent."""
    return "/run/mandos.pid" if os.path.isdir("/run") else "/var/run/mandos.pid"


@dataclasses.dataclass
class ServerSettings:
    """Everything the command line and ``mandos.conf`` decide."""

    interface: str = ""
    address: str = ""
    port: int | None = None
    debug: bool = False
    debuglevel: str = ""  # "" or one of LEVELS
    priority: str = DEFAULT_PRIORITY
    servicename: str = DEFAULT_SERVICENAME
    configdir: str = DEFAULT_CONFIGDIR
    use_dbus: bool = True
    use_ipv6: bool = True
    restore: bool = True
    socket: int | None = None
    statedir: str = DEFAULT_STATEDIR
    foreground: bool = False
    zeroconf: bool = True
    check: bool = False
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    pidfile: str = dataclasses.field(default_factory=default_pidfile)

    @property
    def log_level(self) -> int:
        """The log threshold: DEBUG with ``debug``, else ``debuglevel`` or WARNING."""
        if self.debug:
            return logging.DEBUG
        return getattr(logging, self.debuglevel or "WARNING")


class SettingsError(Exception):
    """``mandos.conf`` holds something unusable; the message says what."""


def _level(text: str) -> str:
    """A log level name, any case; "" means the default."""
    if text and text.upper() not in LEVELS:
        raise ValueError(f"unknown log level {text!r}: use one of {', '.join(LEVELS)}")
    return text.upper()


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"port {value} is not in 0-65535")
    return value


def _descriptor(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise ValueError(f"file descriptor {value} is negative")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


def _positive_integer(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError(f"{value} is not a positive number")
    return value


def _argument_type(convert, name: str):
    """Wrap a converter so that argparse reports its ValueError message."""
    def checked(text: str):
        try:
            return convert(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    checked.__name__ = name
    return checked


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mandos",
        description="Give encrypted passwords to known, live machines booting over the network.")
    parser.add_argument("-v", "--version", action="version",
                        version=f"mandos {mandos.__version__}",
                        help="print the version and exit")
    parser.add_argument("-i", "--interface", metavar="IF",
                        help="bind to interface IF and announce only there")
    parser.add_argument("-a", "--address", help="listen on this address only")
    parser.add_argument("-p", "--port", type=_argument_type(_port, "port"),
                        help="TCP port to listen on")
    parser.add_argument("--check", action="store_true", default=False,
                        help="run the self tests and exit")
    parser.add_argument("--debug", action="store_true", default=None,
                        help="debug mode: run in the foreground and log everything, "
                        "also to standard error")
    parser.add_argument("--debuglevel", metavar="LEVEL", type=_argument_type(_level, "level"),
                        help="log threshold: CRITICAL, ERROR, WARNING, INFO or DEBUG")
    parser.add_argument("--priority", help="TLS priority string for GnuTLS")
    parser.add_argument("--servicename", metavar="NAME",
                        help="name to announce by Zeroconf; also tags the log lines")
    parser.add_argument("--configdir", metavar="DIR", default=DEFAULT_CONFIGDIR,
                        help="directory of mandos.conf and clients.conf")
    parser.add_argument("--no-dbus", action="store_false", dest="use_dbus", default=None,
                        help="no D-Bus control interface")
    parser.add_argument("--no-ipv6", action="store_false", dest="use_ipv6", default=None,
                        help="use IPv4 only")
    parser.add_argument("--no-restore", action="store_false", dest="restore", default=None,
                        help="do not read the saved state")
    parser.add_argument("--socket", metavar="FD", type=_argument_type(_descriptor, "fd"),
                        help="file descriptor of an already open listening socket to use")
    parser.add_argument("--statedir", metavar="DIR", help="directory of the saved state")
    parser.add_argument("--foreground", action="store_true", default=None,
                        help="do not become a daemon")
    parser.add_argument("--no-zeroconf", action="store_false", dest="zeroconf", default=None,
                        help="no Zeroconf announcement; needs --port or --socket")
    parser.add_argument("--handshake-timeout", metavar="SECONDS",
                        type=_argument_type(_positive_seconds, "seconds"),
                        default=DEFAULT_HANDSHAKE_TIMEOUT,
                        help="a connection has this long to send its protocol version and "
                        "finish the TLS handshake (not in the original; default: "
                        "%(default)s)")
    parser.add_argument("--max-handshakes", metavar="N",
                        type=_argument_type(_positive_integer, "count"),
                        default=DEFAULT_MAX_HANDSHAKES,
                        help="at most this many TLS handshakes at once; more connections "
                        "wait for a turn (not in the original; default: %(default)s)")
    parser.add_argument("--pidfile", metavar="PATH", default=default_pidfile(),
                        help="where a daemon writes its process ID (not in the original; "
                        "default: %(default)s)")
    return parser


def read_config(path: str) -> dict[str, object]:
    """The settings ``mandos.conf`` at ``path`` sets, converted; {} if it is missing.

    Raises SettingsError for a syntax error, a bad boolean or integer, or a
    file that exists but cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"cannot read {path}: {err}") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as err:
        raise SettingsError(str(err)) from None
    raw = parser.defaults()
    values: dict[str, object] = {}
    for key in _BOOLEANS:
        if key in raw:
            try:
                values[key] = parser.getboolean(parser.default_section, key)
            except ValueError:
                raise SettingsError(f"{path}: {key} = {raw[key]!r} is not a boolean "
                                    "(1, yes, true, on, 0, no, false, off)") from None
    for key, convert in (("port", _port), ("socket", _descriptor)):
        if raw.get(key, "").strip():
            try:
                values[key] = convert(raw[key])
            except ValueError as err:
                raise SettingsError(f"{path}: {key}: {err}") from None
    for key in _STRINGS:
        if key in raw:
            values[key] = raw[key]
    if "debuglevel" in values:
        try:
            values["debuglevel"] = _level(str(values["debuglevel"]))
        except ValueError as err:
            raise SettingsError(f"{path}: debuglevel: {err}") from None
    return values


def load(argv: list[str]) -> ServerSettings:
    """Parse ``argv`` (without the program name), read ``mandos.conf``, merge.

    Exits with status 2 (through argparse) for a bad command line, a bad
    ``mandos.conf``, or Zeroconf off with neither a port nor a socket; with
    status 0 after ``--help`` and ``--version``.
    """
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        values = read_config(os.path.join(options.configdir, "mandos.conf"))
    except SettingsError as err:
        parser.error(str(err))
    settings = ServerSettings(**values)
    for field in ("interface", "address", "port", "debug", "debuglevel", "priority",
                  "servicename", "configdir", "use_dbus", "use_ipv6", "restore", "socket",
                  "statedir", "foreground", "zeroconf", "check", "handshake_timeout",
                  "max_handshakes", "pidfile"):
        value = getattr(options, field)
        if value is not None:
            setattr(settings, field, value)
    if settings.debug:
        settings.foreground = True
    # Port 0 would be a port nobody can find without Zeroconf.
    if not settings.zeroconf and not settings.port and settings.socket is None:
        parser.error("needs port or socket to work without Zeroconf")
    return settings


def socket_fd(settings: ServerSettings) -> int | None:
    """The descriptor of the inherited listening socket, or None to create one.

    A descriptor 0, 1 or 2 (``--socket=0`` with systemd's
    ``StandardInput=socket``) is first duplicated to one >= 3 with
    close-on-exec, so that pointing stdio at ``/dev/null`` later cannot
    clobber it; ``settings.socket`` then names the copy, so calling this
    again gives the same descriptor.  Raises OSError if it is not open.
    """
    if settings.socket is not None and 0 <= settings.socket <= 2:
        settings.socket = fcntl.fcntl(settings.socket, fcntl.F_DUPFD_CLOEXEC, 3)
    return settings.socket
