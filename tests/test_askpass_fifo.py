"""askpass-fifo (CLIENT.md section 4), run as a real process.

The FIFO path is fixed at /lib/cryptsetup/passfifo.  To leave the host
alone, every run happens in a private mount namespace in which the real
folder behind /lib is covered by an overlay whose writable layer is a tmpfs:
the plugin and the writer see /lib/cryptsetup, nothing outside does.
"""

import os
import shlex
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mandos.plugins import askpass_fifo

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "plugins.d" / "askpass-fifo"
FIFO = askpass_fifo.FIFO_PATH
LIBDIR = os.path.realpath(os.path.dirname(os.path.dirname(FIFO)))
NOBODY = 65534


# Start the program the way plugin-runner starts a root-owned set-user-ID
# plugin: real IDs unprivileged, effective and saved IDs root.
SETUID_START = (
    "import os, sys;"
    f"os.setresgid({NOBODY}, 0, 0); os.setresuid({NOBODY}, 0, 0);"
    "os.execv(sys.argv[1], sys.argv[1:])"
)
UNPRIVILEGED_START = (
    "import os, sys;"
    f"os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY});"
    f"os.setresuid({NOBODY}, {NOBODY}, {NOBODY});"
    "os.execv(sys.argv[1], sys.argv[1:])"
)


class Sandbox:
    """Runs a command in a mount namespace with a private /lib/cryptsetup."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scratch = root / "scratch"
        self.out = root / "out"
        self.scratch.mkdir()
        self.out.mkdir()
        os.chmod(self.out, 0o777)

    def script(self, setup: str, writer: str | None, after: str | None) -> str:
        """The shell script run inside the namespace; "$@" is the program."""
        scratch = shlex.quote(str(self.scratch))
        lines = [
            "set -e",
            f"mount -t tmpfs tmpfs {scratch}",
            f"mkdir {scratch}/upper {scratch}/work",
            "mount -t overlay overlay -o "
            f"lowerdir={LIBDIR},upperdir={scratch}/upper,workdir={scratch}/work {LIBDIR}",
            setup,
            "set +e",
            "PLUGIN_PID=$$",
        ]
        if writer is not None:
            lines.append(f"( {writer} ) &")
        if after is None:
            lines.append('exec "$@"')
        else:
            lines += ['"$@"', "rc=$?", "wait", after, "exit $rc"]
        return "\n".join(lines)

    def start(self, program: list[str], setup: str = "mkdir -p /lib/cryptsetup",
              writer: str | None = None, after: str | None = None,
              stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
        """Start *program* in a fresh namespace; the caller waits for it."""
        argv = ["unshare", "--mount", "--propagation", "private",
                "sh", "-c", self.script(setup, writer, after), "sh", *program]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=subprocess.PIPE, env=self.env())

    def run(self, program: list[str], **kwargs) -> tuple[int, bytes, bytes]:
        """Run *program* to the end; return (status, stdout, stderr)."""
        proc = self.start(program, **kwargs)
        try:
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, out or b"", err

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "OUT": str(self.out)}

    def feed(self, data: bytes) -> str:
        """A writer command that sends *data* once the FIFO exists."""
        source = self.out / "input"
        source.write_bytes(data)
        return f"{WAIT_FOR_FIFO}; cat {shlex.quote(str(source))} > {FIFO}"


WAIT_FOR_FIFO = f"i=0; while [ ! -p {FIFO} ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done"


@pytest.fixture
def sandbox(public_tmp: Path) -> Sandbox:
    return Sandbox(public_tmp)


@pytest.fixture
def original(debian_peers: Path) -> Path:
    path = debian_peers / "usr/lib/x86_64-linux-gnu/mandos/plugins.d/askpass-fifo"
    assert path.is_file()
    return path


def ours() -> list[str]:
    return [str(PLUGIN)]


PASSWORDS = [
    b"correct horse battery staple",
    b"ends with a newline\n",
    bytes(range(256)),
    b"x" * 5000,  # more than several 1 KiB reads
    b"",
]


@pytest.mark.parametrize("password", PASSWORDS, ids=["text", "newline", "binary", "long", "empty"])
def test_prints_writer_bytes_unchanged(sandbox: Sandbox, password: bytes) -> None:
    status, out, err = sandbox.run(ours(), writer=sandbox.feed(password))
    assert (status, out, err) == (0, password, b"")


def test_arguments_are_ignored(sandbox: Sandbox) -> None:
    status, out, _ = sandbox.run(ours() + ["--help", "--bogus", "x"], writer=sandbox.feed(b"pw"))
    assert (status, out) == (0, b"pw")


def test_fifo_is_root_owned_mode_0600_and_left_in_place(sandbox: Sandbox) -> None:
    writer = f"{WAIT_FOR_FIFO}; stat -c '%F %a %u %g' {FIFO} > $OUT/during; printf pw > {FIFO}"
    after = f"stat -c '%F %a %u %g' {FIFO} > $OUT/after"
    status, out, _ = sandbox.run(ours(), writer=writer, after=after)
    assert (status, out) == (0, b"pw")
    assert (sandbox.out / "during").read_text() == "fifo 600 0 0\n"
    assert (sandbox.out / "after").read_text() == "fifo 600 0 0\n"


def test_existing_fifo_is_used_as_it_is(sandbox: Sandbox) -> None:
    setup = f"mkdir -p /lib/cryptsetup && mkfifo -m 0640 {FIFO}"
    after = f"stat -c '%F %a' {FIFO} > $OUT/after"
    status, out, _ = sandbox.run(ours(), setup=setup, writer=sandbox.feed(b"pw"), after=after)
    assert (status, out) == (0, b"pw")
    assert (sandbox.out / "after").read_text() == "fifo 640\n"


def test_setuid_start_drops_to_real_ids_after_opening(sandbox: Sandbox) -> None:
    """Emulated set-user-ID start: FIFO made as root, reading done as the real user."""
    writer = (
        f"{WAIT_FOR_FIFO}; stat -c '%u %g %a' {FIFO} > $OUT/owner;"
        f" exec 3> {FIFO}; printf 'secret' >&3;"
        # wait (bounded) until the plugin has dropped, then record its IDs
        " i=0; while ! grep -q '^Uid:.65534.65534.65534.65534$' /proc/$PLUGIN_PID/status"
        " && [ $i -lt 300 ]; do sleep 0.01; i=$((i+1)); done;"
        " grep -E '^(Uid|Gid):' /proc/$PLUGIN_PID/status > $OUT/ids; exec 3>&-"
    )
    program = ["/usr/bin/python3", "-I", "-c", SETUID_START, str(PLUGIN)]
    status, out, err = sandbox.run(program, writer=writer)
    assert (status, out, err) == (0, b"secret", b"")
    assert (sandbox.out / "owner").read_text() == "0 0 600\n"
    ids = (sandbox.out / "ids").read_text().split("\n")
    assert ids[0].split() == ["Uid:"] + [str(NOBODY)] * 4
    assert ids[1].split() == ["Gid:"] + [str(NOBODY)] * 4


def test_missing_cryptsetup_folder_is_unavailable(sandbox: Sandbox) -> None:
    status, out, err = sandbox.run(ours(), setup="rm -rf /lib/cryptsetup")
    assert (status, out) == (os.EX_UNAVAILABLE, b"")
    assert err.startswith(b"Mandos plugin askpass-fifo: ")


def test_cryptsetup_not_a_folder_is_osfile(sandbox: Sandbox) -> None:
    status, _, _ = sandbox.run(ours(), setup="rm -rf /lib/cryptsetup && touch /lib/cryptsetup")
    assert status == os.EX_OSFILE


def test_mkfifo_permission_denied_is_osfile(sandbox: Sandbox) -> None:
    program = ["/usr/bin/python3", "-I", "-c", UNPRIVILEGED_START, str(PLUGIN)]
    status, _, err = sandbox.run(program)
    assert status == os.EX_OSFILE
    assert b"mkfifo" in err


def test_open_permission_denied_is_unavailable(sandbox: Sandbox) -> None:
    setup = f"mkdir -p /lib/cryptsetup && mkfifo -m 0600 {FIFO}"
    program = ["/usr/bin/python3", "-I", "-c", UNPRIVILEGED_START, str(PLUGIN)]
    status, _, err = sandbox.run(program, setup=setup)
    assert status == os.EX_UNAVAILABLE
    assert b"open" in err


def test_symlink_loop_is_osfile(sandbox: Sandbox) -> None:
    setup = f"mkdir -p /lib/cryptsetup && ln -s passfifo {FIFO}"
    status, _, _ = sandbox.run(ours(), setup=setup)
    assert status == os.EX_OSFILE


def test_reading_a_folder_is_unavailable(sandbox: Sandbox) -> None:
    status, _, err = sandbox.run(ours(), setup=f"mkdir -p {FIFO}")
    assert status == os.EX_UNAVAILABLE
    assert b"read" in err


def test_write_error_is_ioerr(sandbox: Sandbox) -> None:
    with open("/dev/full", "wb") as full:
        proc = sandbox.start(ours(), writer=sandbox.feed(b"pw"), stdout=full.fileno())
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == os.EX_IOERR
    assert b"write" in err


def test_broken_pipe_is_ioerr(sandbox: Sandbox) -> None:
    """Deviation: the original dies by SIGPIPE; Python ignores it, so EPIPE gives EX_IOERR."""
    proc = sandbox.start(ours(), writer=sandbox.feed(b"pw"))
    proc.stdout.close()  # nobody will read the password
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == os.EX_IOERR
    assert b"write" in err


def test_closed_stdout_is_osfile(sandbox: Sandbox) -> None:
    program = ["/usr/bin/python3", "-I", "-c",
               "import os, sys; os.close(1); os.execv(sys.argv[1], sys.argv[1:])", str(PLUGIN)]
    status, _, _ = sandbox.run(program, writer=sandbox.feed(b"pw"))
    assert status == os.EX_OSFILE


def _wait_for_fifo(pid: int, timeout: float = 5.0) -> None:
    """Wait until the FIFO exists in the mount namespace of *pid*."""
    path = f"/proc/{pid}/root{FIFO}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stat.S_ISFIFO(os.stat(path).st_mode):
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("the FIFO never appeared")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_waiting_kills_it(sandbox: Sandbox, signum: int) -> None:
    """No handlers: SIGTERM (and SIGINT, despite Python's own handler) end it by the signal."""
    proc = sandbox.start(ours())
    try:
        _wait_for_fifo(proc.pid)
        time.sleep(0.05)
        assert proc.poll() is None, "must block until a writer appears"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signum
    assert (out, err) == (b"", b"")


def test_fifo_path_is_fixed() -> None:
    assert askpass_fifo.FIFO_PATH == "/lib/cryptsetup/passfifo"
    assert askpass_fifo.FIFO_MODE == 0o600


@pytest.mark.interop
@pytest.mark.parametrize("password", PASSWORDS, ids=["text", "newline", "binary", "long", "empty"])
def test_same_output_as_original(sandbox: Sandbox, original: Path, password: bytes) -> None:
    theirs = sandbox.run([str(original)], writer=sandbox.feed(password))
    mine = sandbox.run(ours(), writer=sandbox.feed(password))
    assert (mine[0], mine[1]) == (theirs[0], theirs[1]) == (0, password)


@pytest.mark.interop
@pytest.mark.parametrize("setup", [
    "rm -rf /lib/cryptsetup",
    "rm -rf /lib/cryptsetup && touch /lib/cryptsetup",
    f"mkdir -p /lib/cryptsetup && ln -s passfifo {FIFO}",
    f"mkdir -p {FIFO}",
], ids=["missing", "not-a-folder", "loop", "folder"])
def test_same_status_as_original_on_errors(sandbox: Sandbox, original: Path, setup: str) -> None:
    theirs = sandbox.run([str(original)], setup=setup)
    mine = sandbox.run(ours(), setup=setup)
    assert mine[0] == theirs[0] != 0
    assert mine[1] == theirs[1] == b""


@pytest.mark.interop
def test_same_status_as_original_on_write_error(sandbox: Sandbox, original: Path) -> None:
    statuses = []
    for program in ([str(original)], ours()):
        with open("/dev/full", "wb") as full:
            proc = sandbox.start(program, writer=sandbox.feed(b"pw"), stdout=full.fileno())
        proc.communicate(timeout=10)
        statuses.append(proc.returncode)
    assert statuses == [os.EX_IOERR, os.EX_IOERR]


@pytest.mark.interop
def test_works_as_a_plugin_of_the_original_plugin_runner(sandbox: Sandbox,
                                                         debian_peers: Path) -> None:
    """The original runner cannot grant root to a script: it runs its plugins as root here."""
    plugin_dir = sandbox.root / "plugins.d"
    plugin_dir.mkdir()
    (plugin_dir / "askpass-fifo").symlink_to(PLUGIN)
    config = sandbox.root / "plugin-runner.conf"
    config.write_text("")
    runner = debian_peers / "usr/lib/x86_64-linux-gnu/mandos/plugin-runner"
    program = [str(runner), f"--plugin-dir={plugin_dir}", f"--config-file={config}",
               "--userid=0", "--groupid=0"]
    password = b"through\x00the runner\n"
    status, out, err = sandbox.run(program, writer=sandbox.feed(password))
    assert (status, out) == (0, password), err
