"""Our mandos-client against the original Debian mandos server (1.8.16).

The server runs unpacked, in the foreground on loopback, without D-Bus
service or Zeroconf (see original_server.py).  Keys come from the original
mandos-keygen here; keys made by our keygen are tested in test_keygen_interop.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from original_server import (OriginalServer, clients_conf_section, make_world_temp,
                             original_keygen, remove)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "plugins.d" / "mandos-client"
PASSWORD = b"interop passphrase \x01\xff"


def client_args(keys: Path, address: str, *extra: str) -> list[str]:
    return [str(CLIENT), "--connect", address, "--interface", "none",
            "--pubkey", str(keys / "pubkey.txt"), "--seckey", str(keys / "seckey.txt"),
            "--tls-pubkey", str(keys / "tls-pubkey.pem"),
            "--tls-privkey", str(keys / "tls-privkey.pem"), *extra]


@pytest.fixture(scope="module")
def workdir():
    path = make_world_temp()
    yield path
    remove(path)


@pytest.fixture(scope="module")
def original_keys(workdir):
    """Key files and clients.conf section from the original mandos-keygen."""
    keys = workdir / "keys"
    keys.mkdir()
    original_keygen(keys, "--force")
    passfile = workdir / "passfile"
    passfile.write_bytes(PASSWORD)
    section = original_keygen(keys, "--passfile", str(passfile), "--no-ssh").stdout
    return keys, section


@pytest.fixture(scope="module")
def other_keys(workdir):
    """A second, unrelated client's keys."""
    keys = workdir / "other"
    keys.mkdir()
    original_keygen(keys, "--force")
    passfile = workdir / "otherpass"
    passfile.write_bytes(b"other")
    return keys, original_keygen(keys, "--passfile", str(passfile), "--no-ssh").stdout


def gnupg_homes_named_in(debug_output: bytes) -> list[str]:
    """The GnuPG homes a client run reported creating (it says so in --debug mode)."""
    return re.findall(r"created GnuPG home (\S+)", debug_output.decode(errors="replace"))


@pytest.mark.parametrize("ipv6", [True, False], ids=["ipv6", "ipv4"])
def test_client_unlocks_from_original_server(workdir, original_keys, ipv6, tmp_path):
    keys, section = original_keys
    folder = make_world_temp()
    try:
        with OriginalServer(folder, clients_conf_section("host1", section), ipv6=ipv6) as server:
            result = subprocess.run(client_args(keys, server.address), capture_output=True,
                                    timeout=30)
            assert result.returncode == 0, result.stderr.decode(errors="replace")
            assert result.stdout == PASSWORD
            assert PASSWORD not in result.stderr
            assert "Sending secret to host1" in server.output()
    finally:
        remove(folder)


def test_client_in_debug_mode_never_prints_the_password(original_keys):
    keys, section = original_keys
    folder = make_world_temp()
    try:
        with OriginalServer(folder, clients_conf_section("host1", section)) as server:
            result = subprocess.run(client_args(keys, server.address, "--debug"),
                                    capture_output=True, timeout=30)
            assert result.stdout == PASSWORD
            assert b"DEBUG" not in result.stdout
            assert PASSWORD not in result.stderr
            assert PASSWORD.hex().encode() not in result.stderr.lower()
            assert result.stderr  # debug mode says something
    finally:
        remove(folder)


def _expect_retrying_then_sigterm(args: list[str], seconds: float = 3.0) -> bytes:
    """Run the client; it must still be retrying after ``seconds``; SIGTERM it."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(seconds)
        assert process.poll() is None, "the client gave up instead of retrying"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGTERM
    assert stdout == b""
    homes = gnupg_homes_named_in(stderr)
    assert homes, "the client did not report its GnuPG home"
    for home in homes:
        assert not os.path.exists(home), f"temporary GnuPG home {home} left behind"
    return stderr


def test_unknown_client_gets_nothing_and_keeps_retrying(original_keys, other_keys):
    keys, _ = original_keys
    _, other_section = other_keys
    folder = make_world_temp()
    try:
        with OriginalServer(folder, clients_conf_section("other", other_section)) as server:
            _expect_retrying_then_sigterm(client_args(keys, server.address, "--retry", "0.5",
                                                       "--debug"))
            assert "not found" in server.output().lower()
    finally:
        remove(folder)


def test_disabled_client_gets_nothing_and_keeps_retrying(original_keys):
    """A client whose checker fails is disabled once its expiry passes.

    With interval 1 s the first expiry is at most 2 s after the server
    starts (SERVER.md §8.3); disabling is silent, so we wait 3 s.
    """
    keys, section = original_keys
    folder = make_world_temp()
    conf = clients_conf_section("host1", section, checker="false", timeout="1s",
                                interval="1s")
    try:
        with OriginalServer(folder, conf) as server:
            time.sleep(3)
            _expect_retrying_then_sigterm(client_args(keys, server.address, "--retry", "0.5",
                                                      "--debug"))
            assert "is disabled" in server.output()
    finally:
        remove(folder)
