"""Pure pieces of the live hook: mount options, library detection."""

from __future__ import annotations

import pytest

from cdi_hook.live import ldcache, mounts, syscalls as sc
from cdi_hook.spec.model import Mount


def opts(options, type_=""):
    return mounts.parse_options(Mount("/h", "/c", tuple(options), type_))


def test_bind_flags_go_to_mount_setattr():
    o = opts(["ro", "nosuid", "nodev", "bind"])
    assert o.bind and not o.recursive
    assert o.attr_set == sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
    assert o.ignored == [] and o.data == []


def test_last_option_wins_and_rbind_is_recursive():
    o = opts(["ro", "rw", "rbind", "rslave"])
    assert o.recursive and o.attr_set & sc.MOUNT_ATTR_RDONLY == 0 and o.attr_clr & sc.MOUNT_ATTR_RDONLY
    assert o.propagation == sc.MS_SLAVE | sc.MS_REC


def test_empty_type_means_bind_and_data_options_are_ignored_there():
    o = opts(["size=1m"])
    assert o.bind and o.ignored == ["size=1m"]


def test_typed_mount_flags_and_data():
    o = opts(["nosuid", "noexec", "size=1m", "mode=750", "noatime"], "tmpfs")
    assert not o.bind
    assert o.ms_flags == sc.MS_NOSUID | sc.MS_NOEXEC | sc.MS_NOATIME
    assert o.data == ["size=1m", "mode=750"]


@pytest.mark.parametrize("name, is_lib", [
    ("libcuda.so", True), ("libcuda.so.1", True), ("libcuda.so.535.104.05", True),
    ("nvidia-smi", False), ("libfoo.so.conf", False), ("lib.so.x", False), ("notes.so.txt", False),
])
def test_library_names(name, is_lib):
    assert ldcache.is_library_name("/usr/lib/" + name) is is_lib


def test_library_dirs_once_in_order():
    assert ldcache.library_dirs(["/a/libx.so.1", "/b/bin", "/b//liby.so", "/a/libz.so"]) == ["/a", "/b"]
