"""OpenPGP for Mandos: a throw-away GnuPG home, key import, decryption, encryption.

The client decrypts the secret it receives with its own OpenPGP key
(``pubkey.txt`` / ``seckey.txt``) inside a GnuPG home directory that exists
only for the run (PROTOCOL.md §3.8, CLIENT.md §2.13); the key generator uses
the same kind of home to create keys and to encrypt passwords
(PROTOCOL.md §4.2, §4.4).  ``gpg`` (GnuPG 2.2) is driven through
``python-gnupg``, which is imported only when a home is first used.

Secrets handled here (the decrypted password, the secret key) are passed to
``gpg`` through pipes only; none is written to a file outside the GnuPG home
or to a log.  python-gnupg logs data read from ``gpg`` (the plaintext among
it) at DEBUG level; a filter on its logger removes those messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import time

from mandos.keys import KeyFileError, SecretBytes, read_key_file

# typing.TYPE_CHECKING without importing typing (2 ms at boot); type
# checkers treat any constant of this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Callable, ContextManager, Iterable, Optional, Sequence

    import gnupg

    from mandos.keys import StrPath

logger = logging.getLogger(__name__)

#: Where throw-away homes are created, first usable one wins (CLIENT.md §2.4).
DEFAULT_BASES = ("/run/tmp", "/tmp")
HOME_PREFIX = "mandos"
PUBKEY_NAME = "pubkey.txt"
SECKEY_NAME = "seckey.txt"

#: Options given to every gpg run: no gpg.conf is read; the other two are the
#: original key generator's (the trust model only matters when encrypting to
#: the client's key, which nothing else certifies).
GPG_OPTIONS = ("--no-options", "--enable-dsa2", "--trust-model", "always")

# gpg-agent puts sockets such as S.gpg-agent.browser into the home (unless
# /run/user/UID exists); a Unix socket path holds at most 107 bytes.
_MAX_HOME_LENGTH = 107 - len("/S.gpg-agent.browser")
# An armoured RSA-4096 secret key is about 7 kB.
_MAX_OPENPGP_KEY_FILE_SIZE = 1024 * 1024
_AGENT_EXIT_WAIT = 2.0

_STATUS_LINE = re.compile(r"^\[GNUPG:\] (\S+) ?(.*)$", re.MULTILINE)


class OpenPGPError(Exception):
    """An OpenPGP operation failed."""


class KeyImportError(OpenPGPError, KeyFileError):
    """gpg did not import a key file.  ``stats`` holds gpg's import statistics."""

    def __init__(self, path: StrPath, message: str,
                 stats: Optional["ImportStats"] = None) -> None:
        self.stats = stats
        KeyFileError.__init__(self, path, message)


class DecryptError(OpenPGPError):
    """A message could not be decrypted.  The message text holds gpg's status, never data."""


class EncryptError(OpenPGPError):
    """A message could not be encrypted."""


class KeyGenerationError(OpenPGPError):
    """gpg did not create or export a key."""


class ImportStats:
    """The numbers of gpg's IMPORT_RES status line, in gpg's order."""

    FIELDS = ("count", "no_user_id", "imported", "imported_rsa", "unchanged", "n_uids",
              "n_subk", "n_sigs", "n_revoc", "sec_read", "sec_imported", "sec_dups",
              "skipped_new_keys", "not_imported", "skipped_v3_keys")
    __slots__ = FIELDS

    def __init__(self, **counts: int) -> None:
        unknown = set(counts) - set(self.FIELDS)
        if unknown:
            raise TypeError(f"unknown import statistics: {', '.join(sorted(unknown))}")
        for name in self.FIELDS:
            setattr(self, name, int(counts.get(name, 0)))

    @classmethod
    def from_status(cls, status_text: str) -> "ImportStats":
        """Parse the last IMPORT_RES line of gpg's status output (all zero if none)."""
        values: list[int] = []
        for keyword, rest in _STATUS_LINE.findall(status_text or ""):
            if keyword == "IMPORT_RES":
                values = [int(v) for v in rest.split() if v.isdigit()]
        return cls(**dict(zip(cls.FIELDS, values)))

    @property
    def failed(self) -> bool:
        """CLIENT.md §2.13: (fewer than one imported or any not imported) and none unchanged."""
        return (self.imported < 1 or self.not_imported >= 1) and self.unchanged == 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ImportStats):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.FIELDS)

    def __str__(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)}" for name in self.FIELDS)

    def __repr__(self) -> str:
        return f"ImportStats({str(self)})"


def _status_keywords(status_text: str) -> list[tuple[str, str]]:
    return _STATUS_LINE.findall(status_text or "")


def _gpg_messages(stderr: str, limit: int = 400) -> str:
    """gpg's own human-readable error lines (never data), shortened."""
    lines = [line.strip() for line in (stderr or "").splitlines()
             if line.startswith("gpg:")]
    text = "; ".join(lines)
    return text if len(text) <= limit else text[:limit] + "..."


# --- logging protection ------------------------------------------------------

# python-gnupg 0.4.9 logs, at DEBUG, every chunk read from gpg's stdout (the
# plaintext when decrypting, the secret key when exporting), the first bytes
# of imported key data and of encrypt/decrypt/export results.  Only the DEBUG
# messages below carry no data; every other DEBUG message of the "gnupg"
# logger is dropped.  An allow-list also covers messages of later versions.
_SAFE_GNUPG_DEBUG_TEMPLATES = frozenset({
    "%s: %s",                          # pid and command line
    "%s",                              # a line of gpg's status/stderr output
    "message ignored: %s, %s",         # a status line
    "closed output, %d bytes sent",
    "data copier: %r, %r, %r",
    "stderr reader: %r",
    "stdout reader: %r",
})


# python-gnupg warns of every non-zero gpg exit; our callers report those
# failures themselves, with gpg's own messages.
_REDUNDANT_GNUPG_WARNINGS = frozenset({"gpg returned a non-zero error code: %d"})


class GnupgLogFilter(logging.Filter):
    """Drops python-gnupg DEBUG records that may contain key material or
    plaintext, and its warnings that repeat what our own errors say."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            return record.msg not in _REDUNDANT_GNUPG_WARNINGS
        return isinstance(record.msg, str) and record.msg in _SAFE_GNUPG_DEBUG_TEMPLATES


def protect_gnupg_logger() -> None:
    """Install GnupgLogFilter on the ``gnupg`` logger (once)."""
    gnupg_logger = logging.getLogger("gnupg")
    if not any(isinstance(f, GnupgLogFilter) for f in gnupg_logger.filters):
        gnupg_logger.addFilter(GnupgLogFilter())


# --- the clock work-around ---------------------------------------------------

def clock_looks_unset(now: Optional[float] = None) -> bool:
    """True if the clock cannot be read or shows a date in January 1970 (UTC).

    A machine without a real-time clock boots into January 1970; gpg then
    refuses keys that seem to have been created in the future (CLIENT.md §2.13).
    ``now`` (seconds since the epoch) replaces the real clock, for tests.
    """
    if now is None:
        try:
            now = time.clock_gettime(time.CLOCK_REALTIME)
        except OSError:
            return True
    try:
        t = time.gmtime(now)
    except (OverflowError, OSError, ValueError):
        return False
    return t.tm_year == 1970 and t.tm_mon == 1


def _set_realtime_clock(seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, seconds)


def set_clock_from_file(path: StrPath, *,
                        privileged: Optional[Callable[[], ContextManager]] = None,
                        set_clock: Optional[Callable[[float], None]] = None) -> bool:
    """Set the real-time clock to the modification time of ``path``.

    ``privileged`` is a context-manager factory under which the clock is set
    (the client raises its effective UID to 0 there).  ``set_clock`` replaces
    the real setter, for tests.  Failures are logged, never raised; returns
    whether the clock was set.
    """
    try:
        mtime = os.stat(path).st_mtime
    except OSError as e:
        logger.warning("cannot read the time of %s to set the clock: %s", path, e.strerror)
        return False
    setter = set_clock or _set_realtime_clock
    try:
        with (privileged() if privileged is not None else contextlib.nullcontext()):
            setter(mtime)
    except OSError as e:
        logger.warning("cannot set the clock to the time of %s: %s", path, e.strerror or e)
        return False
    logger.info("clock set to %s from %s",
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mtime)), path)
    return True


# --- the home directory ------------------------------------------------------

def default_base(candidates: Sequence[str] = DEFAULT_BASES) -> str:
    """The first of ``candidates`` that is a directory we can create entries in.

    Falls back to the last candidate even if the check fails, so that the
    error (if any) comes from creating the home itself.
    """
    use_euid = os.access in os.supports_effective_ids
    for candidate in candidates:
        if (os.path.isdir(candidate)
                and os.access(candidate, os.W_OK | os.X_OK, effective_ids=use_euid)):
            return candidate
    return candidates[-1]


def _read_proc_file(pid: str, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _remove_tree(path: str) -> None:
    """Remove a directory tree without following symbolic links."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        _empty_directory(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _empty_directory(dir_fd: int) -> None:
    with os.scandir(dir_fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        try:
            if is_dir:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                             dir_fd=dir_fd)
                try:
                    _empty_directory(fd)
                finally:
                    os.close(fd)
                os.rmdir(name, dir_fd=dir_fd)
            else:
                os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass  # gone meanwhile (gpg-agent removing its sockets)


def make_private_directory(base: str, prefix: str) -> str:
    """Create ``<base>/<prefix>XXXXXXXX`` with mode 0700 and return its path.

    What ``tempfile.mkdtemp`` does, without the import cost of ``tempfile``
    (which pulls in ``shutil`` and ``random``) on the boot path.
    """
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789_"
    for _ in range(100):
        name = prefix + "".join(alphabet[b % len(alphabet)] for b in os.urandom(8))
        path = os.path.join(base, name)
        try:
            os.mkdir(path, 0o700)  # fails if it exists: no one else's directory is reused
        except FileExistsError:
            continue
        return os.path.abspath(path)
    raise FileExistsError(f"no free directory name in {base}")


def agent_pids(home: str) -> list[int]:
    """PIDs of live gpg-agent processes serving the GnuPG home ``home``."""
    wanted = os.fsencode(home)
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for pid in entries:
        if not pid.isdigit():
            continue
        try:
            argv = _read_proc_file(pid, "cmdline").split(b"\0")
            if not argv or os.path.basename(argv[0]) != b"gpg-agent":
                continue
            serves_home = any(
                (arg == b"--homedir" and i + 1 < len(argv) and argv[i + 1] == wanted)
                or arg == b"--homedir=" + wanted
                for i, arg in enumerate(argv))
            if not serves_home:
                continue
            stat = _read_proc_file(pid, "stat")
            state = stat[stat.rindex(b")") + 2:][:1]
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if state not in (b"Z", b"X"):
            pids.append(int(pid))
    return pids


class GnuPGHome:
    """A private GnuPG home directory that lives as long as this object.

    The directory is made like ``mkdtemp`` does it (mode 0700, owned by the effective
    user) as ``<base>/mandosXXXXXXXX``, with ``base`` from ``default_base()``
    (``/run/tmp`` if usable, else ``/tmp``) unless given.  Use it as a context
    manager, or call ``close()`` in a ``finally`` block.  ``close()`` stops the
    gpg-agent that gpg started for this home and removes the directory; it is
    idempotent, does nothing in a forked child (the home belongs to the
    process that made it) and may also be called from a signal handler.
    Installing a handler for SIGTERM and friends is the caller's job; the
    simplest correct handler raises an exception (e.g. SystemExit) so that the
    ``with`` block or ``finally`` runs ``close()``.
    """

    def __init__(self, base: Optional[StrPath] = None, *, gpg_binary: str = "gpg",
                 gpgconf_binary: str = "gpgconf") -> None:

        base = os.fspath(base) if base is not None else default_base()
        self.gpg_binary = gpg_binary
        self.gpgconf_binary = gpgconf_binary
        self._owner_pid = os.getpid()
        self._gpg: Optional["gnupg.GPG"] = None
        self._closed = False
        self._launcher = 0
        # Process file descriptors of this home's gpg-agent (see track_agent),
        # and whether an agent may run that is not among them.
        self._agent_pidfds: list[int] = []
        self._untracked_agent = False
        # Unpredictable name, exclusive creation, mode 0700, so no other
        # user can plant files in or read the imported secret key from it.
        self.path = make_private_directory(base, HOME_PREFIX)
        if len(os.fsencode(self.path)) > _MAX_HOME_LENGTH:
            logger.warning("GnuPG home %s is too long for gpg-agent's sockets; "
                           "use a shorter base directory", self.path)
        logger.debug("created GnuPG home %s", self.path)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.path} {state}>"

    def __enter__(self) -> "GnuPGHome":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether close() has completed."""
        return self._closed

    # -- gpg plumbing

    def _new_gpg(self, extra_options: Iterable[str] = ()) -> "gnupg.GPG":
        import gnupg

        protect_gnupg_logger()
        return gnupg.GPG(gpgbinary=self.gpg_binary, gnupghome=self.path,
                         options=[*GPG_OPTIONS, *extra_options])

    def _gnupg(self) -> "gnupg.GPG":
        if self._closed:
            raise OpenPGPError(f"GnuPG home {self.path} is closed")
        if self._gpg is None:
            self._gpg = self._new_gpg()
        if not self._agent_pidfds:
            self._untracked_agent = True  # gpg starts one when it needs it
        return self._gpg

    # -- keys

    def import_key_file(self, path: StrPath, *,
                        privileged: Optional[Callable[[], ContextManager]] = None,
                        clock: Optional[Callable[[], float]] = None,
                        set_clock: Optional[Callable[[float], None]] = None) -> ImportStats:
        """Import one armoured (or binary) key file; return gpg's statistics.

        Applies the January-1970 clock work-around first (see
        ``clock_looks_unset``; ``clock`` and ``set_clock`` replace the real
        clock, for tests).  Raises a KeyFileError: MissingKeyFile,
        UnreadableKeyFile, EmptyKeyFile, MalformedKeyFile, or KeyImportError
        if gpg imported nothing by the rule of CLIENT.md §2.13.
        """
        path = os.fspath(path)
        data = read_key_file(path, _MAX_OPENPGP_KEY_FILE_SIZE)
        if clock_looks_unset(clock() if clock is not None else None):
            set_clock_from_file(path, privileged=privileged, set_clock=set_clock)
        result = self._gnupg().import_keys(data)
        # python-gnupg 0.4.9 maps IMPORT_RES's fields to the wrong names from
        # the 13th on (gpg 2.2 prints 15), so the line is parsed here.
        stats = ImportStats.from_status(result.stderr)
        logger.debug("imported %s: %s", path, stats)
        if stats.failed:
            detail = _gpg_messages(result.stderr)
            raise KeyImportError(path, f"gpg imported no key ({stats})"
                                       + (f": {detail}" if detail else ""), stats)
        return stats

    def import_keys(self, pubkey_path: StrPath, seckey_path: StrPath, *,
                    privileged: Optional[Callable[[], ContextManager]] = None,
                    clock: Optional[Callable[[], float]] = None,
                    set_clock: Optional[Callable[[float], None]] = None,
                    ) -> ImportStats:
        """Import ``pubkey.txt`` then ``seckey.txt`` in one gpg run; return its statistics.

        One run instead of one per file saves a gpg start at every boot.
        The clock work-around is applied for each file as in
        ``import_key_file``.  Raises KeyImportError if the §2.13 rule fails
        for the pair, or if no secret key was read (a broken ``seckey.txt``
        must fail here, not as an undecryptable secret later).
        """
        paths = [os.fspath(pubkey_path), os.fspath(seckey_path)]
        data = [read_key_file(path, _MAX_OPENPGP_KEY_FILE_SIZE) for path in paths]
        self._reap_launcher()  # the agent is up before gpg looks for it
        if clock_looks_unset(clock() if clock is not None else None):
            for path in paths:
                set_clock_from_file(path, privileged=privileged, set_clock=set_clock)
        result = self._gnupg().import_keys(b"\n".join(data))
        stats = ImportStats.from_status(result.stderr)
        logger.debug("imported %s and %s: %s", *paths, stats)
        detail = _gpg_messages(result.stderr)
        detail = f": {detail}" if detail else ""
        if stats.failed:
            # Rare: find out which file is at fault, so the message names it.
            for path, key_data in zip(paths, data):
                single = ImportStats.from_status(self._gnupg().import_keys(key_data).stderr)
                if single.failed:
                    raise KeyImportError(path, f"gpg imported no key ({single}){detail}",
                                         single)
            raise KeyImportError(paths[0], f"gpg imported no key ({stats}){detail}", stats)
        if stats.sec_read < 1 or stats.sec_imported + stats.sec_dups < 1:
            raise KeyImportError(paths[1], f"gpg imported no secret key ({stats}){detail}",
                                 stats)
        self.track_agent()
        return stats

    def fingerprints(self, secret: bool = False) -> list[str]:
        """Fingerprints of the primary keys in this home, in keyring order."""
        return [k["fingerprint"] for k in self._gnupg().list_keys(secret=secret)]

    def generate_key(self, name: str, email: str = "", comment: str = "",
                     key_type: str = "RSA", key_length: int = 4096,
                     subkey_type: str = "RSA", subkey_length: int = 4096,
                     expire: str = "0", *, key_curve: str = "",
                     subkey_curve: str = "") -> str:
        """Generate an unprotected key pair as the original key generator does.

        Primary key usable for sign and auth, one subkey for encrypt, user ID
        ``NAME[ (COMMENT)][ <EMAIL>]`` (PROTOCOL.md §4.2).  ``key_curve`` /
        ``subkey_curve`` replace the lengths for elliptic-curve types
        (e.g. ``EDDSA``/``ed25519`` and ``ECDH``/``cv25519``).  Returns the
        primary key's fingerprint.
        """
        parameters = key_parameters(name, email, comment, key_type, key_length, subkey_type,
                                    subkey_length, expire, key_curve=key_curve,
                                    subkey_curve=subkey_curve)
        result = self._gnupg().gen_key(parameters)
        if not result.fingerprint:
            raise KeyGenerationError(
                f"gpg did not create a key: {_gpg_messages(result.stderr) or result.status}")
        logger.debug("generated OpenPGP key %s", result.fingerprint)
        return result.fingerprint

    def export_keys(self, fingerprint: Optional[str] = None,
                    comment: Optional[str] = None) -> tuple[str, str]:
        """Export ``(public, secret)`` keys, ASCII-armoured, with ``export-minimal``.

        ``comment`` becomes the armour's ``Comment:`` header (see
        ``key_comment``).  Without ``fingerprint`` all keys are exported.
        """
        if comment is not None and any(c in comment for c in "\r\n\0"):
            raise ValueError("comment must not contain line breaks")
        gpg = (self._new_gpg(["--comment", comment]) if comment is not None
               else self._gnupg())
        keyids = [fingerprint] if fingerprint else []
        public = gpg.export_keys(keyids, armor=True, minimal=True)
        secret = gpg.export_keys(keyids, secret=True, armor=True, minimal=True,
                                 expect_passphrase=False)
        if not public or not secret:
            raise KeyGenerationError(f"gpg exported no key from {self.path}")
        return public, secret

    # -- messages

    def decrypt(self, data: bytes) -> SecretBytes:
        """Decrypt a binary or ASCII-armoured OpenPGP message; return the plaintext exactly.

        Signatures are not checked (``--skip-verify``), as in the original
        client.  Raises DecryptError, whose text holds gpg's status and error
        lines but no data.
        """
        if not data:
            raise DecryptError("no data to decrypt")
        result = self._gnupg().decrypt(bytes(data), extra_args=["--skip-verify"])
        statuses = _status_keywords(result.stderr)
        keywords = {keyword for keyword, _ in statuses}
        for keyword, rest in statuses:
            if keyword in ("ENC_TO", "NO_SECKEY", "DECRYPTION_INFO", "ERROR", "FAILURE"):
                logger.debug("gpg: %s %s", keyword, rest)
        if ("DECRYPTION_OKAY" not in keywords
                or keywords & {"DECRYPTION_FAILED", "BADMDC"}):
            # result.data may hold partly decrypted output: it is dropped.
            detail = _gpg_messages(result.stderr)
            raise DecryptError(f"decryption failed (status: {result.status or 'none'}, "
                               f"exit {result.returncode})" + (f": {detail}" if detail else ""))
        return SecretBytes(result.data)

    def encrypt(self, plaintext: bytes, recipient_fingerprint: str, sign: bool = True) -> bytes:
        """Encrypt to ``recipient_fingerprint`` and, by default, sign with that key.

        Returns a binary OpenPGP message, as ``mandos-keygen --password``
        produces it before armouring (PROTOCOL.md §4.4: trust model "always",
        gpg's default compression).
        """
        if not recipient_fingerprint:
            raise ValueError("a recipient fingerprint is needed")
        result = self._gnupg().encrypt(bytes(plaintext), [recipient_fingerprint],
                                       sign=recipient_fingerprint if sign else None,
                                       armor=False)
        if not result.ok or result.returncode != 0 or not result.data:
            detail = _gpg_messages(result.stderr)
            raise EncryptError(f"encryption to {recipient_fingerprint} failed "
                               f"(status: {result.status or 'none'})"
                               + (f": {detail}" if detail else ""))
        return bytes(result.data)

    # -- the end

    def close(self) -> None:
        """Stop this home's gpg-agent and remove the home; safe to call any number of times."""
        if self._closed or os.getpid() != self._owner_pid:
            return
        try:
            self._reap_launcher()
            self.stop_agent()
        finally:
            self._remove_home()
            self._gpg = None
            self._closed = True

    def track_agent(self) -> None:
        """Remember this home's running gpg-agent, so that stopping it is quick.

        Call it when the agent is up and time is not short (the client does
        after the key import, while it waits for the server).  The agent is
        held by a process file descriptor: it is signalled exactly, even if
        its PID were reused meanwhile, and without another /proc scan.
        """
        if self._agent_pidfds or not hasattr(os, "pidfd_open"):
            return
        for pid in agent_pids(self.path):
            try:
                self._agent_pidfds.append(os.pidfd_open(pid))
            except OSError:
                pass  # gone meanwhile; close() scans for agents then
        if self._agent_pidfds:
            # gpg uses the running agent; it starts no other one.
            self._untracked_agent = False

    def stop_agent(self) -> None:
        """Kill this home's gpg-agent now; a later gpg run starts a new one if needed.

        The agent holds the imported secret key in memory: it must not
        outlive the home.  It is killed outright: a SIGTERM'd agent takes
        tens of milliseconds to wind down, and all it would clean up is its
        sockets, which go with the home anyway.  SIGKILL cannot be caught,
        so a tracked agent is not waited for: it never runs again, and the
        kernel frees its memory while we go on (that takes milliseconds).
        """
        if os.path.isdir(f"/run/user/{os.getuid()}") and self._gpg is not None:
            self._gpgconf("--remove-socketdir")  # sockets live outside the home
        pidfds, self._agent_pidfds = self._agent_pidfds, []
        for fd in pidfds:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.close(fd)
        if self._untracked_agent:
            self._kill_agents_by_scan()
            self._untracked_agent = False

    def _kill_agents_by_scan(self) -> None:
        """Find this home's agents in /proc, kill them and wait until they are gone."""
        pids = agent_pids(self.path)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _AGENT_EXIT_WAIT
        while pids and time.monotonic() < deadline:
            time.sleep(0.001)
            pids = agent_pids(self.path)
        if pids:
            logger.warning("gpg-agent for %s did not exit (pids %s)", self.path, pids)

    def launch_agent(self) -> None:
        """Start this home's gpg-agent now, in the background.

        gpg would start it on the first secret-key operation and wait for
        it; launching it early lets its start overlap with other work.
        ``gpg-agent --daemon`` returns once its socket exists; that process
        is reaped in ``close()`` or by ``import_keys``.
        """
        try:
            null = os.open(os.devnull, os.O_RDWR)
            try:
                actions = [(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)]
                self._launcher = os.posix_spawnp(
                    "gpg-agent", ["gpg-agent", "--homedir", self.path, "--daemon"],
                    os.environ, file_actions=actions)
                self._untracked_agent = True
            finally:
                os.close(null)
        except OSError as err:
            logger.debug("could not launch gpg-agent early: %s", err)

    def _reap_launcher(self) -> None:
        pid = self._launcher
        if pid:
            self._launcher = 0
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _gpgconf(self, *args: str) -> None:
        import subprocess

        try:
            subprocess.run([self.gpgconf_binary, "--homedir", self.path, *args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            logger.debug("gpgconf %s failed: %s", " ".join(args), e)

    def _remove_home(self) -> None:
        # Entries are removed through directory file descriptors and never
        # through symbolic links, so a link planted in the home cannot make
        # us delete anything outside it.  This covers the rule of CLIENT.md
        # §2.13 (private-keys-v1.d emptied, then removed) and any other
        # directory gpg creates (openpgp-revocs.d on key generation).
        # (shutil.rmtree would do, but importing shutil costs milliseconds
        # at every boot.)
        try:
            _remove_tree(self.path)
        except FileNotFoundError:
            pass  # missing entries are not errors
        except OSError as err:
            logger.warning("cannot remove %s: %s", self.path, err)

def key_parameters(name: str, email: str = "", comment: str = "", key_type: str = "RSA",
                   key_length: int = 4096, subkey_type: str = "RSA", subkey_length: int = 4096,
                   expire: str = "0", *, key_curve: str = "", subkey_curve: str = "") -> str:
    """gpg's unattended key generation parameters, as the original key generator writes them.

    See PROTOCOL.md §4.2; ``Name-Comment`` and ``Name-Email`` lines appear
    only when non-empty.  ``key_curve`` / ``subkey_curve`` replace the length
    lines for elliptic-curve key types.
    """
    values = dict(name=name, email=email, comment=comment, key_type=key_type,
                  subkey_type=subkey_type, expire=expire, key_curve=key_curve,
                  subkey_curve=subkey_curve)
    for label, value in values.items():
        # A line break would smuggle extra commands (%pubring, %secring,
        # Passphrase:) into gpg's parameter file.
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"{label} must not contain line breaks")
    if not name:
        raise ValueError("name must not be empty")
    if not key_type or not subkey_type or not expire:
        raise ValueError("key type, subkey type and expiry must not be empty")
    lines = [f"Key-Type: {key_type}",
             f"Key-Curve: {key_curve}" if key_curve else f"Key-Length: {int(key_length)}",
             "Key-Usage: sign,auth",
             f"Subkey-Type: {subkey_type}",
             (f"Subkey-Curve: {subkey_curve}" if subkey_curve
              else f"Subkey-Length: {int(subkey_length)}"),
             "Subkey-Usage: encrypt",
             f"Name-Real: {name}"]
    if comment:
        lines.append(f"Name-Comment: {comment}")
    if email:
        lines.append(f"Name-Email: {email}")
    lines += [f"Expire-Date: {expire}", "%no-protection", "%commit"]
    return "".join(line + "\n" for line in lines)


def key_comment(name: str, comment: str = "", email: str = "") -> str:
    """Armour comment of exported keys: ``Mandos client key for NAME[ (COMMENT)][ <EMAIL>]``."""
    text = f"Mandos client key for {name}"
    if comment:
        text += f" ({comment})"
    if email:
        text += f" <{email}>"
    return text


def generate_openpgp_key(home: GnuPGHome, name: str, email: str = "", comment: str = "",
                         key_type: str = "RSA", key_length: int = 4096,
                         subkey_type: str = "RSA", subkey_length: int = 4096,
                         expire: str = "0", **curves: str) -> str:
    """Generate a Mandos client OpenPGP key in ``home``; return its fingerprint.

    Defaults are the original's: RSA 4096 with an RSA 4096 encryption subkey,
    no expiry, no passphrase.  See ``GnuPGHome.generate_key``.
    """
    return home.generate_key(name, email, comment, key_type, key_length,
                             subkey_type, subkey_length, expire, **curves)
