"""Starting, watching and stopping Mandos servers for the server benchmark.

Both servers -- ours (``bin/mandos``) and the original Debian ``mandos``
1.8.16, unpacked by ``tests/peers.py`` -- run the same way: in the
foreground, without D-Bus and Zeroconf, on ``[::1]:PORT``, each in a folder
of its own holding ``config/`` (``mandos.conf``, ``clients.conf``),
``state/`` (writable by the unprivileged user both servers drop to),
``tmp/`` (its ``TMPDIR``) and ``server.log`` (its standard output and
error).  The original also gets a private system bus (it connects to one
even with ``--no-dbus``).  Neither runs with ``--debug``: the original
would then log every GnuTLS debug line, which is not how it runs in
production.

A :class:`ServerProcess` knows its process tree (the server and every
descendant: checkers, and the original's per-connection processes), its
proportional set size, its CPU time, and how to stop it and everything it
left behind (the original's ``gpg-agent`` daemons in its ``TMPDIR``),
always by process ID.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import peers  # noqa: E402
from original_server import PrivateSystemBus  # noqa: E402

SERVER_USER = 65534  # both servers drop to _mandos, mandos or 65534; none but 65534 here
LOOPBACK = "::1"
OUR_SERVER = REPO / "bin" / "mandos"
DEV_LOG = "/dev/log"


def free_port() -> int:
    """A TCP port free on [::1] right now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def world_temp(prefix: str) -> Path:
    """A fresh folder that the unprivileged server user can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


# -- syslog ---------------------------------------------------------------------------

class SyslogKeeper:
    """Makes sure something listens at /dev/log while a benchmark runs.

    Both servers log to /dev/log; the original prints a traceback for each
    message when nothing listens there.  Test suites running at the same
    time bind and remove their own listener, so this checks twice a second
    and binds a new one (draining and discarding messages) whenever the path
    is gone.  At the end only a socket this object bound is removed.
    """

    def __init__(self, path: str = DEV_LOG, period: float = 0.5) -> None:
        self.path = path
        self.period = period
        self.rebinds = 0
        self._socks: list[socket.socket] = []
        self._inodes: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _bind(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.path)
        except OSError:  # someone else was quicker
            sock.close()
            return
        os.chmod(self.path, 0o666)
        self._inodes.add(os.stat(self.path).st_ino)
        self._socks.append(sock)
        self.rebinds += 1
        threading.Thread(target=self._drain, args=(sock,), daemon=True).start()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            if not os.path.exists(self.path):
                self._bind()

    def __enter__(self) -> "SyslogKeeper":
        if not os.path.exists(self.path):
            self._bind()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if os.stat(self.path).st_ino in self._inodes:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        for sock in self._socks:
            sock.close()


# -- keys and clients.conf -----------------------------------------------------------------

@dataclass
class BenchKeys:
    """The load driver's key files and the key IDs of every configured client."""

    keyfiles: tuple[str, str]  # (tls-pubkey.pem, tls-privkey.pem) of key_ids[0]
    key_ids: list[str]


def make_keys(folder: Path, count: int) -> BenchKeys:
    """One key pair on disk for the load driver, plus ``count - 1`` more key IDs.

    All are fresh Ed25519 keys (about 0.1 ms each); only the first one's
    private key is kept.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from mandos import keys

    folder.mkdir(parents=True, exist_ok=True)
    public_pem, private_pem = keys.generate_tls_keypair()
    pub, priv = folder / "tls-pubkey.pem", folder / "tls-privkey.pem"
    keys.write_key_file(pub, public_pem, force=True)
    keys.write_key_file(priv, bytes(private_pem), force=True)
    ids = [keys.key_id(serialization.load_pem_public_key(public_pem))]
    for _ in range(count - 1):
        ids.append(keys.key_id(ed25519.Ed25519PrivateKey.generate().public_key()))
    return BenchKeys((str(pub), str(priv)), ids)


def clients_conf(key_ids: list[str], secret: bytes, defaults: dict[str, str]) -> str:
    """A clients.conf with one section per key ID, all with the same secret.

    Each section also gets a made-up OpenPGP fingerprint: the original
    server stops with a KeyError on a section without one, even when the
    client is found by its key ID.
    """
    import hashlib

    encoded = base64.b64encode(secret).decode("ascii")
    lines = ["[DEFAULT]"] + [f"{key} = {value}" for key, value in defaults.items()]
    lines.append(f"secret = {encoded}")
    lines.append("")
    for number, key_id in enumerate(key_ids):
        fingerprint = hashlib.sha1(key_id.encode()).hexdigest().upper()
        lines += [f"[client{number:04d}]", f"key_id = {key_id}",
                  f"fingerprint = {fingerprint}", f"host = client{number:04d}", ""]
    return "\n".join(lines)


# -- servers ---------------------------------------------------------------------------------

@dataclass
class TreeSample:
    """One look at a server's process tree."""

    pss_bytes: int = 0
    processes: int = 0  # the server itself included
    descendants: int = 0  # alive, not zombies
    zombies: int = 0
    names: dict[str, int] = field(default_factory=dict)  # descendants by name


class ServerProcess:
    """One server in a folder of its own; see the module's docstring."""

    label = "server"

    def __init__(self, folder: Path, conf_text: str, *, debuglevel: str | None = None) -> None:
        self.folder = folder
        self.port = free_port()
        self.conf_text = conf_text
        self.debuglevel = debuglevel
        self.process: subprocess.Popen | None = None
        self.ps: psutil.Process | None = None
        self.config = folder / "config"
        self.state = folder / "state"
        self.tmp = folder / "tmp"
        self.log_path = folder / "server.log"
        self._log = None
        self.process_started = 0.0
        self.startup_s: float | None = None
        self.first_unlock_s: float | None = None
        self.stop_s: float | None = None

    # -- to be provided by subclasses --------------------------------------------

    def argv(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ, TMPDIR=str(self.tmp))

    def common_options(self) -> list[str]:
        options = ["--foreground", "--no-dbus", "--no-zeroconf", "--address", LOOPBACK,
                   "--port", str(self.port), "--configdir", str(self.config),
                   "--statedir", str(self.state)]
        if self.debuglevel:
            options += ["--debuglevel", self.debuglevel]
        return options

    def command_line(self) -> str:
        return " ".join(self.argv())

    # -- life cycle ---------------------------------------------------------------------

    def prepare(self) -> None:
        for path in (self.config, self.state, self.tmp):
            path.mkdir(exist_ok=True)
        os.chown(self.state, SERVER_USER, SERVER_USER)
        os.chmod(self.tmp, 0o1777)
        (self.config / "clients.conf").write_text(self.conf_text)
        (self.config / "mandos.conf").write_text("[DEFAULT]\n")

    def start(self, timeout: float = 120.0) -> float:
        """Start; return the seconds from exec until the port accepted a connection."""
        self.prepare()
        self._log = open(self.log_path, "wb")
        argv, env = self.argv(), self.environment()
        began = self.process_started = time.monotonic()
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        deadline = began + timeout
        while True:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
                # Refused at once until listen(); a bare connection costs the
                # server one logged "bad version line".
                if probe.connect_ex((LOOPBACK, self.port)) == 0:
                    self.startup_s = time.monotonic() - began
                    break
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited {self.process.returncode}:\n"
                                   f"{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not listen within {timeout} s:\n"
                                   f"{self.output()[-3000:]}")
            time.sleep(0.005)
        self.ps = psutil.Process(self.process.pid)
        return self.startup_s

    def first_unlock(self, keyfiles: tuple[str, str], timeout: float = 120.0) -> float | None:
        """Seconds from exec until an unlock succeeds (call right after :meth:`start`).

        A listening socket is not yet a serving server: connections may wait
        in the backlog until the server gets round to them.  None if no
        unlock succeeded within ``timeout``.
        """
        import load_driver

        began = self.process_started
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            result = load_driver.run_load(LOOPBACK, self.port, keyfiles, 1, count=1,
                                          duration=max(deadline - time.monotonic(), 0.1))
            if result["unlocks"]:
                self.first_unlock_s = time.monotonic() - began
                return self.first_unlock_s
            time.sleep(0.01)
        return None

    def output(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- looking at it ------------------------------------------------------------------

    def tree(self) -> list[psutil.Process]:
        """The server and its descendants now (empty once it has gone)."""
        if self.ps is None or not self.alive():
            return []
        try:
            return [self.ps] + self.ps.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def sample(self, with_pss: bool = False) -> TreeSample:
        result = TreeSample()
        for process in self.tree():
            try:
                status = process.status()
                if status == psutil.STATUS_ZOMBIE:
                    result.zombies += 1
                    continue
                result.processes += 1
                if process.pid != self.ps.pid:
                    result.descendants += 1
                    name = process.name()
                    result.names[name] = result.names.get(name, 0) + 1
                if with_pss:
                    result.pss_bytes += process.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return result

    def cpu_seconds(self) -> float:
        """CPU time of the server, of its reaped children and of the living tree."""
        total = 0.0
        for process in self.tree():
            try:
                times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            total += times.user + times.system
            if process.pid == self.ps.pid:
                total += times.children_user + times.children_system
        return total

    def write_bytes(self) -> int:
        """Bytes the living tree has caused to be written to storage (/proc/PID/io)."""
        total = 0
        for process in self.tree():
            try:
                total += process.io_counters().write_bytes
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        return total

    # -- stopping -----------------------------------------------------------------------

    def stop(self, grace: float) -> float | None:
        """SIGTERM; after ``grace`` s SIGKILL for the whole tree; clean up leftovers.

        Returns the seconds the server took to exit after SIGTERM, or None
        if it had to be killed.
        """
        if self.process is None:
            return None
        known = {p.pid: p for p in self.tree()}
        try:
            if self.alive():
                began = time.monotonic()
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(grace)
                    self.stop_s = time.monotonic() - began
                except subprocess.TimeoutExpired:
                    known.update({p.pid: p for p in self.tree()})
                    self._kill(known.values())
                    self.process.wait(10)
            self._kill(known.values())
            self._kill_leftovers()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return self.stop_s

    @staticmethod
    def _kill(processes) -> None:
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    def _kill_leftovers(self) -> None:
        """Kill (by PID) processes whose command line names this server's folder.

        That is how daemons the server started and that left its tree, such
        as the original's gpg-agent (``--homedir`` inside our TMPDIR), are
        found.  Bounded: a few rounds.
        """
        mine = str(self.folder)
        for _ in range(5):
            found = []
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmdline = process.info["cmdline"] or []
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                if process.pid != os.getpid() and any(mine in arg for arg in cmdline):
                    found.append(process)
            if not found:
                return
            self._kill(found)
            psutil.wait_procs(found, timeout=2)


class OurServer(ServerProcess):
    """``bin/mandos`` from this repository."""

    label = "ours"

    def argv(self) -> list[str]:
        return [str(OUR_SERVER), *self.common_options()]


class OriginalServer(ServerProcess):
    """The original Debian ``mandos`` 1.8.16, with a private system bus."""

    label = "original"

    def __init__(self, folder: Path, conf_text: str, **kwargs) -> None:
        super().__init__(folder, conf_text, **kwargs)
        self.bus = PrivateSystemBus(folder)
        self._bus_started = False

    def argv(self) -> list[str]:
        return ["/usr/bin/python3", str(peers.unpacked_root() / "usr/sbin/mandos"),
                *self.common_options()]

    def environment(self) -> dict[str, str]:
        return dict(super().environment(), DBUS_SYSTEM_BUS_ADDRESS=self.bus.address)

    def start(self, timeout: float = 120.0) -> float:
        if not self._bus_started:
            self.bus.__enter__()  # before the clock starts: not the server's cost
            self._bus_started = True
        return super().start(timeout)

    def stop(self, grace: float) -> float | None:
        try:
            return super().stop(grace)
        finally:
            if self._bus_started:
                self.bus.__exit__(None, None, None)
                self._bus_started = False
