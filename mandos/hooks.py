"""Network hooks: admin-supplied programs that set up special interfaces.

mandos-client runs every eligible file of its hook directory with MODE
``start`` before it looks for interfaces and with MODE ``stop`` at the end
(mandos-client(8mandos), "NETWORK HOOKS").  The contract, as the client
implements it:

* eligible are the files whose name consists only of ``A-Z a-z 0-9 _ . -``,
  that are regular files after following symbolic links and that have at
  least one execute bit in their mode (a mode test, not an access check);
  they run one after the other, sorted by name;
* each runs as full root (real and effective UID 0, GID 0, no supplementary
  groups); if that cannot be had the child exits with EX_NOPERM without
  running the hook;
* stdin is /dev/null, stdout goes to the client's stderr, stderr is shared;
* argv is ``[name, mode]``; the environment is the client's plus
  MANDOSNETHOOKDIR, DEVICE, MODE, VERBOSITY, DELAY and (with --connect)
  CONNECT;
* failures (non-zero exit, death by signal, exec failure) are warnings: the
  next hook runs and the client carries on.

Bounds the original lacks: a hook still running after ``timeout`` seconds
gets SIGTERM, and SIGKILL KILL_DELAY seconds later; an exception in the
waiting parent (the client's signal handler raises one) stops the running
hook the same way before it propagates, so no hook outlives its wait.
Each hook runs in a process group of its own so that those signals also
reach the commands it is waiting for.

Only built-in modules are imported: this runs on the boot path.
"""

import _signal
import os
import stat
import time

from mandos import lazylog
from mandos.client.privileges import become_root_in_child

log = lazylog.get_logger(__name__)

NAME_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                            "abcdefghijklmnopqrstuvwxyz"
                            "0123456789_.-")
DEFAULT_TIMEOUT = 60.0
KILL_DELAY = 5.0

# Signals blocked between fork() and the child's exec: the client's handler
# for them raises an exception, which must neither interrupt the parent
# before it knows the child's PID nor run the parent's code in the child.
_TERMINATING = (_signal.SIGINT, _signal.SIGHUP, _signal.SIGTERM)
# Python ignores these at start-up; a hook gets the default, as from
# subprocess.
_RESET_TO_DEFAULT = (_signal.SIGPIPE, _signal.SIGXFSZ)

# What the child reports through its close-on-exec pipe when it cannot
# exec the hook (followed by the errno in decimal).
_NO_ROOT = b"R"
_NO_EXEC = b"E"
EXEC_FAILED_STATUS = 127
_TIMED_OUT = (b"T", 0)
_MAX_POLL_MS = 2**31 - 1


def run_hooks(directory: str, mode: str, *, device: str, debug: bool, delay: float,
              connect: str | None, timeout: float | None = DEFAULT_TIMEOUT,
              environ: dict[str, str] | None = None) -> None:
    """Run every eligible hook in ``directory`` with ``mode``, in name order.

    ``device`` is the DEVICE string (comma-joined interface names, possibly
    empty), ``debug`` sets VERBOSITY, ``delay`` becomes DELAY, ``connect``
    (the --connect argument or None) becomes CONNECT.  ``timeout`` is the
    number of seconds each hook may run (None: no limit, as in the
    original).  ``environ`` is the environment the hooks inherit,
    os.environ by default.  Never raises for a failing hook; exceptions
    from outside (a terminating signal) are propagated after the running
    hook has been stopped and reaped.
    """
    names = eligible_hooks(directory)
    if not names:
        return
    env = hook_environment(directory, mode, device=device, debug=debug, delay=delay,
                           connect=connect, environ=environ)
    for name in names:
        run_hook(directory, name, mode, env, timeout)


def eligible_hooks(directory: str) -> list[str]:
    """Names of the hooks to run, sorted; skipped entries get a debug message.

    A missing directory yields no hooks silently (debug message only);
    other errors reading it are reported and also yield none.
    """
    try:
        entries = sorted(os.listdir(directory))
    except FileNotFoundError:
        log.debug("Network hook directory %s does not exist; no hooks run", directory)
        return []
    except OSError as err:
        log.error("Could not read network hook directory %s: %s", directory,
                  err.strerror)
        return []
    names = []
    for name in entries:
        reason = _ineligible(directory, name)
        if reason:
            log.debug("Ignoring network hook %r: %s", name, reason)
        else:
            names.append(name)
    return names


def _ineligible(directory: str, name: str) -> str | None:
    """Why ``name`` is not a hook, or None if it is one."""
    if not name or not NAME_CHARACTERS.issuperset(name):
        return "bad name"
    try:
        st = os.stat(os.path.join(directory, name))  # follows symbolic links
    except OSError as err:
        return f"cannot stat: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return "not executable"
    return None


def hook_environment(directory: str, mode: str, *, device: str, debug: bool,
                     delay: float, connect: str | None,
                     environ: dict[str, str] | None = None) -> dict[str, str]:
    """The hooks' environment: the inherited one plus the hook variables.

    An inherited CONNECT is left alone when ``connect`` is None, as in the
    original, which only ever sets variables.
    """
    env = dict(os.environ if environ is None else environ)
    env["MANDOSNETHOOKDIR"] = directory
    env["DEVICE"] = device
    env["MODE"] = mode
    env["VERBOSITY"] = "1" if debug else "0"
    env["DELAY"] = f"{delay:.6f}"
    if connect is not None:
        env["CONNECT"] = connect
    return env


def run_hook(directory: str, name: str, mode: str, env: dict[str, str],
             timeout: float | None = DEFAULT_TIMEOUT) -> int | None:
    """Run one hook and wait for it; returns its wait status (None: not run).

    Problems are logged as warnings, never raised.  Anything raised while
    waiting (a terminating signal) stops the hook before propagating.
    """
    path = os.path.join(directory, name)
    log.debug("Running network hook %s with mode %s", name, mode)
    try:
        pid, report = _spawn(path, [name, mode], env)
    except OSError as err:
        log.warning("Could not start network hook %s: %s", name, err.strerror)
        return None
    pidfd = -1
    status = None
    failure = None
    try:
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1  # kernel before 5.3: poll waitpid() instead
        failure = _read_report(report)
        status = _wait(pid, pidfd, timeout)
        if status is None:
            log.warning("Network hook %s still running after %g seconds; stopping it",
                        name, timeout)
    finally:
        try:
            if status is None:  # timed out, or something was raised
                status = _stop(pid, pidfd)
                failure = _TIMED_OUT
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            os.close(report)
    if failure is _TIMED_OUT:
        pass  # already reported
    elif failure is not None:
        what, errno = failure
        reason = os.strerror(errno) if errno else "unknown error"
        if what == _NO_ROOT:
            log.warning("Network hook %s not run: could not become root: %s",
                        name, reason)
        else:
            log.warning("Could not execute network hook %s: %s", name, reason)
    elif os.WIFSIGNALED(status):
        log.warning("Network hook %s was killed by signal %d", name,
                    os.WTERMSIG(status))
    elif os.WEXITSTATUS(status):
        log.warning("Network hook %s exited with status %d", name,
                    os.WEXITSTATUS(status))
    else:
        log.debug("Network hook %s succeeded", name)
    return status


def _spawn(path: str, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Fork the hook's process; returns its PID and the report pipe's read end."""
    report, report_w = os.pipe()  # both close-on-exec
    old_mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, _TERMINATING)
    try:
        try:
            pid = os.fork()
        except OSError:
            os.close(report)
            raise
        if pid == 0:
            _child(path, argv, env, report_w, old_mask)  # never returns
        try:
            # Also here, so that signalling the group works even before the
            # child has run its own setpgid().
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child already did it, or already executed the hook
    finally:
        os.close(report_w)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
    return pid, report


def _child(path: str, argv: list[str], env: dict[str, str], report_w: int,
           old_mask) -> None:
    """In the forked child: become root, set up descriptors, exec; never returns.

    Termination signals are still blocked on entry, and the client's Python
    handlers are still installed; they are reset before being unblocked so
    that a signal arriving now ends this child instead of raising the
    client's exception here, outside the client.
    """
    what = _NO_ROOT
    try:
        for signum in _TERMINATING:
            if _signal.getsignal(signum) != _signal.SIG_IGN:
                _signal.signal(signum, _signal.SIG_DFL)
        for signum in _RESET_TO_DEFAULT:
            _signal.signal(signum, _signal.SIG_DFL)
        try:
            _signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old_mask)
        os.setpgid(0, 0)
        # Security: the hook gets root, and nothing of the unprivileged
        # plugin user the client runs as.  Real and effective UID both 0,
        # because dash and bash drop an effective root that differs from
        # the real UID (the hook would run unprivileged, half-failing);
        # GID 0 and no supplementary groups, so that the plugin user's
        # groups do not leak into a root process.  Any failure raises and
        # ends this child with EX_NOPERM before the hook is executed, so a
        # hook never runs with partial privileges.
        become_root_in_child()
        what = _NO_EXEC
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
        os.dup2(2, 1)
        os.execve(path, argv, env)
    except BaseException as err:  # noqa: BLE001 - the child must never return
        try:
            errno = getattr(err, "errno", None) or 0
            os.write(report_w, what + str(errno).encode())
        finally:
            os._exit(os.EX_NOPERM if what == _NO_ROOT else EXEC_FAILED_STATUS)
    os._exit(EXEC_FAILED_STATUS)  # not reached: execve() does not return


def _read_report(report: int) -> tuple[bytes, int] | None:
    """Wait until the child executed the hook (None) or says why it did not."""
    data = b""
    while chunk := os.read(report, 64):
        data += chunk
    if not data:
        return None
    try:
        errno = int(data[1:])
    except ValueError:
        errno = 0
    return data[:1], errno


def _wait(pid: int, pidfd: int, timeout: float | None) -> int | None:
    """Reap ``pid`` within ``timeout`` seconds (None: no limit); its wait
    status, or None if it is still running."""
    if timeout is None:
        return os.waitpid(pid, 0)[1]
    deadline = time.monotonic() + timeout
    if pidfd >= 0:
        import select  # built in, cheap
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        # poll() is resumed with a recomputed timeout after a signal whose
        # handler does not raise (PEP 475); the client's handler raises.
        remaining = max(0.0, deadline - time.monotonic())
        if not poller.poll(int(min(remaining * 1000 + 1, _MAX_POLL_MS))):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() < deadline:
                return _wait(pid, pidfd, deadline - time.monotonic())
            return status if done else None
        return os.waitpid(pid, 0)[1]
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.05)


def _stop(pid: int, pidfd: int) -> int:
    """SIGTERM the hook's process group, SIGKILL it after KILL_DELAY; reap it."""
    status = None
    try:
        _signal_group(pid, _signal.SIGTERM)
        status = _wait(pid, pidfd, KILL_DELAY)
    finally:
        if status is None:
            log.warning("Network hook process %d ignored SIGTERM; killing it", pid)
            _signal_group(pid, _signal.SIGKILL)
            status = os.waitpid(pid, 0)[1]
    return status


def _signal_group(pid: int, signum: int) -> None:
    """Send ``signum`` to the hook's process group and to the hook itself."""
    for send, target in ((os.killpg, pid), (os.kill, pid)):
        try:
            send(target, signum)
        except OSError:
            pass  # already gone, or not yet in its own group
