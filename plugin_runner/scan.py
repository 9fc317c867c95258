"""Which entries of the plugin directory are plugins, in which order."""

import os
import stat

from plugin_runner.options import Settings

IGNORED_SUFFIXES = ("~", ".dpkg-new", ".dpkg-old", ".dpkg-bak", ".dpkg-divert")


def ignored_pattern(name: str) -> str | None:
    """Return the shell pattern that excludes ``name``, or None."""
    if name.startswith("."):
        return ".*"
    if len(name) >= 2 and name.startswith("#") and name.endswith("#"):
        return "#*#"
    for suffix in IGNORED_SUFFIXES:
        if name.endswith(suffix):
            return "*" + suffix
    return None


class Candidate:
    """A plugin file opened for execution."""

    __slots__ = ("name", "fd", "setuid_root", "setgid_root")

    def __init__(self, name: str, fd: int, st: os.stat_result, nosuid: bool) -> None:
        self.name = name
        self.fd = fd
        # A set-user-ID (set-group-ID) bit counts only on a file owned by
        # root (group root) on a file system not mounted nosuid, just as
        # the kernel would grant nothing else either.
        self.setuid_root = bool(st.st_mode & stat.S_ISUID) and st.st_uid == 0 and not nosuid
        self.setgid_root = bool(st.st_mode & stat.S_ISGID) and st.st_gid == 0 and not nosuid


def scan(dir_fd: int, settings: Settings, debug) -> list[Candidate]:
    """Open every eligible plugin in the directory, sorted by name (C collation).

    Each returned file is opened read-only; the caller executes it through
    that descriptor, so the file checked is the file run.
    """
    names = sorted(os.listdir(dir_fd), key=os.fsencode)
    found = []
    for name in names:
        pattern = ignored_pattern(name)
        if pattern is not None:
            debug(f'Ignoring plugin dir entry "{name}" matching pattern {pattern}')
            continue
        try:
            # O_NONBLOCK: a FIFO must not block us here (it is skipped below).
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as err:
            debug(f'Could not open plugin "{name}": {err.strerror}', always=True)
            continue
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not os.access(name, os.X_OK, dir_fd=dir_fd):
            debug(f'Ignoring plugin dir entry "{name}" with bad type or mode')
            os.close(fd)
            continue
        record = settings.plugins.get(name)
        if record is not None and record.disabled:
            debug(f'Ignoring disabled plugin "{name}"')
            os.close(fd)
            continue
        nosuid = bool(os.fstatvfs(fd).f_flag & os.ST_NOSUID)
        found.append(Candidate(name, fd, st, nosuid))
    return found
