"""``clients.conf``: the list of clients and their settings (SERVER.md §4).

The file is read with Python's :mod:`configparser` rules, as the original
reads it, so existing files work unchanged: ``[DEFAULT]`` values reach every
section, ``%(key)s`` is expanded when the file is loaded (``%%`` is a
literal ``%``), and whatever is still of the form ``%(attr)s`` in a checker
command afterwards is filled in, shell-quoted, each time the checker runs.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import datetime
import logging
import os
import shlex

from mandos import timespec

log = logging.getLogger(__name__)

# The key ID of an empty key: Mandos 1.8.0 clients with broken key files all
# sent it.  It must never identify anyone.
REFUSED_KEY_ID = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"

DEFAULTS = {
    "timeout": "PT5M",
    "extended_timeout": "PT15M",
    "interval": "PT2M",
    "checker": "fping -q -- %%(host)s",
    "host": "",
    "approval_delay": "PT0S",
    "approval_duration": "PT1S",
    "approved_by_default": "True",
    "enabled": "True",
}
DURATIONS = ("timeout", "extended_timeout", "interval", "approval_delay", "approval_duration")


class ConfigError(Exception):
    """clients.conf cannot be used; the message says where and why."""


@dataclasses.dataclass
class ClientConfig:
    """One client's settings, as converted from its section."""

    name: str
    key_id: str = ""
    fingerprint: str = ""
    secret: bytes = b""
    secfile: str | None = None  # read later, as the unprivileged user
    host: str = ""
    checker_command: str = "fping -q -- %(host)s"
    timeout: datetime.timedelta = datetime.timedelta(minutes=5)
    extended_timeout: datetime.timedelta = datetime.timedelta(minutes=15)
    interval: datetime.timedelta = datetime.timedelta(minutes=2)
    approval_delay: datetime.timedelta = datetime.timedelta(0)
    approval_duration: datetime.timedelta = datetime.timedelta(seconds=1)
    approved_by_default: bool = True
    enabled: bool = True
    # Every setting of the section after load-time expansion, as text
    # (``secret`` left out): what the state file compares at the next start.
    settings: dict[str, str] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:  # never show the secret
        return f"ClientConfig(name={self.name!r}, key_id={self.key_id!r})"


def normalize_id(value: str) -> str:
    """Key IDs and fingerprints compare upper-case without spaces."""
    return value.replace(" ", "").upper()


def read_text(path: str) -> str | None:
    """The file's text, or None (with a warning) if it does not exist."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except FileNotFoundError:
        log.warning("No clients defined: %s does not exist", path)
        return None


def parse(text: str, source: str = "clients.conf") -> list[ClientConfig]:
    """All usable clients of the file's text, in file order.

    Raises ConfigError for what the original treats as fatal: syntax
    errors, duplicate sections or keys, bad expansions, booleans, durations,
    and sections with neither ``secret`` nor ``secfile``.
    """
    parser = configparser.ConfigParser(defaults=DEFAULTS, strict=True,
                                       interpolation=configparser.BasicInterpolation())
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        raise ConfigError(f"{source}: {err}") from None
    clients = []
    for name in parser.sections():
        section = parser[name]
        try:
            client = _convert(name, section)
        except (configparser.Error, ValueError) as err:
            raise ConfigError(f"{source}: [{name}]: {err}") from None
        if client is not None:
            clients.append(client)
    return clients


def _convert(name: str, section: configparser.SectionProxy) -> ClientConfig | None:
    settings = {key: section[key] for key in section}
    client = ClientConfig(name=name, host=settings["host"],
                          approved_by_default=section.getboolean("approved_by_default"),
                          enabled=section.getboolean("enabled"),
                          key_id=normalize_id(settings.get("key_id", "")),
                          fingerprint=normalize_id(settings.get("fingerprint", "")))
    if not client.key_id and not client.fingerprint:
        log.error("Skipping client %s without key_id or fingerprint", name)
        return None
    if "secret" in settings:
        # Line breaks and other characters outside the base64 alphabet are
        # skipped, as the original does.
        client.secret = base64.b64decode(settings["secret"].encode("ascii", "ignore"))
    elif "secfile" in settings:
        client.secfile = os.path.expanduser(os.path.expandvars(settings["secfile"]))
    else:
        raise ValueError("missing secret or secfile")
    for key in DURATIONS:
        setattr(client, key, timespec.parse_duration(settings[key]))
    client.checker_command = settings["checker"]
    client.settings = {key: value for key, value in settings.items() if key != "secret"}
    return client


def load_secret(client: ClientConfig) -> None:
    """Read ``secfile`` into ``secret`` (call after dropping privileges)."""
    if client.secfile is not None:
        try:
            with open(client.secfile, "rb") as file:
                client.secret = file.read()
        except OSError as err:
            raise ConfigError(f"[{client.name}]: cannot read secfile "
                              f"{client.secfile}: {err.strerror}") from None


def render_checker(template: str, attributes: dict[str, object]) -> str:
    """Fill ``%(attr)s`` in a checker command with shell-quoted values.

    Values are rendered as Python does (``0:05:00``, ``True``, ``None``,
    ``2024-01-02 03:04:05.000006``).  Raises KeyError for an unknown name
    and ValueError/TypeError for a malformed template.
    """
    return template % {key: shlex.quote(str(value)) for key, value in attributes.items()}
