"""The client's privilege model: root kept only as the saved user ID.

mandos-client starts with its real IDs those of the unprivileged plugin
user and effective (and saved) UID 0, either because it is a set-user-ID
binary in the original or because plugin-runner or password-agent start it
that way.  It lowers its effective UID at once and raises it only around the
few operations that need root (interfaces, console log level, clock, hooks,
route helper).  Key files, GnuPG, TLS and network I/O run unprivileged, so
a bug there cannot be turned into root access.
"""

import os
from mandos import lazylog

log = lazylog.get_logger(__name__)


class Privileges:
    """Raise and lower the effective UID; drop root for good at the end."""

    def __init__(self) -> None:
        self.uid = os.getuid()
        self.gid = os.getgid()
        # The group is never needed again: drop it permanently now.
        try:
            os.setresgid(self.gid, self.gid, self.gid)
        except OSError as err:
            log.warning("Could not drop group privileges: %s", err.strerror)
        self.can_raise = os.getresuid()[2] == 0 or os.geteuid() == 0
        self.lower()

    def raise_(self) -> bool:
        """Become effective root; returns False (and logs) if impossible."""
        if os.geteuid() == 0:
            return True
        try:
            os.seteuid(0)
        except OSError as err:
            log.debug("Could not raise privileges: %s", err.strerror)
            return False
        return True

    def lower(self) -> None:
        """Go back to the unprivileged effective UID."""
        if os.geteuid() != self.uid:
            try:
                os.seteuid(self.uid)
            except OSError as err:
                log.warning("Could not lower privileges: %s", err.strerror)

    def drop_permanently(self) -> None:
        """Real, effective and saved UID become the unprivileged user's."""
        try:
            # Allowed from any effective UID: each new ID is the real one.
            os.setresuid(self.uid, self.uid, self.uid)
        except OSError as err:
            log.warning("Could not drop privileges permanently: %s", err.strerror)
        self.can_raise = False

    def __enter__(self) -> bool:
        return self.raise_()

    def __exit__(self, *exc) -> None:
        self.lower()


def become_root_in_child() -> None:
    """In a forked child (hook, route helper): full root, no extra groups."""
    os.seteuid(0)
    os.setresuid(0, 0, 0)
    os.setresgid(0, 0, 0)
    os.setgroups([])
