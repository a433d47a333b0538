"""Exclusive devices: one running container at a time holds each (policy `exclusive`).

A hold is a record file per device in $CDI_HOOK_STATE_DIR (default /run/cdi-hook/held, a
private folder (state.py), gone at reboot like the containers): the holder's container id, its init
pid and that process's start time. A second container asking for the device is refused
with the holder's id, unless the holder's process is gone (the same pid with another start
time is another process): then the record is stale and taken over. The hook releases its
holds at poststop, and at once when the container fails to start. All of it happens under
an flock on the dir, so two starts cannot both take one device.
"""

from __future__ import annotations

import fcntl
import os

from cdi_hook import settings
from cdi_hook.containers import process_start_time
from cdi_hook.errors import HookError
from cdi_hook.state import StateError, file_name, open_private_dir, read_record, remove_at, write_record

STEP = "exclusive device"


def state_dir() -> str:
    return settings.current().state_dir


def _record_name(device: str) -> str:
    return file_name(device) + ".json"  # device names have no "%": the names of before state.py


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


def _holder(dir_fd: int, name: str) -> dict | None:
    """The record of name; None when there is none. HookError (fail closed) for one that is
    not a private file of root's or not whole: a device must not be given twice."""
    where = os.path.join(state_dir(), name)
    try:
        # plain_json: holds taken by the cdi-hook before state.py (no checksum line) still
        # hold their devices after an upgrade, until their containers end.
        record = read_record(dir_fd, name, where, 4096, plain_json=True)
    except StateError as error:
        raise HookError(STEP, name[:-len(".json")].replace("%2F", "/").replace("%25", "%"), str(error)) from None
    return record if isinstance(record, dict) or record is None else {}


def _alive(record: dict) -> bool:
    pid, start = record.get("pid"), record.get("start")
    return isinstance(pid, int) and pid > 0 and process_start_time(pid) == start


def hold(devices: list[str], container_id: str, pid: int) -> list[str]:
    """Take every device for this container, all or none; the devices newly taken.

    HookError names the device and the container holding it.
    """
    if not devices:
        return []
    try:
        return _hold(devices, container_id, pid)
    except OSError as error:
        raise HookError(STEP, ", ".join(devices), f"keeping the hold in {state_dir()}: {error.strerror}") from None


def _hold(devices: list[str], container_id: str, pid: int) -> list[str]:
    start = process_start_time(pid)
    taken: list[str] = []
    with _LockedDir() as dir_fd:
        try:
            for device in devices:
                name = _record_name(device)
                holder = _holder(dir_fd, name)
                if holder is not None and holder.get("container") == container_id:
                    continue  # this container's own hold (the hook runs at two stages)
                if holder is not None and _alive(holder):
                    raise HookError(STEP, device, f"held by running container {holder.get('container')!r} "
                                                  f"(pid {holder.get('pid')}); the policy makes it exclusive")
                write_record(dir_fd, name, {"container": container_id, "pid": pid, "start": start})  # over a stale one
                taken.append(device)
        except BaseException:
            _remove(dir_fd, taken, container_id)
            raise
    return taken


def release(devices: list[str], container_id: str) -> None:
    """Give back this container's holds on devices (another container's are left alone)."""
    if not devices or not os.path.isdir(state_dir()):
        return
    try:
        with _LockedDir() as dir_fd:
            _remove(dir_fd, devices, container_id)
    except OSError as error:
        raise HookError(STEP, ", ".join(devices), f"releasing the hold in {state_dir()}: {error.strerror}") from None


def _remove(dir_fd: int, devices: list[str], container_id: str) -> None:
    for device in devices:
        name = _record_name(device)
        holder = _holder(dir_fd, name)
        if holder is not None and holder.get("container") == container_id:
            remove_at(dir_fd, name)


def holders() -> dict[str, dict]:
    """Device -> its live holder record (for `cdi-hook explain`); records not believed are
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
                except (OSError, StateError):
                    continue
                if isinstance(record, dict) and _alive(record):
                    found[name[:-5].replace("%2F", "/").replace("%25", "%")] = record
    finally:
        os.close(dir_fd)
    return found
