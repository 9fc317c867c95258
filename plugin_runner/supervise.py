"""Starting plugins and watching them until one delivers a password.

A plugin *wins* when it has both exited with status 0 and closed its
standard output (every holder of the pipe's write end closed it).  Its
output, byte for byte, is the password.  Plugins that fail are forgotten;
when all have failed the caller falls back to a prompt.

Bounds the original lacks (see plugin-runner(8mandos)):
- a plugin may buffer at most MAX_OUTPUT bytes; past that it is stopped
  and counted as failed;
- plugins that do not end within KILL_GRACE_SECONDS of SIGTERM are killed.
"""

import _signal
import os
import select
import time

from plugin_runner.options import Settings
from plugin_runner.privileges import PrivilegeState, become_plugin_user
from plugin_runner.scan import Candidate

# cryptsetup itself reads at most 8 MiB from a key file.
MAX_OUTPUT = 8 * 1024 * 1024
KILL_GRACE_SECONDS = 5.0
READ_SIZE = 65536

# Dispositions the runner changes and children must not inherit.  Python
# itself ignores SIGPIPE and SIGXFSZ at start-up, unconditionally, so what
# the caller had there is unknowable: plugins get the default, as from
# subprocess.  SIGTERM, SIGINT and SIGHUP that the caller ignored stay
# ignored (see Supervisor's ``ignored_signals``).
_RESET_IN_CHILD = (_signal.SIGPIPE, _signal.SIGXFSZ, _signal.SIGCHLD,
                   _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP)


class Plugin:
    """A started plugin process and what it has written so far."""

    __slots__ = ("name", "pid", "fd", "output", "size", "status", "eof", "failed")

    def __init__(self, name: str, pid: int, fd: int) -> None:
        self.name = name
        self.pid = pid
        self.fd = fd                # read end of its stdout pipe, or -1
        self.output: list[bytes] = []
        self.size = 0
        self.status: int | None = None  # wait status once reaped
        self.eof = False
        self.failed = False         # stopped by us (output flood)


def build_argv(name: str, settings: Settings) -> list[str]:
    """argv: the file name, the plugin's own arguments, then the global ones."""
    own = settings.plugins.get(name)
    return [name] + (own.args if own else []) + settings.global_record.args


def build_env(name: str, settings: Settings, inherited: dict[str, str]) -> dict[str, str]:
    """Environment: --env-for beats --global-env beats the inherited one."""
    env = dict(inherited)
    env.update(settings.global_record.env)
    own = settings.plugins.get(name)
    if own is not None:
        env.update(own.env)
    return env


class Supervisor:
    """Owns the plugin processes from start to the last reap."""

    def __init__(self, settings: Settings, privileges: PrivilegeState, wakeup_fd: int,
                 debug, inherited_env: dict[str, str],
                 ignored_signals: frozenset = frozenset()) -> None:
        self.settings = settings
        self.ignored_signals = ignored_signals
        self.inherited_env = inherited_env
        self.privileges = privileges
        self.wakeup_fd = wakeup_fd
        self.debug = debug
        self.plugins: list[Plugin] = []   # started and not yet reaped or dropped
        self.children: dict[int, Plugin] = {}  # every pid not yet reaped

    # -- starting ---------------------------------------------------------

    def start(self, candidate: Candidate) -> None:
        """Fork and execute one plugin with its stdout on a new pipe."""
        argv = build_argv(candidate.name, self.settings)
        env = build_env(candidate.name, self.settings, self.inherited_env)
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:
            self._exec_child(candidate, argv, env, write_fd)
        os.close(write_fd)
        os.close(candidate.fd)
        os.set_blocking(read_fd, False)
        plugin = Plugin(candidate.name, pid, read_fd)
        self.plugins.append(plugin)
        self.children[pid] = plugin
        self.debug(f"Plugin {candidate.name} started (PID {pid})")

    def _exec_child(self, candidate: Candidate, argv, env, write_fd: int) -> None:
        """Runs in the forked child; never returns."""
        try:
            for signum in _RESET_IN_CHILD:
                _signal.signal(signum, _signal.SIG_IGN if signum in self.ignored_signals
                               else _signal.SIG_DFL)
            _signal.set_wakeup_fd(-1)
            _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
            os.dup2(write_fd, 1)
            become_plugin_user(self.privileges, candidate.setuid_root,
                               candidate.setgid_root)
            # Execute the very file that was checked, through its descriptor
            # (a script's interpreter then opens /dev/fd/N).
            os.set_inheritable(candidate.fd, True)
            os.execve(candidate.fd, argv, env)
        except BaseException as err:  # noqa: BLE001 - the child must not return
            try:
                os.write(2, f"plugin-runner: cannot execute plugin {candidate.name}: "
                            f"{getattr(err, 'strerror', None) or err}\n".encode())
            finally:
                os._exit(os.EX_OSERR)

    # -- watching ---------------------------------------------------------

    def run_until_winner(self, stop_requested) -> Plugin | None:
        """Supervise until a plugin wins (returned) or all failed (None).

        ``stop_requested()`` is checked after every wake-up; when true the
        loop returns None at once.
        """
        poller = select.poll()
        poller.register(self.wakeup_fd, select.POLLIN)
        for plugin in self.plugins:
            poller.register(plugin.fd, select.POLLIN)
        while self.plugins:
            if stop_requested():
                return None
            for fd, _ in poller.poll():
                if fd == self.wakeup_fd:
                    _drain(fd)
                    continue
                plugin = next((p for p in self.plugins if p.fd == fd), None)
                if plugin is not None:
                    self._read(plugin, poller)
            self.reap()
            for plugin in list(self.plugins):
                if plugin.failed:
                    self._forget(plugin, poller, "was stopped: too much output")
                elif plugin.status is not None and plugin.eof:
                    if os.waitstatus_to_exitcode(plugin.status) == 0:
                        return plugin
                    self._forget(plugin, poller, _describe_failure(plugin.status))
        return None

    def _read(self, plugin: Plugin, poller) -> None:
        try:
            data = os.read(plugin.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            self.debug(f"Reading from plugin {plugin.name} failed: {err.strerror}")
            data = b""
        if not data:
            plugin.eof = True
            poller.unregister(plugin.fd)
            os.close(plugin.fd)
            plugin.fd = -1
            return
        plugin.size += len(data)
        if plugin.size > MAX_OUTPUT:
            self.debug(f"Plugin {plugin.name} wrote more than {MAX_OUTPUT} bytes",
                       always=True)
            plugin.failed = True
            plugin.output.clear()
            poller.unregister(plugin.fd)  # a closed fd would make poll() spin
            self._terminate(plugin)
            return
        plugin.output.append(data)

    def _forget(self, plugin: Plugin, poller, reason: str) -> None:
        self.debug(f"Plugin {plugin.name} {reason}")
        if plugin.fd >= 0:
            poller.unregister(plugin.fd)
            os.close(plugin.fd)
            plugin.fd = -1
        plugin.output.clear()
        self.plugins.remove(plugin)

    def reap(self) -> None:
        """Collect the status of every child that has exited."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            plugin = self.children.pop(pid, None)
            if plugin is not None:
                plugin.status = status

    # -- stopping ---------------------------------------------------------

    def _terminate(self, plugin: Plugin) -> None:
        if plugin.fd >= 0:
            os.close(plugin.fd)
            plugin.fd = -1
            plugin.eof = True
        if plugin.pid in self.children:
            _kill(plugin.pid, _signal.SIGTERM)

    def shutdown(self) -> None:
        """SIGTERM every remaining plugin, then wait; SIGKILL after a grace period."""
        for plugin in self.plugins:
            if plugin.fd >= 0:
                os.close(plugin.fd)
                plugin.fd = -1
            plugin.output.clear()
        self.plugins.clear()
        for pid in self.children:
            _kill(pid, _signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        killed = False
        while True:
            self.reap()
            if not self.children:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if killed:
                    # Only unkillable (D-state) processes are left; they are
                    # reaped by init once we are gone.
                    return
                for pid, plugin in self.children.items():
                    self.debug(f"Plugin {plugin.name} ignored SIGTERM; killing it",
                               always=True)
                    _kill(pid, _signal.SIGKILL)
                killed = True
                deadline = time.monotonic() + KILL_GRACE_SECONDS
                continue
            # SIGCHLD writes to the wake-up pipe, ending the wait early.
            try:
                select.select([self.wakeup_fd], [], [], remaining)
            except InterruptedError:
                pass
            _drain(self.wakeup_fd)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        # A set-user-ID plugin that made itself fully root is out of the
        # unprivileged runner's reach; it is left to end by itself.
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _describe_failure(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"exited by signal {signum}"
    return f"exited with status {os.WEXITSTATUS(status)}"


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (raises OSError)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        view = view[written:]


