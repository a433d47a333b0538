"""Make mounted host libraries known to the container's dynamic loader.

Which libraries: host *files* mounted into the container whose name is a shared library
(`*.so` or `*.so.N[.M...]`). Directories mounted are not searched: they can be large, and
CDI specs (NVIDIA's among them) list each library as its own file mount; a spec that wants
a whole folder on the search path can say so with its own hook.

How: a conf file etc/ld.so.conf.d/00-cdi-hook.conf (00: ahead of the image's own folders)
lists the container-side folders, written through an fd of the in-root resolved directory,
and only as a regular file (a symlink, fifo or device node there is refused: the hook never
opens an image's device node, which could be a host disk); then the host's ldconfig (static,
opened on the host before entering the container) runs chrooted into a nodev clone of the
rootfs mounts, so /etc, ld.so.conf.d and ld.so.cache resolve inside the rootfs whatever
symlinks the image holds and no device node of the image can be opened by it (a non-file
etc/ld.so.cache~, which it opens for writing, is refused before it runs). It runs with an
empty environment, no_new_privs, a bounding set of only the file capabilities it needs, CPU
and memory limits, and -X (no symlink updates, so a rw folder mounted from the host is never
written to). Undo puts the image's conf file and ld.so.cache back exactly as they were.
A rootfs without etc/ld.so.conf and etc/ld.so.cache (no /etc, musl, distroless) has no glibc
loader cache to update: skipped with a note, not an error.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import resource
import select
import stat
import time

from cdi_hook.errors import HookError
from cdi_hook.live import syscalls as sc
from cdi_hook.live.rootfs import Rootfs

STEP = "ldconfig"
CONF_DIR = "etc/ld.so.conf.d"
CONF_NAME = "00-cdi-hook.conf"
CACHE = "etc/ld.so.cache"
MAX_CACHE_BACKUP = 64 << 20
MAX_CONF_BACKUP = 1 << 20
HOST_LDCONFIG = ("/sbin/ldconfig", "/usr/sbin/ldconfig")
TIMEOUT_S = 30
CPU_LIMIT_S = 20
MEMORY_LIMIT = 1 << 30
_LIBRARY_NAME = re.compile(r"^[^/]+\.so(\.[0-9]+)*$")


def is_library_name(path: str) -> bool:
    return bool(_LIBRARY_NAME.match(posixpath.basename(path)))


def library_dirs(mounted_files: list[str]) -> list[str]:
    """Container-side folders of mounted library files, first-seen order, no repeats."""
    dirs: list[str] = []
    for path in mounted_files:
        if is_library_name(path):
            folder = posixpath.normpath("/" + posixpath.dirname(path.lstrip("/")))
            if folder not in dirs:
                dirs.append(folder)
    return dirs


def open_host_ldconfig() -> int | None:
    """Before setns: an fd of the host's statically linked ldconfig (None when there is none).

    A dynamically linked one is never used: run chrooted into the rootfs, its loader would
    come from the image, with the image's libc and /etc/ld.so.preload, as root.
    """
    for path in HOST_LDCONFIG:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        if is_static_elf(fd):
            return fd
        os.close(fd)
    return None


def is_static_elf(fd: int) -> bool:
    """Whether fd is an ELF executable without a program interpreter (PT_INTERP)."""
    import struct

    header = os.pread(fd, 64, 0)
    if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) or header[5] not in (1, 2):
        return False
    is_64, order = header[4] == 2, "<" if header[5] == 1 else ">"
    if is_64:
        phoff, = struct.unpack_from(order + "Q", header, 0x20)
        phentsize, phnum = struct.unpack_from(order + "HH", header, 0x36)
    else:
        phoff, = struct.unpack_from(order + "I", header, 0x1C)
        phentsize, phnum = struct.unpack_from(order + "HH", header, 0x2A)
    table = os.pread(fd, phentsize * phnum, phoff)
    if phentsize < 4 or len(table) < phentsize * phnum:
        return False
    pt_interp = 3
    return all(struct.unpack_from(order + "I", table, i * phentsize)[0] != pt_interp for i in range(phnum))


def update(rootfs: Rootfs, dirs: list[str], ldconfig_fd: int | None, notes: list[str], device: str = "") -> None:
    """device: the CDI names whose libraries these are, for the error message."""
    if not dirs:
        return
    if not (_exists(rootfs, "etc/ld.so.conf") or _exists(rootfs, "etc/ld.so.cache")):
        notes.append("ldconfig skipped: rootfs has no etc/ld.so.conf or etc/ld.so.cache (not glibc)")
        return
    if ldconfig_fd is None:
        raise HookError(STEP, device, f"host has no statically linked ldconfig ({' or '.join(HOST_LDCONFIG)}); "
                                  "a dynamic one would run the image's loader and libraries as root")
    _check_temp_cache(rootfs, device)
    _write_conf(rootfs, dirs)
    _keep_old_cache(rootfs)
    _remove_temp_cache_on_undo(rootfs)
    view_fd = _nodev_view(rootfs.root_fd, notes)
    try:
        status, output = _run_chrooted(view_fd if view_fd is not None else rootfs.root_fd, ldconfig_fd,
                                       ["ldconfig", "-X"])
    finally:
        if view_fd is not None:
            os.close(view_fd)
    if status != "0":
        raise HookError(STEP, device, f"{status}: {' '.join(output.split())[-2000:] or 'no output'}")
    folder, name = posixpath.split(CACHE)
    cache_dir_fd = rootfs.open_dir(folder)
    try:
        rootfs.give_to_container(cache_dir_fd, name)  # ldconfig, as host root, made a new file
    finally:
        os.close(cache_dir_fd)
    notes.append(f"ldconfig: cache updated for {', '.join(dirs)}")


def _keep_old_cache(rootfs: Rootfs) -> None:
    """Remember the image's ld.so.cache so that undo can put it back as it was (ldconfig
    replaces it with a new file): its content, or the symlink it was, with owner and mode."""
    folder, name = posixpath.split(CACHE)
    parent_fd = rootfs.open_dir(folder)
    old: bytes | str | None = None  # None: no cache before us, undo removes the one ldconfig made
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            old = os.readlink(name, dir_fd=parent_fd)
        elif stat.S_ISREG(st.st_mode) and st.st_size <= MAX_CACHE_BACKUP:
            with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd), "rb") as f:
                old = f.read(MAX_CACHE_BACKUP + 1)
            if len(old) > MAX_CACHE_BACKUP:
                return
        else:
            return  # a directory or something odd: ldconfig will say so; too big: left as ldconfig makes it
    except FileNotFoundError:
        st = None
    finally:
        os.close(parent_fd)

    def restore() -> None:
        parent_fd = rootfs.open_dir(folder)
        try:
            try:
                os.unlink(name, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            if old is None:
                return
            if isinstance(old, str):
                os.symlink(old, name, dir_fd=parent_fd)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(name, flags, 0o600, dir_fd=parent_fd), "wb") as f:
                    f.write(old)
                    os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
            os.chown(name, st.st_uid, st.st_gid, dir_fd=parent_fd, follow_symlinks=False)
        finally:
            os.close(parent_fd)

    rootfs.on_undo(restore)


def _remove_temp_cache_on_undo(rootfs: Rootfs) -> None:
    """ldconfig writes ld.so.cache~ and renames it; when that fails the temp file stays behind."""
    folder, name = posixpath.split(CACHE + "~")
    parent_fd = rootfs.open_dir(folder)
    try:
        os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        return  # the image's own entry: not ours to remove
    except FileNotFoundError:
        pass
    finally:
        os.close(parent_fd)

    def remove() -> None:
        parent_fd = rootfs.open_path(folder)
        try:
            os.unlink(name, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent_fd)

    rootfs.on_undo(remove)


def _exists(rootfs: Rootfs, path: str) -> bool:
    try:
        os.close(rootfs.open_path(path))
        return True
    except OSError:
        return False


def _write_conf(rootfs: Rootfs, dirs: list[str]) -> None:
    text = "# written by cdi-hook: host libraries mounted by CDI devices\n" + "".join(d + "\n" for d in dirs)
    try:
        dir_fd = rootfs.open_dir(CONF_DIR)
    except OSError as error:
        raise HookError(STEP, "", f"{CONF_DIR} in the rootfs: {error.strerror}") from None
    try:
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(CONF_NAME, flags | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
            rootfs.remember(dir_fd, CONF_NAME, is_dir=False)
        except FileExistsError:
            fd = _open_image_file(dir_fd, CONF_NAME)
            old = os.pread(fd, MAX_CONF_BACKUP + 1, 0)
            if len(old) <= MAX_CONF_BACKUP:
                rootfs.on_undo(lambda: _rewrite(rootfs, CONF_DIR, CONF_NAME, old))
            os.ftruncate(fd, 0)
        with os.fdopen(fd, "w") as conf:
            conf.write(text)
    except OSError as error:
        raise HookError(STEP, "", f"{CONF_DIR}/{CONF_NAME} in the rootfs: {error.strerror}") from None
    finally:
        os.close(dir_fd)


def _nodev_view(root_fd: int, notes: list[str]) -> int | None:
    """A detached clone of the rootfs mounts, all nodev, for ldconfig to run in.

    ldconfig runs as root in the host's device cgroup; whatever device node the image holds
    (or names through a symlink), it cannot be opened there, while writes still land in the
    rootfs's own filesystem. None (and a note) where the kernel refuses the clone: the
    regular-file checks before ldconfig runs still hold.
    """
    try:
        view = sc.open_tree(root_fd, "", sc.OPEN_TREE_CLONE | sc.AT_RECURSIVE | sc.AT_EMPTY_PATH)
    except OSError as error:
        notes.append(f"ldconfig: no nodev view of the rootfs ({error.strerror})")
        return None
    try:
        sc.mount_setattr(view, sc.MOUNT_ATTR_NODEV, recursive=True)
    except OSError as error:
        os.close(view)
        notes.append(f"ldconfig: no nodev view of the rootfs ({error.strerror})")
        return None
    return view


def _open_image_file(dir_fd: int, name: str) -> int:
    """Open an existing file of the image for rewriting, only when it is a regular file.

    The image may hold any inode under that name: a symlink (O_NOFOLLOW: ELOOP), a fifo
    (O_NONBLOCK: no hang) or a device node, which the hook, root in the host's device
    cgroup, must never open for writing: a block device there could be a host disk.
    """
    if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise OSError(errno.EPERM, "exists and is not a regular file", name)
    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the two looks
        os.close(fd)
        raise OSError(errno.EPERM, "exists and is not a regular file", name)
    return fd


def _rewrite(rootfs: Rootfs, folder: str, name: str, content: bytes) -> None:
    """Undo: put content back into the image's own file (same inode: owner and mode stay)."""
    dir_fd = rootfs.open_path(folder)
    try:
        fd = _open_image_file(dir_fd, name)
    finally:
        os.close(dir_fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
    finally:
        os.close(fd)


def _check_temp_cache(rootfs: Rootfs, device: str) -> None:
    """ldconfig opens etc/ld.so.cache~ for writing (O_TRUNC, following no symlink but any
    device node): an image's non-file there is refused before ldconfig runs."""
    folder, name = posixpath.split(CACHE + "~")
    dir_fd = rootfs.open_path(folder)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(st.st_mode):
        raise HookError(STEP, device, f"{CACHE}~ in the rootfs exists and is not a regular file; refusing to run ldconfig")


def _run_chrooted(root_fd: int, program_fd: int, argv: list[str]) -> tuple[str, str]:
    """Run program chrooted into root_fd, confined; ("0" or how it ended, its output)."""
    # python-prctl is imported here, only for starts that run ldconfig, and before the fork:
    # after the chroot the module could no longer be found (nor should the image provide it).
    import prctl

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # grandchild: never returns
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            null_read, null_write = os.pipe()
            os.dup2(null_read, 0)
            os.fchdir(root_fd)
            os.chroot(".")
            _confine(prctl)
            os.closerange(3, program_fd)
            os.closerange(program_fd + 1, 65536)
            os.execve(program_fd, argv, {})
        except BaseException as error:  # noqa: BLE001 - report whatever stops the exec
            os.write(2, f"cannot run ldconfig: {error}\n".encode())
        finally:
            os._exit(127)
    os.close(write_end)
    output, status = _collect(pid, read_end)
    return status, output.decode("utf-8", "replace")


def _confine(prctl) -> None:
    """In the forked child just before exec: ldconfig keeps only the capabilities it needs to
    read and write the image's files, can never gain privileges, and has CPU/memory bounds."""
    prctl.capbset.limit(prctl.CAP_DAC_OVERRIDE, prctl.CAP_DAC_READ_SEARCH, prctl.CAP_FOWNER)
    prctl.set_no_new_privs(True)
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _collect(pid: int, fd: int) -> tuple[bytes, str]:
    """Output and end of a child, killing it after TIMEOUT_S."""
    chunks = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return b"".join(chunks), f"timed out after {TIMEOUT_S}s"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                if sum(map(len, chunks)) < 1 << 20:
                    chunks.append(chunk)
    finally:
        os.close(fd)
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    status = "0" if code == 0 else (f"exit status {code}" if code > 0 else f"killed by signal {-code}")
    return b"".join(chunks), status
