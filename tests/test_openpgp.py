"""Tests for mandos.openpgp with the real gpg (CLIENT.md §2.13, PROTOCOL.md §3.6, §3.8, §4.2, §4.4)."""

from __future__ import annotations

import base64
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from mandos import keys, openpgp
from mandos.openpgp import DecryptError, GnuPGHome, ImportStats, KeyImportError

REPO = Path(__file__).resolve().parent.parent
PASSWORD = b"correct horse \x00 battery\n\xff staple"  # every byte must survive


@dataclass
class Keyring:
    """A generating home holding the client key and an unrelated key, plus exported files."""

    home: GnuPGHome
    fingerprint: str
    other_fingerprint: str
    pubkey: Path
    seckey: Path


def gpg_cli(home: str, *args: str, data: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--batch", "--no-tty", "--homedir", home,
                           "--trust-model", "always", *args],
                          input=data, capture_output=True, timeout=60)


def live_agents(home: str) -> list[psutil.Process]:
    """gpg-agent processes for ``home``, found independently of the module under test."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if (proc.info["name"] == "gpg-agent" and home in (proc.info["cmdline"] or [])
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(proc)
    return found


def no_agent_left(home: str, timeout: float = 2.0) -> bool:
    """True once no live gpg-agent serves ``home``.

    close() kills the agent with SIGKILL and does not wait for the kernel
    to finish tearing it down (milliseconds), so this waits a little.
    """
    deadline = time.monotonic() + timeout
    while live_agents(home):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def keyring(tmp_path_factory) -> Keyring:
    directory = tmp_path_factory.mktemp("openpgp-keys")
    with GnuPGHome() as home:
        fingerprint = openpgp.generate_openpgp_key(home, "client.example",
                                                   key_length=2048, subkey_length=2048)
        other = openpgp.generate_openpgp_key(home, "other.example", key_type="EDDSA",
                                             subkey_type="ECDH", key_curve="ed25519",
                                             subkey_curve="cv25519")
        public, secret = home.export_keys(fingerprint, openpgp.key_comment("client.example"))
        pubkey = directory / openpgp.PUBKEY_NAME
        seckey = directory / openpgp.SECKEY_NAME
        keys.write_key_file(pubkey, public.encode())
        keys.write_key_file(seckey, secret.encode())
        yield Keyring(home, fingerprint, other, pubkey, seckey)


@pytest.fixture
def client_home(keyring) -> GnuPGHome:
    with GnuPGHome() as home:
        home.import_keys(keyring.pubkey, keyring.seckey)
        yield home


# --- the home directory -----------------------------------------------------------

def test_home_is_private_directory_under_default_base():
    expected = "/run/tmp" if (os.path.isdir("/run/tmp")
                              and os.access("/run/tmp", os.W_OK | os.X_OK)) else "/tmp"
    assert openpgp.default_base() == expected
    with GnuPGHome() as home:
        info = os.lstat(home.path)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        assert os.path.dirname(home.path) == expected
        assert os.path.basename(home.path).startswith("mandos")
        assert len(home.path) <= openpgp._MAX_HOME_LENGTH


def test_default_base_takes_first_usable_candidate(tmp_path):
    usable = tmp_path / "usable"
    usable.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("")
    missing = str(tmp_path / "missing")
    assert openpgp.default_base((str(usable), "/tmp")) == str(usable)
    assert openpgp.default_base((missing, str(usable))) == str(usable)
    assert openpgp.default_base((str(a_file), str(usable))) == str(usable)
    assert openpgp.default_base((missing, "/tmp")) == "/tmp"


def test_default_base_skips_unwritable_directory(public_tmp):
    readonly = public_tmp / "readonly"
    readonly.mkdir(mode=0o755)
    writable = public_tmp / "writable"
    writable.mkdir()
    os.chmod(writable, 0o1777)
    if os.geteuid() != 0:
        os.chmod(readonly, 0o555)
        assert openpgp.default_base((str(readonly), str(writable))) == str(writable)
        return
    # root may write anywhere: ask as nobody
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, openpgp.default_base((str(readonly), str(writable))).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    assert answer == str(writable)


def test_given_base_is_used(tmp_path):
    with GnuPGHome(tmp_path) as home:
        assert os.path.dirname(home.path) == str(tmp_path)
    assert not os.path.exists(home.path)


def test_home_removed_after_with():
    with GnuPGHome() as home:
        path = home.path
        Path(path, "file").write_text("x")
    assert not os.path.lexists(path)
    assert home.closed


def test_home_removed_after_exception():
    with pytest.raises(RuntimeError):
        with GnuPGHome() as home:
            path = home.path
            raise RuntimeError("boom")
    assert not os.path.lexists(path)


def test_close_is_idempotent_and_home_unusable_afterwards():
    home = GnuPGHome()
    home.close()
    home.close()
    assert not os.path.lexists(home.path)
    with pytest.raises(openpgp.OpenPGPError, match="closed"):
        home.decrypt(b"x")


def test_agent_stopped_and_home_removed_after_import(keyring):
    with GnuPGHome() as home:
        home.import_keys(keyring.pubkey, keyring.seckey)
        path = home.path
        # importing a secret key makes gpg 2.2 start an agent for this home
        assert live_agents(path)
        assert openpgp.agent_pids(path) == [p.pid for p in live_agents(path)]
    assert not os.path.lexists(path)
    assert no_agent_left(path)


def test_stop_agent_kills_the_tracked_agent_and_gpg_can_start_another(keyring):
    """The client stops the agent right after decrypting; a later decryption
    (another attempt) still works with an agent gpg starts, and close() kills
    that one too, although it was never tracked."""
    message = keyring.home.encrypt(b"twice", keyring.fingerprint)
    with GnuPGHome() as home:
        home.launch_agent()
        home.import_keys(keyring.pubkey, keyring.seckey)
        path = home.path
        first = [p.pid for p in live_agents(path)]
        assert len(first) == 1 and len(home._agent_pidfds) == 1
        assert bytes(home.decrypt(message)) == b"twice"
        home.stop_agent()
        assert no_agent_left(path)
        assert bytes(home.decrypt(message)) == b"twice"
        second = [p.pid for p in live_agents(path)]
        assert len(second) == 1 and second != first
    assert not os.path.lexists(path)
    assert no_agent_left(path)


def test_stop_agent_signals_only_the_tracked_process(keyring, monkeypatch):
    """The kill goes through the process file descriptor taken while the
    agent was known to be this home's, never to a PID looked up later."""
    sent = []
    real = signal.pidfd_send_signal
    monkeypatch.setattr(openpgp.signal, "pidfd_send_signal",
                        lambda fd, sig: (sent.append(sig), real(fd, sig)))
    kills = []
    monkeypatch.setattr(openpgp.os, "kill", lambda pid, sig: kills.append(pid))
    with GnuPGHome() as home:
        home.import_keys(keyring.pubkey, keyring.seckey)
        path = home.path
        home.stop_agent()
        assert sent == [signal.SIGKILL] and kills == []
        assert no_agent_left(path)


def test_missing_home_entries_are_not_errors(caplog):
    import shutil

    home = GnuPGHome()
    shutil.rmtree(home.path)
    with caplog.at_level(logging.WARNING):
        home.close()
    assert [r for r in caplog.records if r.name == "mandos.openpgp"] == []


def test_cleanup_removes_key_directories_and_does_not_follow_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    with GnuPGHome() as home:
        private = Path(home.path, "private-keys-v1.d")
        private.mkdir()
        for name in ("A.key", "B.key"):
            (private / name).write_text("secret")
        (private / "nested").mkdir()
        (private / "nested" / "C.key").write_text("secret")
        (private / "link").symlink_to(outside)
        Path(home.path, "link").symlink_to(outside)
        Path(home.path, "filelink").symlink_to(outside / "keep")
    assert not os.path.lexists(home.path)
    assert (outside / "keep").read_text() == "keep"


def test_close_in_forked_child_leaves_parent_home():
    with GnuPGHome() as home:
        pid = os.fork()
        if pid == 0:
            try:
                home.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.path.isdir(home.path)
    assert not os.path.lexists(home.path)


CHILD = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from mandos.openpgp import GnuPGHome

style = sys.argv[4]
home = GnuPGHome()

def on_sigterm(signo, frame):
    if style == "close":
        home.close()
        os._exit(0)
    raise SystemExit(0)

signal.signal(signal.SIGTERM, on_sigterm)
with home:
    home.import_keys(sys.argv[2], sys.argv[3])
    print(home.path, flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("style", ["close", "raise"])
def test_home_removed_when_owner_gets_sigterm(keyring, style):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(REPO), str(keyring.pubkey),
                              str(keyring.seckey), style],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = child.stdout.readline().strip()
        assert path, child.stderr.read()
        assert os.path.isdir(path)
        assert live_agents(path)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not os.path.lexists(path)
    assert no_agent_left(path)


# --- import ---------------------------------------------------------------------------

def test_import_public_then_secret(keyring):
    with GnuPGHome() as home:
        stats = home.import_keys(keyring.pubkey, keyring.seckey)
        assert stats.imported == 1 and not stats.failed
        assert stats.sec_imported == 1 and stats.unchanged == 1
        assert home.fingerprints() == [keyring.fingerprint]
        assert home.fingerprints(secret=True) == [keyring.fingerprint]


def test_importing_the_same_keys_twice_succeeds(client_home, keyring):
    stats = client_home.import_keys(keyring.pubkey, keyring.seckey)
    assert stats.imported == 0 and stats.unchanged == 2
    assert stats.sec_dups == 1


def test_import_missing_key_file(tmp_path):
    with GnuPGHome() as home:
        with pytest.raises(keys.MissingKeyFile) as info:
            home.import_keys(tmp_path / "pubkey.txt", tmp_path / "seckey.txt")
    assert info.value.path == str(tmp_path / "pubkey.txt")


def test_import_empty_key_file(tmp_path):
    empty = tmp_path / "pubkey.txt"
    empty.write_bytes(b"")
    with GnuPGHome() as home:
        with pytest.raises(keys.EmptyKeyFile):
            home.import_key_file(empty)


@pytest.mark.parametrize("content", [
    b"garbage\n",
    b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAAAAAA\n-----END PGP PUBLIC KEY BLOCK-----\n",
])
def test_import_garbage_key_file(tmp_path, content):
    bad = tmp_path / "pubkey.txt"
    bad.write_bytes(content)
    with GnuPGHome() as home:
        with pytest.raises(KeyImportError) as info:
            home.import_key_file(bad)
    assert isinstance(info.value, keys.KeyFileError)
    assert info.value.path == str(bad)
    assert info.value.stats is not None and info.value.stats.failed
    assert "imported=0" in str(info.value) and "unchanged=0" in str(info.value)


@pytest.mark.parametrize("imported,not_imported,unchanged,failed", [
    (1, 0, 0, False),   # a new key
    (0, 0, 1, False),   # already there
    (0, 0, 0, True),    # nothing
    (1, 1, 0, True),    # some not imported
    (1, 1, 1, False),   # ... but one unchanged
    (0, 1, 1, False),
    (2, 0, 0, False),
])
def test_import_failure_rule(imported, not_imported, unchanged, failed):
    stats = ImportStats(imported=imported, not_imported=not_imported, unchanged=unchanged)
    assert stats.failed is failed


def test_import_statistics_are_parsed_by_gpg_field_order():
    status = ("[GNUPG:] IMPORT_OK 1 ABC\n"
              "[GNUPG:] IMPORT_RES 1 2 3 0 5 6 7 8 9 10 11 12 13 14 15\n")
    stats = ImportStats.from_status(status)
    assert (stats.count, stats.no_user_id, stats.imported, stats.unchanged) == (1, 2, 3, 5)
    assert (stats.sec_read, stats.sec_imported, stats.sec_dups) == (10, 11, 12)
    assert (stats.skipped_new_keys, stats.not_imported, stats.skipped_v3_keys) == (13, 14, 15)
    assert ImportStats.from_status("") == ImportStats()


# --- the January 1970 clock work-around ----------------------------------------------

JAN_31_1970_END = 31 * 86400 - 1


@pytest.mark.parametrize("now,unset", [
    (0.0, True),
    (12 * 3600.0, True),
    (JAN_31_1970_END, True),
    (JAN_31_1970_END + 1, False),   # 1 February 1970
    (-1.0, False),                  # 31 December 1969
    (365 * 86400.0, False),         # January 1971
    (1_700_000_000.0, False),
])
def test_clock_looks_unset(now, unset):
    assert openpgp.clock_looks_unset(now) is unset


def test_real_clock_is_read_when_no_time_is_given():
    assert openpgp.clock_looks_unset() is (time.gmtime().tm_year == 1970
                                           and time.gmtime().tm_mon == 1)


def test_set_clock_from_file_uses_mtime_under_privileges(tmp_path):
    key_file = tmp_path / "pubkey.txt"
    key_file.write_text("x")
    os.utime(key_file, (1_600_000_000, 1_600_000_000))
    calls = []

    class Privileged:
        def __enter__(self):
            calls.append("raise")

        def __exit__(self, *exc):
            calls.append("lower")

    assert openpgp.set_clock_from_file(key_file, privileged=Privileged,
                                       set_clock=lambda t: calls.append(t))
    assert calls == ["raise", 1_600_000_000, "lower"]


def test_set_clock_failure_is_only_logged(tmp_path, caplog):
    key_file = tmp_path / "pubkey.txt"
    key_file.write_text("x")

    def refuse(seconds: float) -> None:
        raise PermissionError(1, "Operation not permitted")

    with caplog.at_level(logging.WARNING, logger="mandos.openpgp"):
        assert openpgp.set_clock_from_file(key_file, set_clock=refuse) is False
        assert openpgp.set_clock_from_file(tmp_path / "missing") is False
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


def test_import_sets_clock_from_key_files_in_january_1970(keyring, tmp_path):
    pub = tmp_path / "pubkey.txt"
    sec = tmp_path / "seckey.txt"
    pub.write_bytes(keyring.pubkey.read_bytes())
    sec.write_bytes(keyring.seckey.read_bytes())
    os.utime(pub, (2_000_000_000, 2_000_000_000))
    os.utime(sec, (2_000_000_100, 2_000_000_100))
    set_to = []
    with GnuPGHome() as home:
        home.import_keys(pub, sec, clock=lambda: 86400.0, set_clock=set_to.append)
    assert set_to == [2_000_000_000, 2_000_000_100]
    set_to.clear()
    with GnuPGHome() as home:
        home.import_keys(pub, sec, clock=time.time, set_clock=set_to.append)
    assert set_to == []


# --- decryption ------------------------------------------------------------------------

def test_decrypt_message_made_by_encrypt(client_home, keyring):
    message = keyring.home.encrypt(PASSWORD, keyring.fingerprint)
    plaintext = client_home.decrypt(message)
    assert plaintext == PASSWORD and isinstance(plaintext, bytes)
    assert "battery" not in repr(plaintext)


@pytest.mark.parametrize("armor", [False, True])
def test_decrypt_message_made_by_gpg_command_line(client_home, keyring, armor):
    result = gpg_cli(keyring.home.path, "--encrypt", "--recipient", keyring.fingerprint,
                     *(["--armor"] if armor else []), data=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"-----BEGIN PGP MESSAGE-----") is armor
    assert client_home.decrypt(result.stdout) == PASSWORD


def test_signature_is_not_verified(client_home, keyring):
    # signed by a key the client does not have
    result = gpg_cli(keyring.home.path, "--encrypt", "--recipient", keyring.fingerprint,
                     "--sign", "--local-user", keyring.other_fingerprint, data=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert client_home.decrypt(result.stdout) == PASSWORD


def test_decrypt_empty_plaintext(client_home, keyring):
    assert client_home.decrypt(keyring.home.encrypt(b"", keyring.fingerprint)) == b""


def test_decrypt_with_wrong_key(client_home, keyring):
    message = keyring.home.encrypt(PASSWORD, keyring.other_fingerprint)
    with pytest.raises(DecryptError, match="decryption failed"):
        client_home.decrypt(message)


@pytest.mark.parametrize("data", [b"garbage", b"\x00" * 100, b""])
def test_decrypt_garbage(client_home, data):
    with pytest.raises(DecryptError):
        client_home.decrypt(data)


def test_decrypt_tampered_message_reveals_no_plaintext(client_home, keyring):
    plaintext = b"TAMPER-MARKER " * 20
    message = bytearray(keyring.home.encrypt(plaintext, keyring.fingerprint, sign=False))
    message[-5] ^= 0xFF
    with pytest.raises(DecryptError) as info:
        client_home.decrypt(bytes(message))
    assert "TAMPER" not in str(info.value)


def test_decrypt_needs_the_secret_key(keyring):
    message = keyring.home.encrypt(PASSWORD, keyring.fingerprint)
    with GnuPGHome() as home:
        home.import_key_file(keyring.pubkey)
        with pytest.raises(DecryptError):
            home.decrypt(message)


# --- encryption -------------------------------------------------------------------------

def test_encrypt_makes_binary_signed_message_to_the_key(keyring):
    message = keyring.home.encrypt(PASSWORD, keyring.fingerprint)
    assert message[0] & 0x80  # an OpenPGP packet tag, not armour
    assert b"BEGIN PGP" not in message
    packets = gpg_cli(keyring.home.path, "--list-packets", data=message).stdout.decode()
    assert ":pubkey enc packet:" in packets
    assert ":literal data packet:" in packets and ":signature packet:" in packets
    check = gpg_cli(keyring.home.path, "--status-fd", "1", "--decrypt", data=message)
    assert f"VALIDSIG {keyring.fingerprint}".encode() in check.stdout


def test_encrypt_without_signature(keyring):
    message = keyring.home.encrypt(PASSWORD, keyring.fingerprint, sign=False)
    packets = gpg_cli(keyring.home.path, "--list-packets", data=message).stdout.decode()
    assert ":pubkey enc packet:" in packets and ":signature packet:" not in packets


def test_encrypt_to_unknown_key_fails(keyring):
    with pytest.raises(openpgp.EncryptError):
        keyring.home.encrypt(PASSWORD, "0" * 40)


# --- key generation and export -------------------------------------------------------

def test_key_parameters_default_to_the_originals():
    assert openpgp.key_parameters("host.example") == (
        "Key-Type: RSA\n"
        "Key-Length: 4096\n"
        "Key-Usage: sign,auth\n"
        "Subkey-Type: RSA\n"
        "Subkey-Length: 4096\n"
        "Subkey-Usage: encrypt\n"
        "Name-Real: host.example\n"
        "Expire-Date: 0\n"
        "%no-protection\n"
        "%commit\n")


def test_key_parameters_with_comment_and_email():
    text = openpgp.key_parameters("h", email="root@h", comment="c", expire="1y")
    assert "Name-Real: h\nName-Comment: c\nName-Email: root@h\nExpire-Date: 1y\n" in text


@pytest.mark.parametrize("field", ["name", "email", "comment", "expire"])
def test_key_parameters_refuse_line_breaks(field):
    values = dict(name="h", email="", comment="", expire="0")
    values[field] = "x\n%pubring /etc/evil"
    with pytest.raises(ValueError):
        openpgp.key_parameters(**values)


def test_generated_key_user_id_usage_and_export_comment():
    with GnuPGHome() as home:
        fingerprint = openpgp.generate_openpgp_key(
            home, "n.example", email="root@n.example", comment="a comment",
            key_type="EDDSA", subkey_type="ECDH", key_curve="ed25519", subkey_curve="cv25519")
        [key] = home._gnupg().list_keys(secret=True)
        assert key["fingerprint"] == fingerprint
        assert key["uids"] == ["n.example (a comment) <root@n.example>"]
        assert {c for c in key["cap"] if c.islower()} == {"s", "c", "a"}
        [subkey] = key["subkey_info"].values()
        assert subkey["cap"] == "e"
        public, secret = home.export_keys(
            fingerprint, openpgp.key_comment("n.example", "a comment", "root@n.example"))
    comment = "Comment: Mandos client key for n.example (a comment) <root@n.example>\n"
    assert public.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----\n" + comment)
    assert secret.startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----\n" + comment)


def test_exported_secret_key_is_unprotected(keyring):
    packets = subprocess.run(["gpg", "--list-packets"], input=keyring.seckey.read_bytes(),
                             capture_output=True).stdout.decode()
    assert ":secret key packet:" in packets and ":secret sub key packet:" in packets
    assert "protected" not in packets


def test_key_comment():
    assert openpgp.key_comment("h") == "Mandos client key for h"
    assert openpgp.key_comment("h", "c") == "Mandos client key for h (c)"
    assert openpgp.key_comment("h", email="e@h") == "Mandos client key for h <e@h>"


# --- logging -------------------------------------------------------------------------------

def test_plaintext_and_secret_key_never_reach_debug_logs(keyring, caplog):
    marker = b"PLAINTEXT-MARKER-7f3a"
    secret_lines = keyring.seckey.read_text().splitlines()
    secret_body = [line for line in secret_lines[3:-2] if len(line) == 64]
    assert len(secret_body) > 5
    message = keyring.home.encrypt(marker, keyring.fingerprint)
    with caplog.at_level(logging.DEBUG):
        with GnuPGHome() as home:
            home.import_keys(keyring.pubkey, keyring.seckey)
            assert home.decrypt(message) == marker
        keyring.home.export_keys(keyring.fingerprint)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert any(r.name == "gnupg" and r.levelno == logging.DEBUG for r in caplog.records)
    for needle in (marker.decode(), marker.hex(), repr(marker)[2:-1]):
        assert needle not in text
    for line in secret_body:
        assert line not in text


def test_gnupg_log_filter_drops_data_messages_only(caplog):
    openpgp.protect_gnupg_logger()
    openpgp.protect_gnupg_logger()  # once is enough
    gnupg_logger = logging.getLogger("gnupg")
    assert sum(isinstance(f, openpgp.GnupgLogFilter) for f in gnupg_logger.filters) == 1
    with caplog.at_level(logging.DEBUG):
        gnupg_logger.debug("chunk: %r" % b"SECRET-CHUNK")
        gnupg_logger.debug("decrypt result[:100]: %r", b"SECRET-RESULT")
        gnupg_logger.debug("import_keys: %r", "SECRET-KEY")
        gnupg_logger.debug("%s: %s", 123, "gpg --decrypt")
        gnupg_logger.warning("gpg returned a non-zero error code: %d", 2)
        gnupg_logger.warning("Exception occurred while reading")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "SECRET" not in text
    assert "123: gpg --decrypt" in text
    # our own errors say that gpg failed, and why; other warnings pass
    assert "non-zero error code" not in text
    assert "Exception occurred while reading" in text


def test_failed_decryption_is_reported_once(client_home, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(openpgp.DecryptError) as failure:
        client_home.decrypt(b"not an OpenPGP message")
    assert "decryption failed" in str(failure.value)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- the original key generator -------------------------------------------------------------

def original_keygen(debian_peers: Path) -> Path:
    path = debian_peers / "usr" / "sbin" / "mandos-keygen"
    assert path.is_file(), path
    return path


def original_passfile_section(keygen: Path, key_dir: Path, password: bytes) -> str:
    passfile = key_dir.parent / "pass"
    # printf: the exact bytes, no trailing newline
    subprocess.run(["sh", "-c", 'printf "%s" "$1" > "$2"', "sh", password, str(passfile)],
                   check=True)
    assert passfile.read_bytes() == password
    result = subprocess.run(["sh", str(keygen), "--passfile", str(passfile), "--no-ssh",
                             "--dir", str(key_dir), "--name", "test.example"],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def secret_of(section: str) -> bytes:
    lines = section.splitlines()
    start = lines.index("secret =") + 1
    body = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        body.append(line.strip())
    return base64.b64decode("".join(body))


@pytest.mark.interop
def test_decrypts_secret_made_by_original_keygen_with_its_keys(debian_peers, tmp_path):
    keygen = original_keygen(debian_peers)
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    subprocess.run(["sh", str(keygen), "--dir", str(key_dir), "--force", "--length", "1024",
                    "--sublength", "1024", "--name", "test.example"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL, timeout=120)
    password = "pass word with \\ backslash and ünïcode".encode()
    section = original_passfile_section(keygen, key_dir, password)
    with GnuPGHome() as home:
        home.import_keys(key_dir / openpgp.PUBKEY_NAME, key_dir / openpgp.SECKEY_NAME)
        [fingerprint] = home.fingerprints()
        assert f"fingerprint = {fingerprint}\n" in section
        assert home.decrypt(secret_of(section)) == password


@pytest.mark.interop
def test_original_keygen_encrypts_to_our_keys(debian_peers, keyring, tmp_path):
    keygen = original_keygen(debian_peers)
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    for path in (keyring.pubkey, keyring.seckey):
        (key_dir / path.name).write_bytes(path.read_bytes())
    section = original_passfile_section(keygen, key_dir, b"hunter2")
    assert f"fingerprint = {keyring.fingerprint}\n" in section
    assert "key_id" not in section  # no TLS key in that directory
    with GnuPGHome() as home:
        home.import_keys(keyring.pubkey, keyring.seckey)
        assert home.decrypt(secret_of(section)) == b"hunter2"


def test_module_import_is_cheap():
    code = "import sys, mandos.openpgp, mandos.keys; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert "gnupg" not in out
    assert not any(name.startswith("cryptography") for name in out)


def test_import_fails_when_the_secret_key_file_holds_no_secret_key(tmp_path, keyring):
    """A broken seckey.txt fails at import, not later as an undecryptable secret."""
    not_secret = tmp_path / "seckey.txt"
    not_secret.write_bytes(keyring.pubkey.read_bytes())
    with GnuPGHome() as home:
        with pytest.raises(openpgp.KeyImportError) as excinfo:
            home.import_keys(keyring.pubkey, not_secret)
    assert excinfo.value.path == str(not_secret)
    assert "no secret key" in str(excinfo.value)
