"""The state layer: the one place that decides where cdi-hook's own files may live, whether
one of them is believed, and how one is written. Nothing else renames a file into place.

Three rules, each once:

* A **private folder** is a real directory (no symlink) of the effective user's (root's),
  that nobody else may write or read: `open_private_dir`. Records in any other folder are
  refused, never believed.
* A **trusted read** opens a file with O_NOFOLLOW below such a folder's fd, and believes it
  only when it is a regular file of root's that nobody else may read or write, no larger
  than its bound (and, for records, whose checksum holds): `read_trusted`, `read_record`.
* The **atomic write**: a new temp file beside the target (O_EXCL, O_NOFOLLOW), written
  whole, fsync'd, renamed over the target, the folder fsync'd: a reader sees the old file or
  the new one, never half of either, and a crash leaves one of the two: `write_atomic`,
  `write_atomic_at`. `write_atomic_at` is the same write relative to a folder's fd, for
  folders opened safely elsewhere (a container's rootfs, through openat2 RESOLVE_IN_ROOT).
  `PendingRecord` is a record's write in two steps: the temp file first (a full or
  read-only folder fails there, before the caller changed anything), the rename once the
  caller has done what the record describes.

Layout under the state root (settings.Settings.state_root, /run/cdi-hook by default, a
tmpfs gone at reboot like the containers the records describe):

    held/         one file per exclusive device held (live/holds.py)
    containers/   one record per container cdi-hook gave devices to (record.py)
    attachments/  what attach and detach changed in running containers (attachments.py)
    netdev/       the interfaces moved into a container, for poststop (live/netdev.py)

and under the cache dir (CDI_HOOK_CACHE_DIR, the same folder by default): the compiled
registry and policy caches, the watcher's generation and the ldconfig memo (ldconfig/).
Those are only ever a faster way to an answer; the records above are what cdi-hook did.

Stdlib only and small: the hook's hot path reads records through it.
"""

from __future__ import annotations

import os
import stat

from cdi_hook.errors import CdiError

MAX_RECORD = 1 << 20
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StateError(CdiError):
    """A state file or folder that is not what cdi-hook made: refused with one line."""


def is_private_file(st: os.stat_result) -> bool:
    """A regular file of root's that nobody else may read or write: what cdi-hook's own
    records must be to be believed."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077


def private_dir_problem(st: os.stat_result, owner: int | None = None) -> str | None:
    """Why a folder with this stat may not hold cdi-hook's records, or None. owner: the uid
    it must have (default: ours; doctor asks for the hooks', root's)."""
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != (os.geteuid() if owner is None else owner):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o077:
        return f"mode {stat.S_IMODE(st.st_mode):o}, open to others"
    return None


def open_private_dir(path: str, create: bool = False) -> int | None:
    """An fd of the private folder at path (made 0700, parents too, when create); None when
    it does not exist and create is false. StateError when it is not private."""
    if not os.path.isabs(path):
        raise StateError(f"{path}: not an absolute path; refusing to keep records there")
    if create:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as error:
            raise StateError(f"{path}: cannot make the folder: {error.strerror}") from None
    try:
        fd = os.open(path, _OPEN_DIR)
    except FileNotFoundError:
        if create:
            raise StateError(f"{path}: vanished while it was made") from None
        return None
    except OSError as error:
        raise StateError(f"{path}: {error.strerror} (a symlink or not a directory?); refusing to keep records "
                         "there") from None
    problem = private_dir_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise StateError(f"{path}: not a private folder of root's ({problem}); refusing to keep records there")
    return fd


def ensure_private_dir(path: str) -> None:
    """open_private_dir(path, create=True) for a caller that keeps paths, not fds (a socket's
    folder, a cache folder made at install)."""
    fd = open_private_dir(path, create=True)
    assert fd is not None  # create=True: made, or StateError
    os.close(fd)


def open_trusted(dir_fd: int, name: str, where: str, max_size: int = MAX_RECORD) -> int | None:
    """An fd of name in the private folder dir_fd, for a reader that reads only parts of it
    (a cache read at offsets); None when there is none. StateError as read_trusted."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise StateError(f"{where}: cannot read: {error.strerror} (a symlink?); refusing to believe it") from None
    st = os.fstat(fd)
    if not is_private_file(st):
        os.close(fd)
        raise StateError(f"{where}: not a private file of root's (owner {st.st_uid}, mode "
                         f"{stat.S_IMODE(st.st_mode):o}); refusing to believe it")
    if st.st_size > max_size:
        os.close(fd)
        raise StateError(f"{where}: {st.st_size} bytes, more than a record can be ({max_size})")
    return fd


def read_trusted(dir_fd: int, name: str, where: str, max_size: int = MAX_RECORD) -> bytes | None:
    """The bytes of name in the private folder dir_fd; None when there is none. where: the
    path for messages. StateError for a symlink, a file not root's or open to others, or
    one over max_size."""
    fd = open_trusted(dir_fd, name, where, max_size)
    if fd is None:
        return None
    try:
        chunks = []
        size = 0
        while size <= max_size:  # the file may grow after the fstat
            chunk = os.read(fd, max_size + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_size:
            raise StateError(f"{where}: more than {max_size} bytes, more than a record can be")
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600,
                    owner: tuple[int, int] | None = None, durable: bool = True) -> None:
    """Replace name in the folder dir_fd with data all at once (see the module's text).
    durable=False skips the fsyncs: for files that are only a faster way to an answer
    (caches) or that die with the container (its rootfs), where a crash costs nothing."""
    temp = _write_temp(dir_fd, name, data, mode, owner, durable)
    try:
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(dir_fd, temp)
        raise
    if durable:
        os.fsync(dir_fd)


def _write_temp(dir_fd: int, name: str, data: bytes, mode: int, owner: tuple[int, int] | None,
                durable: bool) -> str:
    """A new temp file beside name holding data, written whole (and fsync'd): its name."""
    # Unguessable: in a container's rootfs the image could otherwise put a file under the
    # temp name first and make the write fail (O_EXCL never writes through what is there).
    temp = f".{name}.{os.urandom(6).hex()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if owner is not None and os.geteuid() == 0:
                os.fchown(fd, *owner)
            os.fchmod(fd, mode)  # after fchown, which clears set-id bits; and whatever the umask
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(dir_fd, temp)
        raise
    return temp


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


class PendingRecord:
    """A record's next version written whole beside it and fsync'd, not yet in place: for a
    caller that must know the record can be written before it changes anything (detach
    takes devices away, then records that). commit() puts it in place; discard() drops it.
    document None: the record is to be removed; the empty temp file made in its stead shows
    the folder takes a change (a read-only one refuses it) and is removed by either call.
    Holds its own fd of the folder until then."""

    def __init__(self, dir_fd: int, name: str, document: object | None):
        self.name = name
        self.removal = document is None
        self.dir_fd = os.dup(dir_fd)
        try:
            self.temp = _write_temp(self.dir_fd, name, b"" if document is None else encode_record(document),
                                    0o600, None, True)
        except BaseException:
            os.close(self.dir_fd)
            raise

    def commit(self) -> None:
        """OSError when the record cannot be put in place (the temp file is gone then too)."""
        try:
            if self.removal:
                remove_at(self.dir_fd, self.name)
                _unlink_quietly(self.dir_fd, self.temp)
            else:
                os.rename(self.temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            os.fsync(self.dir_fd)
        except BaseException:
            _unlink_quietly(self.dir_fd, self.temp)
            raise
        finally:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def discard(self) -> None:
        if self.dir_fd >= 0:
            _unlink_quietly(self.dir_fd, self.temp)
            os.close(self.dir_fd)
            self.dir_fd = -1


def write_atomic(path: str, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None,
                 durable: bool = True) -> None:
    """write_atomic_at for a path: config.json rewrites, hooks.d files, caches. A reader
    (runc, Podman's hooks.d monitor) sees either the old file or the new one."""
    directory, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_atomic_at(dir_fd, name, data, mode, owner, durable)
    finally:
        os.close(dir_fd)


def rename_into_place(temp: str, name: str, dir_fd: int | None = None) -> None:
    """Rename an inode its caller made aside and checked (a device node, a symlink, a file it
    must keep open and locked) over name. Not a write: kept here so that every rename into
    place is in this one module, and none can be added elsewhere without being seen."""
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def open_lock_at(dir_fd: int, name: str) -> int:
    """An fd of the lock file name in the private folder dir_fd, made empty (0600) when
    missing; for flock, which needs no write access. A lock file stays: an unlinked one could
    be locked by one process while another makes a new one."""
    return os.open(name, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)


def new_file_beside(path: str) -> tuple[int, str]:
    """(fd, name) of a new empty private file (0600, read-write) beside path, under a name no
    one else can have made first: for a caller that must hold it (write, flock) before
    rename_into_place puts it over path."""
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    return os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), temp


def remove_at(dir_fd: int, name: str) -> bool:
    """Remove name from the folder; False when it was not there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def file_name(key: str) -> str:
    """A file name for a key (a container id, a device name) that cannot leave its folder
    nor be hidden: "%" and "/" escaped, "." and ".." and an empty key refused."""
    if not key or key in (".", ".."):
        raise StateError(f"{key!r}: not a name a record can have")
    return key.replace("%", "%25").replace("/", "%2F")


# Records: JSON with a checksum line before it. The checksum is not a signature (the
# folder's rule keeps others out); it tells a torn or damaged record from a true one.

def encode_record(document: object) -> bytes:
    import zlib

    from cdi_hook import jsonio

    body = (jsonio.dumps(document) + "\n").encode()
    return b"crc32 %08x\n" % zlib.crc32(body) + body


def decode_record(data: bytes, where: str, plain_json: bool = False) -> object:
    """The document of a record's bytes. plain_json: a record with no checksum line is read
    as plain JSON, as cdi-hook wrote records before this layer; see read_record."""
    import zlib

    from cdi_hook import jsonio

    if plain_json and not data.startswith(b"crc32 "):
        try:
            return jsonio.loads(data)
        except ValueError:
            raise StateError(f"{where}: not JSON; refusing to believe it") from None
    head, _, body = data.partition(b"\n")
    if not head.startswith(b"crc32 ") or head[6:] != b"%08x" % zlib.crc32(body):
        raise StateError(f"{where}: its checksum does not hold (a damaged record); refusing to believe it")
    try:
        return jsonio.loads(body)
    except ValueError:
        raise StateError(f"{where}: not JSON; refusing to believe it") from None


def read_record(dir_fd: int, name: str, where: str, max_size: int = MAX_RECORD,
                plain_json: bool = False) -> object | None:
    """The document of a record written by write_record; None when there is none.

    plain_json=True also believes a record without a checksum line (plain JSON, in the same
    private folder, under the same trusted-read rules): records written by the cdi-hook
    before this layer, for containers that still run. An upgrade on a busy node must not
    strand what they describe (an interface moved into a container, a hold, an attached
    device). Those records go with their containers; the next writer writes a checksum."""
    data = read_trusted(dir_fd, name, where, max_size)
    return None if data is None else decode_record(data, where, plain_json)


def write_record(dir_fd: int, name: str, document: object) -> None:
    write_atomic_at(dir_fd, name, encode_record(document))
