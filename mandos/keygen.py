"""mandos-keygen: make a client's key files, its clients.conf section, or test an unlock.

Three modes (SERVER.md §17, PROTOCOL.md §4.2, §4.4):

* key generation (default): a TLS key pair and an OpenPGP key pair are
  made in memory, then written as ``tls-privkey.pem``, ``tls-pubkey.pem``,
  ``seckey.txt`` and ``pubkey.txt`` (mode 0600) into the key directory;
* ``--password`` / ``--passfile FILE``: the passphrase is encrypted to the
  client's own OpenPGP key and a ``clients.conf`` section is printed;
* ``--test ADDRESS:PORT``: the network client is run once against a server
  with the key files of the key directory, as at boot, and the outcome is
  reported; the password itself is shown only with ``--show-password``.

Exit status: 0 on success; 1 for any error (bad options, missing or
existing key files, gpg failures, no passphrase); in test mode 69 when no
password arrived and 65 when one arrived that differs from ``--passfile``.
Messages go to standard error; standard output carries only the section
(password mode) or, with ``--show-password``, the password (test mode).

``cryptography`` and ``gnupg`` are imported only by the steps that need
them.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from mandos.cmdline import HelpRequested, UsageError, tokens
from mandos.keys import TLS_PRIVKEY_NAME, TLS_PUBKEY_NAME

# typing.TYPE_CHECKING without importing typing; see mandos/keys.py.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from typing import Optional, Sequence

PROGRAM = "mandos-keygen"
PUBKEY_NAME = "pubkey.txt"
SECKEY_NAME = "seckey.txt"
KEY_FILE_NAMES = (TLS_PRIVKEY_NAME, TLS_PUBKEY_NAME, SECKEY_NAME, PUBKEY_NAME)
DEFAULT_DIRS = ("/etc/keys/mandos", "/etc/mandos/keys")

EXIT_OK = 0
EXIT_FAILURE = 1
EX_DATAERR = 65
EX_UNAVAILABLE = 69

MIN_KEY_LENGTH = 512
DEFAULT_TEST_TIMEOUT = 30.0
# cryptsetup's default limit for a key file; anything larger is a mistake
# (a device, a log file) and would only bloat clients.conf.
MAX_PASSPHRASE_SIZE = 8 * 1024 * 1024
# gpg armour lines are 64 characters; the original's secret lines are those.
BASE64_LINE_LENGTH = 64
SECRET_INDENT = "    "

SSH_KEY_TYPES = ("ecdsa-sha2-nistp256", "ed25519", "rsa")
SSH_SCAN_HOST = "localhost"
SSH_SCAN_TIMEOUT = 30.0

# Curve names accepted for --type / --subtype instead of a gpg algorithm;
# the algorithm follows from the curve (gpg itself needs both).
SIGNING_CURVES = {"ed25519": "EDDSA", "nistp256": "ECDSA", "nistp384": "ECDSA",
                  "nistp521": "ECDSA", "brainpoolp256r1": "ECDSA",
                  "brainpoolp384r1": "ECDSA", "brainpoolp512r1": "ECDSA",
                  "secp256k1": "ECDSA"}
ENCRYPTION_CURVES = {"cv25519": "ECDH", "nistp256": "ECDH", "nistp384": "ECDH",
                     "nistp521": "ECDH", "brainpoolp256r1": "ECDH",
                     "brainpoolp384r1": "ECDH", "brainpoolp512r1": "ECDH",
                     "secp256k1": "ECDH"}
# TLS key types; "ecdsa" is P-384, what certtool makes at --sec-param ultra.
TLS_KEY_TYPES = ("ed25519", "ed448", "ecdsa")
TLS_KEY_TYPE_ALIASES = {"ecc": "ecdsa"}

# (long name, short letter, takes an argument, placeholder, help)
OPTIONS = (
    ("dir", "d", True, "DIR", "Key directory (default /etc/keys/mandos if it is a "
                              "directory, else /etc/mandos/keys)"),
    ("type", "t", True, "TYPE", "OpenPGP key type, or a curve such as ed25519 "
                                "(default RSA)"),
    ("length", "l", True, "BITS", "OpenPGP key length in bits (default 4096)"),
    ("subtype", "s", True, "TYPE", "OpenPGP subkey type, or a curve such as cv25519 "
                                   "(default RSA)"),
    ("sublength", "L", True, "BITS", "OpenPGP subkey length in bits (default 4096)"),
    ("name", "n", True, "NAME", "Key name; section name and host in clients.conf "
                                "(default: this host's fully qualified name)"),
    ("email", "e", True, "ADDRESS", "E-mail address of the OpenPGP key (default none)"),
    ("comment", "c", True, "TEXT", "Comment of the OpenPGP key (default none)"),
    ("expire", "x", True, "TIME", "OpenPGP key expiry in gpg's syntax "
                                  "(default 0: never)"),
    ("tls-keytype", "T", True, "TYPE", "TLS key type: ed25519 (default), ed448 "
                                       "or ecdsa"),
    ("force", "f", False, None, "Replace existing key files, keeping numbered "
                                "backups"),
    ("password", "p", False, None, "Print a clients.conf section with an encrypted "
                                   "password typed in (or read from standard input)"),
    ("passfile", "F", True, "FILE", "Print a clients.conf section with the password "
                                    "in FILE, byte for byte"),
    ("no-ssh", "S", False, None, "Do not add an ssh-keyscan checker to the section"),
    ("test", None, True, "ADDRESS:PORT", "Ask the Mandos server at ADDRESS:PORT for "
                                         "the password, as at boot, and report"),
    ("client", None, True, "FILE", "Network client to run for --test (default: "
                                   "plugins.d/mandos-client of this package)"),
    ("interface", None, True, "NAME", "Network interface for --test (default none)"),
    ("timeout", None, True, "SECONDS", "How long --test waits for the password "
                                       "(default 30)"),
    ("show-password", None, False, None, "With --test, write the password received "
                                         "to standard output"),
    ("version", "v", False, None, "Print the program version"),
    ("help", "h", False, None, "Print this help"),
)


class KeygenError(Exception):
    """A failure reported as one message on standard error; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; unwinds so that temporary directories go away."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Settings:
    """The command line, with the original's defaults."""

    __slots__ = ("dir", "key_type", "key_length", "subkey_type", "subkey_length",
                 "name", "email", "comment", "expire", "tls_keytype", "force",
                 "password", "passfile", "ssh", "test", "client", "interface",
                 "timeout", "show_password")

    def __init__(self) -> None:
        self.dir: Optional[str] = None
        self.key_type = "RSA"
        self.key_length = "4096"
        self.subkey_type = "RSA"
        self.subkey_length = "4096"
        self.name: Optional[str] = None
        self.email = ""
        self.comment = ""
        self.expire = "0"
        self.tls_keytype = "ed25519"
        self.force = False
        self.password = False
        self.passfile: Optional[str] = None
        self.ssh = True
        self.test: Optional[str] = None
        self.client: Optional[str] = None
        self.interface: Optional[str] = None
        self.timeout = DEFAULT_TEST_TIMEOUT
        self.show_password = False


# --- command line -----------------------------------------------------------

def help_text() -> str:
    """The --help text."""
    import textwrap

    lines = [f"Usage: {PROGRAM} [OPTION...]",
             f"       {PROGRAM} {{--password | --passfile FILE}} [--name NAME]",
             "                     [--dir DIR] [--no-ssh]",
             f"       {PROGRAM} --test ADDRESS:PORT [--dir DIR] [--passfile FILE]",
             "Make a Mandos client's key files (first form), print a clients.conf",
             "section with its encrypted password (second), or try an unlock (third).",
             "", "Options:"]
    for name, short, takes, arg, text in OPTIONS:
        left = (f"  -{short}, " if short else "      ") + f"--{name}"
        if takes:
            left += f" {arg}"
        wrapped = textwrap.wrap(text, 78 - 30)
        if len(left) > 28:
            lines.append(left)
        else:
            lines.append(left.ljust(30) + wrapped.pop(0))
        lines += [" " * 30 + more for more in wrapped]
    lines += ["",
              "With --password or --passfile, only --dir, --name and --no-ssh matter;",
              "with --test, only --dir, --passfile, --client, --interface, --timeout",
              "and --show-password.  See mandos-keygen(8)."]
    return "\n".join(lines) + "\n"


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds < 1e6):
        raise UsageError(f"invalid --timeout value: {value!r} (seconds, more than 0)")
    return seconds


def parse(argv: Sequence[str]) -> Settings:
    """Parse the arguments (without the program name).

    Raises UsageError (exit status 1) or HelpRequested.
    """
    settings = Settings()
    simple = {"dir": "dir", "type": "key_type", "length": "key_length",
              "subtype": "subkey_type", "sublength": "subkey_length", "name": "name",
              "email": "email", "comment": "comment", "expire": "expire",
              "tls-keytype": "tls_keytype", "passfile": "passfile", "test": "test",
              "client": "client", "interface": "interface"}
    for name, value in tokens(list(argv), OPTIONS):
        if name is None:
            raise UsageError(f"unexpected argument: {value!r}")
        if name in simple:
            setattr(settings, simple[name], value)
        elif name == "force":
            settings.force = True
        elif name == "password":
            settings.password = True
        elif name == "no-ssh":
            settings.ssh = False
        elif name == "timeout":
            settings.timeout = _positive_seconds(value)
        elif name == "show-password":
            settings.show_password = True
        elif name == "help":
            raise HelpRequested(help_text())
        elif name == "version":
            from mandos import __version__
            raise HelpRequested(f"{PROGRAM} (mandos-py) {__version__}\n")
    if settings.password and settings.passfile is not None:
        raise UsageError("--password and --passfile cannot be used together")
    if settings.test is not None:
        if settings.password:
            raise UsageError("--test compares with --passfile FILE only, not with --password")
        if ":" not in settings.test:
            raise UsageError(f"--test needs ADDRESS:PORT, not {settings.test!r}")
    elif settings.client or settings.interface or settings.show_password:
        raise UsageError("--client, --interface and --show-password need --test")
    return settings


def default_key_dir() -> str:
    """``/etc/keys/mandos`` if it is a directory, else ``/etc/mandos/keys``."""
    return DEFAULT_DIRS[0] if os.path.isdir(DEFAULT_DIRS[0]) else DEFAULT_DIRS[1]


def default_name() -> str:
    """This host's canonical name, as ``hostname --fqdn`` prints it; else the host name."""
    import socket

    host = socket.gethostname()
    try:
        canonical = socket.getaddrinfo(host, None, 0, 0, 0, socket.AI_CANONNAME)[0][3]
    except (OSError, IndexError, UnicodeError):
        canonical = ""
    return canonical or host


# --- secrets in memory --------------------------------------------------------

def wipe(buffer: bytearray) -> None:
    """Overwrite ``buffer`` with zeros in place."""
    buffer[:] = bytes(len(buffer))


def read_fd_secret(fd: int, limit: int = MAX_PASSPHRASE_SIZE, what: str = "input") -> bytearray:
    """Read everything from ``fd`` into a bytearray, byte for byte.

    Reads straight into bytearrays (no intermediate ``bytes`` copies) and
    zeros each buffer it outgrows, so that no copy of the secret is left
    behind in freed memory.  More than ``limit`` bytes raise KeygenError.
    """
    try:
        size = os.fstat(fd).st_size
    except OSError:
        size = 0
    buffer = bytearray(max(min(size, limit) + 1, 4096))
    length = 0
    try:
        while True:
            if length == len(buffer):
                if length > limit:
                    raise KeygenError(f"{what} is larger than {limit} bytes")
                bigger = bytearray(2 * len(buffer))
                bigger[:length] = buffer
                wipe(buffer)
                buffer = bigger
            got = os.readv(fd, [memoryview(buffer)[length:]])
            if got == 0:
                break
            length += got
        if length > limit:
            raise KeygenError(f"{what} is larger than {limit} bytes")
        return buffer[:length]
    finally:
        wipe(buffer)


def read_passfile(path: str) -> bytearray:
    """The content of ``path``, byte for byte (no newline is removed); must not be empty."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise KeygenError(f"cannot open passphrase file {path}: "
                          f"{err.strerror or err}") from None
    try:
        data = read_fd_secret(fd, what=f"passphrase file {path}")
    except OSError as err:
        raise KeygenError(f"cannot read passphrase file {path}: "
                          f"{err.strerror or err}") from None
    finally:
        os.close(fd)
    if not data:
        raise KeygenError(f"passphrase file {path} is empty")
    return data


def _read_tty_line(fd: int, limit: int = 4096) -> Optional[bytearray]:
    """One line from a terminal in canonical mode, without its newline; None at end of file."""
    buffer = bytearray(limit)
    length = 0
    try:
        while length < limit:
            got = os.readv(fd, [memoryview(buffer)[length:]])
            if got == 0:
                if length == 0:
                    return None
                break
            length += got
            end = buffer.find(b"\n", length - got, length)
            if end >= 0:
                return buffer[:end]
        return buffer[:length]
    finally:
        wipe(buffer)


def _prompt_once(tty: int, prompt: str) -> Optional[bytearray]:
    """Print ``prompt`` on the terminal and read a line with echo off."""
    import termios

    os.write(tty, prompt.encode())
    old = termios.tcgetattr(tty)
    new = termios.tcgetattr(tty)
    new[3] &= ~(termios.ECHO | termios.ECHONL)
    # Echo off so that the passphrase never shows on screen, and back on in
    # every case (including Ctrl-C) so that the terminal is not left blind.
    termios.tcsetattr(tty, termios.TCSAFLUSH, new)
    try:
        return _read_tty_line(tty)
    finally:
        termios.tcsetattr(tty, termios.TCSAFLUSH, old)
        os.write(tty, b"\n")


def prompt_passphrase() -> bytearray:
    """Ask twice on the terminal until both entries are equal and not empty.

    The line is taken as typed: only the final newline is removed.  End of
    file (Ctrl-D) at a prompt raises KeygenError.
    """
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        tty = os.dup(0)
    try:
        while True:
            first = _prompt_once(tty, "Enter passphrase: ")
            if first is None:
                raise KeygenError("no passphrase entered")
            if not first:
                os.write(tty, b"Empty passphrase; try again\n")
                continue
            second = _prompt_once(tty, "Repeat passphrase: ")
            try:
                if second is None:
                    wipe(first)
                    raise KeygenError("no passphrase entered")
                import hmac
                if hmac.compare_digest(first, second):
                    return first
                wipe(first)
                os.write(tty, b"Passphrases do not match; try again\n")
            finally:
                if second is not None:
                    wipe(second)
    finally:
        os.close(tty)


def passphrase_from_stdin() -> bytearray:
    """The passphrase from a standard input that is not a terminal.

    The first line is the passphrase (its newline removed); an optional
    second line must repeat it exactly; nothing may follow.  Empty or
    unreadable input is an error: the original encrypted an empty
    passphrase here without a word.
    """
    try:
        data = read_fd_secret(0, what="standard input")
    except OSError as err:
        raise KeygenError(f"--password without a terminal reads the passphrase from "
                          f"standard input, which cannot be read: {err.strerror or err}"
                          ) from None
    try:
        if data.endswith(b"\n"):
            del data[-1:]
        lines = data.split(b"\n")
        try:
            if len(lines) > 2:
                raise KeygenError("standard input holds more than two lines; give the "
                                  "passphrase on one line, optionally repeated on a "
                                  "second (use --passfile for anything else)")
            if not lines[0]:
                raise KeygenError("no passphrase: --password without a terminal reads "
                                  "the passphrase from standard input, and it was empty")
            if len(lines) == 2:
                import hmac
                if not hmac.compare_digest(lines[0], lines[1]):
                    raise KeygenError("the two passphrase lines on standard input differ")
            return bytearray(lines[0])
        finally:
            for line in lines:
                wipe(line)
    finally:
        wipe(data)


def get_passphrase(settings: Settings) -> bytearray:
    """The passphrase of --passfile, or of --password (terminal or standard input)."""
    if settings.passfile is not None:
        return read_passfile(settings.passfile)
    if os.isatty(0):
        return prompt_passphrase()
    return passphrase_from_stdin()


# --- key generation -----------------------------------------------------------

def _key_length(value: str, option: str) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < MIN_KEY_LENGTH:
        raise KeygenError(f"invalid key length {value!r} for --{option} "
                          f"(a number of bits, at least {MIN_KEY_LENGTH})")
    return int(value)


def openpgp_algorithm(value: str, curves: dict[str, str]) -> tuple[str, str]:
    """``(gpg algorithm, curve)`` for a --type/--subtype value.

    A curve name (e.g. ``ed25519``, ``cv25519``) gives its algorithm and the
    curve; anything else is a gpg algorithm name, passed on as it is.
    """
    algorithm = curves.get(value.lower())
    if algorithm is not None:
        return algorithm, value.lower()
    return value, ""


def generate_tls_key(key_type: str) -> tuple[bytes, bytes]:
    """A TLS key pair of ``key_type`` as ``(public PEM, private PEM)``, formats as certtool's."""
    from mandos import keys

    key_type = TLS_KEY_TYPE_ALIASES.get(key_type.lower(), key_type.lower())
    if key_type == "ed25519":
        return keys.generate_tls_keypair()
    if key_type not in TLS_KEY_TYPES:
        raise KeygenError(f"unsupported TLS key type {key_type!r} "
                          f"(use one of {', '.join(TLS_KEY_TYPES)})")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448

    if key_type == "ed448":
        private = ed448.Ed448PrivateKey.generate()
    else:
        private = ec.generate_private_key(ec.SECP384R1())
    private_pem = keys.SecretBytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return public_pem, private_pem


def gnupg_home():
    """A throw-away GnuPG home under $TMPDIR if set, else under /run/tmp or /tmp."""
    from mandos.openpgp import GnuPGHome

    return GnuPGHome(os.environ.get("TMPDIR") or None)


def generate_openpgp_keys(settings: Settings, name: str) -> tuple[str, str]:
    """Make the OpenPGP key pair; return ``(public armour, secret armour)``."""
    from mandos import openpgp

    key_length = _key_length(settings.key_length, "length")
    subkey_length = _key_length(settings.subkey_length, "sublength")
    key_type, key_curve = openpgp_algorithm(settings.key_type, SIGNING_CURVES)
    subkey_type, subkey_curve = openpgp_algorithm(settings.subkey_type, ENCRYPTION_CURVES)
    with gnupg_home() as home:
        try:
            fingerprint = openpgp.generate_openpgp_key(
                home, name, settings.email, settings.comment, key_type, key_length,
                subkey_type, subkey_length, settings.expire, key_curve=key_curve,
                subkey_curve=subkey_curve)
            return home.export_keys(
                fingerprint, openpgp.key_comment(name, settings.comment, settings.email))
        except (ValueError, openpgp.OpenPGPError) as err:
            raise KeygenError(f"OpenPGP key generation failed: {err}") from None


def backup_name(path: str) -> str:
    """Link ``path`` to the first free numbered backup name ``path.~N~``; return that name.

    A hard link keeps the old file's content and mode without copying it,
    and fails rather than overwrites if the name is taken meanwhile.
    """
    existing = []
    directory, base = os.path.split(path)
    prefix = base + ".~"
    for entry in os.listdir(directory or "."):
        number = entry[len(prefix):-1]
        if entry.startswith(prefix) and entry.endswith("~") and number.isdigit():
            existing.append(int(number))
    number = max(existing, default=0) + 1
    while True:
        candidate = f"{path}.~{number}~"
        try:
            os.link(path, candidate, follow_symlinks=False)
            return candidate
        except FileExistsError:
            number += 1


def _check_key_directory(directory: str, create: bool) -> None:
    if not os.path.lexists(directory) and create:
        try:
            # umask 077 is in force: every directory made here is 0700.
            os.makedirs(directory, mode=0o700)
        except OSError as err:
            raise KeygenError(f"cannot create key directory {directory}: "
                              f"{err.strerror or err}") from None
        return
    if not os.path.isdir(directory):
        raise KeygenError(f"key directory {directory} does not exist or is not a directory")
    needed = os.R_OK | os.X_OK | (os.W_OK if create else 0)
    if not os.access(directory, needed):
        raise KeygenError(f"key directory {directory} is not "
                          f"{'readable and writable' if create else 'readable'}")


def generate_keys(settings: Settings) -> int:
    """Key generation mode: make and write all four key files."""
    from mandos import keys

    directory = settings.dir or default_key_dir()
    name = settings.name if settings.name is not None else default_name()
    if not name:
        raise KeygenError("the key name must not be empty (--name)")
    if not settings.key_type or not settings.subkey_type:
        raise KeygenError("the key type must not be empty (--type, --subtype)")
    if not settings.expire:
        raise KeygenError("the key expiry must not be empty (--expire; 0 means never)")
    _key_length(settings.key_length, "length")
    _key_length(settings.subkey_length, "sublength")
    for label, value in (("name", name), ("email", settings.email),
                         ("comment", settings.comment), ("expire", settings.expire)):
        if any(c in value for c in "\r\n\0"):
            raise KeygenError(f"--{label} must not contain line breaks")
    _check_key_directory(directory, create=True)
    paths = [os.path.join(directory, n) for n in KEY_FILE_NAMES]
    present = [p for p in paths if os.path.lexists(p)]
    if present and not settings.force:
        raise KeygenError(f"refusing to replace existing key files ({', '.join(present)}); "
                          f"use --force to replace them (old files are kept as "
                          f"numbered backups)")

    # Everything is made in memory first, so that a failure leaves the old
    # key files as they were instead of half of a new set.
    public_pem, private_pem = generate_tls_key(settings.tls_keytype)
    on_terminal = os.isatty(0)
    if on_terminal:
        sys.stderr.write("Generating keys; large RSA keys can take a while.\n"
                         f"Started:  {time.strftime('%c')}\n")
        sys.stderr.flush()
    public_armour, secret_armour = generate_openpgp_keys(settings, name)
    if on_terminal:
        sys.stderr.write(f"Finished: {time.strftime('%c')}\n")
    contents = {TLS_PRIVKEY_NAME: private_pem, TLS_PUBKEY_NAME: public_pem,
                SECKEY_NAME: secret_armour.encode("ascii"),
                PUBKEY_NAME: public_armour.encode("ascii")}
    for path in paths:
        try:
            if settings.force and os.path.lexists(path):
                backup_name(path)
            keys.write_key_file(path, contents[os.path.basename(path)],
                                force=settings.force)
        except FileExistsError:
            raise KeygenError(f"{path} appeared while the keys were made; not replaced "
                              f"(use --force)") from None
        except OSError as err:
            raise KeygenError(f"cannot write {path}: {err.strerror or err}") from None
    return EXIT_OK


# --- the clients.conf section -------------------------------------------------

def find_ssh_host_key(host: str = SSH_SCAN_HOST, keyscan: str = "ssh-keyscan"
                      ) -> Optional[tuple[str, str, bool]]:
    """This machine's SSH host key as ``(scan type, "KEYTYPE BASE64", with -q)``, or None.

    ``ssh-keyscan`` is tried first with ``-q`` (OpenSSH 9.8 and later), then
    without, each time for the types of SSH_KEY_TYPES in order; the first
    well-formed answer wins.
    """
    import re
    import shutil
    import subprocess

    program = shutil.which(keyscan)
    if program is None:
        return None
    answer = re.compile(r"^[A-Za-z0-9@._-]+ [A-Za-z0-9+/]+={0,2}$")
    for quiet in (True, False):
        for key_type in SSH_KEY_TYPES:
            args = [program, *(["-q"] if quiet else []), "-t", key_type, host]
            try:
                result = subprocess.run(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        timeout=SSH_SCAN_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if result.returncode != 0:
                continue
            for line in result.stdout.decode("ascii", "replace").splitlines():
                if line.startswith(host + " "):
                    value = line[len(host) + 1:].strip()
                    # The value goes into clients.conf, where '%' or a line
                    # break would change the file's meaning.
                    if answer.match(value):
                        return key_type, value, quiet
    return None


def wrap_secret(message: bytes) -> list[str]:
    """Base64 of ``message`` in lines of 64 characters, as in gpg's armour."""
    import base64

    text = base64.b64encode(message).decode("ascii")
    return [text[i:i + BASE64_LINE_LENGTH] for i in range(0, len(text), BASE64_LINE_LENGTH)]


def format_section(name: str, fingerprint: str, message: bytes,
                   key_id: Optional[str] = None,
                   ssh: Optional[tuple[str, str, bool]] = None) -> str:
    """The ``clients.conf`` section for one client (PROTOCOL.md §4.4 step 8)."""
    # '%' starts an expansion in clients.conf; doubled, it stands for itself.
    host = name.replace("%", "%%")
    lines = [f"[{name}]", f"host = {host}"]
    if key_id:
        lines.append(f"key_id = {key_id.lower()}")
    lines += [f"fingerprint = {fingerprint.upper()}", "secret ="]
    lines += [SECRET_INDENT + line for line in wrap_secret(message)]
    if ssh is not None:
        scan_type, ssh_key, quiet = ssh
        if quiet:
            lines += ['# "ssh-keyscan -q" needs OpenSSH 9.8 or later on the Mandos server;',
                      '# with an older OpenSSH there, delete the "-q " from this checker.']
        lines.append(f"checker = ssh-keyscan {'-q ' if quiet else ''}-t {scan_type} "
                     f"%%(host)s 2>/dev/null | grep --fixed-strings --line-regexp "
                     f"--quiet --regexp=%%(host)s\" %(ssh_fingerprint)s\"")
        lines.append(f"ssh_fingerprint = {ssh_key}")
    return "".join(line + "\n" for line in lines)


def tls_key_id(directory: str) -> Optional[str]:
    """Key ID of ``tls-pubkey.pem`` in ``directory`` (upper case), or None if there is none.

    If ``tls-privkey.pem`` is there too, the two must belong together: a
    stale public key would give the server an ID the client never presents.
    """
    from mandos import keys

    pub = os.path.join(directory, TLS_PUBKEY_NAME)
    priv = os.path.join(directory, TLS_PRIVKEY_NAME)
    if not os.path.lexists(pub):
        return None
    try:
        if os.path.lexists(priv):
            return keys.load_tls_keypair(pub, priv).key_id
        from cryptography.hazmat.primitives import serialization
        data = keys.read_key_file(pub)
        try:
            public_key = serialization.load_pem_public_key(data)
        except ValueError:
            raise keys.MalformedKeyFile(pub, "not a PEM public key") from None
        return keys.key_id(public_key)
    except keys.KeyFileError as err:
        raise KeygenError(str(err)) from None


def _validate_section_name(name: str) -> None:
    if not name:
        raise KeygenError("the client name must not be empty (--name)")
    if any(c in name for c in "\r\n\0") or name.strip() != name:
        raise KeygenError(f"invalid client name {name!r} for clients.conf")
    if name.upper() == "DEFAULT":
        raise KeygenError("the client name DEFAULT would be clients.conf's default section")


def password_section(settings: Settings) -> int:
    """Password mode: print a clients.conf section with the encrypted passphrase."""
    from mandos import openpgp

    directory = settings.dir or default_key_dir()
    name = settings.name if settings.name is not None else default_name()
    _validate_section_name(name)
    _check_key_directory(directory, create=False)
    ssh = find_ssh_host_key() if settings.ssh else None
    key_id = tls_key_id(directory)
    with gnupg_home() as home:
        try:
            home.import_keys(os.path.join(directory, PUBKEY_NAME),
                             os.path.join(directory, SECKEY_NAME))
            public = home.fingerprints()
            secret = set(home.fingerprints(secret=True))
        except (openpgp.OpenPGPError, openpgp.KeyFileError) as err:
            raise KeygenError(str(err)) from None
        if not public:
            raise KeygenError(f"{PUBKEY_NAME} in {directory} holds no key")
        fingerprint = public[0]
        if fingerprint not in secret:
            raise KeygenError(f"{SECKEY_NAME} in {directory} does not hold the secret key "
                              f"of {PUBKEY_NAME} ({fingerprint})")
        passphrase = get_passphrase(settings)
        try:
            message = home.encrypt(passphrase, fingerprint)
            # Decrypt it again, as the client will: a section the client
            # cannot open would only show up at the next boot.
            import hmac
            if not hmac.compare_digest(home.decrypt(message), passphrase):
                raise KeygenError("the encrypted passphrase does not decrypt to itself")
        except openpgp.OpenPGPError as err:
            raise KeygenError(str(err)) from None
        finally:
            wipe(passphrase)
    _write_stdout(format_section(name, fingerprint, message, key_id, ssh).encode())
    return EXIT_OK


def _write_stdout(data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
    except OSError as err:
        raise KeygenError(f"cannot write to standard output: {err.strerror or err}") from None


# --- test mode ----------------------------------------------------------------

def default_client() -> str:
    """``plugins.d/mandos-client`` next to this package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "plugins.d", "mandos-client")


def client_command(settings: Settings, directory: str) -> list[str]:
    """The network client's command line for a test unlock."""
    # Never --debug: the original client prints the decrypted password in
    # its debug output, and the client's messages are shown on failure.
    return [settings.client or default_client(),
            "--connect", settings.test or "",
            "--interface", settings.interface or "none",
            "--pubkey", os.path.join(directory, PUBKEY_NAME),
            "--seckey", os.path.join(directory, SECKEY_NAME),
            "--tls-pubkey", os.path.join(directory, TLS_PUBKEY_NAME),
            "--tls-privkey", os.path.join(directory, TLS_PRIVKEY_NAME)]


def _stop(process) -> None:
    """SIGTERM (the client then cleans up), SIGKILL if it does not end in 10 s."""
    import subprocess

    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _run_client(command: list[str], timeout: float) -> tuple[Optional[int], bytearray, str, float]:
    """Run the client; return ``(exit status or None on time-out, stdout, stderr, seconds)``."""
    import selectors
    import subprocess

    start = time.monotonic()
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, close_fds=True)
    except OSError as err:
        raise KeygenError(f"cannot run {command[0]}: {err.strerror or err}") from None
    output = bytearray()
    errors = bytearray()
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ, output)
            selector.register(process.stderr, selectors.EVENT_READ, errors)
            open_streams = 2
            while open_streams:
                remaining = start + timeout - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        key.data.extend(chunk)
                    else:
                        selector.unregister(key.fileobj)
                        open_streams -= 1
            if not open_streams:
                try:
                    process.wait(timeout=max(0.0, start + timeout - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        elapsed = time.monotonic() - start
        status = process.poll()
    finally:
        _stop(process)
        process.stdout.close()
        process.stderr.close()
    return status, output, errors.decode("utf-8", "replace"), elapsed


def _check_server_address(text: str) -> None:
    """Refuse what the client would retry forever: a bad port, a host name."""
    import socket

    from mandos.client.servers import parse_connect
    try:
        server = parse_connect(text)
        socket.inet_pton(server.family, server.address)
    except UsageError as err:
        raise KeygenError(f"--test {text}: {err}") from None
    except (OSError, ValueError):
        raise KeygenError(f"--test {text}: not a numeric IPv4 or IPv6 address "
                          f"(host names are not looked up)") from None


def try_unlock(settings: Settings) -> int:
    """Test mode: get the password from the server as the client would at boot."""
    directory = settings.dir or default_key_dir()
    _check_key_directory(directory, create=False)
    for file_name in KEY_FILE_NAMES:
        path = os.path.join(directory, file_name)
        if not os.access(path, os.R_OK):
            raise KeygenError(f"cannot read key file {path}")
    key_id = tls_key_id(directory)
    client = settings.client or default_client()
    if not (os.path.isfile(client) and os.access(client, os.X_OK)):
        raise KeygenError(f"network client {client} is not an executable file "
                          f"(see --client)")
    _check_server_address(settings.test)
    expected = read_passfile(settings.passfile) if settings.passfile is not None else None
    report = sys.stderr
    report.write(f"Asking the Mandos server at {settings.test} for the password of key ID "
                 f"{key_id} (timeout {settings.timeout:g} s)\n")
    report.flush()
    status, password, client_errors, elapsed = _run_client(
        client_command(settings, directory), settings.timeout)
    try:
        if status != 0 or not password:
            if status is None:
                reason = (f"no password within {settings.timeout:g} s: the server at "
                          f"{settings.test} is unreachable, does not know key ID {key_id}, "
                          f"or the client is disabled or not approved")
            else:
                reason = f"the network client ended with status {status} and no password"
            lines = [line for line in client_errors.splitlines() if line.strip()]
            for line in lines[-10:]:
                report.write(f"  client: {line}\n")
            raise KeygenError(f"test failed: {reason}", EX_UNAVAILABLE)
        report.write(f"Password received in {elapsed:.2f} s ({len(password)} bytes)\n")
        status = EXIT_OK
        if expected is not None:
            import hmac
            if hmac.compare_digest(password, expected):
                report.write(f"It matches the passphrase in {settings.passfile}\n")
            else:
                report.write(f"It differs from the passphrase in {settings.passfile}\n")
                status = EX_DATAERR
        report.flush()
        # Reports like this one end up in terminals' scroll-back, tickets and
        # logs; the password itself is only shown when asked for.
        if settings.show_password:
            _write_stdout(password)
        return status
    finally:
        wipe(password)
        if expected is not None:
            wipe(expected)


# --- main ----------------------------------------------------------------------

def _on_signal(signum: int, frame: object) -> None:
    raise _Terminated(signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run mandos-keygen; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    old_umask = os.umask(0o077)
    old_handlers = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[signum] = signal.signal(signum, _on_signal)
        try:
            settings = parse(argv)
        except HelpRequested as request:
            sys.stdout.write(request.text)
            sys.stdout.flush()
            return EXIT_OK
        except UsageError as err:
            sys.stderr.write(f"{PROGRAM}: {err}\nTry '{PROGRAM} --help' for more "
                             f"information.\n")
            return EXIT_FAILURE
        if settings.test is not None:
            return try_unlock(settings)
        if settings.password or settings.passfile is not None:
            return password_section(settings)
        return generate_keys(settings)
    except KeygenError as err:
        sys.stderr.write(f"{PROGRAM}: {err}\n")
        return err.status
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{PROGRAM}: interrupted\n")
        return 128 + signal.SIGINT
    except _Terminated as terminated:
        sys.stderr.write(f"{PROGRAM}: terminated by signal {terminated.signum}\n")
        return 128 + terminated.signum
    finally:
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        os.umask(old_umask)
        sys.stderr.flush()
