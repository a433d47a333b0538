"""Safe path handling inside an untrusted container rootfs.

Every path is resolved from one directory fd of the rootfs with openat2(RESOLVE_IN_ROOT),
so absolute symlinks and `..` chains in the image are resolved inside the rootfs, as runc
resolves them, and can never lead to a host path. Missing components are created one at a
time with *at() calls on an fd of their (in-root resolved) parent; a dangling symlink is
followed inside the rootfs by hand, the way the kernel would follow it from the root.
Whatever is created is remembered so that `undo()` removes it again on failure. With a
user namespace, entries are created with the rights of the container's root (its ids as
filesystem ids), so nothing appears where that root could not create it. Where a mount may
be placed (not over the runtime's /, /proc, /sys, /dev, nor on a shared mount) is decided
here too, on the inode an fd refers to: `mount_target_problem`.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable

from cdi_hook.live import mountinfo, syscalls

RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
MAX_SYMLINKS = 40  # the kernel's own limit for one lookup


class Rootfs:
    """A container rootfs, addressed only through its directory fd."""

    def __init__(self, root_fd: int, creator_ids: tuple[int, int] | None = None):
        self.root_fd = root_fd
        # Host uid/gid of the container's root when it has a user namespace: what cdi-hook
        # creates, it creates with that root's rights (see create_as_container).
        self.creator_ids = creator_ids
        self._created: list[tuple[int, str, bool]] = []  # (parent fd, name, is_dir), creation order
        self._restores: list[tuple[int, Callable[[], None]]] = []  # (position in _created, action)
        self._runtime_places: dict[str, tuple[int, int, int]] | None = None  # see mount_target_problem
        self._mounts: dict[int, mountinfo.MountInfo] | None = None

    @classmethod
    def open(cls, path: str, creator_ids: tuple[int, int] | None = None) -> "Rootfs":
        return cls(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), creator_ids)

    def create_as_container(self, create: Callable[[int, str], None], parent_fd: int, name: str) -> None:
        """create(parent_fd, name), with a user namespace as the container's root."""
        if self.creator_ids is None:
            create(parent_fd, name)
            return
        # With a user namespace, create as the container's root would: its host uid/gid as
        # filesystem ids and no supplementary groups. For a non-zero fsuid the kernel drops
        # our capabilities over files, so its own permission check decides: nothing appears
        # in a host dir (a volume reached through an image symlink) that the container's root
        # could not write, as runc (which creates mount points as that root) fails there too.
        # The entry is born the container's root's, with no chown by name afterwards, and a
        # filesystem the runtime mounted in that namespace (its /dev tmpfs) accepts the owner.
        uid, gid = self.creator_ids
        groups = os.getgroups()
        os.setgroups([])
        old_gid = syscalls.setfsgid(gid)
        old_uid = syscalls.setfsuid(uid)
        try:
            create(parent_fd, name)
        except PermissionError as error:
            raise PermissionError(error.errno, f"{error.strerror} (to the container's root, host uid {uid}, "
                                               f"creating {name})", error.filename) from None
        finally:
            syscalls.setfsuid(old_uid)
            syscalls.setfsgid(old_gid)
            os.setgroups(groups)

    def close(self) -> None:
        self.forget()
        os.close(self.root_fd)

    def open_path(self, path: str, flags: int = os.O_PATH, mode: int = 0) -> int:
        """openat2 path (absolute or relative, always meaning inside the rootfs)."""
        return syscalls.openat2(self.root_fd, _relative(path), flags | os.O_CLOEXEC, RESOLVE, mode)

    def ensure(self, path: str, create: Callable[[int, str], None]) -> tuple[int, bool]:
        """(O_PATH fd of path, whether we created it): create(parent_fd, name) makes it when missing.

        Parent directories are created as needed (mode 0755). Raises OSError.
        """
        path = _relative(path)
        for _ in range(MAX_SYMLINKS):
            try:
                return self.open_path(path), False
            except FileNotFoundError:
                pass
            parent, name = posixpath.split(path)
            if name in ("", ".", ".."):
                raise OSError(errno.ENOENT, "cannot create", path)
            parent_fd = self.open_dir(parent) if parent else os.dup(self.root_fd)
            try:
                target = os.readlink(name, dir_fd=parent_fd)
            except FileNotFoundError:
                try:
                    self.create_as_container(create, parent_fd, name)
                except BaseException:
                    os.close(parent_fd)
                    raise
                self._created.append((parent_fd, name, False))
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
                self._created[-1] = (parent_fd, name, _is_dir(fd))
                return fd, True
            except OSError as error:
                os.close(parent_fd)
                if error.errno == errno.EINVAL:  # exists and is no symlink: appeared meanwhile, look again
                    continue
                raise
            os.close(parent_fd)
            # A dangling symlink: go on from its target, still inside the rootfs.
            path = _relative(target if target.startswith("/") else posixpath.join(parent, target))
        raise OSError(errno.ELOOP, "too many levels of symbolic links", path)

    def open_dir(self, path: str) -> int:
        """O_PATH fd of directory path, creating missing directories inside the rootfs."""
        if _relative(path) == ".":
            return os.dup(self.root_fd)
        fd, _ = self.ensure(path, lambda parent_fd, name: os.mkdir(name, 0o755, dir_fd=parent_fd))
        if not _is_dir(fd):
            os.close(fd)
            raise OSError(errno.ENOTDIR, "not a directory", path)
        return fd

    def mount_target_problem(self, target_fd: int) -> str | None:
        """Why no mount may be placed on target_fd (an O_PATH fd resolved in this rootfs), or None.

        Decided on the inode and its mount, not on the spec's path, which image symlinks can
        turn into anything in the rootfs. At createRuntime the runtime has mounted its /proc,
        /sys and /dev already: a mount on one of them, or on the rootfs root, would hide the
        runtime's own (runc then fails obscurely, or works on a host dir as its /proc). runc
        refuses a mount in /proc (checkProcMount); so does cdi-hook, for all of /proc (runc
        lets lxcfs files through; a device has no business there). Under /dev and /sys mounts
        are fine, as runc's own /dev/shm, /dev/mqueue, /sys/fs/cgroup and the bind-mounted
        nodes of a user namespace are.

        A mount placed on a shared mount propagates to every peer of it: a Bidirectional
        (rshared) volume has peers on the host, where the mount would appear and outlive the
        container. From inside the container's mount namespace the other members of a peer
        group cannot be seen, so a target on any shared mount is refused; making the volume
        private first would silently change the user's volume. The runtime's rootfs mount is
        private at this stage (runc sets rootfsPropagation only after pivot_root), and
        cdi-hook's own bind mounts are slaves, so other destinations are unaffected.
        """
        if self._runtime_places is None:
            self._runtime_places = {}
            for name in ("/", "/proc", "/sys", "/dev"):
                try:
                    fd = self.open_path(name)
                except OSError:
                    continue
                try:
                    self._runtime_places[name] = _identity(fd)
                finally:
                    os.close(fd)
        target = _identity(target_fd)
        for where, place in self._runtime_places.items():
            if target == place:
                return (f"resolves to the container's {'root (/)' if where == '/' else where}, "
                        "which the runtime has set up and a mount would cover")
        # At createRuntime the namespace still holds a copy of every host mount (thousands on
        # a busy node): read once, and again only for a mount made since (one of ours).
        if self._mounts is None or target[0] not in self._mounts:
            self._mounts = mountinfo.by_id(mountinfo.read())
        mounts = self._mounts
        proc = self._runtime_places.get("/proc")
        if proc is not None and proc[0] in mounts and mounts[proc[0]].fs_type == "proc":
            mount, seen = target[0], set()
            while mount in mounts and mount not in seen:
                if mount == proc[0]:
                    return "resolves into the runtime's /proc mount"
                seen.add(mount)
                mount = mounts[mount].parent_id
        found = mounts.get(target[0])
        mount_point = found.mount_point if found is not None else "?"
        shared = [field for field in (found.optional_fields if found is not None else ()) if field.startswith("shared:")]
        if shared:
            root = os.readlink(syscalls.fd_path(self.root_fd))
            inside = "/" + mount_point[len(root):].lstrip("/") if (mount_point + "/").startswith(root + "/") \
                else mount_point
            return (f"lands on a shared mount ({inside}, peer group {shared[0][7:]}): a mount there would "
                    "propagate out of the container's mount namespace (to the host, for a Bidirectional volume)")
        return None

    def remember(self, parent_fd: int, name: str, is_dir: bool) -> None:
        """Record an entry the caller created itself, owner and mode already set through its
        own fd (takes a dup of parent_fd), so undo removes it. Nothing is done by name here:
        a name can be swapped, an fd cannot."""
        self._created.append((os.dup(parent_fd), name, is_dir))

    def on_undo(self, action: Callable[[], None]) -> None:
        """Run action on undo, in order with the removals (e.g. put back a file we rewrote)."""
        self._restores.append((len(self._created), action))

    def mark(self) -> int:
        """A point to undo back to (see undo)."""
        return len(self._created)

    def undo(self, mark: int = 0) -> list[str]:
        """Remove what was created since mark, newest first; returns the problems, never raises."""
        problems = []
        while len(self._created) > mark or (self._restores and self._restores[-1][0] >= mark):
            if self._restores and self._restores[-1][0] >= len(self._created):
                _, action = self._restores.pop()
                try:
                    action()
                except OSError as error:
                    problems.append(f"cannot restore: {error.strerror} ({error.filename})")
                continue
            parent_fd, name, is_dir = self._created.pop()
            try:
                os.rmdir(name, dir_fd=parent_fd) if is_dir else os.unlink(name, dir_fd=parent_fd)
            except OSError as error:
                problems.append(f"cannot remove {name}: {error.strerror}")
            finally:
                os.close(parent_fd)
        return problems

    def forget(self) -> None:
        """Keep everything created so far (the injection succeeded)."""
        for parent_fd, _, _ in self._created:
            os.close(parent_fd)
        self._created.clear()
        self._restores.clear()


def _identity(fd: int) -> tuple[int, int, int]:
    st = os.fstat(fd)
    return syscalls.mount_id(fd), st.st_dev, st.st_ino


def _relative(path: str) -> str:
    """path as a relative, normalized-slash path ('.' for the root); '..' is kept for openat2 to clamp."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts) or "."


def _is_dir(fd: int) -> bool:
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


def create_empty_file(parent_fd: int, name: str) -> None:
    os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=parent_fd))


def create_dir(parent_fd: int, name: str) -> None:
    os.mkdir(name, 0o755, dir_fd=parent_fd)
