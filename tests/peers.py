"""The original Debian Mandos programs, fetched and unpacked for use as test peers.

They are downloaded with ``apt-get download`` and unpacked with ``dpkg -x``
into a cache folder; they are never installed (their maintainer scripts
would create users, start services and rebuild the initramfs).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PEER_VERSION = "1.8.16-1"
PEER_PACKAGES = ("mandos-client", "mandos")
CACHE_DIR = Path(os.environ.get("MANDOS_PEER_CACHE", "/var/cache/mandos-test-peers"))
MULTIARCH = "x86_64-linux-gnu"


class PeerUnavailable(RuntimeError):
    """The original programs could not be fetched."""


def _download(package: str, dest: Path) -> Path:
    deb = next(dest.glob(f"{package}_{PEER_VERSION.replace(':', '%3a')}_*.deb"), None)
    if deb is not None:
        return deb
    spec = f"{package}={PEER_VERSION}"
    for attempt in range(2):
        result = subprocess.run(["apt-get", "download", spec], cwd=dest,
                                capture_output=True, text=True)
        if result.returncode == 0:
            break
        if attempt == 0:  # stale or missing package lists: refresh once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    else:
        raise PeerUnavailable(f"apt-get download {spec} failed: {result.stderr.strip()}")
    deb = next(dest.glob(f"{package}_*.deb"), None)
    if deb is None:
        raise PeerUnavailable(f"apt-get download {spec} produced no file")
    return deb


def unpacked_root() -> Path:
    """Return the folder the original packages are unpacked into, fetching if needed."""
    root = CACHE_DIR / f"root-{PEER_VERSION}"
    stamp = root / ".complete"
    if stamp.exists():
        return root
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE_DIR, 0o755)
    for package in PEER_PACKAGES:
        deb = _download(package, CACHE_DIR)
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    stamp.touch()
    return root


def client_libdir() -> Path:
    """``<libdir>/mandos`` of the unpacked mandos-client package."""
    return unpacked_root() / "usr" / "lib" / MULTIARCH / "mandos"


def original_plugin_runner() -> Path:
    return client_libdir() / "plugin-runner"
