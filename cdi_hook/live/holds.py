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

A shareable device (its spec's io.github.cdi-hook.shared annotation: N, spec/rules.py) may
be held by N running containers at once: its holds are N slots per key, slot 0 the file
above and slot i the same name with "%slotI" before ".json" (a '%' that file_name never
leaves unescaped, so no other key's file can look like a slot). The N+1th container is
refused naming the holders; a slot whose holder is gone is taken over like a stale hold.
"""

from __future__ import annotations

import fcntl
import os

from cdi_hook import settings
from cdi_hook.containers import process_start_time
from cdi_hook.errors import HookError, listed
from cdi_hook.spec.rules import SHARED_ANNOTATION
from cdi_hook.state import StateError, file_name, open_private_dir, read_record, remove_at, write_record

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

STEP = "exclusive device"


def state_dir() -> str:
    return settings.current().state_dir


def name_key(device: str) -> str:
    """The key of a device held by its name: one with no host identity, or a hold of before keys."""
    return "name " + device


SLOT_MARK = "%slot"


def _record_name(key: str, slot: int = 0) -> str:
    name = _slot0_name(key)
    return name if not slot else f"{name[:-len('.json')]}{SLOT_MARK}{slot}.json"


def _slot0_name(key: str) -> str:
    kind, _, value = key.partition(" ")
    if kind in ("b", "c"):
        return "node-" + kind + "-" + value.replace(":", "-") + ".json"
    if kind == "mount":
        return "mount-" + file_name(value) + ".json"
    # a name: the file of before keys (device names have no "%": the names of before state.py)
    return file_name(value) + ".json"


def _key_of_file(name: str) -> str:
    stem = name[:-len(".json")]
    mark = stem.rfind(SLOT_MARK)
    if mark >= 0 and stem[mark + len(SLOT_MARK):].isdigit():
        stem = stem[:mark]
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


def _slots(dir_fd: int, key: str, capacity: int) -> list[int]:
    """The slots of key that have a file, and every slot below capacity."""
    prefix = _record_name(key)[:-len(".json")] + SLOT_MARK
    found = set(range(capacity))
    for name in os.listdir(dir_fd):
        number = name[len(prefix):-len(".json")] if name.startswith(prefix) and name.endswith(".json") else ""
        if number.isdigit():
            found.add(int(number))
    return sorted(found)


def _holder(dir_fd: int, key: str, device: str, slot: int = 0) -> dict | None:
    """The record of key's slot; None when there is none. HookError (fail closed) for one
    that is not a private file of root's or not whole: a device must not be given twice."""
    name = _record_name(key, slot)
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


def hold(devices: Sequence[tuple[str, Sequence[str]]], container_id: str, pid: int,
         capacities: Mapping[str, int] | None = None) -> list[str]:
    """Take every device (name, identity keys) for this container's process, all or none;
    the keys newly taken. capacities: device -> how many containers may hold it at once
    (its spec's share count; 1 when not given).

    HookError names the device, the container(s) holding it and the name it is held as.
    """
    if not devices:
        return []
    try:
        return _hold(devices, container_id, pid, capacities or {})
    except OSError as error:
        raise HookError(STEP, ", ".join(d for d, _ in devices),
                        f"keeping the hold in {state_dir()}: {error.strerror}") from None


def _hold(devices: Sequence[tuple[str, Sequence[str]]], container_id: str, pid: int,
          capacities: Mapping[str, int]) -> list[str]:
    start = process_start_time(pid)
    taken: list[str] = []
    with _LockedDir() as dir_fd:
        try:
            for device, keys in devices:
                capacity = max(1, capacities.get(device, 1))
                legacy = name_key(device)
                for key in list(keys) + ([legacy] if legacy not in keys else []):
                    free, alive = _free_slot(dir_fd, key, device, capacity, (container_id, pid, start))
                    if free is None and not alive:
                        continue  # this container's own hold (an alias, the hook at two stages)
                    if free is None:
                        raise HookError(STEP, device, _refusal(key, alive, capacity, device in capacities))
                    if key not in keys:
                        continue  # a hold of before keys that is over: left for its poststop
                    # over a stale one, or an earlier container's under this id: replaced
                    write_record(dir_fd, _record_name(key, free), {"container": container_id, "pid": pid,
                                                                   "start": start, "device": device, "key": key})
                    taken.append(key)
        except BaseException:
            _remove(dir_fd, taken, container_id, pid, start)
            raise
    return taken


def _free_slot(dir_fd: int, key: str, device: str, capacity: int,
               process: tuple[str, int, int | None]) -> tuple[int | None, list[dict]]:
    """(a slot of key this process may take, or None; the live holders of key).
    None with no holders: the process holds key already. A slot at or past capacity is
    only ever one a larger count made earlier: its holder counts, the slot is not taken."""
    alive, free = [], None
    for slot in _slots(dir_fd, key, capacity):
        holder = _holder(dir_fd, key, device, slot)
        if holder is not None and _is_process(holder, *process):
            return None, []
        if holder is not None and _alive(holder):
            alive.append(holder)
        elif free is None and slot < capacity:
            free = slot
    return (free if len(alive) < capacity else None), alive


def _refusal(key: str, alive: list[dict], capacity: int, spec_count: bool) -> str:
    what = describe(key)
    first = alive[0]
    if capacity == 1:
        why = f"its spec says one container at a time ({SHARED_ANNOTATION})" if spec_count else \
            "the policy makes it exclusive"
        return (f"held as {first.get('device') or key.partition(' ')[2]} by running container "
                f"{first.get('container')!r} (pid {first.get('pid')}{'; ' + what if what else ''}); {why}")
    holders = listed(f"{h.get('container')!r} (pid {h.get('pid')})" for h in alive)
    return (f"all {capacity} shares are held, as {first.get('device') or key.partition(' ')[2]}, by running "
            f"containers {holders}{'; ' + what if what else ''}; its spec shares it among {capacity} "
            f"({SHARED_ANNOTATION})")


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
        for slot in _slots(dir_fd, key, 1):
            holder = _holder(dir_fd, key, key, slot)
            if holder is not None and _is_process(holder, container_id, pid, start):
                remove_at(dir_fd, _record_name(key, slot))


def holders() -> list[tuple[str, dict]]:
    """(key, its live holder record) for every hold, a shared device's once per holder
    (for `cdi-hook explain`); records not believed are left out (a hold refuses starts
    with its own message)."""
    directory = state_dir()
    try:
        dir_fd = open_private_dir(directory)
    except StateError:
        return []
    if dir_fd is None:
        return []
    found = []
    try:
        for name in os.listdir(dir_fd):
            if name.endswith(".json") and not name.startswith("."):
                try:
                    record = read_record(dir_fd, name, os.path.join(directory, name), 4096, plain_json=True)
                    key = _key_of_file(name)
                except (OSError, StateError, ValueError):
                    continue
                if isinstance(record, dict) and _alive(record):
                    found.append((key, record))
    finally:
        os.close(dir_fd)
    return found
