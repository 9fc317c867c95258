"""The persistent state file: what survives a restart (SERVER.md §10).

The state lives in ``STATEDIR/clients.json``.  It is rewritten, atomically,
soon after every change that matters (enable/disable, a checker result, an
approval request, a new expiry, a setting changed over D-Bus, a client
removed) and once more at shutdown, so a ``kill -9`` at any moment loses
nothing that had been saved: the directory holds either the old complete
file or the new complete file, never a partial one.

Layout (``version`` 1)::

    {"version": 1,
     "clients": {NAME: {"host": str, "checker_command": str,
                        "timeout": ms, "extended_timeout": ms, "interval": ms,
                        "approval_delay": ms, "approval_duration": ms,
                        "approved_by_default": bool, "enabled": bool,
                        "created": TIME, "last_enabled": TIME|null,
                        "expires": TIME|null, "last_checked_ok": TIME|null,
                        "last_checker_status": int,
                        "last_approval_request": TIME|null}},
     "previous_config": {NAME: {SETTING: TEXT}}}

Durations are whole milliseconds (integers, as on D-Bus; anything finer is
dropped).  TIME is a naive UTC timestamp in ISO 8601 form
(``2024-01-02T03:04:05.123456``).  ``previous_config`` holds, for every
client of the ``clients.conf`` the server was started with, the section's
settings as text after expansion (``ClientConfig.settings``); the next
start compares them with the new file to see which settings the
administrator edited.

Differences from the original, on purpose:

- **Secrets are never written to the state file.**  The secret always comes
  from ``clients.conf`` (or its ``secfile``).  The consequence: a secret
  changed at run time over D-Bus (the ``Secret`` property) is lost at the
  next restart.
- The format is JSON, not pickle.  An old ``clients.pickle`` of the original
  server is ignored with a warning and left alone: it is never unpickled,
  because unpickling a file can run arbitrary code.
- The file is kept at start-up and overwritten, not deleted after reading,
  so a crash does not lose everything.
- A client removed at run time (``RemoveClient``) but still in
  ``clients.conf`` comes back at the next start: ``clients.conf`` is the
  source of truth for which clients exist (the original kept such a client
  gone on every restart).
- When an edit of ``clients.conf`` re-enables a client that was stored as
  disabled, it starts as if just enabled (``last_enabled`` = now).
- A setting counts as edited only if its value changed: rewriting ``5m`` as
  ``PT5M`` or ``yes`` as ``true`` keeps a run-time change.
"""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
import datetime
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable

from mandos import timespec
from mandos.server.client import Client, ClientObserver, utcnow
from mandos.server.clients_conf import ClientConfig
from mandos.server.registry import ClientRegistry, ServerObserver

log = logging.getLogger(__name__)

FILE_NAME = "clients.json"
ORIGINAL_FILE_NAME = "clients.pickle"
# Temporary files are "clients.json.XXXXXXXX.tmp"; one left behind by a
# crash in the middle of a save is removed by the next load().
_TEMP_PREFIX = FILE_NAME + "."
_TEMP_SUFFIX = ".tmp"
VERSION = 1

# clients.conf setting -> Client attribute, for the settings that can be
# changed at run time (over D-Bus) and so may differ from the file.
RUNTIME_SETTINGS = {
    "host": "host",
    "checker": "checker_command",
    "timeout": "timeout",
    "extended_timeout": "extended_timeout",
    "interval": "interval",
    "approval_delay": "approval_delay",
    "approval_duration": "approval_duration",
    "approved_by_default": "approved_by_default",
    "enabled": "enabled",
}
_DURATIONS = ("timeout", "extended_timeout", "interval", "approval_delay", "approval_duration")
_BOOLEANS = ("approved_by_default", "enabled")
_STRINGS = ("host", "checker_command")
# Run-time fields restored onto a rebuilt Client by apply().
RESTORED_FIELDS = ("created", "last_enabled", "expires", "last_checked_ok",
                   "last_checker_status", "last_approval_request")
_TIMES = ("created", "last_enabled", "expires", "last_checked_ok", "last_approval_request")
# Every stored field of a client, in file order.  "secret" is deliberately
# absent: secrets must never reach the disk through this file.
FIELDS = _STRINGS + _DURATIONS + _BOOLEANS + RESTORED_FIELDS


@dataclasses.dataclass
class StoredState:
    """What a state file held: decoded client fields and the previous settings."""

    # name -> field -> value (timedelta, datetime or None, bool, int, str)
    clients: dict[str, dict[str, object]]
    # name -> clients.conf setting -> text
    previous_config: dict[str, dict[str, str]]


# -- encoding -----------------------------------------------------------------

def _encode_time(value: datetime.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value.isoformat()


def _decode_time(value: object) -> datetime.datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp expected, not {value!r}")
    parsed = datetime.datetime.fromisoformat(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return parsed


def _encode_client(client: Client) -> dict[str, object]:
    fields: dict[str, object] = {}
    for name in FIELDS:
        value = getattr(client, name)
        if name in _DURATIONS:
            value = timespec.milliseconds(value)
        elif name in _TIMES:
            value = _encode_time(value)
        fields[name] = value
    return fields


def _decode_client(fields: object) -> dict[str, object]:
    """Decoded and type-checked fields; ValueError if anything is off."""
    if not isinstance(fields, dict):
        raise ValueError("not an object")
    decoded: dict[str, object] = {}
    for name in FIELDS:
        if name not in fields:
            raise ValueError(f"{name} is missing")
        value = fields[name]
        if name in _DURATIONS:
            if type(value) is not int:
                raise ValueError(f"{name}: milliseconds expected, not {value!r}")
            value = datetime.timedelta(milliseconds=value)
        elif name in _TIMES:
            value = _decode_time(value)
            if value is None and name == "created":
                raise ValueError("created is null")
        elif name in _BOOLEANS:
            if type(value) is not bool:
                raise ValueError(f"{name}: true or false expected, not {value!r}")
        elif name in _STRINGS:
            if not isinstance(value, str):
                raise ValueError(f"{name}: text expected, not {value!r}")
        elif type(value) is not int:  # last_checker_status
            raise ValueError(f"{name}: integer expected, not {value!r}")
        decoded[name] = value
    return decoded


def _decode_settings(settings: object) -> dict[str, str]:
    if not isinstance(settings, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in settings.items()):
        raise ValueError("settings must map names to text")
    return dict(settings)


# -- the file -----------------------------------------------------------------

class StateFile:
    """``clients.json`` in the state directory: load it, save it atomically."""

    def __init__(self, statedir: str) -> None:
        self.statedir = statedir
        self.path = os.path.join(statedir, FILE_NAME)

    def load(self) -> StoredState | None:
        """The saved state, or None to start from ``clients.conf`` alone.

        A missing, corrupt or truncated file gives a warning and None; a
        client entry that cannot be decoded is dropped with a warning (that
        client starts fresh).  Other I/O errors (e.g. permissions) raise
        OSError: the administrator must look at them.
        """
        self._ignore_original_state()
        self._remove_stale_temp_files()
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            log.warning("No saved state in %s; starting from clients.conf only", self.path)
            return None
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError too
            log.warning("Ignoring corrupt state file %s (%s); starting from clients.conf only",
                        self.path, err)
            return None
        try:
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            if document.get("version") != VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            clients = document.get("clients")
            previous = document.get("previous_config")
            if not isinstance(clients, dict) or not isinstance(previous, dict):
                raise ValueError("clients or previous_config is not an object")
            previous_config = {name: _decode_settings(settings)
                               for name, settings in previous.items()}
        except ValueError as err:
            log.warning("Ignoring unusable state file %s (%s); starting from clients.conf only",
                        self.path, err)
            return None
        stored = StoredState(clients={}, previous_config=previous_config)
        for name, fields in clients.items():
            try:
                stored.clients[name] = _decode_client(fields)
            except (ValueError, OverflowError) as err:
                log.warning("Ignoring the saved state of client %s (%s)", name, err)
        return stored

    def _ignore_original_state(self) -> None:
        # Never open, let alone unpickle, the original's clients.pickle:
        # unpickling runs whatever code the file names, so a file planted in
        # (or corrupted in) the state directory would run as the server.
        original = os.path.join(self.statedir, ORIGINAL_FILE_NAME)
        if os.path.lexists(original):
            log.warning("Ignoring %s of the original server: it is never read; run-time "
                        "state starts from clients.conf and %s", original, FILE_NAME)

    def _remove_stale_temp_files(self) -> None:
        """Remove temporary files left behind by a save that was killed."""
        try:
            names = os.listdir(self.statedir)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(_TEMP_PREFIX) and name.endswith(_TEMP_SUFFIX):
                path = os.path.join(self.statedir, name)
                try:
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        os.unlink(path)
                except FileNotFoundError:
                    pass

    def save(self, registry: Iterable[Client], configs: dict[str, ClientConfig]) -> None:
        """Write the clients' state and the settings of ``configs``; raises OSError.

        ``registry`` is every current client (a ClientRegistry will do);
        ``configs`` the clients.conf the server was started with.
        """
        document = {
            "version": VERSION,
            "clients": {client.name: _encode_client(client) for client in registry},
            "previous_config": {name: dict(config.settings) for name, config in configs.items()},
        }
        self._write(json.dumps(document, indent=1).encode("utf-8") + b"\n")

    def _write(self, data: bytes) -> None:
        """Replace the file atomically: a reader (or a crash) sees old or new, never half.

        mkstemp creates the temporary file with O_CREAT|O_EXCL (never
        follows or reuses a file or symlink placed there) and mode 0600 (the
        state tells when clients were seen and how they are checked: not for
        other users).  It lives in the same directory so that the rename is
        atomic; fsync of the file before the rename makes sure the new name
        never points to data not yet on disk, and fsync of the directory
        makes the rename itself durable.
        """
        fd, temp_path = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX,
                                         dir=self.statedir)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, self.path)
        except BaseException:
            try:
                os.unlink(temp_path)
            except FileNotFoundError:
                pass
            raise
        directory = os.open(self.statedir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# -- merging at start-up (SERVER.md §10.3) ------------------------------------

def _same_setting(key: str, old: str, new: str) -> bool:
    """Whether two texts of a setting mean the same value."""
    if old == new:
        return True
    try:
        if RUNTIME_SETTINGS.get(key) in _DURATIONS:
            return timespec.parse_duration(old) == timespec.parse_duration(new)
        if key in _BOOLEANS:
            states = configparser.ConfigParser.BOOLEAN_STATES
            return states[old.lower()] == states[new.lower()]
    except (ValueError, KeyError):
        pass
    return False


def merge(configs: list[ClientConfig], stored: StoredState | None,
          now: datetime.datetime | None = None) -> list[tuple[ClientConfig, dict[str, object]]]:
    """Combine the new ``clients.conf`` with saved state, in ``configs`` order.

    Returns, for every client of the new configuration, the configuration to
    build its Client from (run-time changes merged in) and the run-time
    fields to give it with :func:`apply` (empty for a fresh client).

    - Only names in the new configuration exist; state of other names is
      dropped.  A name without saved state (new, or removed at run time)
      starts fresh from its section.
    - A setting edited in clients.conf since the previous start wins;
      otherwise the saved (possibly run-time changed) value is kept.
    - A client that expired while the server was down stays enabled only if
      its last check succeeded (with ``expires = now + timeout``).
    - ``created`` and the checker history are kept; a disabled client has
      no ``last_enabled`` or ``expires``.  Approval decisions, pending
      approvals and checkers are not saved, so they start empty.

    ``now`` (naive UTC) defaults to the current time.
    """
    if now is None:
        now = utcnow()
    merged = []
    for config in configs:
        fields = stored.clients.get(config.name) if stored is not None else None
        previous = stored.previous_config.get(config.name) if stored is not None else None
        if fields is None or previous is None:
            merged.append((config, {}))
            continue
        values = {}
        for key, attribute in RUNTIME_SETTINGS.items():
            edited = (key in previous and key in config.settings
                      and not _same_setting(key, previous[key], config.settings[key]))
            values[attribute] = getattr(config, attribute) if edited else fields[attribute]
        client_config = dataclasses.replace(config, settings=dict(config.settings), **values)
        restored = {name: fields[name] for name in RESTORED_FIELDS}
        if client_config.enabled and not fields["enabled"]:
            # Enabled by an edit of clients.conf: as if just enabled.
            log.info("Client %s enabled in clients.conf", config.name)
            restored["last_enabled"] = now
            restored["expires"] = now + client_config.timeout
        elif client_config.enabled and (restored["expires"] is None or now >= restored["expires"]):
            if restored["last_checked_ok"] is None:
                log.warning("Disabling client %s: it expired while the server was down and "
                            "was never checked successfully", config.name)
                client_config.enabled = False
            elif restored["last_checker_status"] != 0:
                log.warning("Disabling client %s: it expired while the server was down and "
                            "its last checker failed with status %s", config.name,
                            restored["last_checker_status"])
                client_config.enabled = False
            else:
                # Assume its checks kept succeeding while the server was down.
                restored["expires"] = now + client_config.timeout
                log.debug("Client %s expired while the server was down; last check was "
                          "fine, so it stays enabled until %s", config.name, restored["expires"])
        if not client_config.enabled:
            restored["last_enabled"] = None
            restored["expires"] = None
        merged.append((client_config, restored))
    return merged


def apply(client: Client, fields: dict[str, object]) -> None:
    """Give a freshly built client its restored run-time fields.

    Attributes are set directly: a client being restored is not changing,
    so no observer hears about it.  Timers are not touched; the caller then
    starts checker scheduling for enabled clients as usual.
    """
    for name, value in fields.items():
        if name not in RESTORED_FIELDS:
            raise KeyError(f"not a restored field: {name}")
        setattr(client, name, value)


# -- saving on every change ---------------------------------------------------

# Client attributes that are part of the state file; other changes
# (checker_running, approvals_pending, the secret) need no save.
_SAVED_ATTRIBUTES = frozenset(FIELDS)
# Events that may matter even when no saved attribute changed value.
_SAVED_SIGNALS = frozenset({"CheckerCompleted", "GotSecret", "NeedApproval"})


class StateSaver(ClientObserver, ServerObserver):
    """Saves the state soon after every change that matters.

    Creating it attaches it to the registry and to every client in it, and
    to every client added later.  A change schedules one save for the next
    event loop iteration, so a burst of changes made in one callback (say a
    checker result: status, last_checked_ok and expiry together) is one
    write.  A save is one small file write and two fsyncs and is done on the
    event loop itself, so that what is written is a consistent snapshot.
    """

    def __init__(self, state_file: StateFile, registry: ClientRegistry,
                 configs: dict[str, ClientConfig]) -> None:
        self.state_file = state_file
        self.registry = registry
        self.configs = configs
        self._handle: asyncio.Handle | None = None  # the scheduled save, if any
        self._dirty = False  # a save is owed: no loop was running, or it failed
        self._closed = False
        registry.observers.append(self)
        for client in registry:
            self._watch(client)

    def _watch(self, client: Client) -> None:
        if self not in client.observers:
            client.observers.append(self)

    @property
    def pending(self) -> bool:
        """A save is scheduled or owed."""
        return self._handle is not None or self._dirty

    def save_soon(self) -> None:
        """Save on the next event loop iteration (once, however many changes come)."""
        if self._closed or self._handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._dirty = True  # saved by the next scheduled save or flush()
            return
        self._handle = loop.call_soon(self._scheduled_save)

    def _scheduled_save(self) -> None:
        self._handle = None
        self._save()

    def _save(self) -> bool:
        self._dirty = False
        try:
            self.state_file.save(self.registry, self.configs)
        except OSError as err:
            # Keep serving: the next change or the shutdown tries again.
            log.warning("Could not save persistent state in %s: %s", self.state_file.path, err)
            self._dirty = True
            return False
        return True

    def flush(self) -> bool:
        """Save now (at shutdown); True if the file was written."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return self._save()

    def close(self) -> None:
        """Save what is pending and stop following changes.

        At shutdown, call this before the clients are disabled or removed:
        otherwise the shutdown itself (every client disabled, or gone) is
        what gets saved.
        """
        if self.pending:
            self.flush()
        self._closed = True
        if self in self.registry.observers:
            self.registry.observers.remove(self)
        for client in self.registry:
            if self in client.observers:
                client.observers.remove(self)

    # -- observer callbacks ------------------------------------------------

    def property_changed(self, client: Client, name: str) -> None:
        if name in _SAVED_ATTRIBUTES:
            self.save_soon()

    def client_signal(self, client: Client, signal: str, *args) -> None:
        if signal in _SAVED_SIGNALS:
            self.save_soon()

    def client_added(self, client: Client) -> None:
        self._watch(client)
        self.save_soon()

    def client_removed(self, client: Client) -> None:
        if self in client.observers:
            client.observers.remove(self)
        self.save_soon()
