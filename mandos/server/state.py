"""The persistent state: what survives a restart (SERVER.md §10).

The state lives in the directory ``STATEDIR/clients/``, one small JSON file
per client.  A client's file is rewritten, atomically, soon after every
change of that client that matters (enable/disable, a checker result, an
approval request, a new expiry, a setting changed over D-Bus) and deleted
when the client is removed; every file is written once more at start-up
(``StateSaver.save_soon``), and at shutdown ``StateSaver.flush`` waits until
everything changed is on disk.  So a ``kill -9`` at any moment loses at most the change being
written at that moment: each file is either the old complete one or the new
complete one, never a partial one.

Saving costs what changed, not the whole state: the event loop only takes a
snapshot of the changed client's fields (a small dict) and hands it to one
background writer thread, which encodes and writes the files of the clients
that changed since its last pass (the latest snapshot of a client wins) and
then makes the renames durable with one fsync of the directory per pass.

Layout of ``clients/NAME.json`` (``version`` 2)::

    {"version": 2, "name": NAME,
     "fields": {"host": str, "checker_command": str,
                "timeout": ms, "extended_timeout": ms, "interval": ms,
                "approval_delay": ms, "approval_duration": ms,
                "approved_by_default": bool, "enabled": bool,
                "created": TIME, "last_enabled": TIME|null,
                "expires": TIME|null, "last_checked_ok": TIME|null,
                "last_checker_status": int,
                "last_approval_request": TIME|null},
     "previous_config": {SETTING: TEXT} | null}

Durations are whole milliseconds (integers, as on D-Bus; anything finer is
dropped).  TIME is a naive UTC timestamp in ISO 8601 form
(``2024-01-02T03:04:05.123456``).  ``previous_config`` holds the client's
section of the ``clients.conf`` the server was started with, as text after
expansion (``ClientConfig.settings``); the next start compares it with the
new file to see which settings the administrator edited.

The file name is the client name, UTF-8 encoded, with every byte other than
``A-Z a-z 0-9 _ -`` written as ``%XX`` (so ``/``, ``.``, ``%`` and spaces
never appear as such: no name can be ``.``/``..``, contain a directory or
collide with another), then ``.json``.  A name whose encoding would be too
long for a file name is cut and followed by ``~`` and a SHA-256 of the name;
the empty name is ``%.json``.
A file whose name is not the encoding of the name it holds is ignored.
Temporary files start with ``.`` (which no encoded name does) and end with
``.tmp`` (``clients.json.XXXXXXXX.tmp`` for the index); those left behind by
a killed save are removed by the next load().

``STATEDIR/clients.json`` is a small index, ``{"version": 2, "directory":
"clients", "clients": {NAME: FILE NAME}}``, rewritten when the set of
clients changes (start-up, a client removed) and at shutdown.  It tells an
administrator which file is whose; the directory, not the index, says which
clients have saved state.  A ``clients.json`` of ``version`` 1 is the
single-file layout of the previous version of this module: load() reads it
once (migration) instead of the directory, and the first save after
start-up writes every client's file and only then replaces it with the
index, so a crash in between simply migrates again.

Differences from the original, on purpose:

- **Secrets are never written to the state.**  The secret always comes
  from ``clients.conf`` (or its ``secfile``).  The consequence: a secret
  changed at run time over D-Bus (the ``Secret`` property) is lost at the
  next restart.
- The format is JSON, not pickle.  An old ``clients.pickle`` of the original
  server is ignored with a warning and left alone: it is never unpickled,
  because unpickling a file can run arbitrary code.
- The state is kept at start-up and overwritten, not deleted after reading,
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
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterable

from mandos import timespec
from mandos.server.client import Client, ClientObserver, utcnow
from mandos.server.clients_conf import ClientConfig
from mandos.server.registry import ClientRegistry, ServerObserver

log = logging.getLogger(__name__)

FILE_NAME = "clients.json"  # the index (version 2), or the old single file (version 1)
CLIENTS_DIRECTORY = "clients"
ORIGINAL_FILE_NAME = "clients.pickle"
# Temporary files: ".XXXXXXXX.tmp" in the clients' directory, and
# "clients.json.XXXXXXXX.tmp" (as in the previous version) in STATEDIR.
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"
_INDEX_TEMP_PREFIX = FILE_NAME + "."
_CLIENT_SUFFIX = ".json"
VERSION = 2
_OLD_VERSION = 1
# Bytes kept as they are in file names; everything else is %XX.
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# Longest encoded name before it is cut and hashed (NAME_MAX is 255 bytes,
# and a temporary file adds nothing to the name's length).
_MAX_ENCODED = 180

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
# absent: secrets must never reach the disk through these files.
FIELDS = _STRINGS + _DURATIONS + _BOOLEANS + RESTORED_FIELDS


@dataclasses.dataclass
class StoredState:
    """What the state held: decoded client fields and the previous settings."""

    # name -> field -> value (timedelta, datetime or None, bool, int, str)
    clients: dict[str, dict[str, object]]
    # name -> clients.conf setting -> text
    previous_config: dict[str, dict[str, str]]


def client_file_name(name: str) -> str:
    """The name of the file holding client ``name``'s state (see the module doc)."""
    raw = name.encode("utf-8", "surrogatepass")
    encoded = "".join(chr(byte) if byte in _SAFE_BYTES else f"%{byte:02X}" for byte in raw)
    if not encoded:
        encoded = "%"  # the empty name: "%" alone is no other name's encoding
    if len(encoded) > _MAX_ENCODED:
        cut = encoded[:_MAX_ENCODED - 64]
        if "%" in cut[-2:]:  # do not leave half an escape
            cut = cut[:cut.rindex("%")]
        encoded = cut + "~" + hashlib.sha256(raw).hexdigest()
    return encoded + _CLIENT_SUFFIX


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


def client_document(name: str, fields: dict[str, object],
                    settings: dict[str, str] | None) -> dict[str, object]:
    """What a client's file holds: ``fields`` as :func:`snapshot` gives them."""
    return {"version": VERSION, "name": name, "fields": fields, "previous_config": settings}


def snapshot(client: Client) -> dict[str, object]:
    """The client's stored fields, encoded for JSON: cheap, done on the event loop."""
    return _encode_client(client)


# -- the files ----------------------------------------------------------------

class StateFile:
    """The state directory: load the saved state, write clients' files atomically."""

    def __init__(self, statedir: str) -> None:
        self.statedir = statedir
        self.path = os.path.join(statedir, FILE_NAME)  # the index
        self.clients_dir = os.path.join(statedir, CLIENTS_DIRECTORY)

    # -- reading -------------------------------------------------------------

    def load(self) -> StoredState | None:
        """The saved state, or None to start from ``clients.conf`` alone.

        No saved state at all gives a warning and None.  A client file (or
        a version 1 ``clients.json``) that is corrupt, truncated or cannot
        be decoded is ignored with a warning: that client (or, for the old
        single file, every client) starts fresh.  Other I/O errors (e.g.
        permissions) raise OSError: the administrator must look at them.
        """
        self._ignore_original_state()
        self._remove_stale_temp_files(self.statedir, _INDEX_TEMP_PREFIX)
        self._remove_stale_temp_files(self.clients_dir, _TEMP_PREFIX)
        old = self._load_old_single_file()
        if old is not None:
            return old
        try:
            names = os.listdir(self.clients_dir)
        except FileNotFoundError:
            if not os.path.lexists(self.path):
                log.warning("No saved state in %s; starting from clients.conf only",
                            self.clients_dir)
            return None
        stored = StoredState(clients={}, previous_config={})
        for file_name in sorted(names):
            if file_name.startswith(".") or not file_name.endswith(_CLIENT_SUFFIX):
                continue
            self._load_client_file(file_name, stored)
        return stored

    def _load_client_file(self, file_name: str, stored: StoredState) -> None:
        path = os.path.join(self.clients_dir, file_name)
        with open(path, "rb") as file:
            data = file.read()
        try:
            document = json.loads(data)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            if document.get("version") != VERSION:
                raise ValueError(f"unknown version {document.get('version')!r}")
            name = document.get("name")
            if not isinstance(name, str):
                raise ValueError("no client name")
            if client_file_name(name) != file_name:
                raise ValueError(f"it holds client {name!r}, whose file is "
                                 f"{client_file_name(name)!r}")
            fields = _decode_client(document.get("fields"))
            settings = document.get("previous_config")
            settings = None if settings is None else _decode_settings(settings)
        except (ValueError, OverflowError, RecursionError) as err:
            # ValueError includes JSONDecodeError and UnicodeDecodeError.
            log.warning("Ignoring corrupt state file %s (%s); that client starts from "
                        "clients.conf only", path, err)
            return
        stored.clients[name] = fields
        if settings is not None:
            stored.previous_config[name] = settings

    def _load_old_single_file(self) -> StoredState | None:
        """The state of a version 1 ``clients.json`` (migration), or None if there is none."""
        try:
            with open(self.path, "rb") as file:
                data = file.read()
        except FileNotFoundError:
            return None
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as err:
            log.warning("Ignoring corrupt state file %s (%s)", self.path, err)
            return None
        if not isinstance(document, dict) or document.get("version") != _OLD_VERSION:
            return None  # the index, or something unusable: the directory is what counts
        try:
            clients = document.get("clients")
            previous = document.get("previous_config")
            if not isinstance(clients, dict) or not isinstance(previous, dict):
                raise ValueError("clients or previous_config is not an object")
            previous_config = {name: _decode_settings(settings)
                               for name, settings in previous.items()}
        except ValueError as err:
            log.warning("Ignoring unusable state file %s (%s); starting from clients.conf "
                        "only", self.path, err)
            return None
        log.info("Reading the state of %s (single-file layout); it is replaced by %s/ "
                 "at the next save", self.path, self.clients_dir)
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
                        "state starts from clients.conf and %s", original,
                        self.clients_dir)

    @staticmethod
    def _remove_stale_temp_files(directory: str, prefix: str) -> None:
        """Remove temporary files left behind by a save that was killed."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(prefix) and name.endswith(_TEMP_SUFFIX):
                path = os.path.join(directory, name)
                try:
                    if stat.S_ISREG(os.lstat(path).st_mode):
                        os.unlink(path)
                except FileNotFoundError:
                    pass

    # -- writing -------------------------------------------------------------

    def save(self, registry: Iterable[Client], configs: dict[str, ClientConfig]) -> None:
        """Write every client's file, remove the others; raises OSError.

        ``registry`` is every current client (a ClientRegistry will do);
        ``configs`` the clients.conf the server was started with.  This is
        the whole state at once; :class:`StateSaver` writes only what changed.
        """
        documents = {}
        for client in registry:
            config = configs.get(client.name)
            documents[client.name] = client_document(
                client.name, snapshot(client), dict(config.settings) if config else None)
        self.write(documents, names=list(documents), full=True)

    def write(self, documents: dict[str, dict[str, object] | None],
              names: Iterable[str] | None = None, full: bool = False) -> None:
        """Write (or, for None, delete) the given clients' files; raises OSError.

        One fsync of the directory follows all of them.  With ``full``, the
        files of clients not in ``documents`` are deleted too.  With
        ``names`` (every current client), the index is rewritten afterwards.
        """
        try:
            os.mkdir(self.clients_dir, 0o700)
        except FileExistsError:
            pass
        keep = set()
        for name, document in documents.items():
            file_name = client_file_name(name)
            if document is None:
                self.delete_file(file_name)
            else:
                keep.add(file_name)
                self.write_file(self.clients_dir, file_name,
                                json.dumps(document, indent=1).encode("utf-8") + b"\n")
        if full:
            for file_name in os.listdir(self.clients_dir):
                if (file_name.endswith(_CLIENT_SUFFIX) and not file_name.startswith(".")
                        and file_name not in keep):
                    self.delete_file(file_name)
        _fsync_directory(self.clients_dir)
        if names is not None:
            index = {"version": VERSION, "directory": CLIENTS_DIRECTORY,
                     "clients": {name: client_file_name(name) for name in names}}
            self.write_file(self.statedir, FILE_NAME,
                            json.dumps(index, indent=1).encode("utf-8") + b"\n")
            _fsync_directory(self.statedir)

    def delete_file(self, file_name: str) -> None:
        """Delete a client's file (the caller makes it durable with a directory fsync)."""
        try:
            os.unlink(os.path.join(self.clients_dir, file_name))
        except FileNotFoundError:
            pass

    def write_file(self, directory: str, file_name: str, data: bytes) -> None:
        """Replace one file atomically: a reader (or a crash) sees old or new, never half.

        mkstemp creates the temporary file with O_CREAT|O_EXCL (never
        follows or reuses a file or symlink placed there) and mode 0600 (the
        state tells when clients were seen and how they are checked: not for
        other users).  It lives in the same directory so that the rename is
        atomic; fsync of the file before the rename makes sure the new name
        never points to data not yet on disk.  The caller then fsyncs the
        directory, once for many files, to make the renames durable.
        """
        prefix = _INDEX_TEMP_PREFIX if file_name == FILE_NAME else _TEMP_PREFIX
        fd, temp_path = tempfile.mkstemp(prefix=prefix, suffix=_TEMP_SUFFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, os.path.join(directory, file_name))
        except BaseException:
            try:
                os.unlink(temp_path)
            except FileNotFoundError:
                pass
            raise


def _fsync_directory(path: str) -> None:
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
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

# Client attributes that are part of the state; other changes
# (checker_running, approvals_pending, the secret) need no save.
_SAVED_ATTRIBUTES = frozenset(FIELDS)
# Events that may matter even when no saved attribute changed value.
_SAVED_SIGNALS = frozenset({"CheckerCompleted", "GotSecret", "NeedApproval"})


class StateSaver(ClientObserver, ServerObserver):
    """Saves a client's state soon after every change of it that matters.

    Creating it attaches it to the registry and to every client in it, and
    to every client added later.  A change marks the client dirty and
    schedules one hand-off for the next event loop iteration, so a burst of
    changes made in one callback (say a checker result: status,
    last_checked_ok and expiry together) is one snapshot and one write.
    The hand-off, on the loop, snapshots the dirty clients' fields (small
    dicts, a consistent view of each client) and passes them to a single
    writer thread, which encodes and writes their files in the background
    (the latest snapshot of a client wins; one directory fsync per pass).
    """

    def __init__(self, state_file: StateFile, registry: ClientRegistry,
                 configs: dict[str, ClientConfig]) -> None:
        self.state_file = state_file
        self.registry = registry
        self.configs = configs
        # clients.conf text of each client, copied once: written with its fields.
        self._settings = {name: dict(config.settings) for name, config in configs.items()}
        # Event loop side: what the next hand-off takes.
        self._handle: asyncio.Handle | None = None  # the scheduled hand-off, if any
        self._dirty: set[str] = set()  # names of clients changed (or removed) since
        self._everything = False  # every client and the index are owed (save_soon)
        self._names_changed = False  # the index is owed
        self._closed = False
        # Shared with the writer thread, under self._lock.
        self._lock = threading.Condition()
        self._queue: dict[str, dict[str, object] | None] = {}  # name -> document or None
        self._queue_names: list[str] | None = None  # index to write, if any
        self._queue_full = False  # delete the files of clients not in the queue
        self._requested = 0  # hand-offs so far
        self._done = 0  # hand-offs that the writer has finished a pass for
        self._busy = False  # the writer is writing
        self._last_ok = True  # its last pass wrote everything
        self._stop = False
        self._thread: threading.Thread | None = None
        registry.observers.append(self)
        for client in registry:
            self._watch(client)

    def _watch(self, client: Client) -> None:
        if self not in client.observers:
            client.observers.append(self)

    @property
    def pending(self) -> bool:
        """A save is scheduled, owed (e.g. it failed) or being written."""
        if (self._handle is not None or self._dirty or self._everything
                or self._names_changed):
            return True
        with self._lock:
            return (self._busy or bool(self._queue) or self._queue_names is not None
                    or self._queue_full or self._done < self._requested)

    def save_soon(self) -> None:
        """Save every client and the index soon (on the next event loop iteration)."""
        if self._closed:
            return
        self._everything = True
        self._schedule()

    def _mark(self, name: str) -> None:
        if self._closed:
            return
        self._dirty.add(name)
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._hand_off()  # no loop to batch changes on: hand it over now
            return
        self._handle = loop.call_soon(self._hand_off)

    def _hand_off(self) -> None:
        """Snapshot what changed and give it to the writer (on the event loop)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        clients = self.registry.clients
        names = list(clients) if self._everything else ()
        documents: dict[str, dict[str, object] | None] = {}
        for name in (*names, *self._dirty):
            client = clients.get(name)
            documents[name] = None if client is None else client_document(
                name, snapshot(client), self._settings.get(name))
        index = list(clients) if self._everything or self._names_changed else None
        full = self._everything
        self._dirty.clear()
        self._everything = self._names_changed = False
        with self._lock:
            self._queue.update(documents)
            if index is not None:
                self._queue_names = index
            self._queue_full = self._queue_full or full
            self._requested += 1
            self._lock.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop,
                                                name="mandos-state-writer", daemon=True)
                self._thread.start()

    def _write_loop(self) -> None:
        """The writer thread: one pass per batch of hand-offs, until told to stop."""
        while True:
            with self._lock:
                while self._done == self._requested and not self._stop:
                    self._lock.wait()
                if self._done == self._requested:  # stopping, and nothing is owed
                    return
                target = self._requested
                documents, self._queue = self._queue, {}
                names, self._queue_names = self._queue_names, None
                full, self._queue_full = self._queue_full, False
                self._busy = True
            try:
                self.state_file.write(documents, names, full)
                ok = True
            except Exception as err:  # noqa: BLE001 - keep serving; retried later
                # OSError, normally (a full disk, a removed directory).
                log.warning("Could not save persistent state in %s: %s",
                            self.state_file.clients_dir, err)
                ok = False
            with self._lock:
                if not ok:
                    # Owed again, unless a newer snapshot came in meanwhile;
                    # the next hand-off (a change, or flush) tries again.
                    for name, document in documents.items():
                        self._queue.setdefault(name, document)
                    if self._queue_names is None:
                        self._queue_names = names
                    self._queue_full = self._queue_full or full
                self._busy = False
                self._done = target
                self._last_ok = ok
                self._lock.notify_all()

    def flush(self) -> bool:
        """Write everything owed, and the index, now; True once all of it is on disk.

        Blocks until the writer has finished (at shutdown, or in tests).
        After close() there is no writer: it only says whether all was written.
        """
        if self._closed:
            with self._lock:
                return self._last_ok and not self._queue
        self._names_changed = True
        self._hand_off()
        with self._lock:
            target = self._requested
            while self._done < target:
                self._lock.wait()
            return self._last_ok and not self._queue

    def close(self) -> None:
        """Save what is pending, stop following changes and stop the writer.

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
        with self._lock:
            self._stop = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- observer callbacks ------------------------------------------------

    def property_changed(self, client: Client, name: str) -> None:
        if name in _SAVED_ATTRIBUTES:
            self._mark(client.name)

    def client_signal(self, client: Client, signal: str, *args) -> None:
        if signal in _SAVED_SIGNALS:
            self._mark(client.name)

    def client_added(self, client: Client) -> None:
        self._watch(client)
        self._names_changed = True
        self._mark(client.name)

    def client_removed(self, client: Client) -> None:
        if self in client.observers:
            client.observers.remove(self)
        self._names_changed = True
        self._mark(client.name)
