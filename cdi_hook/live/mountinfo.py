"""/proc/<pid>/mountinfo, read and parsed in one place (proc(5), "/proc/pid/mountinfo").

A line is `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
SUPER_OPTIONS`. The kernel writes the path and name fields through mangle()/seq_escape(),
which turn each of " \\t\\n\\\\" into a three-digit octal escape (\\040, \\011, \\012,
\\134), so a line splits on single spaces. Everything else is written as the raw bytes of
the name: the escapes are undone on bytes and only then decoded as os.fsdecode does
(surrogateescape), so a non-ASCII or non-UTF-8 mount point comes back as the same str
os.readlink() or os.listdir() would give, and os.fsencode() gives back its exact bytes.

On the hook's hot path (the rootfs guard, the device cgroup): stdlib only, no `re`.
"""

from __future__ import annotations

import sys
from collections import namedtuple

MountInfo = namedtuple("MountInfo", ["mount_id", "parent_id", "major", "minor", "root", "mount_point",
                                     "options", "optional_fields", "fs_type", "source", "super_options"])

# os.fsdecode's codec, looked up once: a busy node's namespace has thousands of lines.
_ENCODING = sys.getfilesystemencoding()
_ERRORS = sys.getfilesystemencodeerrors()
_OCTAL = frozenset(b"01234567")


def path(pid: int | str = "self") -> str:
    """Where the kernel shows `pid`'s mount table (also for poll(POLLPRI) on mount changes)."""
    return f"/proc/{pid}/mountinfo"


def read(pid: int | str = "self") -> list[MountInfo]:
    """The mounts of `pid`'s mount namespace, in the kernel's order (a later mount at the same
    point hides the earlier ones). Raises OSError when the file cannot be read."""
    with open(path(pid), "rb") as info:
        return parse(info.read())


def parse(data: bytes) -> list[MountInfo]:
    """Every well-formed line of `data`; a line without the ` - ` separator or with too few
    fields is skipped (the kernel writes none)."""
    mounts = []
    # Decoded once, whole: the escapes are all ASCII, which UTF-8 (and surrogateescape) never
    # folds into a neighbouring character, so a line can be split as text. Only a field that
    # holds an escape goes back to bytes (unescape); per-field calls would cost the hook
    # ~4x the time on a namespace of a few thousand mounts.
    for line in data.decode(_ENCODING, _ERRORS).split("\n"):
        # Single spaces only: an empty source ("mount -t tmpfs '' /mnt") is an empty field.
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            major, minor = fields[2].split(":")
            if "\\" in line:
                fields = [_unescape_text(field) for field in fields]
            mounts.append(MountInfo(int(fields[0]), int(fields[1]), int(major), int(minor), fields[3], fields[4],
                                    fields[5], tuple(fields[6:separator]), fields[separator + 1],
                                    fields[separator + 2], " ".join(fields[separator + 3:])))
        except (ValueError, IndexError):
            continue
    return mounts


def _unescape_text(field: str) -> str:
    return unescape(field.encode(_ENCODING, _ERRORS)) if "\\" in field else field


def unescape(field: bytes) -> str:
    """One field as the kernel wrote it, its \\ooo escapes undone on the bytes, then decoded
    as os.fsdecode does. A backslash not followed by the three octal digits of a byte is kept."""
    if b"\\" in field:
        parts = field.split(b"\\")
        out = [parts[0]]
        for part in parts[1:]:
            code = part[:3]
            if len(code) == 3 and _OCTAL.issuperset(code) and code[0] <= 0x33:  # a byte: \000 to \377
                out.append(bytes((int(code, 8),)) + part[3:])
            else:
                out.append(b"\\" + part)
        field = b"".join(out)
    return field.decode(_ENCODING, _ERRORS)


def by_id(mounts: list[MountInfo]) -> dict[int, MountInfo]:
    """mount id -> its mount (the id statx(STATX_MNT_ID) gives, see syscalls.mount_id)."""
    return {mount.mount_id: mount for mount in mounts}
