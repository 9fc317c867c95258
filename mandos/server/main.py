"""The server's start-up order, privileges, signals and shutdown (SERVER.md §5, §11, §13).

Order matters: the configuration is read and the socket bound while still
root; then root is given up for good, before any client secret file, saved
state or network peer is touched.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import pwd
import signal
import socket
import sys

from mandos.server import clients_conf, settings as server_settings

log = logging.getLogger("mandos.server")

LISTEN_BACKLOG = 128  # the original's 5 drops connections under load
CHECKER_KILL_WAIT = 5.0  # a checker group gets SIGKILL this long after SIGTERM
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class FatalError(Exception):
    """The server cannot run; the message says why."""


def server_identity() -> tuple[int, int]:
    """The unprivileged user and group to run as: _mandos, mandos, or 65534."""
    for name in ("_mandos", "mandos"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    return 65534, 65534


def drop_privileges(uid: int, gid: int) -> None:
    """Become the server user for good (no way back to root)."""
    try:
        if os.getuid() == 0:
            # Root's supplementary groups must not stay with the server and
            # its checkers.
            os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError as err:
        log.warning("Failed to change to user %d, group %d: %s", uid, gid, err.strerror)
    log.debug("Did setuid/setgid to %d:%d", uid, gid)


def create_socket(config) -> socket.socket:
    """The listening socket (SERVER.md §7), bound while still root; not listening yet."""
    family = socket.AF_INET6 if config.use_ipv6 else socket.AF_INET
    fd = server_settings.socket_fd(config)
    if fd is not None:
        sock = socket.socket(fileno=fd)
    else:
        sock = socket.socket(family, socket.SOCK_STREAM)
    if config.interface:
        try:
            sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_BINDTODEVICE", 25),
                            config.interface.encode() + b"\0")
        except OSError as err:
            if err.errno == errno.EPERM:
                log.error("No permission to bind to interface %s", config.interface)
            elif err.errno == errno.ENOPROTOOPT:
                log.error("SO_BINDTODEVICE not available; cannot bind to interface %s",
                          config.interface)
            elif err.errno == errno.ENODEV:
                log.error("Interface %s does not exist, cannot bind", config.interface)
            else:
                raise
    if config.address or config.port:
        if config.port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        address = config.address or ("::" if sock.family == socket.AF_INET6 else "0.0.0.0")
        sock.bind((address, config.port or 0))
    return sock


def daemonize() -> None:
    """Detach: fork, new session, fork again, standard streams to /dev/null."""
    if os.fork():
        os._exit(0)
    os.setsid()
    os.chdir("/")
    if os.fork():
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def notify_systemd(message: str) -> None:
    """sd_notify(3): tell a supervising systemd about us (no-op without it)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as err:
        log.debug("Could not notify systemd: %s", err)


class Server:
    """A running server: the clients, the listener and the optional services."""

    def __init__(self, config, sock: socket.socket, configs: list) -> None:
        self.config = config
        self.sock = sock
        self.configs = configs
        self.registry = None
        self.listener = None
        self.state = None
        self.saver = None
        self.dbus = None
        self.announcer = None
        self.stopping: asyncio.Event | None = None
        self.exit_status = 0

    async def run(self) -> None:
        """Steps 11-20 of the start-up, then serve until a terminating signal."""
        from mandos.server import checker, state
        from mandos.server.client import Client
        from mandos.server.listener import Listener
        from mandos.server.registry import ClientRegistry

        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        for signum in TERMINATING_SIGNALS:
            loop.add_signal_handler(signum, self._stop, signum)

        for config in self.configs:
            clients_conf.load_secret(config)
        self.state = state.StateFile(self.config.statedir)
        stored = self.state.load() if self.config.restore else None
        merged = state.merge(self.configs, stored, now=None)

        async def run_checker(command: str) -> int:
            return await checker.run_checker(command, debug=self.config.debug)

        self.registry = ClientRegistry()
        if self.config.use_dbus:
            from mandos.server import dbus_api
            self.dbus = await dbus_api.start(self.registry)
        clients = []
        for config, fields in merged:
            client = Client(config, run_checker)
            state.apply(client, fields)
            clients.append(client)
        if not clients:
            log.warning("No clients defined")
        self.saver = state.StateSaver(self.state, self.registry,
                                      {config.name: config for config in self.configs})
        for client in clients:
            # Scheduled before the client is announced: no change signals
            # while clients are being set up (SERVER.md §14.4).
            if client.enabled:
                client.init_checker(randomize=True)
            self.registry.add(client)
        self.saver.save_soon()

        self.sock.listen(LISTEN_BACKLOG)
        self.sock.setblocking(False)
        host, port = self.sock.getsockname()[:2]
        log.info("Now listening on address %r, port %d", host, port)
        self.listener = Listener(self.sock, self.registry, priority=self.config.priority,
                                 handshake_timeout=self.config.handshake_timeout,
                                 max_handshakes=self.config.max_handshakes)
        try:
            await self.listener.start()
            if self.config.zeroconf:
                try:
                    await self._announce(port)
                except Exception as err:
                    raise FatalError(f"Zeroconf announcement failed: {err}") from None
            notify_systemd("READY=1")
            await self.stopping.wait()
        finally:
            await self.shutdown()

    async def _announce(self, port: int) -> None:
        from mandos.server import announce, logs
        self.announcer = announce.Announcer(
            self.config.servicename, port, use_ipv6=self.config.use_ipv6,
            interface=self.config.interface or None, on_rename=logs.set_service_name,
            on_fatal=self._announce_failed)
        await self.announcer.start()

    def _announce_failed(self, error: Exception) -> None:
        log.critical("Zeroconf announcement failed: %s", error)
        self.exit_status = 1
        self.stopping.set()

    def _stop(self, signum: int) -> None:
        log.info("Got signal %s; stopping", signal.Signals(signum).name)
        if signum == signal.SIGINT and self.config.debug:
            sys.stderr.write("\n")
        self.stopping.set()

    async def shutdown(self) -> None:
        """Withdraw the announcement, stop serving, save the state, remove clients."""
        notify_systemd("STOPPING=1")
        if self.announcer is not None:
            try:
                await self.announcer.stop()
            except Exception as err:  # noqa: BLE001 - shutdown goes on
                log.warning("Withdrawing the Zeroconf announcement failed: %s", err)
        if self.listener is not None:
            await self.listener.close()
        if self.saver is not None:
            self.saver.flush()
            self.saver.close()
        if self.registry is not None:
            for client in list(self.registry):
                self.registry.remove(client.name)
        if self.dbus is not None:
            await self.dbus.aclose()
        # Let stopped checkers finish ending their process groups.
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=2 * CHECKER_KILL_WAIT)


def self_check(config) -> int:
    """--check: can this server run here with this configuration?

    Loads GnuTLS (with raw public keys), accepts the priority string, reads
    and converts clients.conf, and runs one checker.  Prints each result.
    """
    import asyncio as _asyncio

    from mandos import gnutls
    from mandos.server import checker
    failures = 0

    def report(what: str, error: Exception | None) -> None:
        nonlocal failures
        failures += error is not None
        print(f"{'FAIL' if error else 'ok  '} {what}" + (f": {error}" if error else ""))

    try:
        version = gnutls.library_version()
        with gnutls.CertificateCredentials() as credentials, \
                gnutls.Session(gnutls.Role.CLIENT, credentials, config.priority):
            pass
        report(f"GnuTLS {version} with raw public keys and the priority string", None)
    except gnutls.GnuTLSError as err:
        report("GnuTLS", err)
    path = os.path.join(config.configdir, "clients.conf")
    try:
        text = clients_conf.read_text(path)
        clients = clients_conf.parse(text) if text is not None else []
        report(f"{path}: {len(clients)} clients", None)
    except clients_conf.ConfigError as err:
        report(path, err)
    try:
        status = _asyncio.run(checker.run_checker("true"))
        report("running a checker with /bin/sh",
               None if status == 0 else RuntimeError(f"wait status {status}"))
    except OSError as err:
        report("running a checker with /bin/sh", err)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Run the Mandos server; returns the exit status."""
    from mandos.server import logs
    config = server_settings.load(sys.argv[1:] if argv is None else argv)
    if config.check:
        return self_check(config)
    logs.setup(config)
    try:
        text = clients_conf.read_text(os.path.join(config.configdir, "clients.conf"))
        configs = clients_conf.parse(text) if text is not None else []
        sock = create_socket(config)
        pidfile = None
        if not config.foreground:
            try:
                pidfile = open(config.pidfile, "w")
            except OSError as err:
                log.error("Could not open PID file %s: %s", config.pidfile, err.strerror)
        uid, gid = server_identity()
        drop_privileges(uid, gid)
        if config.debug:
            from mandos import gnutls
            gnutls.enable_debug_logging()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
        if not config.foreground:
            daemonize()
        if pidfile is not None:
            with pidfile:
                pidfile.write(f"{os.getpid()}\n")
        server = Server(config, sock, configs)
        asyncio.run(server.run())
    except (clients_conf.ConfigError, FatalError) as err:
        log.critical("%s", err)
        if not logs.logs_to_stderr():
            # Whoever started the server should see why it stopped.
            sys.stderr.write(f"mandos: {err}\n")
        return 1
    return server.exit_status
