"""Every man page renders with man(1) without groff warnings."""

import os
import subprocess
from pathlib import Path

import pytest

MAN_DIR = Path(__file__).resolve().parent.parent / "man"
PAGES = sorted(p for p in MAN_DIR.iterdir() if p.is_file())


def test_man_pages_exist_for_every_program():
    names = {p.name for p in PAGES}
    for expected in ("plugin-runner.8mandos", "plugin-runner.conf.5",
                     "askpass-fifo.8mandos", "password-prompt.8mandos",
                     "mandos-keygen.8", "mandos-client.8mandos", "mandos.8",
                     "mandos.conf.5", "mandos-clients.conf.5"):
        assert expected in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_page_renders_without_warnings(page):
    result = subprocess.run(["man", "-l", "--warnings", str(page)],
                            capture_output=True, text=True,
                            env={**os.environ, "MANWIDTH": "80", "MANPAGER": "cat",
                                 "PAGER": "cat"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "NAME" in result.stdout and "DESCRIPTION" in result.stdout
