"""The OpenPGP side of mandos-client, in a process of its own.

Loading python-gnupg and importing the keys (gpg, then gpg-agent for the
secret key) takes as long as the TLS exchange with the server.  Python runs
one thread at a time, so a thread would steal the interpreter from the TLS
work; a forked process runs on another core instead.  The parent connects
while the child imports; the child then decrypts what the parent received.

The child owns the throw-away GnuPG home from creation to removal: it
removes it when the parent closes the channel, when the parent dies, and on
SIGTERM, SIGINT or SIGHUP.  The parent's end sequence waits for that.

The two talk over a socket pair in frames: one type byte, a 4-byte length,
the payload.  The plaintext crosses only this in-memory channel.
"""

import _socket  # not socket: see mandos/client/servers.py
import os
import struct

from mandos import lazylog

log = lazylog.get_logger(__name__)

_HEADER = struct.Struct("!cI")
READY, FAILED, DECRYPT, PLAINTEXT, DECRYPT_FAILED = b"R", b"E", b"D", b"P", b"F"
_MAX_FRAME = 4 * 1024 * 1024
CHILD_EXIT_WAIT = 10.0


class DecryptorError(Exception):
    """The OpenPGP set-up failed; ``status`` is the exit status to use."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _send(sock: _socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _receive(sock: _socket.socket) -> tuple[bytes, bytes]:
    """One frame; raises EOFError when the other side closed."""
    header = _exactly(sock, _HEADER.size)
    kind, length = _HEADER.unpack(header)
    if length > _MAX_FRAME:
        raise EOFError("oversized frame")
    return kind, _exactly(sock, length)


def _exactly(sock: _socket.socket, count: int) -> bytes:
    chunks, missing = [], count
    while missing:
        chunk = sock.recv(min(missing, 65536))
        if not chunk:
            raise EOFError("channel closed")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


class Decryptor:
    """Parent's handle on the OpenPGP child process."""

    def __init__(self, pubkey: str, seckey: str, privileges) -> None:
        parent_end, child_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # child
            parent_end.close()
            status = 1
            try:
                status = _child_main(child_end, pubkey, seckey, privileges)
            finally:
                os._exit(status)
        child_end.close()
        self.pid = pid
        self.sock: _socket.socket | None = parent_end
        self.ready = False

    def wait_ready(self) -> None:
        """Wait until the keys are imported; raises DecryptorError if that failed."""
        if self.ready:
            return
        try:
            kind, payload = _receive(self._channel())
        except (EOFError, OSError) as err:
            raise DecryptorError(os.EX_OSERR, f"OpenPGP process ended: {err}") from None
        if kind == FAILED:
            raise DecryptorError(payload[0], payload[1:].decode(errors="replace"))
        self.ready = True

    def decrypt(self, data: bytes) -> bytes | None:
        """The plaintext, or None if this message could not be decrypted (logged)."""
        self.wait_ready()
        sock = self._channel()
        try:
            _send(sock, DECRYPT, data)
            kind, payload = _receive(sock)
        except (EOFError, OSError) as err:
            raise DecryptorError(os.EX_OSERR, f"OpenPGP process ended: {err}") from None
        if kind == PLAINTEXT:
            return payload
        log.warning("%s", payload.decode(errors="replace"))
        return None

    def _channel(self) -> _socket.socket:
        if self.sock is None:
            raise DecryptorError(os.EX_OSERR, "OpenPGP process already closed")
        return self.sock

    def close(self) -> None:
        """Let the child remove the GnuPG home and wait for it to exit."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.pid:
            _wait_or_kill(self.pid, CHILD_EXIT_WAIT)
            self.pid = 0


def _wait_or_kill(pid: int, timeout: float) -> None:
    """Reap the child, killing it if it has not exited within ``timeout`` seconds."""
    import _signal
    import select
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # already reaped, or a kernel without pidfds
        pidfd = -1
    if pidfd >= 0:
        try:
            exited = bool(select.select([pidfd], [], [], timeout)[0])
        finally:
            os.close(pidfd)
    else:
        exited = _poll_exit(pid, timeout)
    try:
        if not exited:
            log.warning("OpenPGP process %d did not exit; killing it", pid)
            os.kill(pid, _signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ChildProcessError, ProcessLookupError):
        pass


def _poll_exit(pid: int, timeout: float) -> bool:
    """Whether the child ``pid`` exits within ``timeout`` seconds (without reaping it)."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return True
        except ChildProcessError:
            return True
        time.sleep(0.001)
    return False


def _child_main(sock: _socket.socket, pubkey: str, seckey: str, privileges) -> int:
    """Import the keys, then decrypt on request until the parent closes."""
    from mandos import openpgp

    try:
        home = openpgp.GnuPGHome()
    except OSError as err:
        # The original exits 0 here, which plugin-runner would take for an
        # empty password.
        _send(sock, FAILED, bytes([os.EX_OSERR])
              + f"Could not create a GnuPG home: {err.strerror}".encode())
        return 0
    try:
        home.launch_agent()  # starts while python-gnupg is being loaded
        try:
            home.import_keys(pubkey, seckey, privileged=lambda: privileges)
        except Exception as err:  # noqa: BLE001 - reported through the parent
            _send(sock, FAILED, bytes([os.EX_UNAVAILABLE])
                  + f"OpenPGP key import failed: {err}".encode())
            return 0
        # Root was needed only for the clock fix during the import.
        privileges.drop_permanently()
        log.debug("OpenPGP keys imported")
        _send(sock, READY)
        while True:
            try:
                kind, payload = _receive(sock)
            except (EOFError, OSError):
                return 0
            if kind != DECRYPT:
                return 1
            try:
                plaintext = home.decrypt(payload)
            except openpgp.DecryptError as err:
                _send(sock, DECRYPT_FAILED, str(err).encode())
            else:
                _send(sock, PLAINTEXT, plaintext)
                del plaintext
                # Done with the secret key: the agent goes now, while the
                # parent writes the password, not in its end sequence.
                # (Should another decryption be needed, gpg starts a new
                # agent, and close() finds it.)
                home.stop_agent()
    finally:
        home.close()
