"""Network namespaces as "hosts" for end-to-end tests of the boot network path.

A :class:`Lab` creates network namespaces ("hosts") and joins them, either
directly by a veth pair (:meth:`Lab.veth`) or through a "switch": a bridge
in a hub namespace of its own that floods multicast like a plain hub
(:meth:`Lab.plug`).  Every namespace, process and folder it made is removed
by :meth:`Lab.close` (also on leaving a ``with`` block), whatever happened.
Only addresses inside these namespaces are ever used: nothing is sent on
the real host's interfaces.

Processes run in a host through ``ip netns exec``, optionally with a host
name of their own (a UTS namespace) and with folders bind-mounted over
system paths (a mount namespace), e.g. a private ``/tmp`` or ``/dev``.  The
exec chain (``ip`` → ``unshare`` → ``sh`` → program) keeps one PID, so the
PID seen here is the program's own and a signal sent to it reaches the
program, not a wrapper.

The second half of the module starts the Mandos peers in hosts: key files
and ``clients.conf`` sections from our ``mandos-keygen``, our server
(``bin/mandos``) with Zeroconf, the original Debian server (1.8.16) with a
namespace-private system D-Bus and avahi-daemon, avahi-daemon alone
publishing a static service file, and the command lines of both clients.

Duplicate-address detection: a new namespace has the kernel's defaults
(DAD on, one probe, so a new link-local address stays "tentative" for a
second or two).  ``Lab.host(..., dad=False)`` switches it off for every
interface the host gets.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

E2E = Path(__file__).resolve().parent
REPO = E2E.parents[1]
sys.path.insert(0, str(E2E.parent))
sys.path.insert(0, str(E2E))
import peers  # noqa: E402
from mdns_lab import announcer_argv, write_avahi_files  # noqa: E402
from original_server import system_bus_config  # noqa: E402
from our_server import PrivateDev  # noqa: E402

PYTHON = "/usr/bin/python3"  # Debian's: python3-zeroconf, python3-dbus, ...
OUR_CLIENT = REPO / "plugins.d" / "mandos-client"
OUR_SERVER = REPO / "bin" / "mandos"
OUR_KEYGEN = REPO / "bin" / "mandos-keygen"
HELPER_DIR = REPO / "plugin-helpers"
SERVER_USER = 65534  # both servers drop privileges to this user here
# Folders live outside /tmp: a client may run with a private /tmp over it.
FOLDER_BASE = "/var/tmp"
IFA_F_TENTATIVE = 0x40
IFA_F_DADFAILED = 0x08


class NetnsError(RuntimeError):
    """A namespace could not be set up (no root, no iproute2, ...)."""


def run(*argv: str, timeout: float = 30, check: bool = True) -> str:
    """Run a command to completion; its standard output (RuntimeError on failure)."""
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result.stdout


# --------------------------------------------------------------------------
# Processes.

class Process:
    """A program running in a host.

    Standard output is collected as bytes (``stdout``), standard error as
    text lines (``stderr``); or both go to ``log`` (a file path) when given.
    """

    def __init__(self, argv: list[str], label: str, *, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.label = label
        self.argv = argv
        self.stdout = b""
        self.stderr: list[str] = []
        self.log = log
        self._threads: list[threading.Thread] = []
        self.started = time.monotonic()
        self.ended: float | None = None
        if log is not None:
            with open(log, "ab") as file:
                self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=file,
                                                stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)
        else:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=env, start_new_session=True)
            self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                             threading.Thread(target=self._read_stderr, daemon=True)]
            for thread in self._threads:
                thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            while True:
                data = self.process.stdout.read1(65536)
                if not data:
                    return
                self.stdout += data

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            for line in self.process.stderr:
                self.stderr.append(line.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        """Everything it wrote so far (the log file's content, or standard error)."""
        if self.log is not None:
            try:
                return self.log.read_text(errors="replace")
            except FileNotFoundError:
                return ""
        return "\n".join(self.stderr)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def poll(self) -> int | None:
        status = self.process.poll()
        if status is not None and self.ended is None:
            self.ended = time.monotonic()
        return status

    def wait(self, timeout: float) -> int | None:
        """Its exit status (negative: killed by that signal), or None on timeout."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.ended is None:
            self.ended = time.monotonic()
        for thread in self._threads:
            thread.join(timeout=5)
        return status

    def wait_for_output(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in what it wrote (AssertionError on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output())
            if match:
                return match
            if time.monotonic() > deadline or self.poll() is not None:
                match = re.search(pattern, self.output())
                if match:
                    return match
                raise AssertionError(f"{self.label}: nothing like {pattern!r} within "
                                     f"{timeout} s (exit status {self.poll()}):\n{self.tail()}")
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        """Signal the program itself (not its process group)."""
        if self.poll() is None:
            self.process.send_signal(signum)

    def kill_group(self, grace: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace`` seconds."""
        if self.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        self.poll()
        for thread in self._threads:
            thread.join(timeout=5)


# --------------------------------------------------------------------------
# Hosts.

class Host:
    """One network namespace of a :class:`Lab`."""

    def __init__(self, lab: "Lab", name: str, role: str, hostname: str) -> None:
        self.lab = lab
        self.name = name
        self.role = role
        self.hostname = hostname

    def __repr__(self) -> str:
        return f"Host({self.name!r})"

    # -- commands ----------------------------------------------------------
    def ip(self, *argv: str, check: bool = True) -> str:
        return run("ip", "-n", self.name, *argv, check=check)

    def exec(self, *argv: str, check: bool = True, timeout: float = 30) -> str:
        return run("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout)

    def sysctl(self, setting: str) -> None:
        self.exec("sysctl", "-qw", setting)

    def set_dad(self, ifname: str, on: bool) -> None:
        """Duplicate-address detection on or off for one interface."""
        self.sysctl(f"net.ipv6.conf.{ifname}.accept_dad={int(on)}")

    # -- state -------------------------------------------------------------
    def link(self, ifname: str) -> dict | None:
        """``ip -j link show`` of an interface, None if it does not exist."""
        out = self.ip("-j", "link", "show", "dev", ifname, check=False)
        try:
            entries = json.loads(out) if out.strip() else []
        except ValueError:
            entries = []
        return entries[0] if entries else None

    def exists(self, ifname: str) -> bool:
        return self.link(ifname) is not None

    def is_up(self, ifname: str) -> bool:
        link = self.link(ifname)
        return link is not None and "UP" in link.get("flags", [])

    def mac(self, ifname: str) -> str:
        link = self.link(ifname)
        assert link is not None, f"no interface {ifname} in {self.name}"
        return link["address"]

    def master(self, ifname: str) -> str | None:
        link = self.link(ifname)
        return None if link is None else link.get("master")

    def ipv6_addresses(self, ifname: str) -> list[tuple[str, int]]:
        """(address, flags) of an interface's IPv6 addresses."""
        result = []
        for line in self.exec("cat", "/proc/net/if_inet6").splitlines():
            fields = line.split()
            if fields[5] == ifname:
                address = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
                result.append((address, int(fields[4], 16)))
        return result

    def link_local(self, ifname: str, timeout: float = 15) -> str:
        """The interface's link-local address, once usable (not tentative)."""
        deadline = time.monotonic() + timeout
        while True:
            for address, flags in self.ipv6_addresses(ifname):
                if (address.startswith("fe80:")
                        and not flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED)):
                    return address
            if time.monotonic() > deadline:
                raise AssertionError(f"{ifname} in {self.name} got no usable link-local "
                                     f"address within {timeout} s")
            time.sleep(0.05)

    def wait_address(self, ifname: str, address: str, timeout: float = 15) -> None:
        """Until ``address`` is on the interface and no longer tentative."""
        deadline = time.monotonic() + timeout
        while True:
            if any(a == address and not f & IFA_F_TENTATIVE
                   for a, f in self.ipv6_addresses(ifname)):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{address} on {ifname} in {self.name} not usable "
                                     f"within {timeout} s")
            time.sleep(0.05)

    def routes(self, family: int = 6) -> list[dict]:
        out = self.ip(f"-{family}", "-j", "route", "show", "table", "all")
        return json.loads(out) if out.strip() else []

    def listening(self, port: int) -> bool:
        """Whether a TCP socket in this host listens on ``port``."""
        for table in ("/proc/net/tcp6", "/proc/net/tcp"):
            for line in self.exec("cat", table).splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
        return False

    def wait_listening(self, port: int, process: Process | None = None,
                       timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.listening(port):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"{process.label} exited {process.poll()} before "
                                   f"listening:\n{process.tail()}")
            if time.monotonic() > deadline:
                tail = process.tail() if process is not None else ""
                raise RuntimeError(f"nothing listens on port {port} in {self.name} after "
                                   f"{timeout} s\n{tail}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this host's."""
        return [int(p) for p in run("ip", "netns", "pids", self.name, check=False).split()]

    def process_names(self) -> list[str]:
        names = []
        for pid in self.pids():
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
        return names

    # -- processes ---------------------------------------------------------
    def command(self, argv: Iterable[str], *, hostname: str | None = None,
                binds: dict[str, Path] | None = None, tmpfs: Iterable[str] = ()) -> list[str]:
        """``argv`` wrapped to run in this host.

        ``hostname``: in a UTS namespace with that host name.  ``binds``
        (target → source folder) and ``tmpfs`` (targets): in a mount
        namespace with those mounts.
        """
        argv = [str(a) for a in argv]
        wrapper = ["ip", "netns", "exec", self.name]
        steps = []
        unshare = []
        if hostname is not None:
            unshare.append("--uts")
            steps.append(f"hostname {shlex.quote(hostname)}")
        tmpfs = list(tmpfs)
        if binds or tmpfs:
            unshare += ["--mount", "--propagation", "private"]
            for target in tmpfs:
                steps.append(f"mount -t tmpfs tmpfs {shlex.quote(target)}")
            for target, source in (binds or {}).items():
                if any(target.startswith(base.rstrip("/") + "/") for base in tmpfs):
                    # A mount point inside a fresh tmpfs has to be made first.
                    steps.append(f"mkdir -p {shlex.quote(target)}")
                steps.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}")
        if not steps:
            return wrapper + argv
        script = " && ".join(steps) + ' && exec "$@"'
        return wrapper + ["unshare", *unshare, "--", "/bin/sh", "-c", script, "sh", *argv]

    def spawn(self, argv: Iterable[str], label: str, *, env: dict[str, str] | None = None,
              log: Path | None = None, hostname: str | None = None,
              binds: dict[str, Path] | None = None, tmpfs: Iterable[str] = ()) -> Process:
        process = Process(self.command(argv, hostname=hostname, binds=binds, tmpfs=tmpfs),
                          f"{label} in {self.role}", env=env, log=log)
        self.lab.processes.append(process)
        return process


# --------------------------------------------------------------------------
# The lab.

class Lab:
    """Hosts (network namespaces) and the links between them; close() removes all."""

    _serial = itertools.count()

    def __init__(self, tag: str = "boot") -> None:
        if os.geteuid() != 0:
            raise NetnsError(f"network namespaces need root (running as uid {os.geteuid()})")
        if shutil.which("ip") is None:
            raise NetnsError("the ip command (iproute2) is needed for network namespaces")
        self.prefix = f"mandos-{tag}-{os.getpid()}-{next(self._serial)}"
        self.hosts: list[Host] = []
        self.processes: list[Process] = []
        self.folders: list[Path] = []
        self.cleanups: list[Callable[[], None]] = []  # run by close(), last first
        self.hub: Host | None = None
        self._segments: set[str] = set()
        self._ports = itertools.count()
        self._closed = False

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def folder(self, prefix: str = "mandos-netns-") -> Path:
        """A folder removed by close(), traversable by unprivileged users."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=FOLDER_BASE))
        os.chmod(path, 0o755)
        self.folders.append(path)
        return path

    def host(self, role: str, *, hostname: str | None = None, dad: bool = True) -> Host:
        """A new namespace with loopback up; ``dad=False``: no DAD on its interfaces."""
        name = f"{self.prefix}-{role}"
        try:
            run("ip", "netns", "add", name)
        except (RuntimeError, OSError) as error:
            raise NetnsError(f"cannot create network namespace {name}: {error}") from None
        host = Host(self, name, role, hostname or f"{role}-host")
        self.hosts.append(host)
        host.ip("link", "set", "lo", "up")
        if not dad:
            host.sysctl("net.ipv6.conf.all.accept_dad=0")
            host.sysctl("net.ipv6.conf.default.accept_dad=0")
        return host

    def veth(self, a: Host, a_if: str, b: Host, b_if: str, *, a_up: bool = True,
             b_up: bool = True) -> None:
        """Join two hosts directly by a veth pair."""
        run("ip", "link", "add", a_if, "netns", a.name, "type", "veth",
            "peer", "name", b_if, "netns", b.name)
        for host, ifname, up in ((a, a_if, a_up), (b, b_if, b_up)):
            self._configure(host, ifname, up)

    def plug(self, host: Host, ifname: str, segment: str = "lan", *, up: bool = True) -> None:
        """Connect ``host`` to ``segment`` (a switch that stays up) through ``ifname``."""
        if self.hub is None:
            self.hub = self.host("hub")
            self.hub.sysctl("net.ipv6.conf.all.disable_ipv6=1")
            self.hub.sysctl("net.ipv6.conf.default.disable_ipv6=1")
        if segment not in self._segments:
            self.hub.ip("link", "add", f"br-{segment}", "type", "bridge", "mcast_snooping", "0")
            self.hub.ip("link", "set", f"br-{segment}", "up")
            self._segments.add(segment)
        port = f"p{next(self._ports)}"
        run("ip", "link", "add", ifname, "netns", host.name, "type", "veth",
            "peer", "name", port, "netns", self.hub.name)
        self.hub.ip("link", "set", port, "master", f"br-{segment}")
        self.hub.ip("link", "set", port, "up")
        self._configure(host, ifname, up)

    @staticmethod
    def _configure(host: Host, ifname: str, up: bool) -> None:
        # The per-interface setting counts only if "all" is off too; a host
        # made with dad=False has both off, one made with dad=True both on.
        accept = host.exec("sysctl", "-n", "net.ipv6.conf.default.accept_dad").strip()
        host.sysctl(f"net.ipv6.conf.{ifname}.accept_dad={accept}")
        if up:
            host.ip("link", "set", ifname, "up")

    def close(self) -> None:
        """Stop every process, delete every namespace and folder.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for process in reversed(self.processes):
                try:
                    process.kill_group()
                except Exception:  # noqa: BLE001 - cleaning up goes on regardless
                    pass
            # Whatever still lives in our namespaces was started by us (a
            # daemon that left its process group, a gpg-agent).
            for host in self.hosts:
                for pid in host.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            for cleanup in reversed(self.cleanups):
                try:
                    cleanup()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            for host in reversed(self.hosts):
                subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            for folder in self.folders:
                shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------
# Mandos peers.

def make_keys(folder: Path, name: str, password: bytes, *, bits: int | None = None
              ) -> tuple[Path, str]:
    """Key files (our mandos-keygen) and the ``clients.conf`` section for them."""
    keys = folder / f"keys-{name}"
    size = ["--length", str(bits), "--sublength", str(bits)] if bits else []
    run(PYTHON, str(OUR_KEYGEN), "--dir", str(keys), "--force", *size, timeout=300)
    passfile = folder / f"pass-{name}"
    passfile.write_bytes(password)
    section = run(PYTHON, str(OUR_KEYGEN), "--dir", str(keys), "--passfile", str(passfile),
                  "--no-ssh", "--name", name, timeout=120)
    passfile.unlink()
    os.chmod(keys, 0o755)
    return keys, section


def key_options(keys: Path) -> list[str]:
    return ["--pubkey", str(keys / "pubkey.txt"), "--seckey", str(keys / "seckey.txt"),
            "--tls-pubkey", str(keys / "tls-pubkey.pem"),
            "--tls-privkey", str(keys / "tls-privkey.pem")]


def original_client() -> Path:
    return peers.client_libdir() / "plugins.d" / "mandos-client"


def client_command(kind: str, keys: Path, hook_dir: Path, *, interface: str | None = None,
                   connect: str | None = None, debug: bool = False,
                   extra: Iterable[str] = ()) -> list[str]:
    """mandos-client's command line; ``kind`` is "ours" or "original"."""
    program = OUR_CLIENT if kind == "ours" else original_client()
    argv = [str(program), *key_options(keys), "--network-hook-dir", str(hook_dir)]
    if interface is not None:
        argv += ["--interface", interface]
    if connect is not None:
        argv += ["--connect", connect]
    if debug:
        argv.append("--debug")
    return argv + list(extra)


def client_env(**extra: str) -> dict[str, str]:
    """The clients' environment: no MANDOSPLUGINHELPERDIR unless given, quiet GnuTLS."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MANDOSPLUGINHELPERDIR", "DBUS_SYSTEM_BUS_ADDRESS")}
    env["MANDOS_GNUTLS_DEBUG"] = "0"
    env.update(extra)
    return env


def _server_folders(folder: Path, clients_conf: str) -> tuple[Path, Path, Path]:
    config, state, tmp = folder / "config", folder / "state", folder / "tmp"
    for path in (config, state, tmp):
        path.mkdir(parents=True, exist_ok=True)
    os.chown(state, SERVER_USER, SERVER_USER)
    os.chmod(tmp, 0o1777)
    (config / "clients.conf").write_text(f"[DEFAULT]\nchecker = true\n\n{clients_conf}")
    (config / "mandos.conf").write_text("[DEFAULT]\n")
    return config, state, tmp


def start_our_server(host: Host, folder: Path, clients_conf: str, *, port: int = 4711,
                     ipv6: bool = True, zeroconf: bool = True,
                     extra: Iterable[str] = (), wait: bool = True) -> Process:
    """Our bin/mandos in ``host``, in the foreground, logging to ``folder/server.log``.

    It runs with the host's own host name and a private /dev without a
    ``log`` socket (so it logs to standard error, whatever the real
    machine's /dev/log is).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config, state, tmp = _server_folders(folder, clients_conf)
    dev = PrivateDev(folder / "dev", syslog=False)
    argv = [PYTHON, str(OUR_SERVER), "--foreground", "--no-dbus", "--debuglevel", "DEBUG",
            "--port", str(port), "--configdir", str(config), "--statedir", str(state)]
    if not ipv6:
        argv.append("--no-ipv6")
    if not zeroconf:
        argv.append("--no-zeroconf")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    env["TMPDIR"] = str(tmp)
    process = host.spawn(argv + list(extra), "our server", env=env,
                         log=folder / "server.log", hostname=host.hostname,
                         binds={"/dev": dev.path})
    if wait:
        host.wait_listening(port, process)
    return process


def start_system_bus(host: Host, folder: Path) -> tuple[Process, str]:
    """A private dbus-daemon of type "system" in ``host``; (process, address)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    socket_path = folder / "system_bus_socket"
    config = folder / "bus.conf"
    config.write_text(system_bus_config(f"unix:path={socket_path}"))
    process = host.spawn(["dbus-daemon", "--nofork", "--nopidfile",
                          f"--config-file={config}"], "dbus-daemon", log=folder / "bus.log")
    deadline = time.monotonic() + 15
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dbus-daemon did not start:\n{process.tail()}")
        time.sleep(0.02)
    os.chmod(socket_path, 0o777)
    return process, f"unix:path={socket_path}"


def start_avahi(host: Host, folder: Path, interfaces: str, *, bus: str | None = None,
                services: Iterable[tuple[str, int, str]] = ()) -> Process:
    """avahi-daemon in ``host`` with the host's name, on ``interfaces`` only.

    It gets a private ``/run`` (tmpfs) and a private services folder holding
    a static service file per (name, port, protocol) in ``services``;
    ``bus`` is the address of a private system bus (D-Bus API on), else no
    D-Bus.  ``--no-chroot``, as a chroot would need the real /etc/avahi.
    """
    if shutil.which("avahi-daemon") is None:
        raise RuntimeError("avahi-daemon is not installed (Debian package avahi-daemon)")
    folder.mkdir(parents=True, exist_ok=True)
    config, service_dir = write_avahi_files(folder, interfaces, services, dbus=bool(bus))
    env = {k: v for k, v in os.environ.items() if k != "DBUS_SYSTEM_BUS_ADDRESS"}
    if bus:
        env["DBUS_SYSTEM_BUS_ADDRESS"] = bus
    # /run is a tmpfs, so the folder for its PID file has to be made there.
    argv = ["/bin/sh", "-c", 'mkdir -p /run/avahi-daemon && exec "$@"', "sh",
            "avahi-daemon", "--no-chroot", "--no-rlimits", f"--file={config}"]
    process = host.spawn(argv, "avahi-daemon", env=env, log=folder / "avahi.log",
                         hostname=host.hostname, tmpfs=["/run"],
                         binds={"/etc/avahi/services": service_dir})
    process.wait_for_output(r"Server startup complete", 20)
    return process


def start_original_server(host: Host, folder: Path, clients_conf: str, bus: str, *,
                          port: int = 4711, ipv6: bool = True,
                          extra: Iterable[str] = (), wait: bool = True) -> Process:
    """The original Debian server (1.8.16) in ``host``, with Zeroconf through Avahi.

    ``bus`` is the private system bus avahi-daemon is on.  The server runs
    with the host's name and a private /dev whose ``log`` socket is drained
    (it logs to /dev/log as well and complains when nothing listens).
    """
    folder.mkdir(parents=True, exist_ok=True)
    config, state, tmp = _server_folders(folder, clients_conf)
    dev = PrivateDev(folder / "dev", syslog=True)
    argv = [PYTHON, str(peers.unpacked_root() / "usr/sbin/mandos"), "--foreground", "--debug",
            "--no-dbus", "--port", str(port), "--configdir", str(config),
            "--statedir", str(state)]
    if not ipv6:
        argv.append("--no-ipv6")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "LISTEN_FDS")}
    env.update(TMPDIR=str(tmp), DBUS_SYSTEM_BUS_ADDRESS=bus)
    process = host.spawn(argv + list(extra), "original server", env=env,
                         log=folder / "server.log", hostname=host.hostname,
                         binds={"/dev": dev.path})
    host.lab.cleanups.append(dev.close)
    if wait:
        host.wait_listening(port, process)
    return process


def start_announcer(host: Host, folder: Path, name: str, port: int, *,
                    ipv6: bool = True) -> Process:
    """Our server's Announcer alone: a Mandos service on ``port`` (nothing listens)."""
    folder.mkdir(parents=True, exist_ok=True)
    process = host.spawn(announcer_argv(name, port, ipv6=ipv6), "announcer",
                         log=folder / "announcer.log", hostname=host.hostname)
    process.wait_for_output(r'"event": "started"', 20)
    return process


SILENT_LISTENER = r"""
import signal, socket, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("::", int(sys.argv[1])))
server.listen(16)
print("listening", flush=True)
held = []
while True:
    connection, _ = server.accept()
    held.append(connection)  # never read, never answered, never closed
"""


def start_silent_listener(host: Host, folder: Path, port: int) -> Process:
    """A "hung server": accepts TCP connections on ``port`` and never answers."""
    folder.mkdir(parents=True, exist_ok=True)
    process = host.spawn([PYTHON, "-c", SILENT_LISTENER, str(port)], "silent listener",
                         log=folder / "silent.log")
    host.wait_listening(port, process)
    return process


def machine_summary() -> str:
    import platform
    return (f"{os.cpu_count()} cores, Python {platform.python_version()} "
            f"({sys.executable}), kernel {platform.release()}")


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
