"""Dropping root before plugins are touched, and the set-user-ID emulation.

Plugins are usually Python scripts, and the kernel ignores set-user-ID bits
on scripts.  So when plugin-runner starts as root it keeps root only in its
*saved* user and group IDs: its real and effective IDs become the plugin
user's, which is what every directory and file access is checked against.
A plugin file carrying a set-user-ID bit and owned by root is then started
with effective and saved UID 0 (real UID the plugin user), exactly as the
kernel would start a set-user-ID binary; every other plugin gets no way back
to root at all.
"""

import os

INITRAMFS_PLUGIN_DIR = "/lib/mandos/plugins.d"


class PrivilegeState:
    """What the runner kept after dropping privileges."""

    __slots__ = ("uid", "gid", "root_saved")

    def __init__(self, uid: int, gid: int, root_saved: bool) -> None:
        self.uid = uid
        self.gid = gid
        self.root_saved = root_saved


def drop(uid: int, gid: int, warn) -> PrivilegeState:
    """Become the plugin user (real and effective IDs), keeping root saved."""
    if os.getuid() != 0:
        # Not root: nothing to switch; run plugins as the invoking user.
        for fn, value, what in ((os.setgid, gid, "group"), (os.setuid, uid, "user")):
            if value != (os.getgid() if what == "group" else os.getuid()):
                try:
                    fn(value)
                except OSError as err:
                    warn(f"Failed to set {what} ID {value}: {err.strerror}")
        return PrivilegeState(os.getuid(), os.getgid(), False)
    _prepare_initramfs(uid, gid, warn)
    try:
        # Supplementary groups of root (disk, shadow, ...) must not leak
        # into unprivileged plugins.
        os.setgroups([])
    except OSError as err:
        warn(f"Failed to clear supplementary groups: {err.strerror}")
    try:
        os.setresgid(gid, gid, 0)
    except OSError as err:
        warn(f"Failed to set group ID {gid}: {err.strerror}")
    try:
        os.setresuid(uid, uid, 0)
    except OSError as err:
        warn(f"Failed to set user ID {uid}: {err.strerror}")
    return PrivilegeState(uid, gid, os.getresuid()[2] == 0)


def _prepare_initramfs(uid: int, gid: int, warn) -> None:
    """Work-arounds for initramfs images built with everything owned by root."""
    try:
        st = os.stat(INITRAMFS_PLUGIN_DIR)
        if st.st_uid == 0 and st.st_gid == 0 and os.path.isdir(INITRAMFS_PLUGIN_DIR):
            os.chown(INITRAMFS_PLUGIN_DIR, uid, gid)
    except FileNotFoundError:
        pass
    except OSError as err:
        warn(f"Could not chown {INITRAMFS_PLUGIN_DIR}: {err.strerror}")
    if not os.path.lexists("/dev/fd"):
        try:
            os.symlink("/proc/self/fd", "/dev/fd")
        except OSError as err:
            warn(f"Could not create /dev/fd: {err.strerror}")


def become_plugin_user(state: PrivilegeState, setuid_root: bool, setgid_root: bool) -> None:
    """In a forked child: take the IDs the plugin is to run with.

    Raises OSError if the switch fails; the caller must then not execute
    the plugin.
    """
    if not state.root_saved:
        return
    egid = 0 if setgid_root else state.gid
    euid = 0 if setuid_root else state.uid
    # Group first: after the user ID is final we may no longer change it.
    # Saved IDs equal the effective ones, as after a set-user-ID exec.
    os.setresgid(state.gid, egid, egid)
    if euid == 0:
        os.setresuid(state.uid, 0, 0)
    else:
        os.setresuid(state.uid, state.uid, state.uid)
