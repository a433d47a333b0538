"""Device cgroup under cgroup v2, with real runc and the kernel's BPF device programs.

runc runs in a private mount namespace with cgroup2 on /sys/fs/cgroup, so it uses its v2
driver and attaches a BPF_CGROUP_DEVICE program. allow_devices runs inside that namespace
too, as the hook would (it is runc's child). The programs attached are inspected from here
through /proc/<holder>/root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from cdi_hook.live import bpf
from cdi_hook.live.cgroups import DeviceRule, allow_devices_v2
from conftest import require, require_program
from oci_env import (REPO, assert_opens, assert_refused, assert_rules_enforced, cgroup2_namespace, detached_container,
                     host_device_entries, make_bundle)

NODES = ["/dev/kvm", "/dev/loop0", "/dev/loop1", "/dev/loop2"]


def allow_inside(namespace, pid: int, rules: list[DeviceRule]) -> subprocess.CompletedProcess:
    """allow_devices run as the hook runs it: a fresh process in runc's mount namespace."""
    code = ("import sys; from cdi_hook.live.cgroups import DeviceRule, allow_devices; "
            f"allow_devices({pid}, [DeviceRule(*r) for r in {[tuple(r) for r in rules]!r}])")
    return subprocess.run(namespace.enter + [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); " + code],
                          capture_output=True, text=True, timeout=60)


def attached(cgroup_dir: str) -> tuple[int, list[bpf.ProgInfo]]:
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags, ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
    finally:
        os.close(fd)
    infos = []
    for prog_id in ids:
        prog_fd = bpf.prog_get_fd_by_id(prog_id)
        try:
            infos.append(bpf.prog_info(prog_fd))
        finally:
            os.close(prog_fd)
    return flags, infos


@pytest.fixture
def namespace(runc):
    require(all(os.path.exists(node) for node in NODES), f"needs host nodes {NODES}")
    require_program("unshare")
    require_program("nsenter")
    with cgroup2_namespace() as ns:
        yield ns


@pytest.fixture
def container(namespace, runc, tmp_path):
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "60"],
                         extra_linux={"devices": host_device_entries(NODES)})
    with detached_container(bundle, runc=runc, root=str(tmp_path / "runc-root"), wrapper=namespace.enter) as started:
        started.cgroup_dir = namespace.path("/sys/fs/cgroup" + open(f"/proc/{started.pid}/cgroup").read().splitlines()[-1].split(":", 2)[2])
        yield started


def test_runc_attaches_one_multi_program(container):
    flags, programs = attached(container.cgroup_dir)
    assert flags == bpf.BPF_F_ALLOW_MULTI and len(programs) == 1
    assert bpf.split_prologue(programs[0].insns)[0] == []


def test_injected_devices_open_and_others_stay_denied(namespace, container):
    _, (runc_program,) = attached(container.cgroup_dir)
    assert_refused(container, "/dev/kvm", "r")
    assert_refused(container, "/dev/loop0", "r")

    done = allow_inside(namespace, container.pid, [DeviceRule("c", 10, 232, "rwm"), DeviceRule("b", 7, 0, "rw"),
                                                   DeviceRule("b", 7, 2, "r")])
    assert done.returncode == 0, done.stderr

    assert_rules_enforced(container)

    flags, (program,) = attached(container.cgroup_dir)
    assert flags == bpf.BPF_F_ALLOW_MULTI, "the runtime's attach flags are kept"
    assert program.name == "cdi_hook_dev"
    allows, original = bpf.split_prologue(program.insns)
    assert original == runc_program.insns, "runc's program is kept unchanged behind the prologue"
    assert len(allows) == 3


def test_second_run_rebuilds_instead_of_stacking(namespace, container):
    _, (runc_program,) = attached(container.cgroup_dir)
    for rules in ([DeviceRule("c", 10, 232, "r")], [DeviceRule("c", 10, 232, "w"), DeviceRule("b", 7, 1, "")]):
        done = allow_inside(namespace, container.pid, rules)
        assert done.returncode == 0, done.stderr
    _, (program,) = attached(container.cgroup_dir)
    assert program.insns == bpf.build_prologue([
        bpf.DeviceAllow(bpf.DEV_CHAR, 10, 232, bpf.ACC_READ | bpf.ACC_WRITE),
        bpf.DeviceAllow(bpf.DEV_BLOCK, 7, 1, bpf.ACC_READ | bpf.ACC_WRITE | bpf.ACC_MKNOD)]) + runc_program.insns
    assert_opens(container, "/dev/kvm", "rw")
    assert_opens(container, "/dev/loop1", "rw")

    # Asking for what is already allowed leaves the program alone.
    done = allow_inside(namespace, container.pid, [DeviceRule("c", 10, 232, "r")])
    assert done.returncode == 0, done.stderr
    assert attached(container.cgroup_dir)[1][0].prog_id == program.prog_id


# --- cgroups of our own: other attach modes ---------------------------------------------

DENY_ALL = [bpf.Insn(bpf.ALU32_MOV_K, bpf.R0, imm=0), bpf.Insn(bpf.JMP_EXIT)]


@pytest.fixture
def own_cgroup(namespace):
    path = namespace.path(f"/sys/fs/cgroup/cdi-test-{uuid.uuid4().hex[:12]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)  # the kernel detaches its programs with it


def attach_deny_all(cgroup_dir: str, flags: int) -> None:
    fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
    prog = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, DENY_ALL, "GPL")
    try:
        bpf.prog_attach(fd, prog, bpf.BPF_CGROUP_DEVICE, flags)
    finally:
        os.close(prog)
        os.close(fd)


def test_no_program_means_nothing_to_do(own_cgroup):
    allow_devices_v2(own_cgroup, [DeviceRule("c", 10, 232)])
    assert attached(own_cgroup) == (0, [])


@pytest.mark.parametrize("flags", [0, bpf.BPF_F_ALLOW_OVERRIDE])
def test_single_program_modes_are_replaced_in_place(own_cgroup, flags):
    attach_deny_all(own_cgroup, flags)
    allow_devices_v2(own_cgroup, [DeviceRule("c", 10, 232)])
    got_flags, (program,) = attached(own_cgroup)
    assert got_flags == flags
    assert bpf.split_prologue(program.insns) == ([bpf.DeviceAllow(bpf.DEV_CHAR, 10, 232, 7)], DENY_ALL)
    assert program.gpl_compatible, "a GPL program stays GPL"


def test_every_program_of_a_multi_cgroup_is_extended(own_cgroup):
    # All attached programs must say yes, so each one has to learn about the device.
    attach_deny_all(own_cgroup, bpf.BPF_F_ALLOW_MULTI)
    attach_deny_all(own_cgroup, bpf.BPF_F_ALLOW_MULTI)
    allow_devices_v2(own_cgroup, [DeviceRule("b", 7, 0, "r")])
    flags, programs = attached(own_cgroup)
    assert flags == bpf.BPF_F_ALLOW_MULTI and len(programs) == 2
    for program in programs:
        assert bpf.split_prologue(program.insns) == ([bpf.DeviceAllow(bpf.DEV_BLOCK, 7, 0, bpf.ACC_READ)], DENY_ALL)
