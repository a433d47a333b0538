"""Safe path handling inside an untrusted container rootfs.

Every path is resolved from one directory fd of the rootfs with openat2(RESOLVE_IN_ROOT),
so absolute symlinks and `..` chains in the image are resolved inside the rootfs, as runc
resolves them, and can never lead to a host path. Missing components are created one at a
time with *at() calls on an fd of their (in-root resolved) parent; a dangling symlink is
followed inside the rootfs by hand, the way the kernel would follow it from the root.
Whatever is created is remembered so that `undo()` removes it again on failure.
"""

from __future__ import annotations

import errno
import os
import posixpath
from collections.abc import Callable

from cdi_hook.live import syscalls

RESOLVE = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
MAX_SYMLINKS = 40  # the kernel's own limit for one lookup


class Rootfs:
    """A container rootfs, addressed only through its directory fd."""

    def __init__(self, root_fd: int, creator_ids: tuple[int, int] | None = None):
        self.root_fd = root_fd
        # Host uid/gid of the container's root when it has a user namespace. What cdi-hook
        # creates is given to them (else the container sees nobody:nogroup and its root cannot
        # change it), and a filesystem the runtime mounted inside that namespace (its /dev
        # tmpfs) refuses files from an owner it cannot map (EOVERFLOW), so such entries are
        # created under these fs ids in the first place.
        self.creator_ids = creator_ids
        self._created: list[tuple[int, str, bool]] = []  # (parent fd, name, is_dir), creation order
        self._restores: list[tuple[int, Callable[[], None]]] = []  # (position in _created, action)

    @classmethod
    def open(cls, path: str, creator_ids: tuple[int, int] | None = None) -> "Rootfs":
        return cls(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), creator_ids)

    def _create(self, create: Callable[[int, str], None], parent_fd: int, name: str) -> None:
        try:
            create(parent_fd, name)
        except OSError as error:
            if error.errno != errno.EOVERFLOW or self.creator_ids is None:
                raise
            old_uid = syscalls.setfsuid(self.creator_ids[0])
            old_gid = syscalls.setfsgid(self.creator_ids[1])
            try:
                create(parent_fd, name)
            finally:
                syscalls.setfsgid(old_gid)
                syscalls.setfsuid(old_uid)
            return
        self.give_to_container(parent_fd, name)

    def give_to_container(self, parent_fd: int, name: str) -> None:
        """With a user namespace: the entry we made belongs to the container's root."""
        if self.creator_ids is not None:
            os.chown(name, *self.creator_ids, dir_fd=parent_fd, follow_symlinks=False)

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
                    self._create(create, parent_fd, name)
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

    def remember(self, parent_fd: int, name: str, is_dir: bool) -> None:
        """Record an entry the caller created itself (takes a dup of parent_fd) so undo removes
        it, and give it to the container's root as _create does."""
        self._created.append((os.dup(parent_fd), name, is_dir))
        self.give_to_container(parent_fd, name)

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
