"""Make mounted host libraries known to the container's dynamic loader.

Which libraries: host *files* mounted into the container whose name is a shared library
(`*.so` or `*.so.N[.M...]`). Directories mounted are not searched: they can be large, and
CDI specs (NVIDIA's among them) list each library as its own file mount; a spec that wants
a whole folder on the search path can say so with its own hook.

How: a conf file etc/ld.so.conf.d/00-cdi-hook.conf (00: ahead of the image's own folders)
lists the container-side folders; the host's ldconfig (static, opened on the host before
entering the container) builds the cache; the hook installs it as etc/ld.so.cache.

Every name there is the image's: it may be a symlink (into a host volume mounted in the
container), a device node, or a hard link to a host file on the rootfs's filesystem. So
nothing of the image is ever opened for writing, truncated, chmod'ed or chown'ed:

* the hook writes the conf file and the cache as new files of its own (O_EXCL) beside
  their names and renames them over; owner and mode are set through the new file's fd. The
  folders are resolved in the rootfs without crossing a mount (RESOLVE_NO_XDEV), so they
  are on the rootfs's own filesystem, never in a volume an image symlink leads to.
* ldconfig runs chrooted into a clone of the rootfs mounts that is read-only and nodev
  (open_tree + mount_setattr): it reads the image but cannot write into it (not its
  ld.so.cache~, not var/cache/ldconfig/aux-cache, which it writes whatever its options say,
  not through any symlink into any mount) and cannot open a device node. Its working
  folder is a private tmpfs attached nowhere, outside the chroot; `-C ld.so.cache`, a
  relative name, puts the new cache there, where only the hook reads it.

It runs with an empty environment, no_new_privs, a bounding set of only the file
capabilities it needs, CPU and memory limits, and -X (no symlink updates) and -i (the
image's aux-cache is not read). Undo puts the image's conf file and ld.so.cache back as
they were (content, or the symlink they were, with owner and mode), again as new files.
A rootfs without etc/ld.so.conf and etc/ld.so.cache (no /etc, musl, distroless) has no glibc
loader cache to update: skipped with a note, not an error.
"""

from __future__ import annotations

import errno
import os
import posixpath
import select
import stat
import time

from cdi_hook import state
from cdi_hook.errors import HookError
from cdi_hook.live import syscalls as sc
from cdi_hook.live.rootfs import Rootfs
from cdi_hook.spec.names import escape

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import Literal

STEP = "ldconfig"
CONF_DIR = "etc/ld.so.conf.d"
CONF_NAME = "00-cdi-hook.conf"
CACHE = "etc/ld.so.cache"
MAX_CACHE = 64 << 20  # a cache (ldconfig's new one, or the image's kept for undo) is at most this big
MAX_CONF_BACKUP = 1 << 20
OUT_NAME = "ld.so.cache"  # ldconfig's -C, relative: in its working folder, the private tmpfs
REPORT_NAME = "report"  # its -v output, in the same tmpfs
MAX_REPORT = 16 << 20  # bytes of the -v report read back
LDCONFIG_ARGV = ("ldconfig", "-X", "-i", "-C", OUT_NAME)
# Inside the rootfs, symlinks followed there, no magic links, and never across a mount.
OWN_MOUNT = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS | sc.RESOLVE_NO_XDEV
HOST_LDCONFIG = ("/sbin/ldconfig", "/usr/sbin/ldconfig")
_DIGITS = frozenset("0123456789")
TIMEOUT_S = 30
CPU_LIMIT_S = 20
MEMORY_LIMIT = 1 << 30


def is_library_name(path: str) -> bool:
    """Whether the file name is a shared library's: ^[^/]+\\.so(\\.[0-9]+)*$ (without re)."""
    name = posixpath.basename(path)
    at = name.find(".so", 1)
    while at != -1:
        rest = name[at + 3:]
        if not rest or (rest[0] == "." and all(part and set(part) <= _DIGITS for part in rest[1:].split("."))):
            return True
        at = name.find(".so", at + 1)
    return False


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
    """Whether fd is an ELF executable without a program interpreter (PT_INTERP). Read with
    int.from_bytes: the struct module would cost every start that mounts a library ~1 ms."""
    header = os.pread(fd, 64, 0)
    if len(header) < 52 or header[:4] != b"\x7fELF" or header[4] not in (1, 2) or header[5] not in (1, 2):
        return False
    order: Literal["little", "big"]
    is_64, order = header[4] == 2, "little" if header[5] == 1 else "big"

    def number(data: bytes, offset: int, size: int) -> int:
        return int.from_bytes(data[offset:offset + size], order)

    phoff = number(header, 0x20, 8) if is_64 else number(header, 0x1C, 4)
    phentsize, phnum = (number(header, 0x36, 2), number(header, 0x38, 2)) if is_64 else \
        (number(header, 0x2A, 2), number(header, 0x2C, 2))
    table = os.pread(fd, phentsize * phnum, phoff)
    if phentsize < 4 or len(table) < phentsize * phnum:
        return False
    pt_interp = 3
    return all(number(table, i * phentsize, 4) != pt_interp for i in range(phnum))


def update(rootfs: Rootfs, dirs: list[str], ldconfig_fd: int | None, notes: list[str], device: str = "",
           memo_fd: int | None = None, rebuild: bool = False) -> None:
    """device: the CDI names whose libraries these are, for the error message. memo_fd: the
    folder of remembered ldconfig runs (ldmemo.open_dir), None to always run ldconfig.
    rebuild: run even for no dirs (`cdi-hook detach` took the last mounted library away: the
    conf file is rewritten empty and the cache rebuilt without it)."""
    if not dirs and not rebuild:
        return
    if not (exists(rootfs, "etc/ld.so.conf") or exists(rootfs, CACHE)):
        notes.append("ldconfig skipped: rootfs has no etc/ld.so.conf or etc/ld.so.cache (not glibc)")
        return
    if ldconfig_fd is None:
        raise HookError(STEP, device, f"host has no statically linked ldconfig ({' or '.join(HOST_LDCONFIG)}); "
                                  "a dynamic one would run the image's loader and libraries as root")
    view_fd = _read_only_view(rootfs.root_fd, device)
    try:
        # What undo would put back is read before anything changes: a name undo could not
        # restore (a device node, a folder, a huge file) stops the step here.
        old_cache = _old_entry(view_fd, CACHE, MAX_CACHE, device)
        conf_dir_fd = _own_dir(rootfs, CONF_DIR, device)
        try:
            conf = f"{CONF_DIR}/{CONF_NAME}"
            old_conf = _old_entry(view_fd, conf, MAX_CONF_BACKUP, device)
            text = "# written by cdi-hook: host libraries mounted by CDI devices\n" + "".join(d + "\n" for d in dirs)
            if not _already(old_conf, text.encode(), rootfs.creator_ids):
                _replace(rootfs, conf_dir_fd, conf, text.encode(), old_conf, device)
        finally:
            os.close(conf_dir_fd)
        cache, how = _cache_for(view_fd, ldconfig_fd, memo_fd, device)
    finally:
        os.close(view_fd)
    if _already(old_cache, cache, rootfs.creator_ids):
        notes.append(f"ldconfig: cache updated for {', '.join(dirs)} ({how}; the image's was the same already)")
        return
    etc_fd = _own_dir(rootfs, posixpath.dirname(CACHE), device)
    try:
        _replace(rootfs, etc_fd, CACHE, cache, old_cache, device)
    finally:
        os.close(etc_fd)
    notes.append(f"ldconfig: cache updated for {', '.join(dirs)} ({how})")


def _cache_for(view_fd: int, ldconfig_fd: int, memo_fd: int | None, device: str) -> tuple[bytes, str]:
    """(the new ld.so.cache, how it was had): remembered from an earlier run of ldconfig on
    exactly this input (ldmemo), else built by ldconfig now (and remembered when it can be)."""
    if memo_fd is None:
        return _build_cache(view_fd, ldconfig_fd, device)[0], "ran ldconfig"
    from cdi_hook.live import ldmemo

    remembered, attempt = ldmemo.lookup(memo_fd, view_fd, ldconfig_fd, LDCONFIG_ARGV)
    if remembered is not None:
        return remembered, "as ldconfig made it for the same input before"
    cache, verbose, errors = _build_cache(view_fd, ldconfig_fd, device, verbose=attempt.conf is not None)
    if len(verbose) < MAX_REPORT:  # a report cut short cannot be read right
        ldmemo.remember(memo_fd, view_fd, ldconfig_fd, LDCONFIG_ARGV, attempt, verbose, errors, cache)
    return cache, "ran ldconfig"


def _already(old: tuple | None, content: bytes, creator_ids: tuple[int, int] | None) -> bool:
    """Whether what is at the name is exactly what _install would make: a regular file of its
    own (one link) with this content, mode 0644 and the owner the hook would give it. Then
    nothing is written, and nothing is left for undo to put back."""
    if old is None or isinstance(old[1], str):
        return False
    st, old_content = old
    return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and stat.S_IMODE(st.st_mode) == 0o644
            and (st.st_uid, st.st_gid) == (creator_ids or (0, 0)) and old_content == content)


def _read_only_view(root_fd: int, device: str) -> int:
    """A detached clone of the rootfs mounts, all read-only and nodev, for ldconfig to run in.

    ldconfig runs as host root, in the host's device cgroup. Through this view it reads the
    image but writes nothing to it, whatever the image's names are (hard links to host
    files, symlinks into host volumes, which are part of the clone and read-only there too),
    and opens no device node. The clone is a separate set of mounts: the container's own
    stay as they are.
    """
    try:
        view = sc.open_tree(root_fd, "", sc.OPEN_TREE_CLONE | sc.AT_RECURSIVE | sc.AT_EMPTY_PATH)
    except OSError as error:
        raise HookError(STEP, device, f"no read-only view of the rootfs for ldconfig: {error.strerror}") from None
    try:
        sc.mount_setattr(view, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NODEV, recursive=True)
    except OSError as error:
        os.close(view)
        raise HookError(STEP, device, f"no read-only view of the rootfs for ldconfig: {error.strerror}") from None
    return view


def _build_cache(view_fd: int, ldconfig_fd: int, device: str, verbose: bool = False) -> tuple[bytes, bytes, str]:
    """(the new ld.so.cache, ldconfig's -v report (b"" without verbose), its stderr), as
    ldconfig chrooted into view_fd builds it in a private tmpfs."""
    try:
        # Its size bounds the cache (a bigger one fails ldconfig with ENOSPC) and the memory it takes.
        out_fd = sc.detached_tmpfs({"size": str(MAX_CACHE), "mode": "0700", "nr_inodes": "16"},
                                   sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
    except OSError as error:
        raise HookError(STEP, device, f"no private folder for ldconfig's output: {error.strerror}") from None
    report_fd = None
    try:
        argv = list(LDCONFIG_ARGV)
        if verbose:
            # -v lists the folders scanned on stdout (ldmemo keys on them): into a file of the
            # private tmpfs, apart from the complaints on stderr.
            argv.insert(1, "-v")
            report_fd = os.open(REPORT_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                0o600, dir_fd=out_fd)
        status, output = _run_chrooted(view_fd, ldconfig_fd, argv, cwd_fd=out_fd, stdout_fd=report_fd)
        if status != "0":
            # ldconfig's complaints name the image's files: escaped, so no name can reach a
            # terminal or a log as control characters.
            tail = " ".join(output.split())[-2000:] or "no output"
            raise HookError(STEP, device, f"{status}: {escape(tail)}")
        try:
            fd = os.open(OUT_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=out_fd)
        except OSError as error:
            raise HookError(STEP, device, f"ldconfig made no cache: {error.strerror}") from None
        with os.fdopen(fd, "rb") as made:
            cache = made.read()
        report = os.pread(report_fd, MAX_REPORT, 0) if report_fd is not None else b""
        return cache, report, output
    finally:
        if report_fd is not None:
            os.close(report_fd)
        os.close(out_fd)


def _own_dir(rootfs: Rootfs, folder: str, device: str) -> int:
    """An fd of folder in the rootfs, made when missing (and removed again on undo).

    Resolved inside the rootfs and without crossing a mount: an image symlink that leads
    into a volume mounted in the container (a host folder) is refused (EXDEV), so what the
    hook writes stays on the rootfs's own filesystem.
    """
    try:
        return sc.openat2(rootfs.root_fd, folder, os.O_RDONLY | os.O_DIRECTORY, OWN_MOUNT)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise HookError(STEP, device, _where(folder, error)) from None
    parent, name = posixpath.split(folder)
    parent_fd = _own_dir(rootfs, parent, device) if parent else os.dup(rootfs.root_fd)
    try:
        os.mkdir(name, 0o755, dir_fd=parent_fd)
        rootfs.on_undo(lambda: _remove_dir(rootfs, parent, name))
        fd = sc.openat2(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY, OWN_MOUNT | sc.RESOLVE_NO_SYMLINKS)
        if rootfs.creator_ids is not None:
            os.fchown(fd, *rootfs.creator_ids)  # through the fd: the folder we just made, nothing else
        return fd
    except OSError as error:
        raise HookError(STEP, device, _where(folder, error)) from None
    finally:
        os.close(parent_fd)


def _remove_dir(rootfs: Rootfs, parent: str, name: str) -> None:
    parent_fd = sc.openat2(rootfs.root_fd, parent or ".", os.O_PATH | os.O_DIRECTORY, OWN_MOUNT)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)


def _old_entry(view_fd: int, path: str, limit: int, device: str) -> tuple | None:
    """What is at path now, for undo: None, or (stat, the symlink's target or the file's bytes).

    Read through the nodev view, so a device node swapped in meanwhile cannot be opened.
    Anything else there (a device node, a fifo, a folder) or a file over limit is refused:
    undo could not put it back.
    """
    folder, name = posixpath.split(path)
    try:
        dir_fd = sc.openat2(view_fd, folder, os.O_PATH | os.O_DIRECTORY, OWN_MOUNT)
    except OSError as error:
        raise HookError(STEP, device, _where(folder, error)) from None
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return st, os.readlink(name, dir_fd=dir_fd)
        if stat.S_ISREG(st.st_mode) and st.st_size <= limit:
            with os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                   dir_fd=dir_fd), "rb") as old:
                st = os.fstat(old.fileno())
                content = old.read(limit + 1)
            if stat.S_ISREG(st.st_mode) and len(content) <= limit:
                return st, content
    except FileNotFoundError:
        return None
    except OSError as error:
        raise HookError(STEP, device, _where(path, error)) from None
    finally:
        os.close(dir_fd)
    kind = "a regular file or a symlink" if not stat.S_ISREG(st.st_mode) else f"at most {limit >> 20} MiB"
    raise HookError(STEP, device, f"{path} in the rootfs is not {kind}; refusing to replace what undo could not put back")


def _replace(rootfs: Rootfs, dir_fd: int, path: str, content: bytes, old: tuple | None, device: str) -> None:
    """Put content at path (in dir_fd) as a new file for the container's root; undo puts old back."""
    name = posixpath.basename(path)
    try:
        _install(dir_fd, name, content, 0o644, rootfs.creator_ids)
    except OSError as error:
        raise HookError(STEP, device, _where(path, error)) from None
    rootfs.on_undo(lambda: _put_back(rootfs, path, old))


def _put_back(rootfs: Rootfs, path: str, old: tuple | None) -> None:
    folder, name = posixpath.split(path)
    dir_fd = sc.openat2(rootfs.root_fd, folder, os.O_PATH | os.O_DIRECTORY, OWN_MOUNT)
    try:
        if old is None:
            os.unlink(name, dir_fd=dir_fd)
        else:
            st, content = old
            _install(dir_fd, name, content, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid))
    finally:
        os.close(dir_fd)


def _install(dir_fd: int, name: str, content: bytes | str, mode: int, owner: tuple[int, int] | None) -> None:
    """A new file (bytes) or symlink (str) with owner and mode, renamed over name in dir_fd.

    Made under a fresh name with O_EXCL (or symlink(), which never follows): whatever the
    image holds under name, or links there, is only unlinked by the rename, never written.
    Owner and mode are set through an fd of the new inode. Not durable (no fsync): the file
    dies with the container, and dir_fd is an O_PATH fd, which fsync refuses.
    """
    if not isinstance(content, str):
        state.write_atomic_at(dir_fd, name, content, mode, owner, durable=False)
        return
    temp = f".{name}.{os.urandom(6).hex()}.cdi-hook"
    try:
        os.symlink(content, temp, dir_fd=dir_fd)
        fd = os.open(temp, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISLNK(st.st_mode) or st.st_nlink != 1:  # swapped for a link to another inode
                raise OSError(errno.EEXIST, "replaced while being made", temp)
            if owner is not None:
                sc.fchown_fd(fd, *owner)
        finally:
            os.close(fd)
        state.rename_into_place(temp, name, dir_fd)
    except BaseException:
        try:
            os.unlink(temp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def exists(rootfs: Rootfs, path: str) -> bool:
    try:
        os.close(rootfs.open_path(path))
        return True
    except OSError:
        return False


def _where(path: str, error: OSError) -> str:
    if error.errno == errno.EXDEV:
        return (f"{path} in the rootfs leads out of the rootfs's own filesystem (a symlink into a mounted "
                "folder?); refusing to write there")
    return f"{path} in the rootfs: {error.strerror}"


def _run_chrooted(root_fd: int, program_fd: int, argv: list[str], cwd_fd: int | None = None,
                  stdout_fd: int | None = None) -> tuple[str, str]:
    """Run program chrooted into root_fd, confined; ("0" or how it ended, its output).

    cwd_fd: its working folder (else the new root). It may lie outside the chroot: relative
    names then resolve there, and '..' cannot climb out of a mount attached nowhere.
    stdout_fd: where its stdout goes (the output returned is then its stderr alone).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # grandchild: never returns
        try:
            os.close(read_end)
            os.dup2(write_end if stdout_fd is None else stdout_fd, 1)
            os.dup2(write_end, 2)
            null_read, null_write = os.pipe()
            os.dup2(null_read, 0)
            os.fchdir(root_fd)
            os.chroot(".")
            if cwd_fd is not None:
                os.fchdir(cwd_fd)
            _confine()
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


# capability(7) numbers: what ldconfig needs to read and write the image's files as root
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_FOWNER = 3


def _confine() -> None:
    """In the forked child just before exec: ldconfig keeps only the capabilities it needs to
    read and write the image's files, can never gain privileges, and has CPU/memory bounds.
    Syscalls through the ctypes the worker already holds: nothing is imported here, inside
    the container's mount namespace, where an import would read the image's files."""
    sc.limit_bounding_set({CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER})
    sc.set_no_new_privs()
    sc.setrlimit(sc.RLIMIT_CPU, CPU_LIMIT_S)
    sc.setrlimit(sc.RLIMIT_AS, MEMORY_LIMIT)
    sc.setrlimit(sc.RLIMIT_CORE, 0)


def _collect(pid: int, fd: int) -> tuple[bytes, str]:
    """Output and end of a child, killing it after TIMEOUT_S."""
    chunks: list[bytes] = []
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


# --- reading a cache (verify) -------------------------------------------------------------


def cached_paths(rootfs: Rootfs) -> set[str] | None:
    """The library paths etc/ld.so.cache lists (glibc's new format), None when unreadable."""
    try:
        fd = sc.openat2(rootfs.root_fd, CACHE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
                              sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(MAX_CACHE)
    return parse_cache(data)


_NEW_MAGIC = b"glibc-ld.so.cache1.1"


def parse_cache(data: bytes) -> set[str] | None:
    """Paths of the entries of an ld.so.cache (new format, alone or after the old one).

    Header: magic (20 bytes), nlibs, len_strings, flags and padding, extension offset, 3
    unused words (48 bytes); then nlibs entries of 24 bytes (flags, key, value, osversion,
    hwcap). key and value are string offsets from the start of the new header."""
    start = data.find(_NEW_MAGIC)
    if start < 0 or len(data) < start + 48:
        return None
    count = int.from_bytes(data[start + 20:start + 24], "little")
    paths = set()
    for i in range(count):
        entry = start + 48 + 24 * i
        if entry + 24 > len(data):
            return None
        value = start + int.from_bytes(data[entry + 8:entry + 12], "little")
        end = data.find(b"\0", value)
        if value >= len(data) or end < 0:
            return None
        paths.add(data[value:end].decode(errors="replace"))
    return paths
