"""Tests for mandos.keys: TLS key files and the key ID (PROTOCOL.md §3.4, §4.1–§4.3)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519

from mandos import keys

# PROTOCOL.md §4.3 worked example.
SPEC_PUBKEY_PEM = (b"-----BEGIN PUBLIC KEY-----\n"
                   b"MCowBQYDK2VwAyEAzONgZlfR1dPfUzKIe2y7vcamNc6Kgh1/lSu8A53yRko=\n"
                   b"-----END PUBLIC KEY-----\n")
SPEC_KEY_ID = "0AF87B3151B128F711CD3D454E6DE12F9AC782980AFB0A6095165B8ABE6D6174"

PEM_BLOCK = re.compile(rb"\A-----BEGIN (?P<label>[A-Z ]+)-----\n"
                       rb"(?P<body>(?:[A-Za-z0-9+/=]{1,64}\n)+)"
                       rb"-----END (?P=label)-----\n\Z")


def pem(key, encryption=None) -> bytes:
    """Unencrypted (or encrypted) PKCS#8 PEM of a cryptography private key."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption or serialization.NoEncryption())


def pub_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def write_pair(directory: Path, private_key, private_bytes: bytes | None = None) -> tuple[Path, Path]:
    pub = directory / keys.TLS_PUBKEY_NAME
    priv = directory / keys.TLS_PRIVKEY_NAME
    pub.write_bytes(pub_pem(private_key))
    priv.write_bytes(private_bytes if private_bytes is not None else pem(private_key))
    return pub, priv


def run_as_nobody(function) -> str:
    """Run ``function`` in a forked child as uid/gid 65534; return its result or exception name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                answer = str(function())
            except Exception as e:
                answer = type(e).__name__ + ":" + str(e)
            os.write(write_end, answer.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    d = tmp_path / "keys"
    d.mkdir()
    return d


@pytest.fixture
def good_pair(key_dir: Path) -> tuple[Path, Path]:
    public_pem, private_pem = keys.generate_tls_keypair()
    return keys.write_tls_keypair(key_dir, public_pem, private_pem)


# --- key ID -------------------------------------------------------------------

def test_key_id_of_spec_worked_example():
    public_key = serialization.load_pem_public_key(SPEC_PUBKEY_PEM)
    assert keys.key_id(public_key) == SPEC_KEY_ID


def test_key_id_of_der_bytes_is_sha256_upper_hex():
    public_key = serialization.load_pem_public_key(SPEC_PUBKEY_PEM)
    der = keys.public_key_der(public_key)
    assert len(der) == 44 and der.startswith(bytes.fromhex("302a300506032b6570032100"))
    assert keys.key_id(der) == hashlib.sha256(der).hexdigest().upper() == SPEC_KEY_ID


def test_key_id_of_empty_input_is_the_refused_id():
    assert keys.key_id(b"") == keys.REFUSED_KEY_ID


def test_key_id_is_64_upper_case_hex_digits():
    public_pem, _ = keys.generate_tls_keypair()
    value = keys.key_id(serialization.load_pem_public_key(public_pem))
    assert re.fullmatch(r"[0-9A-F]{64}", value)


def test_key_id_matches_gnutls_certtool(good_pair):
    certtool = shutil.which("certtool")
    if certtool is None:
        pytest.skip("certtool (gnutls-bin) is not installed")
    pub, priv = good_pair
    out = subprocess.run([certtool, "--key-id", "--hash=sha256", f"--infile={pub}"],
                         capture_output=True, text=True, check=True).stdout
    assert keys.load_tls_keypair(pub, priv).key_id == out.strip().upper()
    # and for the spec's example key too
    spec_file = pub.parent / "spec.pem"
    spec_file.write_bytes(SPEC_PUBKEY_PEM)
    out = subprocess.run([certtool, "--key-id", "--hash=sha256", f"--infile={spec_file}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().upper() == SPEC_KEY_ID


# --- loading -------------------------------------------------------------------

def test_load_good_pair(good_pair):
    pub, priv = good_pair
    pair = keys.load_tls_keypair(pub, priv)
    assert pair.key_type == "Ed25519"
    assert pair.public_pem == pub.read_bytes()
    assert pair.private_pem == priv.read_bytes()
    der = keys.public_key_der(pair.public_key)
    assert pair.key_id == hashlib.sha256(der).hexdigest().upper()
    assert pair.pubkey_path == str(pub) and pair.privkey_path == str(priv)


def test_private_key_bytes_are_not_shown_by_repr(good_pair):
    pub, priv = good_pair
    pair = keys.load_tls_keypair(pub, priv)
    body = priv.read_bytes().splitlines()[1].decode()
    for text in (repr(pair), str(pair), repr(pair.private_pem), str(pair.private_pem),
                 f"{pair.private_pem}", "%s %r" % (pair.private_pem, pair.private_pem)):
        assert body not in text
        assert "PRIVATE KEY" not in text
    assert pair.key_id in repr(pair)


def test_secret_bytes_is_bytes_with_hidden_repr():
    secret = keys.SecretBytes(b"hunter2")
    assert secret == b"hunter2" and isinstance(secret, bytes)
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
    assert repr(secret) == "<SecretBytes: 7 bytes>"


@pytest.mark.parametrize("which", ["pub", "priv"])
def test_missing_file(good_pair, which):
    pub, priv = good_pair
    missing = pub if which == "pub" else priv
    missing.unlink()
    with pytest.raises(keys.MissingKeyFile) as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(missing) and str(missing) in str(info.value)


def test_directory_instead_of_file_is_unreadable(good_pair):
    pub, priv = good_pair
    priv.unlink()
    priv.mkdir()
    with pytest.raises(keys.UnreadableKeyFile, match="directory") as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(priv)


def test_unreadable_file_permission_denied(public_tmp):
    public_pem, private_pem = keys.generate_tls_keypair()
    pub, priv = keys.write_tls_keypair(public_tmp, public_pem, private_pem)
    if os.geteuid() == 0:
        # root reads anything: keep the key root-only and try as nobody
        os.chmod(priv, 0o600)
        os.chmod(pub, 0o644)
        answer = run_as_nobody(lambda: keys.load_tls_keypair(pub, priv))
    else:
        os.chmod(priv, 0)
        try:
            keys.load_tls_keypair(pub, priv)
            answer = "loaded"
        except keys.KeyFileError as e:
            answer = type(e).__name__ + ":" + str(e)
    assert answer.startswith("UnreadableKeyFile:"), answer
    assert str(priv) in answer and "permission denied" in answer


@pytest.mark.parametrize("which", ["pub", "priv"])
def test_empty_file(good_pair, which):
    pub, priv = good_pair
    empty = pub if which == "pub" else priv
    empty.write_bytes(b"")
    with pytest.raises(keys.EmptyKeyFile) as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(empty)


@pytest.mark.parametrize("content", [b"garbage\n", b"\x00\x01\x02" * 50, b"MCowBQYDK2VwAyEA\n"])
@pytest.mark.parametrize("which", ["pub", "priv"])
def test_not_pem(good_pair, which, content):
    pub, priv = good_pair
    bad = pub if which == "pub" else priv
    bad.write_bytes(content)
    with pytest.raises(keys.MalformedKeyFile, match="not a PEM file") as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(bad)


def test_huge_file_is_refused(good_pair):
    pub, priv = good_pair
    priv.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 200_000)
    with pytest.raises(keys.MalformedKeyFile, match="larger than"):
        keys.load_tls_keypair(pub, priv)


@pytest.mark.parametrize("which", ["pub", "priv"])
def test_pem_with_broken_body(good_pair, which):
    pub, priv = good_pair
    bad = pub if which == "pub" else priv
    label = b"PUBLIC KEY" if which == "pub" else b"PRIVATE KEY"
    bad.write_bytes(b"-----BEGIN " + label + b"-----\nAAAAAAAA\n-----END " + label + b"-----\n")
    with pytest.raises(keys.MalformedKeyFile, match="does not hold a valid") as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(bad)


def test_files_swapped_is_wrong_pem_label(good_pair):
    pub, priv = good_pair
    with pytest.raises(keys.MalformedKeyFile, match="expected 'PRIVATE KEY'") as info:
        keys.load_tls_keypair(priv, pub)
    assert info.value.path == str(pub)


def test_pkcs1_public_key_is_refused(key_dir):
    key = rsa.generate_private_key(65537, 2048)
    pub, priv = write_pair(key_dir, key)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.PKCS1))
    with pytest.raises(keys.MalformedKeyFile, match="expected 'PUBLIC KEY'"):
        keys.load_tls_keypair(pub, priv)


@pytest.mark.parametrize("make_key", [
    pytest.param(lambda: x25519.X25519PrivateKey.generate(), id="x25519"),
    pytest.param(lambda: dsa.generate_private_key(2048), id="dsa"),
    pytest.param(lambda: ec.generate_private_key(ec.SECP256K1()), id="secp256k1"),
    pytest.param(lambda: rsa.generate_private_key(65537, 1024), id="rsa1024"),
])
def test_unsupported_key_type(key_dir, make_key):
    pub, priv = write_pair(key_dir, make_key())
    with pytest.raises(keys.UnsupportedKeyType) as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(priv)


@pytest.mark.parametrize("make_key,type_name", [
    (lambda: ed448.Ed448PrivateKey.generate(), "Ed448"),
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ECDSA-secp256r1"),
    (lambda: ec.generate_private_key(ec.SECP384R1()), "ECDSA-secp384r1"),
    (lambda: rsa.generate_private_key(65537, 2048), "RSA-2048"),
])
def test_other_signing_key_types_are_accepted(key_dir, make_key, type_name):
    pub, priv = write_pair(key_dir, make_key())
    assert keys.load_tls_keypair(pub, priv).key_type == type_name


def test_password_encrypted_private_key(key_dir):
    key = ed25519.Ed25519PrivateKey.generate()
    pub, priv = write_pair(key_dir, key,
                           pem(key, serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(keys.EncryptedKeyFile) as info:
        keys.load_tls_keypair(pub, priv)
    assert info.value.path == str(priv)


@pytest.mark.parametrize("option", ["--null-password", "--empty-password"])
def test_certtool_null_and_empty_password_keys_are_accepted(key_dir, option):
    certtool = shutil.which("certtool")
    if certtool is None:
        pytest.skip("certtool (gnutls-bin) is not installed")
    priv = key_dir / keys.TLS_PRIVKEY_NAME
    pub = key_dir / keys.TLS_PUBKEY_NAME
    subprocess.run([certtool, "--generate-privkey", option, "--key-type=ed25519", "--pkcs8",
                    "--no-text", f"--outfile={priv}"], check=True, capture_output=True)
    assert b"ENCRYPTED PRIVATE KEY" in priv.read_bytes()
    key = serialization.load_pem_private_key(priv.read_bytes(), None)
    pub.write_bytes(pub_pem(key))
    pair = keys.load_tls_keypair(pub, priv)
    # the TLS layer is given the plain form
    assert pair.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert pair.private_pem == pem(key)


def test_mismatched_pair(key_dir):
    pub, priv = write_pair(key_dir, ed25519.Ed25519PrivateKey.generate())
    pub.write_bytes(pub_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(keys.KeyPairMismatch) as info:
        keys.load_tls_keypair(pub, priv)
    assert str(pub) in str(info.value) and str(priv) in str(info.value)
    assert info.value.pubkey_path == str(pub)


def test_mismatched_pair_of_different_types(key_dir):
    pub, priv = write_pair(key_dir, ed25519.Ed25519PrivateKey.generate())
    pub.write_bytes(pub_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(keys.KeyPairMismatch):
        keys.load_tls_keypair(pub, priv)


def test_every_error_is_a_key_file_error():
    for cls in (keys.MissingKeyFile, keys.UnreadableKeyFile, keys.EmptyKeyFile,
                keys.MalformedKeyFile, keys.UnsupportedKeyType, keys.EncryptedKeyFile,
                keys.KeyPairMismatch):
        assert issubclass(cls, keys.KeyFileError)


# --- generating and writing ------------------------------------------------------

def test_generated_pem_formats():
    public_pem, private_pem = keys.generate_tls_keypair()
    pub_match = PEM_BLOCK.match(public_pem)
    priv_match = PEM_BLOCK.match(private_pem)
    assert pub_match and pub_match["label"] == b"PUBLIC KEY"
    assert priv_match and priv_match["label"] == b"PRIVATE KEY"
    assert isinstance(private_pem, keys.SecretBytes)
    key = serialization.load_pem_private_key(private_pem, None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert pub_pem(key) == public_pem


def test_generated_keys_are_byte_identical_to_certtool_format(key_dir):
    certtool = shutil.which("certtool")
    if certtool is None:
        pytest.skip("certtool (gnutls-bin) is not installed")
    # certtool's own private key, re-encoded by us, is byte-identical
    theirs = key_dir / "certtool-priv.pem"
    subprocess.run([certtool, "--generate-privkey", "--password=", "--sec-param", "ultra",
                    "--key-type=ed25519", "--pkcs8", "--no-text", f"--outfile={theirs}"],
                   check=True, capture_output=True)
    key = serialization.load_pem_private_key(theirs.read_bytes(), None)
    assert pem(key) == theirs.read_bytes()
    # certtool derives from our private key exactly the public file we write
    public_pem, private_pem = keys.generate_tls_keypair()
    pub, priv = keys.write_tls_keypair(key_dir, public_pem, private_pem)
    derived = key_dir / "derived.pem"
    subprocess.run([certtool, "--password=", f"--load-privkey={priv}", f"--outfile={derived}",
                    "--pubkey-info", "--no-text"], check=True, capture_output=True)
    assert derived.read_bytes() == pub.read_bytes()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077, 0o277])
def test_written_files_have_names_and_mode_0600(key_dir, umask):
    public_pem, private_pem = keys.generate_tls_keypair()
    old = os.umask(umask)
    try:
        pub, priv = keys.write_tls_keypair(key_dir, public_pem, private_pem)
    finally:
        os.umask(old)
    assert (pub.name, priv.name) == ("tls-pubkey.pem", "tls-privkey.pem")
    for path in (pub, priv):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert pub.read_bytes() == public_pem and priv.read_bytes() == private_pem
    assert sorted(p.name for p in key_dir.iterdir()) == ["tls-privkey.pem", "tls-pubkey.pem"]
    keys.load_tls_keypair(pub, priv)


def test_write_refuses_to_overwrite_without_force(good_pair):
    pub, priv = good_pair
    old_pub, old_priv = pub.read_bytes(), priv.read_bytes()
    public_pem, private_pem = keys.generate_tls_keypair()
    with pytest.raises(FileExistsError):
        keys.write_tls_keypair(pub.parent, public_pem, private_pem)
    assert (pub.read_bytes(), priv.read_bytes()) == (old_pub, old_priv)
    keys.write_tls_keypair(pub.parent, public_pem, private_pem, force=True)
    assert (pub.read_bytes(), priv.read_bytes()) == (public_pem, private_pem)
    assert len(list(pub.parent.iterdir())) == 2


def test_write_replaces_symlink_instead_of_following_it(key_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"do not touch")
    (key_dir / keys.TLS_PRIVKEY_NAME).symlink_to(outside)
    public_pem, private_pem = keys.generate_tls_keypair()
    with pytest.raises(FileExistsError):
        keys.write_tls_keypair(key_dir, public_pem, private_pem)
    pub, priv = keys.write_tls_keypair(key_dir, public_pem, private_pem, force=True)
    assert outside.read_bytes() == b"do not touch"
    assert not priv.is_symlink() and priv.read_bytes() == private_pem
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600


# --- the original key generator ---------------------------------------------------

def original_keygen(debian_peers: Path) -> Path:
    path = debian_peers / "usr" / "sbin" / "mandos-keygen"
    assert path.is_file(), path
    return path


def run_original(keygen: Path, *args: str) -> str:
    result = subprocess.run(["sh", str(keygen), *args], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def original_key_id(keygen: Path, key_dir: Path) -> str:
    passfile = key_dir.parent / "pass"
    subprocess.run(["sh", "-c", 'printf "%s" hunter2 > "$1"', "sh", str(passfile)], check=True)
    out = run_original(keygen, "--passfile", str(passfile), "--no-ssh", "--dir", str(key_dir),
                       "--name", "test.example")
    match = re.search(r"^key_id = ([0-9a-f]{64})$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


@pytest.mark.interop
def test_keys_made_by_original_keygen_load_with_the_same_key_id(debian_peers, key_dir):
    keygen = original_keygen(debian_peers)
    run_original(keygen, "--dir", str(key_dir), "--force", "--length", "1024",
                 "--sublength", "1024", "--name", "test.example")
    pair = keys.load_tls_keypair(key_dir / keys.TLS_PUBKEY_NAME,
                                 key_dir / keys.TLS_PRIVKEY_NAME)
    assert pair.key_type == "Ed25519"
    assert original_key_id(keygen, key_dir) == pair.key_id.lower()


@pytest.mark.interop
def test_original_keygen_accepts_our_tls_keys(debian_peers, key_dir):
    keygen = original_keygen(debian_peers)
    # the OpenPGP half from the original, the TLS half ours
    run_original(keygen, "--dir", str(key_dir), "--force", "--length", "1024",
                 "--sublength", "1024", "--name", "test.example")
    public_pem, private_pem = keys.generate_tls_keypair()
    pub, priv = keys.write_tls_keypair(key_dir, public_pem, private_pem, force=True)
    ours = keys.load_tls_keypair(pub, priv).key_id
    assert original_key_id(keygen, key_dir) == ours.lower()
