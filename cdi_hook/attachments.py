"""Records of what `cdi-hook attach` and `detach` changed in a running container.

One file per container in $CDI_HOOK_STATE_DIR/../attachments (default
/run/cdi-hook/attachments: gone at reboot, like the containers): root's, 0600, in a 0700
dir, a checksummed record written whole (state.write_record). It names the container's
init process (pid and start time: a record of a container that ended and a new process
that took its pid number are told apart), the devices attached since the start and what attach created
for each (so detach removes only that), and the devices given at creation that were
detached since (so verify no longer expects them). A record that is not a private file of
root's is refused, never believed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from cdi_hook import settings, state
from cdi_hook.errors import CdiError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any


def record_dir() -> str:
    return os.path.join(settings.current().state_root, "attachments")  # beside the holds


def _name(container_id: str) -> str:
    if not container_id or container_id in (".", ".."):
        raise CdiError("attachment record: empty container id")
    return state.file_name(container_id) + ".json"


def _path(container_id: str) -> str:
    return os.path.join(record_dir(), _name(container_id))


@contextlib.contextmanager
def _private_dir(create: bool) -> Iterator[int | None]:
    """An fd of the records' folder (None when it does not exist and create is false),
    closed after the block."""
    directory = record_dir()
    try:
        fd = state.open_private_dir(directory, create)
    except state.StateError as error:  # one line, and attach's rollback still runs
        raise CdiError(str(error)) from None
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def lock_path(container_id: str) -> str:
    return _path(container_id)[:-len(".json")] + ".lock"


@contextlib.contextmanager
def locked(container_id: str) -> Iterator[None]:
    """Hold the container's lock (flock on its own lock file in the records' dir) from the
    load of its record to the save: attach and detach of one container at the same time would
    each save what it loaded plus its own change, losing the other's. The lock file stays (an
    unlinked one could be locked by one while another makes a new one); it is empty, and the
    dir is gone at reboot. Opened read-only: flock needs no write access."""
    path = lock_path(container_id)
    with _private_dir(create=True) as dir_fd:
        assert dir_fd is not None  # create=True: made, or CdiError
        try:
            fd = state.open_lock_at(dir_fd, os.path.basename(path))
        except OSError as error:
            raise CdiError(f"{path}: cannot open the attachment record's lock: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def empty(container_id: str, pid: int, start_time: int) -> dict:
    return {"container": container_id, "pid": pid, "start_time": start_time, "attached": [], "detached": []}


def load(container_id: str, pid: int, start_time: int) -> dict:
    """The container's record; an empty one when there is none or it is of an earlier process
    (the container was started again under the same id)."""
    path = _path(container_id)
    with _private_dir(create=False) as dir_fd:
        if dir_fd is None:
            return empty(container_id, pid, start_time)
        try:
            # plain_json: records of attach before state.py (no checksum line) stay believed
            # after an upgrade: detach must still remove what they say was attached.
            record = state.read_record(dir_fd, _name(container_id), path, plain_json=True)
        except state.StateError as error:
            raise CdiError(f"{error}; remove it if the container is gone") from None
    if record is None:
        return empty(container_id, pid, start_time)
    if (not isinstance(record, dict) or not isinstance(record.get("attached"), list)
            or not isinstance(record.get("detached"), list)):
        raise CdiError(f"{path}: not an attachment record; remove it if the container is gone")
    if (record.get("pid"), record.get("start_time")) != (pid, start_time):
        return empty(container_id, pid, start_time)
    return record


def save(record: dict) -> None:
    """Write the record (removed when it says nothing any more)."""
    path = _path(record["container"])
    with _private_dir(create=True) as dir_fd:
        assert dir_fd is not None  # create=True: made, or CdiError
        _prune(dir_fd)
        if not record["attached"] and not record["detached"]:
            try:
                state.remove_at(dir_fd, _name(record["container"]))
            except OSError as error:
                raise CdiError(f"{path}: cannot remove the attachment record: {error.strerror}") from None
            return
        try:
            state.write_record(dir_fd, _name(record["container"]), record)
        except OSError as error:
            raise CdiError(f"{path}: cannot write the attachment record: {error.strerror}") from None


def prepare(record: dict) -> state.PendingRecord:
    """The record's next version, written beside it but not yet in place (see
    state.PendingRecord): detach prepares what it will record before it takes anything away,
    so a full or read-only folder fails it with one line and the container unchanged."""
    path = _path(record["container"])
    empty_now = not record["attached"] and not record["detached"]
    with _private_dir(create=True) as dir_fd:
        assert dir_fd is not None  # create=True: made, or CdiError
        try:
            return state.PendingRecord(dir_fd, _name(record["container"]), None if empty_now else record)
        except OSError as error:
            raise CdiError(f"{path}: cannot write the attachment record: {error.strerror}") from None


def commit(pending: state.PendingRecord, container_id: str) -> None:
    """Put a prepared record in place; CdiError naming the file when it cannot be."""
    try:
        pending.commit()
    except OSError as error:
        raise CdiError(f"{_path(container_id)}: cannot write the attachment record: {error.strerror}") from None


def _prune(dir_fd: int) -> None:
    """Remove the records of containers that ended (their process is gone, or its pid is
    another process's now): nothing else would, before the next reboot."""
    from cdi_hook.containers import process_start_time

    for name in os.listdir(dir_fd):
        if not name.endswith(".json") or name.startswith("."):
            continue  # the lock files, and a write's temp file
        try:
            record: Any = state.read_record(dir_fd, name, name, plain_json=True)
            alive = process_start_time(record["pid"]) == record["start_time"]
        except (OSError, state.StateError, KeyError, TypeError):
            continue  # not ours to judge
        if not alive:
            try:
                state.remove_at(dir_fd, name)
            except OSError:
                pass


def live_records() -> list[dict]:
    """The records of containers whose process still runs (for `cdi-hook stale`); a record
    that is not believed is left out."""
    from cdi_hook.containers import process_start_time

    found = []
    with _private_dir(create=False) as dir_fd:
        if dir_fd is None:
            return []
        for name in sorted(os.listdir(dir_fd)):
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                record: Any = state.read_record(dir_fd, name, name, plain_json=True)
                if process_start_time(record["pid"]) == record["start_time"] and isinstance(record["attached"], list):
                    found.append(record)
            except (OSError, state.StateError, KeyError, TypeError):
                continue
    return found


def attached_names(record: dict) -> list[str]:
    return [entry["device"] for entry in record["attached"]]
