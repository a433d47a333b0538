"""Trusted read-only configuration: whether a non-root user could change what root reads.

Spec files and the policy file decide what gets into containers, so they must be as
trusted as the runtime: the file root's and writable by root only, and every folder from
`/` down to it too, since whoever can write a folder can rename another file (a looser,
older, root-owned `policy.yaml.bak`) over the one root meant, or the whole folder below.
A sticky folder (`/tmp`, mode 1777) above is fine when the entry root walks through in it
is root's: the kernel lets only an entry's owner (or the folder's) rename or remove it
there. Symlinks on the way are followed, and the folders they lead through checked alike.

This is not state.py's rule: that one is for cdi-hook's own records and caches, private
to root (0700 folders, 0600 files, nobody else may even read them) and written by
cdi-hook. This one is for configuration an administrator writes and everyone may read;
it only reads (stat and lstat), so registry (spec dirs) and policy sit on it without
pulling in each other or the state layer. Both run it only when they parse the files: a
start answered from the compiled registry cache or the compiled policy is vouched for by
its listing or stat signature (an inode, size, mtime and ctime per file and spec dir),
which any rename or replacement through a loose folder moves, so the next start parses
the files again and this check refuses them.
"""

from __future__ import annotations

import os
import stat

MAX_SYMLINKS = 40  # the kernel's own limit (MAXSYMLINKS)


def file_problem(st: os.stat_result) -> str | None:
    """Why a file or dir with this stat could be changed by someone other than root."""
    if st.st_uid != 0:
        return f"owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH:
        return "writable by every user"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group {st.st_gid}"
    return None


def folders_problem(path: str) -> tuple[str, str] | None:
    """(folder, why) for the first folder from / down to path's own folder through which a
    user other than root could replace path (or a folder on the way); None when none can.

    Each folder must be root's, and writable by root only (root's group counts as root, as
    for the files) unless it is sticky and the entry walked through in it is root's. path
    itself is not judged here (file_problem, on what was opened, does that).
    """
    if not path.startswith("/"):
        path = os.path.join(os.getcwd(), path)
    try:
        return _walk(_components(path))
    except OSError as error:
        return path, f"cannot be checked: {error.strerror}"


def _walk(pending: list[str]) -> tuple[str, str] | None:
    folder = "/"
    st = os.lstat(folder)
    links = 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":
            folder = os.path.dirname(folder)  # folder is a real path: no symlink in it
            st = os.lstat(folder)
            continue
        entry = os.path.join(folder, name)
        try:
            entry_st = os.lstat(entry)
        except FileNotFoundError:
            return None  # nothing there to trust; the caller's own open reports it
        problem = _folder_problem(st, entry_st, name)
        if problem:
            return folder, problem
        if stat.S_ISLNK(entry_st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                return entry, "the start of more than 40 symlinks"
            target = os.readlink(entry)
            pending.extend(_components(target))
            if target.startswith("/"):
                folder = "/"
                st = os.lstat(folder)
            continue
        if pending:
            if not stat.S_ISDIR(entry_st.st_mode):
                return None  # not a path at all; the caller's open fails on it
            folder, st = entry, entry_st
    return None


def _folder_problem(st: os.stat_result, entry_st: os.stat_result, name: str) -> str | None:
    problem = file_problem(st)
    if problem is None or st.st_uid != 0 or not st.st_mode & stat.S_ISVTX:
        return problem
    # Writable by others, but sticky: only the owner of an entry may rename or remove it.
    if entry_st.st_uid == 0:
        return None
    return f"{problem} (sticky, but {name} in it is owned by uid {entry_st.st_uid})"


def _components(path: str) -> list[str]:
    """path's names in walking order, as a stack (the next one last)."""
    return path.split("/")[::-1]
