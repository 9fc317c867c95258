"""Shared fixtures for the test suite."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402


@pytest.fixture
def public_tmp() -> Path:
    """A temporary folder that unprivileged users (uid 65534) can traverse.

    pytest's own ``tmp_path`` lives below a 0700 folder, but plugin-runner
    drops to uid 65534 before it opens the plugin directory.
    """
    path = Path(tempfile.mkdtemp(prefix="mandos-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_peers() -> Path:
    """Root of the unpacked Debian mandos/mandos-client 1.8.16 packages."""
    return peers.unpacked_root()
