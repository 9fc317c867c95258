"""Our mandos-keygen with the original Debian mandos server, client and keygen (1.8.16).

(a) our keys and section -> original server -> original client;
(b) our keys and section -> original server -> our client;
(c) original keys + our section -> original server -> our client, with the
    key ID and fingerprint we print equal to the original's;
(d) ``mandos-keygen --test`` against the original server, with our client
    and with the original one, for a known and an unknown key.
"""

from __future__ import annotations

import configparser
import re
import subprocess
import time
from pathlib import Path

import pytest

import peers
from original_server import (OriginalServer, clients_conf_section, make_world_temp,
                             original_keygen, remove)
from test_server_e2e import folder_and_passfile

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KEYGEN = REPO / "bin" / "mandos-keygen"
OUR_CLIENT = REPO / "plugins.d" / "mandos-client"
# A final newline and bytes that are not text: all must arrive as they are.
PASSPHRASE = b"interop \x00\xff passphrase\n"
FAKE_SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRoaXMgaXMgYSB0ZXN0IGtleQ=="


def keygen(*args: str, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(KEYGEN), *args], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=120, **kwargs)
    return result


def original_client() -> Path:
    return peers.client_libdir() / "plugins.d" / "mandos-client"


def client_args(client: Path, keys: Path, address: str) -> list[str]:
    return [str(client), "--connect", address, "--interface", "none",
            "--pubkey", str(keys / "pubkey.txt"), "--seckey", str(keys / "seckey.txt"),
            "--tls-pubkey", str(keys / "tls-pubkey.pem"),
            "--tls-privkey", str(keys / "tls-privkey.pem")]


def unlock(client: Path, keys: Path, address: str) -> subprocess.CompletedProcess:
    """Run a client; both retry forever, hence the time-out."""
    return subprocess.run(client_args(client, keys, address), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30)


def parse_section(text: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read_string(text)
    (name,) = parser.sections()
    return parser[name]


workdir, passfile = folder_and_passfile("workdir", "mandos-keygen-interop-", PASSPHRASE)


@pytest.fixture(scope="module")
def our_keys(workdir, passfile):
    """RSA keys (smaller than the default, same kind) and a section, all from our keygen."""
    keys = workdir / "our-keys"
    made = keygen("--dir", str(keys), "--length", "2048", "--sublength", "2048",
                  "--name", "ours.example")
    assert made.returncode == 0, made.stderr.decode()
    section = keygen("--dir", str(keys), "--passfile", str(passfile), "--no-ssh",
                     "--name", "ours")
    assert section.returncode == 0, section.stderr.decode()
    return keys, section.stdout.decode()


@pytest.fixture(scope="module")
def original_keys(workdir, passfile):
    """Keys from the original keygen, its own section, and our section for them."""
    keys = workdir / "original-keys"
    keys.mkdir()
    original_keygen(keys, "--length", "2048", "--sublength", "2048")
    theirs = original_keygen(keys, "--passfile", str(passfile), "--no-ssh",
                             "--name", "orig").stdout
    ours = keygen("--dir", str(keys), "--passfile", str(passfile), "--no-ssh",
                  "--name", "orig")
    assert ours.returncode == 0, ours.stderr.decode()
    return keys, theirs, ours.stdout.decode()


@pytest.fixture(scope="module")
def server(workdir, our_keys, original_keys):
    """One original server that knows both clients."""
    folder = make_world_temp("mandos-keygen-server-")
    conf = (clients_conf_section("ours", our_keys[1])
            + clients_conf_section("orig", original_keys[2]))
    try:
        with OriginalServer(folder, conf) as running:
            yield running
    finally:
        remove(folder)


def test_a_our_keys_and_section_unlock_the_original_client(server, our_keys):
    keys, _ = our_keys
    result = unlock(original_client(), keys, server.address)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == PASSPHRASE
    assert "Sending secret to ours" in server.output()


def test_b_our_keys_and_section_unlock_our_client(server, our_keys):
    keys, _ = our_keys
    result = unlock(OUR_CLIENT, keys, server.address)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == PASSPHRASE


def test_c_our_section_for_original_keys_unlocks_our_client(server, original_keys):
    keys, _, _ = original_keys
    result = unlock(OUR_CLIENT, keys, server.address)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == PASSPHRASE
    assert "Sending secret to orig" in server.output()


def test_c_key_id_and_fingerprint_equal_the_originals(original_keys):
    _, theirs, ours = original_keys
    theirs, ours = parse_section(theirs), parse_section(ours)
    assert re.fullmatch(r"[0-9a-f]{64}", theirs["key_id"])
    assert ours["key_id"] == theirs["key_id"]
    assert ours["fingerprint"] == theirs["fingerprint"]
    assert ours["host"] == theirs["host"] == "orig"


def test_section_lines_are_the_originals_apart_from_the_ciphertext(original_keys, tmp_path):
    """Same keys, same passphrase, same fake ssh-keyscan: only the secret's base64 differs."""
    keys, _, _ = original_keys
    fake = tmp_path / "bin"
    fake.mkdir()
    # OpenSSH before 9.8 (like the original's Debian 12) knows no -q.
    (fake / "ssh-keyscan").write_text(
        "#!/bin/sh\ncase \" $* \" in *\" -q \"*) exit 1;; *\" ed25519 \"*)\n"
        f"echo 'localhost {FAKE_SSH_KEY}';;"
        "\nesac\n")
    (fake / "ssh-keyscan").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/sbin:/usr/bin:/sbin:/bin"}
    (tmp_path / "pf").write_bytes(PASSPHRASE)
    theirs = subprocess.run(
        [str(peers.unpacked_root() / "usr/sbin/mandos-keygen"), "--dir", str(keys),
         "--passfile", str(tmp_path / "pf"), "--name", "same"],
        capture_output=True, text=True, env=env, check=True).stdout
    ours = keygen("--dir", str(keys), "--passfile", str(tmp_path / "pf"), "--name", "same",
                  env=env).stdout.decode()

    def shape(text: str) -> list[str]:
        return ["    <base64>" if line.startswith("    ") else line
                for line in text.splitlines()]

    def collapse(lines: list[str]) -> list[str]:
        return [line for i, line in enumerate(lines)
                if not (line == "    <base64>" and i and lines[i - 1] == line)]

    assert "checker = ssh-keyscan -t ed25519" in theirs
    assert collapse(shape(ours)) == collapse(shape(theirs))
    assert ours.endswith("\n") and not ours.endswith("\n\n")
    for text in (ours, theirs):
        body = [line for line in text.splitlines() if line.startswith("    ")]
        assert all(len(line) == 68 for line in body[:-1])


def test_original_server_accepts_our_section_with_ssh_checker(our_keys, passfile, tmp_path):
    """The checker line, with its %% and %(ssh_fingerprint)s, loads in the original server."""
    keys, _ = our_keys
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ssh-keyscan").write_text(
        f"#!/bin/sh\necho 'localhost {FAKE_SSH_KEY}'\n")
    (fake / "ssh-keyscan").chmod(0o755)
    section = keygen("--dir", str(keys), "--passfile", str(passfile), "--name", "sshchk",
                     env={"PATH": f"{fake}:/usr/bin:/bin"}).stdout.decode()
    assert "checker = ssh-keyscan -q -t ecdsa-sha2-nistp256" in section
    folder = make_world_temp("mandos-keygen-server-")
    try:
        # The server's [DEFAULT] checker is "true"; this section overrides it.
        with OriginalServer(folder, section) as running:
            result = unlock(OUR_CLIENT, keys, running.address)
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            assert result.stdout == PASSPHRASE
            output = running.output()
            assert "Sending secret to sshchk" in output
            assert "Traceback" not in output
    finally:
        remove(folder)


@pytest.mark.parametrize("which", ["our client", "original client"])
def test_d_keygen_test_succeeds_against_the_original_server(server, our_keys, passfile, which):
    keys, _ = our_keys
    client = OUR_CLIENT if which == "our client" else original_client()
    result = keygen("--dir", str(keys), "--test", server.address, "--passfile", str(passfile),
                    "--client", str(client), "--timeout", "20")
    text = result.stderr.decode()
    assert result.returncode == 0, text
    assert re.search(r"Password received in \d+\.\d\d s", text)
    assert "matches" in text
    assert result.stdout == b""
    assert PASSPHRASE.strip() not in result.stderr


def test_d_keygen_test_show_password(server, original_keys):
    keys, _, _ = original_keys
    result = keygen("--dir", str(keys), "--test", server.address, "--show-password")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == PASSPHRASE


def test_d_keygen_test_fails_quickly_for_an_unknown_key(server, workdir):
    keys = workdir / "unknown-keys"
    made = keygen("--dir", str(keys), "--type", "ed25519", "--subtype", "cv25519")
    assert made.returncode == 0, made.stderr.decode()
    start = time.monotonic()
    result = keygen("--dir", str(keys), "--test", server.address, "--timeout", "3")
    elapsed = time.monotonic() - start
    text = result.stderr.decode()
    assert result.returncode == 69, text
    assert elapsed < 15
    key_id = re.search(r"key ID ([0-9A-F]{64})", text).group(1)
    assert f"does not know key ID {key_id}" in text
    assert "not found" in server.output().lower()
