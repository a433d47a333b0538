"""Device cgroup under cgroup v1 (the host's hybrid set-up), with real runc.

runc creates the nodes listed in config.json `linux.devices` but, without matching
`resources.devices` rules, its cgroup denies them: exactly the situation of a device the
hook injected. allow_devices must open them up, one by one and with the access asked for.
"""

from __future__ import annotations

import os

import pytest

from cdi_hook.errors import HookError
from cdi_hook.live import cgroups, mountinfo
from cdi_hook.live.cgroups import DeviceRule, allow_devices
from conftest import require
from ci_rules import require_cgroup_v1
from oci_env import (assert_opens, assert_refused, assert_rules_enforced, detached_container, host_device_entries,
                     make_bundle)

NODES = ["/dev/kvm", "/dev/loop0", "/dev/loop1", "/dev/loop2"]
RULES = [DeviceRule("c", 10, 232, "rwm"), DeviceRule("b", 7, 0, "rw"), DeviceRule("b", 7, 2, "r")]


def require_v1_devices():
    require(all(os.path.exists(node) for node in NODES), f"needs host nodes {NODES}")
    require_cgroup_v1()
    require(not cgroups._is_unified(cgroups.DEFAULT_CGROUP_ROOT), "needs runc in cgroup v1 mode")


@pytest.fixture
def container(runc, tmp_path):
    require_v1_devices()
    bundle = make_bundle(tmp_path / "bundle", ["sleep", "60"],
                         extra_linux={"devices": host_device_entries(NODES)})
    with detached_container(bundle, runc=runc) as started:
        yield started


def devices_list(pid: int) -> list[str]:
    path = next(line.split(":", 2)[2] for line in open(f"/proc/{pid}/cgroup").read().splitlines()
                if "devices" in line.split(":")[1].split(","))
    return open(f"/sys/fs/cgroup/devices{path}/devices.list").read().split("\n")


def test_injected_devices_open_and_others_stay_denied(container):
    assert_refused(container, "/dev/kvm", "r")  # runc denies nodes it was not told to allow
    assert_refused(container, "/dev/loop0", "r")

    allow_devices(container.pid, RULES)

    assert_rules_enforced(container)
    listed = devices_list(container.pid)
    assert {"c 10:232 rwm", "b 7:0 rw", "b 7:2 r"} <= set(listed)


def test_allowing_again_is_harmless(container):
    allow_devices(container.pid, RULES)
    allow_devices(container.pid, RULES + [DeviceRule("b", 7, 1, "")])  # "" means rwm
    assert_opens(container, "/dev/loop1", "rw")
    assert_opens(container, "/dev/kvm", "rw")
    assert "b 7:1 rwm" in devices_list(container.pid)


def test_fifo_needs_no_rule_and_u_counts_as_c(container):
    allow_devices(container.pid, [DeviceRule("p", 0, 0), DeviceRule("u", 10, 232, "r")])
    assert_opens(container, "/dev/kvm", "r")
    assert_refused(container, "/dev/kvm", "w")


# --- without a container ----------------------------------------------------------------

def test_missing_process_is_a_one_line_hook_error():
    with pytest.raises(HookError) as failed:
        allow_devices(2**22 + 12345, [DeviceRule("c", 10, 232)])
    message = str(failed.value)
    assert message.startswith("device cgroup for c 10:232: ") and "\n" not in message


@pytest.mark.parametrize("rule, why", [
    (DeviceRule("x", 1, 3), "unknown device type"),
    (DeviceRule("c", -1, 3), "out of range"),
    (DeviceRule("c", 1, 1 << 20), "out of range"),
    (DeviceRule("c", 1, 3, "rwx"), "subset"),
])
def test_bad_rules_are_refused_before_touching_anything(rule, why):
    with pytest.raises(HookError, match=why):
        allow_devices(os.getpid(), [rule])


def test_nothing_to_allow_does_nothing():
    allow_devices(2**22 + 12345, [DeviceRule("p", 0, 0)])  # no cgroup lookup at all


def test_cgroup_dir_follows_mount_root(tmp_path):
    (tmp_path / "mnt" / "a" / "b").mkdir(parents=True)
    is_devices = lambda m: "devices" in m.super_options.split(",")  # noqa: E731
    mounts = [mountinfo.MountInfo(30, 1, 0, 30, "/", str(tmp_path / "other"), "rw", (), "cgroup", "cgroup",
                                  "rw,memory"),
              mountinfo.MountInfo(31, 1, 0, 31, "/outer", str(tmp_path / "mnt"), "rw", (), "cgroup", "cgroup",
                                  "rw,devices")]
    # /proc/<pid>/cgroup paths are absolute in the hierarchy; the mount may show a subtree.
    assert cgroups._cgroup_dir(mounts, "/outer/a/b", is_devices) == str(tmp_path / "mnt" / "a" / "b")
    assert cgroups._cgroup_dir(mounts, "/outerx/a", is_devices) is None
    assert cgroups._cgroup_dir(mounts, "/elsewhere", is_devices) is None


def test_mountinfo_escapes_are_decoded(tmp_path):
    (tmp_path / "dev cg ü" / "a").mkdir(parents=True)
    point = os.fsencode(tmp_path / "dev cg ü").replace(b" ", b"\\040")
    mounts = mountinfo.parse(b"31 1 0:31 /outer\\040x " + point + b" rw - cgroup cgroup rw,devices\n")
    assert cgroups._cgroup_dir(mounts, "/outer x/a", lambda m: True) == str(tmp_path / "dev cg ü" / "a")
