"""Device nodes inside the container rootfs: mknod, or a bind mount of the host node.

A node is created with mknodat on an fd of its parent directory (resolved inside the
rootfs), then owned and moded through /proc/self/fd/N of an O_PATH fd of the new inode,
and its rdev is checked with fstat, so a name swapped under us can never be chowned or
trusted. When the container has a user namespace, or mknod is refused, the host node is
bind-mounted onto an empty file instead (what runc does): a node made by us would sit on a
filesystem its user namespace may not open devices from. The host node's detached mount
(open_tree clone) is taken before the worker enters the container's mount namespace,
because a mount can only be cloned from the namespace it lives in.
A node already present with the same type and rdev is left alone: the runtime (or an
earlier hook) injected it natively and its owner and mode are the runtime's business.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from cdi_hook.errors import HookError
from cdi_hook.live import syscalls
from cdi_hook.live.rootfs import Rootfs, create_empty_file
from cdi_hook.spec.model import DeviceNode

STEP = "device node"
DEFAULT_FILE_MODE = 0o666  # runc's default when neither the spec nor the host gives one
_S_IFMT = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


@dataclass
class NodeJob:
    origin: str
    node: DeviceNode  # completed (hostdev.complete_node): type, major, minor, host_path set
    uid: int
    gid: int
    host_tree_fd: int | None = None  # detached clone of the host node, for the bind-mount way


def default_owner(process_uid: int, process_gid: int, node: DeviceNode) -> tuple[int, int]:
    """CDI: an absent uid/gid means the container process's, when that is not root; else 0."""
    uid = node.uid if node.uid is not None else (process_uid if process_uid > 0 else 0)
    gid = node.gid if node.gid is not None else (process_gid if process_gid > 0 else 0)
    return uid, gid


def clone_host_nodes(jobs: list[NodeJob]) -> None:
    """Before setns: take a detached mount of each host b/c node that exists (None otherwise)."""
    for job in jobs:
        if job.node.type == "p" or not job.node.host_path:
            continue
        try:
            st = os.lstat(job.node.host_path)
        except OSError:
            continue
        if stat.S_IFMT(st.st_mode) == _S_IFMT[job.node.type] and st.st_rdev == _rdev(job.node):
            try:
                job.host_tree_fd = syscalls.open_tree(-100, job.node.host_path,
                                                      syscalls.OPEN_TREE_CLONE | syscalls.AT_SYMLINK_NOFOLLOW)
            except OSError:
                job.host_tree_fd = None


def create_nodes(rootfs: Rootfs, jobs: list[NodeJob], by_bind_mount: bool, mounted_fds: list[int],
                 notes: list[str]) -> None:
    """Create every node; bind mounts made are appended to mounted_fds (for undo)."""
    for job in jobs:
        try:
            _create_node(rootfs, job, by_bind_mount, mounted_fds, notes)
        except OSError as error:
            raise HookError(STEP, job.origin, f"{job.node.path}: {_why(error)}") from None


def _create_node(rootfs: Rootfs, job: NodeJob, by_bind_mount: bool, mounted_fds: list[int],
                 notes: list[str]) -> None:
    node = job.node
    want_fmt = _S_IFMT[node.type]
    existing = _existing(rootfs, node.path)
    if existing is not None:
        if stat.S_IFMT(existing.st_mode) == want_fmt and (node.type == "p" or existing.st_rdev == _rdev(node)):
            notes.append(f"{node.path}: already present, left alone")
            return
        raise HookError(STEP, job.origin, f"{node.path} already exists in the container and is not "
                                          f"the {node.type} {node.major}:{node.minor} device the spec names")
    if not by_bind_mount or node.type == "p":
        mode = node.file_mode if node.file_mode is not None else DEFAULT_FILE_MODE
        try:
            fd, _ = rootfs.ensure(node.path, lambda parent_fd, name: os.mknod(
                name, want_fmt | 0o600, _rdev(node) if node.type != "p" else 0, dir_fd=parent_fd))
        except PermissionError:
            if node.type == "p":
                raise
            notes.append(f"{node.path}: mknod refused, bind-mounting the host node")
        else:
            try:
                _check_inode(os.fstat(fd), node, job.origin)
                os.chown(syscalls.fd_path(fd), job.uid, job.gid)
                os.chmod(syscalls.fd_path(fd), stat.S_IMODE(mode))
            finally:
                os.close(fd)
            notes.append(f"{node.path}: mknod {node.type} {node.major}:{node.minor} {mode:o} {job.uid}:{job.gid}")
            return
    _bind_host_node(rootfs, job, mounted_fds)
    notes.append(f"{node.path}: bind-mounted host node {node.host_path}")


def _bind_host_node(rootfs: Rootfs, job: NodeJob, mounted_fds: list[int]) -> None:
    node = job.node
    if job.host_tree_fd is None:
        raise HookError(STEP, job.origin, f"{node.path} must be bind-mounted from the host "
                                          f"(user namespace or mknod refused) but host node {node.host_path} "
                                          f"is missing or differs from the spec")
    target_fd, _ = rootfs.ensure(node.path, create_empty_file)
    try:
        if not stat.S_ISREG(os.fstat(target_fd).st_mode):
            raise HookError(STEP, job.origin, f"{node.path}: mount point in the container is not a file")
        syscalls.move_mount(job.host_tree_fd, target_fd)
    finally:
        os.close(target_fd)
    mounted = rootfs.open_path(node.path)
    mounted_fds.append(mounted)
    _check_inode(os.fstat(mounted), node, job.origin)


def _existing(rootfs: Rootfs, path: str) -> os.stat_result | None:
    try:
        fd = rootfs.open_path(path)
    except FileNotFoundError:
        return None
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _check_inode(st: os.stat_result, node: DeviceNode, origin: str) -> None:
    if stat.S_IFMT(st.st_mode) != _S_IFMT[node.type] or (node.type != "p" and st.st_rdev != _rdev(node)):
        raise HookError(STEP, origin, f"{node.path}: created inode is not the {node.type} "
                                      f"{node.major}:{node.minor} device (rdev check failed)")


def _rdev(node: DeviceNode) -> int:
    return os.makedev(node.major or 0, node.minor or 0)


def _why(error: OSError) -> str:
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror or errno.errorcode.get(error.errno, error.errno)}{where}"
