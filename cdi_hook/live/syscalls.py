"""The syscalls Python 3.11 lacks; each raises OSError(errno) naming the path or the call.

They are made through ctypes (live/_linux_ctypes.py). A small C extension doing the same was
tried and measured: it saves the ctypes import (~4.6 ms alone) but under runc the difference
was lost in the noise (±2 ms), so it is not worth a compiler in every install. Numbers are
the unified syscall table (the same on x86_64, aarch64 and the other architectures added
since Linux 5.x); the mount-API calls need Linux >= 5.12.
"""

from __future__ import annotations

import errno
import os

from cdi_hook.live import _linux_ctypes as _sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import overload

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

# Namespace types for setns(2) (linux/sched.h); defined here only (tests/test_layout.py).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
AT_SYMLINK_NOFOLLOW = 0x100
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 2

MOUNT_ATTR_RDONLY = 0x01
MOUNT_ATTR_NOSUID = 0x02
MOUNT_ATTR_NODEV = 0x04
MOUNT_ATTR_NOEXEC = 0x08
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x00
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80


if TYPE_CHECKING:
    @overload
    def _bytes(path: str) -> bytes: ...
    @overload
    def _bytes(path: str | None) -> bytes | None: ...


def _bytes(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def setns(fd: int, nstype: int) -> None:
    _sys.setns(fd, nstype, "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _sys.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data), target)


def umount2(target: str, flags: int = 0) -> None:
    _sys.umount2(_bytes(target), flags, target)


# openat2(2): with RESOLVE_IN_ROOT a ".." fails with EAGAIN when any rename or mount
# happened on the system during the lookup (the kernel cannot then prove it stayed inside
# the root); the man page says to retry. On a busy node containers mount all the time.
OPENAT2_EAGAIN_TRIES = 64


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    raw_path = _bytes(path)
    for _ in range(OPENAT2_EAGAIN_TRIES - 1):
        try:
            return _sys.openat2(dirfd, raw_path, flags | os.O_CLOEXEC, resolve, mode, path)
        except BlockingIOError:  # EAGAIN
            continue
    return _sys.openat2(dirfd, raw_path, flags | os.O_CLOEXEC, resolve, mode, path)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _sys.open_tree(dirfd, _bytes(path), flags | OPEN_TREE_CLOEXEC, path)


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount from_fd on the inode to_fd refers to (both fds, empty paths)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _sys.move_mount(from_fd, to_fd, flags, "move_mount")


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, propagation: int = 0, recursive: bool = False) -> None:
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _sys.mount_setattr(fd, flags, attr_set, attr_clr, propagation, "mount_setattr")


def mount_id(fd: int) -> int:
    """The id of the mount fd is on, as /proc/self/mountinfo numbers it: statx(STATX_MNT_ID),
    one call; /proc/self/fdinfo where the kernel does not report it there."""
    found = _sys.statx_mount_id(fd, "statx")
    if found is not None:
        return found
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo", f"/proc/self/fdinfo/{fd}")


def fd_path(fd: int) -> str:
    """The magic link through which path-based calls reach what fd refers to."""
    return f"/proc/self/fd/{fd}"


def setfsuid(uid: int) -> int:
    """Set the filesystem uid; returns the previous one (the call cannot report errors)."""
    return _sys.setfsuid(uid)


def setfsgid(gid: int) -> int:
    return _sys.setfsgid(gid)


SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6


def detached_tmpfs(options: dict[str, str], attr: int = 0) -> int:
    """A new tmpfs attached nowhere (fsopen, fsconfig, fsmount): an fd of its root. It is
    reachable only through that fd (or a cwd set from it) and goes away with the last one."""
    fs_fd = _sys.fsopen(b"tmpfs", FSOPEN_CLOEXEC, "fsopen tmpfs")
    try:
        for key, value in options.items():
            _sys.fsconfig(fs_fd, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0, f"tmpfs {key}={value}")
        _sys.fsconfig(fs_fd, FSCONFIG_CMD_CREATE, None, None, 0, "tmpfs")
        return _sys.fsmount(fs_fd, FSMOUNT_CLOEXEC, attr, "fsmount")
    finally:
        os.close(fs_fd)


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): the owner of the inode an fd refers to, an O_PATH fd of
    a symlink included (os.chown(fd) is fchown, which refuses O_PATH fds)."""
    _sys.fchown_fd(fd, uid, gid, "fchownat")


# prctl(2) and setrlimit(2), for confining a child before it execs (ldconfig): the same
# calls python-prctl and the resource module make, through the ctypes already loaded, so a
# start needs neither import (~3.5 ms) nor any import after its worker's setns.
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
RLIMIT_CPU = 0
RLIMIT_CORE = 4
RLIMIT_AS = 9
CAP_LAST_POSSIBLE = 63  # capabilities past the kernel's last one: EINVAL, ignored


def limit_bounding_set(keep: set[int]) -> None:
    """Drop every capability but keep from the bounding set: an exec'd program can never
    hold another."""
    for cap in range(CAP_LAST_POSSIBLE + 1):
        if cap in keep:
            continue
        try:
            _sys.prctl(PR_CAPBSET_DROP, cap, "prctl(PR_CAPBSET_DROP)")
        except OSError as error:
            if error.errno != errno.EINVAL:  # past the kernel's last capability
                raise


def set_no_new_privs() -> None:
    _sys.prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


def setrlimit(resource: int, limit: int) -> None:
    _sys.setrlimit(resource, limit, limit, "setrlimit")
