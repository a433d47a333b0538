"""A hostile running container cannot make `cdi-hook attach` write or mount outside it.

After its start the container plants symlinks where the device's node and mounts go: to
absolute host paths, through `..` chains, and through /proc's magic links (its init's root,
a way out of a chroot). attach resolves every path from the container's root fd with
openat2 RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS: the plain symlinks lead to places inside the
container, the magic links are refused. The host folder the symlinks name is compared entry by
entry, and the host's mount table too. (No runc control run: runc has no attach to compare.)
"""

from __future__ import annotations

import os
import stat

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require
from running_env import KVM


@pytest.fixture
def hostile(runc, tmp_path):
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    document, sources = env.spec(tmp_path)
    victim = tmp_path / "host-victim"
    (victim / "dir").mkdir(parents=True)
    (victim / "victim.txt").write_text("host file\n")
    (victim / "dir" / "hello").write_text("host dir\n")
    os.mknod(victim / "kvm-target", stat.S_IFREG | 0o644)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [], "sleep 120")
    with oci_env.detached_container(bundle, runc=runc) as container:
        container.spec_dir = tmp_path / "cdi"
        container.victim = victim
        container.rootfs = bundle / "rootfs"
        container.address = f"runc:{container.id}"
        yield container


def _plant(container, script: str) -> None:
    done = container.exec(["sh", "-c", script])
    assert done.returncode == 0, done.stderr


def test_symlinks_to_host_paths_lead_inside(hostile, tmp_path):
    c, v = hostile, hostile.victim
    _plant(c, f"ln -s {v}/victim.txt /etc/cdi-config.txt && mkdir -p /mnt && ln -s ../../../../../../..{v}/dir "
              f"/mnt/cdi-dir && ln -s {v}/kvm-target /dev/kvm && ln -s /../../..{v} /opt")
    before, mounts_before = oci_env.tree_snapshot(v), oci_env.host_mount_points()
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    assert oci_env.tree_snapshot(v) == before
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    # What the symlinks named, the container got inside itself.
    inside = c.rootfs / str(v).lstrip("/")
    assert (inside / "victim.txt").exists() and (inside / "dir").is_dir()
    assert c.exec(["cat", "/etc/cdi-config.txt"]).stdout == "read-only config\n"
    assert stat.S_ISCHR(os.stat(inside / "kvm-target").st_mode)  # the node, made inside
    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    assert oci_env.tree_snapshot(v) == before
    assert not (inside / "kvm-target").exists() and not (inside / "victim.txt").exists()


def test_magic_links_and_swapped_mount_points_are_refused(hostile, tmp_path):
    c, v = hostile, hostile.victim
    # /proc/1/root is the container's own root, but reached through a magic link, which could
    # as well be a host process's: refused. /mnt/cdi-dir, a mount point, swapped for a link to it.
    _plant(c, f"ln -s /proc/1/root/../../../../..{v}/victim.txt /etc/cdi-config.txt && "
              f"mkdir -p /mnt && ln -s /proc/self/root{v}/dir /mnt/cdi-dir")
    rootfs_before = oci_env.tree_snapshot(c.rootfs)
    before, mounts_before = oci_env.tree_snapshot(v), oci_env.host_mount_points()
    container_mounts = env.mountinfo_of(c.pid)
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 1 and KVM in done.stderr, done.stderr
    assert oci_env.tree_snapshot(v) == before
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    assert oci_env.tree_snapshot(c.rootfs) == rootfs_before  # and nothing of it stayed inside
    assert env.mountinfo_of(c.pid) == container_mounts
