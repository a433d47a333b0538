"""The spec's mounts inside the container rootfs.

Bind mounts (type "bind", or an empty type, or a "bind"/"rbind" option) use the new mount
API: the host source is cloned with open_tree while the worker is still in the host's mount
namespace, its flags (ro, nosuid, nodev, noexec, atime) and slave propagation are set on the
detached clone with mount_setattr, so a read-only bind is never writable even for an
instant and nothing mounted under it ever reaches the host, and it is attached
with move_mount onto an fd of the mount point. Other types (tmpfs, ...) are mounted with
mount(2) through /proc/self/fd/N of the mount point; options that are no flags go to the
filesystem as data. Propagation options are applied last, to the new mount.

Host sources are looked at with lstat first. A symlink is followed (as mount(2) and runc do):
spec files are root-owned and trusted, and drivers ship libraries as symlink chains; the
file-or-directory choice for the mount point is taken from the clone itself (fstat), so
what is mounted is what was looked at. The mount point is created inside the rootfs
(a directory for a directory source or a typed mount, an empty file otherwise; with a user
namespace, as the container's root: see rootfs.Rootfs.create_as_container). No mount is
placed on the runtime's /proc, /sys, /dev or rootfs root, in /proc, or on a shared mount
(whose peers, a Bidirectional volume's host side say, would receive it): see
rootfs.Rootfs.mount_target_problem; such a destination is refused with its device named.
"""

from __future__ import annotations

import os
import stat

from cdi_hook.errors import HookError
from cdi_hook.live import syscalls as sc
from cdi_hook.live.child import MountRecord
from cdi_hook.live.rootfs import Rootfs, create_dir, create_empty_file
from cdi_hook.spec.model import Mount

STEP = "mount"

# option -> (flag, on): the last option about a flag wins, as with mount(8)
_FLAG_OPTIONS = {
    "ro": ("rdonly", True), "rw": ("rdonly", False),
    "nosuid": ("nosuid", True), "suid": ("nosuid", False),
    "nodev": ("nodev", True), "dev": ("nodev", False),
    "noexec": ("noexec", True), "exec": ("noexec", False),
    "nodiratime": ("nodiratime", True), "diratime": ("nodiratime", False),
    "sync": ("sync", True), "async": ("sync", False),
    "dirsync": ("dirsync", True),
}
_ATIME_OPTIONS = {"relatime": sc.MOUNT_ATTR_RELATIME, "noatime": sc.MOUNT_ATTR_NOATIME,
                  "strictatime": sc.MOUNT_ATTR_STRICTATIME}
_ATTR = {"rdonly": sc.MOUNT_ATTR_RDONLY, "nosuid": sc.MOUNT_ATTR_NOSUID, "nodev": sc.MOUNT_ATTR_NODEV,
         "noexec": sc.MOUNT_ATTR_NOEXEC, "nodiratime": sc.MOUNT_ATTR_NODIRATIME}
_MS = {"rdonly": sc.MS_RDONLY, "nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC,
       "nodiratime": sc.MS_NODIRATIME, "sync": sc.MS_SYNCHRONOUS, "dirsync": sc.MS_DIRSYNC}
_MS_ATIME = {sc.MOUNT_ATTR_RELATIME: sc.MS_RELATIME, sc.MOUNT_ATTR_NOATIME: sc.MS_NOATIME,
             sc.MOUNT_ATTR_STRICTATIME: sc.MS_STRICTATIME}
_PROPAGATION = {
    "private": sc.MS_PRIVATE, "rprivate": sc.MS_PRIVATE | sc.MS_REC,
    "shared": sc.MS_SHARED, "rshared": sc.MS_SHARED | sc.MS_REC,
    "slave": sc.MS_SLAVE, "rslave": sc.MS_SLAVE | sc.MS_REC,
    "unbindable": sc.MS_UNBINDABLE, "runbindable": sc.MS_UNBINDABLE | sc.MS_REC,
}


class MountOptions:
    def __init__(self, bind: bool, recursive: bool = False):
        self.bind = bind
        self.recursive = recursive
        self.attr_set = 0  # mount_setattr, for bind mounts
        self.attr_clr = 0
        self.ms_flags = 0  # mount(2), for typed mounts
        self.propagation = 0
        self.data: list[str] = []  # typed mounts: handed to the filesystem
        self.ignored: list[str] = []  # bind mounts: data options have no meaning


def parse_options(mount: Mount) -> MountOptions:
    opts = set(mount.options)
    options = MountOptions(bind=mount.type in ("", "bind", "rbind") or bool({"bind", "rbind"} & opts),
                           recursive=mount.type == "rbind" or "rbind" in opts)
    flags: dict[str, bool] = {}
    atime = None
    for option in mount.options:
        if option in ("bind", "rbind", "defaults"):
            continue
        if option in _FLAG_OPTIONS:
            name, on = _FLAG_OPTIONS[option]
            flags[name] = on
        elif option in _ATIME_OPTIONS:
            atime = _ATIME_OPTIONS[option]
        elif option in _PROPAGATION:
            options.propagation = _PROPAGATION[option]
        elif options.bind:
            options.ignored.append(option)
        else:
            options.data.append(option)
    for name, on in flags.items():
        if name in _ATTR:
            if on:
                options.attr_set |= _ATTR[name]
            else:
                options.attr_clr |= _ATTR[name]
        if on:
            options.ms_flags |= _MS[name]
    if atime is not None:
        options.attr_set |= atime
        options.attr_clr |= sc.MOUNT_ATTR__ATIME
        options.ms_flags |= _MS_ATIME[atime]
    return options


class MountJob:
    def __init__(self, origin: str, mount: Mount, options: MountOptions):
        self.origin = origin
        self.mount = mount
        self.options = options
        self.tree_fd: int | None = None  # detached clone of the host source (bind mounts)
        self.source_is_dir = True


def clone_sources(jobs: list[MountJob]) -> None:
    """Before setns: clone each bind source from the host's mount namespace, flags already set."""
    for job in jobs:
        if not job.options.bind:
            continue
        host = job.mount.host_path
        try:
            os.lstat(host)  # a clear "missing" before any mount call; a symlink is followed below
            flags = sc.OPEN_TREE_CLONE | (sc.AT_RECURSIVE if job.options.recursive else 0)
            job.tree_fd = sc.open_tree(-100, host, flags)
            job.source_is_dir = stat.S_ISDIR(os.fstat(job.tree_fd).st_mode)
            # A clone of a shared host mount joins its peer group: anything later mounted
            # under it in the container would propagate back to the host. As a slave it
            # still sees the host's new mounts, as a runc bind mount does, but sends none.
            sc.mount_setattr(job.tree_fd, job.options.attr_set, job.options.attr_clr,
                             propagation=sc.MS_SLAVE, recursive=job.options.recursive)
        except OSError as error:
            raise HookError(STEP, job.origin, f"host source {host}: {error.strerror}") from None


def close_sources(jobs: list[MountJob]) -> None:
    """Close the clones clone_sources made (the hook's copies, once the worker has its own)."""
    for job in jobs:
        if job.tree_fd is not None:
            os.close(job.tree_fd)
            job.tree_fd = None


def apply(rootfs: Rootfs, jobs: list[MountJob], mounted_fds: list[int], notes: list[str] | None = None,
          done: list[MountRecord] | None = None) -> None:
    """Mount every job in the rootfs in the plan's order (parents before children: the plan
    sorts by depth); new mounts go to mounted_fds, and a MountRecord of each to done."""
    for job in jobs:
        where = job.mount.container_path
        try:
            note = _apply_one(rootfs, job, mounted_fds, done)
            if notes is not None:
                notes.append(note)
        except HookError:
            raise
        except OSError as error:
            raise HookError(STEP, job.origin, f"{job.mount.host_path} on {where}: {error.strerror}") from None


def _apply_one(rootfs: Rootfs, job: MountJob, mounted_fds: list[int], done: list[MountRecord] | None) -> str:
    where = job.mount.container_path
    want_dir = job.source_is_dir or not job.options.bind
    target_fd, _ = rootfs.ensure(where, create_dir if want_dir else create_empty_file)
    try:
        target = os.fstat(target_fd)
        is_dir = stat.S_ISDIR(target.st_mode)
        if is_dir != want_dir:
            raise HookError(STEP, job.origin, f"{where}: mount point in the container is a "
                                              f"{'directory' if is_dir else 'file'}, the source is not")
        if job.options.bind:
            assert job.tree_fd is not None  # clone_sources opened it
            source = os.fstat(job.tree_fd)
            if (source.st_dev, source.st_ino) == (target.st_dev, target.st_ino):
                # Already there (the hook ran at an earlier stage too): do not stack a second mount.
                return f"{where}: {job.mount.host_path} already mounted, left alone"
            _check_target(rootfs, target_fd, job)
            sc.move_mount(job.tree_fd, target_fd)
        else:
            _check_target(rootfs, target_fd, job)
            sc.mount(job.mount.host_path or job.mount.type, sc.fd_path(target_fd), job.mount.type,
                     job.options.ms_flags, ",".join(job.options.data) or None)
    finally:
        os.close(target_fd)
    mounted = rootfs.open_path(where)
    mounted_fds.append(mounted)
    if job.options.propagation:
        sc.mount(None, sc.fd_path(mounted), None, job.options.propagation)
    if done is not None:  # by identity: the mount's id, and what is mounted (a bind's host source)
        st = os.fstat(mounted)
        done.append(MountRecord(job.origin, where, sc.mount_id(mounted), st.st_dev, st.st_ino))
    return f"{where}: mounted {job.mount.host_path} ({job.mount.type or 'bind'} {','.join(job.mount.options)})"


def _check_target(rootfs: Rootfs, target_fd: int, job: MountJob) -> None:
    problem = rootfs.mount_target_problem(target_fd)
    if problem:
        raise HookError(STEP, job.origin, f"{job.mount.container_path}: {problem}; refused")


def unmount_all(mounted_fds: list[int]) -> list[str]:
    """Undo: detach every mount we made, newest first; returns the problems, never raises."""
    problems = []
    while mounted_fds:
        fd = mounted_fds.pop()
        try:
            sc.umount2(sc.fd_path(fd), sc.MNT_DETACH)
        except OSError as error:
            problems.append(f"cannot unmount: {error.strerror}")
        finally:
            os.close(fd)
    return problems
