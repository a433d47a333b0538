"""Device nodes inside the container rootfs: mknod, or a bind mount of the host node.

A node is created with mknodat on an fd of its parent directory (resolved inside the
rootfs), then owned and moded through /proc/self/fd/N of an O_PATH fd of the new inode,
and its rdev is checked with fstat, so a name swapped under us can never be chowned or
trusted. When the container has a user namespace, or mknod is refused, the host node is
bind-mounted onto an empty file instead (what runc does): a node made by us would sit on a
filesystem its user namespace may not open devices from. The host node's detached mount
(open_tree clone) is taken before the worker enters the container's mount namespace,
because a mount can only be cloned from the namespace it lives in.
A node already present with the same type and rdev is kept (the runtime, or an earlier
hook, made it), and given the spec's mode and owner as native CDI would; a host node bind-
mounted there is left exactly alone, since changing it would change the host's node. Another
device node at the path (say the runtime's own /dev/full where the spec puts /dev/zero) is
replaced, as native CDI replaces it. Every such change is put back on undo.
"""

from __future__ import annotations

import errno
import os
import stat

from cdi_hook.errors import HookError
from cdi_hook.live import syscalls
from cdi_hook.live.rootfs import Rootfs, create_empty_file
from cdi_hook.spec.model import DeviceNode

STEP = "device node"
DEFAULT_FILE_MODE = 0o666  # runc's default when neither the spec nor the host gives one
_S_IFMT = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}


class NodeJob:
    def __init__(self, origin: str, node: DeviceNode, uid: int, gid: int):
        self.origin = origin
        self.node = node  # completed by the plan: type, major, minor, host_path set
        self.uid = uid  # the owner the plan decided
        self.gid = gid
        self.host_tree_fd: int | None = None  # detached clone of the host node, for the bind-mount way


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
                # Not a peer of a shared host mount (see mounts.clone_sources).
                syscalls.mount_setattr(job.host_tree_fd, 0, 0, propagation=syscalls.MS_SLAVE)
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
            _adopt_existing(rootfs, job, by_bind_mount, notes)
            return
        if by_bind_mount or not _replace_existing_node(rootfs, job, notes):
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


def _split(path: str) -> tuple[str, str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts[:-1]), parts[-1] if parts else ""


def _entry(rootfs: Rootfs, path: str) -> tuple[int, str, os.stat_result, os.stat_result] | None:
    """(parent fd, name, lstat of the entry, stat of the parent) when path names an entry
    directly (no symlink as its last component); None otherwise. The caller closes the fd."""
    parent, name = _split(path)
    if name in ("", ".."):
        return None
    parent_fd = rootfs.open_dir(parent)
    try:
        return parent_fd, name, os.lstat(name, dir_fd=parent_fd), os.fstat(parent_fd)
    except OSError:
        os.close(parent_fd)
        return None


def _adopt_existing(rootfs: Rootfs, job: NodeJob, by_bind_mount: bool, notes: list[str]) -> None:
    """The right device is there already: give it the spec's mode and owner, unless it is a
    mount (a host node bind-mounted by the runtime: chmod would change the host's node)."""
    node = job.node
    entry = _entry(rootfs, node.path)
    if entry is None or by_bind_mount:
        notes.append(f"{node.path}: already present, left alone")
        if entry:
            os.close(entry[0])
        return
    parent_fd, name, st, parent_st = entry
    try:
        if st.st_dev != parent_st.st_dev:
            notes.append(f"{node.path}: already present as a mount, left alone")
            return
        mode = stat.S_IMODE(node.file_mode if node.file_mode is not None else st.st_mode)
        if (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, job.uid, job.gid):
            notes.append(f"{node.path}: already present as the spec says")
            return
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            if (os.fstat(fd).st_ino, os.fstat(fd).st_rdev) != (st.st_ino, st.st_rdev):
                raise HookError(STEP, job.origin, f"{node.path} changed while cdi-hook looked at it")
            rootfs.on_undo(lambda: _set_owner_mode(fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), close=True))
            _set_owner_mode(fd, job.uid, job.gid, mode)
        except BaseException:
            os.close(fd)
            raise
        # fd stays open for the undo action; the worker exits right after a commit, closing it.
        notes.append(f"{node.path}: already present, set to {mode:o} {job.uid}:{job.gid}")
    finally:
        os.close(parent_fd)


def _replace_existing_node(rootfs: Rootfs, job: NodeJob, notes: list[str]) -> bool:
    """Another device node is at the path (not a mount, not a symlink): remove it so ours can
    be made, and make it again on undo. False when the entry is anything else."""
    node = job.node
    entry = _entry(rootfs, node.path)
    if entry is None:
        return False
    parent_fd, name, st, parent_st = entry
    if stat.S_IFMT(st.st_mode) not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO) or st.st_dev != parent_st.st_dev:
        os.close(parent_fd)
        return False
    os.unlink(name, dir_fd=parent_fd)

    def put_back() -> None:
        try:
            os.mknod(name, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev, dir_fd=parent_fd)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            _set_owner_mode(fd, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), close=True)
        finally:
            os.close(parent_fd)

    rootfs.on_undo(put_back)  # parent_fd stays open for it (the worker exits after a commit)
    notes.append(f"{node.path}: replaced the {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} node there")
    return True


def _set_owner_mode(fd: int, uid: int, gid: int, mode: int, close: bool = False) -> None:
    try:
        os.chown(syscalls.fd_path(fd), uid, gid)
        os.chmod(syscalls.fd_path(fd), mode)
    finally:
        if close:
            os.close(fd)


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
