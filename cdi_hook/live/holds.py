"""Exclusive devices: one running container at a time holds each (policy `exclusive`).

A device is held by what it is on the host, not by its CDI name: the plan gives each device
its identity keys (plan.py: "c 195:0" for each device-level node, "mount /host/path" for each
device-level bind mount, "name vendor.com/class=name" for a device with neither), so aliases
(`0` and `all` naming one GPU) exclude each other. A hold is a record file per key in
$CDI_HOOK_STATE_DIR (default /run/cdi-hook/held, a private folder (state.py), gone at reboot
like the containers): the holder's container id, its init pid and that process's start
time, the CDI name it was taken under (for messages) and the key. A second container asking
for a device any of whose keys is held is refused with the holder and the name it holds it
as, unless the holder's process is gone (the same pid with another start time is another
process): then the record is stale and replaced. A record with this container's id but
another process is an earlier container's under a reused id: replaced, never inherited.
The hook releases its holds at poststop, and at once when the container fails to start;
detach releases them when everything of the device is gone. All of it happens under an
flock on the dir, so two starts cannot both take one device.

Holds taken before keys existed are files named by the CDI name alone (the "name" key of
that device): they are still honoured, and released as such.
"""

from __future__ import annotations

import fcntl
import os

from cdi_hook import settings
from cdi_hook.containers import process_start_time
from cdi_hook.errors import HookError
from cdi_hook.state import StateError, file_name, open_private_dir, read_record, remove_at, write_record

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

STEP = "exclusive device"


def state_dir() -> str:
    return settings.current().state_dir


def name_key(device: str) -> str:
    """The key of a device held by its name: one with no host identity, or a hold of before keys."""
    return "name " + device


def _record_name(key: str) -> str:
    kind, _, value = key.partition(" ")
    if kind in ("b", "c"):
        return "node-" + kind + "-" + value.replace(":", "-") + ".json"
    if kind == "mount":
        return "mount-" + file_name(value) + ".json"
    # a name: the file of before keys (device names have no "%": the names of before state.py)
    return file_name(value) + ".json"


def _key_of_file(name: str) -> str:
    stem = name[:-len(".json")]
    if stem.startswith("node-"):
        kind, major, minor = stem[len("node-"):].split("-", 2)
        return f"{kind} {major}:{minor}"
    unescaped = stem.replace("%2F", "/").replace("%25", "%")
    return "mount " + unescaped[len("mount-"):] if stem.startswith("mount-") else name_key(unescaped)


def describe(key: str) -> str:
    """A key as a message says it: "host device c 195:0", "host path /dev/shm/x", or ""."""
    kind, _, value = key.partition(" ")
    return {"b": f"host device {key}", "c": f"host device {key}", "mount": f"host path {value}"}.get(kind, "")


class _LockedDir:
    def __enter__(self) -> int:
        try:
            fd = open_private_dir(state_dir(), create=True)
        except StateError as error:  # fail closed: no hold can be kept, so no start
            raise HookError(STEP, "", str(error)) from None
        assert fd is not None  # create=True: made, or StateError
        self.fd = fd
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing drops the flock


def _holder(dir_fd: int, key: str, device: str) -> dict | None:
    """The record of key; None when there is none. HookError (fail closed) for one that is
    not a private file of root's or not whole: a device must not be given twice."""
    name = _record_name(key)
    try:
        # plain_json: holds taken by the cdi-hook before state.py (no checksum line) still
        # hold their devices after an upgrade, until their containers end.
        record = read_record(dir_fd, name, os.path.join(state_dir(), name), 4096, plain_json=True)
    except StateError as error:
        raise HookError(STEP, device, str(error)) from None
    return record if isinstance(record, dict) or record is None else {}


def _alive(record: dict) -> bool:
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and pid > 0 and process_start_time(pid) == start


def _is_process(record: dict, container_id: str, pid: int | None, start: int | None) -> bool:
    """Whether record is this container's: its id, and (when known) its very process."""
    return record.get("container") == container_id and (pid is None or (record.get("pid"), record.get("start"))
                                                         == (pid, start))


def hold(devices: Sequence[tuple[str, Sequence[str]]], container_id: str, pid: int) -> list[str]:
    """Take every device (name, identity keys) for this container's process, all or none;
    the keys newly taken.

    HookError names the device, the container holding it and the name it holds it as.
    """
    if not devices:
        return []
    try:
        return _hold(devices, container_id, pid)
    except OSError as error:
        raise HookError(STEP, ", ".join(d for d, _ in devices),
                        f"keeping the hold in {state_dir()}: {error.strerror}") from None


def _hold(devices: Sequence[tuple[str, Sequence[str]]], container_id: str, pid: int) -> list[str]:
    start = process_start_time(pid)
    taken: list[str] = []
    with _LockedDir() as dir_fd:
        try:
            for device, keys in devices:
                legacy = name_key(device)
                for key in list(keys) + ([legacy] if legacy not in keys else []):
                    holder = _holder(dir_fd, key, device)
                    if holder is not None and _is_process(holder, container_id, pid, start):
                        continue  # this container's own hold (an alias, the hook at two stages)
                    if holder is not None and _alive(holder):
                        what = describe(key)
                        raise HookError(STEP, device, f"held as {holder.get('device') or key.partition(' ')[2]} "
                                                      f"by running container {holder.get('container')!r} "
                                                      f"(pid {holder.get('pid')}{'; ' + what if what else ''}); "
                                                      "the policy makes it exclusive")
                    if key not in keys:
                        continue  # a hold of before keys that is over: left for its poststop
                    # over a stale one, or an earlier container's under this id: replaced
                    write_record(dir_fd, _record_name(key), {"container": container_id, "pid": pid, "start": start,
                                                             "device": device, "key": key})
                    taken.append(key)
        except BaseException:
            _remove(dir_fd, taken, container_id, pid, start)
            raise
    return taken


def release(keys: Iterable[str], container_id: str, pid: int | None = None, start: int | None = None) -> None:
    """Give back this container's holds on keys (another container's are left alone); with
    pid and start, only those of that very process."""
    keys = list(keys)
    if not keys or not os.path.isdir(state_dir()):
        return
    try:
        with _LockedDir() as dir_fd:
            _remove(dir_fd, keys, container_id, pid, start)
    except OSError as error:
        raise HookError(STEP, ", ".join(keys), f"releasing the hold in {state_dir()}: {error.strerror}") from None


def _remove(dir_fd: int, keys: Iterable[str], container_id: str, pid: int | None, start: int | None) -> None:
    for key in keys:
        holder = _holder(dir_fd, key, key)
        if holder is not None and _is_process(holder, container_id, pid, start):
            remove_at(dir_fd, _record_name(key))


def holders() -> dict[str, dict]:
    """Key -> its live holder record (for `cdi-hook explain`); records not believed are
    left out (a hold refuses starts with its own message)."""
    directory = state_dir()
    try:
        dir_fd = open_private_dir(directory)
    except StateError:
        return {}
    if dir_fd is None:
        return {}
    found = {}
    try:
        for name in os.listdir(dir_fd):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    record = read_record(dir_fd, name, os.path.join(directory, name), 4096, plain_json=True)
                    key = _key_of_file(name)
                except (OSError, StateError, ValueError):
                    continue
                if isinstance(record, dict) and _alive(record):
                    found[key] = record
    finally:
        os.close(dir_fd)
    return found
