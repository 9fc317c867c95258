"""The direct-route work-around: reach a server announced with a global address.

A server host with a global address may announce only that address over
mDNS, although it shares a link with the client.  A client that has nothing
but a link-local address gets "network unreachable" for it.  The client then
asks the route helper (``mandos-client-iprouteadddel`` in
``$MANDOSPLUGINHELPERDIR``, run as root) to add a host route to the address
through the interface the server was found on, tries once more, and deletes
the route when the attempt ends.

Never in ``--connect`` mode (the administrator chose the address and is
expected to have a route) and never for link-local addresses (a route cannot
help there).
"""

import os
import select
import signal
import socket
import time
from collections.abc import Callable

from mandos import lazylog
from mandos.client.attempt import Unreachable
from mandos.client.privileges import Privileges, become_root_in_child
from mandos.client.servers import ServerAddress

log = lazylog.get_logger(__name__)

HELPER_NAME = "mandos-client-iprouteadddel"
HELPER_DIR_VARIABLE = "MANDOSPLUGINHELPERDIR"
# How often should_stop() is asked while the helper runs (it exits in
# tens of milliseconds; its own end wakes the wait at once).
STOP_POLL_INTERVAL = 0.05


def _never() -> bool:
    return False


def _child(path: str, argv: list[str], message_prefix: bytes) -> None:
    """In the forked child: become root, set up the descriptors, run the helper.

    Never returns: the process execs the helper or exits.
    """
    status = os.EX_OSERR
    try:
        try:
            # The helper changes the routing table and needs real root; the
            # parent only ever holds root as its saved UID.
            become_root_in_child()
        except OSError as err:
            # As the original: say so and run it anyway; it will fail
            # cleanly (netlink refuses) if it really lacks the privilege.
            os.write(2, message_prefix + f"Failed to raise privileges for the route "
                     f"helper: {err.strerror}\n".encode())
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        if devnull != 0:
            os.close(devnull)
        # The helper's standard output would end up in mandos-client's,
        # which is the password pipe to plugin-runner: send it to stderr.
        os.dup2(2, 1)
        # Python ignores SIGPIPE; the helper should start with the default.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        # Any failure from here on means the helper is missing or unusable.
        status = os.EX_UNAVAILABLE
        os.execve(path, argv, os.environ)
    except OSError as err:
        try:
            os.write(2, message_prefix + f"Cannot run {path}: {err.strerror}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _terminate(pid: int, privileges: Privileges) -> None:
    """SIGTERM the helper and reap it.

    The helper runs as real root, so only a root effective UID may signal
    it; privileges are raised for the kill alone.
    """
    was_root = os.geteuid() == 0
    if not was_root:
        privileges.raise_()
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except OSError as err:
        log.warning("Could not stop the route helper: %s", err.strerror)
        # Do not wait for it: we are ending, and it ends on its own soon.
        return
    finally:
        if not was_root:
            privileges.lower()
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _wait(pid: int, should_stop: Callable[[], bool], privileges: Privileges) -> int | None:
    """The helper's wait status, or None if it was stopped for termination.

    An exception in this thread (a signal handler raising) also stops the
    helper, and is then passed on.
    """
    reaped = False
    try:
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1  # old kernel: plain polling
        try:
            while True:
                wpid, status = os.waitpid(pid, os.WNOHANG)
                if wpid:
                    reaped = True
                    return status
                if should_stop():
                    reaped = True  # by _terminate()
                    _terminate(pid, privileges)
                    return None
                if pidfd >= 0:
                    select.select([pidfd], [], [], STOP_POLL_INTERVAL)
                else:
                    time.sleep(STOP_POLL_INTERVAL / 5)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
    except BaseException:
        if not reaped:  # never signal a PID that may belong to another process now
            _terminate(pid, privileges)
        raise


def run_route_helper(action: str, address: str, interface_name: str, *,
                     debug: bool, privileges: Privileges,
                     should_stop: Callable[[], bool] = _never) -> bool:
    """Run ``mandos-client-iprouteadddel action address interface_name``.

    ``action`` is "add" or "delete".  The helper runs as full root with
    standard input from /dev/null, standard output on our standard error
    and our environment.  Returns True if it exited 0.  If
    ``should_stop()`` becomes true while it runs, the helper is sent SIGTERM
    and the result is False; an exception raised meanwhile (by a signal
    handler) does the same and propagates.
    """
    if action not in ("add", "delete"):
        raise ValueError(f"bad route helper action: {action!r}")
    helper_dir = os.environ.get(HELPER_DIR_VARIABLE)
    if helper_dir is None:
        log.debug("%s is not set; cannot %s a route to %s", HELPER_DIR_VARIABLE,
                  action, address)
        return False
    if should_stop():
        return False
    path = os.path.join(helper_dir, HELPER_NAME)
    argv = [HELPER_NAME, action, address, interface_name]
    if debug:
        argv.append("--debug")
    from mandos.client.options import program_name
    message_prefix = f"Mandos plugin {program_name()}: ".encode()
    log.debug("Running %s", " ".join([path] + argv[1:]))
    try:
        pid = os.fork()
    except OSError as err:
        log.error("Could not start the route helper: %s", err.strerror)
        return False
    if pid == 0:
        _child(path, argv, message_prefix)
    status = _wait(pid, should_stop, privileges)
    if status is None:
        log.debug("Route helper stopped: terminating")
        return False
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return True
    if os.WIFSIGNALED(status):
        reason = f"killed by signal {os.WTERMSIG(status)}"
    else:
        reason = f"exit status {os.WEXITSTATUS(status)}"
    log.warning("Route helper (%s %s %s) failed: %s", action, address,
                interface_name, reason)
    return False


def route_may_help(server: ServerAddress, *, connect_mode: bool) -> bool:
    """Whether an unreachable ``server`` is worth a direct host route.

    Only servers found on a known interface by discovery, and only
    addresses that are not link-local (IPv6 fe80::/10, IPv4 169.254/16).
    """
    return bool(server.ifindex) and not connect_mode and not server.is_link_local()


class RoutedConnection:
    """A connected socket and the host route added to reach it, if any.

    Use it in a ``with`` statement: it gives the socket and, at the end,
    closes the socket and deletes the route (a failure to delete is only
    reported).
    """

    __slots__ = ("sock", "_route", "_debug", "_privileges")

    def __init__(self, sock: socket.socket, route: tuple[str, str] | None,
                 debug: bool, privileges: Privileges) -> None:
        self.sock = sock
        self._route = route  # (address, interface name) to delete, or None
        self._debug = debug
        self._privileges = privileges

    @property
    def route_added(self) -> bool:
        """True while this attempt holds a host route of its own."""
        return self._route is not None

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc_info) -> None:
        try:
            self.sock.close()
        finally:
            self.remove_route()

    def remove_route(self) -> None:
        """Delete the route this attempt added (once); failures are reported."""
        if self._route is None:
            return
        address, interface_name = self._route
        self._route = None
        _delete_route(address, interface_name, self._debug, self._privileges)


def _delete_route(address: str, interface_name: str, debug: bool,
                  privileges: Privileges) -> None:
    # No should_stop here: a termination request must not leave the route
    # behind, and the helper is done in milliseconds.
    if not run_route_helper("delete", address, interface_name, debug=debug,
                            privileges=privileges):
        log.warning("Could not delete the route to %s on %s", address, interface_name)


def connect_with_route(connect: Callable[[ServerAddress], socket.socket],
                       server: ServerAddress, interface_name: str | None = None, *,
                       connect_mode: bool, debug: bool, privileges: Privileges,
                       should_stop: Callable[[], bool] = _never) -> RoutedConnection:
    """``connect(server)``, adding a direct host route if that helps.

    If ``connect`` raises Unreachable and :func:`route_may_help` says so,
    the route helper adds a host route to the server's address through
    ``interface_name`` (default: the name of ``server.ifindex``) and
    ``connect`` is called once more.  The route is deleted when the returned
    object's ``with`` block ends, or at once if the second try fails.
    Exceptions from ``connect`` propagate; if the route could not be added,
    the first Unreachable does.
    """
    try:
        return RoutedConnection(connect(server), None, debug, privileges)
    except Unreachable as unreachable:
        if not route_may_help(server, connect_mode=connect_mode):
            raise
        try:
            # The helper runs as root: pass the address only in canonical
            # numeric form, so that nothing else (a prefix length that
            # would make this a network route, a name) can reach it.
            address = socket.inet_ntop(server.family,
                                       socket.inet_pton(server.family, server.address))
            if interface_name is None:
                interface_name = socket.if_indextoname(server.ifindex)
        except (OSError, ValueError) as err:
            log.debug("No direct route to %s: %s", server, err)
            raise unreachable from None
        log.debug("%s unreachable, trying direct route on %s", server, interface_name)
        if not run_route_helper("add", address, interface_name, debug=debug,
                                privileges=privileges, should_stop=should_stop):
            raise unreachable from None
    try:
        sock = connect(server)
    except BaseException:
        _delete_route(address, interface_name, debug, privileges)
        raise
    return RoutedConnection(sock, (address, interface_name), debug, privileges)
