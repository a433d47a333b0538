"""Remembered ldconfig runs (live/ldmemo.py): the cache installed instead of running ldconfig
is byte for byte the one ldconfig makes for the same input, and any change to that input
(a library added, rewritten in place, a symlink retargeted, a conf file, a folder that
appears) runs ldconfig again. The image is only read, through the read-only nodev view.

ldcache.update runs here on a plain folder (as the worker does inside the container's mount
namespace), with the host's static ldconfig.
"""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import stat
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import hook_env
from cdi_hook import cache
from cdi_hook.live import ldcache, ldmemo
from cdi_hook.live.rootfs import Rootfs

LIBRARIES = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("lib*.so.*")
                   if p.is_file() and not p.is_symlink() and p.name.count(".so.") == 1)


@pytest.fixture
def image(tmp_path, monkeypatch, root_only):
    """A glibc-like rootfs with a library folder, a memo folder, and FRESH_NS 0 so a run is
    remembered at once (the tests that need it wait past the clock tick)."""
    monkeypatch.setattr(cache, "FRESH_NS", 0)
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "rootfs")
    (rootfs / "opt" / "lib").mkdir(parents=True)
    shutil.copy(LIBRARIES[0], rootfs / "opt" / "lib" / LIBRARIES[0].name)
    memo = tmp_path / "memo"
    memo.mkdir(mode=0o700)
    return rootfs, memo


def run(rootfs: Path, memo: Path | None = None) -> tuple[list[str], bytes]:
    """One ldcache.update, committed: (its notes, the etc/ld.so.cache it left)."""
    fs = Rootfs.open(str(rootfs))
    ldconfig_fd = ldcache.open_host_ldconfig()
    memo_fd = os.open(memo, os.O_RDONLY | os.O_DIRECTORY) if memo else None
    notes: list[str] = []
    try:
        ldcache.update(fs, ["/opt/lib"], ldconfig_fd, notes, "test.example.com/x=y", memo_fd=memo_fd)
    finally:
        fs.close()
        os.close(ldconfig_fd)
        if memo_fd is not None:
            os.close(memo_fd)
    return notes, (rootfs / "etc" / "ld.so.cache").read_bytes()


def remembered(notes: list[str]) -> bool:
    return any("as ldconfig made it for the same input before" in note for note in notes)


def warm(rootfs: Path, memo: Path) -> bytes:
    """Runs until the memo answers: the first run records the folders, the second the cache."""
    for _ in range(3):
        notes, made = run(rootfs, memo)
        if remembered(notes):
            return made
    raise AssertionError(f"never remembered: {notes}")


def test_a_remembered_cache_is_what_ldconfig_makes(image, tmp_path):
    rootfs, memo = image
    first, made = run(rootfs, memo)
    assert not remembered(first)
    assert warm(rootfs, memo) == made
    fresh = tmp_path / "fresh"  # the same tree, never remembered: ldconfig itself
    shutil.copytree(rootfs, fresh, symlinks=True)
    (fresh / "etc" / "ld.so.cache").unlink()
    _, by_ldconfig = run(fresh)
    assert by_ldconfig == made and LIBRARIES[0].name.encode() in made
    files = sorted(memo.iterdir())
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == 0 for f in files)


def test_an_unchanged_cache_is_not_written_again(image):
    rootfs, memo = image
    warm(rootfs, memo)
    cache_file, conf = rootfs / "etc" / "ld.so.cache", rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf"
    before = (cache_file.stat().st_ino, conf.stat().st_ino)
    notes, _ = run(rootfs, memo)
    assert remembered(notes) and (cache_file.stat().st_ino, conf.stat().st_ino) == before


def _rewrite_in_place(path: Path, source: Path) -> None:
    with open(path, "r+b") as out:  # the same inode: only its identity (size, times) moves
        out.write(source.read_bytes())
        out.truncate()


@pytest.mark.parametrize("change", ["library added", "library rewritten in place", "symlink retargeted",
                                    "conf file added", "builtin folder appears"])
def test_any_change_to_the_input_runs_ldconfig_again(image, change):
    rootfs, memo = image
    before = warm(rootfs, memo)
    other = LIBRARIES[1]
    lib = rootfs / "opt" / "lib"
    if change == "library added":
        shutil.copy(other, lib / other.name)
        expected = True
    elif change == "library rewritten in place":
        _rewrite_in_place(lib / LIBRARIES[0].name, other)  # its soname is now the other library's
        expected = True
    elif change == "symlink retargeted":
        shutil.copy(other, lib / other.name)
        warm(rootfs, memo)
        (lib / "libcdi-test.so.7").symlink_to(LIBRARIES[0].name)
        warm(rootfs, memo)
        (lib / "libcdi-test.so.7").unlink()
        (lib / "libcdi-test.so.7").symlink_to(other.name)
        expected = False
    elif change == "conf file added":
        (rootfs / "srv" / "lib").mkdir(parents=True)
        shutil.copy(other, rootfs / "srv" / "lib" / other.name)
        (rootfs / "etc" / "ld.so.conf.d" / "10-image.conf").write_text("/srv/lib\n")
        expected = True
    else:
        (rootfs / "usr" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)
        shutil.copy(other, rootfs / "usr" / "lib" / "x86_64-linux-gnu" / other.name)
        expected = True
    notes, made = run(rootfs, memo)
    assert not remembered(notes), notes
    _, by_ldconfig = run(rootfs)  # what ldconfig makes of the tree as it is now
    assert made == by_ldconfig
    if expected:  # the change shows in the cache (the test changed something ldconfig reads)
        assert made != before


def test_a_folder_made_anew_in_a_scanned_folder_keeps_the_memo(image):
    """A mount point folder cdi-hook creates in every new container (a new inode and ctime
    each time) is no input of ldconfig's: the remembered cache still answers."""
    rootfs, memo = image
    (rootfs / "opt" / "lib" / "cdi-mounts").mkdir()
    before = warm(rootfs, memo)
    (rootfs / "opt" / "lib" / "cdi-mounts").rmdir()
    (rootfs / "opt" / "lib" / "cdi-mounts").mkdir()
    notes, made = run(rootfs, memo)
    assert remembered(notes) and made == before


@pytest.mark.parametrize("change", ["library added to a hwcap subfolder", "hwcap subfolder appears"])
def test_glibc_hwcaps_subfolders_are_keyed(image, change):
    """ldconfig (glibc >= 2.33) scans glibc-hwcaps/<name>/ for every subfolder there: a library
    added to one, or a new subfolder with a library, runs it again."""
    rootfs, memo = image
    hwcaps = rootfs / "opt" / "lib" / "glibc-hwcaps"
    (hwcaps / "x86-64-v2").mkdir(parents=True)
    if change == "library added to a hwcap subfolder":
        (hwcaps / "x86-64-v3").mkdir()
    before = warm(rootfs, memo)
    time.sleep(0.01)  # a folder's new mtime must differ from the remembered one
    (hwcaps / "x86-64-v3").mkdir(exist_ok=True)
    shutil.copy(LIBRARIES[1], hwcaps / "x86-64-v3" / LIBRARIES[1].name)
    notes, made = run(rootfs, memo)
    assert not remembered(notes), notes
    _, by_ldconfig = run(rootfs)
    assert made == by_ldconfig != before


def test_a_conf_it_cannot_follow_is_never_remembered(image):
    rootfs, memo = image
    (rootfs / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/[0-9]*.conf\n")
    for _ in range(3):
        notes, _ = run(rootfs, memo)
        assert not remembered(notes)
    assert list(memo.iterdir()) == []


def test_a_memo_file_others_could_write_is_not_used(image):
    rootfs, memo = image
    warm(rootfs, memo)
    for path in memo.iterdir():
        os.chmod(path, 0o644)
    notes, _ = run(rootfs, memo)
    assert not remembered(notes)


def test_a_fresh_file_is_not_remembered(image, monkeypatch):
    rootfs, memo = image
    monkeypatch.setattr(cache, "FRESH_NS", 3_600_000_000_000)  # everything here is younger than an hour
    for _ in range(3):
        notes, _ = run(rootfs, memo)
        assert not remembered(notes)
    assert not [p for p in memo.iterdir() if p.name.startswith("cache-")]


def test_ldconfigs_report_is_read_as_it_writes_it():
    verbose = (b"/opt/lib: (from /etc/ld.so.conf.d/00-cdi-hook.conf:2)\n\tlibz.so.1 -> libz.so.1.2.13\n"
               b"/usr/lib/x/glibc-hwcaps/x86-64-v3: (hwcap: \"x86-64-v3\") (from /etc/ld.so.conf.d/a.conf:1)\n"
               b"/lib: (from <builtin>:0)\n")
    errors = ("ldconfig: Can't stat /lib/x86_64-linux-gnu: No such file or directory\n"
              "ldconfig: Path `/usr/lib' given more than once\n(from <builtin>:0 and <builtin>:0)\n"
              "ldconfig: /etc/ld.so.conf.d/a.conf:6: hwcap directive ignored\n")
    assert ldmemo._report(verbose, errors) == (
        ("/opt/lib", "scan"), ("/usr/lib/x/glibc-hwcaps/x86-64-v3", "scan"), ("/lib", "scan"),
        ("/lib/x86_64-linux-gnu", "missing"), ("/usr/lib", "twice"))
    assert ldmemo._report(verbose, "ldconfig: Can't open directory /srv: Permission denied\n") is None


def test_glob_matches_like_glob3():
    assert ldmemo._matches("00-cdi-hook.conf", "*.conf") and not ldmemo._matches("a.conf~", "*.conf")
    assert ldmemo._matches("ab.conf", "a?.conf") and not ldmemo._matches("abc.conf", "a?.conf")


# ---------------------------------------------------------------------------------------
# An identity keyed by inode holds its file system


def test_identities_differing_only_in_their_device_differ():
    file = SimpleNamespace(st_mode=stat.S_IFREG | 0o644, st_dev=os.makedev(0, 51), st_ino=2, st_size=4096,
                           st_mtime_ns=10**18, st_ctime_ns=10**18)
    other = SimpleNamespace(**{**vars(file), "st_dev": os.makedev(0, 52)})
    root_dev = os.makedev(254, 0)
    assert ldmemo._identity(file, root_dev) != ldmemo._identity(other, root_dev)
    assert os.makedev(0, 51) in ldmemo._identity(file, root_dev)
    # The rootfs's own file system by a marker: an overlay's number is each container's own.
    on_root = SimpleNamespace(**{**vars(file), "st_dev": root_dev})
    assert ldmemo._identity(on_root, root_dev)[1] == ldmemo.ROOT_DEVICE


def test_equal_inode_numbers_on_two_tmpfs_mounts_key_apart(root_only, tmp_path):
    """Two rootfs folders whose scanned folder is each a tmpfs of its own, holding a library of
    the same name, inode number, size and mtime: their keys differ by the file system, not
    only by the ctime (which a coarse kernel clock can make equal too)."""
    roots = [tmp_path / "a", tmp_path / "b"]
    mounted = []
    try:
        for number, root in enumerate(roots):
            lib = root / "opt" / "lib"
            lib.mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(lib)], check=True)
            mounted.append(lib)
            (lib / "libsame.so.1").write_bytes(bytes([number]) * 100)  # other content, same size
            os.utime(lib / "libsame.so.1", ns=(10**18, 10**18))
        keys = []
        for root in roots:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                key, _ = ldmemo.state_key(fd, (("/opt/lib", "scan"),))
            finally:
                os.close(fd)
            [(_, _, listing)] = marshal.loads(key)
            keys.append(next(entry for entry in listing if entry[0] == "libsame.so.1"))
        inodes = [(root / "opt/lib/libsame.so.1").stat().st_ino for root in roots]
        devices = [(root / "opt/lib/libsame.so.1").stat().st_dev for root in roots]
        assert inodes[0] == inodes[1] and devices[0] != devices[1]  # the case: per-mount inode numbers
        without_times = [entry[:-2] for entry in keys]  # name, mode, file system, inode, size
        assert without_times[0] != without_times[1], keys
        assert [entry[2] for entry in keys] == devices
    finally:
        for lib in mounted:
            subprocess.run(["umount", str(lib)], check=False)
