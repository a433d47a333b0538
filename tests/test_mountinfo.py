"""live/mountinfo.py: the one parser of /proc/<pid>/mountinfo.

The kernel escapes " \\t\\n\\\\" in path fields as \\040 \\011 \\012 \\134 (fs/proc_namespace.c,
mangle()) and writes every other byte as it is; a mount point must come back exactly as
os.fsdecode would give it, non-UTF-8 bytes included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import require_program, require_root

from cdi_hook.live import mountinfo
from cdi_hook.live.mountinfo import MountInfo

REPO = Path(__file__).resolve().parent.parent


def escaped(name: bytes) -> bytes:
    """name as the kernel writes a path field (mangle: seq_escape with " \\t\\n\\\\")."""
    return b"".join(b"\\%03o" % byte if byte in b" \t\n\\" else bytes((byte,)) for byte in name)


def line(mount_point: bytes, optional: bytes = b"", root: bytes = b"/", source: bytes = b"tmpfs") -> bytes:
    optional = optional + b" " if optional else b""
    return (b"36 25 0:42 " + escaped(root) + b" " + escaped(mount_point) + b" rw,nosuid,relatime "
            + optional + b"- tmpfs " + escaped(source) + b" rw,size=1024k,mode=755\n")


def test_a_plain_line_gives_every_field():
    [mount] = mountinfo.parse(b"36 25 0:42 / /mnt/a rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n")
    assert mount == MountInfo(36, 25, 0, 42, "/", "/mnt/a", "rw,relatime", ("shared:1",), "ext4", "/dev/sda1",
                              "rw,errors=remount-ro")


def test_optional_fields_zero_one_several():
    assert mountinfo.parse(line(b"/m"))[0].optional_fields == ()
    assert mountinfo.parse(line(b"/m", b"shared:1"))[0].optional_fields == ("shared:1",)
    several = mountinfo.parse(line(b"/m", b"shared:1 master:2 propagate_from:3 unbindable"))[0]
    assert several.optional_fields == ("shared:1", "master:2", "propagate_from:3", "unbindable")
    assert (several.fs_type, several.source, several.super_options) == ("tmpfs", "tmpfs", "rw,size=1024k,mode=755")


def test_escaped_characters_come_back():
    for name in (b"/a b", b"/a\tb", b"/a\nb", b"/a\\b", b"/a\\040b", b"/ \t\n\\", b"/trailing "):
        [mount] = mountinfo.parse(line(name, b"shared:7", root=name, source=name))
        assert (mount.mount_point, mount.root, mount.source) == (os.fsdecode(name),) * 3, name
        assert mount.optional_fields == ("shared:7",)


def test_non_ascii_and_non_utf8_names_round_trip():
    for name in ("/var/tmp/x ü\tdir".encode(), "/mnt/日本語".encode(), b"/mnt/\xff\xfe latin1 \xe9", b"/mnt/\xc3"):
        [mount] = mountinfo.parse(line(name))
        assert mount.mount_point == os.fsdecode(name)
        assert os.fsencode(mount.mount_point) == name


def test_a_backslash_without_three_octal_digits_is_kept():
    # The kernel never writes these; kept as written rather than guessed at.
    for raw, want in ((b"/a\\08", "/a\\08"), (b"/a\\04", "/a\\04"), (b"/a\\", "/a\\"), (b"/a\\400", "/a\\400"),
                      (b"/a\\0400", "/a 0")):
        assert mountinfo.unescape(raw) == want, raw


def test_empty_source_and_malformed_lines():
    # mount -t tmpfs '' /mnt: the source field is empty, the fields still line up.
    [mount] = mountinfo.parse(b"40 25 0:50 / /mnt rw - tmpfs  rw,inode64\n")
    assert (mount.source, mount.super_options) == ("", "rw,inode64")
    assert mountinfo.parse(b"\n\ngarbage\n36 25 0:42 / /m rw no-separator\n" + line(b"/ok")) \
        == mountinfo.parse(line(b"/ok"))


def test_by_id_and_read_self():
    mounts = mountinfo.read()
    assert any(m.mount_point == "/" for m in mounts)
    assert mountinfo.read(os.getpid()) == mounts
    index = mountinfo.by_id(mounts)
    assert all(index[m.mount_id] is m for m in mounts)
    assert mountinfo.path(12) == "/proc/12/mountinfo"


MOUNT_AND_READ = r"""
import ctypes, os, sys
from cdi_hook.live import mountinfo
target = bytes.fromhex(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.mount(b"cdi test\tsrc", target, b"tmpfs", 0, b"size=64k") != 0:
    sys.exit("mount: " + os.strerror(ctypes.get_errno()))
found = [m for m in mountinfo.read() if m.fs_type == "tmpfs" and m.mount_point == os.fsdecode(target)]
print(len(found), os.fsencode(found[-1].mount_point).hex(), os.fsencode(found[-1].source).hex())
"""


def test_a_real_mount_point_with_hard_characters_comes_back_exactly(tmp_path):
    require_root()
    require_program("unshare")
    target = os.fsencode(tmp_path) + b"/x \xc3\xbc\tdir\\b\nnew \xff"
    os.mkdir(target)
    # A private mount namespace of its own: nothing to clean up on the host if it fails.
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", MOUNT_AND_READ,
                           target.hex()], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    count, mount_point, source = done.stdout.split()
    assert (int(count), bytes.fromhex(mount_point), bytes.fromhex(source)) == (1, target, b"cdi test\tsrc")
