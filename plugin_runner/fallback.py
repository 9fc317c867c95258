"""The last resort: ask for the password on the terminal, like getpass(3).

The prompt goes to the controlling terminal, or to standard error when there
is none (then the password is read from standard input).  Echo is turned off
while reading a terminal.  One trailing newline is removed; end of input
gives an empty password.
"""

import os

PROMPT = b"Password: "


def read_password() -> bytes:
    """Prompt and read one line without echo; never raises for missing ttys."""
    try:
        tty_fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        tty_fd = -1
    in_fd, out_fd = (tty_fd, tty_fd) if tty_fd >= 0 else (0, 2)
    try:
        return _prompt(in_fd, out_fd)
    finally:
        if tty_fd >= 0:
            os.close(tty_fd)


def _prompt(in_fd: int, out_fd: int) -> bytes:
    saved = None
    if os.isatty(in_fd):
        import termios
        saved = termios.tcgetattr(in_fd)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        termios.tcsetattr(in_fd, termios.TCSAFLUSH, quiet)
    try:
        _write(out_fd, PROMPT)
        line = _read_line(in_fd)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSAFLUSH, saved)
            _write(out_fd, b"\n")
    line = line[:-1] if line.endswith(b"\n") else line
    # getpass(3) hands back a C string: a typed NUL byte ends the password.
    return line.split(b"\0", 1)[0]


def _read_line(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            byte = os.read(fd, 1)
        except OSError:
            break
        if not byte:
            break
        chunks.append(byte)
        if byte == b"\n":
            break
    return b"".join(chunks)


def _write(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass
