"""Remembered ldconfig runs: install the cache ldconfig made before for exactly the same input.

ldconfig's cache is a function of what it reads: its own binary and arguments, the conf
files (etc/ld.so.conf and what it includes), which of the folders named there and built in
exist (and which are the same folder twice), and in each folder it scans, the entries that
could be libraries (their names, types, and each file's identity: file system, inode, size, mtime
and ctime, for a symlink also its target and the identity of the file it leads to; a folder
without a library's name by name alone, since ldconfig enters one only as a legacy hwcap
subfolder, which its report then names as scanned, glibc-hwcaps excepted: ldconfig reads
its subfolders, and only those it finds are reported). When all of
that is as it was for an earlier run, the cache that run produced is the cache this one
would produce: it is installed instead of running ldconfig again (a fork, an exec and a
scan: most of the ldconfig step).

The key is exact, not a guess: the conf files are compared by content, every folder
ldconfig scanned by its full listing. Which folders those were is what ldconfig itself
reported with -v on the run that is remembered (stdout: each folder scanned; stderr: each
folder missing or named twice); a run whose report holds anything else, or whose conf uses
what this module does not follow (a ':' in a folder line, a glob beyond `*`/`?` in the last
part of an include), is simply not remembered, and every start runs ldconfig as before.
A file changed less than cache.FRESH_NS ago keeps a run from being remembered (timestamp
granularity), as in the registry cache.

Every identity keyed by inode holds its file system too: an inode number (and a ctime,
which many kernels take from a coarse clock) tells files apart only within one. A file on
another file system than the rootfs's (a bind mount, a tmpfs in a scanned folder) is keyed
by its st_dev; one on the rootfs's own by ROOT_DEVICE, and the rootfs by root_identity():
a block device's number. An overlay rootfs is an anonymous device whose number, and on
recent kernels statfs fsid, are each mount's own: keyed by either, no two containers of an
image would ever share a memo. There the inode numbers (an overlay's own: the layers'
inodes, unique on their file system) and the times remain what tells files apart.

Where: root-only files in <cache dir>/ldconfig (a folder of cache.cache_dir()), opened
before the worker enters the container (an fd), named by CRCs and holding the whole key,
which is compared byte for byte, and a CRC of the cache. Everything is read from the
image through the same read-only, nodev view ldconfig runs in, fd-relative with
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) and O_NONBLOCK, sizes bounded: the image
is never written or opened for writing, no device node or fifo is read.
"""

from __future__ import annotations

import marshal
import os
import posixpath
import stat
import time
import zlib

from cdi_hook import state
from cdi_hook.live import syscalls as sc

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

FORMAT = 2  # 2: identities keyed by inode hold their file system
MAGIC = b"CDIHKL%02d" % FORMAT
SUBDIR = "ldconfig"
CONF = "/etc/ld.so.conf"  # ldconfig's default -f, inside its chroot
IN_ROOT = sc.RESOLVE_IN_ROOT | sc.RESOLVE_NO_MAGICLINKS
MAX_CONF_FILES = 256
MAX_CONF_SIZE = 1 << 20
MAX_INCLUDE_DEPTH = 16
MAX_ENTRIES = 100_000  # entries keyed over every scanned folder; beyond: not remembered
KEEP = 32  # remembered caches kept; the oldest go first
MAX_MEMO = 1 << 28  # a bound for a remembered value (an ld.so.cache is a few MB at most)
_GLOB_UNSUPPORTED = ("[", "\\", "{")
GLIBC_HWCAPS = "glibc-hwcaps"  # its subfolders are scanned by name (glibc >= 2.33, elf/ldconfig.c)
ROOT_DEVICE = -1  # in an identity: the file is on the rootfs's own file system (root_identity)


class Unsupported(Exception):
    """The input is not one this module can key exactly: run ldconfig."""


def open_dir() -> int | None:
    """Before setns: an fd of the root-only memo folder (made when missing), or None."""
    if os.geteuid() != 0:
        return None
    from cdi_hook import cache

    top = cache.cache_dir()
    if top is None:
        return None
    try:
        state.ensure_private_dir(top)  # checked too: whoever may write it could swap the memo folder
        return state.open_private_dir(os.path.join(top, SUBDIR), create=True)
    except state.StateError:  # a memo is best effort: ldconfig runs
        return None


# ---------------------------------------------------------------------------------------
# The key


def conf_key(view_fd: int, ldconfig_fd: int, argv: Sequence[str]) -> bytes | None:
    """Part one of the key: ldconfig's identity and arguments and every conf file it reads
    (path and content, in the order it reads them). None when not supported."""
    st = os.fstat(ldconfig_fd)
    root = root_identity(view_fd)
    files: list = []
    try:
        _read_conf(view_fd, CONF, files, 0)
    except Unsupported:
        return None
    return marshal.dumps((FORMAT, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), root,
                          tuple(argv), tuple(files)))


def root_identity(view_fd: int) -> tuple:
    """The rootfs's file system: a block device's number; for an anonymous device (an
    overlay, a tmpfs) only that it is one (see the module's text: its number, and on recent
    kernels its statfs fsid too, are each mount's own)."""
    dev = os.fstat(view_fd).st_dev
    return ("dev", dev) if os.major(dev) != 0 else ("anonymous",)


def _device(st: os.stat_result, root_dev: int) -> int:
    """The file system part of a file's identity (see the module's text)."""
    return ROOT_DEVICE if st.st_dev == root_dev else st.st_dev


def _read_conf(view_fd: int, path: str, files: list, depth: int) -> None:
    """glibc's parse_conf, as far as it decides what is read: '#' ends a line, `include`
    takes blank-separated globs (relative to the including file's folder), `hwcap` lines are
    ignored by ldconfig, every other line names a folder."""
    if depth > MAX_INCLUDE_DEPTH or len(files) >= MAX_CONF_FILES:
        raise Unsupported(path)
    content = _read_file(view_fd, path)
    files.append((path, content))
    if content is None:
        return
    for raw in content.split(b"\n"):
        line = raw.split(b"#", 1)[0].lstrip()
        if not line:
            continue
        if line.startswith(b"include") and line[7:8] in (b" ", b"\t"):
            for word in line[8:].split():
                pattern = os.fsdecode(word)
                if not pattern.startswith("/"):
                    pattern = posixpath.join(posixpath.dirname(path), pattern)
                for match in _glob(view_fd, pattern):
                    _read_conf(view_fd, match, files, depth + 1)
        elif line[:5].lower() == b"hwcap" and line[5:6] in (b" ", b"\t"):
            continue
        elif b":" in line:
            # ldconfig reports folders as "PATH:" (see _report): a ':' in one would be ambiguous.
            raise Unsupported(path)


def _read_file(view_fd: int, path: str) -> bytes | None:
    """A conf file's content (None: missing), read without blocking on a fifo; anything but
    a regular file of at most MAX_CONF_SIZE bytes is not supported."""
    try:
        fd = sc.openat2(view_fd, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, IN_ROOT)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        raise Unsupported(path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONF_SIZE:
            raise Unsupported(path)
        content = os.read(fd, MAX_CONF_SIZE + 1)
        if len(content) > MAX_CONF_SIZE:
            raise Unsupported(path)
        return content
    finally:
        os.close(fd)


def _glob(view_fd: int, pattern: str) -> list[str]:
    """glob(3) for a pattern with `*` and `?` in its last part only (as include lines are),
    sorted; names starting with '.' match only a pattern that does."""
    folder, last = posixpath.split(pattern)
    if any(c in folder for c in "*?") or any(c in pattern for c in _GLOB_UNSUPPORTED):
        raise Unsupported(pattern)
    if not any(c in last for c in "*?"):
        return [pattern] if _read_file(view_fd, pattern) is not None else []
    try:
        fd = sc.openat2(view_fd, folder or "/", os.O_RDONLY | os.O_DIRECTORY, IN_ROOT)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError:
        raise Unsupported(pattern) from None
    try:
        names = os.listdir(fd)
    finally:
        os.close(fd)
    return [posixpath.join(folder, name) for name in sorted(names, key=os.fsencode)
            if (not name.startswith(".") or last.startswith(".")) and _matches(name, last)]


def _matches(name: str, pattern: str) -> bool:
    """fnmatch for `*` and `?` (fnmatch itself would import re on the hot path)."""
    if not pattern:
        return not name
    if pattern[0] == "*":
        return any(_matches(name[i:], pattern[1:]) for i in range(len(name) + 1))
    return bool(name) and (pattern[0] == "?" or pattern[0] == name[0]) and _matches(name[1:], pattern[1:])


def _report(verbose: bytes, errors: str) -> tuple | None:
    """The folders ldconfig looked at, from its -v report: ((path, "scan"|"missing"|"twice"), ...).

    stdout: a line per folder scanned ("PATH:", maybe followed by " (hwcap: ...)" and
    " (from FILE:LINE)"), libraries on tab-indented lines. stderr: "Can't stat PATH: ...",
    "Path `PATH' given more than once" (and its "(from ...)" line), "hwcap directive
    ignored". Any other complaint: None (not remembered).
    """
    folders: dict[str, str] = {}
    for line in os.fsdecode(verbose).split("\n"):
        if not line or line.startswith("\t"):
            continue
        path = line.split(":", 1)[0]
        if not path.startswith("/") or path in folders:
            return None
        folders[path] = "scan"
    for line in errors.split("\n"):
        line = line.strip()
        if line.startswith("ldconfig: "):
            line = line[len("ldconfig: "):]
        if not line or line.startswith("(from ") or line.endswith(": hwcap directive ignored"):
            continue
        if line.startswith("Can't stat ") and line.endswith((": No such file or directory", ": Not a directory")):
            path = line[len("Can't stat "):].rsplit(": ", 1)[0]
            kind = "missing"
        elif line.startswith("Path `") and line.endswith("' given more than once"):
            path = line[len("Path `"):-len("' given more than once")]
            kind = "twice"
        elif line.startswith("Warning: ignoring configuration file that cannot be opened: ") and \
                line.endswith(": No such file or directory"):
            continue
        else:
            return None
        if not path.startswith("/") or folders.get(path, kind) != kind:
            return None
        folders[path] = kind
    return tuple(folders.items())


def state_key(view_fd: int, folders: tuple) -> tuple[bytes, int] | None:
    """Part two of the key: each folder's state now (missing, not a folder, which earlier one
    it is the same folder as, and for a scanned one its listing). Also the newest timestamp
    seen, for the freshness rule. None when a folder cannot be looked at."""
    states: list[tuple] = []
    seen: dict[tuple[int, int], int] = {}
    budget = [MAX_ENTRIES, 0]  # entries left, newest timestamp
    root_dev = os.fstat(view_fd).st_dev
    for index, (path, kind) in enumerate(folders):
        try:
            fd = sc.openat2(view_fd, path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK, IN_ROOT)
        except (FileNotFoundError, NotADirectoryError):
            states.append(("missing",))
            continue
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            same_as = seen.setdefault((st.st_dev, st.st_ino), index)
            if kind != "scan":
                states.append(("folder", same_as))
                continue
            listing = _listing(view_fd, fd, path, budget, root_dev)
            if listing is None:
                return None
            states.append(("folder", same_as, listing))
        finally:
            os.close(fd)
    return marshal.dumps(tuple(states)), budget[1]


def _is_library_like(name: str) -> bool:
    """ldconfig's own test (elf/ldconfig.c search_dir): lib* or ld-* with ".so" in it."""
    return name.startswith(("lib", "ld-")) and ".so" in name


def _listing(view_fd: int, fd: int, path: str, budget: list, root_dev: int) -> tuple | None:
    """A scanned folder's entries: library-like names and all that is not a regular file or a
    folder with their identity, other regular files by name (ldconfig skips them unread),
    other folders by name and type (see below)."""
    with os.scandir(fd) as entries:
        found = [(entry.name, entry.is_file(follow_symlinks=False)) for entry in entries]
    budget[0] -= len(found)
    if budget[0] < 0:
        return None
    found.sort()
    signatures: dict[str, tuple] = {}
    for name, is_file in found:
        if is_file and not _is_library_like(name):
            signatures[name] = ()
            continue
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) and not _is_library_like(name) and name != GLIBC_HWCAPS:
            # ldconfig scans such a folder only as a legacy hwcap subfolder (tls, haswell...:
            # glibc <= 2.36), and then its -v report names it, even empty, so it is keyed by
            # its own listing. Here its name and type are all that matter: a folder made anew
            # in every container (a mount point cdi-hook creates in a scanned folder) then
            # keys alike, and is not "fresh". glibc-hwcaps is read for its subfolders, which
            # the report names only when they exist: its identity (times) stays in the key.
            signatures[name] = (stat.S_IFDIR,)
            continue
        budget[1] = max(budget[1], st.st_mtime_ns, st.st_ctime_ns)
        signatures[name] = _identity(st, root_dev)
    result = []
    for name, _ in found:
        signature = signatures[name]
        if signature and stat.S_ISLNK(signature[0]) and _is_library_like(name):
            target = os.readlink(name, dir_fd=fd)
            signature += (target, _target(view_fd, path, name, target, signatures, budget, root_dev))
        result.append((name,) + signature)
    return tuple(result)


def _identity(st: os.stat_result, root_dev: int) -> tuple:
    """A file as the key holds it: type and mode, file system, inode, size, times."""
    return (st.st_mode, _device(st, root_dev), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _target(view_fd: int, path: str, name: str, target: str, signatures: dict, budget: list,
            root_dev: int) -> tuple:
    """The identity of the file a library symlink leads to, as ldconfig's stat() in its
    chroot finds it. A plain name of a file in the same folder is taken from the listing."""
    signature = signatures.get(target) if "/" not in target and target not in (".", "..") else None
    if signature and not stat.S_ISLNK(signature[0]):
        return signature
    try:
        fd = sc.openat2(view_fd, f"{path}/{name}", os.O_PATH, IN_ROOT)
    except OSError as error:
        return ("error", error.errno)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    budget[1] = max(budget[1], st.st_mtime_ns, st.st_ctime_ns)
    return _identity(st, root_dev)


# ---------------------------------------------------------------------------------------
# Looking up and remembering


class Attempt:
    """One start's look at the memo: what it found out before ldconfig ran (or instead)."""

    def __init__(self, conf: bytes | None, folders: tuple | None, state: bytes | None, started_ns: int):
        self.conf = conf  # part one of the key, None: not supported
        self.folders = folders  # the folders the last remembered report named (None: none yet)
        self.state = state  # part two of the key for those folders, as they were before the run
        self.started_ns = started_ns


def lookup(memo_fd: int, view_fd: int, ldconfig_fd: int, argv: Sequence[str]) -> tuple[bytes | None, Attempt]:
    """(the remembered cache for the input as it is now, or None; what remember() needs)."""
    started = time.time_ns()
    conf = conf_key(view_fd, ldconfig_fd, argv)
    if conf is None:
        return None, Attempt(None, None, None, started)
    folders = _load(memo_fd, _folders_name(conf), conf)
    if folders is None:
        return None, Attempt(conf, None, None, started)
    state = state_key(view_fd, folders)
    if state is None:
        return None, Attempt(None, None, None, started)
    remembered = _load(memo_fd, _cache_name(conf, state[0]), (conf, state[0]))
    if remembered is not None:
        crc, cache = remembered
        if zlib.crc32(cache) == crc:
            return cache, Attempt(conf, folders, state[0], started)
    return None, Attempt(conf, folders, state[0], started)


def remember(memo_fd: int, view_fd: int, ldconfig_fd: int, argv: Sequence[str], attempt: Attempt,
             verbose: bytes, errors: str, cache: bytes) -> bool:
    """Keep the cache ldconfig just made, when its input provably did not change while it ran.

    The first run of a configuration only records which folders ldconfig looked at; a later
    run whose input is the same before and after it (and no file of it newer than FRESH_NS
    before the run started) is remembered under that input."""
    from cdi_hook.cache import FRESH_NS

    if attempt.conf is None or conf_key(view_fd, ldconfig_fd, argv) != attempt.conf:
        return False
    folders = _report(verbose, errors)
    if folders is None:
        return False
    if folders != attempt.folders:
        _store(memo_fd, _folders_name(attempt.conf), attempt.conf, folders)
        return False
    state = state_key(view_fd, folders)
    if state is None or state[0] != attempt.state or attempt.started_ns - state[1] < FRESH_NS:
        return False
    stored = _store(memo_fd, _cache_name(attempt.conf, attempt.state), (attempt.conf, attempt.state),
                    (zlib.crc32(cache), cache))
    if stored:
        _trim(memo_fd)
    return stored


def _folders_name(conf: bytes) -> str:
    return f"folders-{zlib.crc32(conf):08x}-{len(conf):x}"


def _cache_name(conf: bytes, state: bytes) -> str:
    return f"cache-{zlib.crc32(conf):08x}-{zlib.crc32(state):08x}-{len(state):x}"


def _load(memo_fd: int, name: str, key: object) -> Any:
    """The value stored under name for exactly this key; None for anything else."""
    try:
        data = state.read_trusted(memo_fd, name, name, MAX_MEMO)
        if data is None or data[:len(MAGIC)] != MAGIC:
            return None
        stored_key, value = marshal.loads(data[len(MAGIC):])
        return value if stored_key == key else None
    except Exception:  # corrupt or foreign: run ldconfig
        return None


def _store(memo_fd: int, name: str, key: Any, value: Any) -> bool:  # marshal-able
    """Write MAGIC + marshal((key, value)) as name, atomically, 0600; not durable: a memo
    lost to a crash only means ldconfig runs."""
    try:
        state.write_atomic_at(memo_fd, name, MAGIC + marshal.dumps((key, value)), durable=False)
        return True
    except (OSError, ValueError):
        return False


def _trim(memo_fd: int) -> None:
    """At most KEEP remembered caches: the least recently written go."""
    try:
        names = [n for n in os.listdir(memo_fd) if n.startswith("cache-")]
        if len(names) <= KEEP:
            return
        by_age = sorted(names, key=lambda n: os.stat(n, dir_fd=memo_fd, follow_symlinks=False).st_mtime_ns)
        for name in by_age[:len(names) - KEEP]:
            os.unlink(name, dir_fd=memo_fd)
    except OSError:
        pass
