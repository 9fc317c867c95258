"""TLS key files of a Mandos client: loading, checking, generating, key ID.

The client's TLS identity is a raw public key (RFC 7250).  Two PEM files hold
it, in the formats the original ``mandos-keygen`` writes (PROTOCOL.md §4.1):

* ``tls-pubkey.pem``: ``-----BEGIN PUBLIC KEY-----``, DER SubjectPublicKeyInfo;
* ``tls-privkey.pem``: ``-----BEGIN PRIVATE KEY-----``, unencrypted PKCS#8.

The key ID the server matches against ``clients.conf`` is the SHA-256 of the
DER SubjectPublicKeyInfo in 64 upper-case hex digits (PROTOCOL.md §3.4, §4.3).

Key types: Ed25519 is the default and the only type tested against the
original programs.  Ed448, ECDSA (P-256/384/521) and RSA of 2048 bits or more
are accepted too, since GnuTLS can sign with them in TLS 1.3 (PROTOCOL.md §3.3
marks them "should work"); everything else is refused when the key is loaded.

``cryptography`` is imported inside the functions that need it, so importing
this module costs next to nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import re

# typing.TYPE_CHECKING without importing typing (2 ms at boot); type
# checkers treat any constant of this name the same way.
TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path
    from typing import Union

    from cryptography.hazmat.primitives.asymmetric.types import (
        PRIVATE_KEY_TYPES,
        PUBLIC_KEY_TYPES,
    )

    StrPath = Union[str, "os.PathLike[str]"]

logger = logging.getLogger(__name__)

TLS_PUBKEY_NAME = "tls-pubkey.pem"
TLS_PRIVKEY_NAME = "tls-privkey.pem"
#: Mode of every key file the original key generator creates (umask 077).
KEY_FILE_MODE = 0o600

#: Key ID of zero bytes of input; the server refuses it (PROTOCOL.md §3.4).
REFUSED_KEY_ID = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"

#: Smallest RSA key accepted for TLS.
MIN_RSA_BITS = 2048
#: Elliptic curves GnuTLS can sign with in TLS 1.3.
SUPPORTED_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")

# A key file is a few hundred bytes; refusing anything larger than this keeps
# a mistaken path (a device, a log file) from being read into memory.
_MAX_KEY_FILE_SIZE = 64 * 1024

_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


class SecretBytes(bytes):
    """Bytes whose value never shows in ``repr``, ``str`` or log messages.

    It is a real ``bytes`` object, so it can be handed to anything that takes
    bytes; only the printable forms are replaced.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {len(self)} bytes>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


class KeyFileError(Exception):
    """A key file cannot be used.  ``path`` names the file at fault."""

    def __init__(self, path: StrPath, message: str) -> None:
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: {message}")


class MissingKeyFile(KeyFileError):
    """The key file does not exist."""


class UnreadableKeyFile(KeyFileError):
    """The key file exists but cannot be read (permissions, not a file, I/O)."""


class EmptyKeyFile(KeyFileError):
    """The key file is empty."""


class MalformedKeyFile(KeyFileError):
    """The key file is not PEM, has the wrong PEM label, or its content does not parse."""


class UnsupportedKeyType(KeyFileError):
    """The key is of a type (or size) the TLS layer cannot use."""


class EncryptedKeyFile(KeyFileError):
    """The private key is protected by a password; Mandos needs it unencrypted."""


class KeyPairMismatch(KeyFileError):
    """The public key file does not belong to the private key file."""

    def __init__(self, pubkey_path: StrPath,
                 privkey_path: StrPath) -> None:
        self.pubkey_path = os.fspath(pubkey_path)
        super().__init__(privkey_path,
                         f"private key does not match the public key in {self.pubkey_path}")


class TLSKeyPair:
    """A loaded and checked TLS key pair.

    ``public_pem`` is the public key file's bytes as read.  ``private_pem`` is
    unencrypted PKCS#8 PEM: the file's bytes as read, or, for a key stored
    encrypted under a null or empty password, that key re-encoded without
    encryption.  Both are what the GnuTLS binding is given.  ``key_type`` is
    e.g. ``"Ed25519"``; ``key_id`` is the Mandos key ID.
    """

    __slots__ = ("pubkey_path", "privkey_path", "key_type", "key_id",
                 "public_pem", "private_pem", "public_key", "private_key")

    def __init__(self, *, pubkey_path: str, privkey_path: str, key_type: str, key_id: str,
                 public_pem: bytes, private_pem: SecretBytes,
                 public_key: "PUBLIC_KEY_TYPES", private_key: "PRIVATE_KEY_TYPES") -> None:
        self.pubkey_path = pubkey_path
        self.privkey_path = privkey_path
        self.key_type = key_type
        self.key_id = key_id
        self.public_pem = public_pem
        self.private_pem = private_pem
        self.public_key = public_key
        self.private_key = private_key

    def __repr__(self) -> str:
        # Paths and the public key ID only: nothing secret.
        return (f"TLSKeyPair(pubkey_path={self.pubkey_path!r}, "
                f"privkey_path={self.privkey_path!r}, key_type={self.key_type!r}, "
                f"key_id={self.key_id!r})")


def read_key_file(path: StrPath, max_size: int = _MAX_KEY_FILE_SIZE) -> bytes:
    """Read a whole key file, raising the KeyFileError subclass that says what is wrong.

    MissingKeyFile, UnreadableKeyFile (permissions, a directory, I/O error),
    EmptyKeyFile, or MalformedKeyFile if it is larger than ``max_size``.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except FileNotFoundError:
        raise MissingKeyFile(path, "key file does not exist") from None
    except PermissionError as e:
        raise UnreadableKeyFile(path, f"permission denied ({e.strerror})") from None
    except IsADirectoryError:
        raise UnreadableKeyFile(path, "is a directory, not a key file") from None
    except OSError as e:
        raise UnreadableKeyFile(path, f"cannot read: {e.strerror or e}") from None
    if not data:
        raise EmptyKeyFile(path, "key file is empty")
    if len(data) > max_size:
        raise MalformedKeyFile(path, f"larger than {max_size} bytes; not a key file")
    return data


def _pem_label(path: str, data: bytes) -> bytes:
    match = _PEM_BEGIN.search(data)
    if match is None:
        raise MalformedKeyFile(path, "not a PEM file (no '-----BEGIN ...-----' line)")
    return match.group(1)


def _key_type_name(key: object) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "Ed448"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return f"ECDSA-{key.curve.name}"
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def _check_key_type(path: str, key: object) -> str:
    """Return a name for the key's type; raise if GnuTLS raw-PK TLS 1.3 can't sign with it.

    Accepted: Ed25519 (the default and the tested type), Ed448, ECDSA on
    P-256/P-384/P-521, RSA of at least MIN_RSA_BITS bits (RSA-PSS signatures).
    Refused: DSA, DH, X25519/X448 (cannot sign), other curves.
    """
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    name = _key_type_name(key)
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey,
                        ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return name
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if key.curve.name in SUPPORTED_EC_CURVES:
            return name
        raise UnsupportedKeyType(path, f"elliptic curve {key.curve.name} is not usable for "
                                       f"TLS signatures (use Ed25519)")
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size >= MIN_RSA_BITS:
            return name
        raise UnsupportedKeyType(path, f"RSA key of {key.key_size} bits is too small "
                                       f"(at least {MIN_RSA_BITS}; Ed25519 is the default)")
    raise UnsupportedKeyType(path, f"key type {name} is not usable for TLS signatures "
                                   f"(use Ed25519)")


def _load_public(path: str) -> tuple[bytes, "PUBLIC_KEY_TYPES"]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_key_file(path)
    label = _pem_label(path, data)
    if label != b"PUBLIC KEY":
        raise MalformedKeyFile(path, f"PEM block is '{label.decode()}', expected 'PUBLIC KEY' "
                                     f"(SubjectPublicKeyInfo)")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise MalformedKeyFile(path, "PUBLIC KEY block does not hold a valid public key") from None
    except UnsupportedAlgorithm as e:
        raise UnsupportedKeyType(path, f"cannot use this public key: {e}") from None
    return data, key


def _load_private(path: str) -> tuple[SecretBytes, "PRIVATE_KEY_TYPES"]:
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    data = read_key_file(path)
    label = _pem_label(path, data)
    if not label.endswith(b"PRIVATE KEY"):
        raise MalformedKeyFile(path, f"PEM block is '{label.decode()}', expected 'PRIVATE KEY' "
                                     f"(PKCS#8)")
    try:
        # password=None also opens PKCS#8 encrypted under a null or empty
        # password (certtool --null-password / --empty-password), and only those.
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise EncryptedKeyFile(path, "private key is encrypted with a password; "
                                     "an unencrypted PKCS#8 key is needed") from None
    except ValueError:
        raise MalformedKeyFile(path, f"{label.decode()} block does not hold a valid "
                                     f"private key") from None
    except UnsupportedAlgorithm as e:
        raise UnsupportedKeyType(path, f"cannot use this private key: {e}") from None
    if label == b"PRIVATE KEY":
        pem = SecretBytes(data)
    else:
        # GnuTLS would ask for a password; hand it the plain form instead.
        pem = SecretBytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return pem, key


def public_key_der(public_key: "PUBLIC_KEY_TYPES") -> bytes:
    """DER SubjectPublicKeyInfo of a ``cryptography`` public key."""
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(public_key_or_der: "Union[bytes, bytearray, memoryview, PUBLIC_KEY_TYPES]") -> str:
    """Mandos key ID: SHA-256 of the DER SubjectPublicKeyInfo, 64 upper-case hex digits.

    Bytes are taken to be the DER SubjectPublicKeyInfo as received (a raw
    public key certificate) and are hashed as they are; a ``cryptography``
    public key object is DER-encoded first.
    """
    import hashlib

    if isinstance(public_key_or_der, (bytes, bytearray, memoryview)):
        der = bytes(public_key_or_der)
    else:
        der = public_key_der(public_key_or_der)
    return hashlib.sha256(der).hexdigest().upper()


def load_tls_keypair(pubkey_path: StrPath,
                     privkey_path: StrPath) -> TLSKeyPair:
    """Load ``tls-pubkey.pem`` and ``tls-privkey.pem`` and check that they belong together.

    Raises a KeyFileError subclass naming the file at fault: MissingKeyFile,
    UnreadableKeyFile, EmptyKeyFile, MalformedKeyFile, UnsupportedKeyType,
    EncryptedKeyFile or KeyPairMismatch.
    """
    pubkey_path = os.fspath(pubkey_path)
    privkey_path = os.fspath(privkey_path)
    private_pem, private_key = _load_private(privkey_path)
    key_type = _check_key_type(privkey_path, private_key)
    public_pem, public_key = _load_public(pubkey_path)
    # A stale or swapped public key file would make the server see a key ID
    # other than the one the administrator configured: refuse it here, with a
    # message that says so, rather than as a silent "client not found".
    der = public_key_der(public_key)
    if der != public_key_der(private_key.public_key()):
        raise KeyPairMismatch(pubkey_path, privkey_path)
    return TLSKeyPair(pubkey_path=pubkey_path, privkey_path=privkey_path,
                      key_type=key_type, key_id=key_id(der),
                      public_pem=public_pem, private_pem=private_pem,
                      public_key=public_key, private_key=private_key)


def generate_tls_keypair() -> tuple[bytes, SecretBytes]:
    """Generate an Ed25519 key pair; return ``(public PEM, private PEM)``.

    The formats are byte-for-byte those of the original key generator
    (``certtool --pkcs8 --no-text``): SubjectPublicKeyInfo ``PUBLIC KEY`` and
    unencrypted PKCS#8 ``PRIVATE KEY``, each one block with a final newline.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = SecretBytes(key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return public_pem, private_pem


def write_key_file(path: StrPath, data: bytes, *, force: bool = False,
                   mode: int = KEY_FILE_MODE) -> None:
    """Write ``data`` to ``path`` atomically, with ``mode`` from the first byte on.

    The content goes to a new temporary file in the same directory, created
    with O_EXCL and the final mode (so a secret is never readable by others,
    not even for a moment, and no existing file or symlink is written
    through), is synced, and is then renamed into place.  Without ``force`` an
    existing ``path`` raises FileExistsError and is left alone.
    """
    from pathlib import Path

    path = Path(path)
    directory = path.parent
    tmp = None
    for attempt in range(100):
        candidate = directory / f".{path.name}.{os.getpid()}.{attempt}.tmp"
        try:
            fd = os.open(candidate,
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         mode)
        except FileExistsError:
            continue
        tmp = candidate
        break
    else:
        raise FileExistsError(errno.EEXIST, "cannot create a temporary file", str(directory))
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if path exists: no clobbering
            os.unlink(tmp)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_tls_keypair(directory: StrPath, public_pem: bytes,
                      private_pem: bytes, *, force: bool = False) -> "tuple[Path, Path]":
    """Write ``tls-pubkey.pem`` and ``tls-privkey.pem`` (both mode 0600) into ``directory``.

    Returns ``(pubkey_path, privkey_path)``.  Without ``force``, raises
    FileExistsError before writing anything if either file exists.
    """
    from pathlib import Path

    directory = Path(directory)
    pub = directory / TLS_PUBKEY_NAME
    priv = directory / TLS_PRIVKEY_NAME
    if not force:
        for p in (priv, pub):
            if os.path.lexists(p):
                raise FileExistsError(errno.EEXIST, "key file already exists", str(p))
    write_key_file(priv, private_pem, force=force)
    write_key_file(pub, public_pem, force=force)
    logger.debug("wrote TLS key pair to %s", directory)
    return pub, priv
