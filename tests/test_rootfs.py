"""Path handling in an untrusted rootfs: resolution stays inside, creation is undone exactly."""

from __future__ import annotations

import os
import stat

import pytest

from cdi_hook.live.rootfs import Rootfs, create_dir, create_empty_file
from cdi_hook.live import syscalls


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "rootfs"
    host = tmp_path / "host"
    root.mkdir()
    host.mkdir()
    (host / "marker").write_text("host\n")
    rootfs = Rootfs.open(str(root))
    yield root, host, rootfs
    rootfs.close()


def host_untouched(host):
    return sorted(p.name for p in host.iterdir()) == ["marker"]


def test_creates_missing_parents_and_undoes_them(tree):
    root, host, rootfs = tree
    fd, created = rootfs.ensure("/a/b/c/file", create_empty_file)
    os.close(fd)
    assert created and (root / "a/b/c/file").is_file()
    assert rootfs.undo() == []
    assert list(root.iterdir()) == []


def test_existing_entry_is_opened_not_created(tree):
    root, _, rootfs = tree
    (root / "etc").mkdir()
    fd, created = rootfs.ensure("etc", create_dir)
    os.close(fd)
    assert not created
    rootfs.undo()
    assert (root / "etc").is_dir()  # not ours: kept


@pytest.mark.parametrize("link", ["absolute", "dotdot"])
def test_symlinked_parent_resolves_inside(tree, link):
    root, host, rootfs = tree
    target = str(host) if link == "absolute" else "../" * 10 + str(host).lstrip("/")
    (root / "usr").mkdir()
    (root / "usr" / "lib").symlink_to(target)
    fd, _ = rootfs.ensure("/usr/lib/x/libfoo.so.1", create_empty_file)
    os.close(fd)
    assert host_untouched(host)
    assert (root / str(host).lstrip("/") / "x" / "libfoo.so.1").is_file()
    rootfs.undo()
    assert not (root / str(host).lstrip("/") / "x").exists()


def test_dangling_symlink_as_final_component_is_followed_inside(tree):
    root, host, rootfs = tree
    (root / "dev").mkdir()
    (root / "dev" / "node").symlink_to(str(host / "newnode"))
    fd, created = rootfs.ensure("/dev/node", create_empty_file)
    os.close(fd)
    assert created and host_untouched(host)
    assert (root / str(host).lstrip("/") / "newnode").is_file()


def test_symlink_loop_fails_cleanly(tree):
    root, _, rootfs = tree
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("a")
    with pytest.raises(OSError):
        rootfs.ensure("/a/x", create_empty_file)


def test_file_in_the_way_of_a_directory(tree):
    root, _, rootfs = tree
    (root / "etc").write_text("not a dir")
    with pytest.raises(NotADirectoryError):
        rootfs.open_dir("etc/ld.so.conf.d")


def test_open_path_never_leaves_the_root(tree):
    root, host, rootfs = tree
    (root / "escape").symlink_to("/" + str(host / "marker").lstrip("/"))
    with pytest.raises(FileNotFoundError):
        rootfs.open_path("escape")
    with pytest.raises(FileNotFoundError):
        rootfs.open_path("../../../../" + str(host / "marker"))


def test_mknod_through_ensure_with_rdev_check(tree, root_only):
    root, _, rootfs = tree
    rdev = os.stat("/dev/null").st_rdev
    fd, created = rootfs.ensure("/dev/null", lambda p, n: os.mknod(n, stat.S_IFCHR | 0o600, rdev, dir_fd=p))
    st = os.fstat(fd)
    os.chmod(syscalls.fd_path(fd), 0o666)
    os.close(fd)
    assert created and stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev
    assert stat.S_IMODE((root / "dev" / "null").lstat().st_mode) == 0o666


def test_openat2_retries_the_kernels_eagain(tree, monkeypatch):
    """RESOLVE_IN_ROOT answers EAGAIN for a ".." when a mount or rename happened anywhere
    meanwhile (seen here while other containers started): it is retried, not a failure."""
    import errno
    import types

    root, _, rootfs = tree
    (root / "dir").mkdir()
    real = syscalls._sys  # the compiled extension, or its ctypes stand-in
    refusals = []

    def busy_system(*args):
        if len(refusals) < 3:
            refusals.append(args)
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable", args[-1])
        return real.openat2(*args)

    monkeypatch.setattr(syscalls, "_sys", types.SimpleNamespace(openat2=busy_system))
    fd = rootfs.open_dir("dir/../dir")
    os.close(fd)
    assert len(refusals) == 3
