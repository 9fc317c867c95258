"""Running a checker command (SERVER.md §8.4): real processes, a real event loop."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from mandos.server import checker
from mandos.server.checker import run_checker


def run(coroutine):
    return asyncio.run(coroutine)


def living(pgid: int) -> list[psutil.Process]:
    """The processes of group ``pgid`` that are still running (zombies do not count)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path} was not written")


async def wait_for_group(pgid: int, size: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(living(pgid)) < size:
        assert time.monotonic() < deadline, "the checker's processes did not start"
        await asyncio.sleep(0.01)


async def cancelled(task: asyncio.Task) -> float:
    """Cancel ``task``, expect CancelledError from it; return how long that took."""
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return time.monotonic() - started


# --- wait statuses ---------------------------------------------------------------------

@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_is_shifted_into_the_wait_status(code):
    assert run(run_checker(f"exit {code}")) == code << 8


def test_true_and_false():
    assert run(run_checker("true")) == 0
    assert os.WEXITSTATUS(run(run_checker("false"))) == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL, signal.SIGINT])
def test_killed_by_signal_gives_the_signal_number(signum):
    status = run(run_checker(f"kill -{int(signum)} $$"))
    assert status == int(signum)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum


def test_missing_shell_raises_oserror(monkeypatch):
    monkeypatch.setattr(checker, "SHELL", "/nonexistent/sh")
    with pytest.raises(OSError):
        run(run_checker("true"))


# --- the environment of a checker ---------------------------------------------------------

def test_runs_with_sh_c(tmp_path):
    out = tmp_path / "out"
    assert run(run_checker(f"echo \"$0\" > {out}")) == 0
    assert out.read_text() == "/bin/sh\n"


def test_working_directory_is_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run(run_checker(f"pwd > {out}")) == 0
    assert out.read_text() == "/\n"


def test_stdin_is_dev_null(tmp_path):
    """Even when the server's own stdin has something to read."""
    out = tmp_path / "out"
    read, write = os.pipe()
    os.write(write, b"a line\n")
    saved = os.dup(0)
    try:
        os.dup2(read, 0)
        status = run(run_checker(f"readlink /proc/$$/fd/0 > {out}; read line"))
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read, write):
            os.close(fd)
    assert status == 1 << 8  # end of file at once
    assert out.read_text() == "/dev/null\n"


def test_other_descriptors_are_closed(tmp_path):
    read, write = os.pipe()
    os.set_inheritable(read, True)
    os.set_inheritable(write, True)
    out = tmp_path / "out"
    try:
        assert run(run_checker(f"exec > {out}; ls /proc/$$/fd")) == 0
    finally:
        os.close(read)
        os.close(write)
    assert out.read_text().split() == ["0", "1", "2"]


def test_environment_is_inherited(monkeypatch):
    monkeypatch.setenv("MANDOS_CHECKER_TEST", "inherited value")
    assert run(run_checker('test "$MANDOS_CHECKER_TEST" = "inherited value"')) == 0
    assert run(run_checker('test -n "$PATH"')) == 0


def test_output_is_discarded_without_debug(capfd):
    assert run(run_checker("echo to-stdout; echo to-stderr >&2")) == 0
    out, err = capfd.readouterr()
    assert "to-stdout" not in out and "to-stderr" not in err


def test_output_is_inherited_in_debug_mode(capfd):
    assert run(run_checker("echo to-stdout; echo to-stderr >&2", debug=True)) == 0
    out, err = capfd.readouterr()
    assert "to-stdout" in out and "to-stderr" in err


def test_setsid_gives_a_process_group_of_its_own(tmp_path):
    pid_file = tmp_path / "pid"

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.ensure_future(run_checker(f"echo $$ > {pid_file}; exec sleep 100"))
        pid = int(await wait_for_file(pid_file))
        await wait_for_group(pid, 1)
        ids = (pid, os.getsid(pid), os.getpgid(pid))
        await cancelled(task)
        return ids

    pid, sid, pgid = run(scenario())
    assert sid == pid and pgid == pid
    assert pgid != os.getpgid(0)


# --- stopping a checker ------------------------------------------------------------------

def test_cancellation_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "pid"

    async def scenario() -> tuple[int, float]:
        task = asyncio.ensure_future(
            run_checker(f"echo $$ > {pid_file}; sleep 100 & sleep 100; wait"))
        pgid = int(await wait_for_file(pid_file))
        await wait_for_group(pgid, 3)
        return pgid, await cancelled(task)

    pgid, took = run(scenario())
    assert living(pgid) == []
    assert took < 3


def test_cancellation_reaps_the_shell(tmp_path):
    pid_file = tmp_path / "pid"

    async def scenario() -> int:
        task = asyncio.ensure_future(run_checker(f"echo $$ > {pid_file}; sleep 100"))
        pgid = int(await wait_for_file(pid_file))
        await wait_for_group(pgid, 2)
        await cancelled(task)
        return pgid

    pgid = run(scenario())
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(pgid).status()  # not even a zombie of ours


@pytest.mark.parametrize("command", [
    "trap '' TERM; echo $$ > {pid_file}; sleep 100 & sleep 100; wait",
    "(trap '' TERM; sleep 100) & echo $$ > {pid_file}; sleep 100; wait",
], ids=["group ignoring SIGTERM", "member ignoring SIGTERM after the shell died"])
def test_group_ignoring_sigterm_gets_sigkill_after_the_delay(tmp_path, monkeypatch, command):
    monkeypatch.setattr(checker, "KILL_DELAY", 0.5)
    pid_file = tmp_path / "pid"

    async def scenario() -> tuple[int, float]:
        task = asyncio.ensure_future(run_checker(command.format(pid_file=pid_file)))
        pgid = int(await wait_for_file(pid_file))
        await wait_for_group(pgid, 3)
        return pgid, await cancelled(task)

    pgid, took = run(scenario())
    assert living(pgid) == []
    assert 0.45 <= took < 3


def test_second_cancellation_does_not_interrupt_the_ending(tmp_path, monkeypatch):
    monkeypatch.setattr(checker, "KILL_DELAY", 0.5)
    pid_file = tmp_path / "pid"

    async def scenario() -> int:
        task = asyncio.ensure_future(run_checker(
            f"trap '' TERM; echo $$ > {pid_file}; sleep 100 & sleep 100; wait"))
        pgid = int(await wait_for_file(pid_file))
        await wait_for_group(pgid, 3)
        task.cancel()
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pgid

    assert living(run(scenario())) == []


def test_background_processes_do_not_delay_the_result():
    started = time.monotonic()
    assert run(run_checker("sleep 0.5 > /dev/null 2>&1 & exit 3")) == 3 << 8
    assert time.monotonic() - started < 0.45
