"""Network hooks: the client side (CLIENT.md §2.8) and the example hooks (§7).

The runner is exercised the way the client uses it: mandos.hooks.run_hooks()
in a separate Python process (so that redirections, user IDs and signals are
real) running real hook programs.  The example hooks run as programs too;
those that change interfaces do so inside network namespaces made for the
test, and programs the test machine lacks (openvpn, wpa_supplicant, wg) are
replaced by recording stand-ins mounted over the system folders inside a
private mount namespace.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "network-hooks.d"
NOBODY = 65534
EX_NOPERM = 77
RUN_TIMEOUT = 30.0

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="user IDs, namespaces and mounts need root")

# The stand-in for mandos-client: runs the hooks as the client does, with
# logging on stderr, optionally after taking the client's user IDs, and with
# the client's kind of SIGTERM handler (one that raises).
CLIENT = r'''
import json, logging, os, signal, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(levelname)s %(message)s")
if args.get("ids"):
    os.setgroups([65534])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(*args["ids"])
from mandos import hooks
if args.get("kill_delay") is not None:
    hooks.KILL_DELAY = args["kill_delay"]

class Terminated(BaseException):
    pass

def on_signal(signum, frame):
    raise Terminated()

signal.signal(signal.SIGTERM, on_signal)
try:
    if args.get("name"):
        env = hooks.hook_environment(args["dir"], args["mode"], device=args["device"],
                                     debug=args["debug"], delay=args["delay"],
                                     connect=args["connect"])
        status = hooks.run_hook(args["dir"], args["name"], args["mode"], env,
                                args["timeout"])
        print("status", None if status is None else os.waitstatus_to_exitcode(status))
    else:
        hooks.run_hooks(args["dir"], args["mode"], device=args["device"],
                        debug=args["debug"], delay=args["delay"],
                        connect=args["connect"], timeout=args["timeout"])
except Terminated:
    print("terminated")
print("done")
'''

# A hook that records what it got.  It is /usr/bin/python3 itself reached
# through a symbolic link named after the hook, so that argv[0] is observable
# (a script's interpreter never sees it); Python then runs the file named
# like the mode argument ("start") from the current folder: this program.
DUMP = r'''
import json, os, sys

def link(fd):
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None

with open("/proc/self/environ", "rb") as file:
    env = dict(entry.decode().split("=", 1) for entry in file.read().split(b"\0") if entry)
info = {"argv": sys.orig_argv, "env": env, "resuid": os.getresuid(),
        "resgid": os.getresgid(), "groups": os.getgroups(), "stdin": link(0),
        "stdout": link(1), "stdin_data": sys.stdin.read()}
out = os.path.join(env["MANDOSNETHOOKDIR"], os.pardir, "dump-" + sys.orig_argv[0] + ".json")
with open(out, "w") as file:
    json.dump(info, file)
print("hook output on stdout")
'''

BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
            "HOME": "/", "SOMETHING": "kept as it is = yes"}


# --- running the client and making hooks ---------------------------------------

def run_client(hookdir: Path, mode: str = "start", *, device: str = "", debug: bool = False,
               delay: float = 2.5, connect: str | None = None, timeout: float = 20.0,
               name: str | None = None, ids: tuple[int, int, int] | None = None,
               kill_delay: float | None = None, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the hooks of ``hookdir`` through the client stand-in and wait."""
    return subprocess.run(client_argv(hookdir, mode, device=device, debug=debug, delay=delay,
                                      connect=connect, timeout=timeout, name=name,
                                      ids=ids, kill_delay=kill_delay),
                          env=BASE_ENV if env is None else env, cwd=cwd,
                          input="data the hooks must not see\n",
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def client_argv(hookdir: Path, mode: str, **settings) -> list[str]:
    args = {"repo": str(REPO), "dir": str(hookdir), "mode": mode, **settings}
    return [sys.executable, "-c", CLIENT, json.dumps(args)]


def write_hook(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    """A shell-script hook."""
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)
    return path


def logging_hook(directory: Path, name: str, log: Path, mode: int = 0o755) -> Path:
    """A hook that appends its (own idea of its) name to ``log``."""
    return write_hook(directory, name,
                      f"printf '%s\\n' {shlex.quote(name)} >> {shlex.quote(str(log))}", mode)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{path} did not appear")


@pytest.fixture
def hookdir(public_tmp: Path) -> Path:
    """An empty hook folder, 0755, inside a folder for the hooks' records."""
    path = public_tmp / "hooks"
    path.mkdir()
    path.chmod(0o755)
    return path


@pytest.fixture
def dump_hook(hookdir: Path, public_tmp: Path):
    """Install the recording hook as ``name``; returns a reader of its record."""
    workdir = public_tmp / "cwd"
    workdir.mkdir()
    for mode in ("start", "stop"):
        (workdir / mode).write_text(DUMP)
    workdir.chmod(0o755)

    def install(name: str = "dump"):
        (hookdir / name).symlink_to("/usr/bin/python3")
        return lambda: json.loads((public_tmp / f"dump-{name}.json").read_text())

    install.cwd = workdir
    return install


# --- which files are hooks ------------------------------------------------------

def test_only_names_of_letters_digits_underscore_dot_and_dash_are_hooks(hookdir, public_tmp):
    log = public_tmp / "ran"
    names = ["ok-1_A.b", ".hidden", "x.dpkg-old", "a b", "x~", "#x#", "caf\u00e9",
             "semi;colon", "plus+"]
    for name in names:
        logging_hook(hookdir, name, log)
    result = run_client(hookdir)
    assert result.returncode == 0, result.stderr
    assert lines(log) == [".hidden", "ok-1_A.b", "x.dpkg-old"]
    assert "WARNING" not in result.stderr


def test_hooks_run_one_after_the_other_sorted_by_name(hookdir, public_tmp):
    log = public_tmp / "ran"
    for name in ["b", "A", "a", "10", "9", "_z", "Z"]:
        # Each waits a little, so overlapping runs would interleave.
        write_hook(hookdir, name, f"echo start {name} >> {log}; sleep 0.05; "
                                  f"echo end {name} >> {log}")
    result = run_client(hookdir)
    assert result.returncode == 0, result.stderr
    order = ["10", "9", "A", "Z", "_z", "a", "b"]
    assert lines(log) == [f"{what} {name}" for name in order for what in ("start", "end")]


def test_directories_fifos_and_dangling_links_are_not_hooks(hookdir, public_tmp):
    log = public_tmp / "ran"
    (hookdir / "adir").mkdir(mode=0o755)
    os.mkfifo(hookdir / "afifo", 0o755)
    (hookdir / "dangling").symlink_to(hookdir / "nowhere")
    (hookdir / "dirlink").symlink_to(hookdir / "adir")
    logging_hook(hookdir, "real", log)
    result = run_client(hookdir)
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["real"]
    assert "WARNING" not in result.stderr
    for name in ("adir", "afifo", "dirlink"):
        assert f"Ignoring network hook '{name}': not a regular file" in result.stderr
    assert "Ignoring network hook 'dangling': cannot stat" in result.stderr


@needs_root  # root may run a file with any execute bit; its owner may not
def test_any_execute_bit_makes_a_hook_and_none_means_no_hook(hookdir, public_tmp):
    log = public_tmp / "ran"
    logging_hook(hookdir, "group-only", log, 0o654)
    logging_hook(hookdir, "other-only", log, 0o645)
    logging_hook(hookdir, "user-only", log, 0o744)
    logging_hook(hookdir, "no-x", log, 0o644)
    logging_hook(hookdir, "setuid-no-x", log, 0o4666)
    result = run_client(hookdir)
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["group-only", "other-only", "user-only"]
    assert "Ignoring network hook 'no-x': not executable" in result.stderr


def test_a_symbolic_link_to_a_program_is_followed(hookdir, dump_hook):
    record = dump_hook("linked")
    result = run_client(hookdir, cwd=dump_hook.cwd)
    assert result.returncode == 0, result.stderr
    assert record()["argv"] == ["linked", "start"]


@needs_root
def test_the_execute_bit_is_a_mode_test_not_an_access_check(hookdir, public_tmp):
    """Owner-only execute (root's): the unprivileged client could not run it."""
    log = public_tmp / "ran"
    log.touch()
    log.chmod(0o666)
    logging_hook(hookdir, "root-only", log, 0o700)
    result = run_client(hookdir, ids=(NOBODY, NOBODY, 0))
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["root-only"]


def test_a_missing_directory_is_skipped_silently(public_tmp):
    result = run_client(public_tmp / "no-such-folder")
    assert result.returncode == 0
    assert "does not exist" in result.stderr
    assert "WARNING" not in result.stderr and "ERROR" not in result.stderr


def test_an_unreadable_directory_is_reported(public_tmp):
    not_a_dir = public_tmp / "file"
    not_a_dir.write_text("")
    result = run_client(not_a_dir)
    assert result.returncode == 0
    assert "ERROR Could not read network hook directory" in result.stderr


# --- how a hook is run ---------------------------------------------------------------

def test_environment_is_the_clients_plus_the_hook_variables(hookdir, dump_hook):
    record = dump_hook()
    result = run_client(hookdir, device="eth0,none", delay=2.5, cwd=dump_hook.cwd)
    assert result.returncode == 0, result.stderr
    assert record()["env"] == {**BASE_ENV, "MANDOSNETHOOKDIR": str(hookdir),
                               "DEVICE": "eth0,none", "MODE": "start",
                               "VERBOSITY": "0", "DELAY": "2.500000"}


def test_connect_is_set_only_when_given_and_verbosity_follows_debug(hookdir, dump_hook):
    record = dump_hook()
    result = run_client(hookdir, "stop", connect="[fe80::1%eth0]:1234", debug=True,
                        delay=10.25, cwd=dump_hook.cwd)
    assert result.returncode == 0, result.stderr
    env = record()["env"]
    assert env["CONNECT"] == "[fe80::1%eth0]:1234"
    assert env["VERBOSITY"] == "1"
    assert env["MODE"] == "stop"
    assert env["DELAY"] == "10.250000"
    assert env["DEVICE"] == ""


@pytest.mark.parametrize("delay, text", [(0, "0.000000"), (2.5, "2.500000"),
                                         (0.0000004, "0.000000"), (123.4567891, "123.456789")])
def test_delay_is_printed_with_six_decimals(hookdir, dump_hook, delay, text):
    record = dump_hook()
    run_client(hookdir, delay=delay, cwd=dump_hook.cwd)
    assert record()["env"]["DELAY"] == text


def test_argv_is_the_hook_name_and_the_mode(hookdir, dump_hook):
    record = dump_hook("my-hook")
    run_client(hookdir, "stop", cwd=dump_hook.cwd)
    assert record()["argv"] == ["my-hook", "stop"]


def test_stdout_goes_to_the_clients_stderr_and_stdin_is_dev_null(hookdir, dump_hook):
    record = dump_hook()
    result = run_client(hookdir, cwd=dump_hook.cwd)
    assert "hook output on stdout" in result.stderr
    assert "hook output on stdout" not in result.stdout
    info = record()
    assert info["stdin"] == "/dev/null"
    assert info["stdin_data"] == ""


def test_hooks_get_default_sigpipe_and_no_blocked_signals(hookdir, public_tmp):
    """Python ignores SIGPIPE and SIGXFSZ; hooks must not inherit that."""
    out = public_tmp / "status"
    write_hook(hookdir, "sig", f"exec grep -E '^Sig(Ign|Blk)' /proc/self/status > {out}")
    run_client(hookdir)
    fields = dict(line.split(":\t") for line in lines(out))
    ignored = int(fields["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert int(fields["SigBlk"], 16) == 0


# --- privileges --------------------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("ids", [(NOBODY, 0, 0), (NOBODY, NOBODY, 0)],
                         ids=["effective-root", "lowered"])
def test_hook_runs_as_full_root_when_root_is_the_saved_uid(hookdir, dump_hook, ids):
    record = dump_hook()
    result = run_client(hookdir, ids=ids, cwd=dump_hook.cwd)
    assert result.returncode == 0, result.stderr
    info = record()
    assert info["resuid"] == [0, 0, 0]
    assert info["resgid"] == [0, 0, 0]
    assert info["groups"] == []


@needs_root
def test_without_saved_root_the_hook_exits_noperm_unrun_with_a_warning(hookdir, public_tmp):
    log = public_tmp / "ran"
    logging_hook(hookdir, "needs-root", log)
    result = run_client(hookdir, name="needs-root", ids=(NOBODY, NOBODY, NOBODY))
    assert result.returncode == 0, result.stderr
    assert f"status {EX_NOPERM}" in result.stdout
    assert not log.exists()
    assert "WARNING Network hook needs-root not run: could not become root" in result.stderr


# --- failures --------------------------------------------------------------------------------

def test_failures_are_warnings_and_the_next_hook_still_runs(hookdir, public_tmp):
    log = public_tmp / "ran"
    write_hook(hookdir, "1-exits-3", "exit 3")
    write_hook(hookdir, "2-killed", "kill -KILL $$")
    (hookdir / "3-not-a-program").write_text("just text\n")
    (hookdir / "3-not-a-program").chmod(0o755)
    (hookdir / "4-no-interpreter").write_text("#!/nonexistent/interpreter\n")
    (hookdir / "4-no-interpreter").chmod(0o755)
    logging_hook(hookdir, "5-fine", log)
    result = run_client(hookdir)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert lines(log) == ["5-fine"]
    err = result.stderr
    assert "WARNING Network hook 1-exits-3 exited with status 3" in err
    assert f"WARNING Network hook 2-killed was killed by signal {signal.SIGKILL}" in err
    assert "WARNING Could not execute network hook 3-not-a-program: Exec format error" in err
    assert ("WARNING Could not execute network hook 4-no-interpreter: "
            "No such file or directory") in err
    assert "WARNING Network hook 5-fine" not in err


def test_a_hanging_hook_is_stopped_after_the_timeout(hookdir, public_tmp):
    pids = public_tmp / "pids"
    log = public_tmp / "ran"
    # The hook and a command it waits for, which must not be left behind.
    write_hook(hookdir, "1-hangs", f"sleep 60 & echo $$ $! > {pids}; wait")
    logging_hook(hookdir, "2-next", log)
    started = time.monotonic()
    result = run_client(hookdir, timeout=0.5)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 5
    assert "WARNING Network hook 1-hangs still running after 0.5 seconds" in result.stderr
    assert lines(log) == ["2-next"]
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid)


def test_a_hook_ignoring_sigterm_is_killed(hookdir, public_tmp):
    pids = public_tmp / "pids"
    write_hook(hookdir, "stubborn", f"trap '' TERM; echo $$ > {pids}; "
                                    "while :; do sleep 0.1; done")
    started = time.monotonic()
    result = run_client(hookdir, timeout=0.3, kill_delay=0.3)
    assert time.monotonic() - started < 5
    assert "ignored SIGTERM; killing it" in result.stderr
    assert not alive(int(pids.read_text()))


def test_a_termination_signal_while_a_hook_runs_stops_the_hook(hookdir, public_tmp):
    pids = public_tmp / "pids"
    log = public_tmp / "ran"
    write_hook(hookdir, "1-slow", f"sleep 60 & echo $$ $! > {pids}; wait")
    logging_hook(hookdir, "2-never", log)
    client = subprocess.Popen(client_argv(hookdir, "start", device="", debug=False,
                                          delay=0.0, connect=None, timeout=60.0),
                              env=BASE_ENV, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        hook_pids = [int(pid) for pid in wait_for_file(pids).split()]
        started = time.monotonic()
        client.send_signal(signal.SIGTERM)
        out, err = client.communicate(timeout=RUN_TIMEOUT)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert time.monotonic() - started < 5
    assert "terminated" in out, err
    for pid in hook_pids:
        assert not alive(pid)
    assert not log.exists()


def test_without_a_timeout_a_hook_may_run_long(hookdir, public_tmp):
    log = public_tmp / "ran"
    write_hook(hookdir, "slow", f"sleep 0.5; echo slow > {log}")
    result = run_client(hookdir, timeout=0.2, name="slow")
    assert "still running" in result.stderr  # the bound applies...
    result = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from mandos import hooks; "
         "hooks.run_hooks(sys.argv[2], 'start', device='', debug=False, delay=0, "
         "connect=None, timeout=None)", str(REPO), str(hookdir)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert lines(log) == ["slow"]  # ...unless disabled


def test_original_example_hook_works_unchanged(hookdir, debian_peers):
    """Debian's openvpn example hook, with only a "dev" line configured."""
    examples = debian_peers / "usr/share/doc/mandos-client/examples/network-hooks.d"
    shutil.copy(examples / "openvpn", hookdir / "openvpn")
    (hookdir / "openvpn.conf").write_text("dev tun\n")
    for mode, expected in (("files", "/usr/sbin/openvpn"), ("modules", "tun")):
        result = run_client(hookdir, mode)
        assert result.returncode == 0, result.stderr
        assert expected in result.stderr.splitlines()
        assert "WARNING" not in result.stderr


# --- the example hooks -------------------------------------------------------------------------

def hook_env(hookdir: Path, mode: str, device: str = "", delay: str = "0.000000",
             **extra: str) -> dict[str, str]:
    return {**BASE_ENV, "MANDOSNETHOOKDIR": str(hookdir), "MODE": mode, "DEVICE": device,
            "VERBOSITY": "0", "DELAY": delay, **extra}


def install_example(hookdir: Path, name: str, conf: str | None = None) -> Path:
    """Copy example hook ``name`` into ``hookdir`` with its .conf (or ``conf``)."""
    hook = hookdir / name
    shutil.copy(EXAMPLES / name, hook)
    if conf is None:
        shutil.copy(EXAMPLES / f"{name}.conf", hookdir / f"{name}.conf")
    else:
        (hookdir / f"{name}.conf").write_text(conf)
    return hook


def run_example(hook: Path, mode: str, *, argv_mode: bool = False, prefix=(),
                **env_settings) -> subprocess.CompletedProcess:
    """Run an example hook; the mode in MODE, or only as argv[1] (as at build time)."""
    env = hook_env(hook.parent, mode, **env_settings)
    argv = [*prefix, str(hook)]
    if argv_mode:
        del env["MODE"]
        argv.append(mode)
    return subprocess.run(argv, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)


BRIDGE_CONF = 'BRIDGE=br7\nPORT_ADDRESSES="02:00:5E:00:00:0A"\n'
OPENVPN_CONF = "# sample\n  dev tun   # the device\nremote 192.0.2.1\n"
WIRELESS_CONF = """\
ADDRESS_0=02:00:5e:00:00:1a
MODULE_0=ath9k
IPADDRS_0=dhcp
#ADDRESS_2=02:00:5e:00:00:2a
#MODULE_2=unused
ADDRESS_1=02:00:5e:00:00:1b
MODULE_1="iwlwifi"
"""
WIREGUARD_CONF = "INTERFACE=wg7\nADDRESSES=10.77.0.2/24\n"


def test_example_hooks_are_executable_and_confs_are_not():
    for name in ("bridge", "openvpn", "wireless", "wireguard"):
        assert (EXAMPLES / name).stat().st_mode & 0o7777 == 0o755
        assert (EXAMPLES / f"{name}.conf").stat().st_mode & 0o7777 == 0o644
        assert (EXAMPLES / name).read_text().startswith("#!/bin/sh\n")
        assert "\nset -e\n" in (EXAMPLES / name).read_text()


@pytest.mark.parametrize("name, conf, files, modules", [
    ("bridge", BRIDGE_CONF, ["ip"], ["bridge"]),
    ("openvpn", OPENVPN_CONF, ["openvpn"], ["tun"]),
    ("wireless", WIRELESS_CONF, ["wpa_supplicant", "wpa_cli", "ip"],
     ["ath9k", "iwlwifi", "af_packet"]),
    ("wireguard", WIREGUARD_CONF, ["wg", "ip"], ["wireguard"]),
])
@pytest.mark.parametrize("argv_mode", [False, True], ids=["MODE", "argument"])
def test_example_files_and_modules(hookdir, name, conf, files, modules, argv_mode):
    hook = install_example(hookdir, name, conf)
    result = run_example(hook, "files", argv_mode=argv_mode)
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert [Path(path).name for path in paths] == files
    assert all(path.startswith("/") for path in paths)
    if name in ("bridge", "wireless", "wireguard"):
        assert Path(paths[-1]).exists()  # the ip actually present and used
    result = run_example(hook, "modules", argv_mode=argv_mode)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == modules


@pytest.mark.parametrize("name", ["bridge", "openvpn", "wireless", "wireguard"])
def test_unconfigured_example_hooks_do_nothing(hookdir, name):
    hook = install_example(hookdir, name, "# nothing set\n")
    for mode in ("files", "modules", "start", "stop"):
        result = run_example(hook, mode)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("name", ["bridge", "openvpn", "wireless", "wireguard"])
def test_example_hooks_ignore_unknown_modes(hookdir, name):
    hook = install_example(hookdir, name, {"bridge": BRIDGE_CONF, "openvpn": OPENVPN_CONF,
                                           "wireless": WIRELESS_CONF,
                                           "wireguard": WIREGUARD_CONF}[name])
    result = run_example(hook, "restart")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# --- namespaces ------------------------------------------------------------------------------

_netns_counter = count()


@pytest.fixture
def netns():
    """A fresh network namespace (with lo up); always deleted afterwards."""
    name = f"mandos-hooks-{os.getpid()}-{next(_netns_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def ns_ip(netns: str, *args: str) -> list[dict]:
    """``ip -j`` output inside the namespace, parsed ([] if the object is missing)."""
    result = subprocess.run(["ip", "-j", "-n", netns, *args], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 and result.stdout.strip() else []


def add_veth(netns: str, name: str, mac: str, peer_up: bool = False) -> None:
    subprocess.run(["ip", "-n", netns, "link", "add", name, "address", mac, "type", "veth",
                    "peer", "name", f"{name}p"], check=True)
    if peer_up:
        subprocess.run(["ip", "-n", netns, "link", "set", f"{name}p", "up"], check=True)


def in_netns(netns: str) -> tuple[str, ...]:
    """Prefix that runs a command in the namespace (with its own /sys view)."""
    return ("ip", "netns", "exec", netns)


@needs_root
def test_bridge_hook_start_and_stop(hookdir, netns):
    add_veth(netns, "port7", "02:00:5e:00:00:0a")
    add_veth(netns, "other7", "02:00:5e:00:00:0b")
    hook = install_example(hookdir, "bridge", BRIDGE_CONF
                           + 'IPADDRS="192.0.2.7/24 2001:db8:7::7/64"\n'
                           + 'ROUTES="198.51.100.0/24"\n')
    result = run_example(hook, "start", prefix=in_netns(netns), delay="0.500000")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    [bridge] = ns_ip(netns, "-d", "link", "show", "dev", "br7")
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in bridge["flags"]
    [port] = ns_ip(netns, "link", "show", "dev", "port7")
    assert port.get("master") == "br7"
    assert "UP" in port["flags"]
    [other] = ns_ip(netns, "link", "show", "dev", "other7")
    assert "master" not in other
    [addresses] = ns_ip(netns, "address", "show", "dev", "br7")
    local = {info["local"] for info in addresses["addr_info"]}
    assert {"192.0.2.7", "2001:db8:7::7"} <= local
    routes = ns_ip(netns, "route", "show", "198.51.100.0/24")
    assert [route["dev"] for route in routes] == ["br7"]

    result = run_example(hook, "stop", prefix=in_netns(netns))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert ns_ip(netns, "link", "show", "dev", "br7") == []
    [port] = ns_ip(netns, "link", "show", "dev", "port7")
    assert "master" not in port
    assert "UP" not in port["flags"]
    # A second stop (as after a start that never ran) is harmless.
    result = run_example(hook, "stop", prefix=in_netns(netns))
    assert (result.returncode, result.stderr) == (0, "")


@needs_root
@pytest.mark.parametrize("device, acts", [("other0", False), ("eth0,br7x", False),
                                          ("eth0,br7", True), ("br7", True)])
def test_bridge_hook_obeys_device(hookdir, netns, device, acts):
    add_veth(netns, "port7", "02:00:5e:00:00:0a")
    hook = install_example(hookdir, "bridge", BRIDGE_CONF)
    result = run_example(hook, "start", prefix=in_netns(netns), device=device)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert bool(ns_ip(netns, "link", "show", "dev", "br7")) == acts
    result = run_example(hook, "modules", device=device)
    assert result.stdout.split() == (["bridge"] if acts else [])


# Stand-ins for programs the test machine may lack.  Each appends its
# name and arguments to $STANDIN_LOG, one a line after a "|", then a ".".
STANDIN_PREAMBLE = """#!/bin/sh
{ for arg in "$0" "$@"; do printf '|%s\\n' "$arg"; done; echo .; } >> "$STANDIN_LOG"
"""
FAKE_OPENVPN = STANDIN_PREAMBLE + """
while [ $# -gt 0 ]; do
    if [ "$1" = --writepid ]; then pidfile="$2"; fi
    shift
done
sleep 60 </dev/null >/dev/null 2>&1 &
echo $! > "$pidfile"
"""
FAKE_WPA_SUPPLICANT = STANDIN_PREAMBLE
FAKE_WPA_CLI = STANDIN_PREAMBLE + """
case " $* " in
    *" interface_add "*)
        shift 2; /bin/ip link set dev "$2" up; echo OK ;;
    *" add_network "*) echo 0 ;;
    *" status "*) printf 'bssid=02:00:5e:00:00:99\\nwpa_state=COMPLETED\\n' ;;
    *) echo OK ;;
esac
"""
FAKE_WG = STANDIN_PREAMBLE
FAKE_IP = STANDIN_PREAMBLE


def with_standins(tmp: Path, standins: dict[str, str], bind: dict[str, str] | None = None
                  ) -> tuple[str, ...]:
    """Prefix: private mounts, an empty /run, and /usr/sbin holding only the
    stand-ins (``bind`` maps stand-ins mounted over other existing files)."""
    standin_dir = tmp / "standins"
    standin_dir.mkdir(exist_ok=True)
    script = ["set -e", "mount -t tmpfs tmpfs /run",
              "mount -t tmpfs tmpfs /usr/sbin"]
    for name, text in standins.items():
        (standin_dir / name).write_text(text)
        (standin_dir / name).chmod(0o755)
        script.append(f"cp {standin_dir / name} /usr/sbin/{name}")
    for name, target in (bind or {}).items():
        (standin_dir / name).write_text(standins.get(name, FAKE_IP))
        (standin_dir / name).chmod(0o755)
        script.append(f"mount --bind {standin_dir / name} {target}")
    script.append('exec "$@"')
    return ("unshare", "--mount", "--propagation", "private",
            "sh", "-c", "\n".join(script), "standins")


def standin_calls(log: Path) -> list[list[str]]:
    """The recorded calls: each a list, the program's base name first."""
    calls, call = [], []
    for line in log.read_text().splitlines():
        if line == ".":
            calls.append([Path(call[0]).name, *call[1:]])
            call = []
        else:
            call.append(line[1:])
    return calls


@needs_root
def test_openvpn_hook_start_and_stop(hookdir, public_tmp):
    """start runs openvpn as a daemon from the hook folder; stop kills its PID."""
    log = public_tmp / "standin.log"
    hook = install_example(hookdir, "openvpn", OPENVPN_CONF)
    prefix = with_standins(public_tmp, {"openvpn": FAKE_OPENVPN})
    pidfile_check = public_tmp / "pid"
    started = time.monotonic()
    # Both modes in one mount namespace (so that /run is the same).
    script = (f'MODE=start "$0"; cat /run/openvpn-mandos.pid > {pidfile_check}; '
              f'MODE=stop "$0"; test ! -e /run/openvpn-mandos.pid')
    env = hook_env(hookdir, "", delay="0.300000", STANDIN_LOG=str(log))
    result = subprocess.run([*prefix, "sh", "-c", script, str(hook)], env=env,
                            capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert time.monotonic() - started >= 0.3  # slept DELAY
    assert standin_calls(log) == [["openvpn", "--cd", str(hookdir), "--daemon",
                                   "openvpn(Mandos)", "--writepid",
                                   "/run/openvpn-mandos.pid", "--config", "openvpn.conf"]]
    daemon = int(pidfile_check.read_text())
    deadline = time.monotonic() + 5
    while alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(daemon)


@pytest.mark.parametrize("device, acts", [("other0", False), ("eth0,tap0", False),
                                          ("tun0", True), ("eth0,tun1", True),
                                          ("tun", True)])
def test_openvpn_hook_obeys_device_prefix(hookdir, device, acts):
    """An element of DEVICE starting with the "dev" value selects the hook."""
    hook = install_example(hookdir, "openvpn", OPENVPN_CONF)
    result = run_example(hook, "files", device=device)
    assert result.returncode == 0
    assert result.stdout.split() == (["/usr/sbin/openvpn"] if acts else [])
    if not acts:  # start does nothing (it would fail for lack of openvpn otherwise)
        result = run_example(hook, "start", device=device)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


WIRELESS_TEST_CONF = """\
ADDRESS_0=02:00:5E:00:00:1A
MODULE_0=ath9k
WPA_DRIVER_0=nl80211
wpa_interface_0() {
    wpa_cli_set ssid "my net"
    wpa_cli_set psk "pass phrase"
    wpa_cli_set scan_ssid 1
    "$wpa_cli" -p "$CTRLDIR" -i "$INTERFACE" bssid "$NETWORK" 02:00:5e:00:00:99
    "$wpa_cli" -g "$CTRL" ping
}
IPADDRS_0="192.0.2.26/24"
ROUTES_0="198.51.100.0/24"
"""


@needs_root
def test_wireless_hook_start_and_stop(hookdir, netns, public_tmp):
    add_veth(netns, "wlan7", "02:00:5e:00:00:1a", peer_up=True)
    log = public_tmp / "standin.log"
    hook = install_example(hookdir, "wireless", WIRELESS_TEST_CONF)
    prefix = (*in_netns(netns), *with_standins(
        public_tmp, {"wpa_supplicant": FAKE_WPA_SUPPLICANT, "wpa_cli": FAKE_WPA_CLI}))
    env = hook_env(hookdir, "start", delay="5.000000", STANDIN_LOG=str(log))
    started = time.monotonic()
    result = subprocess.run([*prefix, str(hook)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert time.monotonic() - started < 4  # did not wait once connected
    ctl = ["-p", "/run/wpa_supplicant", "-i", "wlan7"]
    calls = standin_calls(log)
    assert calls[:9] == [
        ["wpa_supplicant", "-B", "-g", "/run/wpa_supplicant-global", "-p",
         "/run/wpa_supplicant", "-P/run/wpa_supplicant-mandos.pid"],
        ["wpa_cli", "-g", "/run/wpa_supplicant-global", "interface_add", "wlan7", "",
         "nl80211", "/run/wpa_supplicant"],
        ["wpa_cli", *ctl, "add_network"],
        ["wpa_cli", *ctl, "set_network", "0", "ssid", '"my net"'],
        ["wpa_cli", *ctl, "set_network", "0", "psk", '"pass phrase"'],
        ["wpa_cli", *ctl, "set_network", "0", "scan_ssid", "1"],
        ["wpa_cli", *ctl, "bssid", "0", "02:00:5e:00:00:99"],
        ["wpa_cli", "-g", "/run/wpa_supplicant-global", "ping"],
        ["wpa_cli", *ctl, "enable_network", "0"],
    ]
    # Then it polled the status until the link was up (linkwatch may lag).
    assert calls[9:] and all(call == ["wpa_cli", *ctl, "status"] for call in calls[9:])
    [addresses] = ns_ip(netns, "address", "show", "dev", "wlan7")
    assert "192.0.2.26" in {info["local"] for info in addresses["addr_info"]}
    assert [r["dev"] for r in ns_ip(netns, "route", "show", "198.51.100.0/24")] == ["wlan7"]

    log.unlink()
    env["MODE"] = "stop"
    result = subprocess.run([*prefix, str(hook)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert standin_calls(log) == [["wpa_cli", "-g", "/run/wpa_supplicant-global",
                                   "terminate"]]
    [link] = ns_ip(netns, "address", "show", "dev", "wlan7")
    assert "UP" not in link["flags"]
    assert all(info.get("scope") != "global" for info in link["addr_info"])


@needs_root
@pytest.mark.parametrize("device, acts", [("other0", False), ("wlan7x,eth0", False),
                                          ("eth0,wlan7", True)])
def test_wireless_hook_obeys_device(hookdir, netns, device, acts):
    add_veth(netns, "wlan7", "02:00:5e:00:00:1a")
    hook = install_example(hookdir, "wireless", WIRELESS_TEST_CONF)
    result = run_example(hook, "modules", prefix=in_netns(netns), device=device)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == (["ath9k"] if acts else [])
    if not acts:  # start does nothing (it would fail for lack of wpa_supplicant)
        result = run_example(hook, "start", prefix=in_netns(netns), device=device)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def _wireguard_available() -> str | None:
    """Why the real WireGuard test cannot run here, or None."""
    if shutil.which("wg") is None:
        return "the wg tool is missing (Debian package wireguard-tools)"
    probe = subprocess.run(["ip", "link", "add", "mandos-wgprobe", "type", "wireguard"],
                           capture_output=True)
    if probe.returncode != 0:
        return "the kernel has no WireGuard support"
    subprocess.run(["ip", "link", "delete", "mandos-wgprobe"], capture_output=True)
    return None


WG_KEYS = """\
[Interface]
PrivateKey = {private}
ListenPort = 51877

[Peer]
PublicKey = {peer}
AllowedIPs = 10.77.0.1/32, 198.51.100.0/24
Endpoint = 192.0.2.1:51820
"""


@needs_root
def test_wireguard_hook_start_and_stop_for_real(hookdir, netns):
    """The real thing: needs the wg tool and WireGuard in the kernel.

    Where either is missing (the test machine may lack both) this test is
    skipped, and test_wireguard_hook_command_sequence below still checks
    what the hook runs, with stand-ins for ip and wg; files, modules and
    the DEVICE filter are checked without them.
    """
    missing = _wireguard_available()
    if missing:
        pytest.skip(missing)
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True,
                             check=True).stdout.strip()
    peer = subprocess.run(["wg", "pubkey"], input=subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True).stdout,
        capture_output=True, text=True, check=True).stdout.strip()
    (hookdir / "wireguard-wg7.conf").write_text(WG_KEYS.format(private=private, peer=peer))
    hook = install_example(hookdir, "wireguard",
                           WIREGUARD_CONF + 'ROUTES="198.51.100.0/24"\nMTU=1380\n')
    result = run_example(hook, "start", prefix=in_netns(netns))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    [link] = ns_ip(netns, "address", "show", "dev", "wg7")
    assert "UP" in link["flags"] and link["mtu"] == 1380
    assert "10.77.0.2" in {info["local"] for info in link["addr_info"]}
    assert [r["dev"] for r in ns_ip(netns, "route", "show", "198.51.100.0/24")] == ["wg7"]
    shown = subprocess.run([*in_netns(netns), "wg", "show", "wg7", "peers"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == [peer]
    result = run_example(hook, "stop", prefix=in_netns(netns))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert ns_ip(netns, "link", "show", "dev", "wg7") == []


@needs_root
def test_wireguard_hook_command_sequence(hookdir, netns, public_tmp):
    """What start and stop run, with stand-ins for ip and wg (no kernel support
    needed); stop deletes the interface only if it exists."""
    log = public_tmp / "standin.log"
    hook = install_example(hookdir, "wireguard",
                           WIREGUARD_CONF + 'ROUTES="198.51.100.0/24 2001:db8:77::/48"\n'
                           + "MTU=1380\n")
    bind = {"ip": "/usr/bin/ip"}
    if os.path.exists("/usr/bin/wg"):  # the hook prefers the installed wg
        bind["wg"] = "/usr/bin/wg"
    prefix = (*in_netns(netns), *with_standins(public_tmp, {"wg": FAKE_WG}, bind=bind))
    env = hook_env(hookdir, "start", STANDIN_LOG=str(log))
    result = subprocess.run([*prefix, str(hook)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert standin_calls(log) == [
        ["ip", "link", "add", "dev", "wg7", "type", "wireguard"],
        ["wg", "setconf", "wg7", f"{hookdir}/wireguard-wg7.conf"],
        ["ip", "link", "set", "dev", "wg7", "mtu", "1380"],
        ["ip", "address", "add", "10.77.0.2/24", "dev", "wg7"],
        ["ip", "link", "set", "dev", "wg7", "up"],
        ["ip", "route", "add", "198.51.100.0/24", "dev", "wg7"],
        ["ip", "route", "add", "2001:db8:77::/48", "dev", "wg7"],
    ]
    log.unlink()
    env["MODE"] = "stop"
    result = subprocess.run([*prefix, str(hook)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stderr) == (0, "")
    assert not log.exists()  # no wg7 here: nothing to delete
    subprocess.run(["ip", "-n", netns, "link", "add", "wg7", "type", "veth",
                    "peer", "name", "wg7p"], check=True)
    result = subprocess.run([*prefix, str(hook)], env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    assert (result.returncode, result.stderr) == (0, "")
    assert standin_calls(log) == [["ip", "link", "delete", "dev", "wg7"]]


@needs_root
@pytest.mark.parametrize("device, acts", [("other0", False), ("wg77", False),
                                          ("eth0,wg7", True)])
def test_wireguard_hook_obeys_device(hookdir, netns, device, acts):
    hook = install_example(hookdir, "wireguard", WIREGUARD_CONF)
    result = run_example(hook, "modules", device=device)
    assert result.stdout.split() == (["wireguard"] if acts else [])
    if not acts:  # start would create wg7 or fail trying
        result = run_example(hook, "start", prefix=in_netns(netns), device=device)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
        assert ns_ip(netns, "link", "show", "dev", "wg7") == []
