"""Run our ``bin/mandos`` as a real process for end-to-end tests.

The counterpart of original_server.py for our server: a configuration and
state folder in a temporary directory the server's unprivileged user
(65534 here) can traverse, the server in the foreground on loopback, its
standard error collected in a file, and SIGTERM (or any signal) to stop it.

Where log messages go depends on whether something listens at
``/dev/log``, and on a shared test machine that changes while tests run.
So the server runs in a mount namespace of its own (``unshare --mount``)
with a private ``/dev`` that holds only ``null``, ``zero``, ``full``,
``random``, ``urandom`` and the ``fd``/``std*`` links, and, when asked for,
a ``log`` socket whose messages the harness collects.  Without it, the
server logs to standard error; with it, to that socket (and also to
standard error with ``--debug``).  Nothing else about the process changes:
``unshare`` and ``sh`` both exec, so the PID we see is the server's.

Usage::

    with OurServer(folder, section_text, bus=bus.address) as server:
        ... server.address, server.output(), server.syslog() ...
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from original_server import SERVER_USER, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MANDOS = REPO / "bin" / "mandos"
PYTHON = "/usr/bin/python3"

# (name, major, minor) of the character devices the private /dev offers.
_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9))
_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
          ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"))
# Mount the private /dev, then run the server with the redirections asked for.
_WRAPPER = 'mount --bind "$0" /dev && exec "$@" {redirections}'


class PrivateDev:
    """A folder to bind-mount over ``/dev``; with ``syslog``, a collected ``log`` socket."""

    def __init__(self, folder: Path, syslog: bool) -> None:
        self.path = folder
        self.path.mkdir(exist_ok=True)
        os.chmod(self.path, 0o755)
        for name, major, minor in _DEVICES:
            node = self.path / name
            if not node.exists():
                os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(node, 0o666)
        for name, target in _LINKS:
            if not (self.path / name).is_symlink():
                os.symlink(target, self.path / name)
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        log = self.path / "log"
        if log.exists() or log.is_symlink():
            log.unlink()
        if syslog:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.bind(str(log))
            os.chmod(log, 0o666)
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self._sock is not None
        try:
            while True:
                data = self._sock.recv(65536)
                with self._lock:
                    self.messages.append(data.decode(errors="replace"))
        except OSError:
            pass

    def syslog(self) -> str:
        with self._lock:
            return "\n".join(self.messages)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class OurServer:
    """Our mandos server on loopback, in the foreground unless told otherwise.

    ``clients_conf`` is the text after ``[DEFAULT]``; ``defaults`` the
    ``[DEFAULT]`` lines (``checker = true`` unless a test says otherwise).
    ``bus`` is the address of a private system bus; without it the server
    runs with ``--no-dbus``.  ``debug`` adds ``--debug``; otherwise
    ``debuglevel`` (default INFO) is passed.  ``listen_args``, when given,
    replaces the default listening options (``--port P --address ::1``, or
    for IPv4 ``--port P --no-ipv6 --address 127.0.0.1``).  The server may be started
    and stopped several times; configuration and state stay in ``folder``.
    """

    def __init__(self, folder: Path, clients_conf: str = "", *,
                 defaults: str = "checker = true", port: int | None = None,
                 ipv6: bool = True, bus: str | None = None, debug: bool = False,
                 debuglevel: str | None = "INFO", syslog: bool = False,
                 foreground: bool = True, extra_args: tuple[str, ...] = (),
                 listen_args: tuple[str, ...] | None = None,
                 env: dict[str, str] | None = None, stdin=subprocess.DEVNULL,
                 redirections: str = "", wait: bool = True) -> None:
        self.folder = folder
        self.ipv6 = ipv6
        self.port = port or free_port(socket.AF_INET6 if ipv6 else socket.AF_INET)
        self.bus = bus
        self.debug = debug
        self.debuglevel = debuglevel
        self.foreground = foreground
        self.extra_args = tuple(extra_args)
        self.listen_args = listen_args
        self.env = env or {}
        self.stdin = stdin
        self.redirections = redirections
        self.wait = wait
        self.configdir = folder / "config"
        self.statedir = folder / "state"
        self.configdir.mkdir(exist_ok=True)
        self.statedir.mkdir(exist_ok=True)
        os.chown(self.statedir, SERVER_USER, SERVER_USER)
        self.write_clients_conf(clients_conf, defaults)
        self.dev = PrivateDev(folder / "dev", syslog)
        self.process: subprocess.Popen | None = None
        self.log_path = folder / "server.log"
        self._log = None
        self.starts = 0

    # -- configuration --------------------------------------------------------

    def write_clients_conf(self, sections: str, defaults: str = "checker = true") -> None:
        (self.configdir / "clients.conf").write_text(f"[DEFAULT]\n{defaults}\n\n{sections}")

    @property
    def state_file(self) -> Path:
        return self.statedir / "clients.json"

    @property
    def host(self) -> str:
        return "::1" if self.ipv6 else "127.0.0.1"

    @property
    def address(self) -> str:
        """``ADDRESS:PORT`` for mandos-client --connect."""
        return f"[::1]:{self.port}" if self.ipv6 else f"127.0.0.1:{self.port}"

    def command(self, *more: str) -> list[str]:
        args = [PYTHON, str(MANDOS)]
        if self.foreground:
            args.append("--foreground")
        args.append("--no-zeroconf")
        if self.listen_args is not None:
            args += list(self.listen_args)
        else:
            args += ["--port", str(self.port)]
            if self.ipv6:
                args += ["--address", "::1"]
            else:
                args += ["--no-ipv6", "--address", "127.0.0.1"]
        args += ["--configdir", str(self.configdir), "--statedir", str(self.statedir)]
        if self.bus is None:
            args.append("--no-dbus")
        if self.debug:
            args.append("--debug")
        elif self.debuglevel:
            args += ["--debuglevel", self.debuglevel]
        return args + list(self.extra_args) + list(more)

    # -- running --------------------------------------------------------------

    def start(self, *more: str, wait: bool | None = None) -> "OurServer":
        """Start the server (again); wait until it accepts connections unless told not to."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = dict(os.environ)
        for name in ("NOTIFY_SOCKET", "DBUS_SYSTEM_BUS_ADDRESS", "LISTEN_FDS", "LISTEN_PID"):
            env.pop(name, None)
        if self.bus is not None:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus
        env.update(self.env)
        wrapper = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                   _WRAPPER.format(redirections=self.redirections), str(self.dev.path)]
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.starts += 1
        self._log.write(f"=== start {self.starts} ===\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(wrapper + self.command(*more), stdin=self.stdin,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        if self.wait if wait is None else wait:
            self.wait_listening()
        return self

    def wait_listening(self, timeout: float = 20.0) -> None:
        """Until the port takes connections (a bare connection is logged and dropped)."""
        family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.foreground and self.process.poll() is not None:
                raise RuntimeError(f"our mandos server exited {self.process.returncode}:\n"
                                   f"{self.output()}")
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                if probe.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"our mandos server did not listen:\n{self.output()}")

    def wait_for_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """Until ``text`` occurs ``count`` times in the output; returns the output."""
        deadline = time.monotonic() + timeout
        while True:
            output = self.output()
            if output.count(text) >= count:
                return output
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged {count} time(s):\n{output}")
            time.sleep(0.05)

    def output(self) -> str:
        """Everything the server wrote to standard output and error so far."""
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def syslog(self) -> str:
        """What the server sent to the private /dev/log (with ``syslog=True``)."""
        return self.dev.syslog()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``signum`` to the server and return its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not stop within {timeout} s after "
                                 f"signal {signum}:\n{self.output()}") from None

    def __enter__(self) -> "OurServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                    self.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
                except ProcessLookupError:
                    pass
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            self.dev.close()
