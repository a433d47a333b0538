"""Device nodes inside the container rootfs: mknod, or a bind mount of the host node.

A node is created with mknodat on an fd of its parent directory (resolved inside the
rootfs), then owned and moded through /proc/self/fd/N of an O_PATH fd of the new inode,
and its rdev is checked with fstat, so a name swapped under us can never be chowned or
trusted. When the container has a user namespace, or mknod is refused, the host node is
bind-mounted onto an empty file instead (what runc does): a node made by us would sit on a
filesystem its user namespace may not open devices from. The host node's detached mount
(open_tree clone) is taken before the worker enters the container's mount namespace,
because a mount can only be cloned from the namespace it lives in. A bind mount is placed
only where rootfs.mount_target_problem allows (not on a shared mount, not in /proc).

A node already at the path (the image's, the runtime's, an earlier hook's) is never chmodded
or chowned: cdi-hook changes the owner and mode only of inodes it made itself. An image is
a directory tree that may share a filesystem with the host, so its node can be a hard link
to a host inode (a host's /dev node, say), and changing "the image's node" would change the
host's. The link count cannot make an exception safe either (a link elsewhere in the image
is as good as one on the host), so there is none. Instead, when the node there is not what
the spec says (another device, or the same device with another mode or owner, which native
CDI sets), a new node is made beside it under a temporary name, owned and moded through its
fd, and renamed over it: the old inode is only unlinked from the image, never written. On
undo ours is removed and the old entry made again (same type, device, mode and owner; a
hard link comes back as a node of its own). The same node already as the spec says is left
as it is; a node that is a mount point (a host node the runtime bind-mounted) and any node
with a user namespace (where ours could not be opened) are left exactly alone.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from cdi_hook import state
from cdi_hook.errors import HookError
from cdi_hook.live import syscalls
from cdi_hook.live.child import MountRecord, NodeRecord
from cdi_hook.live.rootfs import Rootfs, create_empty_file
from cdi_hook.live.syscalls import mount_id
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
                 notes: list[str], clone_late: Callable[[NodeJob], None] | None = None,
                 nodes_done: list[NodeRecord] | None = None, mounts_done: list[MountRecord] | None = None) -> None:
    """Create every node; bind mounts made are appended to mounted_fds (for undo).
    clone_late(job), when given, takes the host node for a job whose mknod was refused and
    that clone_host_nodes did not see beforehand. nodes_done gets a NodeRecord per job (a
    node left as it was too, created False), mounts_done a MountRecord per host node bound."""
    done: list[NodeRecord] = [] if nodes_done is None else nodes_done
    for job in jobs:
        try:
            _create_node(rootfs, job, by_bind_mount, mounted_fds, notes, clone_late, done, mounts_done)
        except OSError as error:
            raise HookError(STEP, job.origin, f"{job.node.path}: {_why(error)}") from None


def _create_node(rootfs: Rootfs, job: NodeJob, by_bind_mount: bool, mounted_fds: list[int],
                 notes: list[str], clone_late: Callable[[NodeJob], None] | None, done: list[NodeRecord],
                 mounts_done: list[MountRecord] | None) -> None:
    node = job.node
    want_fmt = _S_IFMT[node.type]
    existing = _existing(rootfs, node.path)
    if existing is not None:
        same = stat.S_IFMT(existing.st_mode) == want_fmt and (node.type == "p" or existing.st_rdev == _rdev(node))
        if same and by_bind_mount:
            notes.append(f"{node.path}: already present, left alone")
            done.append(_record(job, existing, created=False))
            return
        if not by_bind_mount and _replace_existing(rootfs, job, same, notes, done):
            return
        if not same:
            raise HookError(STEP, job.origin, f"{node.path} already exists in the container and is not "
                                              f"the {node.type} {node.major}:{node.minor} device the spec names")
        notes.append(f"{node.path}: already present, left alone")
        done.append(_record(job, existing, created=False))
        return
    if not by_bind_mount or node.type == "p":
        mode = node.file_mode if node.file_mode is not None else DEFAULT_FILE_MODE
        try:
            fd, created = rootfs.ensure(node.path, lambda parent_fd, name: os.mknod(
                name, want_fmt | 0o600, _rdev(node) if node.type != "p" else 0, dir_fd=parent_fd))
        except PermissionError:
            if node.type == "p":
                raise
            notes.append(f"{node.path}: mknod refused, bind-mounting the host node")
            if job.host_tree_fd is None and clone_late is not None:
                clone_late(job)
        else:
            try:
                if not created:  # appeared since we looked: not ours to chown
                    raise HookError(STEP, job.origin, f"{node.path} appeared while cdi-hook created it")
                st = os.fstat(fd)
                _check_inode(st, node, job.origin)
                os.chown(syscalls.fd_path(fd), job.uid, job.gid)
                os.chmod(syscalls.fd_path(fd), stat.S_IMODE(mode))
            finally:
                os.close(fd)
            notes.append(f"{node.path}: mknod {node.type} {node.major}:{node.minor} {mode:o} {job.uid}:{job.gid}")
            done.append(NodeRecord(job.origin, node.path, node.type, os.major(st.st_rdev), os.minor(st.st_rdev),
                                   stat.S_IMODE(mode), job.uid, job.gid, True, None))
            return
    st, mount_id_ = _bind_host_node(rootfs, job, mounted_fds)
    notes.append(f"{node.path}: bind-mounted host node {node.host_path}")
    done.append(_record(job, st, created=True))
    if mounts_done is not None:
        mounts_done.append(MountRecord(job.origin, node.path, mount_id_, st.st_dev, st.st_ino))


def _record(job: NodeJob, st: os.stat_result, created: bool, replaced: str | None = None) -> NodeRecord:
    return NodeRecord(job.origin, job.node.path, job.node.type, os.major(st.st_rdev), os.minor(st.st_rdev),
                      stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, created, replaced)


def describe(st: os.stat_result) -> str:
    """An entry as a NodeRecord's replaced names it: "c 10:229 600 0:0"."""
    kind = {stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFIFO: "p"}.get(stat.S_IFMT(st.st_mode), "?")
    return (f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {stat.S_IMODE(st.st_mode):o} "
            f"{st.st_uid}:{st.st_gid}")


def _split(path: str) -> tuple[str, str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts[:-1]), parts[-1] if parts else ""


def _replace_existing(rootfs: Rootfs, job: NodeJob, same: bool, notes: list[str], done: list[NodeRecord]) -> bool:
    """A node is at the path: unless it is already as the spec says, put a node of our own in
    its place (made beside it, renamed over it; the old one made again on undo). False when the
    entry is no plain node of the image (a symlink as the last component, a mount point) or
    mknod is refused: then it is left alone."""
    node = job.node
    parts = _split(node.path)
    if parts[1] in ("", ".."):
        return False
    parent_fd = rootfs.open_dir(parts[0])
    try:
        name = parts[1]
        try:
            old_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        except OSError:
            return False
        try:
            old = os.fstat(old_fd)
            if (stat.S_IFMT(old.st_mode) not in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO)
                    or mount_id(old_fd) != mount_id(parent_fd)):  # a mount: the host's node
                return False
        finally:
            os.close(old_fd)
        default_mode = old.st_mode if same else DEFAULT_FILE_MODE
        mode = stat.S_IMODE(node.file_mode if node.file_mode is not None else default_mode)
        if same and (stat.S_IMODE(old.st_mode), old.st_uid, old.st_gid) == (mode, job.uid, job.gid):
            notes.append(f"{node.path}: already present as the spec says")
            done.append(_record(job, old, created=False))
            return True
        temp = f".cdi-hook-{os.getpid()}"
        try:
            os.mknod(temp, _S_IFMT[node.type] | 0o600, _rdev(node) if node.type != "p" else 0, dir_fd=parent_fd)
        except PermissionError:
            return False
        try:
            fd = os.open(temp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            try:
                new = os.fstat(fd)
                if new.st_nlink != 1:  # not the inode mknod just made
                    raise HookError(STEP, job.origin, f"{node.path} changed while cdi-hook created it")
                _check_inode(new, node, job.origin)
                _set_owner_mode(fd, job.uid, job.gid, mode)
            finally:
                os.close(fd)
            state.rename_into_place(temp, name, parent_fd)  # a node made and checked aside: no write
        except BaseException:
            try:
                os.unlink(temp, dir_fd=parent_fd)
            except OSError:
                pass
            raise
        put_back_fd = os.dup(parent_fd)

        def put_back() -> None:
            try:
                os.mknod(name, stat.S_IFMT(old.st_mode) | 0o600, old.st_rdev, dir_fd=put_back_fd)
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=put_back_fd)
                _set_owner_mode(fd, old.st_uid, old.st_gid, stat.S_IMODE(old.st_mode), close=True)
            finally:
                os.close(put_back_fd)

        # put_back stays registered for undo (its fd too: the worker exits after a commit);
        # remember() after it, so that undo removes our node before the old one is made again.
        rootfs.on_undo(put_back)
        rootfs.remember(parent_fd, name, is_dir=False)
    finally:
        os.close(parent_fd)
    if same:
        notes.append(f"{node.path}: already present, replaced by a node set to {mode:o} {job.uid}:{job.gid}")
    else:
        notes.append(f"{node.path}: replaced the {os.major(old.st_rdev)}:{os.minor(old.st_rdev)} node there")
    done.append(NodeRecord(job.origin, node.path, node.type, os.major(new.st_rdev), os.minor(new.st_rdev), mode,
                           job.uid, job.gid, True, describe(old)))
    return True


def _set_owner_mode(fd: int, uid: int, gid: int, mode: int, close: bool = False) -> None:
    try:
        os.chown(syscalls.fd_path(fd), uid, gid)
        os.chmod(syscalls.fd_path(fd), mode)
    finally:
        if close:
            os.close(fd)


def _bind_host_node(rootfs: Rootfs, job: NodeJob, mounted_fds: list[int]) -> tuple[os.stat_result, int]:
    """(stat of the node now mounted, its mount id)."""
    node = job.node
    if job.host_tree_fd is None:
        raise HookError(STEP, job.origin, f"{node.path} must be bind-mounted from the host "
                                          f"(user namespace or mknod refused) but host node {node.host_path} "
                                          f"is missing or differs from the spec")
    target_fd, _ = rootfs.ensure(node.path, create_empty_file)
    try:
        if not stat.S_ISREG(os.fstat(target_fd).st_mode):
            raise HookError(STEP, job.origin, f"{node.path}: mount point in the container is not a file")
        problem = rootfs.mount_target_problem(target_fd)
        if problem:
            raise HookError(STEP, job.origin, f"{node.path}: {problem}; refused")
        syscalls.move_mount(job.host_tree_fd, target_fd)
    finally:
        os.close(target_fd)
    mounted = rootfs.open_path(node.path)
    mounted_fds.append(mounted)
    st = os.fstat(mounted)
    _check_inode(st, node, job.origin)
    return st, mount_id(mounted)


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
    return f"{error.strerror or errno.errorcode.get(error.errno, error.errno)}{where}"  # type: ignore[arg-type]  # None: no name
