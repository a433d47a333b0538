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
import time

import pytest

import hook_env
import oci_env
import running_env as env
from ci_rules import TIME_FACTOR
from conftest import require
from running_env import KVM, LOOP


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


# The container SIGSTOPs every process that appears in its pid namespace: attach's worker,
# which works there, never reports. (runc has nothing to compare: it runs no such worker.)
STOPPER = ('while :; do for p in /proc/[0-9]*; do n=${p#/proc/}; '
           '[ "$n" = 1 ] || kill -STOP "$n" 2>/dev/null; done; done')
# Shortened from attach.WORKER_DEADLINE_S; stretched on a slow machine (the TCG guest), where
# the attach command itself takes seconds to reach its worker.
DEADLINE_S = 3 * TIME_FACTOR


def _devices_list(pid: int) -> str:
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if "devices" in controllers.split(","):
            return open(f"/sys/fs/cgroup/devices{path}/devices.list").read()
    return ""  # cgroup v2: the programs stay as they were unless the worker reported


def _holds(state_dir: str) -> dict:
    """The holds (the dir itself may be made by the attempt, empty)."""
    return {k: v for k, v in oci_env.tree_snapshot(state_dir).items() if k} if os.path.isdir(state_dir) else {}


def test_a_container_that_stops_the_worker_cannot_hang_attach(runc, tmp_path):
    """attach fails after the worker's deadline with one line; the worker is killed; the
    device cgroup, the hold and the record are as they were (the cgroup is changed only after
    the worker reports). Its deadline is shortened here (attach.WORKER_DEADLINE_S)."""
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    document, _ = env.spec(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{KVM}"]\n')
    os.chmod(policy, 0o644)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [LOOP], STOPPER)  # loop: verify has work
    # A private holds dir: the session's may hold a stale kvm hold of an earlier test's
    # container, which this attach would take over and then release.
    state_dir = str(tmp_path / "held")
    with oci_env.detached_container(bundle, runc=runc) as c:
        before = (_devices_list(c.pid), _holds(state_dir))
        code = ("import sys; from cdi_hook.live import attach; from cdi_hook import cli; "
                f"attach.WORKER_DEADLINE_S = {DEADLINE_S}; sys.exit(cli.main(sys.argv[1:]))")
        start = time.monotonic()
        for command in ("attach", "verify"):
            done = env.cli(tmp_path / "cdi", *([command, f"runc:{c.id}"] + ([KVM] if command == "attach" else [])),
                           env={"CDI_HOOK_POLICY": str(policy), "CDI_HOOK_STATE_DIR": state_dir},
                           python_code=code, timeout=4 * DEADLINE_S)
            assert done.returncode == 1, done
            assert done.stderr.splitlines() == [done.stderr.strip()] and "stopped answering" in done.stderr, done
        assert time.monotonic() - start < 4 * DEADLINE_S + 10
        assert (_devices_list(c.pid), _holds(state_dir)) == before
        records = tmp_path / "attachments"
        assert not (records / f"{c.id}.json").exists()
        assert _living_in(c.pid) == []  # and no worker is left in the container


def _living_in(init: int) -> list[str]:
    """The processes of init's pid namespace but init, zombies aside (a killed worker's parent
    is its init then, which reaps when it will)."""
    ns = os.readlink(f"/proc/{init}/ns/pid")
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            if (p != str(init) and os.readlink(f"/proc/{p}/ns/pid") == ns
                    and "State:\tZ" not in open(f"/proc/{p}/status").read()):
                found.append(p)
        except OSError:
            pass
    return found
