"""attach / verify / detach under cgroup v2: runc in a private mount namespace with cgroup2 on
/sys/fs/cgroup (oci_env.cgroup2_namespace) attaches a BPF device program; cdi-hook runs in
that namespace too, as an administrator on a v2 host would. The runtime's own program code
stays after cdi-hook's prologue, and detach leaves no prologue behind."""

from __future__ import annotations

import os
import stat

import pytest

import hook_env
import oci_env
import running_env as env
from cdi_hook.live import bpf, bpf_eval, cgroups
from conftest import require, require_program
from running_env import KVM, LOOP, PAIR


@pytest.fixture
def started(runc, tmp_path):
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    require_program("unshare")
    require_program("nsenter")
    document, sources = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [LOOP], "sleep 120")
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    os.mknod(bundle / "rootfs" / "tmp" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    root = str(tmp_path / "runc-root")
    with oci_env.cgroup2_namespace() as ns, \
            oci_env.detached_container(bundle, runc=runc, root=root, wrapper=ns.enter) as container:
        container.ns = ns
        container.spec_dir = tmp_path / "cdi"
        container.rootfs = bundle / "rootfs"
        container.args = ("--runc-root", root)
        container.address = f"runc:{container.id}"
        cgroup = open(f"/proc/{container.pid}/cgroup").read().splitlines()[-1].split(":", 2)[2]
        container.cgroup_dir = ns.path("/sys/fs/cgroup" + cgroup)
        yield container


def _prologue(cgroup_dir: str) -> list:
    (allows,) = cgroups.prologue_allows(cgroup_dir)
    return allows


def test_attach_verify_detach_v2(started):
    c = started
    run = lambda *a: env.cli(c.spec_dir, *a, *c.args, enter=c.ns.enter)  # noqa: E731
    loop0 = bpf.DeviceAllow(bpf.DEV_BLOCK, 7, 0, bpf.ACC_ALL)
    assert _prologue(c.cgroup_dir) == [loop0]  # the hook's, at createRuntime
    done = run("verify", c.address)
    assert done.returncode == 0, done.stdout + done.stderr

    oci_env.assert_refused(c, "/tmp/kvm", "r")
    done = run("attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    oci_env.assert_opens(c, "/tmp/kvm", "r")
    assert c.exec(["cat", "/etc/cdi-config.txt"]).stdout == "read-only config\n"
    oci_env.assert_opens(c, "/dev/null", "rw")  # the runtime's rules are kept
    assert _prologue(c.cgroup_dir) == [loop0, bpf.DeviceAllow(bpf.DEV_CHAR, 10, 232, bpf.ACC_ALL)]
    done = run("verify", c.address, "--format", "json")
    assert done.returncode == 0, done.stdout
    assert '"cgroup c 10:232 rwm"' in done.stdout

    done = run("detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert c.exec(["ls", "/dev/kvm"]).returncode != 0
    assert _prologue(c.cgroup_dir) == [loop0]

    done = run("detach", c.address, LOOP)  # given at creation: the hook's prologue goes entirely
    assert done.returncode == 0, done.stderr
    assert _prologue(c.cgroup_dir) == []
    oci_env.assert_opens(c, "/dev/null", "rw")


def _programs(cgroup_dir: str) -> list:
    return [insns for _, insns in cgroups.attached_programs(cgroup_dir)]


def test_attach_failing_after_the_cgroup_step_restores_the_program(started, tmp_path):
    """The record cannot be saved (read-only mount) after the program was replaced: the
    earlier program comes back, instruction for instruction (the hook's prologue for loop0,
    then runc's code), and the rootfs and mounts are as they were."""
    c = started
    before_programs = _programs(c.cgroup_dir)
    before_tree = oci_env.tree_snapshot(c.rootfs)
    before_mounts = env.mountinfo_of(c.pid)
    with env.unsavable_records(tmp_path / "ro-state", c.id, enter=c.ns.enter) as state:
        done = env.cli(c.spec_dir, "attach", c.address, PAIR, *c.args, enter=c.ns.enter, env=state)
    assert done.returncode == 1 and "Read-only file system" in done.stderr, done.stderr
    assert "undo incomplete" not in done.stderr, done.stderr
    assert _programs(c.cgroup_dir) == before_programs
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    oci_env.assert_opens(c, "/tmp/loop0", "r")  # the hook's rule from creation
    oci_env.assert_opens(c, "/dev/null", "rw")  # runc's
    assert oci_env.tree_snapshot(c.rootfs) == before_tree
    assert env.mountinfo_of(c.pid) == before_mounts
    done = env.cli(c.spec_dir, "verify", c.address, *c.args, enter=c.ns.enter)
    assert done.returncode == 0, done.stdout + done.stderr


def test_device_program_interpreter_agrees_with_the_kernel(started):
    """The verify of v2 runs the attached program on a request: it says what the kernel does."""
    c = started
    fd = os.open(c.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _, (prog_id,) = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
    finally:
        os.close(fd)
    prog_fd = bpf.prog_get_fd_by_id(prog_id)
    insns = bpf.prog_info(prog_fd).insns
    os.close(prog_fd)

    def allowed(kind, major, minor, access) -> bool:
        return bpf_eval.run_device_program(insns, kind | access << 16, major, minor) == 1

    assert allowed(bpf.DEV_CHAR, 1, 3, bpf.ACC_READ | bpf.ACC_WRITE)  # /dev/null: runc's
    assert allowed(bpf.DEV_BLOCK, 7, 0, bpf.ACC_READ)  # loop0: the hook's prologue
    assert not allowed(bpf.DEV_CHAR, 10, 232, bpf.ACC_READ)  # kvm: refused ...
    oci_env.assert_refused(c, "/tmp/kvm", "r")  # ... as the kernel refuses it
    assert allowed(bpf.DEV_CHAR, 10, 232, bpf.ACC_MKNOD)  # runc's "c *:* m"
