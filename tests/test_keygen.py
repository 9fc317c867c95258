"""Tests for mandos-keygen with the real gpg and real files (SERVER.md §17, PROTOCOL.md §4).

The program is run as a separate process through bin/mandos-keygen, as an
administrator would run it.  OpenPGP keys are made small (ed25519/cv25519
or RSA 1024) except in the one test of the default sizes.
"""

from __future__ import annotations

import base64
import configparser
import os
import re
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pexpect
import pytest

from mandos import keygen, keys
from mandos.openpgp import GnuPGHome

REPO = Path(__file__).resolve().parent.parent
KEYGEN = REPO / "bin" / "mandos-keygen"
MAN_PAGE = REPO / "man" / "mandos-keygen.8"
KEY_FILES = ("pubkey.txt", "seckey.txt", "tls-pubkey.pem", "tls-privkey.pem")
FAST = ("--type", "ed25519", "--subtype", "cv25519")
# Every byte must survive: NUL, CR LF, high bytes and the final newline.
PASSPHRASE = b"open sesame \x00\r\n\xff\x01 end\n"


def run(*args: str, input: bytes | None = None, env: dict | None = None,
        timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run bin/mandos-keygen; stdin is empty unless ``input`` or ``stdin`` is given."""
    if input is None and "stdin" not in kwargs:
        kwargs["stdin"] = subprocess.DEVNULL
    return subprocess.run([str(KEYGEN), *args], input=input, capture_output=True,
                          env=env, timeout=timeout, **kwargs)


def no_ssh_env(tmp_path: Path) -> dict:
    """An environment in which ssh-keyscan finds no host key (no SSH server here)."""
    fake = tmp_path / "no-ssh-bin"
    fake.mkdir(exist_ok=True)
    script = fake / "ssh-keyscan"
    script.write_text("#!/bin/sh\nexit 1\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}


def fake_keyscan_env(tmp_path: Path, accepts_q: bool, log: Path) -> dict:
    """A PATH whose ssh-keyscan knows only an ed25519 key, logs its arguments,
    and refuses -q unless ``accepts_q`` (as OpenSSH before 9.8 does)."""
    fake = tmp_path / "fake-bin"
    fake.mkdir(exist_ok=True)
    script = fake / "ssh-keyscan"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {log}
case " $* " in *" -q "*) {"" if accepts_q else "exit 1"};; esac
case " $* " in *" ed25519 "*)
  echo "# localhost:22 SSH-2.0-OpenSSH_9.9" >&2
  echo "localhost ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uga2V5IGZvciB0ZXN0cw==";;
esac
exit 0
""")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}


def make_keys(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    result = run("--dir", str(directory), *FAST, *extra)
    assert result.returncode == 0, result.stderr.decode()
    return result


def section_of(stdout: bytes) -> tuple[str, configparser.SectionProxy]:
    """Parse a printed section as the server does (configparser, % expansion)."""
    parser = configparser.ConfigParser()
    parser.read_string(stdout.decode("ascii"))
    (name,) = parser.sections()
    return name, parser[name]


def decrypt_secret(keydir: Path, secret_value: str) -> bytes:
    with GnuPGHome() as home:
        home.import_keys(keydir / "pubkey.txt", keydir / "seckey.txt")
        return bytes(home.decrypt(base64.b64decode(secret_value)))


def key_info(keydir: Path) -> dict:
    with GnuPGHome() as home:
        home.import_keys(keydir / "pubkey.txt", keydir / "seckey.txt")
        (info,) = home._gnupg().list_keys()
        return info


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> Path:
    """Keys made once with fast curve types, shared by the password-mode tests."""
    directory = tmp_path_factory.mktemp("keygen") / "keys"
    make_keys(directory, "--name", "client.example")
    return directory


@pytest.fixture
def passfile(tmp_path) -> Path:
    path = tmp_path / "passfile"
    path.write_bytes(PASSPHRASE)
    return path


# --- command line --------------------------------------------------------------

SPEC_OPTIONS = [("--dir", "-d"), ("--type", "-t"), ("--length", "-l"), ("--subtype", "-s"),
                ("--sublength", "-L"), ("--name", "-n"), ("--email", "-e"),
                ("--comment", "-c"), ("--expire", "-x"), ("--tls-keytype", "-T"),
                ("--force", "-f"), ("--password", "-p"), ("--passfile", "-F"),
                ("--no-ssh", "-S"), ("--version", "-v"), ("--help", "-h")]
NEW_OPTIONS = ["--test", "--client", "--interface", "--timeout", "--show-password"]


def test_help_lists_every_option_with_its_short_form():
    result = run("--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for long, short in SPEC_OPTIONS:
        assert re.search(rf"^  {short}, {long}\b", text, re.MULTILINE), long
    for long in NEW_OPTIONS:
        assert long in text
    assert run("-h").stdout == result.stdout


def test_version_prints_name_and_version_and_exits_0():
    from mandos import __version__
    for option in ("--version", "-v"):
        result = run(option)
        assert result.returncode == 0
        assert result.stdout.decode().split()[0] == "mandos-keygen"
        assert __version__ in result.stdout.decode()


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized option '--bogus'"),
    (["-Q"], "invalid option -- 'Q'"),
    (["stray"], "unexpected argument: 'stray'"),
    (["--dir"], "requires an argument"),
    (["--pass"], "ambiguous"),
    (["--password", "--passfile", "x"], "cannot be used together"),
    (["--client", "x"], "need --test"),
    (["--show-password"], "need --test"),
    (["--test", "nocolon"], "ADDRESS:PORT"),
    (["--test", "[::1]:1", "--password"], "--passfile"),
    (["--test", "[::1]:1", "--timeout", "0"], "--timeout"),
    (["--test", "[::1]:1", "--timeout", "soon"], "--timeout"),
])
def test_bad_command_line_exits_1_with_a_message(tmp_path, args, message):
    result = run("--dir", str(tmp_path / "keys"), *args)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert "--help" in result.stderr.decode()
    assert result.stdout == b""
    assert not (tmp_path / "keys").exists()


def test_long_option_prefixes_and_attached_values_are_accepted(tmp_path):
    result = run(f"--di={tmp_path / 'k'}", "--ty", "ed25519", "-scv25519", "--nam=x.example")
    assert result.returncode == 0, result.stderr
    assert key_info(tmp_path / "k")["uids"] == ["x.example"]


def test_parse_defaults_are_the_originals():
    settings = keygen.parse([])
    assert (settings.key_type, settings.key_length) == ("RSA", "4096")
    assert (settings.subkey_type, settings.subkey_length) == ("RSA", "4096")
    assert (settings.email, settings.comment, settings.expire) == ("", "", "0")
    assert settings.tls_keytype == "ed25519"
    assert settings.ssh and not settings.force and not settings.password
    assert settings.timeout == 30


def test_default_directory_rule(monkeypatch):
    monkeypatch.setattr(os.path, "isdir", lambda p: p == "/etc/keys/mandos")
    assert keygen.default_key_dir() == "/etc/keys/mandos"
    monkeypatch.setattr(os.path, "isdir", lambda p: False)
    assert keygen.default_key_dir() == "/etc/mandos/keys"


def test_default_name_is_what_hostname_fqdn_prints():
    fqdn = subprocess.run(["hostname", "--fqdn"], capture_output=True, text=True)
    expected = fqdn.stdout.strip() if fqdn.returncode == 0 else socket.gethostname()
    assert keygen.default_name() == expected


# --- key generation ----------------------------------------------------------------

def test_key_files_have_the_originals_names_and_mode_0600(tmp_path):
    directory = tmp_path / "keys"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    make_keys(directory)
    assert sorted(p.name for p in directory.iterdir()) == sorted(KEY_FILES)
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # an existing one is left alone
    assert (directory / "pubkey.txt").read_bytes().startswith(
        b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n")
    assert (directory / "seckey.txt").read_bytes().startswith(
        b"-----BEGIN PGP PRIVATE KEY BLOCK-----\n")
    assert (directory / "tls-pubkey.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    assert (directory / "tls-privkey.pem").read_bytes().startswith(
        b"-----BEGIN PRIVATE KEY-----\n")


def test_missing_directory_is_created_mode_0700(tmp_path):
    directory = tmp_path / "new" / "keys"
    make_keys(directory)
    for path in (directory, directory.parent):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert sorted(p.name for p in directory.iterdir()) == sorted(KEY_FILES)


def test_directory_that_is_a_file_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    result = run("--dir", str(tmp_path / "file"), *FAST)
    assert result.returncode == 1
    assert "not a directory" in result.stderr.decode()


def test_tls_keys_load_with_mandos_keys_as_ed25519(keydir):
    pair = keys.load_tls_keypair(keydir / "tls-pubkey.pem", keydir / "tls-privkey.pem")
    assert pair.key_type == "Ed25519"
    assert re.fullmatch(r"[0-9A-F]{64}", pair.key_id)


@pytest.mark.parametrize("tls_type, loaded", [("ed448", "Ed448"), ("ecdsa", "ECDSA-secp384r1"),
                                              ("ECC", "ECDSA-secp384r1"),
                                              ("ED25519", "Ed25519")])
def test_tls_keytype_option(tmp_path, tls_type, loaded):
    make_keys(tmp_path / "k", "-T", tls_type)
    pair = keys.load_tls_keypair(tmp_path / "k/tls-pubkey.pem", tmp_path / "k/tls-privkey.pem")
    assert pair.key_type == loaded


def test_unknown_tls_keytype_is_an_error_and_writes_nothing(tmp_path):
    result = run("--dir", str(tmp_path / "k"), *FAST, "--tls-keytype", "dsa")
    assert result.returncode == 1
    assert "unsupported TLS key type 'dsa'" in result.stderr.decode()
    assert list((tmp_path / "k").iterdir()) == []


def test_openpgp_keys_import_decrypt_and_carry_name_email_comment(tmp_path):
    directory = tmp_path / "k"
    make_keys(directory, "-n", "host.example", "-e", "root@host.example", "-c", "boot key")
    info = key_info(directory)
    assert info["uids"] == ["host.example (boot key) <root@host.example>"]
    for name in ("pubkey.txt", "seckey.txt"):
        assert ("Comment: Mandos client key for host.example (boot key) "
                "<root@host.example>\n") in (directory / name).read_text()
    assert info["expires"] == ""
    with GnuPGHome() as home:
        home.import_keys(directory / "pubkey.txt", directory / "seckey.txt")
        (fingerprint,) = home.fingerprints(secret=True)
        assert home.decrypt(home.encrypt(PASSPHRASE, fingerprint)) == PASSPHRASE


def test_short_options_set_types_lengths_and_expiry(tmp_path):
    directory = tmp_path / "k"
    result = run("-d", str(directory), "-t", "RSA", "-l", "1024", "-s", "RSA", "-L", "1024",
                 "-x", "2y", "-n", "short.example")
    assert result.returncode == 0, result.stderr
    info = key_info(directory)
    assert (info["algo"], info["length"]) == ("1", "1024")  # 1 = RSA
    (subkey,) = info["subkey_info"].values()
    assert subkey["length"] == "1024" and subkey["cap"] == "e"
    primary_usage = {c for c in info["cap"] if c.islower()}
    assert {"s", "a"} <= primary_usage and "e" not in primary_usage
    years = (int(info["expires"]) - time.time()) / (365 * 86400)
    assert 1.9 < years < 2.1


def test_curve_names_choose_eddsa_and_ecdh(tmp_path):
    make_keys(tmp_path / "k")
    info = key_info(tmp_path / "k")
    assert info["algo"] == "22" and info["curve"] == "ed25519"  # 22 = EdDSA
    (subkey,) = info["subkey_info"].values()
    assert subkey["algo"] == "18" and subkey["curve"] == "cv25519"  # 18 = ECDH


@pytest.mark.slow
def test_default_keys_are_rsa_4096_with_rsa_4096_subkey_and_ed25519_tls(tmp_path):
    directory = tmp_path / "k"
    result = run("--dir", str(directory), "--name", "default.example")
    assert result.returncode == 0, result.stderr
    info = key_info(directory)
    assert (info["algo"], info["length"], info["expires"]) == ("1", "4096", "")
    (subkey,) = info["subkey_info"].values()
    assert (subkey["algo"], subkey["length"]) == ("1", "4096")
    pair = keys.load_tls_keypair(directory / "tls-pubkey.pem", directory / "tls-privkey.pem")
    assert pair.key_type == "Ed25519"


@pytest.mark.parametrize("args, message", [
    (["--length", "511"], "--length"),
    (["--length", "big"], "--length"),
    (["--sublength", "100"], "--sublength"),
    (["--name", ""], "name"),
    (["--type", ""], "type"),
    (["--subtype", ""], "type"),
    (["--expire", ""], "expiry"),
    (["--name", "a\nKey-Type: DSA"], "line breaks"),
])
def test_invalid_key_parameters_exit_1_and_write_nothing(tmp_path, args, message):
    result = run("--dir", str(tmp_path / "k"), "-l", "1024", "-L", "1024", *args)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert not (tmp_path / "k").exists() or not list((tmp_path / "k").iterdir())


def test_failed_openpgp_generation_writes_no_files(tmp_path):
    result = run("--dir", str(tmp_path / "k"), "--type", "EDDSA", "--subtype", "ECDH")
    assert result.returncode == 1
    assert "OpenPGP key generation failed" in result.stderr.decode()
    assert list((tmp_path / "k").iterdir()) == []


def test_existing_keys_are_not_replaced_without_force(tmp_path):
    directory = tmp_path / "k"
    make_keys(directory)
    before = file_bytes(directory)
    result = run("--dir", str(directory), *FAST)
    assert result.returncode == 1
    assert "use --force" in result.stderr.decode()
    assert file_bytes(directory) == before


def test_one_existing_key_file_is_enough_to_refuse(tmp_path):
    directory = tmp_path / "k"
    directory.mkdir()
    (directory / "seckey.txt").write_text("old")
    result = run("--dir", str(directory), *FAST)
    assert result.returncode == 1
    assert "seckey.txt" in result.stderr.decode()
    assert file_bytes(directory) == {"seckey.txt": b"old"}


def test_force_replaces_keys_and_keeps_numbered_backups(tmp_path):
    directory = tmp_path / "k"
    make_keys(directory)
    first = file_bytes(directory)
    make_keys(directory, "--force")
    second = {name: data for name, data in file_bytes(directory).items() if "~" not in name}
    make_keys(directory, "-f")
    files = file_bytes(directory)
    for name in KEY_FILES:
        assert files[f"{name}.~1~"] == first[name]
        assert files[f"{name}.~2~"] == second[name]
        assert files[name] not in (first[name], second[name])
    assert len(files) == 12
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_backup_numbers_continue_after_the_highest(tmp_path):
    path = tmp_path / "seckey.txt"
    path.write_text("current")
    (tmp_path / "seckey.txt.~7~").write_text("old")
    assert keygen.backup_name(str(path)) == f"{path}.~8~"
    assert (tmp_path / "seckey.txt.~8~").read_text() == "current"


def test_generation_note_on_a_terminal(tmp_path):
    child = pexpect.spawn(str(KEYGEN), ["--dir", str(tmp_path / "k"), *FAST], timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"Started:" in child.before and b"Finished:" in child.before


# --- password mode: the clients.conf section ------------------------------------------

def test_passfile_section_parses_and_decrypts_byte_exact(keydir, passfile, tmp_path):
    result = run("--dir", str(keydir), "--passfile", str(passfile), "--name", "client1",
                 env=no_ssh_env(tmp_path))
    assert result.returncode == 0, result.stderr
    name, section = section_of(result.stdout)
    assert name == "client1"
    assert section["host"] == "client1"
    pair = keys.load_tls_keypair(keydir / "tls-pubkey.pem", keydir / "tls-privkey.pem")
    assert section["key_id"] == pair.key_id.lower()
    assert section["fingerprint"] == key_info(keydir)["fingerprint"]
    assert decrypt_secret(keydir, section["secret"]) == PASSPHRASE
    assert "checker" not in section


def test_section_layout_is_the_originals(keydir, passfile):
    result = run("--dir", str(keydir), "-F", str(passfile), "-n", "client1", "-S")
    lines = result.stdout.decode("ascii").split("\n")
    assert lines[-1] == ""  # ends with a newline
    lines = lines[:-1]
    assert lines[:2] == ["[client1]", "host = client1"]
    assert re.fullmatch(r"key_id = [0-9a-f]{64}", lines[2])
    assert re.fullmatch(r"fingerprint = [0-9A-F]{40}", lines[3])
    assert lines[4] == "secret ="
    body = lines[5:]
    assert body and all(re.fullmatch(r"    [A-Za-z0-9+/=]+", line) for line in body)
    assert all(len(line) == 4 + 64 for line in body[:-1])
    assert 4 < len(body[-1]) <= 4 + 64
    message = base64.b64decode("".join(line.strip() for line in body))
    assert message[0] & 0x80  # an OpenPGP packet, binary, not armoured


def test_secret_is_signed_by_the_client_key(keydir, passfile, tmp_path):
    result = run("--dir", str(keydir), "--passfile", str(passfile), "--no-ssh")
    _, section = section_of(result.stdout)
    home = tmp_path / "gpg"
    home.mkdir(mode=0o700)
    for name in ("pubkey.txt", "seckey.txt"):
        subprocess.run(["gpg", "--batch", "--homedir", str(home), "--import", str(keydir / name)],
                       capture_output=True, check=True)
    decrypted = subprocess.run(["gpg", "--batch", "--homedir", str(home), "--status-fd", "2",
                                "--decrypt"], input=base64.b64decode(section["secret"]),
                               capture_output=True)
    assert decrypted.stdout == PASSPHRASE
    assert f"VALIDSIG {section['fingerprint']}".encode() in decrypted.stderr \
        or re.search(rb"VALIDSIG [0-9A-F]+ .* " + section["fingerprint"].encode(),
                     decrypted.stderr)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                   capture_output=True)


def test_section_without_tls_public_key_has_no_key_id(keydir, passfile, tmp_path):
    directory = tmp_path / "openpgp-only"
    directory.mkdir()
    for name in ("pubkey.txt", "seckey.txt"):
        (directory / name).write_bytes((keydir / name).read_bytes())
    result = run("--dir", str(directory), "--passfile", str(passfile), "--no-ssh")
    assert result.returncode == 0, result.stderr
    _, section = section_of(result.stdout)
    assert "key_id" not in section
    assert decrypt_secret(keydir, section["secret"]) == PASSPHRASE


def test_stale_tls_public_key_is_refused(keydir, passfile, tmp_path):
    directory = tmp_path / "stale"
    make_keys(directory)
    (directory / "tls-pubkey.pem").write_bytes((keydir / "tls-pubkey.pem").read_bytes())
    result = run("--dir", str(directory), "--passfile", str(passfile), "--no-ssh")
    assert result.returncode == 1
    assert "does not match" in result.stderr.decode()
    assert result.stdout == b""


def test_mismatched_pubkey_and_seckey_is_refused(keydir, passfile, tmp_path):
    directory = tmp_path / "mixed"
    make_keys(directory)
    (directory / "pubkey.txt").write_bytes((keydir / "pubkey.txt").read_bytes())
    result = run("--dir", str(directory), "--passfile", str(passfile), "--no-ssh")
    assert result.returncode == 1
    assert "does not hold the secret key" in result.stderr.decode()
    assert result.stdout == b""


def test_missing_key_files_in_password_mode(tmp_path, passfile):
    (tmp_path / "empty").mkdir()
    result = run("--dir", str(tmp_path / "empty"), "--passfile", str(passfile), "--no-ssh")
    assert result.returncode == 1
    assert "pubkey.txt" in result.stderr.decode()
    result = run("--dir", str(tmp_path / "absent"), "--passfile", str(passfile), "--no-ssh")
    assert result.returncode == 1
    assert "does not exist" in result.stderr.decode()
    assert not (tmp_path / "absent").exists()  # password mode creates nothing


def test_missing_passfile_is_an_error(keydir, tmp_path):
    result = run("--dir", str(keydir), "--passfile", str(tmp_path / "nope"), "--no-ssh")
    assert result.returncode == 1
    assert "cannot open passphrase file" in result.stderr.decode()
    assert result.stdout == b""


def test_empty_passfile_is_an_error(keydir, tmp_path):
    (tmp_path / "empty").write_bytes(b"")
    result = run("--dir", str(keydir), "--passfile", str(tmp_path / "empty"), "--no-ssh")
    assert result.returncode == 1
    assert "is empty" in result.stderr.decode()
    assert result.stdout == b""


def test_name_with_percent_is_escaped_for_clients_conf(keydir, passfile):
    result = run("--dir", str(keydir), "--passfile", str(passfile), "-S", "-n", "odd%name")
    assert result.returncode == 0, result.stderr
    name, section = section_of(result.stdout)
    assert (name, section["host"]) == ("odd%name", "odd%name")


@pytest.mark.parametrize("name", ["DEFAULT", " padded", "two\nlines", ""])
def test_unusable_section_names_are_refused(keydir, passfile, name):
    result = run("--dir", str(keydir), "--passfile", str(passfile), "-S", "-n", name)
    assert result.returncode == 1
    assert result.stdout == b""


def test_default_section_name_is_the_fqdn(keydir, passfile):
    result = run("--dir", str(keydir), "--passfile", str(passfile), "--no-ssh")
    name, section = section_of(result.stdout)
    assert name == section["host"] == keygen.default_name()


# --- the ssh-keyscan checker ------------------------------------------------------

CHECKER = ('ssh-keyscan {q}-t ed25519 %%(host)s 2>/dev/null | grep --fixed-strings '
           '--line-regexp --quiet --regexp=%%(host)s" %(ssh_fingerprint)s"')
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uga2V5IGZvciB0ZXN0cw=="


def test_ssh_checker_without_q_for_older_openssh(keydir, passfile, tmp_path):
    log = tmp_path / "args"
    result = run("--dir", str(keydir), "--passfile", str(passfile), "-n", "c1",
                 env=fake_keyscan_env(tmp_path, accepts_q=False, log=log))
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert text.endswith(f"checker = {CHECKER.format(q='')}\nssh_fingerprint = {SSH_KEY}\n")
    assert "#" not in text
    _, section = section_of(result.stdout)
    # Load-time expansion as on the server; %(host)s is left for run time.
    assert section["checker"] == ('ssh-keyscan -t ed25519 %(host)s 2>/dev/null | grep '
                                  '--fixed-strings --line-regexp --quiet '
                                  f'--regexp=%(host)s" {SSH_KEY}"')
    assert decrypt_secret(keydir, section["secret"]) == PASSPHRASE


def test_ssh_keyscan_tries_q_first_then_each_type_in_order(keydir, passfile, tmp_path):
    log = tmp_path / "args"
    run("--dir", str(keydir), "--passfile", str(passfile),
        env=fake_keyscan_env(tmp_path, accepts_q=False, log=log))
    assert log.read_text().splitlines() == [
        "-q -t ecdsa-sha2-nistp256 localhost", "-q -t ed25519 localhost", "-q -t rsa localhost",
        "-t ecdsa-sha2-nistp256 localhost", "-t ed25519 localhost"]


def test_ssh_checker_with_q_has_a_warning_comment(keydir, passfile, tmp_path):
    log = tmp_path / "args"
    result = run("--dir", str(keydir), "--passfile", str(passfile), "-n", "c1",
                 env=fake_keyscan_env(tmp_path, accepts_q=True, log=log))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[-2:] == [f"checker = {CHECKER.format(q='-q ')}", f"ssh_fingerprint = {SSH_KEY}"]
    assert lines[-4].startswith("# ") and lines[-3].startswith("# ")
    assert "9.8" in lines[-4] + lines[-3]
    _, section = section_of(result.stdout)
    assert section["checker"].startswith("ssh-keyscan -q -t ed25519 %(host)s")
    assert decrypt_secret(keydir, section["secret"]) == PASSPHRASE


def test_no_ssh_does_not_run_ssh_keyscan(keydir, passfile, tmp_path):
    log = tmp_path / "args"
    for option in ("--no-ssh", "-S"):
        result = run("--dir", str(keydir), "--passfile", str(passfile), option,
                     env=fake_keyscan_env(tmp_path, accepts_q=True, log=log))
        assert result.returncode == 0
        assert b"checker" not in result.stdout
    assert not log.exists()


def test_malformed_ssh_keyscan_answer_is_ignored(keydir, passfile, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh-keyscan").write_text("#!/bin/sh\necho 'localhost ssh-ed25519 AAAA%(x)s'\n")
    (fake / "ssh-keyscan").chmod(0o755)
    result = run("--dir", str(keydir), "--passfile", str(passfile),
                 env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert result.returncode == 0
    assert b"checker" not in result.stdout


# --- password mode: where the passphrase comes from ---------------------------------

def test_password_from_stdin_without_a_terminal(keydir):
    for given in (b"typed words\n", b"typed words", b"typed words\ntyped words\n"):
        result = run("--dir", str(keydir), "--password", "--no-ssh", input=given)
        assert result.returncode == 0, result.stderr
        _, section = section_of(result.stdout)
        assert decrypt_secret(keydir, section["secret"]) == b"typed words"
        assert b"typed" not in result.stderr


@pytest.mark.parametrize("given, message", [
    (b"", "empty"), (b"\n", "empty"), (b"one\ntwo\n", "differ"), (b"a\na\na\n", "two lines")])
def test_password_from_bad_stdin_fails(keydir, given, message):
    result = run("--dir", str(keydir), "-p", "-S", input=given)
    assert result.returncode == 1
    assert message in result.stderr.decode()
    assert result.stdout == b""


def test_password_with_stdin_at_dev_null_fails(keydir):
    result = run("--dir", str(keydir), "--password", "--no-ssh")  # stdin is /dev/null
    assert result.returncode == 1
    assert "no passphrase" in result.stderr.decode()
    assert result.stdout == b""


def test_password_with_closed_stdin_fails(keydir):
    result = run("--dir", str(keydir), "--password", "--no-ssh", stdin=None,
                 preexec_fn=lambda: os.close(0))
    assert result.returncode == 1
    assert "cannot be read" in result.stderr.decode()
    assert result.stdout == b""


def _spawn_password(keydir: Path) -> pexpect.spawn:
    return pexpect.spawn(str(KEYGEN), ["--dir", str(keydir), "--password", "--no-ssh",
                                       "--name", "tty"], timeout=30)


def _section_from_terminal(child: pexpect.spawn) -> bytes:
    child.expect(rb"\[tty\]")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return b"[tty]" + child.before.replace(b"\r\n", b"\n")


def test_password_on_a_terminal_is_asked_twice_without_echo(keydir):
    typed = "  spaced out \\ pass  "  # kept as typed: white space and backslash
    child = _spawn_password(keydir)
    child.expect("Enter passphrase: ")
    child.sendline(typed)
    child.expect("Repeat passphrase: ")
    assert typed.encode() not in child.before
    child.sendline(typed)
    text = _section_from_terminal(child)
    assert typed.encode() not in text
    _, section = section_of(text)
    assert decrypt_secret(keydir, section["secret"]) == typed.encode()


def test_password_mismatch_on_a_terminal_asks_again(keydir):
    child = _spawn_password(keydir)
    child.expect("Enter passphrase: ")
    child.sendline("first try")
    child.expect("Repeat passphrase: ")
    child.sendline("first trY")
    child.expect("do not match")
    child.expect("Enter passphrase: ")
    child.sendline("")  # empty: asked again too
    child.expect("Empty passphrase")
    child.expect("Enter passphrase: ")
    child.sendline("second try")
    child.expect("Repeat passphrase: ")
    child.sendline("second try")
    _, section = section_of(_section_from_terminal(child))
    assert decrypt_secret(keydir, section["secret"]) == b"second try"


def test_end_of_file_at_the_terminal_prompt_fails(keydir):
    child = _spawn_password(keydir)
    child.expect("Enter passphrase: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1
    assert b"no passphrase" in child.before


def test_echo_is_off_at_the_prompt_and_back_on_after_ctrl_c(keydir):
    child = _spawn_password(keydir)
    child.expect("Enter passphrase: ")
    assert child.getecho() is False
    child.sendintr()
    child.expect(pexpect.EOF)
    assert b"interrupted" in child.before
    assert child.getecho() is True  # the terminal outlives the program
    child.close()
    assert child.exitstatus == 128 + signal.SIGINT


def test_passphrase_is_never_written_to_stderr_or_files(keydir, tmp_path):
    secret = b"Very-Distinctive-Passphrase-4711"
    (tmp_path / "pf").write_bytes(secret)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(mode=0o700)
    env = {**no_ssh_env(tmp_path), "TMPDIR": str(tmpdir)}
    before = file_bytes(keydir)
    results = [run("--dir", str(keydir), "--passfile", str(tmp_path / "pf"), env=env),
               run("--dir", str(keydir), "--password", input=secret + b"\n", env=env)]
    for result in results:
        assert result.returncode == 0
        assert secret not in result.stderr and secret not in result.stdout
        assert secret.hex().encode() not in result.stderr.lower()
    assert file_bytes(keydir) == before
    assert list(tmpdir.iterdir()) == []  # the GnuPG home is gone


# --- pure functions ----------------------------------------------------------------

def test_wrap_secret_is_base64_in_64_character_lines():
    message = bytes(range(256)) * 3
    lines = keygen.wrap_secret(message)
    assert all(len(line) == 64 for line in lines[:-1])
    assert base64.b64decode("".join(lines)) == message


def test_openpgp_algorithm_from_curve_or_name():
    assert keygen.openpgp_algorithm("ed25519", keygen.SIGNING_CURVES) == ("EDDSA", "ed25519")
    assert keygen.openpgp_algorithm("cv25519", keygen.ENCRYPTION_CURVES) == ("ECDH", "cv25519")
    assert keygen.openpgp_algorithm("NISTP256", keygen.SIGNING_CURVES) == ("ECDSA", "nistp256")
    assert keygen.openpgp_algorithm("DSA", keygen.SIGNING_CURVES) == ("DSA", "")


def test_format_section_without_optional_lines():
    text = keygen.format_section("c", "ab" * 20, b"\x85\x01")
    assert text == f"[c]\nhost = c\nfingerprint = {'AB' * 20}\nsecret =\n    hQE=\n"


def test_passphrase_input_over_the_limit_is_refused():
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 10000)
    os.close(write_end)
    try:
        with pytest.raises(keygen.KeygenError, match="larger than 5000 bytes"):
            keygen.read_fd_secret(read_end, limit=5000)
    finally:
        os.close(read_end)


# --- test mode, with a stand-in client ---------------------------------------------

def fake_client(tmp_path: Path, body: str) -> Path:
    """A client that records its arguments and PID, then runs ``body`` (shell)."""
    script = tmp_path / "fake-client"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path}/client-args\n"
                      f"echo $$ > {tmp_path}/client-pid\n{body}\n")
    script.chmod(0o755)
    return script


def test_test_mode_runs_the_client_as_at_boot(keydir, tmp_path):
    client = fake_client(tmp_path, "printf 'Secret-4711!'")
    result = run("--dir", str(keydir), "--test", "192.0.2.1:4711", "--client", str(client))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""  # no password without --show-password
    assert b"Secret-4711" not in result.stderr
    assert re.search(rb"Password received in \d+\.\d\d s \(12 bytes\)", result.stderr)
    assert (tmp_path / "client-args").read_text().splitlines() == [
        "--connect", "192.0.2.1:4711", "--interface", "none",
        "--pubkey", f"{keydir}/pubkey.txt", "--seckey", f"{keydir}/seckey.txt",
        "--tls-pubkey", f"{keydir}/tls-pubkey.pem", "--tls-privkey", f"{keydir}/tls-privkey.pem"]
    pair = keys.load_tls_keypair(keydir / "tls-pubkey.pem", keydir / "tls-privkey.pem")
    assert pair.key_id.encode() in result.stderr


def test_test_mode_interface_and_show_password(keydir, tmp_path):
    client = fake_client(tmp_path, "printf 'pw\\000\\n'")
    result = run("--dir", str(keydir), "--test", "[fe80::1]:4711", "--interface", "eth7",
                 "--show-password", "--client", str(client))
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"pw\x00\n"
    args = (tmp_path / "client-args").read_text().splitlines()
    assert args[:4] == ["--connect", "[fe80::1]:4711", "--interface", "eth7"]


def test_test_mode_compares_with_passfile(keydir, tmp_path, passfile):
    client = fake_client(tmp_path, f"cat {passfile}")
    result = run("--dir", str(keydir), "--test", "127.0.0.1:1", "--passfile", str(passfile),
                 "--client", str(client))
    assert result.returncode == 0
    assert b"matches" in result.stderr
    client = fake_client(tmp_path, "printf 'something else'")
    result = run("--dir", str(keydir), "--test", "127.0.0.1:1", "--passfile", str(passfile),
                 "--client", str(client))
    assert result.returncode == 65
    assert b"differs" in result.stderr
    assert PASSPHRASE not in result.stderr and b"something else" not in result.stderr


def test_test_mode_client_failure_is_reported(keydir, tmp_path):
    client = fake_client(tmp_path, "echo 'cannot load TLS key' >&2; exit 69")
    result = run("--dir", str(keydir), "--test", "127.0.0.1:1", "--client", str(client))
    assert result.returncode == 69
    text = result.stderr.decode()
    assert "ended with status 69" in text and "client: cannot load TLS key" in text


def test_test_mode_timeout_stops_the_client(keydir, tmp_path):
    client = fake_client(tmp_path, "exec sleep 600")
    start = time.monotonic()
    result = run("--dir", str(keydir), "--test", "127.0.0.1:1", "--timeout", "1",
                 "--client", str(client))
    assert time.monotonic() - start < 10
    assert result.returncode == 69
    assert "no password within 1 s" in result.stderr.decode()
    pid = int((tmp_path / "client-pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_sigterm_in_test_mode_stops_the_client(keydir, tmp_path):
    client = fake_client(tmp_path, "exec sleep 600")
    process = subprocess.Popen([str(KEYGEN), "--dir", str(keydir), "--test", "127.0.0.1:1",
                                "--client", str(client)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "client-pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM
    assert b"terminated" in stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "client-pid").read_text()), 0)


@pytest.mark.parametrize("address, message", [
    ("server.example:4711", "numeric"), ("127.0.0.1:99999", "port"),
    ("127.0.0.1:http", "port")])
def test_test_mode_refuses_addresses_the_client_would_retry_forever(keydir, tmp_path,
                                                                    address, message):
    client = fake_client(tmp_path, "exit 0")
    result = run("--dir", str(keydir), "--test", address, "--client", str(client))
    assert result.returncode == 1
    assert message in result.stderr.decode().lower()
    assert not (tmp_path / "client-args").exists()


def test_test_mode_needs_all_key_files_and_a_client(keydir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "pubkey.txt").write_bytes((keydir / "pubkey.txt").read_bytes())
    result = run("--dir", str(partial), "--test", "127.0.0.1:1")
    assert result.returncode == 1
    assert "seckey.txt" in result.stderr.decode() or "tls-" in result.stderr.decode()
    result = run("--dir", str(keydir), "--test", "127.0.0.1:1", "--client",
                 str(tmp_path / "no-client"))
    assert result.returncode == 1
    assert "not an executable file" in result.stderr.decode()


def test_default_client_is_plugins_d_mandos_client_of_this_tree():
    assert keygen.default_client() == str(REPO / "plugins.d" / "mandos-client")
    settings = keygen.parse(["--test", "[::1]:1"])
    assert keygen.client_command(settings, "/k")[0] == str(REPO / "plugins.d/mandos-client")


def test_test_mode_with_our_client_and_no_server_times_out(keydir, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: connections are refused
    result = run("--dir", str(keydir), "--test", f"127.0.0.1:{port}", "--timeout", "2")
    assert result.returncode == 69
    assert "no password within 2 s" in result.stderr.decode()


# --- documentation --------------------------------------------------------------------

def test_man_page_documents_every_option_and_deviation():
    text = MAN_PAGE.read_text()
    for long, short in SPEC_OPTIONS:
        assert long.replace("-", r"\-") in text, long
        assert short.replace("-", r"\-") in text, short
    for long in NEW_OPTIONS:
        assert long.replace("-", r"\-") in text, long
    assert "DIFFERENCES FROM THE ORIGINAL" in text
