"""Functional tests of plugin-runner (spec: CLIENT.md section 1).

Every test runs ``bin/plugin-runner`` as a real process, with plugins that
are small shell or Python scripts in a temporary plugin directory.  The
tests run as root, so by default the runner drops to uid/gid 65534 before
it opens the plugin directory: plugin directories and files therefore live
below ``public_tmp`` with mode 0755, and files plugins write go to a
world-writable ``state`` folder.

Each runner process gets its own session (no controlling terminal), so the
fallback prompt reads standard input instead of a terminal; the tests give
it a pipe, at end of file unless a test types a password into it.

Every run checks that the recognizable test passwords never appear on the
runner's standard error.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pexpect
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "bin" / "plugin-runner"

# (conftest.py puts the repository root on sys.path)
from plugin_runner.supervise import KILL_GRACE_SECONDS, MAX_OUTPUT  # noqa: E402

# Passwords that must never show up on the runner's standard error.
SECRET = b"Pl4in-Secret-From-Plugin-93a7"
TYPED = b"Typed-Fallback-Secret-5e21"

NO_CONFIG = "/nonexistent/plugin-runner.conf"
NOBODY = 65534
OTHER_UID = 4242
OTHER_GID = 4243

EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_OSERR = 71
EX_IOERR = 74
EX_CONFIG = 78


# ---------------------------------------------------------------------------
# Helpers


class Result:
    """What one run of plugin-runner produced."""

    def __init__(self, returncode: int, stdout: bytes, stderr: str, elapsed: float) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.elapsed = elapsed

    def json(self):
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return (f"Result(returncode={self.returncode}, stdout={self.stdout[:200]!r}, "
                f"stderr={self.stderr[-2000:]!r}, elapsed={self.elapsed:.2f})")


def assert_no_password_in(stderr: str) -> None:
    """The runner never prints a password on standard error."""
    for secret in (SECRET, TYPED):
        assert secret.decode() not in stderr, f"password leaked on stderr: {stderr!r}"


def runner_argv(args, plugin_dir=None, config=NO_CONFIG) -> list[str]:
    argv = [str(RUNNER)]
    if config is not None:
        argv.append(f"--config-file={config}")
    if plugin_dir is not None:
        argv.append(f"--plugin-dir={plugin_dir}")
    return argv + [str(arg) for arg in args]


def default_signals(then=None):
    """A preexec_fn giving the child default dispositions for the signals
    a shell ignores in background jobs (so results do not depend on how the
    test run was started), then running ``then``."""
    def preexec() -> None:
        for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        if then is not None:
            then()
    return preexec


def run(*args, plugin_dir=None, config=NO_CONFIG, stdin: bytes = b"", env=None,
        preexec_fn=None, timeout: float = 15, stdout=subprocess.PIPE) -> Result:
    """Run plugin-runner with ``args`` and return its Result.

    ``--config-file`` always points at a nonexistent file unless ``config``
    says otherwise (None: no --config-file at all), so that the host's
    configuration is never read.  The runner runs in a new session, so it
    has no controlling terminal; its standard input is a pipe carrying
    ``stdin`` and then end of file.  Standard error goes to a file, since
    plugins (and their children) inherit it and may outlive the runner.
    """
    argv = runner_argv(args, plugin_dir, config)
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=stdout, stderr=err,
                                env=env, start_new_session=True,
                                preexec_fn=default_signals(preexec_fn))
        try:
            out, _ = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            err.seek(0)
            raise AssertionError(f"plugin-runner did not finish within {timeout} s; "
                                 f"stderr: {err.read()!r}") from None
        elapsed = time.monotonic() - started
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    assert_no_password_in(stderr)
    return Result(proc.returncode, out or b"", stderr, elapsed)


def write_plugin(directory: Path, name: str, text: str, mode: int = 0o755) -> Path:
    """Create an executable plugin file ``name`` in ``directory``."""
    path = directory / name
    path.write_text(text)
    os.chmod(path, mode)
    return path


def sh(body: str) -> str:
    """A /bin/sh plugin with the (dedented) ``body``."""
    return "#!/bin/sh\n" + textwrap.dedent(body).lstrip("\n")


def py(body: str) -> str:
    """A Python plugin with the (dedented) ``body``."""
    return "#!/usr/bin/python3 -IS\n" + textwrap.dedent(body).lstrip("\n")


def secret_plugin(directory: Path, name: str = "good", delay: float = 0.0,
                  output: bytes = SECRET) -> Path:
    """A plugin that prints ``output`` after ``delay`` seconds and exits 0."""
    wait = f"sleep {delay}\n" if delay else ""
    return write_plugin(directory, name, sh(f"{wait}printf '%s' '{output.decode()}'\n"))


def failing_plugin(directory: Path, name: str, code: int = 1,
                   output: str = "not-the-password") -> Path:
    return write_plugin(directory, name, sh(f"printf '%s' '{output}'\nexit {code}\n"))


# A plugin that prints, as JSON, what it was started with.
PROBE = py("""
    import json, os, sys

    def status(pid="self"):
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.split()
        return fields

    me, parent = status(), status(os.getppid())
    sys.stdout.write(json.dumps({
        "args": sys.argv[1:],
        "env": dict(os.environ),
        "uid": [int(n) for n in me["Uid"]],
        "gid": [int(n) for n in me["Gid"]],
        "groups": [int(n) for n in me["Groups"]],
        "parent_uid": [int(n) for n in parent["Uid"]],
        "parent_gid": [int(n) for n in parent["Gid"]],
        "parent_groups": [int(n) for n in parent["Groups"]],
    }))
""")


def probe_plugin(directory: Path, name: str = "probe", mode: int = 0o755) -> Path:
    return write_plugin(directory, name, PROBE, mode)


def logging_plugin(directory: Path, name: str, log: Path, code: int = 1) -> Path:
    """A plugin that appends its name and PID to ``log`` and exits ``code``."""
    return write_plugin(directory, name,
                        sh(f"printf '%s %s\\n' '{name}' $$ >> '{log}'\nexit {code}\n"))


def started_names(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [line.rsplit(" ", 1)[0] for line in log.read_text().splitlines()]


def started_pids(log: Path) -> dict[str, int]:
    return {line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
            for line in log.read_text().splitlines()}


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return data.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def lines_with(stderr: str, *words: str) -> list[str]:
    """The stderr lines that contain every one of ``words``."""
    return [line for line in stderr.splitlines() if all(w in line for w in words)]


def as_user(uid: int, gid: int, groups=()):
    """A preexec_fn that makes the child an unprivileged user."""
    def switch() -> None:
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return switch


@pytest.fixture
def plugins(public_tmp: Path) -> Path:
    """An empty plugin directory readable by the plugin user."""
    path = public_tmp / "plugins.d"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def state(public_tmp: Path) -> Path:
    """A folder where plugins (running as uid 65534) can write files."""
    path = public_tmp / "state"
    path.mkdir()
    os.chmod(path, 0o777)
    return path


@pytest.fixture
def probe(plugins: Path) -> Path:
    """The plugin directory holding only the probe plugin ``probe``."""
    probe_plugin(plugins)
    return plugins


@pytest.fixture
def args_plugin(plugins: Path) -> Path:
    """A plugin ``p`` that prints each of its arguments as ``[arg]``."""
    write_plugin(plugins, "p", sh("""printf '[%s]' "$@"\n"""))
    return plugins


# ---------------------------------------------------------------------------
# 1.2 Options: one test per row of the option table, in every syntax form


def forms(long: str, short: str | None, value: str, prefix: str | None = None):
    """Every way GNU getopt accepts an option with a value, as pytest params."""
    found = [pytest.param([f"--{long}={value}"], id=f"--{long}=v"),
             pytest.param([f"--{long}", value], id=f"--{long} v")]
    if prefix:
        found += [pytest.param([f"--{prefix}={value}"], id=f"--{prefix}=v"),
                  pytest.param([f"--{prefix}", value], id=f"--{prefix} v")]
    if short:
        found += [pytest.param([f"-{short}{value}"], id=f"-{short}v"),
                  pytest.param([f"-{short}", value], id=f"-{short} v")]
    return found


@pytest.mark.parametrize("option", forms("global-options", "g", "one,two", "global-o"))
def test_global_options_are_given_to_every_plugin(plugins, state, option):
    """--global-options/-g: comma-separated arguments for every plugin."""
    log = state / "log"
    for name in ("first", "second"):
        write_plugin(plugins, name, sh(f"""printf '%s:[%s]\\n' {name} "$*" >> '{log}'\n"""
                                       "exit 1\n"))
    result = run(*option, plugin_dir=plugins)
    assert result.returncode == 0
    assert sorted(log.read_text().splitlines()) == ["first:[one two]", "second:[one two]"]


@pytest.mark.parametrize("option", forms("global-env", "G", "MYVAR=my value", "global-e"))
def test_global_env_is_given_to_every_plugin(probe, option):
    """--global-env/-G: an environment assignment for every plugin."""
    result = run(*option, plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["env"]["MYVAR"] == "my value"


@pytest.mark.parametrize("option", forms("options-for", "o", "probe:one,two", "options"))
def test_options_for_gives_arguments_to_one_plugin(probe, option):
    """--options-for/-o: arguments only for the named plugin."""
    result = run(*option, plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["args"] == ["one", "two"]


def test_options_for_other_plugin_not_given(probe):
    """--options-for arguments go to the named plugin only."""
    result = run("-o", "other:x", plugin_dir=probe)
    assert result.json()["args"] == []


@pytest.mark.parametrize("option", forms("env-for", "E", "probe:MYVAR=mine", "env"))
def test_env_for_gives_environment_to_one_plugin(probe, option):
    """--env-for/-E: an environment assignment only for the named plugin."""
    result = run(*option, plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["env"]["MYVAR"] == "mine"


def test_env_for_other_plugin_not_given(probe):
    """--env-for assignments go to the named plugin only."""
    result = run("-E", "other:MYVAR=x", plugin_dir=probe)
    assert "MYVAR" not in result.json()["env"]


@pytest.mark.parametrize("option", forms("disable", "d", "good", "dis"))
def test_disable_keeps_plugin_from_starting(plugins, state, option):
    """--disable/-d PLUGIN: the plugin is not started (here: fallback runs)."""
    log = state / "log"
    logging_plugin(plugins, "good", log, code=0)
    result = run(*option, plugin_dir=plugins, stdin=TYPED)
    assert started_names(log) == []
    assert result.stdout == TYPED
    assert result.returncode == 0


@pytest.mark.parametrize("option", forms("enable", "e", "good", "ena"))
def test_enable_undoes_disable(plugins, option):
    """--enable/-e PLUGIN undoes an earlier --disable of PLUGIN."""
    secret_plugin(plugins, "good")
    result = run("--disable=good", *option, plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET


def test_disable_after_enable_disables(plugins, state):
    """The last of --enable/--disable for a plugin wins."""
    log = state / "log"
    logging_plugin(plugins, "good", log, code=0)
    run("--enable=good", "--disable=good", plugin_dir=plugins)
    assert started_names(log) == []


@pytest.mark.parametrize("option", forms("plugin-dir", None, "{dir}", "plugin-d"))
def test_plugin_dir_option(plugins, option):
    """--plugin-dir DIRECTORY: the directory the plugins are run from."""
    secret_plugin(plugins)
    result = run(*[part.format(dir=plugins) for part in option])
    assert result.returncode == 0
    assert result.stdout == SECRET


@pytest.mark.parametrize("option", forms("plugin-helper-dir", None, "/some/helpers",
                                         "plugin-h"))
def test_plugin_helper_dir_option(probe, option):
    """--plugin-helper-dir: exported to plugins as MANDOSPLUGINHELPERDIR."""
    result = run(*option, plugin_dir=probe)
    assert result.json()["env"]["MANDOSPLUGINHELPERDIR"] == "/some/helpers"


@pytest.mark.parametrize("option", forms("config-file", None, "{conf}", "conf"))
def test_config_file_option(probe, public_tmp, option):
    """--config-file FILE: extra options are read from FILE."""
    conf = public_tmp / "runner.conf"
    conf.write_text("--global-options=from-file\n")
    result = run(*[part.format(conf=conf) for part in option], plugin_dir=probe,
                 config=None)
    assert result.json()["args"] == ["from-file"]


@pytest.mark.parametrize("option", forms("userid", None, str(OTHER_UID), "use"))
def test_userid_option(probe, option):
    """--userid ID: the user ID the plugins run as."""
    result = run(*option, plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["uid"] == [OTHER_UID] * 4


@pytest.mark.parametrize("option", forms("groupid", None, str(OTHER_GID), "gr"))
def test_groupid_option(probe, option):
    """--groupid ID: the group ID the plugins run as."""
    result = run(*option, plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["gid"] == [OTHER_GID] * 4


@pytest.mark.parametrize("option", ["--debug", "--deb"])
def test_debug_option(plugins, option):
    """--debug: debug messages of the runner itself on standard error."""
    secret_plugin(plugins)
    quiet = run(plugin_dir=plugins)
    loud = run(option, plugin_dir=plugins)
    assert loud.returncode == quiet.returncode == 0
    assert loud.stdout == quiet.stdout == SECRET
    assert len(loud.stderr) > len(quiet.stderr)
    assert lines_with(loud.stderr, "good")


def test_debug_is_not_passed_to_plugins(probe):
    """--debug does not add --debug to the plugins' arguments."""
    assert run("--debug", plugin_dir=probe).json()["args"] == []


@pytest.mark.parametrize("option, expected", [
    (["--help"], r"^Usage: plugin-runner"),
    (["-?"], r"^Usage: plugin-runner"),
    (["--he"], r"^Usage: plugin-runner"),
    (["--usage"], r"^Usage: plugin-runner"),
    (["--usa"], r"^Usage: plugin-runner"),
    (["--version"], r"^plugin-runner \S+\n$"),
    (["-V"], r"^plugin-runner \S+\n$"),
    (["--vers"], r"^plugin-runner \S+\n$"),
    (["--debug", "-g", "x", "--help"], r"^Usage: plugin-runner"),
])
def test_help_usage_version_print_on_stdout_and_exit(plugins, state, option, expected):
    """--help/-?/--usage/--version/-V print on stdout and exit 0 at once,
    without running any plugin."""
    log = state / "log"
    logging_plugin(plugins, "marker", log, code=0)
    result = run(*option, plugin_dir=plugins)
    assert result.returncode == 0
    assert re.search(expected, result.stdout.decode())
    assert started_names(log) == []


def test_help_lists_every_option():
    """--help names every long option of the option table."""
    text = run("--help").stdout.decode()
    for name in ("global-options", "global-env", "options-for", "env-for", "disable",
                 "enable", "plugin-dir", "plugin-helper-dir", "config-file", "userid",
                 "groupid", "debug", "help", "usage", "version"):
        assert f"--{name}" in text


@pytest.mark.parametrize("option", [
    ["--us=1"],            # --usage, --userid
    ["--d"],               # --debug, --disable
    ["--g=x"],             # --global-options, --global-env, --groupid
    ["--global=x"],        # --global-options, --global-env
    ["--plugin=/x"],       # --plugin-dir, --plugin-helper-dir
    ["--en=x"],            # --env-for, --enable
])
def test_ambiguous_prefix_is_usage_error(probe, option):
    """An ambiguous long-option prefix is a usage error (64, after fallback)."""
    result = run(*option, plugin_dir=probe, stdin=TYPED + b"\n")
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


@pytest.mark.parametrize("option", [["--bogus"], ["-x"], ["--debugx"], ["-gx", "-Z"]])
def test_unknown_option_is_usage_error(probe, option):
    """An unknown option is a usage error; no plugin runs."""
    result = run(*option, plugin_dir=probe, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


@pytest.mark.parametrize("option", [
    ["--global-options"], ["-g"], ["--options-for"], ["-o"], ["--env-for"], ["-E"],
    ["--global-env"], ["-G"], ["--disable"], ["-d"], ["--enable"], ["-e"],
    ["--plugin-dir"], ["--plugin-helper-dir"], ["--config-file"], ["--userid"],
    ["--groupid"],
], ids=lambda option: option[0])
def test_option_missing_its_argument_is_usage_error(probe, option):
    """An option that needs an argument but has none is a usage error."""
    result = run(*option, plugin_dir=probe, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


@pytest.mark.parametrize("option", ["--debug=x", "--help=x", "--usage=x", "--version=1",
                                    "--deb=yes"])
def test_option_without_argument_rejects_a_value(probe, option):
    """``--debug=x`` (a value for an option that takes none) is a usage error."""
    result = run(option, plugin_dir=probe, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


@pytest.mark.parametrize("option, expected", [
    (["-g", "a,,b,"], ["a", "", "b", ""]),
    (["-g", ","], ["", ""]),
    (["-g", ""], [""]),
    (["--global-options="], [""]),
    (["-o", "p:"], [""]),
    (["-o", "p:,x"], ["", "x"]),
])
def test_comma_list_empty_elements_become_empty_arguments(args_plugin, option, expected):
    """Comma lists are split on every comma; empty elements (a trailing comma,
    ``-o foo:``) become empty-string arguments."""
    result = run(*option, plugin_dir=args_plugin)
    assert result.stdout == "".join(f"[{arg}]" for arg in expected).encode()


@pytest.mark.parametrize("option, expected", [
    (["-o", "p:--bar=baz"], ["--bar=baz"]),
    (["-o", "p:--bar,baz"], ["--bar", "baz"]),
    (["-o", "p:--bar baz"], ["--bar baz"]),
    (["-g", " lead, trail "], [" lead", " trail "]),
])
def test_spaces_are_not_separators(args_plugin, option, expected):
    """Only commas separate list elements; spaces are kept inside arguments."""
    result = run(*option, plugin_dir=args_plugin)
    assert result.stdout == "".join(f"[{arg}]" for arg in expected).encode()


def test_plugin_options_split_at_first_colon(args_plugin):
    """--options-for is split at the first colon; later colons are data."""
    result = run("-o", "p:a:b,c:", plugin_dir=args_plugin)
    assert result.stdout == b"[a:b][c:]"


def test_env_for_split_at_first_colon(probe):
    """--env-for is split at the first colon; later colons are data."""
    result = run("-E", "probe:MYVAR=a:b", plugin_dir=probe)
    assert result.json()["env"]["MYVAR"] == "a:b"


@pytest.mark.parametrize("option", [
    ["-o", "probe"], ["--options-for=probe"], ["-o", ":x"], ["--options-for=:"],
    ["-E", "probe"], ["--env-for=MYVAR=x"], ["-E", ":MYVAR=x"], ["--env-for=:"],
])
def test_plugin_specific_option_needs_colon_and_name(probe, option):
    """--options-for/--env-for without a colon or with an empty plugin name
    are usage errors."""
    result = run(*option, plugin_dir=probe, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


@pytest.mark.parametrize("option, value", [
    ("--userid", "abc"), ("--groupid", "abc"), ("--userid", "4294967296"),
    ("--groupid", "99999999999999999999"), ("--userid", "-1"), ("--groupid", "12x"),
    ("--userid", "4242 "), ("--groupid", "0x10"),
])
def test_bad_id_only_warns(probe, option, value):
    """A non-numeric or out-of-range --userid/--groupid only warns; the
    default (65534) is kept and the plugins still run."""
    result = run(f"{option}={value}", plugin_dir=probe)
    assert result.returncode == 0
    data = result.json()
    assert data["uid"] == [NOBODY] * 4
    assert data["gid"] == [NOBODY] * 4
    assert value in result.stderr


@pytest.mark.parametrize("value", ["+4242", " 4242", "\t4242", "04242"])
def test_id_number_syntax(probe, value):
    """--userid/--groupid numbers are read like strtoimax(): leading white
    space, a plus sign and leading zeros are accepted."""
    result = run(f"--userid={value}", f"--groupid={value}", plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["uid"] == [4242] * 4
    assert result.json()["gid"] == [4242] * 4
    assert result.stderr == ""


def test_bad_id_keeps_previous_value(probe):
    """After a bad --userid the previous value stays in force."""
    result = run(f"--userid={OTHER_UID}", "--userid=bad", f"--groupid={OTHER_GID}",
                 "--groupid=", plugin_dir=probe)
    assert result.returncode == 0
    assert result.json()["uid"] == [OTHER_UID] * 4
    assert result.json()["gid"] == [OTHER_GID] * 4


@pytest.mark.parametrize("args", [[""], ["", ""], ["", "--debug"], ["--debug", ""],
                                  ["--", ""], ["--", "", ""]])
def test_empty_positional_argument_ignored(plugins, args):
    """An empty positional argument (cryptsetup's empty key-file field) is
    silently ignored."""
    secret_plugin(plugins)
    result = run(*args, plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET


@pytest.mark.parametrize("args", [["foo"], ["-"], ["", "foo"], ["--", "x"], ["/dev/null"]])
def test_non_empty_positional_is_usage_error(plugins, state, args):
    """Any non-empty positional argument is a usage error; no plugin runs."""
    log = state / "log"
    logging_plugin(plugins, "good", log, code=0)
    result = run(*args, plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED
    assert started_names(log) == []


def test_double_dash_ends_options(plugins):
    """After ``--`` everything is a positional argument, even ``--help``."""
    secret_plugin(plugins)
    result = run("--", "--help", plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == EX_USAGE
    assert result.stdout == TYPED


def test_options_after_positional_argument_are_processed(args_plugin):
    """Options may follow the (empty) positional argument."""
    result = run("", "-g", "late", plugin_dir=args_plugin)
    assert result.stdout == b"[late]"


def test_short_options_with_values_in_one_word(args_plugin):
    """``-ovalue``: the rest of the word is the value, even if it starts with
    a dash or looks like other short options."""
    result = run("-op:-V", "-g-d", plugin_dir=args_plugin)
    assert result.returncode == 0
    assert result.stdout == b"[-V][-d]"


def test_option_value_may_look_like_an_option(args_plugin):
    """``--opt value`` takes the next word as value even if it starts with -."""
    result = run("--global-options", "--help", "-g", "-V", plugin_dir=args_plugin)
    assert result.returncode == 0
    assert result.stdout == b"[--help][-V]"


# ---------------------------------------------------------------------------
# 1.9 step 1: argv


def test_argv_plugin_arguments_before_global_arguments(args_plugin, public_tmp):
    """argv: plugin-specific arguments (config file first, then command line)
    come before all global arguments (config file first, then command line)."""
    conf = public_tmp / "runner.conf"
    conf.write_text("-g gfile -o p:pfile1 -o p:pfile2\n")
    result = run("-g", "gcmd", "-o", "p:pcmd", plugin_dir=args_plugin, config=conf)
    assert result.stdout == b"[pfile1][pfile2][pcmd][gfile][gcmd]"


def test_argv0_is_plugin_file_base_name(plugins):
    """argv[0] of a plugin is its file name in the plugin directory (base
    name, not a path).  Observed through a compiled plugin: a link to the
    Python interpreter, which keeps the argv[0] it was executed with."""
    os.symlink(os.path.realpath("/usr/bin/python3"), plugins / "argv-zero")
    code = "import sys;sys.stdout.write(sys.orig_argv[0])"
    result = run("-o", f"argv-zero:-ISc,{code}", plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == b"argv-zero"


def test_script_plugin_is_executed_by_descriptor(plugins):
    """Plugins are executed through the descriptor of the checked file, so a
    script's interpreter sees a /dev/fd/N path as the script name."""
    write_plugin(plugins, "script", sh("""printf '%s' "$0"\n"""))
    result = run(plugin_dir=plugins)
    assert re.fullmatch(rb"/dev/fd/\d+", result.stdout)


# ---------------------------------------------------------------------------
# 1.5 and 1.9 step 2: environment


def test_env_precedence(probe):
    """--env-for beats --global-env, which beats the inherited environment."""
    env = dict(os.environ, ONE="inherited", TWO="inherited", THREE="inherited")
    result = run("-G", "ONE=global", "-G", "TWO=global", "-E", "probe:ONE=own",
                 plugin_dir=probe, env=env)
    got = result.json()["env"]
    assert (got["ONE"], got["TWO"], got["THREE"]) == ("own", "global", "inherited")


def test_env_precedence_independent_of_option_order(probe):
    """--env-for wins even when the --global-env comes later."""
    result = run("-E", "probe:ONE=own", "-G", "ONE=global", plugin_dir=probe)
    assert result.json()["env"]["ONE"] == "own"


def test_later_env_assignment_replaces_earlier(probe):
    """A later assignment of the same variable replaces an earlier one."""
    result = run("-G", "ONE=1", "-G", "ONE=2", "-E", "probe:TWO=1", "-E", "probe:TWO=2",
                 plugin_dir=probe)
    got = result.json()["env"]
    assert (got["ONE"], got["TWO"]) == ("2", "2")


@pytest.mark.parametrize("assignment, value", [
    ("ONE=a,b", "a,b"), ("ONE=a=b", "a=b"), ("ONE=", ""), ("ONE= spaced ", " spaced "),
])
def test_env_values_taken_literally(probe, assignment, value):
    """Environment values are not comma-split; everything after the first
    '=' is the value."""
    assert run("-G", assignment, plugin_dir=probe).json()["env"]["ONE"] == value


@pytest.mark.parametrize("args, inherited, expected", [
    ([], None, "/lib/mandos/plugin-helpers"),
    ([], "/inherited", "/lib/mandos/plugin-helpers"),
    (["--plugin-helper-dir=/opt/h"], None, "/opt/h"),
    (["-G", "MANDOSPLUGINHELPERDIR=/g"], None, "/lib/mandos/plugin-helpers"),
    (["--plugin-helper-dir=/opt/h", "-G", "MANDOSPLUGINHELPERDIR=/g"], None, "/opt/h"),
    (["-G", "MANDOSPLUGINHELPERDIR=/g", "--plugin-helper-dir=/opt/h"], None, "/opt/h"),
    (["-E", "probe:MANDOSPLUGINHELPERDIR=/own"], None, "/own"),
    (["-E", "probe:MANDOSPLUGINHELPERDIR=/own", "--plugin-helper-dir=/opt/h"], None,
     "/own"),
], ids=["default", "beats-inherited", "option", "beats-global-env",
        "beats-global-env-2", "beats-global-env-3", "env-for-wins", "env-for-wins-2"])
def test_helper_dir_variable(probe, args, inherited, expected):
    """MANDOSPLUGINHELPERDIR is always set from --plugin-helper-dir (default
    /lib/mandos/plugin-helpers), replacing a --global-env of that name and
    the inherited value; a plugin's own --env-for still comes first."""
    env = dict(os.environ)
    env.pop("MANDOSPLUGINHELPERDIR", None)
    if inherited:
        env["MANDOSPLUGINHELPERDIR"] = inherited
    result = run(*args, plugin_dir=probe, env=env)
    assert result.json()["env"]["MANDOSPLUGINHELPERDIR"] == expected


@pytest.mark.parametrize("option, warning", [
    (["-G", "NOEQUALSIGN"], "NOEQUALSIGN"), (["-E", "env:NOEQUALSIGN"], "NOEQUALSIGN"),
    (["--global-env==value"], "=value"), (["-E", "env:=value"], "=value"),
])
def test_env_assignment_without_equals_ignored_with_warning(plugins, option, warning):
    """(deviation) An assignment without '=' (or without a name) is dropped
    with a warning instead of becoming a malformed environment entry."""
    os.symlink("/usr/bin/env", plugins / "env")
    result = run(*option, plugin_dir=plugins, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0
    entries = result.stdout.decode().splitlines()
    assert "MANDOSPLUGINHELPERDIR=/lib/mandos/plugin-helpers" in entries
    assert all("=" in entry and not entry.startswith("=") for entry in entries)
    assert "NOEQUALSIGN" not in result.stdout.decode()
    assert lines_with(result.stderr, warning)


def test_inherited_environment_passed_unchanged(plugins):
    """Plugins get the runner's inherited environment unchanged, plus only
    MANDOSPLUGINHELPERDIR."""
    os.symlink("/usr/bin/env", plugins / "env")
    result = run(plugin_dir=plugins, env={"PATH": "/usr/bin:/bin", "KEEP": "kept"})
    assert sorted(result.stdout.decode().splitlines()) == [
        "KEEP=kept", "MANDOSPLUGINHELPERDIR=/lib/mandos/plugin-helpers",
        "PATH=/usr/bin:/bin"]


# ---------------------------------------------------------------------------
# 1.3 and 1.4: configuration file


@pytest.fixture
def conf(public_tmp: Path) -> Path:
    return public_tmp / "plugin-runner.conf"


def test_config_comments(args_plugin, conf):
    """Everything from '#' to the end of the line is a comment."""
    conf.write_text("# -g commented\n-g one # -g two\n-g three#four\n#\n -g five\n")
    result = run(plugin_dir=args_plugin, config=conf)
    assert result.stdout == b"[one][three][five]"


def test_config_tokens_split_on_all_whitespace(args_plugin, conf):
    """Tokens are separated by runs of space, tab, CR, LF, FF and VT."""
    conf.write_bytes(b"-g\ta \t\r\n -g\x0bb\x0c\x0c-g   c\r\n\n\n-g\n\nd")
    result = run(plugin_dir=args_plugin, config=conf)
    assert result.stdout == b"[a][b][c][d]"


def test_config_has_no_quoting(args_plugin, conf):
    """Quotes and backslashes in the file are ordinary characters."""
    conf.write_text("""-g "q" -g 'r' -g s\\ \n""")
    result = run(plugin_dir=args_plugin, config=conf)
    assert result.stdout == b"""["q"]['r'][s\\]"""


def test_config_quotes_do_not_join_words(args_plugin, conf):
    """A quoted value with a space is two tokens; the second is a positional
    argument, which is an error (EX_CONFIG)."""
    conf.write_text('-g "a b"\n')
    result = run(plugin_dir=args_plugin, config=conf, stdin=TYPED)
    assert result.returncode == EX_CONFIG
    assert result.stdout == TYPED


def test_config_parsed_like_command_line(args_plugin, conf):
    """The file's tokens are parsed like a command line: long and short
    forms, values after '=' or in the next token (even on the next line),
    prefixes of long options."""
    conf.write_text("--global-options=a\n--global-options\nb\n-gc -g\nd\n"
                    "--options-for p:e --global-o=f -op:g\n")
    result = run(plugin_dir=args_plugin, config=conf)
    assert result.stdout == b"[e][g][a][b][c][d][f]"


def test_config_options_come_before_command_line(probe, conf):
    """Cumulative options from the file come before the command line's;
    for the same variable the command line's later assignment wins."""
    conf.write_text("-g file -G ONE=file -G TWO=file -E probe:OWN=file\n")
    result = run("-g", "cmd", "-G", "ONE=cmd", "-E", "probe:OWN=cmd", plugin_dir=probe,
                 config=conf)
    data = result.json()
    assert data["args"] == ["file", "cmd"]
    assert (data["env"]["ONE"], data["env"]["TWO"], data["env"]["OWN"]) == (
        "cmd", "file", "cmd")


@pytest.mark.parametrize("file_option, cmd_option, check", [
    ("--plugin-helper-dir=/file", "--plugin-helper-dir=/cmd",
     lambda d: d["env"]["MANDOSPLUGINHELPERDIR"] == "/cmd"),
    (f"--userid={NOBODY}", f"--userid={OTHER_UID}", lambda d: d["uid"][0] == OTHER_UID),
    (f"--groupid={NOBODY}", f"--groupid={OTHER_GID}", lambda d: d["gid"][0] == OTHER_GID),
    ("--plugin-dir=/nonexistent", "--plugin-dir={plugins}", lambda d: True),
], ids=["plugin-helper-dir", "userid", "groupid", "plugin-dir"])
def test_config_single_valued_options_overridden_by_command_line(
        probe, conf, file_option, cmd_option, check):
    """For single-valued options the command line overrides the file."""
    conf.write_text(file_option + "\n")
    plugin_dir = None if "{plugins}" in cmd_option else probe
    result = run(cmd_option.format(plugins=probe), plugin_dir=plugin_dir, config=conf)
    assert result.returncode == 0
    assert check(result.json())


@pytest.mark.parametrize("file_option, check", [
    ("--plugin-helper-dir=/file", lambda d: d["env"]["MANDOSPLUGINHELPERDIR"] == "/file"),
    (f"--userid={OTHER_UID}", lambda d: d["uid"][0] == OTHER_UID),
    (f"--groupid={OTHER_GID}", lambda d: d["gid"][0] == OTHER_GID),
    ("--plugin-dir={plugins}", lambda d: True),
], ids=["plugin-helper-dir", "userid", "groupid", "plugin-dir"])
def test_config_single_valued_options_apply(probe, conf, file_option, check):
    """Single-valued options in the file apply when the command line has none."""
    conf.write_text(file_option.format(plugins=probe) + "\n")
    plugin_dir = None if "{plugins}" in file_option else probe
    result = run(plugin_dir=plugin_dir, config=conf)
    assert result.returncode == 0
    assert check(result.json())


def test_config_file_option_inside_config_is_ignored(args_plugin, conf, public_tmp):
    """--config-file given inside the configuration file is ignored."""
    other = public_tmp / "other.conf"
    other.write_text("-g from-other\n")
    conf.write_text(f"--config-file={other}\n-g from-first\n")
    result = run(plugin_dir=args_plugin, config=conf)
    assert result.returncode == 0
    assert result.stdout == b"[from-first]"


def test_last_config_file_on_command_line_wins(args_plugin, public_tmp):
    """With several --config-file options the last one is used (only)."""
    first, second = public_tmp / "first.conf", public_tmp / "second.conf"
    first.write_text("-g first\n")
    second.write_text("-g second\n")
    result = run(f"--config-file={first}", f"--config-file={second}",
                 plugin_dir=args_plugin, config=None)
    assert result.stdout == b"[second]"


def test_config_file_option_position_does_not_matter(args_plugin, conf):
    """The file is read before the command line is applied, wherever
    --config-file stands on it."""
    conf.write_text("-g file\n")
    result = run("-g", "cmd", f"--config-file={conf}", plugin_dir=args_plugin,
                 config=None)
    assert result.stdout == b"[file][cmd]"


def test_nonexistent_config_file_silently_skipped(plugins, public_tmp):
    """A configuration file that does not exist is skipped without a word."""
    secret_plugin(plugins)
    result = run(plugin_dir=plugins, config=public_tmp / "missing.conf")
    assert result.returncode == 0
    assert result.stdout == SECRET
    assert result.stderr == ""


def test_unreadable_config_file_silently_skipped(args_plugin, conf):
    """A configuration file the runner cannot open is skipped silently
    (runner started as an unprivileged user, file readable by root only)."""
    conf.write_text("-g from-file\n")
    os.chmod(conf, 0o600)
    result = run(f"--userid={OTHER_UID}", f"--groupid={OTHER_UID}", plugin_dir=args_plugin,
                 config=conf, preexec_fn=as_user(OTHER_UID, OTHER_UID))
    assert result.returncode == 0
    assert result.stdout == b"[]"
    assert result.stderr == ""


def test_empty_config_file(args_plugin, conf):
    """An empty (or comment-only) file changes nothing."""
    conf.write_text("# nothing here\n\n")
    result = run("-g", "x", plugin_dir=args_plugin, config=conf)
    assert result.returncode == 0
    assert result.stdout == b"[x]"


def test_config_file_that_cannot_be_read_is_skipped(args_plugin, public_tmp):
    """A configuration "file" that can be opened but not read (a directory)
    is skipped like an unopenable one."""
    result = run("-g", "x", plugin_dir=args_plugin, config=public_tmp)
    assert result.returncode == 0
    assert result.stdout == b"[x]"


@pytest.mark.parametrize("content", ["--bogus\n", "-o nocolon\n", "-g\n", "stray\n",
                                     "--debug=1\n", "--us=3\n", "-E :A=b\n"])
def test_bad_option_in_config_is_config_error(plugins, state, conf, content):
    """A parse error in the configuration file gives EX_CONFIG (78) after
    the fallback prompt; no plugin runs."""
    log = state / "log"
    logging_plugin(plugins, "good", log, code=0)
    conf.write_text(content)
    result = run(plugin_dir=plugins, config=conf, stdin=TYPED + b"\n")
    assert result.returncode == EX_CONFIG
    assert result.stdout == TYPED
    assert started_names(log) == []


def test_empty_string_tokens_cannot_come_from_config(args_plugin, conf):
    """An empty option value is impossible in the file (no quoting); a
    trailing comma still gives an empty argument."""
    conf.write_text("-g a,\n")
    assert run(plugin_dir=args_plugin, config=conf).stdout == b"[a][]"


def test_debug_from_config_file(plugins, conf):
    """--debug in the configuration file switches debugging on."""
    secret_plugin(plugins)
    conf.write_text("--debug\n")
    with_debug = run(plugin_dir=plugins, config=conf)
    without = run(plugin_dir=plugins)
    assert with_debug.stdout == without.stdout == SECRET
    assert without.stderr == ""
    assert lines_with(with_debug.stderr, "good")


def test_disabled_in_config_enabled_on_command_line(plugins, conf):
    """--enable on the command line undoes a --disable in the file."""
    secret_plugin(plugins)
    conf.write_text("--disable=good\n")
    result = run("--enable=good", plugin_dir=plugins, config=conf)
    assert result.stdout == SECRET


def test_enabled_in_config_disabled_on_command_line(plugins, state, conf):
    """--disable on the command line overrides an --enable in the file."""
    log = state / "log"
    logging_plugin(plugins, "good", log, code=0)
    conf.write_text("--enable=good\n")
    run("--disable=good", plugin_dir=plugins, config=conf)
    assert started_names(log) == []


# ---------------------------------------------------------------------------
# 1.6 Which directory entries are plugins


IGNORED_NAMES = [".hidden", ".x.dpkg-new", "#x#", "##", "x~", "~", "x.dpkg-new",
                 "x.dpkg-old", "x.dpkg-bak", "x.dpkg-divert", ".dpkg-new"]
PLUGIN_NAMES = ["#x", "x#", "#", "~x", "x~y", "x.dpkg", "x.dpkg-newer", "dpkg-old",
                "x.dpkg-bak.sh", "x.", "-x", " x", "x y"]


@pytest.mark.parametrize("name", IGNORED_NAMES)
def test_ignored_name_patterns(plugins, state, name):
    """Names matching .*, #*#, *~, *.dpkg-new, *.dpkg-old, *.dpkg-bak or
    *.dpkg-divert are not plugins."""
    log = state / "log"
    logging_plugin(plugins, name, log)
    logging_plugin(plugins, "control", log)
    run(plugin_dir=plugins)
    assert started_names(log) == ["control"]


@pytest.mark.parametrize("name", PLUGIN_NAMES)
def test_names_resembling_patterns_are_plugins(plugins, state, name):
    """Names that only resemble the ignore patterns (``#x``, ``x#``, ...) are
    plugins."""
    log = state / "log"
    logging_plugin(plugins, name, log)
    run(plugin_dir=plugins)
    assert started_names(log) == [name]


def test_directory_is_not_a_plugin(plugins, state):
    """A directory (even with execute permission) is skipped."""
    log = state / "log"
    (plugins / "subdir").mkdir(mode=0o755)
    logging_plugin(plugins / "subdir", "inner", log, code=0)
    logging_plugin(plugins, "control", log)
    run(plugin_dir=plugins)
    assert started_names(log) == ["control"]


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o744, 0o754, 0o4644])
def test_file_not_executable_by_plugin_user_is_skipped(plugins, state, mode):
    """A regular file the plugin user cannot execute is skipped."""
    log = state / "log"
    logging_plugin(plugins, "noexec", log, code=0)
    os.chmod(plugins / "noexec", mode)
    logging_plugin(plugins, "control", log)
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert started_names(log) == ["control"]
    assert result.stdout == TYPED


@pytest.mark.parametrize("mode", [0o711, 0o701, 0o700])
def test_file_unreadable_by_plugin_user_is_skipped_with_message(plugins, state, mode):
    """A plugin file the plugin user cannot open is skipped, with an error
    message (even without --debug)."""
    log = state / "log"
    logging_plugin(plugins, "unreadable", log, code=0)
    os.chmod(plugins / "unreadable", mode)
    logging_plugin(plugins, "control", log)
    result = run(plugin_dir=plugins)
    assert started_names(log) == ["control"]
    assert lines_with(result.stderr, "unreadable")


def test_file_executable_through_plugin_group_runs(plugins, state):
    """Execute and read permission through the plugin group (65534) is
    enough: checks are made as the plugin user, not as root."""
    log = state / "log"
    logging_plugin(plugins, "group", log, code=0)
    os.chown(plugins / "group", 0, NOBODY)
    os.chmod(plugins / "group", 0o750)
    run(plugin_dir=plugins)
    assert started_names(log) == ["group"]


def test_dangling_symlink_is_skipped(plugins, state):
    """A symbolic link to nothing is skipped, with an error message."""
    log = state / "log"
    os.symlink(plugins / "nowhere", plugins / "dangling")
    logging_plugin(plugins, "control", log)
    result = run(plugin_dir=plugins)
    assert started_names(log) == ["control"]
    assert lines_with(result.stderr, "dangling")


def test_symlink_to_executable_is_followed(plugins, public_tmp):
    """A symbolic link to an executable file is a plugin."""
    target = secret_plugin(public_tmp, "elsewhere")
    os.symlink(target, plugins / "link")
    result = run(plugin_dir=plugins)
    assert result.stdout == SECRET


def test_symlink_to_directory_is_skipped(plugins, state, public_tmp):
    """A symbolic link to a directory is skipped."""
    log = state / "log"
    os.symlink(public_tmp, plugins / "dirlink")
    logging_plugin(plugins, "control", log)
    run(plugin_dir=plugins)
    assert started_names(log) == ["control"]


def test_device_file_is_skipped(plugins, state):
    """Only regular files are plugins (a character device is skipped)."""
    log = state / "log"
    os.mknod(plugins / "null", 0o777 | stat.S_IFCHR, os.makedev(1, 3))
    logging_plugin(plugins, "control", log)
    run(plugin_dir=plugins)
    assert started_names(log) == ["control"]


def test_disabled_plugin_is_skipped(plugins, state):
    """A disabled plugin is not started; the others are."""
    log = state / "log"
    logging_plugin(plugins, "off", log, code=0)
    logging_plugin(plugins, "on", log)
    run("--disable=off", plugin_dir=plugins)
    assert started_names(log) == ["on"]


def test_start_order_is_c_collation(plugins, state):
    """Plugins are started in byte order of their names (C collation:
    digits, then upper case, then '_', then lower case)."""
    log = state / "log"
    names = ["b", "B", "a", "A", "_u", "10", "9", "Z", "aa", "Ab"]
    for name in names:
        logging_plugin(plugins, name, log)
    result = run("--debug", plugin_dir=plugins)
    pids = started_pids(log)
    assert set(pids) == set(names)
    order = {}
    for number, line in enumerate(result.stderr.splitlines()):
        for name, pid in pids.items():
            if re.search(rf"\b{pid}\b", line) and name not in order:
                order[name] = number
    assert sorted(order, key=order.get) == sorted(names, key=os.fsencode)


def test_plugins_run_concurrently(plugins, state):
    """All plugins run at the same time: two plugins that each wait for the
    other to have started both get to finish."""
    write_plugin(plugins, "first", sh(f"""
        touch '{state}/first'
        i=0; while [ ! -e '{state}/second' ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
        [ -e '{state}/second' ] && printf '%s' '{SECRET.decode()}'
    """))
    write_plugin(plugins, "second", sh(f"""
        touch '{state}/second'
        i=0; while [ ! -e '{state}/first' ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
        exit 1
    """))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET


# ---------------------------------------------------------------------------
# 1.9 Supervision: who wins


def test_winner_output_written_exactly(plugins):
    """The winner's output is written to stdout as received, nothing added."""
    secret_plugin(plugins)
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET


def test_winner_needs_end_of_file(plugins):
    """A plugin that exited 0 while a background child still holds its
    stdout wins only when that child closes it, and the late output is part
    of the password."""
    write_plugin(plugins, "slowpipe", sh("""
        printf 'early-'
        (sleep 0.5; printf 'late') &
        exit 0
    """))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == b"early-late"
    assert result.elapsed >= 0.5


def test_exit_without_end_of_file_does_not_win(plugins):
    """A plugin that exited 0 but whose stdout is still open (held by a
    child) has not won yet: a later plugin that finishes completely wins."""
    write_plugin(plugins, "a-held", sh("""
        printf 'held'
        (sleep 2; printf 'late') &
        exit 0
    """))
    secret_plugin(plugins, "b-good", delay=0.3)
    result = run(plugin_dir=plugins)
    assert result.stdout == SECRET


def test_end_of_file_without_exit_does_not_win(plugins):
    """A plugin that closed its stdout but has not exited has not won."""
    write_plugin(plugins, "a-open", py("""
        import os, time
        os.write(1, b"closed-early")
        os.close(1)
        time.sleep(3)
    """))
    secret_plugin(plugins, "b-good", delay=0.3)
    result = run(plugin_dir=plugins)
    assert result.stdout == SECRET


def test_empty_output_is_empty_password(plugins):
    """A plugin that exits 0 without output wins with an empty password."""
    write_plugin(plugins, "empty", sh("exit 0\n"))
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == 0
    assert result.stdout == b""


def test_binary_output_byte_exact(plugins):
    """Binary output (every byte value, NULs, a trailing newline) is passed
    through byte for byte."""
    data = bytes(range(256)) + b"\0\0\n\r\n" + bytes(range(255, -1, -1)) + b"\n"
    write_plugin(plugins, "binary", py(f"""
        import os
        data = {data!r}
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
    """))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == data


def test_trailing_newline_kept(plugins):
    """No newline is added or removed from a plugin's output."""
    write_plugin(plugins, "nl", sh("printf 'word\\n\\n'\n"))
    assert run(plugin_dir=plugins).stdout == b"word\n\n"


def test_large_output_exact(plugins):
    """A large output (1 MiB, in many writes) is passed through exactly."""
    write_plugin(plugins, "large", py("""
        import os
        for i in range(1024):
            chunk = bytes([i % 256]) * 1023 + b"\\n"
            view = memoryview(chunk)
            while view:
                view = view[os.write(1, view):]
    """))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert len(result.stdout) == 1024 * 1024
    assert result.stdout == b"".join(bytes([i % 256]) * 1023 + b"\n" for i in range(1024))


def test_output_of_exactly_max_output_accepted(plugins):
    """Output of exactly MAX_OUTPUT bytes (the limit) is still a password."""
    write_plugin(plugins, "big", py(f"""
        import os
        view = memoryview(b"x" * {MAX_OUTPUT})
        while view:
            view = view[os.write(1, view):]
    """))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == b"x" * MAX_OUTPUT


FAILURES = {
    "exit-1": sh("printf 'bad'\nexit 1\n"),
    "exit-255": sh("printf 'bad'\nexit 255\n"),
    "exit-71": sh("printf 'bad'\nexit 71\n"),
    "segv": sh("printf 'bad'\nkill -SEGV $$\n"),
    "sigkill": sh("printf 'bad'\nkill -KILL $$\n"),
    "sigterm": sh("printf 'bad'\nkill -TERM $$\n"),
    "bad-interpreter": "#!/nonexistent/interpreter\nbad\n",
    "not-executable-format": "\x7fELF this is no binary\n",
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failing_plugin_ignored_and_other_wins(plugins, failure):
    """A plugin that exits non-zero, is killed by a signal or cannot be
    executed is ignored (its output discarded); another plugin wins."""
    write_plugin(plugins, "a-failing", FAILURES[failure])
    secret_plugin(plugins, "b-good", delay=0.3)
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET


def test_all_plugins_fail_then_fallback(plugins):
    """When every started plugin fails, the runner falls back to asking for
    the password; exit status 0."""
    for name, text in FAILURES.items():
        write_plugin(plugins, name, text)
    result = run(plugin_dir=plugins, stdin=TYPED + b"\n")
    assert result.returncode == 0
    assert result.stdout == TYPED


def test_plugins_inherit_stdin_and_stderr(plugins):
    """Plugins inherit the runner's standard input and standard error."""
    write_plugin(plugins, "reader", sh("echo 'message from plugin' >&2\nexec cat\n"))
    result = run(plugin_dir=plugins, stdin=SECRET)
    assert result.stdout == SECRET
    assert "message from plugin" in result.stderr


def signal_masks(plugins: Path, preexec_fn=None) -> tuple[int, int]:
    """The ignored and blocked signal masks a compiled plugin starts with
    (the plugin is a link to grep reading its own /proc status)."""
    os.symlink("/usr/bin/grep", plugins / "grep")
    result = run("-o", "grep:-E,^Sig(Ign|Blk):,/proc/self/status", plugin_dir=plugins,
                 preexec_fn=preexec_fn)
    assert result.returncode == 0
    fields = dict(line.split(":") for line in result.stdout.decode().splitlines())
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def test_plugins_start_with_default_signal_dispositions(plugins):
    """Plugins start with no signal ignored or blocked (the runner's own
    handling, e.g. Python's ignored SIGPIPE, does not leak into them)."""
    assert signal_masks(plugins) == (0, 0)


def test_ignored_signals_stay_ignored_in_plugins(plugins):
    """Signals ignored when the runner starts (e.g. SIGHUP under nohup)
    stay ignored in the plugins, as with any exec."""
    def ignore() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    ignored, _ = signal_masks(plugins, preexec_fn=ignore)
    assert ignored == (1 << (signal.SIGHUP - 1)) | (1 << (signal.SIGINT - 1))


def ready_loser(state: Path, name: str, on_term: str | None) -> str:
    """A Python loser plugin that writes its PID to state/<name>.pid once its
    SIGTERM handling is in place, then waits (up to a minute).

    ``on_term`` is None (default action: die), "ignore", or Python code to
    run in a SIGTERM handler.
    """
    lines = ["#!/usr/bin/python3 -IS", "import os, signal, sys, time"]
    if on_term == "ignore":
        lines.append("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    elif on_term is not None:
        lines.append("def on_term(signum, frame):")
        lines += ["    " + line for line in textwrap.dedent(on_term).strip().splitlines()]
        lines.append("signal.signal(signal.SIGTERM, on_term)")
    pidfile = state / f"{name}.pid"
    lines += [f"with open({str(pidfile) + '.tmp'!r}, 'w') as f:",
              "    f.write(str(os.getpid()))",
              f"os.rename({str(pidfile) + '.tmp'!r}, {str(pidfile)!r})",
              "for _ in range(600):",
              "    time.sleep(0.1)"]
    return "\n".join(lines) + "\n"


def waiting_winner(state: Path, *names: str) -> str:
    """A plugin that prints SECRET once every loser in ``names`` is ready."""
    checks = " ".join(f"[ -e '{state}/{name}.pid' ] &&" for name in names)
    return sh(f"""
        i=0
        until {checks} true; do
            sleep 0.02; i=$((i+1)); [ $i -lt 500 ] || exit 1
        done
        printf '%s' '{SECRET.decode()}'
    """)


def test_losers_get_sigterm(plugins, state):
    """After a winner, the other plugins are sent SIGTERM."""
    write_plugin(plugins, "loser", ready_loser(state, "loser", f"""
        open({str(state / 'terminated')!r}, "w").write("TERM")
        sys.exit(0)
    """))
    write_plugin(plugins, "winner", waiting_winner(state, "loser"))
    result = run(plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET
    assert (state / "terminated").read_text() == "TERM"
    pid = int((state / "loser.pid").read_text())
    assert not alive(pid)


def test_password_written_before_losers_are_stopped(plugins, state, public_tmp):
    """The winning password is on stdout before the losers get SIGTERM."""
    out = state / "runner.out"
    write_plugin(plugins, "loser", ready_loser(state, "loser", f"""
        with open({str(out)!r}, "rb") as f:
            seen = f.read()
        open({str(state / 'seen')!r}, "wb").write(seen)
        sys.exit(0)
    """))
    write_plugin(plugins, "winner", waiting_winner(state, "loser"))
    with open(out, "wb") as stdout:
        os.chmod(out, 0o644)
        result = run(plugin_dir=plugins, stdout=stdout)
    assert result.returncode == 0
    assert out.read_bytes() == SECRET
    assert (state / "seen").read_bytes() == SECRET


# ---------------------------------------------------------------------------
# Deliberate deviations from the original


def test_unstarted_named_plugins_do_not_prevent_fallback(plugins, public_tmp):
    """(deviation 1) Plugins named by options that never started (disabled,
    absent, not executable) do not keep the runner waiting: when all
    started plugins fail, it falls back."""
    failing_plugin(plugins, "failing")
    secret_plugin(plugins, "disabled")
    write_plugin(plugins, "notexec", sh("exit 0\n"), mode=0o644)
    result = run("--disable=disabled", "-o", "absent:x", "-E", "absent2:A=b",
                 "-o", "notexec:y", "--enable=absent3", "-E", "disabled:A=b",
                 plugin_dir=plugins, stdin=TYPED + b"\n", timeout=10)
    assert result.returncode == 0
    assert result.stdout == TYPED


def test_output_flood_stopped_others_continue(plugins, state):
    """(deviation 2) A plugin writing more than MAX_OUTPUT bytes is stopped
    with SIGTERM and counted as failed; the other plugins go on and a slower
    good one wins."""
    write_plugin(plugins, "a-flood", py(f"""
        import os
        open({str(state / 'flood.pid')!r}, "w").write(str(os.getpid()))
        chunk = b"y" * 65536
        while True:
            os.write(1, chunk)
    """))
    # The good plugin answers only once the flooding plugin is gone.
    write_plugin(plugins, "b-good", py(f"""
        import os, sys, time
        pidfile = {str(state / 'flood.pid')!r}

        def flood_gone():
            try:
                pid = int(open(pidfile).read())
            except (FileNotFoundError, ValueError):
                return False
            try:
                stat = open(f"/proc/{{pid}}/stat").read()
            except FileNotFoundError:
                return True
            return stat.rpartition(")")[2].split()[0] in ("Z", "X")

        for _ in range(500):
            if flood_gone():
                sys.stdout.write({SECRET.decode()!r})
                sys.exit(0)
            time.sleep(0.02)
        sys.exit(1)
    """))
    result = run("--debug", plugin_dir=plugins)
    assert result.returncode == 0
    assert result.stdout == SECRET
    assert not alive(int((state / "flood.pid").read_text()))


def test_output_over_max_output_is_failure(plugins):
    """(deviation 2) One byte over MAX_OUTPUT and the plugin has failed,
    even though it exits 0: the runner falls back."""
    write_plugin(plugins, "toobig", py(f"""
        import os
        view = memoryview(b"x" * ({MAX_OUTPUT} + 1))
        while view:
            view = view[os.write(1, view):]
    """))
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == 0
    assert result.stdout == TYPED


def test_output_flood_leaves_no_busy_loop(plugins, state):
    """(deviation 2) Stopping a flooding plugin leaves the runner waiting
    idle for the others, not spinning."""
    write_plugin(plugins, "a-flood", py("""
        import os
        chunk = b"y" * 65536
        while True:
            os.write(1, chunk)
    """))
    secret_plugin(plugins, "b-good", delay=2.5)
    argv = runner_argv([], plugins)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=default_signals())
    try:
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        proc.stdout.close()
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    assert out == SECRET
    assert proc.returncode == 0
    # Idle waiting costs well under 0.5 s of CPU; spinning costs seconds.
    assert usage.ru_utime + usage.ru_stime < 0.5


@pytest.mark.slow
def test_loser_ignoring_sigterm_gets_sigkill(plugins, state):
    """(deviation 3) A loser that ignores SIGTERM is killed with SIGKILL
    after KILL_GRACE_SECONDS instead of blocking the runner forever."""
    write_plugin(plugins, "stubborn", ready_loser(state, "stubborn", "ignore"))
    write_plugin(plugins, "winner", waiting_winner(state, "stubborn"))
    result = run(plugin_dir=plugins, timeout=KILL_GRACE_SECONDS + 10)
    assert result.returncode == 0
    assert result.stdout == SECRET
    assert KILL_GRACE_SECONDS - 0.5 <= result.elapsed < KILL_GRACE_SECONDS + 4
    assert not alive(int((state / "stubborn.pid").read_text()))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=lambda s: signal.Signals(s).name)
def test_runner_signal_terminates_plugins(plugins, state, signum):
    """(deviation 4) SIGTERM, SIGINT or SIGHUP to the runner stops its
    plugins, then the runner dies by that same signal."""
    write_plugin(plugins, "waiting", ready_loser(state, "waiting", None))
    write_plugin(plugins, "waiting2", ready_loser(state, "waiting2", "sys.exit(0)"))
    proc = subprocess.Popen(runner_argv([], plugins), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=default_signals())
    try:
        assert wait_for(lambda: (state / "waiting.pid").exists()
                        and (state / "waiting2.pid").exists())
        pids = [int((state / f"{n}.pid").read_text()) for n in ("waiting", "waiting2")]
        assert all(alive(pid) for pid in pids)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=KILL_GRACE_SECONDS + 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signum
    assert out == b""
    assert not any(alive(pid) for pid in pids)


def test_runner_signal_during_fallback_prompt(plugins):
    """(deviation 4) A terminating signal while the fallback prompt waits
    ends the runner by that signal."""
    failing_plugin(plugins, "failing")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(runner_argv([], plugins), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                                preexec_fn=default_signals())
        try:
            def prompted() -> bool:
                err.seek(0)
                return b"Password: " in err.read()
            assert wait_for(prompted)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert out == b""


def test_fifo_in_plugin_dir_is_skipped(plugins):
    """A FIFO in the plugin directory is not a plugin, and opening it for
    the check does not block the runner."""
    os.mkfifo(plugins / "fifo", 0o777)
    os.chmod(plugins / "fifo", 0o777)
    secret_plugin(plugins, "good")
    result = run(plugin_dir=plugins, timeout=5)
    assert result.returncode == 0
    assert result.stdout == SECRET


def test_stdout_closed_right_after_password(plugins, state):
    """(deviation 7) Once the password is written the runner's stdout is
    closed, so its reader sees end of file while a slow loser is still
    being waited for."""
    write_plugin(plugins, "loser", ready_loser(state, "loser", """
        time.sleep(1.5)
        sys.exit(0)
    """))
    write_plugin(plugins, "winner", waiting_winner(state, "loser"))
    proc = subprocess.Popen(runner_argv([], plugins), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True,
                            preexec_fn=default_signals())
    try:
        out = proc.stdout.read()
        eof_at = time.monotonic()
        still_running = proc.poll() is None
        proc.wait(timeout=KILL_GRACE_SECONDS + 5)
        exited_at = time.monotonic()
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == SECRET
    assert still_running
    assert exited_at - eof_at >= 1.0
    assert proc.returncode == 0


def test_plugin_that_cannot_start_is_failure(plugins):
    """A plugin whose execution fails counts as failed (the runner goes on
    with the other plugins and reports the problem)."""
    write_plugin(plugins, "broken", "#!/nonexistent/interpreter\n")
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == 0
    assert result.stdout == TYPED
    assert lines_with(result.stderr, "broken")


# ---------------------------------------------------------------------------
# 1.8 Fallback


def test_no_plugin_dir_gives_unavailable(public_tmp):
    """A plugin directory that cannot be opened: fallback, then exit 69."""
    result = run(plugin_dir=public_tmp / "missing", stdin=TYPED + b"\n")
    assert result.returncode == EX_UNAVAILABLE
    assert result.stdout == TYPED


def test_plugin_dir_is_a_file_gives_oserr(public_tmp):
    """A plugin "directory" that is a file opens but cannot be scanned:
    fallback, then exit EX_OSERR (71), as the original does."""
    path = public_tmp / "file"
    path.write_text("")
    os.chmod(path, 0o644)
    result = run(plugin_dir=path, stdin=TYPED)
    assert result.returncode == EX_OSERR
    assert result.stdout == TYPED


def test_empty_plugin_dir_fallback_succeeds(plugins):
    """No plugin could be started: a message says so, fallback, exit 0."""
    result = run(plugin_dir=plugins, stdin=TYPED + b"\n")
    assert result.returncode == 0
    assert result.stdout == TYPED
    assert "no plugin" in result.stderr.lower()


def test_all_plugins_disabled_fallback_succeeds(plugins):
    """When every plugin is disabled nothing starts: fallback, exit 0."""
    secret_plugin(plugins, "good")
    result = run("-d", "good", plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == 0
    assert result.stdout == TYPED


def test_fallback_announced_and_prompts_on_stderr_without_terminal(plugins):
    """Without a terminal the fallback says so and prompts ``Password: ``
    on standard error."""
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert "fallback" in result.stderr.lower()
    assert "Password: " in result.stderr


def test_fallback_at_end_of_file_gives_empty_password(plugins):
    """End of input at the fallback prompt gives an empty password."""
    result = run(plugin_dir=plugins, stdin=b"")
    assert result.returncode == 0
    assert result.stdout == b""


@pytest.mark.parametrize("typed, expected", [
    (TYPED + b"\n", TYPED), (TYPED, TYPED), (TYPED + b"\r\n", TYPED + b"\r"),
    (TYPED + b"\nsecond line\n", TYPED), (b"\n", b""), (b" spaced \n", b" spaced "),
])
def test_fallback_strips_one_trailing_newline(plugins, typed, expected):
    """The fallback reads one line and strips only its newline."""
    result = run(plugin_dir=plugins, stdin=typed)
    assert result.stdout == expected


def test_fallback_password_ends_at_nul(plugins):
    """getpass(3) returns a C string: a NUL byte in the typed line ends the
    password."""
    result = run(plugin_dir=plugins, stdin=TYPED + b"\0after\n")
    assert result.returncode == 0
    assert result.stdout == TYPED


def test_fallback_on_terminal(plugins, public_tmp):
    """With a controlling terminal the fallback prompts ``Password: `` on the
    terminal (not stderr), reads with echo off, restores echo, strips the
    newline, and exits with the status of the cause (69: no plugin dir)."""
    out, err = public_tmp / "out", public_tmp / "err"
    argv = " ".join(runner_argv([], public_tmp / "missing"))
    child = pexpect.spawn("/bin/sh", ["-c", f"{argv} >{out} 2>{err}; "
                                            "echo status=$?; stty -a"], timeout=10)
    try:
        child.expect_exact("Password: ")
        child.sendline(TYPED)
        child.expect(rb"status=(\d+)")
        answer_echo = child.before
        status = int(child.match.group(1))
        child.expect(pexpect.EOF)
        settings = child.before
    finally:
        child.close(force=True)
    assert TYPED not in answer_echo
    assert status == EX_UNAVAILABLE
    assert out.read_bytes() == TYPED
    stderr = err.read_text()
    assert "Password:" not in stderr
    assert_no_password_in(stderr)
    assert re.search(rb"(^|\s)echo(\s|;|$)", settings)


def test_fallback_after_all_failed_on_terminal(plugins, public_tmp):
    """On a terminal, after every plugin failed: exit 0 with the typed
    password."""
    failing_plugin(plugins, "failing")
    out, err = public_tmp / "out", public_tmp / "err"
    argv = " ".join(runner_argv([], plugins))
    child = pexpect.spawn("/bin/sh", ["-c", f"{argv} >{out} 2>{err}; echo status=$?"],
                          timeout=10)
    try:
        child.expect_exact("Password: ")
        child.sendline(TYPED)
        child.expect(rb"status=(\d+)")
        status = int(child.match.group(1))
        assert TYPED not in child.before
    finally:
        child.close(force=True)
    assert status == 0
    assert out.read_bytes() == TYPED
    assert_no_password_in(err.read_text())


def test_password_write_failure_stdout_closed(plugins):
    """Writing the password to a closed stdout fails: EX_IOERR (74)."""
    secret_plugin(plugins)
    result = run(plugin_dir=plugins, stdout=subprocess.DEVNULL,
                 preexec_fn=lambda: os.close(1))
    assert result.returncode == EX_IOERR


@pytest.mark.parametrize("winner", [True, False], ids=["winner", "fallback"])
def test_password_write_failure_reader_gone(plugins, winner):
    """Writing the password to a pipe nobody reads fails: EX_IOERR (74),
    whether the password came from a plugin or from the fallback."""
    if winner:
        secret_plugin(plugins)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run(plugin_dir=plugins, stdout=write_end, stdin=TYPED)
    finally:
        os.close(write_end)
    assert result.returncode == EX_IOERR


# ---------------------------------------------------------------------------
# 1.13 Debug output


def test_debug_lists_arguments_and_environment(plugins):
    """--debug lists the arguments and environment of the global record and
    of each plugin record."""
    secret_plugin(plugins)
    result = run("--debug", "-g", "global-arg", "-G", "GLOBALVAR=gv", "-o",
                 "good:own-arg", "-E", "good:OWNVAR=ov", plugin_dir=plugins)
    assert result.stdout == SECRET
    for text in ("global-arg", "GLOBALVAR=gv", "own-arg", "OWNVAR=ov",
                 "MANDOSPLUGINHELPERDIR=/lib/mandos/plugin-helpers"):
        assert text in result.stderr


def test_debug_lists_ignored_entries(plugins):
    """--debug names every ignored directory entry."""
    secret_plugin(plugins, "good")
    failing_plugin(plugins, "x~")
    failing_plugin(plugins, ".hidden")
    failing_plugin(plugins, "noexec")
    os.chmod(plugins / "noexec", 0o644)
    (plugins / "adir").mkdir()
    failing_plugin(plugins, "off")
    result = run("--debug", "--disable=off", plugin_dir=plugins)
    assert result.stdout == SECRET
    for name in ("x~", ".hidden", "noexec", "adir", "off"):
        assert lines_with(result.stderr, name), name


def test_debug_lists_started_plugins_with_pid(plugins, state):
    """--debug reports every started plugin with its PID."""
    log = state / "log"
    logging_plugin(plugins, "one", log)
    logging_plugin(plugins, "two", log)
    result = run("--debug", plugin_dir=plugins)
    for name, pid in started_pids(log).items():
        assert lines_with(result.stderr, name, str(pid))


@pytest.mark.parametrize("body, needle", [
    ("exit 42\n", "42"), ("kill -SEGV $$\n", str(signal.SIGSEGV)),
    ("kill -KILL $$\n", str(signal.SIGKILL)),
])
def test_debug_lists_failed_plugins(plugins, body, needle):
    """--debug reports each failed plugin with its exit code or signal."""
    write_plugin(plugins, "failing", sh(body))
    result = run("--debug", plugin_dir=plugins)
    assert [line for line in lines_with(result.stderr, "failing")
            if re.search(rf"\b{needle}\b", line)]


def test_no_debug_output_without_debug(plugins, state):
    """Without --debug a successful run prints nothing on stderr."""
    secret_plugin(plugins, "good", delay=0.2)
    failing_plugin(plugins, "failing", code=3)
    failing_plugin(plugins, "x~")
    result = run(plugin_dir=plugins)
    assert result.stdout == SECRET
    assert result.stderr == ""


def test_debug_never_shows_password(plugins):
    """--debug never prints the password, neither a plugin's nor a typed one
    (the run helper checks stderr of every run; here with --debug on both
    paths)."""
    secret_plugin(plugins)
    assert run("--debug", plugin_dir=plugins).stdout == SECRET
    result = run("--debug", "--disable=good", plugin_dir=plugins, stdin=TYPED)
    assert result.stdout == TYPED


# ---------------------------------------------------------------------------
# Keyscript use


def test_keyscript_invocation(plugins):
    """As cryptsetup's keyscript: ``plugin-runner ""`` with CRYPTTAB_*
    variables set prints only the passphrase; plugins see the variables."""
    write_plugin(plugins, "crypttab", sh(f"""
        [ "$CRYPTTAB_NAME" = cryptroot ] || exit 1
        [ "$CRYPTTAB_SOURCE" = /dev/vda2 ] || exit 1
        [ "$CRYPTTAB_KEY" = none ] || exit 1
        printf '%s' '{SECRET.decode()}'
    """))
    env = dict(os.environ, CRYPTTAB_NAME="cryptroot", CRYPTTAB_SOURCE="/dev/vda2",
               CRYPTTAB_KEY="none", CRYPTTAB_OPTIONS="luks,keyscript=plugin-runner")
    result = run("", plugin_dir=plugins, env=env)
    assert result.returncode == 0
    assert result.stdout == SECRET


# ---------------------------------------------------------------------------
# 1.7 Privileges and the set-user-ID emulation (DESIGN 3.11)


def test_plugins_run_as_nobody_by_default(probe):
    """Started as root, the runner runs plugins as uid/gid 65534."""
    data = run(plugin_dir=probe).json()
    assert data["uid"] == [NOBODY] * 4
    assert data["gid"] == [NOBODY] * 4


def test_supplementary_groups_cleared(probe):
    """(deviation 5) Root's supplementary groups are cleared: plugins (and
    the runner) have none."""
    data = run(plugin_dir=probe, preexec_fn=lambda: os.setgroups([0, 4, 6, 27])).json()
    assert data["groups"] == []
    assert data["parent_groups"] == []


def test_runner_keeps_root_only_as_saved_uid(probe):
    """Started as root, the runner itself keeps uid/gid 0 only as its saved
    IDs; real, effective and file-system IDs are the plugin user's."""
    data = run(plugin_dir=probe).json()
    assert data["parent_uid"] == [NOBODY, NOBODY, 0, NOBODY]
    assert data["parent_gid"] == [NOBODY, NOBODY, 0, NOBODY]


def test_plugin_dir_opened_as_plugin_user(plugins):
    """The plugin directory is opened after dropping privileges: a directory
    only root can read cannot be opened (69)."""
    secret_plugin(plugins)
    os.chmod(plugins, 0o700)
    result = run(plugin_dir=plugins, stdin=TYPED)
    assert result.returncode == EX_UNAVAILABLE
    assert result.stdout == TYPED


def test_setuid_root_plugin_gets_effective_root(plugins):
    """(deviation 8) A plugin file owned by root with mode 4755 starts with
    real UID = --userid and effective (and saved) UID 0."""
    probe_plugin(plugins, mode=0o4755)
    assert stat.S_IMODE(os.stat(plugins / "probe").st_mode) == 0o4755
    data = run(f"--userid={OTHER_UID}", plugin_dir=plugins).json()
    assert data["uid"] == [OTHER_UID, 0, 0, 0]
    assert data["gid"] == [NOBODY] * 4
    assert data["groups"] == []


def test_setgid_root_plugin_gets_effective_root_group(plugins):
    """(deviation 8) A plugin file with group root and mode 2755 starts with
    real GID = --groupid and effective GID 0; its UIDs stay unprivileged."""
    probe_plugin(plugins, mode=0o2755)
    data = run(f"--groupid={OTHER_GID}", plugin_dir=plugins).json()
    assert data["gid"] == [OTHER_GID, 0, 0, 0]
    assert data["uid"] == [NOBODY] * 4


def test_setuid_bit_on_file_not_owned_by_root_grants_nothing(plugins):
    """(deviation 8) A 4755 plugin not owned by root gets no privilege."""
    path = probe_plugin(plugins)
    os.chown(path, OTHER_UID, OTHER_UID)
    os.chmod(path, 0o6755)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o6755
    data = run(plugin_dir=plugins).json()
    assert data["uid"] == [NOBODY] * 4
    assert data["gid"] == [NOBODY] * 4


def test_plain_plugin_has_no_way_back_to_root(plugins):
    """(deviation 8) A 0755 plugin runs with all UIDs = --userid."""
    probe_plugin(plugins, mode=0o755)
    data = run(f"--userid={OTHER_UID}", f"--groupid={OTHER_GID}", plugin_dir=plugins).json()
    assert data["uid"] == [OTHER_UID] * 4
    assert data["gid"] == [OTHER_GID] * 4


def test_userid_zero_runs_plugins_as_root(plugins):
    """With --userid=0 every plugin simply runs as root."""
    probe_plugin(plugins, mode=0o755)
    data = run("--userid=0", "--groupid=0", plugin_dir=plugins).json()
    assert data["uid"] == [0] * 4
    assert data["gid"] == [0] * 4


def test_plugin_that_became_root_does_not_crash_runner(plugins, state):
    """A set-user-ID plugin that made itself fully root cannot be signalled
    by the unprivileged runner; the runner still ends normally (status 0)
    after writing the winner's password."""
    write_plugin(plugins, "rooted", py(f"""
        import os, time
        os.setresuid(0, 0, 0)
        open({str(state / 'rooted.pid')!r}, "w").write(str(os.getpid()))
        time.sleep(1)
    """), mode=0o4755)
    write_plugin(plugins, "winner", waiting_winner(state, "rooted"))
    result = run(plugin_dir=plugins)
    assert result.stdout == SECRET
    assert "Traceback" not in result.stderr
    assert result.returncode == 0


def test_unprivileged_runner_runs_plugins_as_invoking_user(probe):
    """Run by an ordinary user the runner cannot switch users: it warns and
    runs the plugins as the invoking user."""
    result = run(plugin_dir=probe, preexec_fn=as_user(OTHER_UID, OTHER_GID))
    assert result.returncode == 0
    data = result.json()
    assert data["uid"] == [OTHER_UID] * 4
    assert data["gid"] == [OTHER_GID] * 4
    assert result.stderr != ""


def test_unprivileged_runner_grants_no_setuid_root(plugins):
    """Run by an ordinary user, a 4755 root-owned script plugin gets no
    privilege (nothing to emulate it with)."""
    probe_plugin(plugins, mode=0o4755)
    result = run(f"--userid={OTHER_UID}", f"--groupid={OTHER_GID}", plugin_dir=plugins,
                 preexec_fn=as_user(OTHER_UID, OTHER_GID))
    assert result.returncode == 0
    assert result.json()["uid"] == [OTHER_UID] * 4
    assert result.stderr == ""


def run_in_mount_namespace(public_tmp: Path, setup: str, command: list[str],
                           after: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the shell code ``setup``, then ``command``, then ``after`` as root
    in a private mount namespace where /lib and /dev are overlays on a
    scratch tmpfs, so the runner's initramfs work-arounds can act without
    touching the host.  Returns the process result and the report file
    (``status=N`` of the command, plus what ``setup``/``after`` append)."""
    scratch = public_tmp / "ns"
    scratch.mkdir()
    report = public_tmp / "ns-report"
    script = textwrap.dedent(f"""
        set -e
        mount -t tmpfs none {scratch}
        for d in lib dev; do
            mkdir {scratch}/$d-up {scratch}/$d-work
            mount -t overlay overlay \\
                -o lowerdir=/$d,upperdir={scratch}/$d-up,workdir={scratch}/$d-work /$d
        done
        echo namespace-ready > {report}
    """) + textwrap.dedent(setup) + textwrap.dedent(f"""
        set +e
        "$@"
        echo "status=$?" >> {report}
    """) + textwrap.dedent(after)
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh",
                             "-c", script, "sh", *command], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=20, start_new_session=True,
                            preexec_fn=default_signals())
    text = report.read_text() if report.exists() else ""
    if "namespace-ready" not in text:
        pytest.skip("no private mount namespace with overlays here: "
                    + result.stderr.decode(errors="replace"))
    assert_no_password_in(result.stderr.decode(errors="replace"))
    return result, text


def test_initramfs_plugin_dir_given_to_plugin_user(public_tmp):
    """Started as root, the runner hands a root:root /lib/mandos/plugins.d
    to the plugin user and group (initramfs builders create it root-owned
    and 0700), so the default plugin directory becomes usable."""
    setup = textwrap.dedent(f"""
        mkdir -p /lib/mandos/plugins.d
        printf '#!/bin/sh\\nprintf %%s {SECRET.decode()}\\n' > /lib/mandos/plugins.d/good
        chmod 755 /lib/mandos/plugins.d/good
        chmod 700 /lib/mandos/plugins.d
    """)
    after = f"stat -c 'owner=%u:%g' /lib/mandos/plugins.d >> {public_tmp}/ns-report"
    result, report = run_in_mount_namespace(
        public_tmp, setup,
        [str(RUNNER), f"--config-file={NO_CONFIG}", f"--userid={OTHER_UID}",
         f"--groupid={OTHER_GID}"], after)
    assert "status=0" in report, (report, result.stderr)
    assert result.stdout == SECRET
    assert f"owner={OTHER_UID}:{OTHER_GID}" in report
    host = Path("/lib/mandos/plugins.d")
    assert not host.exists() or host.stat().st_uid != OTHER_UID


def test_initramfs_plugin_dir_not_root_group_left_alone(public_tmp, plugins):
    """Only a /lib/mandos/plugins.d owned by root:root is handed over."""
    setup = "mkdir -p /lib/mandos/plugins.d; chown 0:5 /lib/mandos/plugins.d"
    after = f"stat -c 'owner=%u:%g' /lib/mandos/plugins.d >> {public_tmp}/ns-report"
    secret_plugin(plugins)
    result, report = run_in_mount_namespace(
        public_tmp, setup,
        [str(RUNNER), f"--config-file={NO_CONFIG}", f"--plugin-dir={plugins}"], after)
    assert "status=0" in report, (report, result.stderr)
    assert "owner=0:5" in report


def test_missing_dev_fd_created(public_tmp, plugins):
    """Started as root without /dev/fd, the runner creates it as a link to
    /proc/self/fd, so script plugins (run by descriptor) work."""
    secret_plugin(plugins)
    after = f"echo \"link=$(readlink /dev/fd)\" >> {public_tmp}/ns-report"
    result, report = run_in_mount_namespace(
        public_tmp, "rm /dev/fd; [ ! -e /dev/fd ]",
        [str(RUNNER), f"--config-file={NO_CONFIG}", f"--plugin-dir={plugins}"], after)
    assert "status=0" in report, (report, result.stderr)
    assert result.stdout == SECRET
    assert "link=/proc/self/fd" in report


def test_setuid_bit_on_nosuid_file_system_grants_nothing(public_tmp):
    """(deviation 8) As with the kernel, a set-user-ID root plugin on a file
    system mounted nosuid gets no privilege."""
    source = probe_plugin(public_tmp, "probe-source")
    nosuid = public_tmp / "nosuid"
    nosuid.mkdir()
    setup = textwrap.dedent(f"""
        mount -t tmpfs -o nosuid,mode=755 none {nosuid}
        mkdir -m 755 {nosuid}/plugins.d
        cp {source} {nosuid}/plugins.d/probe
        chmod 4755 {nosuid}/plugins.d/probe
    """)
    result, report = run_in_mount_namespace(
        public_tmp, setup, [str(RUNNER), f"--config-file={NO_CONFIG}",
                            f"--plugin-dir={nosuid}/plugins.d"], "")
    assert "status=0" in report, (report, result.stderr)
    assert json.loads(result.stdout)["uid"] == [NOBODY] * 4
