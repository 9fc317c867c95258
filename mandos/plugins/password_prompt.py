"""password-prompt: ask for the disk password on the console.

The prompt goes to standard error, the typed line (without its newline) to
standard output.  Standard input must be a terminal; echo is turned off
while reading and the original terminal settings are put back on every way
out, including SIGINT, SIGHUP and SIGTERM, after which the program dies by
that signal.  When Plymouth is running the program steps aside (exit 1,
nothing printed), because Plymouth owns the console then.

This runs at boot, so it imports only small standard modules (errno, os,
select, signal, sys, termios); ``psutil`` is imported only for the Plymouth
check.
"""

import errno
import os
import select
import signal
import sys
import termios

from mandos import __version__, process

PLYMOUTH_PID_FILE = "/run/plymouth/pid"
PLYMOUTH_DAEMON = "plymouthd"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
CHUNK_SIZE = 1024

# name -> takes an argument
# (long name, short letter, takes an argument)
OPTIONS = (
    ("prompt", None, True),
    ("prefix", "p", True),
    ("debug", None, False),
    ("help", "?", False),
    ("usage", None, False),
    ("version", "V", False),
)

HELP_TEXT = """\
Usage: {prog} [OPTION...]
Ask for a disk password on the terminal and print it on standard output.

  -p, --prefix=PREFIX   print PREFIX and a space before the prompt
      --prompt=PROMPT   prompt with "PROMPT: " instead of a text made from
                        the crypttab variables
      --debug           print progress messages on standard error
  -?, --help            show this help and exit
      --usage           show a short usage summary and exit
  -V, --version         show the program version and exit

Long options may be shortened to any unambiguous prefix.  Help, usage and
version output end with exit status 64, like a usage error.
"""

USAGE_TEXT = """\
Usage: {prog} [-?V] [-p PREFIX] [--prefix=PREFIX] [--prompt=PROMPT]
        [--debug] [--help] [--usage] [--version]
"""


class Options:
    """The parsed command line."""

    __slots__ = ("prefix", "prompt", "debug")

    def __init__(self) -> None:
        self.prefix: str | None = None
        self.prompt: str | None = None
        self.debug = False


class ExitNow(Exception):
    """Stop the program with *status* (the message, if any, has been printed)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Interrupted(Exception):
    """Raised by the signal handler to break out of a blocking read."""


def program_name() -> str:
    """Base name of the program file, for message prefixes."""
    return process.program_name("password-prompt")

def _write_stderr(text: str | bytes) -> None:
    data = os.fsencode(text) if isinstance(text, str) else text
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass  # nowhere left to report to


def _message(text: str) -> None:
    _write_stderr(f"Mandos plugin {program_name()}: {text}\n")


def _usage_error(text: str) -> ExitNow:
    prog = program_name()
    _write_stderr(f"{prog}: {text}\n"
                  f"Try '{prog} --help' or '{prog} --usage' for more information.\n")
    return ExitNow(os.EX_USAGE)


def _print_and_exit(text: str) -> ExitNow:
    data = text.encode()
    try:
        while data:
            data = data[os.write(1, data):]
    except OSError:
        pass  # the exit status says it all
    return ExitNow(os.EX_USAGE)


def _apply(options: Options, name: str, value: str | None) -> None:
    prog = program_name()
    if name == "prefix":
        options.prefix = value
    elif name == "prompt":
        options.prompt = value
    elif name == "debug":
        options.debug = True
    elif name == "help":
        raise _print_and_exit(HELP_TEXT.format(prog=prog))
    elif name == "usage":
        raise _print_and_exit(USAGE_TEXT.format(prog=prog))
    elif name == "version":
        raise _print_and_exit(f"password-prompt {__version__}\n")


def parse_args(argv: list[str]) -> Options:
    """Parse *argv* GNU-style, acting on each option in the order given.

    Accepts ``--name=value``, ``--name value``, ``-p value``, ``-pvalue``,
    grouped short options and unambiguous long-option prefixes; ``--`` ends
    the options.  Help, usage and version print on standard output and raise
    ExitNow(EX_USAGE); so does any error (message on standard error).
    """
    from mandos.cmdline import UsageError, tokens
    options = Options()
    try:
        for name, value in tokens(argv, OPTIONS):
            if name is None:
                raise UsageError("too many arguments")
            _apply(options, name, value)
    except UsageError as err:
        raise _usage_error(str(err)) from None
    return options


def build_prompt(options: Options, environ: dict[bytes, bytes]) -> bytes:
    """Return the complete prompt text, as bytes, for *options* and *environ*.

    *environ* maps bytes to bytes (a copy of ``os.environb``) so that device
    names are shown exactly as given.  A variable that is set but empty
    still counts as set.
    """
    parts: list[bytes] = []
    if options.prefix is not None:
        parts.append(os.fsencode(options.prefix) + b" ")
    if options.prompt is not None:
        parts.append(os.fsencode(options.prompt) + b": ")
        return b"".join(parts)
    source = environ.get(b"CRYPTTAB_SOURCE")
    if source is None:
        source = environ.get(b"cryptsource")
    target = environ.get(b"CRYPTTAB_NAME")
    if target is None:
        target = environ.get(b"crypttarget")
    if source is None and target is None:
        parts.append(b"Enter passphrase to unlock the disk: ")
    else:
        parts.append(b"Unlocking the disk")
        if source is not None:
            parts.append(b" " + source)
        if target is not None:
            parts.append(b" (" + target + b")")
        parts.append(b"\nEnter passphrase: ")
    return b"".join(parts)


def plymouth_running(debug: bool = False) -> bool:
    """True if Plymouth is running (its PID file is readable or a plymouthd process exists).

    Raises an exception if the process list cannot be read.
    """
    if os.access(PLYMOUTH_PID_FILE, os.R_OK):
        if debug:
            _message(f"{PLYMOUTH_PID_FILE} exists")
        return True
    import psutil  # only needed here; costly enough to keep off the import path

    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"]
        # argv[0] is compared, not the executable, like the original
        if cmdline and os.path.basename(cmdline[0]) == PLYMOUTH_DAEMON:
            if debug:
                _message(f"process {process.pid} is {PLYMOUTH_DAEMON}")
            return True
    if debug:
        _message(f"no {PLYMOUTH_DAEMON} process found")
    return False


class _SignalState:
    """The first terminating signal received, and the means to notice it.

    The handler only records the signal.  A blocking read cannot be relied on
    to be interrupted: a signal that arrives just before the read starts
    would be noticed only after the next line of input.  So input is awaited
    with select() on the terminal and on a wake-up pipe that the interpreter
    writes to the moment any handled signal arrives.
    """

    __slots__ = ("received", "reading", "wakeup")

    def __init__(self) -> None:
        self.received: int | None = None
        self.reading = False
        self.wakeup = -1

    def install(self) -> None:
        """Catch SIGINT, SIGHUP and SIGTERM, except those ignored at start."""
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self.wakeup = read_end
        for signum in HANDLED_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                signal.signal(signum, self.handler)

    def handler(self, signum: int, frame: object) -> None:
        """Record the first signal; break out of a read in progress."""
        if self.received is None:
            self.received = signum
        # Python retries an interrupted read() unless the handler raises
        # (PEP 475), so raising is the only way to stop a blocked read.
        if self.reading:
            raise _Interrupted

    def wait_readable(self, fd: int) -> None:
        """Block until *fd* has input; raise _Interrupted once a signal is recorded."""
        while True:
            if self.received is not None:
                raise _Interrupted
            ready, _, _ = select.select([fd, self.wakeup], [], [])
            if self.wakeup in ready:
                try:
                    numbers = os.read(self.wakeup, 64)
                except BlockingIOError:
                    numbers = b""
                for signum in numbers:
                    if signum in HANDLED_SIGNALS and self.received is None:
                        self.received = signum
                continue
            if fd in ready:
                return


def _terminal_error(what: str, err: termios.error) -> ExitNow:
    code, text = err.args[0], err.args[-1]
    _message(f"{what}: {text}")
    if code in (errno.EBADF, errno.ENOTTY):
        return ExitNow(os.EX_UNAVAILABLE)
    return ExitNow(os.EX_OSERR)


def read_line(fd: int, state: _SignalState) -> bytearray:
    """Read one line (with its newline, if any) from *fd*.

    Returns an empty buffer at end-of-file with nothing read.  Reading stops
    at the first newline or at end-of-file after some input.  The read can
    be broken by a signal through ``state`` (raises _Interrupted).
    """
    line = bytearray()
    chunk = bytearray(CHUNK_SIZE)
    view = memoryview(chunk)
    try:
        while True:
            state.wait_readable(fd)
            state.reading = True
            try:
                count = os.readv(fd, [view])
            finally:
                state.reading = False
            if count == 0:
                return line
            newline = chunk.find(b"\n", 0, count)
            if newline >= 0:
                line += view[:newline + 1]
                return line
            line += view[:count]
    except BaseException:
        line[:] = bytes(len(line))
        raise
    finally:
        # Best effort against the password lingering in freed memory.
        view[:] = bytes(CHUNK_SIZE)
        view.release()


def _write_password(password: bytearray) -> int:
    """Write *password* to standard output and close it; return the status."""
    view = memoryview(password)
    try:
        while view:
            view = view[os.write(1, view):]
    except OSError as err:
        _message(f"write: {err.strerror}")
        return os.EX_IOERR
    finally:
        view.release()
    try:
        os.close(1)
    except OSError as err:
        _message(f"close: {err.strerror}")
        return os.EX_OSFILE if err.errno == errno.EBADF else os.EX_IOERR
    return os.EX_OK


def prompt_loop(prompt: bytes, state: _SignalState, debug: bool) -> int:
    """Prompt and read until a line is read, an error occurs or a signal arrives."""
    while True:
        if state.received is not None:
            if debug:
                _message("interrupted by a signal")
            return 1
        _write_stderr(prompt)
        try:
            line = read_line(0, state)
        except _Interrupted:
            continue
        except OSError as err:
            _message(f"read: {err.strerror}")
            return os.EX_UNAVAILABLE if err.errno == errno.EBADF else os.EX_IOERR
        if line:
            if debug:
                _message("got a line of input")
            if line.endswith(b"\n"):
                del line[-1]
            try:
                return _write_password(line)
            finally:
                line[:] = bytes(len(line))
        if debug:
            _message("end of input with nothing typed; asking again")
        _write_stderr(b"\n")


def run(options: Options) -> int:
    """Do the work after option parsing; returns the exit status (or dies by a signal)."""
    debug = options.debug
    if debug:
        _message("starting")
    try:
        if plymouth_running(debug):
            return 1
    except Exception as err:  # noqa: BLE001 - any failure to look means "do not prompt"
        _message(f"cannot check for {PLYMOUTH_DAEMON}: {err}")
        return 1

    if debug:
        _message("saving terminal attributes")
    try:
        saved = termios.tcgetattr(0)
    except termios.error as err:
        raise _terminal_error("tcgetattr", err) from None

    state = _SignalState()
    state.install()

    silent = list(saved)
    silent[3] = saved[3] & ~termios.ECHO
    if debug:
        _message("turning off echo")
    try:
        termios.tcsetattr(0, termios.TCSAFLUSH, silent)
    except termios.error as err:
        raise _terminal_error("tcsetattr", err) from None

    try:
        if debug:
            _message("waiting for input")
        status = prompt_loop(build_prompt(options, dict(os.environb)), state, debug)
    finally:
        # Whatever happened, the console must not be left without echo.
        if debug:
            _message("restoring terminal attributes")
        try:
            termios.tcsetattr(0, termios.TCSAFLUSH, saved)
        except termios.error as err:
            _message(f"tcsetattr: {err.args[-1]}")

    if state.received is not None:
        # Die by the signal so that the parent sees what happened.
        signal.signal(state.received, signal.SIG_DFL)
        signal.raise_signal(state.received)
    if status == os.EX_OK:
        _write_stderr(b"\n")  # the user's Enter was not echoed
    return status


def main(argv: list[str] | None = None) -> int:
    """Run password-prompt with *argv* (the arguments after the program name)."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        return run(parse_args(argv))
    except ExitNow as stop:
        return stop.status
    except KeyboardInterrupt:
        # SIGINT before our handlers were installed (Python's own handler
        # raised): the terminal is untouched, so just die by the signal.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
