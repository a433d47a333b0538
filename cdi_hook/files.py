"""The one atomic file writer: config.json rewrites, config.json.orig, hooks.d files."""

from __future__ import annotations

import os
import stat


def is_private_file(st: os.stat_result) -> bool:
    """A regular file of root's that nobody else may read or write: what cdi-hook's own
    records (the watcher's generation, remembered ldconfig runs) must be to be believed."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o077


def write_file_atomic(path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace path with data all at once: a temp file in the same dir, fsync, rename.

    A reader (runc, Podman's hooks.d monitor) sees either the old file or the new one.
    """
    import tempfile  # not at the top: the hook's hot path imports this module (is_private_file)

    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
