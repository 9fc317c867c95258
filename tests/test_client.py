"""mandos-client in direct mode (``--connect``) against a fake Mandos server.

Everything is real except the server: the client runs as a separate
process through plugins.d/mandos-client, with real key files, the real gpg
and a real TLS 1.3 connection on loopback.  The server side is
tests/fake_server.py, built on our own GnuTLS binding in the TLS client
role (the Mandos server is the TLS client).  Rules are from CLIENT.md
§2.2–§2.5, §2.10–§2.17 and §11, and PROTOCOL.md §3.

OpenPGP keys are ed25519/cv25519 (fast to make) and made once per module.
The client retries forever, so every run has a timeout and is killed at the
end of its test if still alive.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

import fake_server as fs
from mandos import keys, openpgp
from mandos.client import options as cli
from mandos.client.servers import parse_connect
from mandos.cmdline import UsageError
from mandos.openpgp import GnuPGHome

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "plugins.d" / "mandos-client"
# A string that appears nowhere else, so that any leak of the password
# (raw or as hex) can be looked for.
MARKER = b"Zq7Xw"
# Binary bytes, CR LF, a NUL and a final newline: all must arrive unchanged.
PASSWORD = b"\x00" + MARKER + b" pass\r\nphrase \xff\xfe\x01 end\n"
NOBODY = 65534
EX_USAGE = 64
EX_UNAVAILABLE = 69
RUN_TIMEOUT = 20.0
# Starting the client as uid 65534 (with or without saved root) needs root.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing user IDs needs root")


# --- key material --------------------------------------------------------------

class KeySet:
    """The client's key files and secrets made for it.

    ``directory`` is world-readable (0755, files 0644) so that runs as
    uid 65534 can use the files too.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.pubkey = directory / "pubkey.txt"
        self.seckey = directory / "seckey.txt"
        self.tls_pubkey = directory / "tls-pubkey.pem"
        self.tls_privkey = directory / "tls-privkey.pem"
        self.other_pubkey = directory / "other-pubkey.txt"
        self.other_tls_pubkey = directory / "other-tls-pubkey.pem"
        self.key_id = ""
        self.spki_der = b""
        self.secret = b""  # PASSWORD encrypted to the client's key
        self.foreign_secret = b""  # PASSWORD encrypted to another key

    def files(self) -> dict[str, Path]:
        return {"pubkey": self.pubkey, "seckey": self.seckey,
                "tls-pubkey": self.tls_pubkey, "tls-privkey": self.tls_privkey}


@pytest.fixture(scope="module")
def keyset() -> KeySet:
    directory = Path(tempfile.mkdtemp(prefix="mandos-client-test-"))
    os.chmod(directory, 0o755)
    ks = KeySet(directory)
    fast = dict(key_type="EDDSA", subkey_type="ECDH", key_curve="ed25519",
                subkey_curve="cv25519")
    try:
        with GnuPGHome() as home:
            mine = openpgp.generate_openpgp_key(home, "client.example", **fast)
            other = openpgp.generate_openpgp_key(home, "other.example", **fast)
            public, secret = home.export_keys(mine)
            other_public, _ = home.export_keys(other)
            ks.secret = home.encrypt(PASSWORD, mine)
            ks.foreign_secret = home.encrypt(PASSWORD, other)
        keys.write_key_file(ks.pubkey, public.encode(), mode=0o644)
        keys.write_key_file(ks.seckey, secret.encode(), mode=0o644)
        keys.write_key_file(ks.other_pubkey, other_public.encode(), mode=0o644)
        tls_public, tls_private = keys.generate_tls_keypair()
        keys.write_key_file(ks.tls_pubkey, tls_public, mode=0o644)
        keys.write_key_file(ks.tls_privkey, bytes(tls_private), mode=0o644)
        other_tls_public, _ = keys.generate_tls_keypair()
        keys.write_key_file(ks.other_tls_pubkey, other_tls_public, mode=0o644)
        pair = keys.load_tls_keypair(ks.tls_pubkey, ks.tls_privkey)
        ks.key_id = pair.key_id
        ks.spki_der = keys.public_key_der(pair.public_key)
        yield ks
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def client_args(ks: KeySet, address: str, *extra: str, **files: Path | str) -> list[str]:
    """--connect ADDRESS --interface none and the four key options.

    ``files`` replaces key files by option name (``tls_pubkey=...``).
    """
    chosen = {name.replace("-", "_"): path for name, path in ks.files().items()}
    chosen.update(files)
    return ["--connect", address, "--interface", "none",
            "--pubkey", str(chosen["pubkey"]), "--seckey", str(chosen["seckey"]),
            "--tls-pubkey", str(chosen["tls_pubkey"]),
            "--tls-privkey", str(chosen["tls_privkey"]), *extra]


# --- running the client ----------------------------------------------------------

class ClientRun:
    """A running mandos-client whose stdout and stderr are collected in threads."""

    def __init__(self, args: list[str], preexec_fn=None, env: dict | None = None) -> None:
        self.process = subprocess.Popen([str(CLIENT), *args], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        preexec_fn=preexec_fn, env=env)
        self.pid = self.process.pid
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self._stdout),
                             daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self._stderr),
                             daemon=True)]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, buffer: bytearray) -> None:
        while True:
            chunk = stream.read1(65536)
            with self._changed:
                if not chunk:
                    self._changed.notify_all()
                    return
                buffer += chunk
                self._changed.notify_all()

    @property
    def stdout(self) -> bytes:
        with self._changed:
            return bytes(self._stdout)

    @property
    def stderr(self) -> bytes:
        with self._changed:
            return bytes(self._stderr)

    def wait_for_stderr(self, pattern: str, timeout: float = 10.0) -> re.Match | None:
        """The first match of ``pattern`` in stderr, waiting for it up to ``timeout``."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = regex.search(self._stderr)
                if match or self.process.poll() is not None:
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(min(remaining, 0.05))

    def wait(self, timeout: float = RUN_TIMEOUT) -> int:
        """The exit status (negative: killed by that signal); fails on timeout."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"mandos-client still running after {timeout} s; stderr:\n"
                        + self.stderr.decode(errors="replace")[-3000:])
        for reader in self._readers:
            reader.join(5)
        return status

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def gnupg_home(self, timeout: float = 10.0) -> str:
        """The GnuPG home the client reports creating (``--debug`` only)."""
        match = self.wait_for_stderr(r"created GnuPG home (\S+)", timeout)
        assert match, "no 'created GnuPG home' in the debug output:\n" + self.log()
        return match.group(1).decode()

    def log(self) -> str:
        return self.stderr.decode(errors="replace")[-3000:]


@pytest.fixture
def start_client():
    """Start mandos-client runs; whatever is still alive at the end is killed."""
    runs: list[ClientRun] = []

    def start(args: list[str], preexec_fn=None, env: dict | None = None) -> ClientRun:
        run = ClientRun(args, preexec_fn, env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def run_to_end(args: list[str], timeout: float = RUN_TIMEOUT,
               preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLIENT), *args], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, preexec_fn=preexec_fn)


# --- looking at processes, independently of the code under test ------------------

def _live_cmdlines():
    """(pid, argv) of every live (non-zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        if stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X"):
            continue
        yield int(entry), argv


def agents_for(home: str) -> list[int]:
    """Live gpg-agent processes whose command line names ``home``."""
    wanted = os.fsencode(home)
    return [pid for pid, argv in _live_cmdlines()
            if argv and os.path.basename(argv[0]) == b"gpg-agent"
            and any(wanted in arg for arg in argv)]


def processes_mentioning(text: str | Path) -> list[int]:
    """Live processes (other than this one) whose command line contains ``text``."""
    wanted = os.fsencode(str(text))
    return [pid for pid, argv in _live_cmdlines()
            if pid != os.getpid() and any(wanted in arg for arg in argv)]


def ids_of(pid: int, kind: str = "Uid") -> tuple[int, int, int]:
    """Real, effective and saved UID (or GID, with kind="Gid") of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                real, effective, saved, _ = (int(v) for v in line.split()[1:])
                return real, effective, saved
    raise AssertionError(f"no {kind} line for {pid}")


def assert_cleaned_up(home: str, key_dir: Path) -> None:
    """The GnuPG home is gone, with its agent, and no process of the client (found
    by the key directory on its command line) is left."""
    assert not os.path.exists(home), f"GnuPG home {home} left behind"
    deadline = time.monotonic() + 2.0
    while agents_for(home) and time.monotonic() < deadline:
        time.sleep(0.05)  # an agent killed just now may take a moment to be reaped
    assert agents_for(home) == [], f"gpg-agent for {home} left running"
    assert processes_mentioning(key_dir) == [], "a client process is left running"


def as_nobody_with_saved_root() -> None:
    """What a set-user-ID root program started by uid 65534 has (CLIENT.md §2.5)."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, 0, 0)


def as_password_agent_starts_it() -> None:
    """Real UID/GID 65534, effective and saved UID/GID 0 (CLIENT.md §2.5, dracut)."""
    os.setgroups([])
    os.setresgid(NOBODY, 0, 0)
    os.setresuid(NOBODY, 0, 0)


def as_nobody() -> None:
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)


def nobody_keys(ks: KeySet, directory: Path) -> dict[str, Path]:
    """Copies of the key files owned by uid 65534, mode 0600 (as in the initramfs)."""
    copies = {}
    for name, path in ks.files().items():
        copy = directory / path.name
        shutil.copyfile(path, copy)
        os.chown(copy, NOBODY, NOBODY)
        os.chmod(copy, 0o600)
        copies[name.replace("-", "_")] = copy
    return copies


# ==================================================================================
# §2.2 options
# ==================================================================================

def _forms(long: str, short: str | None, value: str) -> list[list[str]]:
    forms = [[f"--{long}", value], [f"--{long}={value}"]]
    if short:
        forms += [[f"-{short}", value], [f"-{short}{value}"]]
    return forms


_OPTION_CASES = [
    ("connect", "c", "192.0.2.1:4711", "connect", "192.0.2.1:4711"),
    ("pubkey", "p", "/k/pub.txt", "pubkey", "/k/pub.txt"),
    ("seckey", "s", "/k/sec.txt", "seckey", "/k/sec.txt"),
    ("tls-pubkey", "T", "/k/tls-pub.pem", "tls_pubkey", "/k/tls-pub.pem"),
    ("tls-privkey", "t", "/k/tls-priv.pem", "tls_privkey", "/k/tls-priv.pem"),
    ("priority", None, "NORMAL:+VERS-TLS1.3", "priority", "NORMAL:+VERS-TLS1.3"),
    ("dh-bits", None, "2048", "dh_bits", 2048),
    ("dh-params", None, "/k/dh.pem", "dh_params", "/k/dh.pem"),
    ("delay", None, "0.75", "delay", 0.75),
    ("retry", None, "1.5", "retry", 1.5),
    ("network-hook-dir", None, "/hooks", "network_hook_dir", "/hooks"),
]


@pytest.mark.parametrize(
    "argv, attribute, expected",
    [pytest.param(form, attribute, expected, id=" ".join(form))
     for long, short, value, attribute, expected in _OPTION_CASES
     for form in _forms(long, short, value)]
    + [pytest.param(form, "interfaces", ["eth0", "eth1"], id=" ".join(form))
       for form in _forms("interface", "i", "eth0,eth1")]
    + [pytest.param(["--debug"], "debug", True, id="--debug")])
def test_every_option_in_long_and_short_form(argv, attribute, expected):
    """§2.2/§0.2: every option, as --name VALUE, --name=VALUE, -x VALUE and -xVALUE."""
    assert getattr(cli.parse(argv), attribute) == expected


def test_option_defaults():
    """§2.2: defaults of every option."""
    opts = cli.parse([])
    assert opts.connect is None and opts.interfaces == []
    assert opts.pubkey == "/conf/conf.d/mandos/pubkey.txt"
    assert opts.seckey == "/conf/conf.d/mandos/seckey.txt"
    assert opts.tls_pubkey == "/conf/conf.d/mandos/tls-pubkey.pem"
    assert opts.tls_privkey == "/conf/conf.d/mandos/tls-privkey.pem"
    assert opts.priority == ("SECURE128:!CTYPE-X.509:+CTYPE-RAWPK:!RSA:!VERS-ALL"
                             ":+VERS-TLS1.3:%PROFILE_ULTRA")
    assert opts.dh_bits == 0 and opts.dh_params is None
    assert opts.delay == 2.5 and opts.retry == 10.0
    assert opts.network_hook_dir == "/lib/mandos/network-hooks.d"
    assert opts.debug is False


def test_interface_option_is_repeatable_and_lists_concatenate():
    """§2.2: --interface is repeatable; all comma lists are concatenated in order."""
    opts = cli.parse(["-i", "eth0,eth1", "--interface=none", "--interface", "br0"])
    assert opts.interfaces == ["eth0", "eth1", "none", "br0"]


def test_unambiguous_prefix_of_a_long_option_is_accepted():
    """§0.2: unambiguous prefixes of long options are accepted."""
    opts = cli.parse(["--conn=192.0.2.1:1", "--retr", "3", "--deb"])
    assert (opts.connect, opts.retry, opts.debug) == ("192.0.2.1:1", 3.0, True)


def test_delay_does_not_set_retry():
    """§2.2 quirk, not copied: --delay and --retry are independent."""
    assert cli.parse(["--delay", "3"]).retry == 10.0
    assert cli.parse(["--delay", "3"]).delay == 3.0
    opts = cli.parse(["--retry", "1", "--delay", "3"])
    assert (opts.retry, opts.delay) == (1.0, 3.0)


def test_retry_limit_is_int_max_milliseconds():
    """§2.2: --retry SECONDS must satisfy SECONDS*1000 <= INT_MAX."""
    assert cli.parse(["--retry", "2147483.647"]).retry == 2147483.647
    assert cli.parse(["--retry", "0"]).retry == 0.0
    with pytest.raises(UsageError):
        cli.parse(["--retry", "2147483.648"])


@pytest.mark.parametrize("argv", [
    ["--dh-bits", "abc"], ["--dh-bits", "1.5"], ["--dh-bits="], ["--dh-bits", "12x"],
    ["--delay", "abc"], ["--delay="], ["--delay", "1s"],
    ["--retry", "abc"], ["--retry", "-1"], ["--retry", "-0.5"], ["--retry", "2147484"],
    ["--retry=1e10"],
], ids=" ".join)
def test_bad_numeric_value_exits_64(argv):
    """§2.2: a bad --dh-bits, --delay or --retry prints an error and exits 64, no stdout."""
    result = run_to_end(argv + ["--connect", "127.0.0.1:1", "--interface", "none"])
    assert result.returncode == EX_USAGE
    assert result.stdout == b""
    assert result.stderr.strip()


@pytest.mark.parametrize("argv, expected", [
    (["--help"], b"Usage: mandos-client"), (["-?"], b"Usage: mandos-client"),
    (["--usage"], b"Usage: mandos-client"),
    (["--version"], b"Mandos plugin mandos-client: mandos-client "),
    (["-V"], b"Mandos plugin mandos-client: mandos-client "),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_help_usage_and_version_print_on_stdout_and_exit_64(argv, expected):
    """§2.2: --help/-?, --usage, --version/-V write to stdout and exit 64 (never 0)."""
    result = run_to_end(argv)
    assert result.returncode == EX_USAGE
    assert result.stdout.startswith(expected)
    if "--help" in argv or "-?" in argv:
        for option in ("--connect", "--interface", "--pubkey", "--seckey", "--tls-pubkey",
                       "--tls-privkey", "--priority", "--dh-bits", "--dh-params", "--delay",
                       "--retry", "--network-hook-dir", "--debug", "--version"):
            assert option.encode() in result.stdout


@pytest.mark.parametrize("argv", [["--bogus"], ["-x"], ["--debug=yes"], ["--retry"]],
                         ids=" ".join)
def test_unknown_or_malformed_option_exits_64(argv):
    """§2.17: an unknown option (or a missing/unwanted argument) exits 64, no stdout."""
    result = run_to_end(argv)
    assert result.returncode == EX_USAGE
    assert result.stdout == b""
    assert result.stderr.strip()


@pytest.mark.parametrize("argv", [["extra"], ["--debug", "--", "extra"]], ids=" ".join)
def test_positional_argument_exits_64(argv):
    """§2.17: the program takes no arguments; one exits 64."""
    result = run_to_end(["--connect", "127.0.0.1:1", "--interface", "none", *argv])
    assert result.returncode == EX_USAGE
    assert result.stdout == b""


def test_connect_without_colon_exits_64(keyset):
    """§2.10: --connect without a colon: "no colon in address", exit 64."""
    result = run_to_end(client_args(keyset, "127.0.0.1"))
    assert result.returncode == EX_USAGE
    assert result.stdout == b""
    assert b"colon" in result.stderr.lower()


@pytest.mark.parametrize("port", ["junk", "12a", "", "65536", "99999", "+4711", "-1",
                                  " 4711", "4711 ", "0x10", "\u0664\u0667"])
def test_bad_port_exits_64(keyset, port):
    """§2.10: the port must be a decimal 0-65535 without sign or junk, else exit 64."""
    result = run_to_end(client_args(keyset, f"127.0.0.1:{port}"))
    assert result.returncode == EX_USAGE
    assert result.stdout == b""
    assert b"port" in result.stderr.lower()


def test_connect_port_range_and_last_colon():
    """§2.10: the last colon separates the port; 0 and 65535 are valid ports."""
    assert parse_connect("192.0.2.1:0").port == 0
    assert parse_connect("192.0.2.1:65535").port == 65535
    assert parse_connect("192.0.2.1:4711").family == socket.AF_INET
    assert parse_connect("2001:db8::1:4711").address == "2001:db8::1"


def test_bracketed_and_plain_ipv6_forms_parse_the_same():
    """§2.10: [fe80::1]:4711 and fe80::1:4711 name the same IPv6 server."""
    bracketed = parse_connect("[fe80::1]:4711")
    plain = parse_connect("fe80::1:4711")
    assert bracketed == plain
    assert (plain.address, plain.port, plain.family) == ("fe80::1", 4711, socket.AF_INET6)


# ==================================================================================
# §2.11/§2.12, PROTOCOL.md §3: the wire protocol
# ==================================================================================

@pytest.mark.parametrize("host, form", [("127.0.0.1", "{host}:{port}"),
                                        ("::1", "[{host}]:{port}"),
                                        ("::1", "{host}:{port}")],
                         ids=["ipv4", "ipv6-bracketed", "ipv6-plain"])
def test_secret_is_decrypted_and_written_exactly(keyset, host, form):
    """§2.11 steps 12-13, PROTOCOL.md §3.8: the plaintext goes to stdout byte for
    byte (binary, CR LF, NUL, final newline kept), exit 0, after one connection."""
    with fs.FakeServer(fs.send_secret(keyset.secret), host) as server:
        result = run_to_end(client_args(keyset, form.format(host=host, port=server.port)))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == PASSWORD
        assert MARKER not in result.stderr
        assert server.count == 1
        assert server.connections[0].outcome == "sent"


def test_version_line_is_sent_in_clear_before_tls(keyset):
    """§2.11 step 7, PROTOCOL.md §3.2: exactly b"1\\r\\n", then nothing until the
    server starts TLS (the client is the TLS server)."""
    def scenario(conn: fs.Connection) -> None:
        conn.read_version_line()
        conn.bytes_waiting(0.3)
        conn.handshake()
        conn.send_properly(keyset.secret)

    with fs.FakeServer(scenario) as server:
        result = run_to_end(client_args(keyset, server.address))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        conn = server.connections[0]
        assert conn.version_line == b"1\r\n"
        assert conn.early_bytes == b""


def test_tls13_with_the_clients_raw_public_key(keyset):
    """§2.12, PROTOCOL.md §3.3-§3.4: TLS 1.3; the client presents its raw public key,
    whose key ID is that of tls-pubkey.pem."""
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        result = run_to_end(client_args(keyset, server.address))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        conn = server.connections[0]
        assert conn.protocol == "TLS1.3"
        assert conn.peer_der == keyset.spki_der
        assert conn.key_id == keyset.key_id
        assert conn.key_id != keys.REFUSED_KEY_ID


def test_debug_output_never_shows_the_password(keyset):
    """§2.13/§11.9 (not copied): even with --debug the password is not on stderr,
    neither raw nor in hex."""
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        result = run_to_end(client_args(keyset, server.address, "--debug"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == PASSWORD
    assert b"created GnuPG home" in result.stderr  # debug output is really on
    stderr = result.stderr.lower()
    for form in (MARKER.lower(), MARKER.hex().encode(),
                 " ".join(f"{b:02x}" for b in MARKER).encode(),
                 ":".join(f"{b:02x}" for b in MARKER).encode(),
                 "".join(f"\\x{b:02x}" for b in MARKER).encode()):
        assert form not in stderr


# ==================================================================================
# §2.10/§2.11: failed attempts are retried
# ==================================================================================

def _retry_then_succeed(keyset, *failures: fs.Scenario, extra=()) -> fs.FakeServer:
    """Failing connections, then a proper one: the client must end up with the
    password printed once, after exactly len(failures)+1 connections."""
    scenario = fs.in_turn(*failures, fs.send_secret(keyset.secret))
    with fs.FakeServer(scenario) as server:
        result = run_to_end(client_args(keyset, server.address, "--retry", "0.2", *extra))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == PASSWORD
        assert server.count == len(failures) + 1
    return server


def test_empty_answer_is_a_refusal_and_is_retried(keyset):
    """§2.11 step 11, PROTOCOL.md §3.5: zero bytes then close_notify = not approved;
    the client tries again."""
    server = _retry_then_succeed(keyset, fs.not_approved, fs.not_approved)
    assert [c.outcome for c in server.connections] == ["sent nothing", "sent nothing", "sent"]


def test_data_without_close_notify_is_discarded(keyset):
    """§2.11 step 9, PROTOCOL.md §3.7: data followed by a TCP close without
    close_notify is thrown away, even a correct secret; the next proper answer
    is used."""
    server = _retry_then_succeed(keyset, fs.secret_without_close_notify(keyset.secret))
    assert server.connections[0].outcome == "dropped"


def test_undecryptable_data_is_retried(keyset):
    """§2.11 step 12: data that is not an OpenPGP message fails to decrypt; retry."""
    _retry_then_succeed(keyset, fs.send_secret(b"this is not an OpenPGP message\n"))


def test_secret_for_another_key_is_retried(keyset):
    """§2.13: a message encrypted to a different key cannot be decrypted; retry."""
    _retry_then_succeed(keyset, fs.send_secret(keyset.foreign_secret))


def test_close_before_tls_is_retried(keyset):
    """§2.11 step 8: the server hangs up after the version line; retry."""
    _retry_then_succeed(keyset, fs.close_before_tls)


def test_garbage_instead_of_client_hello_is_retried(keyset):
    """§2.11 step 8: a failed handshake (bytes that are no TLS record); retry."""
    _retry_then_succeed(keyset, fs.garbage_instead_of_client_hello)


@pytest.mark.slow
def test_refused_connection_is_retried(keyset, start_client):
    """§2.11 step 6: connection refused fails the attempt; the client retries until
    the server listens."""
    with fs.FakeServer(fs.send_secret(keyset.secret), listen=False) as server:
        run = start_client(client_args(keyset, server.address, "--retry", "0.2"))
        time.sleep(1.0)
        assert run.alive(), "the client gave up on a refused connection:\n" + run.log()
        assert run.stdout == b""
        server.listen()
        assert run.wait() == 0, run.log()
        assert run.stdout == PASSWORD
        assert server.count == 1


@pytest.mark.slow
@pytest.mark.parametrize("host, form", [
    pytest.param("127.0.0.1", "localhost:{port}", id="host-name"),
    pytest.param("127.0.0.1", "127.1:{port}", id="short-ipv4"),
    pytest.param("127.0.0.1", ":{port}", id="empty"),
    pytest.param("::1", "[::1%lo]:{port}", id="ipv6-zone"),
])
def test_unparsable_address_keeps_retrying(keyset, start_client, host, form):
    """§2.10 step 3: addresses must be numeric literals (no host names, no %zone);
    an unparsable one makes every attempt fail and the client keeps trying."""
    with fs.FakeServer(fs.send_secret(keyset.secret), host) as server:
        run = start_client(client_args(keyset, form.format(port=server.port),
                                       "--retry", "0.2"))
        time.sleep(1.2)
        alive = run.alive()
        run.kill()
        assert run.stdout == b""
        assert server.count == 0
        assert alive, "the client exited:\n" + run.log()


@pytest.mark.slow
def test_retry_interval_separates_attempts(keyset):
    """§2.2 --retry: successive attempts at the server are --retry seconds apart."""
    scenario = fs.in_turn(fs.not_approved, fs.not_approved, fs.not_approved,
                          fs.send_secret(keyset.secret))
    with fs.FakeServer(scenario) as server:
        result = run_to_end(client_args(keyset, server.address, "--retry", "0.5"))
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        times = [c.accepted_at for c in server.connections]
    assert len(times) == 4
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert all(0.4 <= gap < 5.0 for gap in gaps), gaps


@pytest.mark.slow
def test_delay_leaves_the_retry_interval_alone(keyset, start_client):
    """§2.2 quirk, not copied: --delay 0.1 does not make the client retry every
    0.1 s; the default 10 s retry interval stays."""
    with fs.FakeServer(fs.not_approved) as server:
        run = start_client(client_args(keyset, server.address, "--delay", "0.1"))
        assert server.wait_for_connections(1, 10), run.log()
        time.sleep(1.5)
        assert run.alive(), run.log()
        assert server.count == 1


# ==================================================================================
# §2.6 steps 12-14, §2.17: set-up failures
# ==================================================================================

def _garbage_file(directory: Path, name: str, content: bytes) -> Path:
    path = directory / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("option, problem", [
    ("tls_pubkey", "missing"), ("tls_privkey", "missing"),
    ("tls_pubkey", "garbage"), ("tls_privkey", "garbage"),
    ("tls_pubkey", "empty"), ("tls_privkey", "openpgp-key"),
])
def test_unusable_tls_key_file_exits_69(keyset, tmp_path, option, problem):
    """§2.12: a TLS key that cannot be loaded ends the program with 69 and a
    message naming the file, with nothing on stdout.

    Missing and empty files are found before any connection.  Parsing the
    keys overlaps with the server's first steps (deliberate, for boot
    speed), so unparseable content ends the program after one connection
    that never gets to a TLS handshake."""
    if problem == "missing":
        path = tmp_path / "no-such-key.pem"
    elif problem == "garbage":
        path = _garbage_file(tmp_path, "garbage.pem", b"-----BEGIN PUBLIC KEY-----\n"
                             b"bm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    elif problem == "empty":
        path = _garbage_file(tmp_path, "empty.pem", b"")
    else:
        path = keyset.seckey
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        result = run_to_end(client_args(keyset, server.address, **{option: path}))
        assert result.returncode == EX_UNAVAILABLE, result.stderr.decode(errors="replace")
        assert result.stdout == b""
        assert str(path).encode() in result.stderr
        if problem in ("missing", "empty"):
            assert server.count == 0
        else:
            assert server.count <= 1
            assert all(conn.key_id is None for conn in server.connections)


@pytest.mark.slow
def test_mismatched_tls_key_files_exit_69(keyset):
    """§2.12: a tls-pubkey.pem that does not belong to tls-privkey.pem is a load
    failure: exit 69 with a message naming the files, nothing on stdout."""
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        try:
            result = run_to_end(client_args(keyset, server.address, "--retry", "0.2",
                                            tls_pubkey=keyset.other_tls_pubkey), timeout=3)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after 3 s, {server.count} failed handshakes")
    assert result.returncode == EX_UNAVAILABLE
    assert result.stdout == b""
    assert str(keyset.other_tls_pubkey).encode() in result.stderr


_OPENPGP_PROBLEMS = [
    ("pubkey", "missing"), ("seckey", "missing"),
    ("pubkey", "garbage"), ("seckey", "garbage"),
    ("seckey", "empty"), ("seckey", "public-only"), ("seckey", "other-public-only"),
]


def _openpgp_problem(keyset: KeySet, tmp_path: Path, problem: str) -> Path:
    if problem == "missing":
        return tmp_path / "no-such-key.txt"
    if problem == "garbage":
        return _garbage_file(tmp_path, "garbage.txt",
                             b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n"
                             b"=AAAA\n-----END PGP PUBLIC KEY BLOCK-----\n")
    if problem == "empty":
        return _garbage_file(tmp_path, "empty.txt", b"")
    if problem == "public-only":  # a copy, so that messages can tell it from --pubkey
        return _garbage_file(tmp_path, "public-only.txt", keyset.pubkey.read_bytes())
    return keyset.other_pubkey


def _run_with_openpgp_problem(keyset: KeySet, tmp_path: Path, option: str,
                              problem: str) -> tuple[Path, subprocess.CompletedProcess]:
    path = _openpgp_problem(keyset, tmp_path, problem)
    with fs.FakeServer(fs.not_approved) as server:
        result = run_to_end(client_args(keyset, server.address, "--retry", "0.2",
                                        **{option: path}))
    return path, result


@pytest.mark.parametrize("option, problem", _OPENPGP_PROBLEMS)
def test_unusable_openpgp_key_file_exits_69(keyset, tmp_path, option, problem):
    """§2.13/§2.17: OpenPGP key import failure (a missing or broken file, or a
    seckey.txt without a secret key) ends the program with 69, nothing on stdout."""
    _, result = _run_with_openpgp_problem(keyset, tmp_path, option, problem)
    assert result.returncode == EX_UNAVAILABLE, result.stderr.decode(errors="replace")
    assert result.stdout == b""
    assert b"import" in result.stderr.lower()


@pytest.mark.parametrize("option, problem", [
    case for case in _OPENPGP_PROBLEMS])
def test_openpgp_import_failure_names_the_faulty_file(keyset, tmp_path, option, problem):
    """§2.13: the import failure message names the key file that is at fault."""
    path, result = _run_with_openpgp_problem(keyset, tmp_path, option, problem)
    assert result.returncode == EX_UNAVAILABLE
    assert str(path).encode() in result.stderr, result.stderr.decode(errors="replace")


def test_undecryptable_secret_sent_with_broken_openpgp_key_is_never_printed(keyset, tmp_path):
    """§2.13: with a seckey.txt lacking the secret key, even a correct secret from
    the server is not printed and the program ends with 69."""
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        result = run_to_end(client_args(keyset, server.address, "--retry", "0.2",
                                        seckey=keyset.pubkey))
    assert result.returncode == EX_UNAVAILABLE, result.stderr.decode(errors="replace")
    assert result.stdout == b""


# ==================================================================================
# §2.15/§2.16: signals
# ==================================================================================

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_signal_while_retrying_kills_by_that_signal_after_cleanup(keyset, start_client,
                                                                  signum):
    """§2.15 step 6, §2.16: a terminating signal while retrying ends the process by
    that very signal, after the GnuPG home and its agent are gone."""
    with fs.FakeServer(fs.not_approved) as server:
        run = start_client(client_args(keyset, server.address, "--retry", "0.2", "--debug"))
        home = run.gnupg_home()
        assert server.wait_for_connections(2, 10), run.log()
        assert run.wait_for_stderr("OpenPGP keys imported", 10), run.log()
        run.send_signal(signum)
        assert run.wait(10) == -signum, run.log()
    assert run.stdout == b""
    assert_cleaned_up(home, keyset.directory)


# With --debug, GnuTLS's own log messages are passed to Python through a
# ctypes callback.  A signal handler that runs inside that callback has its
# exception swallowed by ctypes ("Exception ignored on calling ctypes callback
# function"); the client must still notice the signal (it checks the signal
# flag whenever a blocking TLS call is interrupted).  Both variants are run:
# with the GnuTLS log, and without it (MANDOS_GNUTLS_DEBUG=0).
_DEBUG_MODES = [pytest.param(True, id="gnutls-log"),
                pytest.param(False, id="no-gnutls-log")]


def _signal_while_connected(keyset, start_client, scenario, connected,
                            gnutls_log: bool) -> None:
    env = None if gnutls_log else {**os.environ, "MANDOS_GNUTLS_DEBUG": "0"}
    with fs.FakeServer(scenario) as server:
        run = start_client(client_args(keyset, server.address, "--retry", "0.2", "--debug"),
                           env=env)
        home = run.gnupg_home()
        assert server.wait_until(lambda s: s.count and connected(s.connections[0]), 10), \
            run.log()
        time.sleep(0.3)  # the client is now blocked in the read
        started = time.monotonic()
        run.send_signal(signal.SIGTERM)
        assert run.wait(5) == -signal.SIGTERM, run.log()
        assert time.monotonic() - started < 5.0
        assert server.count == 1
    assert run.stdout == b""
    assert_cleaned_up(home, keyset.directory)


@pytest.mark.slow
@pytest.mark.parametrize("gnutls_log", _DEBUG_MODES)
def test_sigterm_during_the_handshake(keyset, start_client, gnutls_log):
    """§2.16: SIGTERM while the client waits for the ClientHello (the server
    stalls after the version line) ends it promptly by SIGTERM, cleaned up."""
    _signal_while_connected(keyset, start_client, fs.stall_before_tls,
                            lambda conn: conn.version_line is not None, gnutls_log)


@pytest.mark.slow
@pytest.mark.parametrize("gnutls_log", _DEBUG_MODES)
def test_sigterm_while_waiting_for_approval(keyset, start_client, gnutls_log):
    """§2.16, PROTOCOL.md §3.5: SIGTERM while the server holds the session open
    after the handshake (approval wait) ends it promptly by SIGTERM, cleaned up."""
    _signal_while_connected(keyset, start_client, fs.stall_after_handshake,
                            lambda conn: conn.key_id is not None, gnutls_log)


@pytest.mark.slow
def test_signal_ignored_at_start_stays_ignored(keyset, start_client):
    """§2.6 step 8: a signal ignored when the program starts gets no handler; the
    client survives it and keeps retrying (and still dies by another one)."""
    def ignore_sigterm() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    with fs.FakeServer(fs.not_approved) as server:
        run = start_client(client_args(keyset, server.address, "--retry", "0.2", "--debug"),
                           preexec_fn=ignore_sigterm)
        home = run.gnupg_home()
        assert server.wait_for_connections(2, 10), run.log()
        run.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        seen = server.count
        assert server.wait_for_connections(seen + 2, 5), "no more attempts after SIGTERM"
        assert run.alive()
        run.send_signal(signal.SIGINT)
        assert run.wait(10) == -signal.SIGINT, run.log()
    assert_cleaned_up(home, keyset.directory)


# ==================================================================================
# §2.5, §11.2: privileges
# ==================================================================================

def _unlock_with_a_look_while_waiting(keyset, start_client, key_dir, preexec_fn):
    """Run the client until the server has it waiting after the handshake;
    return what was seen then, then let the server send the secret."""
    go = threading.Event()

    def scenario(conn: fs.Connection) -> None:
        conn.read_version_line()
        conn.handshake()
        go.wait(RUN_TIMEOUT)
        conn.send_properly(keyset.secret)

    files = nobody_keys(keyset, key_dir)
    with fs.FakeServer(scenario) as server:
        run = start_client(client_args(keyset, server.address, "--retry", "0.2", "--debug",
                                       **files), preexec_fn=preexec_fn)
        home = run.gnupg_home()
        waiting = server.wait_until(lambda s: s.count and s.connections[0].key_id, 10)
        assert waiting, run.log()
        info = os.stat(home)
        processes = {pid: (ids_of(pid, "Uid"), ids_of(pid, "Gid"))
                     for pid in processes_mentioning(key_dir)}
        go.set()
        assert run.wait() == 0, run.log()
    assert run.stdout == PASSWORD
    assert_cleaned_up(home, key_dir)
    return info, processes, run


@needs_root
@pytest.mark.parametrize("preexec_fn", [as_nobody_with_saved_root,
                                        as_password_agent_starts_it],
                         ids=["setuid-root", "password-agent"])
def test_root_start_runs_unprivileged_and_unlocks(keyset, start_client, public_tmp,
                                                  preexec_fn):
    """§2.5: started with real uid 65534 and effective/saved uid 0, the client
    lowers its effective uid at once (root stays only in the saved uid), drops
    group privileges for good, creates the GnuPG home as uid 65534 (mode 0700),
    does its network work unprivileged, and unlocks."""
    info, processes, run = _unlock_with_a_look_while_waiting(
        keyset, start_client, public_tmp, preexec_fn)
    assert info.st_uid == NOBODY
    assert info.st_mode & 0o777 == 0o700
    assert run.pid in processes
    # Effective UID lowered, root kept only as the saved UID; the group
    # dropped for good.
    assert processes[run.pid] == ((NOBODY, NOBODY, 0), (NOBODY, NOBODY, NOBODY))
    for pid, ((_, effective, _), _) in processes.items():
        assert effective == NOBODY, f"process {pid} has effective uid {effective}"


@needs_root
def test_unprivileged_start_unlocks(keyset, start_client, public_tmp):
    """§2.5: without any root privileges (all uids 65534) the client still unlocks."""
    info, processes, _ = _unlock_with_a_look_while_waiting(
        keyset, start_client, public_tmp, as_nobody)
    assert info.st_uid == NOBODY
    assert processes, "no client process found while it waited"


def test_nothing_of_the_client_remains_after_success(keyset):
    """§2.15, §11.4: after a success the OpenPGP helper process, gpg-agent and the
    GnuPG home are all gone by the time the client has exited."""
    with fs.FakeServer(fs.send_secret(keyset.secret)) as server:
        result = run_to_end(client_args(keyset, server.address, "--debug"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    homes = re.findall(rb"created GnuPG home (\S+)", result.stderr)
    assert len(homes) == 1
    assert_cleaned_up(os.fsdecode(homes[0]), keyset.directory)


# --- the OpenPGP process's end ------------------------------------------------------

def _child_that(sleeps: float) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(sleeps)
        finally:
            os._exit(7)
    return pid


@pytest.fixture(params=[True, False], ids=["pidfd", "polling"])
def decryptor_module(request, monkeypatch):
    """mandos.client.decryptor, also as on a kernel without process file descriptors."""
    from mandos.client import decryptor
    if not request.param:
        def no_pidfd(pid):
            raise OSError(38, "Function not implemented")
        monkeypatch.setattr(decryptor.os, "pidfd_open", no_pidfd)
    return decryptor


def test_openpgp_process_is_reaped_when_it_exits(decryptor_module):
    """The parent's end sequence waits for the OpenPGP process."""
    pid = _child_that(sleeps=0.1)
    started = time.monotonic()
    decryptor_module._wait_or_kill(pid, timeout=10)
    assert time.monotonic() - started < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped


def test_openpgp_process_that_hangs_is_killed(decryptor_module, caplog):
    pid = _child_that(sleeps=60)
    started = time.monotonic()
    decryptor_module._wait_or_kill(pid, timeout=0.2)
    assert time.monotonic() - started < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert f"OpenPGP process {pid} did not exit" in caplog.text
