"""The OCI state a runtime hands a hook on stdin, and the bundle's config.json (read side).

Only what the hook needs is extracted, each piece validated, every problem a CdiError
naming the field. Unknown keys are accepted: runtimes add their own (crun adds `root`).
"""

from __future__ import annotations

import os
from collections import namedtuple
from itertools import accumulate

from cdi_hook import jsonio
from cdi_hook.errors import CdiError, printable

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import Literal, overload

MAX_STATE_SIZE = 1 << 20
MAX_CONFIG_SIZE = 16 << 20
# Real states and config.json files nest 6 levels at most (linux.seccomp.syscalls[].args[]).
# Python's json recurses once per level and fails with a RecursionError traceback near
# 1,000; the editors (deepcopy, json.dumps) recurse again. 64 leaves room for runtimes'
# own extensions and keeps every later step far from that limit.
MAX_JSON_DEPTH = 64

# The depth pre-scan: strings removed (brackets inside them are data), then every byte but
# brackets, which become +1 / -1 (as signed bytes): the running sum is the nesting depth.
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")

# Records are namedtuples, as in spec/model.py: no dataclasses import on the hot path.
# The {} defaults are shared between instances; nothing mutates a State's or a Config's dicts.

State = namedtuple(
    "State",
    # pid: absent (or 0) once the container is gone, e.g. at poststop; root: crun's extra
    # key, the rootfs path; raw: exactly what came on stdin, handed on to the spec's hooks
    ["id", "bundle", "pid", "status", "annotations", "root", "raw"],
    defaults=(None, "", {}, None, b""),
)

IdMapping = namedtuple("IdMapping", ["container_id", "host_id", "size"])

Config = namedtuple(
    "Config",
    # rootfs: absolute; uid/gid_mappings: tuples of IdMapping; raw: the whole config.json document
    ["path", "rootfs", "annotations", "user_namespace", "uid_mappings", "gid_mappings", "process_uid",
     "process_gid", "raw"],
    defaults=({}, False, (), (), 0, 0, {}),
)


def json_object(data: bytes, where: str, max_size: int) -> dict:
    """data as a JSON object, or one CdiError line naming where it came from."""
    if len(data) > max_size:
        raise CdiError(f"{where}: larger than {max_size} bytes")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise CdiError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        doc = jsonio.loads(data)  # json.loads without importing json (and re, enum): see jsonio
    except (ValueError, UnicodeDecodeError) as error:
        raise CdiError(f"{where}: not valid JSON ({printable(error, 200)})") from None
    except RecursionError:  # the pre-scan should have caught it; never a traceback
        raise CdiError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(doc, dict):
        raise CdiError(f"{where}: not a JSON object")
    return doc


def json_depth(data: bytes) -> int:
    """How deep the arrays and objects of JSON data nest, counted before parsing it: mostly
    at C speed (split, translate, accumulate), ~0.1 ms for a config.json of 10 KB.

    Split at the quotes, every other piece is inside a string; an escaped quote (after an
    odd number of backslashes inside a string) does not end one. A string left open at the
    end is not counted: the parser refuses the document anyway, without nesting into it.
    """
    pieces = data.split(b'"')
    outside = pieces[0::2] if b"\\" not in data else _outside_strings(pieces)
    skeleton = b"".join(outside).translate(_DEPTH_STEP, _NOT_BRACKET)
    return max(accumulate(memoryview(skeleton).cast("b")), default=0)


def _outside_strings(pieces: list[bytes]) -> list[bytes]:
    outside = [pieces[0]]
    string = None  # the piece of the open string before the last quote, None outside a string
    for piece in pieces[1:]:
        if string is None:
            string = piece  # this quote opened a string
        elif (len(string) - len(string.rstrip(b"\\"))) % 2:
            string = piece  # an escaped quote: the string goes on
        else:
            outside.append(piece)  # this quote closed it
            string = None
    return outside


def parse_state(data: bytes) -> State:
    where = "OCI state on stdin"
    doc = json_object(data, where, MAX_STATE_SIZE)
    container_id = _string(doc, "id", where, required=True)
    bundle = _string(doc, "bundle", where, required=True)
    if not os.path.isabs(bundle):
        raise CdiError(f"{where}: bundle: must be an absolute path, got {_shown(bundle)}")
    pid = doc.get("pid")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 0):
        raise CdiError(f"{where}: pid: must be a non-negative integer, got {_shown(pid)}")
    return State(
        id=container_id,
        bundle=bundle,
        pid=pid or None,
        status=_string(doc, "status", where) or "",
        annotations=_annotations(doc, where),
        root=_string(doc, "root", where),
        raw=bytes(data),
    )


def read_config(bundle: str) -> Config:
    path = os.path.join(bundle, "config.json")
    _, doc = read_config_file(path)
    return parse_config(doc, bundle, path)


def read_config_file(path: str) -> tuple[bytes, dict]:
    """(the bytes, the JSON object) of a config.json; one CdiError line naming it otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise CdiError(f"{path}: cannot read: no such file") from None
    except OSError as error:
        raise CdiError(f"{path}: cannot read: {error.strerror}") from None
    return data, json_object(data, path, MAX_CONFIG_SIZE)


def parse_config(doc: dict, bundle: str, path: str) -> Config:
    root = doc.get("root")
    if not isinstance(root, dict):
        raise CdiError(f"{path}: root: missing or not an object")
    rootfs = _string(root, "path", f"{path}: root", required=True)
    rootfs = os.path.normpath(os.path.join(bundle, rootfs))
    linux = _object(doc, "linux", path)
    namespaces = linux.get("namespaces", [])
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise CdiError(f"{path}: linux.namespaces: must be a list of objects")
    user = _object(_object(doc, "process", path), "user", f"{path}: process")
    return Config(
        path=path,
        rootfs=rootfs,
        annotations=_annotations(doc, path),
        user_namespace=any(n.get("type") == "user" for n in namespaces),
        uid_mappings=_mappings(linux, "uidMappings", path),
        gid_mappings=_mappings(linux, "gidMappings", path),
        process_uid=_uint(user, "uid", f"{path}: process.user"),
        process_gid=_uint(user, "gid", f"{path}: process.user"),
        raw=doc,
    )


if TYPE_CHECKING:
    @overload
    def _string(doc: dict, key: str, where: str, required: Literal[True]) -> str: ...
    @overload
    def _string(doc: dict, key: str, where: str, required: bool = False) -> str | None: ...


def _string(doc: dict, key: str, where: str, required: bool = False) -> str | None:
    value = doc.get(key)
    if value is None:
        if required:
            raise CdiError(f"{where}: {key}: missing")
        return None
    if not isinstance(value, str) or (required and not value):
        raise CdiError(f"{where}: {key}: must be a non-empty string, got {_shown(value)}")
    return value


def _shown(value: object) -> str:
    """A bad value in an error: its repr, short (a 1 MB string is not worth echoing)."""
    return printable(repr(value), 80)


def _object(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CdiError(f"{where}: {key}: must be an object")
    return value


def _uint(doc: dict, key: str, where: str) -> int:
    value = doc.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CdiError(f"{where}: {key}: must be a non-negative integer, got {_shown(value)}")
    return value


def _annotations(doc: dict, where: str) -> dict[str, str]:
    value = doc.get("annotations")
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CdiError(f"{where}: annotations: must be an object of strings")
    return value


def _mappings(linux: dict, key: str, path: str) -> tuple[IdMapping, ...]:
    value = linux.get(key, [])
    if not isinstance(value, list):
        raise CdiError(f"{path}: linux.{key}: must be a list")
    mappings = []
    for i, item in enumerate(value):
        where = f"{path}: linux.{key}[{i}]"
        if not isinstance(item, dict):
            raise CdiError(f"{where}: must be an object")
        mappings.append(IdMapping(_uint(item, "containerID", where), _uint(item, "hostID", where),
                                  _uint(item, "size", where)))
    return tuple(mappings)


def check_container_process(pid: int, rootfs: str) -> int:
    """Refuse a state whose pid is not a process of the container this config.json describes;
    return a pidfd of that very process (the caller closes it).

    Every later step acts on /proc/<pid> (its mount namespace, its cgroup, its network
    namespace), so a dead pid, a host process or another container's process must be refused
    before anything changes. A container process is in its own mount namespace, and from its
    root the bundle's rootfs is the same inode the host sees: /proc/<pid>/root is the rootfs
    itself once the runtime pivoted, or holds it at the host path before (runc and crun run
    createRuntime/prestart hooks before pivot_root).

    The pidfd is opened before the checks and the process is seen alive through it after
    them: so the checks looked at the process the pidfd holds, not at a process that reused
    a dead one's number, and the worker enters the namespace through the pidfd, not the number.
    """
    where = f"OCI state on stdin: pid {pid}"
    try:
        pidfd = os.pidfd_open(pid)
        proc_fd = os.open(f"/proc/{pid}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise CdiError(f"{where}: no such process (the container is gone or the state is stale)") from None
    try:
        _check_process_root(proc_fd, rootfs, where)
        if _has_exited(pidfd):  # still the process we checked
            raise ProcessLookupError(pid)
    except ProcessLookupError:
        os.close(pidfd)
        raise CdiError(f"{where}: the process ended while cdi-hook checked it") from None
    except BaseException:
        os.close(pidfd)
        raise
    finally:
        os.close(proc_fd)
    return pidfd


def _has_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (pidfd_open(2)). select.poll, not
    signal.pidfd_send_signal: the signal module imports enum (~7 ms of a hook start)."""
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _check_process_root(proc_fd: int, rootfs: str, where: str) -> None:
    try:
        theirs = os.stat("ns/mnt", dir_fd=proc_fd)
        ours = os.stat("/proc/self/ns/mnt")
        host_rootfs = os.stat(rootfs)
    except OSError as error:
        raise CdiError(f"{where}: cannot inspect ({error.strerror}: {error.filename})") from None
    if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
        raise CdiError(f"{where}: shares the hook's mount namespace, so it is no container process")
    wanted = (host_rootfs.st_dev, host_rootfs.st_ino)
    for seen_as in ("root", "root" + rootfs):
        try:
            st = os.stat(seen_as, dir_fd=proc_fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == wanted:
            return
    raise CdiError(f"{where}: its root holds no {rootfs} (config.json root.path), "
                   "so it is not this container's process")
