"""Records of what `cdi-hook attach` and `detach` changed in a running container.

One file per container in $CDI_HOOK_STATE_DIR/../attachments (default
/run/cdi-hook/attachments: gone at reboot, like the containers): root's, 0600, in a 0700
dir, written whole with files.write_file_atomic. It names the container's init process
(pid and start time: a record of a container that ended and a new process that took its
pid number are told apart), the devices attached since the start and what attach created
for each (so detach removes only that), and the devices given at creation that were
detached since (so verify no longer expects them). A record that is not a private file of
root's is refused, never believed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

from cdi_hook import jsonio, settings
from cdi_hook.errors import CdiError
from cdi_hook.files import is_private_file, write_file_atomic

MAX_RECORD = 1 << 20


def record_dir() -> str:
    return os.path.join(settings.current().state_root, "attachments")  # beside the holds


def _path(container_id: str) -> str:
    if not container_id or container_id in (".", ".."):
        raise CdiError("attachment record: empty container id")
    return os.path.join(record_dir(), container_id.replace("%", "%25").replace("/", "%2F") + ".json")


def _private_dir(create: bool) -> bool:
    directory = record_dir()
    if create:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as error:  # one line, and attach's rollback still runs
            raise CdiError(f"{directory}: cannot make the attachment records' dir: {error.strerror}") from None
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise CdiError(f"{directory}: not a private directory of root's (owner {st.st_uid}, mode "
                       f"{stat.S_IMODE(st.st_mode):o}); refusing to keep attachment records there")
    return True


def lock_path(container_id: str) -> str:
    return _path(container_id)[:-len(".json")] + ".lock"


@contextlib.contextmanager
def locked(container_id: str):
    """Hold the container's lock (flock on its own lock file in the records' dir) from the
    load of its record to the save: attach and detach of one container at the same time would
    each save what it loaded plus its own change, losing the other's. The lock file stays (an
    unlinked one could be locked by one while another makes a new one); it is empty, and the
    dir is gone at reboot. Opened read-only: flock needs no write access."""
    _private_dir(create=True)
    path = lock_path(container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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
    if not _private_dir(create=False):
        return empty(container_id, pid, start_time)
    path = _path(container_id)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return empty(container_id, pid, start_time)
    except OSError as error:
        raise CdiError(f"{path}: cannot read: {error.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not is_private_file(os.fstat(f.fileno())):
            raise CdiError(f"{path}: not a private file of root's; refusing to believe it")
        data = f.read(MAX_RECORD + 1)
    try:
        record = jsonio.loads(data)
        if (not isinstance(record, dict) or not isinstance(record.get("attached"), list)
                or not isinstance(record.get("detached"), list)):
            raise ValueError("not a record")
    except ValueError:
        raise CdiError(f"{path}: not an attachment record; remove it if the container is gone") from None
    if (record.get("pid"), record.get("start_time")) != (pid, start_time):
        return empty(container_id, pid, start_time)
    return record


def save(record: dict) -> None:
    """Write the record (removed when it says nothing any more)."""
    _private_dir(create=True)
    _prune()
    path = _path(record["container"])
    if not record["attached"] and not record["detached"]:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    try:
        write_file_atomic(path, (jsonio.dumps(record) + "\n").encode(), 0o600)
    except OSError as error:
        raise CdiError(f"{path}: cannot write the attachment record: {error.strerror}") from None


def _prune() -> None:
    """Remove the records of containers that ended (their process is gone, or its pid is
    another process's now): nothing else would, before the next reboot."""
    from cdi_hook.containers import process_start_time

    directory = record_dir()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                record = jsonio.loads(f.read(MAX_RECORD + 1))
            alive = process_start_time(record["pid"]) == record["start_time"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge
        if not alive:
            try:
                os.unlink(path)
            except OSError:
                pass


def attached_names(record: dict) -> list[str]:
    return [entry["device"] for entry in record["attached"]]
