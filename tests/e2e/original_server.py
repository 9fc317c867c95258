"""Run the original Debian ``mandos`` server (1.8.16) as a test peer.

It is unpacked, never installed (see tests/peers.py).  What it needs here
(from running it on this machine class): a system D-Bus even with
``--no-dbus`` (a private ``dbus-daemon`` is started), a ``/dev/log``
listener (a datagram socket is bound if none exists), a state directory
writable by the user it drops to (65534 here), ``TMPDIR`` inside the test's
folder, and the checker replaced by ``true`` so that it never pings
anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import peers  # noqa: E402

SERVER_USER = 65534  # the original drops to _mandos, mandos, or 65534


def free_port(family: int = socket.AF_INET6) -> int:
    """A TCP port that is free on loopback right now."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(path: str) -> bool:
    """Whether a datagram socket at ``path`` has a reader."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        except OSError:
            return True  # not ours to judge (a file, no permission): leave it
    return True


class DevLog:
    """Bind /dev/log if nothing listens there; drain and discard messages."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "DevLog":
        if os.path.exists("/dev/log"):
            if _listening("/dev/log"):
                return self
            # A socket left by a killed run: nothing reads it, and the
            # original server's syslog handler would fail on it.
            os.unlink("/dev/log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("/dev/log")
        os.chmod("/dev/log", 0o666)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        assert self.sock is not None
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        if self.sock is not None:
            self.sock.close()
            try:
                os.unlink("/dev/log")
            except FileNotFoundError:
                pass


# A dbus-daemon of type "system": its default policy allows any user to
# connect, then ``rules`` (elements of <policy context="default">) and
# ``extra`` (further elements of <busconfig>, e.g. an <include>) apply.
SYSTEM_BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
{rules}  </policy>
{extra}</busconfig>
"""
# Everyone may do everything (tests only).
ALLOW_EVERYTHING = """\
<allow own="*"/>
<allow send_type="method_call"/>
<allow send_type="signal"/>
<allow send_type="method_return"/>
<allow send_type="error"/>
<allow receive_type="method_call"/>
<allow receive_type="signal"/>
<allow receive_type="method_return"/>
<allow receive_type="error"/>
"""


def system_bus_config(address: str, rules: str = ALLOW_EVERYTHING, extra: str = "") -> str:
    """The configuration file of a system bus listening on ``address``.

    ``rules`` and ``extra`` are XML elements, one a line, at any common
    indentation.
    """
    return SYSTEM_BUS_CONFIG.format(
        address=address, rules=textwrap.indent(textwrap.dedent(rules), "    "),
        extra=textwrap.indent(textwrap.dedent(extra), "  "))


class PrivateSystemBus:
    """A dbus-daemon of type "system" on a socket in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.address = f"unix:path={folder}/system_bus_socket"

    def __enter__(self) -> "PrivateSystemBus":
        config = self.folder / "bus.conf"
        config.write_text(system_bus_config(self.address))
        self.process = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}",
             "--print-address"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.process.stdout is not None
        self.process.stdout.readline()  # printed once it listens
        os.chmod(f"{self.folder}/system_bus_socket", 0o777)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


def clients_conf_section(name: str, section_text: str, **overrides: str) -> str:
    """Rename a keygen-printed section and add or replace settings."""
    lines = section_text.strip("\n").splitlines()
    lines[0] = f"[{name}]"
    for key, value in overrides.items():
        lines = [line for line in lines if not line.startswith(f"{key} =")]
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


class OriginalServer:
    """The original mandos server, in the foreground, on loopback.

    With ``dbus``, its D-Bus interface is on the private bus at ``bus_address``.
    """

    def __init__(self, folder: Path, clients_conf: str, *, port: int | None = None,
                 ipv6: bool = True, extra_args: tuple[str, ...] = (),
                 dbus: bool = False) -> None:
        self.folder = folder
        self.clients_conf = clients_conf
        self.ipv6 = ipv6
        self.port = port or free_port(socket.AF_INET6 if ipv6 else socket.AF_INET)
        self.extra_args = extra_args
        self.dbus = dbus
        self.process: subprocess.Popen | None = None
        self.log_path = folder / "server.log"
        self._devlog = DevLog()
        self._bus = PrivateSystemBus(folder)

    @property
    def address(self) -> str:
        """``ADDRESS:PORT`` for mandos-client --connect."""
        return f"[::1]:{self.port}" if self.ipv6 else f"127.0.0.1:{self.port}"

    @property
    def bus_address(self) -> str:
        return self._bus.address

    def __enter__(self) -> "OriginalServer":
        config = self.folder / "config"
        state = self.folder / "state"
        tmp = self.folder / "tmp"
        for path in (config, state, tmp):
            path.mkdir(exist_ok=True)
        os.chown(state, SERVER_USER, SERVER_USER)
        os.chmod(tmp, 0o1777)
        (config / "clients.conf").write_text(
            "[DEFAULT]\nchecker = true\n\n" + self.clients_conf)
        (config / "mandos.conf").write_text("[DEFAULT]\n")
        self._devlog.__enter__()
        self._bus.__enter__()
        root = peers.unpacked_root()
        args = ["/usr/bin/python3", str(root / "usr/sbin/mandos"), "--foreground",
                "--debug", *(() if self.dbus else ("--no-dbus",)), "--no-zeroconf",
                "--port", str(self.port),
                "--configdir", str(config), "--statedir", str(state)]
        if not self.ipv6:
            args += ["--no-ipv6", "--address", "127.0.0.1"]
        args += list(self.extra_args)
        env = dict(os.environ, TMPDIR=str(tmp),
                   DBUS_SYSTEM_BUS_ADDRESS=self._bus.address)
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 20.0) -> None:
        family = socket.AF_INET6 if self.ipv6 else socket.AF_INET
        host = "::1" if self.ipv6 else "127.0.0.1"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"original mandos server exited "
                                   f"{self.process.returncode}:\n{self.output()}")
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                # A bare connect makes the server log an empty version line
                # and close; harmless.
                if probe.connect_ex((host, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"original mandos server did not listen:\n{self.output()}")

    def output(self) -> str:
        """Everything the server logged so far."""
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def __exit__(self, *exc) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        finally:
            self.log.close()
            self._bus.__exit__(*exc)
            self._devlog.__exit__(*exc)
            # gpg-agents the server may have left in its TMPDIR
            subprocess.run(["pkill", "-f", f"gpg-agent --homedir {self.folder}"],
                           check=False)


def original_keygen(directory: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the original mandos-keygen with ``--dir directory``."""
    keygen = peers.unpacked_root() / "usr/sbin/mandos-keygen"
    return subprocess.run([str(keygen), "--dir", str(directory), *extra],
                          capture_output=True, text=True, check=True)


def make_world_temp(prefix: str = "mandos-interop-") -> Path:
    """A temp folder the server's unprivileged user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
