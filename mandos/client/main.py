"""mandos-client's run sequence: set up, try servers until one answers, clean up.

Exit status: 0 once a password was received, decrypted and written;
1 when no usable network interface exists; 64 for a bad command line (and
--help/--usage/--version); 69 when TLS or OpenPGP set-up fails; 71 for an
operating-system failure.  A SIGTERM, SIGINT or SIGHUP ends the program by
that signal after the end sequence, even if the password was written.
Otherwise it keeps trying forever.
"""

# The C modules, not their Python wrappers signal, socket and threading,
# which import enum, selectors and more: milliseconds at every boot.
import _signal
import _socket
import _thread
import os
import sys
import time

from mandos.client import options as cli
from mandos.client.privileges import Privileges
from mandos.cmdline import UsageError
from mandos.process import exit_now, original_environment  # noqa: F401 - exit_now for the launcher
from mandos import lazylog

log = lazylog.get_logger("mandos.client")

TERMINATING_SIGNALS = (_signal.SIGINT, _signal.SIGHUP, _signal.SIGTERM)
DEFAULT_OPENPGP_KEYS = (f"{cli.CONF_DIR}/pubkey.txt", f"{cli.CONF_DIR}/seckey.txt")
DEFAULT_DH_PARAMS = f"{cli.CONF_DIR}/dhparams.pem"


class Terminated(BaseException):
    """A terminating signal arrived; unwinds to the end sequence."""


class SignalState:
    """Remembers the first terminating signal and interrupts the work."""

    def __init__(self) -> None:
        self.received = 0

    def install(self) -> None:
        for signum in TERMINATING_SIGNALS:
            if _signal.getsignal(signum) != _signal.SIG_IGN:
                _signal.signal(signum, self._handler)

    def _handler(self, signum: int, frame) -> None:
        if self.received:
            return  # further signals are ignored; the end sequence runs
        self.received = signum
        raise Terminated()

    def check(self) -> None:
        """Raise Terminated if a signal arrived.

        The handler raises by itself, except when the signal lands while a
        C library calls back into Python (GnuTLS's debug log): there the
        exception is swallowed, so the work loop also checks here.
        """
        if self.received:
            raise Terminated()

    def die_if_received(self) -> None:
        """Re-raise the recorded signal with its default action."""
        if self.received:
            _signal.signal(self.received, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [self.received])
            os.kill(os.getpid(), self.received)


def _setup_logging(debug: bool) -> None:
    """Messages on stderr; DEBUG and up with --debug, else WARNING and up.

    The logging module itself is loaded only once a message is emitted.
    """
    def setup() -> None:
        import logging
        handler = logging.StreamHandler(sys.stderr)
        # In debug mode each line tells the milliseconds since start-up.
        timing = "[%(relativeCreated)6.0f ms] " if debug else ""
        handler.setFormatter(logging.Formatter(
            f"Mandos plugin {cli.program_name()}: {timing}%(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.DEBUG if debug else logging.WARNING)

    lazylog.configure(lazylog.DEBUG if debug else lazylog.WARNING, setup)
    if debug:
        setup()
        if os.environ.get("MANDOS_GNUTLS_DEBUG", "1") != "0":
            from mandos import gnutls
            gnutls.enable_debug_logging()


def _fix_key_ownership(opts: cli.ClientOptions, privileges: Privileges) -> None:
    """Give root-owned default key files to the plugin user (initramfs quirk)."""
    paths = [p for p in (opts.pubkey, opts.seckey) if p in DEFAULT_OPENPGP_KEYS]
    if opts.dh_params == DEFAULT_DH_PARAMS:
        paths.append(opts.dh_params)
    with privileges as raised:
        if not raised:
            return
        for path in paths:
            try:
                st = os.stat(path)
                if st.st_uid == 0 and st.st_gid == 0 and os.path.isfile(path):
                    os.chown(path, privileges.uid, privileges.gid)
            except OSError as err:
                log.debug("Could not fix the owner of %s: %s", path, err.strerror)
        if not os.path.lexists("/dev/fd"):
            try:
                os.symlink("/proc/self/fd", "/dev/fd")
            except OSError as err:
                log.debug("Could not create /dev/fd: %s", err.strerror)


def _read_tls_key_files(opts: cli.ClientOptions) -> tuple[bytes, bytes]:
    """The TLS key files' contents; raises SetupError (EX_UNAVAILABLE).

    Missing, unreadable and empty files are found here, before any
    connection; what the files hold is checked by _load_credentials.
    """
    try:
        with open(opts.tls_pubkey, "rb") as file:
            public_pem = file.read()
        with open(opts.tls_privkey, "rb") as file:
            private_pem = file.read()
    except OSError as err:
        raise SetupError(os.EX_UNAVAILABLE, _explain_key_failure(opts, err)) from None
    if not public_pem or not private_pem:
        raise SetupError(os.EX_UNAVAILABLE,
                         _explain_key_failure(opts, ValueError("empty file")))
    return public_pem, private_pem


def _load_credentials(opts: cli.ClientOptions, public_pem: bytes, private_pem: bytes):
    """TLS credentials from the key files' contents; raises SetupError (EX_UNAVAILABLE)."""
    from mandos import gnutls
    try:
        credentials = gnutls.RawPublicKeyCredentials(public_pem, private_pem)
        matches = gnutls.key_pair_matches(public_pem, private_pem)
    except gnutls.GnuTLSError as err:
        raise SetupError(os.EX_UNAVAILABLE, _explain_key_failure(opts, err)) from None
    if not matches:
        credentials.close()
        # The original goes on with such a pair, and every handshake fails.
        raise SetupError(os.EX_UNAVAILABLE,
                         f"The TLS keys {opts.tls_pubkey} and {opts.tls_privkey} "
                         "do not belong together")
    if opts.dh_params:
        try:
            with open(opts.dh_params, "rb") as dh_file:
                credentials.set_dh_params_pem(dh_file.read())
        except (OSError, gnutls.GnuTLSError) as err:
            log.warning("Could not use DH parameters from %s: %s", opts.dh_params, err)
        else:
            return credentials
    if opts.dh_bits:
        try:
            credentials.generate_dh_params(opts.dh_bits)
        except gnutls.GnuTLSError as err:
            credentials.close()
            raise SetupError(os.EX_UNAVAILABLE,
                             f"Could not generate {opts.dh_bits}-bit DH parameters: {err}"
                             ) from None
    return credentials


def _explain_key_failure(opts: cli.ClientOptions, err: Exception) -> str:
    """Turn GnuTLS's terse error into a message naming the bad file."""
    try:
        from mandos import keys
        keys.load_tls_keypair(opts.tls_pubkey, opts.tls_privkey)
    except Exception as detail:  # noqa: BLE001 - any diagnosis is better than none
        return f"Could not load the TLS key pair: {detail}"
    return (f"Could not load the TLS key pair {opts.tls_pubkey}, "
            f"{opts.tls_privkey}: {err}")


class SetupError(Exception):
    """Start-up failed; ``status`` is the exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _write_password(password: bytes) -> None:
    view = memoryview(password)
    while view:
        written = os.write(1, view)
        view = view[written:]


class Client:
    """One run of mandos-client, from set-up to the end sequence."""

    def __init__(self, opts: cli.ClientOptions, privileges: Privileges,
                 signals: SignalState, environ: dict[str, str] | None = None) -> None:
        self.opts = opts
        self.privileges = privileges
        self.signals = signals
        self.credentials = None
        self._tls_key_pems: tuple[bytes, bytes] | None = None
        self.decryptor = None
        self.interfaces = None
        self.used_interfaces: list[str] = []
        # Interfaces whose link-local address finished duplicate detection;
        # the lock serialises the wait among concurrent attempts.
        self._settled: set[int] = set()
        self._settling = _thread.allocate_lock()
        self.device = ""
        self.ifindex = 0
        # The environment as started, for hooks (see original_environment).
        self.environ = environ if environ is not None else dict(os.environ)

    def run(self) -> int:
        """Steps 3-15 of the run sequence; returns the exit status."""
        _fix_key_ownership(self.opts, self.privileges)
        # First, so that the OpenPGP work overlaps with everything else.
        self._start_openpgp()
        connect_mode = self.opts.connect is not None
        from mandos import netif
        interfaces = netif.clean_interface_list(self.opts.interfaces)
        self.device = ",".join(interfaces)
        self._run_hooks("start")
        self.signals.check()
        if not interfaces:
            interfaces = netif.choose_automatically(connect_mode)
            if not interfaces:
                log.error("Could not find a network interface")
                return 1
        self.interfaces = netif.InterfaceManager(self.privileges)
        used = self.interfaces.bring_up(interfaces, self.opts.delay)
        self.signals.check()
        self.used_interfaces = used
        if len(used) == 1:
            self.ifindex = self.interfaces.index_of(used[0])
        # Only read here: parsing the keys loads GnuTLS, which in direct
        # mode overlaps with the server's first steps (see _try_server).
        self._read_tls_keys()
        if connect_mode:
            from mandos.client.servers import parse_connect
            server = parse_connect(self.opts.connect, self.ifindex)
            if server.is_link_local() and self.ifindex:
                # Connecting from a tentative address fails; the original
                # then waits a whole --retry.  Wait for the end of duplicate
                # address detection instead.
                self._wait_settled(self.ifindex)
            return self._direct_mode(server)
        self._ensure_credentials()
        return self._zeroconf_mode(used)

    def _read_tls_keys(self) -> None:
        """Read the TLS key files once; raises SetupError (exit 69)."""
        if self.credentials is None and self._tls_key_pems is None:
            self._tls_key_pems = _read_tls_key_files(self.opts)

    def _ensure_credentials(self) -> None:
        """Load the TLS key pair once; raises SetupError (exit 69) if it is unusable."""
        if self.credentials is None:
            self._read_tls_keys()
            pems, self._tls_key_pems = self._tls_key_pems, None
            self.credentials = _load_credentials(self.opts, *pems)

    def _run_hooks(self, mode: str) -> None:
        from mandos import hooks
        hooks.run_hooks(self.opts.network_hook_dir, mode, device=self.device,
                        debug=self.opts.debug, delay=self.opts.delay,
                        connect=self.opts.connect, environ=self.environ)

    def _zeroconf_mode(self, used: list[str]) -> int:
        """Browse for servers and try each one found until one answers."""
        from mandos import discovery
        from mandos.client import zeroconf_mode
        for name in used:
            # mDNS needs a usable (not tentative) link-local source address;
            # an optimistic one will do: browsing starts while duplicate
            # detection runs, and connections wait for its end (_fetch).
            self.interfaces.wait_link_local(self.interfaces.index_of(name),
                                            max(self.opts.delay, 5.0))
        self.signals.check()
        with zeroconf_mode.AttemptScheduler(self._fetch, self.opts.retry,
                                            finish=self._decrypt) as scheduler, \
                discovery.Browser(scheduler.add, interfaces=used or None) as browser:
            def stop() -> bool:
                browser.check()
                return bool(self.signals.received)
            password = scheduler.run(stop)
        self.signals.check()
        if password is None:
            return os.EX_UNAVAILABLE
        try:
            _write_password(password)
        except OSError as err:
            log.error("Could not write the password: %s", err.strerror)
            return os.EX_IOERR
        finally:
            del password
        log.debug("Password written")
        return 0

    def _wait_settled(self, ifindex: int, should_stop=None) -> None:
        """Before connecting over ``ifindex``: wait for its link-local address
        to finish duplicate detection (see netif.wait_link_local), once."""
        with self._settling:
            if ifindex in self._settled or self.interfaces is None:
                return
            if self.interfaces.wait_link_local(ifindex, max(self.opts.delay, 5.0),
                                               settled=True, should_stop=should_stop):
                self._settled.add(ifindex)

    def _fetch(self, server) -> bytes | None:
        """One concurrent Zeroconf-mode attempt: the encrypted secret, or None."""
        from mandos.client import attempt, route, zeroconf_mode
        if server.family == _socket.AF_INET6 and server.ifindex:
            self._wait_settled(server.ifindex, should_stop=lambda: bool(
                self.signals.received) or zeroconf_mode.abandoned())
            if self.signals.received or zeroconf_mode.abandoned():
                return None
        log.debug("Connecting to %s", server)
        try:
            with route.connect_with_route(
                    attempt.connect, server, connect_mode=False, debug=self.opts.debug,
                    privileges=self.privileges,
                    should_stop=lambda: bool(self.signals.received)) as sock, \
                    zeroconf_mode.track(sock):
                return attempt.fetch_secret(
                    sock, self.credentials, self.opts.priority,
                    should_abort=lambda: bool(self.signals.received)
                    or zeroconf_mode.abandoned())
        except attempt.AttemptFailed as err:
            log.info("Attempt at %s failed: %s", server, err)
            return None

    def _decrypt(self, encrypted: bytes) -> bytes | None:
        """Decrypt what a server sent (one at a time: one OpenPGP process)."""
        from mandos.client.decryptor import DecryptorError
        log.debug("Received %d bytes; decrypting", len(encrypted))
        try:
            return self.decryptor.decrypt(encrypted)
        except DecryptorError as err:
            raise SetupError(err.status, str(err)) from None

    def _start_openpgp(self) -> None:
        """Fork the OpenPGP process: it imports the keys while we connect."""
        from mandos.client.decryptor import Decryptor
        try:
            self.decryptor = Decryptor(self.opts.pubkey, self.opts.seckey, self.privileges)
        except OSError as err:
            raise SetupError(os.EX_OSERR, f"Could not start the OpenPGP process: "
                                          f"{err.strerror}") from None

    def _direct_mode(self, server) -> int:
        """Try the one server until it gives us the password."""
        while True:
            password = self._try_server(server)
            self.signals.check()  # a signal overrides success
            if password is not None:
                try:
                    _write_password(password)
                except OSError as err:
                    log.error("Could not write the password: %s", err.strerror)
                else:
                    log.debug("Password written")
                    return 0
                finally:
                    del password
            log.debug("Retrying in %g seconds", self.opts.retry)
            time.sleep(self.opts.retry)

    def _try_server(self, server) -> bytes | None:
        """One attempt: the decrypted password, or None (reason logged)."""
        from mandos.client import attempt
        from mandos.client.decryptor import DecryptorError
        log.debug("Connecting to %s", server)
        try:
            try:
                with attempt.connect(server) as sock:
                    # The server starts its side of TLS on the version
                    # line; GnuTLS and the key pair are loaded meanwhile
                    # (the first time), which takes milliseconds at every
                    # boot.  A key file that GnuTLS cannot parse therefore
                    # ends the program after one connection is opened.
                    attempt.send_version(sock)
                    self._ensure_credentials()
                    encrypted = attempt.fetch_secret(
                        sock, self.credentials, self.opts.priority,
                        should_abort=lambda: bool(self.signals.received),
                        version_sent=True)
            except attempt.AttemptFailed as err:
                # Unusable key files end the program even while no
                # server answers (exit 69, as the original).
                self._ensure_credentials()
                self.signals.check()
                log.info("Attempt failed: %s", err)
                self.decryptor.wait_ready()  # a failed key import ends the program
                return None
            self.signals.check()
            log.debug("Received %d bytes; decrypting", len(encrypted))
            return self.decryptor.decrypt(encrypted)
        except DecryptorError as err:
            raise SetupError(err.status, str(err)) from None

    def end(self) -> None:
        """The end sequence (CLIENT.md §2.15): stop hooks, interfaces down,
        drop root for good, remove the GnuPG home."""
        if self.credentials is not None:
            self.credentials.close()
            self.credentials = None
        if self.privileges.raise_():
            try:
                self._run_hooks("stop")
                if self.interfaces is not None:
                    self.interfaces.take_down()
            finally:
                self.privileges.lower()
        self.privileges.drop_permanently()
        if self.decryptor is not None:
            # The OpenPGP process removes the GnuPG home before it exits.
            self.decryptor.close()
            self.decryptor = None
        log.debug("End sequence done")


def main(argv: list[str] | None = None) -> int:
    """Run mandos-client; returns the exit status (or dies by a signal)."""
    argv = sys.argv[1:] if argv is None else argv
    signals = SignalState()
    signals.install()
    client = None
    status = os.EX_OSERR
    try:
        # Before the user IDs change: the kernel then hides /proc/self/environ.
        environ = original_environment()
        privileges = Privileges()
        try:
            opts = cli.parse(argv)
        except cli.HelpRequested as request:
            sys.stdout.write(request.text)
            sys.stdout.flush()
            return os.EX_USAGE
        except UsageError as err:
            sys.stderr.write(f"Mandos plugin {cli.program_name()}: {err}\n"
                             f"Try `{cli.PROGRAM} --help' or `{cli.PROGRAM} --usage' "
                             "for more information.\n")
            return os.EX_USAGE
        _setup_logging(opts.debug)
        if opts.connect is not None:
            from mandos.client.servers import parse_connect
            try:
                parse_connect(opts.connect)
            except UsageError as err:
                log.error("%s", err)
                return os.EX_USAGE
        client = Client(opts, privileges, signals, environ)
        status = client.run()
    except Terminated:
        log.debug("Exiting because of a signal")
    except SetupError as err:
        log.error("%s", err)
        status = err.status
    finally:
        if client is not None:
            try:
                client.end()
            except Terminated:
                pass
        signals.die_if_received()
    return status

