"""Exclusive devices: one running container at a time holds each (policy `exclusive`).

A hold is a record file per device in $CDI_HOOK_STATE_DIR (default /run/cdi-hook/held, a
root-only dir, gone at reboot like the containers): the holder's container id, its init
pid and that process's start time. A second container asking for the device is refused
with the holder's id, unless the holder's process is gone (the same pid with another start
time is another process): then the record is stale and taken over. The hook releases its
holds at poststop, and at once when the container fails to start. All of it happens under
an flock on the dir, so two starts cannot both take one device.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat

from cdi_hook import settings
from cdi_hook.containers import process_start_time
from cdi_hook.errors import HookError

STEP = "exclusive device"


def state_dir() -> str:
    return settings.current().state_dir


def _record_name(device: str) -> str:
    return device.replace("/", "%2F") + ".json"


class _LockedDir:
    def __enter__(self) -> int:
        directory = state_dir()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self.fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.close(self.fd)
            raise HookError(STEP, "", f"{directory} is not a private directory (owner {st.st_uid}, "
                                      f"mode {stat.S_IMODE(st.st_mode):o}); refusing to keep holds there")
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing drops the flock


def _holder(dir_fd: int, name: str) -> dict | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        try:
            record = json.loads(f.read(4096))
        except ValueError:
            return {}
    return record if isinstance(record, dict) else {}


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
                record = json.dumps({"container": container_id, "pid": pid, "start": start}).encode()
                temp = f".{name}.{os.getpid()}.tmp"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
                try:
                    os.write(fd, record)
                finally:
                    os.close(fd)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # replaces a stale record
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
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass


def holders() -> dict[str, dict]:
    """Device -> its live holder record (for `cdi-hook explain`)."""
    directory = state_dir()
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    found = {}
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    record = json.loads(f.read(4096))
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and _alive(record):
                found[name[:-5].replace("%2F", "/")] = record
    return found
