"""What an installed hook entry runs first (hook_entry.ENTRY_CODE).

A post stage (poststart, poststop) of a container whose record holds no work for that
stage returns here, having imported nothing of cdi-hook's but this module and nothing of
the standard library but posix and _json (no os: ~1 ms under -S). Everything else goes on
to cdi_hook.cli with the same argv and the same stdin, and decides as before.

What it reads: createRuntime writes, beside the container's record and through the state
layer (record.save), a note `<id>.idle` naming the post stages that have nothing to do,
what identifies the container (record.is_of's checks: its id, bundle, config.json's
identity, its init process and that process's start time) and the checksum line of the
record it was written with. Here the note is believed only under the state layer's rules
for records (state.open_private_dir, state.open_trusted: a real folder of ours that nobody
else may read or write, a regular file of root's open to nobody else, no symlink followed)
and only when it matches this container exactly and the record beside it still starts
with that checksum line (a record written again since, by attach or a new container under
the same id, has another). At poststop the note and the record are then removed, as the
full way removes the record. Any doubt goes the full way: no note (a container started by
an older cdi-hook has no record and no note), an id that is not a plain file name (one
that could leave the folder), an unreadable or untrusted note, a mismatch.

Settings are not checked here (cli does): a hook whose settings are bad failed at
createRuntime, which wrote no note.
"""

from __future__ import annotations

import posix
import sys

POST_STAGES = ("poststart", "poststop")  # record.POST_STAGES
NOTE_SUFFIX = ".idle"  # record.NOTE_SUFFIX
NOTE_VERSION = 1
MAX_STATE_SIZE = 1 << 20  # oci.MAX_STATE_SIZE
MAX_NOTE = 1 << 16
DEFAULT_STATE_DIR = b"/run/cdi-hook/held"  # settings.DEFAULT_STATE_DIR
RECORDS = b"/containers"  # record.FOLDER
_DIR = posix.O_RDONLY | posix.O_DIRECTORY | posix.O_NOFOLLOW | posix.O_CLOEXEC
_FILE = posix.O_RDONLY | posix.O_NOFOLLOW | posix.O_CLOEXEC | posix.O_NONBLOCK
_IFMT, _IFDIR, _IFREG = 0o170000, 0o040000, 0o100000


def main() -> int:
    argv = sys.argv[1:]
    if len(argv) == 3 and argv[0] == "hook" and argv[1] == "--stage" and argv[2] in POST_STAGES:
        data = sys.stdin.buffer.read(MAX_STATE_SIZE + 1)
        if idle(argv[2], data):
            return 0
        import io

        sys.stdin = io.TextIOWrapper(io.BytesIO(data))  # the full way reads the same state
    from cdi_hook.cli import main as cli_main

    return cli_main()


def idle(stage: str, data: bytes) -> bool:
    """Whether this post stage has nothing to do for the container of the OCI state data,
    by its note (at poststop the note and the record are removed then). False for any doubt."""
    try:
        state = _loads(data)
        container, bundle = state["id"], state["bundle"]
        if not (_plain_name(container) and isinstance(bundle, str) and bundle):
            return False
        folder = _state_root() + RECORDS
        dir_fd = posix.open(folder, _DIR)
        try:
            st = posix.fstat(dir_fd)
            if st.st_mode & _IFMT != _IFDIR or st.st_uid != posix.geteuid() or st.st_mode & 0o077:
                return False
            note_name, record_name = container + NOTE_SUFFIX, container + ".json"
            note = _loads(_read_private(dir_fd, note_name, MAX_NOTE))
            head = _read_private(dir_fd, record_name, 16).partition(b"\n")[0]
            if not _matches(note, stage, state, head):
                return False
            if stage == "poststop":  # poststop does not come again for this container
                _remove(dir_fd, note_name)
                _remove(dir_fd, record_name)
        finally:
            posix.close(dir_fd)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, StopIteration):
        return False
    return True


def _matches(note: dict, stage: str, state: dict, head: bytes) -> bool:
    if (note["version"] != NOTE_VERSION or type(note["idle"]) is not list or stage not in note["idle"]
            or note["record"] != head.decode("ascii")):
        return False
    if note["container"] != state["id"] or note["bundle"] != state["bundle"]:
        return False
    st = posix.stat(state["bundle"] + "/config.json")
    if note["config"] != [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]:
        return False
    if stage == "poststart":  # record.is_of with the pid: the very process createRuntime saw
        pid = state.get("pid")
        if not (type(pid) is int and pid > 0 and note["pid"] == pid):
            return False
        start_time = _start_time(pid)
        return start_time is not None and note["start_time"] == start_time
    return True


def _plain_name(container: object) -> bool:
    """An id that is its own file name (state.file_name escapes nothing in it) and cannot
    leave the folder nor be hidden: printable ASCII without "/" and "%", not "." or ".."."""
    return (isinstance(container, str) and container.isascii() and container.isprintable()
            and container not in ("", ".", "..") and "/" not in container and "%" not in container)


def _state_root() -> bytes:
    """settings.Settings.state_root, from the variable the entry's env names."""
    state_dir = posix.environ.get(b"CDI_HOOK_STATE_DIR") or DEFAULT_STATE_DIR
    if not state_dir.startswith(b"/"):
        raise ValueError("CDI_HOOK_STATE_DIR: not absolute")  # settings refuses it: the full way says so
    state_dir = state_dir.rstrip(b"/")
    return state_dir[:state_dir.rfind(b"/")] or b"/"


def _read_private(dir_fd: int, name: str, size: int) -> bytes:
    """Up to size bytes of name in the folder, under state.open_trusted's rules; OSError for
    none, ValueError for one not to be believed."""
    fd = posix.open(name, _FILE, dir_fd=dir_fd)
    try:
        st = posix.fstat(fd)
        if st.st_mode & _IFMT != _IFREG or st.st_uid != 0 or st.st_mode & 0o077:
            raise ValueError(name)
        return posix.read(fd, size)
    finally:
        posix.close(fd)


def _remove(dir_fd: int, name: str) -> None:
    try:
        posix.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _start_time(pid: int) -> int | None:
    """containers.process_start_time: field 22 of /proc/PID/stat; None for a zombie."""
    try:
        fd = posix.open(f"/proc/{pid}/stat", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = posix.read(fd, 4096)
    finally:
        posix.close(fd)
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


class _Decoder:
    """What the C scanner reads of json.JSONDecoder (jsonio._Decoder); no NaN/Infinity."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = None


def _loads(data: bytes) -> dict:
    """A JSON object, by the interpreter's C scanner; ValueError for anything else (the full
    way parses the state again and reports its errors)."""
    import _json

    text = data.decode("utf-8")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    document, end = _json.make_scanner(_Decoder())(text, start)  # type: ignore[arg-type]
    if text[end:].strip(" \t\n\r") or type(document) is not dict:
        raise ValueError("not a JSON object")
    return document
