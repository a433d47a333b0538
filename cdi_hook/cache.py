"""The compiled registry cache: resolve a request without parsing unchanged spec files again.

Only `plan.resolve` (the hook, precreate and inject) uses it, through `select`. `list`, `validate` and
`show` always read the files: they report every per-file error, and a person waits for
them, not a container. A request the cache cannot answer completely (an unknown name, a
conflict, an invalid spec) falls back to a full load, so every error message is the
registry's own and the cache never has to carry errors.

The files stay the truth. The cache is keyed on the cdi-hook code (version, cache format
and the size/mtime of the modules that decide what a spec means), the spec dirs in order,
the trust and size settings, and on what the spec dirs hold, known one of two ways:

* the listing: each dir's own stat (a file added or removed shows there) and each spec
  file's (st_ino, st_dev, size, mtime_ns, ctime_ns), taken at every start. ctime cannot be
  set from user space and moves on every write, chmod, chown and rename, so a changed file
  is seen on the very next start. Timestamps have a granularity (the kernel's coarse
  clock): a file rewritten twice within one tick with the same size would keep its
  signature, so a listing is not recorded while any file or dir changed less than
  FRESH_NS ago; the next start after that records it.
* the generation of a running `cdi-hook watch` (commands/watch.py): it watches the spec
  dirs with inotify and moves the generation on every change it sees, before it rebuilds
  the cache. A cache records the generation read before its listing was taken; while the
  watcher is healthy (it holds an flock on the generation file and its heartbeat, the
  file's mtime, is at most HEARTBEAT_TIMEOUT_NS old) and the generation is still that one,
  nothing has changed since: a start reads the generation (one small file) instead of
  stat()ing every spec file. Without a healthy watcher, the listing decides, as above.

Trust: the cache says what gets mounted into containers, so it must be as trusted as the
specs themselves: it is read only when the reader is root, and the directory and the file
are private to root (state.py's one rule: root's, nobody else may read or write, no
symlink). The generation file is held to the same rule. Anything else, or any error while
reading, means "no cache": rebuilt from the files and written again (state.write_atomic,
not durable: a cache lost to a crash is rebuilt). Non-root callers never read or write it.

Format: marshal only, no pickle. A spec is stored as plain data (a model record as a
list [class number, field values...], tuples and scalars as themselves) and rebuilt by
calling the model's own constructors from a fixed list: loading can never run code or
make an object of another class, and it skips pickle's import (~1 ms) too. Rebuilding
the requested spec this way is far cheaper than parsing and validating it again.

Layout, so a start reads only what the request needs (O(1) in the spec files and devices
not asked for):
    MAGIC | meta length (8 bytes LE) | meta | listing | specs | buckets | table
meta = (key, generation, listing part, table part, bucket count), each part (offset,
length, crc32), offsets counting from the end of the meta; the table holds, per bucket,
(offset, length, crc32) as three int64; a bucket maps the qualified names whose crc32
falls in it to (offset, length, crc32, device index) of their winning spec. A hit costs
the meta, one table entry, one bucket and the requested specs, plus either the listing
(and a stat per spec file) or, with a healthy watcher, the generation file.
"""

from __future__ import annotations

import marshal
import os
import time
import zlib
from array import array

from cdi_hook import __version__
from cdi_hook import state
from cdi_hook.settings import Settings
from cdi_hook.settings import current as current_settings

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import ModuleType
    from typing import Any

    from cdi_hook.registry import Registry, Selection
    from cdi_hook.spec.model import Device, Spec

CACHE_FORMAT = 5  # bump when the layout below changes
MAGIC = b"CDIHKC%02d" % CACHE_FORMAT
MAX_CACHE = 1 << 40  # read at offsets, never whole: no bound but the file system's
FRESH_NS = 2_000_000_000  # files changed more recently than this are not cached yet
NAMES_PER_BUCKET = 32
# What the registry reads (spec.parse.SPEC_SUFFIXES, not imported: parse is not needed on
# a hit; tests/test_cache.py holds the two equal).
SPEC_SUFFIXES = (".json", ".yaml", ".yml")

# The watcher's generation file (see the module docstring and commands/watch.py).
GENERATION_MAGIC = b"CDIHKG01"
HEARTBEAT_NS = 1_000_000_000  # the watcher touches the file this often
HEARTBEAT_TIMEOUT_NS = 5_000_000_000  # a file older than this: the watcher is stuck, not trusted

# Modules whose code decides what a spec file resolves to: a change to any of them (an
# upgrade, a developer's edit) must not meet a cache built by the old code.
_CODE_MODULES = ("cache.py", "registry.py", "spec/model.py", "spec/parse.py",
                 "spec/validate.py", "spec/names.py", "spec/version.py", "spec/rules.py")


def cache_dir(settings: Settings | None = None) -> str | None:
    """$CDI_HOOK_CACHE_DIR or /run/cdi-hook; None (no cache) for a relative path, which
    would depend on the directory the runtime happens to start the hook in."""
    return (settings or current_settings()).cache_dir


def select(names: Iterable[str], spec_dirs: Iterable[str] | None = None) -> Selection:
    """Registry.load(spec_dirs).select(names), answered from the cache when it is valid and
    covers every name: the same Selection, the same errors."""
    from cdi_hook import registry

    wanted = list(dict.fromkeys(names))
    if os.geteuid() != 0 or cache_dir() is None:
        return registry.Registry.load(spec_dirs).select(wanted)
    dirs = spec_dir_tuple(spec_dirs)
    try:
        key = _key(dirs, registry)
    except Exception:  # a broken install (a module missing): no cache, just the files
        return registry.Registry.load(spec_dirs).select(wanted)
    path = cache_path(key)
    # Read before the listing is taken: a change after this point moves the generation (or
    # the listing), so a cache recorded with both can be too old (rebuilt), never wrong.
    generation = watched_generation(dirs)
    found = lookup(path, key, None, wanted, generation) if generation is not None else None
    listing = None
    if found is None:
        try:
            listing = snapshot(dirs)
        except Exception:  # an inode number past int64 (no cache then, just the files)
            return registry.Registry.load(spec_dirs).select(wanted)
        found = lookup(path, key, listing, wanted)
    if found is not None:
        return registry.select(wanted, found)
    loaded = registry.Registry.load(spec_dirs)
    settled = is_settled(listing)
    if settled or generation is not None:
        write(path, key, listing if settled else None, loaded, generation)
    return loaded.select(wanted)


def spec_dir_tuple(spec_dirs: Iterable[str] | None) -> tuple[str, ...]:
    from cdi_hook import registry

    return tuple(registry.DEFAULT_SPEC_DIRS if spec_dirs is None else spec_dirs)


def _key(dirs: tuple[str, ...], registry: ModuleType, settings: Settings | None = None) -> tuple:
    """What the answer depends on besides the files: the code, the dirs and the settings
    the registry reads (trust, size limit)."""
    settings = settings or current_settings()
    here = os.path.dirname(os.path.abspath(__file__))
    code = []
    for name in _CODE_MODULES:
        st = os.stat(os.path.join(here, name))
        code.append((name, st.st_size, st.st_mtime_ns))
    require_trusted = not registry.insecure_specs_allowed(None, settings)
    return (CACHE_FORMAT, __version__, tuple(code), dirs, require_trusted, settings.max_spec_size)


def cache_path(key: tuple, settings: Settings | None = None) -> str:
    """One file per configuration (dirs, trust, size limit), so two set-ups never fight."""
    tag = zlib.crc32(repr(key[3:]).encode())
    directory = cache_dir(settings)
    assert directory is not None  # callers check cache_dir() first
    return os.path.join(directory, f"registry-{tag:08x}.cache")


# ---------------------------------------------------------------------------------------
# What the spec dirs look like now


def snapshot(dirs: Iterable[str]) -> tuple:
    """Per dir: (dir, its stat signature, spec file names, their stat signatures).

    The per-file part is the hot loop at 10,000 files, so it is kept flat: the names as
    one NUL-joined string and the signatures in an array of int64 (ino, dev, size,
    mtime_ns, ctime_ns per file; ino -1 and the errno for a file stat refused), compared
    as bytes with the cached ones. listdir's order is kept (stable while a dir is
    unchanged): a different order only means a rebuild, never a wrong answer.
    """
    listing: list[tuple[str, tuple, str, bytes]] = []
    for spec_dir in dirs:
        try:
            fd = os.open(spec_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            listing.append((spec_dir, ("error", error.errno), "", b""))
            continue
        try:
            st = os.fstat(fd)
            dir_sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid, st.st_gid)
            names = [n for n in os.listdir(fd) if n.endswith(SPEC_SUFFIXES)]
            sigs = array("q")
            for name in names:
                try:
                    st = os.stat(name, dir_fd=fd)  # follows symlinks, as reading the spec does
                except OSError as error:
                    sigs.extend((-1, error.errno, 0, 0, 0))  # type: ignore[arg-type]  # os.stat's OSError has one
                    continue
                sigs.extend((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except OSError as error:
            listing.append((spec_dir, ("error", error.errno), "", b""))
            continue
        finally:
            os.close(fd)
        listing.append((spec_dir, dir_sig, "\0".join(names), sigs.tobytes()))
    return tuple(listing)


def is_settled(listing: tuple | None, now_ns: int | None = None) -> bool:
    """No dir or file changed within FRESH_NS: a later change is sure to move a timestamp."""
    if listing is None:
        return False
    newest = 0
    for _, dir_sig, _, sigs in listing:
        if dir_sig[0] != "error":
            newest = max(newest, dir_sig[2], dir_sig[3])
        values = array("q", sigs)
        newest = max(newest, max(values[3::5], default=0), max(values[4::5], default=0))
    return (time.time_ns() if now_ns is None else now_ns) - newest >= FRESH_NS


# ---------------------------------------------------------------------------------------
# The watcher's generation


def generation_path(dirs: tuple[str, ...], settings: Settings | None = None) -> str | None:
    """The generation file of a watcher of these spec dirs (None: no cache dir)."""
    directory = cache_dir(settings)
    if directory is None:
        return None
    return os.path.join(directory, f"watch-{zlib.crc32(repr(tuple(dirs)).encode()):08x}.generation")


def watched_generation(dirs: tuple[str, ...], now_ns: int | None = None,
                       settings: Settings | None = None) -> bytes | None:
    """The generation of a healthy watcher of exactly these dirs, else None.

    Healthy: the file is root-only and regular, its content names these dirs, the watcher
    holds its exclusive flock (the kernel drops it when the process dies, however it dies),
    and its heartbeat (mtime) is at most HEARTBEAT_TIMEOUT_NS old (a stopped or stuck
    watcher sees no changes). Five syscalls, whatever the number of spec files.
    """
    path = generation_path(dirs, settings)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not state.is_private_file(st):
            return None
        if (time.time_ns() if now_ns is None else now_ns) - st.st_mtime_ns > HEARTBEAT_TIMEOUT_NS:
            return None
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # the watcher holds it: alive
        else:
            return None  # nobody holds it: the watcher is gone (our shared lock goes with the fd)
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if data[:8] != GENERATION_MAGIC:
        return None
    try:
        watched_dirs, generation = marshal.loads(data[8:])
    except Exception:  # torn or foreign content: no trust
        return None
    # All zero: the watcher saw a change and has not vouched for the files again yet.
    return generation if watched_dirs == tuple(dirs) and type(generation) is bytes and any(generation) else None


def generation_content(dirs: tuple[str, ...], generation: bytes) -> bytes:
    """What the watcher writes into its generation file (fixed size per set of dirs, so a
    rewrite in place never leaves a tail behind)."""
    return GENERATION_MAGIC + marshal.dumps((tuple(dirs), generation))


# ---------------------------------------------------------------------------------------
# Reading


def lookup(path: str, key: tuple, listing: tuple | None, wanted: list[str],
           generation: bytes | None = None) -> dict[str, tuple[Spec, Device]] | None:
    """{name: (Spec, Device)} for every wanted name from a valid cache, else None. Valid:
    the key matches, and the generation (when given) or else the listing is the recorded one."""
    try:
        fd = _open_trusted(path)
    except OSError:
        return None
    try:
        return _lookup(fd, key, listing, wanted, generation)
    except Exception:  # corrupt or foreign content: never fail a start over a cache
        return None
    finally:
        os.close(fd)


def _open_trusted(path: str) -> int:
    """An fd of the cache file at path, its folder and itself held to the state layer's
    rules; OSError (read as "no cache") for anything else."""
    directory, name = os.path.split(path)
    try:
        dir_fd = state.open_private_dir(directory)
        if dir_fd is None:
            raise FileNotFoundError(directory)
        try:
            fd = state.open_trusted(dir_fd, name, path, MAX_CACHE)
        finally:
            os.close(dir_fd)
    except state.StateError as error:
        raise PermissionError(str(error)) from None
    if fd is None:
        raise FileNotFoundError(path)
    return fd


def _lookup(fd: int, key: tuple, listing: tuple | None, wanted: list[str],
            generation: bytes | None) -> dict[str, tuple[Spec, Device]] | None:
    header = os.pread(fd, 16, 0)
    if header[:8] != MAGIC:
        return None
    meta_len = int.from_bytes(header[8:16], "little")
    meta = os.pread(fd, meta_len, 16)
    if len(meta) != meta_len:
        return None
    cached_key, cached_generation, listing_part, table_part, bucket_count = marshal.loads(meta)
    if cached_key != key:
        return None
    base = 16 + meta_len
    if generation is not None:
        if cached_generation != generation:
            return None
    elif listing_part is None or marshal.loads(_pread(fd, base, *listing_part)) != listing:
        return None
    table_offset, _, _ = table_part
    found: dict[str, tuple[Spec, Device]] = {}
    specs: dict[int, Any] = {}
    for name in wanted:
        entry = array("q", _pread(fd, base, table_offset + 24 * (zlib.crc32(name.encode()) % bucket_count), 24, None))
        entry = marshal.loads(_pread(fd, base, *entry)).get(name)
        if entry is None:
            return None
        spec_offset, spec_length, spec_crc, device_index = entry
        spec = specs.get(spec_offset)
        if spec is None:
            spec = specs[spec_offset] = decode(marshal.loads(_pread(fd, base, spec_offset, spec_length, spec_crc)))
            if type(spec) is not _model_classes()[0]:
                return None
        found[name] = (spec, spec.devices[device_index])
    return found


def _pread(fd: int, base: int, offset: int, length: int, crc: int | None) -> bytes:
    """A part of the file, checked: the meta's key proves the file is ours and current, the
    CRCs that the parts it points to were not damaged since (a disk error, a stray write).
    A table entry (crc None) is checked by the CRC of the bucket it points to."""
    data = os.pread(fd, length, base + offset)
    if len(data) != length or (crc is not None and zlib.crc32(data) != crc):
        raise ValueError("cache file damaged")
    return data


# ---------------------------------------------------------------------------------------
# Writing


def write(path: str, key: tuple, listing: tuple | None, registry: Registry, generation: bytes | None = None) -> bool:
    """Write the cache for a loaded registry atomically; False (and no file) when it cannot.
    listing None: valid only while the watcher's generation is still `generation`."""
    if os.geteuid() != 0:
        return False
    try:
        state.ensure_private_dir(os.path.dirname(path))
        data = encode(key, listing, registry, generation)
    except (OSError, ValueError, state.StateError):
        return False
    return _write_private(path, data)


def _write_private(path: str, data: bytes) -> bool:
    """Write a root-only 0600 file atomically; False when it cannot (a cache is best effort).
    Not durable: a cache lost to a crash is rebuilt by the next start."""
    try:
        state.write_atomic(path, data, durable=False)
    except OSError:
        return False
    return True


def encode(key: tuple, listing: tuple | None, registry: Registry, generation: bytes | None = None) -> bytes:
    spec_blobs: list[bytes] = []
    spec_index: dict[int, int] = {}  # id(spec) -> blob number
    entries: dict[str, tuple[int, int]] = {}  # name -> (blob number, device index)
    for name, (spec, device) in registry.devices.items():
        if id(spec) not in spec_index:
            spec_index[id(spec)] = len(spec_blobs)
            spec_blobs.append(marshal.dumps(plain(spec)))
        device_index = next(i for i, d in enumerate(spec.devices) if d is device)
        entries[name] = (spec_index[id(spec)], device_index)

    bucket_count = max(1, len(entries) // NAMES_PER_BUCKET)
    bucket_names: list[list[str]] = [[] for _ in range(bucket_count)]
    for name in entries:
        bucket_names[zlib.crc32(name.encode()) % bucket_count].append(name)

    # Offsets count from the end of the meta, so the meta can hold them without depending
    # on its own length: the listing, the specs, the buckets, then the table.
    listing_blob = marshal.dumps(listing) if listing is not None else b""
    listing_part = (0, len(listing_blob), zlib.crc32(listing_blob)) if listing is not None else None
    position = len(listing_blob)
    blob_offsets = []
    blob_crcs = [zlib.crc32(blob) for blob in spec_blobs]
    for blob in spec_blobs:
        blob_offsets.append(position)
        position += len(blob)
    buckets, table = [], array("q")
    for names in bucket_names:
        encoded = marshal.dumps({n: (blob_offsets[blob], len(spec_blobs[blob]), blob_crcs[blob], device_index)
                                 for n in names for blob, device_index in [entries[n]]})
        buckets.append(encoded)
        table.extend((position, len(encoded), zlib.crc32(encoded)))
        position += len(encoded)
    table_blob = table.tobytes()
    table_part = (position, len(table_blob), zlib.crc32(table_blob))
    meta = marshal.dumps((key, generation, listing_part, table_part, bucket_count))
    return b"".join([MAGIC, len(meta).to_bytes(8, "little"), meta, listing_blob, *spec_blobs, *buckets, table_blob])


# ---------------------------------------------------------------------------------------
# Model objects <-> plain data


_CLASSES: tuple = ()


def _model_classes() -> tuple:
    """The only classes a cache can make, in a fixed order (their number in the file)."""
    global _CLASSES
    if not _CLASSES:
        from cdi_hook.spec import model

        _CLASSES = (model.Spec, model.Device, model.ContainerEdits, model.DeviceNode, model.Mount, model.Hook,
                    model.IntelRdt, model.NetDevice)
    return _CLASSES


def plain(value: Any) -> Any:
    """A model object as marshal-able data: [class number, field values...]; tuples stay tuples."""
    classes = _model_classes()
    if type(value) in classes:  # before the tuple case: model records are namedtuples
        return [classes.index(type(value))] + [plain(item) for item in value]
    if type(value) is tuple:
        return tuple(plain(item) for item in value)
    if value is None or type(value) in (str, int, bool):
        return value
    raise ValueError(f"cannot cache a {type(value).__name__}")


def decode(data: Any) -> Any:
    """plain()'s inverse, through the model's constructors. Scalars (most of the items) are
    taken as they are without a call: this runs for every field of every requested spec."""
    if type(data) is list:
        return _model_classes()[data[0]](*[decode(item) if type(item) in _NESTED else item for item in data[1:]])
    if type(data) is tuple:
        return tuple([decode(item) if type(item) in _NESTED else item for item in data])
    return data


_NESTED = (list, tuple)


# ---------------------------------------------------------------------------------------
# The policy file (policy.py), compiled the same way: a start with an unchanged policy
# reads marshal data instead of importing a YAML parser.

_POLICY_MODULES = ("cache.py", "policy.py", "attribution.py", "spec/names.py")


def _policy_cache_path(signature: tuple, settings: Settings | None = None) -> str:
    directory = cache_dir(settings)
    assert directory is not None  # callers check cache_dir() first
    return os.path.join(directory, f"policy-{zlib.crc32(signature[0].encode()):08x}.cache")


def _policy_key(signature: tuple) -> tuple:
    here = os.path.dirname(os.path.abspath(__file__))
    code = tuple((name, os.stat(os.path.join(here, name)).st_size, os.stat(os.path.join(here, name)).st_mtime_ns)
                 for name in _POLICY_MODULES)
    return (CACHE_FORMAT, __version__, code, signature)


def load_policy(signature: tuple, settings: Settings | None = None) -> Any:
    """The compiled policy (plain tuples: policy.py rebuilds it) for a file with this stat
    signature, or None."""
    if os.geteuid() != 0 or cache_dir(settings) is None:
        return None
    try:
        fd = _open_trusted(_policy_cache_path(signature, settings))
    except OSError:
        return None
    try:
        data = os.pread(fd, 1 << 20, 0)
        if data[:8] != b"CDIHKP%02d" % CACHE_FORMAT:
            return None
        key, plain_policy = marshal.loads(data[8:])
        return plain_policy if key == _policy_key(signature) else None
    except Exception:  # corrupt or foreign: read the file instead
        return None
    finally:
        os.close(fd)


def store_policy(signature: tuple, plain_policy: tuple, st: os.stat_result,
                 settings: Settings | None = None) -> bool:
    """Keep the compiled policy, unless the file changed within FRESH_NS (timestamp granularity)."""
    if os.geteuid() != 0 or cache_dir(settings) is None:
        return False
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < FRESH_NS:
        return False
    path = _policy_cache_path(signature, settings)
    try:
        state.ensure_private_dir(os.path.dirname(path))
        data = b"CDIHKP%02d" % CACHE_FORMAT + marshal.dumps((_policy_key(signature), plain_policy))
    except (OSError, ValueError, state.StateError):
        return False
    return _write_private(path, data)
