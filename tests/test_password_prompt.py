"""password-prompt (CLIENT.md section 5).

Most tests run the real program with standard input and standard error on a
pseudo-terminal (made its controlling terminal, as a console would be) and
standard output on a pipe, so that the prompt and the password can be told
apart.  Pure functions (option parsing, prompt text) are also tested directly.
"""

import fcntl
import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import termios
import time
from pathlib import Path

import pytest

from mandos import __version__
from mandos.plugins import password_prompt
from mandos.plugins.password_prompt import ExitNow, Options, build_prompt, parse_args

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins.d" / "password-prompt"
DEFAULT_PROMPT = b"Enter passphrase to unlock the disk: "
TIMEOUT = 5.0


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any crypttab variables, plus *extra*."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("CRYPTTAB_", "cryptsource", "crypttarget"))}
    env.update(extra)
    return env


class Console:
    """A program with stdin and stderr on a pseudo-terminal, stdout on a pipe."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None,
                 ignore: tuple[int, ...] = ()) -> None:
        self.master, slave = pty.openpty()

        def child_setup() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # so that ^C means SIGINT
            for signum in ignore:
                signal.signal(signum, signal.SIG_IGN)

        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=subprocess.PIPE, stderr=slave,
            env=clean_env() if env is None else env,
            start_new_session=True, preexec_fn=child_setup)
        os.close(slave)
        self.transcript = b""  # everything the program wrote to the terminal
        self._unread = 0       # start of the part expect() has not consumed

    def _read(self, timeout: float) -> bool:
        """Read what is available on the terminal; False at its end."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every slave descriptor is closed
            return False
        self.transcript += data
        return bool(data)

    def expect(self, text: bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait for *text* on the terminal; return the output up to and including it."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.transcript.find(text, self._unread)
            if found >= 0:
                start, self._unread = self._unread, found + len(text)
                return self.transcript[start:self._unread]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.1)) and self.proc.poll() is not None:
                raise AssertionError(f"{text!r} not seen; terminal had {self.transcript!r}")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def echo(self) -> bool:
        """Whether the terminal's ECHO flag is set (the master reports the slave's)."""
        return bool(termios.tcgetattr(self.master)[3] & termios.ECHO)

    def alive_after(self, seconds: float) -> bool:
        time.sleep(seconds)
        return self.proc.poll() is None

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, bytes, bytes]:
        """Wait for the end; return (status, stdout, terminal output not yet expected)."""
        out, _ = self.proc.communicate(timeout=timeout)
        while self._read(0.05) and select.select([self.master], [], [], 0)[0]:
            pass
        return self.proc.returncode, out, self.transcript[self._unread:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        os.close(self.master)


@pytest.fixture
def console():
    """Factory for Console objects that are cleaned up after the test."""
    started: list[Console] = []

    def start(*args: str, env: dict[str, str] | None = None, program: Path = PLUGIN,
              ignore: tuple[int, ...] = ()) -> Console:
        started.append(Console([str(program), *args], env=env, ignore=ignore))
        return started[-1]

    yield start
    for each in started:
        each.close()


@pytest.fixture
def original(debian_peers: Path) -> Path:
    path = debian_peers / "usr/lib/x86_64-linux-gnu/mandos/plugins.d/password-prompt"
    assert path.is_file()
    return path


# --- prompt text -----------------------------------------------------------

PROMPT_TABLE = [
    ({}, DEFAULT_PROMPT),
    ({"CRYPTTAB_NAME": "root"}, b"Unlocking the disk (root)\r\nEnter passphrase: "),
    ({"CRYPTTAB_SOURCE": "/dev/sda2"}, b"Unlocking the disk /dev/sda2\r\nEnter passphrase: "),
    ({"CRYPTTAB_SOURCE": "/dev/sda2", "CRYPTTAB_NAME": "root"},
     b"Unlocking the disk /dev/sda2 (root)\r\nEnter passphrase: "),
]


@pytest.mark.parametrize("env,prompt", PROMPT_TABLE, ids=["none", "target", "source", "both"])
def test_prompt_table(console, env: dict[str, str], prompt: bytes) -> None:
    con = console(env=clean_env(**env))
    assert con.expect(b": ") == prompt
    con.send(b"pw\n")
    assert con.finish() == (0, b"pw", b"\r\n")


@pytest.mark.parametrize("env,prompt", [
    ({"cryptsource": "/dev/old", "crypttarget": "oldname"},
     b"Unlocking the disk /dev/old (oldname)\r\nEnter passphrase: "),
    ({"cryptsource": "/dev/old", "CRYPTTAB_NAME": "new"},
     b"Unlocking the disk /dev/old (new)\r\nEnter passphrase: "),
    ({"CRYPTTAB_SOURCE": "/dev/new", "cryptsource": "/dev/old", "crypttarget": "oldname"},
     b"Unlocking the disk /dev/new (oldname)\r\nEnter passphrase: "),
], ids=["legacy-both", "legacy-source", "new-wins"])
def test_legacy_variables_used_when_crypttab_ones_unset(console, env, prompt) -> None:
    con = console(env=clean_env(**env))
    assert con.expect(b": ") == prompt


def test_set_but_empty_variable_counts_as_set(console) -> None:
    con = console(env=clean_env(CRYPTTAB_SOURCE="", cryptsource="/dev/old"))
    assert con.expect(b": ") == b"Unlocking the disk \r\nEnter passphrase: "


@pytest.mark.parametrize("args", [
    ["--prefix=PFX"], ["--prefix", "PFX"], ["-p", "PFX"], ["-pPFX"], ["--pre", "PFX"],
    ["--pref=PFX"], ["-p", "ignored", "--prefix", "PFX"],
], ids=["long=", "long", "short", "short-joined", "abbrev", "abbrev=", "last-wins"])
def test_prefix_and_space_come_first(console, args: list[str]) -> None:
    con = console(*args, env=clean_env(CRYPTTAB_NAME="root"))
    assert con.expect(b": ") == b"PFX Unlocking the disk (root)\r\nEnter passphrase: "


def test_prompt_option_overrides_crypttab_variables(console) -> None:
    env = clean_env(CRYPTTAB_SOURCE="/dev/sda2", CRYPTTAB_NAME="root", cryptsource="x")
    con = console("--prompt", "Say the word", "-p", "[boot]", env=env)
    assert con.expect(b": ") == b"[boot] Say the word: "
    con.send(b"word\n")
    assert con.finish() == (0, b"word", b"\r\n")


def test_build_prompt_keeps_undecodable_bytes() -> None:
    env = {b"CRYPTTAB_SOURCE": b"/dev/\xff", b"CRYPTTAB_NAME": b"n\xfe"}
    assert build_prompt(Options(), env) == b"Unlocking the disk /dev/\xff (n\xfe)\nEnter passphrase: "


# --- reading ------------------------------------------------------------------

def test_password_without_its_newline_and_echo_off_while_reading(console) -> None:
    con = console()
    assert con.expect(DEFAULT_PROMPT)
    assert not con.echo()
    con.send(b"pass word \x01\xc3\xa9\n")
    assert con.finish() == (0, b"pass word \x01\xc3\xa9", b"\r\n")
    assert con.echo()


def test_empty_line_is_an_empty_password(console) -> None:
    con = console()
    con.expect(DEFAULT_PROMPT)
    con.send(b"\n")
    assert con.finish() == (0, b"", b"\r\n")


def test_end_of_file_after_some_input_ends_the_password(console) -> None:
    con = console()
    con.expect(DEFAULT_PROMPT)
    con.send(b"abc\x04")  # ^D hands over "abc" without a newline
    assert con.alive_after(0.2), "must wait for the line to be finished"
    con.send(b"def\x04")
    con.send(b"\x04")     # end-of-file now ends the line
    assert con.finish() == (0, b"abcdef", b"\r\n")


def test_end_of_file_with_nothing_typed_asks_again(console) -> None:
    con = console("-p", "P")
    con.expect(b"P " + DEFAULT_PROMPT)
    con.send(b"\x04")
    assert con.expect(DEFAULT_PROMPT) == b"\r\nP " + DEFAULT_PROMPT
    con.send(b"\x04")
    assert con.expect(DEFAULT_PROMPT) == b"\r\nP " + DEFAULT_PROMPT
    con.send(b"second try\n")
    assert con.finish() == (0, b"second try", b"\r\n")


def test_stdin_not_a_terminal_is_unavailable() -> None:
    result = subprocess.run([str(PLUGIN)], stdin=subprocess.DEVNULL,
                            capture_output=True, env=clean_env(), timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (os.EX_UNAVAILABLE, b"")
    assert result.stderr.startswith(b"Mandos plugin password-prompt: ")


def test_started_by_descriptor_names_itself_after_its_file() -> None:
    """plugin-runner may execute a script by descriptor: argv[0] is then /dev/fd/N."""
    start = ("import os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); os.set_inheritable(fd, True);"
             "os.execv(f'/dev/fd/{fd}', [sys.argv[1]])")
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", start, str(PLUGIN)],
                            stdin=subprocess.DEVNULL, capture_output=True, env=clean_env(),
                            timeout=TIMEOUT)
    assert result.returncode == os.EX_UNAVAILABLE
    assert result.stderr.startswith(b"Mandos plugin password-prompt: ")


def test_stdin_closed_is_unavailable() -> None:
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c",
         "import os, sys; os.close(0); os.execv(sys.argv[1], sys.argv[1:])", str(PLUGIN)],
        capture_output=True, env=clean_env(), timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (os.EX_UNAVAILABLE, b"")


def test_broken_pipe_is_ioerr_and_restores_echo(console) -> None:
    """Deviation: the original dies by SIGPIPE here and leaves echo off."""
    con = console()
    con.proc.stdout.close()  # the reader goes away: writing fails with EPIPE
    con.expect(DEFAULT_PROMPT)
    con.send(b"pw\n")
    status, _, _ = con.finish()
    assert status == os.EX_IOERR
    assert con.echo()


def test_full_output_is_ioerr() -> None:
    con = Console(["sh", "-c", 'exec "$0" > /dev/full', str(PLUGIN)])
    try:
        con.expect(DEFAULT_PROMPT)
        con.send(b"pw\n")
        status, _, terminal = con.finish()
    finally:
        con.close()
    assert status == os.EX_IOERR
    assert b"Mandos plugin password-prompt: " in terminal


# --- signals ------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_while_waiting_restores_echo_and_dies_by_it(console, signum: int) -> None:
    con = console()
    con.expect(DEFAULT_PROMPT)
    assert not con.echo()
    con.proc.send_signal(signum)
    status, out, _ = con.finish()
    assert (status, out) == (-signum, b"")
    assert con.echo()


def test_signal_right_after_the_prompt_is_not_lost(console) -> None:
    """Deviation: the original may miss a signal that arrives before its read starts."""
    for _ in range(10):
        con = console()
        con.expect(DEFAULT_PROMPT)
        con.proc.send_signal(signal.SIGTERM)
        assert con.finish(timeout=2)[0] == -signal.SIGTERM
        assert con.echo()


def test_control_c_on_the_console_interrupts(console) -> None:
    con = console()
    con.expect(DEFAULT_PROMPT)
    con.send(b"half a pass")
    con.send(b"\x03")
    status, out, _ = con.finish()
    assert (status, out) == (-signal.SIGINT, b"")
    assert con.echo()


def test_signal_ignored_at_start_stays_ignored(console) -> None:
    con = console(ignore=(signal.SIGINT,))
    con.expect(DEFAULT_PROMPT)
    con.send(b"\x03")
    con.proc.send_signal(signal.SIGINT)
    assert con.alive_after(0.2)
    con.send(b"pw\n")
    assert con.finish()[:2] == (0, b"pw")


def test_echo_check_detects_a_process_killed_without_cleanup(console) -> None:
    """Control for the echo checks above: SIGKILL cannot restore the terminal."""
    con = console()
    con.expect(DEFAULT_PROMPT)
    con.proc.kill()
    assert con.finish()[0] == -signal.SIGKILL
    assert not con.echo()


# --- conflict with Plymouth ---------------------------------------------------------

def test_running_plymouthd_means_exit_1_printing_nothing(console, public_tmp: Path) -> None:
    fake = public_tmp / "plymouthd"
    shutil.copy("/bin/sleep", fake)
    daemon = subprocess.Popen([str(fake), "30"])
    try:
        con = console("--prompt", "never shown")
        status, out, terminal = con.finish()
    finally:
        daemon.kill()
        daemon.wait()
    assert (status, out, terminal) == (1, b"", b"")


def test_process_merely_containing_plymouthd_is_no_conflict(console, public_tmp: Path) -> None:
    fake = public_tmp / "plymouthd-not"
    shutil.copy("/bin/sleep", fake)
    daemon = subprocess.Popen([str(fake), "30"])
    try:
        con = console()
        con.expect(DEFAULT_PROMPT)
    finally:
        daemon.kill()
        daemon.wait()


@pytest.mark.parametrize("pid_file", [True, False], ids=["pid-file", "control"])
def test_plymouth_pid_file_means_exit_1_printing_nothing(console, pid_file: bool) -> None:
    """/run is replaced by a tmpfs in a private mount namespace; the host's is untouched."""
    setup = "mount -t tmpfs tmpfs /run && mkdir /run/plymouth"
    if pid_file:
        setup += " && echo 4242 > /run/plymouth/pid"
    script = f"set -e; {setup}; exec {shlex.quote(str(PLUGIN))}"
    con = Console(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                  env=clean_env())
    try:
        if pid_file:
            assert con.finish() == (1, b"", b"")
        else:
            con.expect(DEFAULT_PROMPT)
            con.send(b"pw\n")
            assert con.finish()[:2] == (0, b"pw")
    finally:
        con.close()


def test_failure_to_list_processes_means_exit_1(monkeypatch, capfd) -> None:
    import psutil

    def broken(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "/proc")

    monkeypatch.setattr(password_prompt, "PLYMOUTH_PID_FILE", "/nonexistent/pid")
    monkeypatch.setattr(psutil, "process_iter", broken)
    assert password_prompt.run(Options()) == 1
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("Mandos plugin ")


# --- debug ----------------------------------------------------------------------

def test_debug_messages_never_show_the_password(console) -> None:
    con = console("--debug")
    con.expect(DEFAULT_PROMPT)
    con.send(b"Sw0rdf1sh-unique\n")
    status, out, _ = con.finish()
    assert (status, out) == (0, b"Sw0rdf1sh-unique")
    assert b"Mandos plugin password-prompt: " in con.transcript
    assert b"Sw0rdf1sh" not in con.transcript


# --- command line ------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--bogus"], ["-x"], ["--prompt"], ["-p"], ["--pr", "x"], ["--debug=1"],
    ["extra"], ["--", "extra"], ["--help=x"],
], ids=["unknown-long", "unknown-short", "prompt-no-arg", "prefix-no-arg", "ambiguous",
        "debug-arg", "operand", "operand-after-dashes", "help-arg"])
def test_bad_command_line_exits_64(args: list[str]) -> None:
    result = subprocess.run([str(PLUGIN), *args], stdin=subprocess.DEVNULL,
                            capture_output=True, env=clean_env(), timeout=TIMEOUT)
    assert (result.returncode, result.stdout) == (os.EX_USAGE, b"")
    assert result.stderr


@pytest.mark.parametrize("args,expected", [
    (["--help"], b"--prefix=PREFIX"), (["-?"], b"--prompt=PROMPT"), (["--he"], b"--debug"),
    (["--usage"], b"Usage: password-prompt"), (["--version"], f"password-prompt {__version__}\n"),
    (["-V"], f"password-prompt {__version__}\n"), (["--debug", "-V", "--bogus"], b"password-prompt"),
], ids=["help", "short-help", "abbrev-help", "usage", "version", "short-version", "in-order"])
def test_help_usage_version_print_on_stdout_and_exit_64(args, expected) -> None:
    expected = expected.encode() if isinstance(expected, str) else expected
    result = subprocess.run([str(PLUGIN), *args], stdin=subprocess.DEVNULL,
                            capture_output=True, env=clean_env(), timeout=TIMEOUT)
    assert result.returncode == os.EX_USAGE
    assert expected in result.stdout
    assert result.stderr == b""


def test_version_is_exactly_name_and_version() -> None:
    result = subprocess.run([str(PLUGIN), "--version"], capture_output=True, timeout=TIMEOUT)
    assert result.stdout == f"password-prompt {__version__}\n".encode()


@pytest.mark.parametrize("args,prefix,prompt,debug", [
    ([], None, None, False),
    (["--prefix=a", "--prompt", "b", "--debug"], "a", "b", True),
    (["-pa", "--prom=b"], "a", "b", False),
    (["-p", "", "--prompt="], "", "", False),
    (["-p", "-x"], "-x", None, False),  # an option's argument may start with "-"
    (["--prefix", "--debug"], "--debug", None, False),
])
def test_parse_args(args, prefix, prompt, debug) -> None:
    options = parse_args(args)
    assert (options.prefix, options.prompt, options.debug) == (prefix, prompt, debug)


def test_parse_args_stops_at_the_first_error_in_order(capfd) -> None:
    with pytest.raises(ExitNow) as stop:
        parse_args(["--bogus", "--help"])
    assert stop.value.status == os.EX_USAGE
    captured = capfd.readouterr()
    assert captured.out == ""
    assert "--bogus" in captured.err


def test_imports_stay_cheap() -> None:
    """psutil is only imported when the Plymouth check runs, not at import time."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "import mandos.plugins.password_prompt;"
            "print(sorted(m for m in ('psutil', 'argparse', 'logging', 're') if m in sys.modules))")
    result = subprocess.run(["/usr/bin/python3", "-I", "-c", code, str(REPO)],
                            capture_output=True, text=True, timeout=TIMEOUT, check=True)
    assert result.stdout == "[]\n"
    assert password_prompt.PLYMOUTH_PID_FILE == "/run/plymouth/pid"


# --- against the original ----------------------------------------------------------

def _session(con: Console, steps: list[bytes]) -> tuple[int, bytes, bytes]:
    """Feed *steps* to *con*, each after the next prompt; return status, stdout, terminal."""
    for step in steps:
        con.expect(b": ")
        con.send(step)
    status, out, _ = con.finish()
    return status, out, con.transcript


@pytest.mark.interop
@pytest.mark.parametrize("args,env,steps", [
    ([], {}, [b"secret\n"]),
    (["--prefix", "P"], {"CRYPTTAB_SOURCE": "/dev/vda1", "CRYPTTAB_NAME": "root"}, [b"s e c\n"]),
    ([], {"cryptsource": "/dev/old", "crypttarget": "old"}, [b"x\n"]),
    (["--prompt", "Q", "-pP"], {"CRYPTTAB_NAME": "root"}, [b"\n"]),
    ([], {"CRYPTTAB_NAME": ""}, [b"\x04", b"\x04", b"third\n"]),
    ([], {}, [b"\x01\x7f\xff\n"]),
], ids=["plain", "prefix-both", "legacy", "prompt-empty", "eof-retry", "odd-bytes"])
def test_same_as_original(console, original: Path, args, env, steps) -> None:
    theirs = _session(console(*args, env=clean_env(**env), program=original), steps)
    mine = _session(console(*args, env=clean_env(**env)), steps)
    assert mine == theirs
    assert mine[0] == 0


@pytest.mark.interop
def test_same_as_original_on_sigterm(console, original: Path) -> None:
    results = []
    for program in (original, PLUGIN):
        con = console(program=program)
        con.expect(DEFAULT_PROMPT)
        # The original can miss a signal that comes before its read() starts.
        time.sleep(0.3)
        con.proc.send_signal(signal.SIGTERM)
        results.append(con.finish()[:2] + (con.echo(),))
    assert results[0] == results[1] == (-signal.SIGTERM, b"", True)


@pytest.mark.interop
@pytest.mark.parametrize("args", [["--version"], ["--usage"], ["--bogus"], ["x"], ["--pr", "x"]])
def test_same_status_as_original_for_command_line(original: Path, args: list[str]) -> None:
    statuses = [subprocess.run([str(program), *args], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=TIMEOUT).returncode
                for program in (original, PLUGIN)]
    assert statuses[0] == statuses[1] == os.EX_USAGE


@pytest.mark.interop
def test_same_status_as_original_on_write_error(original: Path) -> None:
    statuses = []
    for program in (original, PLUGIN):
        con = Console(["sh", "-c", 'exec "$0" > /dev/full', str(program)])
        try:
            con.expect(DEFAULT_PROMPT)
            con.send(b"pw\n")
            statuses.append(con.finish()[0])
            assert con.echo()
        finally:
            con.close()
    assert statuses == [os.EX_IOERR, os.EX_IOERR]


@pytest.mark.interop
def test_works_as_a_plugin_of_the_original_plugin_runner(console, debian_peers: Path,
                                                         public_tmp: Path) -> None:
    """Started by descriptor, as user 65534, with options from the runner."""
    plugin_dir = public_tmp / "plugins.d"
    plugin_dir.mkdir()
    (plugin_dir / "password-prompt").symlink_to(PLUGIN)
    config = public_tmp / "plugin-runner.conf"
    config.write_text("")
    runner = debian_peers / "usr/lib/x86_64-linux-gnu/mandos/plugin-runner"
    con = console(f"--plugin-dir={plugin_dir}", f"--config-file={config}",
                  "--options-for=password-prompt:--prefix=[runner]", program=runner)
    assert con.expect(b": ") == b"[runner] " + DEFAULT_PROMPT
    con.send(b"via the runner\n")
    status, out, _ = con.finish()
    assert (status, out) == (0, b"via the runner")
    assert con.echo()
