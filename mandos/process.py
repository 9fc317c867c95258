"""Facts about this process that the boot-time programs need.

Standard library only and cheap to import: plugin-runner and the plugins
use it at every boot.
"""

import os
import sys


def program_name(default: str) -> str:
    """Base name of the program file, for message prefixes.

    plugin-runner starts a script through its file descriptor, so the
    interpreter sees /dev/fd/N as the script name; the name of the file it
    points to is more useful.
    """
    arg0 = sys.argv[0] if sys.argv and sys.argv[0] else default
    if arg0.startswith(("/dev/fd/", "/proc/self/fd/")):
        arg0 = os.path.realpath(arg0)
    return os.path.basename(arg0) or default


def original_environment() -> dict[str, str]:
    """The environment this process was started with.

    os.environ is not quite that: at start-up the interpreter adds
    LC_CTYPE=C.UTF-8 when no locale is set (PEP 538 locale coercion), which
    must not leak into the programs we start.  The kernel's copy in
    /proc/self/environ is the original.  Read it before changing user IDs:
    the kernel then hides it from the process itself.
    """
    try:
        with open("/proc/self/environ", "rb") as file:
            block = file.read()
    except OSError:
        return dict(os.environ)
    env = {}
    for entry in block.split(b"\0"):
        var, eq, value = entry.partition(b"=")
        if eq and var:
            env.setdefault(os.fsdecode(var), os.fsdecode(value))
    return env


def exit_now(status: int | None) -> None:
    """Exit at once with ``status``, skipping the interpreter's tear-down.

    For the boot-time programs, whose work is complete when they return:
    standard output and error are flushed here, and nothing else needs the
    interpreter's finalisation (which takes about 2 ms in plugin-runner).
    At boot every millisecond until the process has ended delays the
    unlock.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0 if status is None else status)
