"""plugin-runner's main sequence: options, privileges, plugins, output, fallback.

Exit status (after the fallback prompt where one is due): 0 when a plugin
won or every plugin failed; EX_USAGE, EX_CONFIG, EX_UNAVAILABLE, EX_OSERR or
EX_IOERR for the errors that led to the fallback.  A SIGTERM, SIGINT or
SIGHUP stops every plugin and then ends the runner by that same signal.
"""

import _signal
import os
import sys

from plugin_runner import fallback
from plugin_runner.options import (HelpRequested, Settings, UsageError, parse,
                                   read_config_tokens, warn)
from plugin_runner.privileges import drop
from plugin_runner.scan import scan
from mandos.process import original_environment
from plugin_runner.supervise import Supervisor, write_all

TERMINATING_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


class _Interrupted(Exception):
    """A terminating signal arrived while the fallback prompt was waiting."""


class _Signals:
    """Record the first terminating signal; wake the supervision loop."""

    def __init__(self) -> None:
        self.received = 0
        self.interrupt_prompt = False
        self.ignored = frozenset(signum for signum in TERMINATING_SIGNALS
                                 if _signal.getsignal(signum) == _signal.SIG_IGN)
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.wakeup_fd = read_fd
        _signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # A Python-level handler is needed for SIGCHLD to reach the pipe.
        _signal.signal(_signal.SIGCHLD, self._on_child)
        for signum in TERMINATING_SIGNALS:
            if signum not in self.ignored:
                _signal.signal(signum, self._on_terminate)

    def _on_child(self, signum, frame) -> None:
        pass

    def _on_terminate(self, signum, frame) -> None:
        if not self.received:
            self.received = signum
        if self.interrupt_prompt:
            raise _Interrupted()

    def die_if_received(self) -> None:
        """Re-raise the recorded signal with its default action."""
        if self.received:
            _signal.signal(self.received, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [self.received])
            os.kill(os.getpid(), self.received)


def _usage_error(message: str, source: str | None = None) -> None:
    where = f"{source}: " if source else ""
    warn(f"{where}{message}")
    sys.stderr.write("Try `plugin-runner --help' or `plugin-runner --usage' "
                     "for more information.\n")


def parse_all(argv: list[str], settings: Settings) -> int:
    """Command line (for --config-file), then the file, then the command line.

    Returns 0 or the exit status of the error; HelpRequested propagates.
    """
    try:
        parse(argv, settings, only_config_file=True)
    except UsageError as err:
        _usage_error(str(err))
        return os.EX_USAGE
    try:
        tokens = read_config_tokens(settings.config_file)
    except OSError as err:
        warn(f"Cannot read {settings.config_file}: {err.strerror}")
        return os.EX_OSERR
    if tokens:
        try:
            parse(tokens, settings)
        except UsageError as err:
            _usage_error(str(err), settings.config_file)
            return os.EX_CONFIG
    try:
        parse(argv, settings)
    except UsageError as err:
        _usage_error(str(err))
        return os.EX_USAGE
    # Always set, and it overrides any --global-env of the same name.
    settings.global_record.env["MANDOSPLUGINHELPERDIR"] = settings.helper_dir
    return 0


def _debug_dump(settings: Settings, debug) -> None:
    for record in [settings.global_record, *settings.plugins.values()]:
        label = "Global" if record is settings.global_record else record.name
        debug(f"Plugin: {label} has {len(record.args)} arguments")
        for arg in record.args:
            debug(f"\t{arg}")
        debug(f"...and {len(record.env)} environment variables")
        for var, value in record.env.items():
            debug(f"\t{var}={value}")


def main(argv: list[str] | None = None) -> int:
    """Run plugin-runner; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    settings = Settings()
    try:
        status = parse_all(argv, settings)
    except HelpRequested as request:
        sys.stdout.write(request.text)
        sys.stdout.flush()
        return 0

    def debug(message: str, always: bool = False) -> None:
        if always or settings.debug:
            warn(message)

    signals = _Signals()
    supervisor = None
    winner_written = False
    try:
        if status == 0:
            _debug_dump(settings, debug)
            inherited_env = original_environment()
            privileges = drop(settings.uid, settings.gid, warn)
            supervisor = Supervisor(settings, privileges, signals.wakeup_fd, debug,
                                    inherited_env, signals.ignored)
            status = _run_plugins(settings, supervisor, signals, debug)
            winner_written = status is None
            if winner_written:
                status = 0
    finally:
        if supervisor is not None:
            supervisor.shutdown()
    signals.die_if_received()
    if winner_written:
        return status
    return _fallback(status, signals)


def _run_plugins(settings: Settings, supervisor: Supervisor, signals: _Signals,
                 debug) -> int | None:
    """Start and watch the plugins; None once a password was written."""
    try:
        dir_fd = os.open(settings.plugin_dir, os.O_RDONLY)
    except OSError as err:
        warn(f"Could not open plugin dir {settings.plugin_dir}: {err.strerror}")
        return os.EX_UNAVAILABLE
    try:
        candidates = scan(dir_fd, settings, debug)
    except OSError as err:
        warn(f"Could not read plugin dir {settings.plugin_dir}: {err.strerror}")
        return os.EX_OSERR
    finally:
        os.close(dir_fd)
    for number, candidate in enumerate(candidates):
        try:
            supervisor.start(candidate)
        except OSError as err:
            warn(f"Could not start plugin {candidate.name}: {err.strerror}")
            for later in candidates[number:]:
                os.close(later.fd)
            return os.EX_OSERR
    if not supervisor.plugins:
        warn("No plugin processes started. Incorrect plugin directory?")
        return 0
    winner = supervisor.run_until_winner(lambda: signals.received)
    if winner is None:
        return 0
    password = b"".join(winner.output)
    winner.output.clear()
    debug(f"Plugin {winner.name} succeeded")
    try:
        write_all(1, password)
    except OSError as err:
        warn(f"Could not write the password: {err.strerror}")
        return os.EX_IOERR
    finally:
        del password
    _close_stdout()
    return None


def _close_stdout() -> None:
    """Let the reader (cryptsetup) see end-of-file before the losers are reaped."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    os.dup2(devnull, 1)
    os.close(devnull)


def _fallback(status: int, signals: _Signals) -> int:
    warn("Going to fallback mode: asking for the password on the terminal")
    signals.interrupt_prompt = True
    try:
        if signals.received:
            raise _Interrupted()
        password = fallback.read_password()
    except _Interrupted:
        signals.die_if_received()
        return os.EX_IOERR
    finally:
        signals.interrupt_prompt = False
    try:
        write_all(1, password)
    except OSError as err:
        warn(f"Could not write the password: {err.strerror}")
        return os.EX_IOERR
    return status
