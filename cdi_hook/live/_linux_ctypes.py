"""The syscalls Python lacks, through ctypes: argtypes once, each call a small wrapper that
raises OSError (syscalls.py names them for the rest of the code). A compiled extension was
measured and not kept (syscalls.py says why).

Numbers are the unified syscall table (the same on x86_64, aarch64 and the other
architectures added since Linux 5.x); the mount-API calls need Linux >= 5.12.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_OPENAT2 = 437
SYS_MOUNT_SETATTR = 442
AT_EMPTY_PATH = 0x1000


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), what)
    return result


def openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int, what: str) -> int:
    how = _OpenHow(flags, mode, resolve)
    return _check(_syscall(SYS_OPENAT2, dirfd, path, ctypes.byref(how), ctypes.sizeof(how)), what)


def open_tree(dirfd: int, path: bytes, flags: int, what: str) -> int:
    return _check(_syscall(SYS_OPEN_TREE, dirfd, path, ctypes.c_uint(flags)), what)


def move_mount(from_fd: int, to_fd: int, flags: int, what: str) -> None:
    _check(_syscall(SYS_MOVE_MOUNT, from_fd, b"", to_fd, b"", ctypes.c_uint(flags)), what)


def mount_setattr(fd: int, flags: int, attr_set: int, attr_clr: int, propagation: int, what: str) -> None:
    attr = _MountAttr(attr_set, attr_clr, propagation, 0)
    _check(_syscall(SYS_MOUNT_SETATTR, fd, b"", ctypes.c_uint(flags), ctypes.byref(attr), ctypes.sizeof(attr)), what)


def setns(fd: int, nstype: int, what: str) -> None:
    _check(_libc.setns(fd, nstype), what)


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None, what: str) -> None:
    _check(_libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), what)


def umount2(target: bytes, flags: int, what: str) -> None:
    _check(_libc.umount2(target, flags), what)


def fsopen(fstype: bytes, flags: int, what: str) -> int:
    return _check(_syscall(SYS_FSOPEN, fstype, ctypes.c_uint(flags)), what)


def fsconfig(fd: int, cmd: int, key: bytes | None, value: bytes | None, aux: int, what: str) -> None:
    _check(_syscall(SYS_FSCONFIG, fd, ctypes.c_uint(cmd), key, value, aux), what)


def fsmount(fd: int, flags: int, attr: int, what: str) -> int:
    return _check(_syscall(SYS_FSMOUNT, fd, ctypes.c_uint(flags), ctypes.c_uint(attr)), what)


def fchown_fd(fd: int, uid: int, gid: int, what: str) -> None:
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), what)


STATX_MNT_ID = 0x1000
_STATX_SIZE = 256  # struct statx (linux/stat.h)
_STX_MNT_ID_OFFSET = 0x90


def statx_mount_id(fd: int, what: str) -> int | None:
    """The id of the mount fd is on (statx STATX_MNT_ID, Linux >= 5.8; glibc's statx()
    because its syscall number differs between architectures); None when the kernel does
    not report it."""
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    _check(_libc.statx(fd, b"", AT_EMPTY_PATH, STATX_MNT_ID, buffer), what)
    if not int.from_bytes(buffer.raw[:4], "little") & STATX_MNT_ID:
        return None
    return int.from_bytes(buffer.raw[_STX_MNT_ID_OFFSET:_STX_MNT_ID_OFFSET + 8], "little")


def setfsuid(uid: int) -> int:
    return _libc.setfsuid(uid)


def setfsgid(gid: int) -> int:
    return _libc.setfsgid(gid)


class _Rlimit(ctypes.Structure):
    _fields_ = [("rlim_cur", ctypes.c_ulong), ("rlim_max", ctypes.c_ulong)]  # rlim_t: unsigned long


def prctl(option: int, arg: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def setrlimit(resource: int, soft: int, hard: int, what: str) -> None:
    limit = _Rlimit(soft, hard)
    _check(_libc.setrlimit(resource, ctypes.byref(limit)), what)
