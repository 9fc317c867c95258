"""Running one checker command (SERVER.md §8.4).

A checker is ``/bin/sh -c COMMAND`` in a process group of its own (setsid),
with working directory ``/``, standard input from ``/dev/null``, no other
inherited descriptors, the server's environment, and its output discarded
unless in debug mode.  Only its wait status counts.

Stopping a checker (cancelling :func:`run_checker`) ends its whole process
group, not just the shell: SIGTERM first, SIGKILL for whatever is still
alive after :data:`KILL_DELAY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
KILL_DELAY = 5.0  # seconds between SIGTERM and SIGKILL
_POLL = 0.02  # seconds between looks at a dying process group


def _wait_status(returncode: int) -> int:
    """asyncio's return code as ``os.waitpid`` gives it: exit code << 8, or the signal."""
    return -returncode if returncode < 0 else returncode << 8


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    import psutil  # only needed when a checker is stopped

    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


async def _end_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL what outlives KILL_DELAY, reap the shell."""
    loop = asyncio.get_running_loop()
    pgid = process.pid  # after setsid its PID is the group ID
    _signal_group(pgid, signal.SIGTERM)
    if await _ended(process, loop.time() + KILL_DELAY):
        return
    log.warning("Checker process group %d outlived SIGTERM; sending SIGKILL", pgid)
    _signal_group(pgid, signal.SIGKILL)
    if process.returncode is None:
        try:
            process.kill()  # the shell itself, whatever its group
        except ProcessLookupError:
            pass
    # SIGKILL cannot be ignored, but dying takes a moment.
    await _ended(process, loop.time() + KILL_DELAY)
    await process.wait()


async def _ended(process: asyncio.subprocess.Process, deadline: float) -> bool:
    """Wait until the shell is reaped and its group is gone, or ``deadline``."""
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(process.wait(), max(deadline - loop.time(), 0))
    except asyncio.TimeoutError:
        return False
    while _group_alive(process.pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL)
    return True


async def run_checker(command: str, *, debug: bool = False) -> int:
    """Run ``/bin/sh -c command``; return its wait status (as :func:`os.waitpid`).

    Exit code E gives ``E << 8``; death by signal S gives ``S``.  Output
    goes to ``/dev/null`` unless ``debug``.  Cancelling the call ends the
    checker's whole process group and reaps it before CancelledError is
    raised again.  OSError if the shell cannot be started.
    """
    output = None if debug else subprocess.DEVNULL
    process = await asyncio.create_subprocess_exec(
        SHELL, "-c", command, cwd="/", stdin=subprocess.DEVNULL, stdout=output,
        stderr=output, close_fds=True, start_new_session=True)
    try:
        return _wait_status(await process.wait())
    except asyncio.CancelledError:
        # Signal the group now, while we surely still run (at shutdown the
        # event loop may not give the ending task another step), then finish
        # ending it even if cancelled again meanwhile: whoever started the
        # processes owns their end.
        _signal_group(process.pid, signal.SIGTERM)
        ending = asyncio.ensure_future(_end_group(process))
        while not ending.done():
            try:
                await asyncio.shield(ending)
            except asyncio.CancelledError:
                continue
        raise
