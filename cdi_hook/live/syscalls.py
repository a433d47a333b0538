"""Thin ctypes wrappers for the syscalls Python 3.11 lacks; each raises OSError(errno).

Numbers are the unified syscall table (the same on x86_64, aarch64 and the other
architectures added since Linux 5.x); the mount-API calls need Linux >= 5.12.
"""

from __future__ import annotations

import ctypes
import errno
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442

CLONE_NEWNS = 0x00020000
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


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str = "") -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what or None)
    return result


def _bytes(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_bytes(target), flags), target)


# openat2(2): with RESOLVE_IN_ROOT a ".." fails with EAGAIN when any rename or mount
# happened on the system during the lookup (the kernel cannot then prove it stayed inside
# the root); the man page says to retry. On a busy node containers mount all the time.
OPENAT2_EAGAIN_TRIES = 64


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    raw_path = _bytes(path)
    for _ in range(OPENAT2_EAGAIN_TRIES - 1):
        result = _syscall(SYS_OPENAT2, dirfd, raw_path, ctypes.byref(how), ctypes.sizeof(how))
        if result >= 0 or ctypes.get_errno() != errno.EAGAIN:
            return _check(result, path)
    return _check(_syscall(SYS_OPENAT2, dirfd, raw_path, ctypes.byref(how), ctypes.sizeof(how)), path)


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _check(_syscall(SYS_OPEN_TREE, dirfd, _bytes(path), ctypes.c_uint(flags | OPEN_TREE_CLOEXEC)), path)


def move_mount(from_fd: int, to_fd: int) -> None:
    """Attach the detached mount from_fd on the inode to_fd refers to (both fds, empty paths)."""
    flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
    _check(_syscall(SYS_MOVE_MOUNT, from_fd, b"", to_fd, b"", ctypes.c_uint(flags)), "move_mount")


def mount_setattr(fd: int, attr_set: int, attr_clr: int = 0, propagation: int = 0, recursive: bool = False) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    flags = AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)
    _check(_syscall(SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr), ctypes.sizeof(attr)),
           "mount_setattr")


def fd_path(fd: int) -> str:
    """The magic link through which path-based calls reach what fd refers to."""
    return f"/proc/self/fd/{fd}"


def setfsuid(uid: int) -> int:
    """Set the filesystem uid; returns the previous one (the call cannot report errors)."""
    return _libc.setfsuid(uid)


def setfsgid(gid: int) -> int:
    return _libc.setfsgid(gid)


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
    fs_fd = _check(_syscall(SYS_FSOPEN, b"tmpfs", ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen tmpfs")
    try:
        for key, value in options.items():
            _check(_syscall(SYS_FSCONFIG, fs_fd, ctypes.c_uint(FSCONFIG_SET_STRING), key.encode(), value.encode(), 0),
                   f"tmpfs {key}={value}")
        _check(_syscall(SYS_FSCONFIG, fs_fd, ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, 0), "tmpfs")
        return _check(_syscall(SYS_FSMOUNT, fs_fd, ctypes.c_uint(FSMOUNT_CLOEXEC), ctypes.c_uint(attr)), "fsmount")
    finally:
        os.close(fs_fd)


def fchown_fd(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", AT_EMPTY_PATH): the owner of the inode an fd refers to, an O_PATH fd of
    a symlink included (os.chown(fd) is fchown, which refuses O_PATH fds)."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")
