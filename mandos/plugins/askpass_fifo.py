"""askpass-fifo: read a password from cryptsetup's FIFO and print it.

The program makes the FIFO ``/lib/cryptsetup/passfifo`` (root-owned, mode
0600) while its effective user is still root, opens it for reading, then
gives up root for good, reads until every writer has closed its end and
copies the bytes unchanged to standard output.  Arguments are ignored.

It is meant to be started by plugin-runner with the real UID/GID of the
plugin user and effective UID 0 (the emulated set-user-ID start), but it
behaves the same when started directly as root.

Only built-in modules are imported: this runs at boot, where start-up time
matters.  No signal handlers are installed, so the SIGTERM with which
plugin-runner stops losing plugins ends the process by default disposition.
"""

import errno
import os
import sys

from mandos import process

# Fixed on purpose.  The program may run with effective UID 0, so a path the
# caller could choose would let anyone able to start it create root-owned
# FIFOs anywhere.
FIFO_PATH = "/lib/cryptsetup/passfifo"
FIFO_MODE = 0o600
CHUNK_SIZE = 1024


class PluginError(Exception):
    """A failure that has been reported and ends the program with *status*."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def program_name() -> str:
    """Base name of the program file, for message prefixes."""
    return process.program_name("askpass-fifo")

def _report(what: str, err: OSError) -> None:
    """Print *err* on standard error with the plugin prefix."""
    message = err.strerror or str(err)
    sys.stderr.write(f"Mandos plugin {program_name()}: {what}: {message}\n")
    sys.stderr.flush()


def make_fifo(path: str = FIFO_PATH) -> None:
    """Create the FIFO at *path*; an existing path of any kind is accepted.

    Raises PluginError: EX_OSFILE for a permission, not-a-directory or
    symbolic-link-loop error, EX_UNAVAILABLE when the folder is missing,
    EX_OSERR otherwise.
    """
    try:
        os.mkfifo(path, FIFO_MODE)
    except FileExistsError:
        return
    except OSError as err:
        _report("mkfifo", err)
        if err.errno in (errno.EACCES, errno.ENOTDIR, errno.ELOOP):
            raise PluginError(os.EX_OSFILE) from err
        if err.errno == errno.ENOENT:
            raise PluginError(os.EX_UNAVAILABLE) from err
        raise PluginError(os.EX_OSERR) from err


def open_fifo(path: str = FIFO_PATH) -> int:
    """Open *path* for reading, blocking until a writer opens it; return the fd.

    Raises PluginError: EX_UNAVAILABLE for permission, not-found or
    bad-address errors, EX_OSFILE for not-a-directory or loop, EX_OSERR
    otherwise.
    """
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as err:
        _report("open", err)
        if err.errno in (errno.EACCES, errno.ENOENT, errno.EFAULT):
            raise PluginError(os.EX_UNAVAILABLE) from err
        if err.errno in (errno.ENOTDIR, errno.ELOOP):
            raise PluginError(os.EX_OSFILE) from err
        raise PluginError(os.EX_OSERR) from err


def drop_privileges() -> None:
    """Set the effective and saved IDs to the real ones, for good.

    Under the emulated set-user-ID start the effective and saved UID are 0.
    Setting all three IDs to the real ones means the writer's data is read
    and written out without root, and nothing later in the process can take
    root back.  The group goes first, while the process may still change it.
    Failures are only reported, as in the original: the FIFO is open by then.
    Supplementary groups are left alone: plugin-runner has already cleared
    them.
    """
    rgid, egid, sgid = os.getresgid()
    if egid != rgid or sgid != rgid:
        try:
            os.setresgid(rgid, rgid, rgid)
        except OSError as err:
            _report("setresgid", err)
    ruid, euid, suid = os.getresuid()
    if euid != ruid or suid != ruid:
        try:
            os.setresuid(ruid, ruid, ruid)
        except OSError as err:
            _report("setresuid", err)


def read_all(fd: int) -> bytearray:
    """Read *fd* to end-of-file in 1 KiB steps and return the bytes.

    Raises PluginError: EX_IOERR for an I/O error, EX_UNAVAILABLE for
    is-a-directory, EX_OSERR otherwise.
    """
    data = bytearray()
    chunk = bytearray(CHUNK_SIZE)
    view = memoryview(chunk)
    try:
        while True:
            try:
                count = os.readv(fd, [view])
            except OSError as err:
                _report("read", err)
                data[:] = bytes(len(data))
                if err.errno == errno.EIO:
                    raise PluginError(os.EX_IOERR) from err
                if err.errno == errno.EISDIR:
                    raise PluginError(os.EX_UNAVAILABLE) from err
                raise PluginError(os.EX_OSERR) from err
            if count == 0:
                return data
            data += view[:count]
    finally:
        # Best effort against the password lingering in freed memory.
        view[:] = bytes(CHUNK_SIZE)
        view.release()


def write_all(data: bytes | bytearray, fd: int = 1) -> None:
    """Write *data* unchanged to *fd*, then close *fd*.

    Raises PluginError: EX_OSFILE for a bad descriptor, bad address or
    invalid argument, EX_IOERR for other write errors; for close errors
    EX_OSFILE (bad descriptor) or EX_IOERR.
    """
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    except OSError as err:
        _report("write", err)
        if err.errno in (errno.EBADF, errno.EFAULT, errno.EINVAL):
            raise PluginError(os.EX_OSFILE) from err
        raise PluginError(os.EX_IOERR) from err
    finally:
        view.release()
    try:
        os.close(fd)
    except OSError as err:
        _report("close", err)
        raise PluginError(os.EX_OSFILE if err.errno == errno.EBADF else os.EX_IOERR) from err


def main(argv: list[str] | None = None) -> int:
    """Run askpass-fifo and return its exit status.

    *argv* (the arguments after the program name) is ignored: the program
    has no options.
    """
    del argv
    try:
        make_fifo()
        fd = open_fifo()
        drop_privileges()
        try:
            data = read_all(fd)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            write_all(data)
        finally:
            data[:] = bytes(len(data))
    except PluginError as failure:
        return failure.status
    except KeyboardInterrupt:
        # Python turns SIGINT into an exception; die by the signal instead,
        # as a program without handlers would.  Rare, so imported here.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
        return 128 + signal.SIGINT
    return os.EX_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
