"""verify on a container that got its device from the live hook at creation (createRuntime),
under cgroup v1 and v2. Under v2 the attached program is the hook's prologue followed by
runc's own code: verify's interpreter runs all of it. Then three things are broken from
outside the plan (the node's mode changed inside, a mount unmounted, the cgroup's access
taken away) and verify names each, exit 1, in text and in JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

import hook_env
import oci_env
import running_env as env
from cdi_hook.live import bpf, cgroups
from ci_rules import require_cgroup_v1
from conftest import require, require_program
from running_env import KVM

UMOUNT_IN = ("import os, sys; from cdi_hook.live import syscalls as s; "
             "s.setns(os.open(f'/proc/{sys.argv[1]}/ns/mnt', os.O_RDONLY), s.CLONE_NEWNS); s.umount2(sys.argv[2])")
LIBRARY_ITEM = f"ld cache {hook_env.LIB_DIR_IN_CONTAINER}/libz.so.1"
EXPECTED_ITEMS = {"node /dev/kvm", "mount /etc/cdi-config.txt", "mount /mnt/cdi-dir",
                  f"mount {hook_env.LIB_DIR_IN_CONTAINER}/libz.so.1", LIBRARY_ITEM, "cgroup c 10:232 rwm"}


@pytest.fixture(params=["v1", "v2"])
def created_with_kvm(request, runc, tmp_path):
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    if request.param == "v1":
        require_cgroup_v1()
    document, _ = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [KVM], "sleep 120")
    with contextlib.ExitStack() as stack:
        enter, args = [], ()
        if request.param == "v2":
            require_program("unshare")
            require_program("nsenter")
            ns = stack.enter_context(oci_env.cgroup2_namespace())
            enter, args = ns.enter, ("--runc-root", str(tmp_path / "runc-root"))
        c = stack.enter_context(oci_env.detached_container(bundle, runc=runc, root=args[1] if args else None,
                                                            wrapper=enter))
        c.version = request.param
        c.run = lambda *a: env.cli(tmp_path / "cdi", *a, *args, enter=enter)  # noqa: E731
        c.address = f"runc:{c.id}"
        lines = open(f"/proc/{c.pid}/cgroup").read().splitlines()
        if request.param == "v1":
            path = next(line.split(":", 2)[2] for line in lines if line.split(":")[1] == "devices")
            c.cgroup_dir = "/sys/fs/cgroup/devices" + path
        else:
            c.cgroup_dir = ns.path("/sys/fs/cgroup" + lines[-1].split(":", 2)[2])
        yield c


def _checks(c) -> tuple[int, list[dict]]:
    done = c.run("verify", c.address, "--format", "json")
    assert done.returncode in (0, 1), done.stderr
    checks = json.loads(done.stdout)
    assert isinstance(checks, list)
    for check in checks:
        assert set(check) == {"device", "item", "ok", "detail"}, check
        assert [type(check[k]) for k in ("device", "item", "ok", "detail")] == [str, str, bool, str], check
    return done.returncode, checks


def test_verify_devices_the_hook_gave_at_creation(created_with_kvm):
    c = created_with_kvm
    rc, checks = _checks(c)
    assert rc == 0, env.failed(checks)
    assert {(x["device"], x["item"]) for x in checks} == {(KVM, item) for item in EXPECTED_ITEMS}
    oci_env.assert_opens(c, "/dev/kvm", "rw")  # and the kernel agrees

    assert c.exec(["chmod", "600", "/dev/kvm"]).returncode == 0
    # Unmounted in the container's mount namespace by this interpreter: nsenter would run the
    # image's umount, and Debian 13's busybox-static has no such applet.
    umount = subprocess.run([sys.executable, "-c", UMOUNT_IN, str(c.pid), "/etc/cdi-config.txt"],
                            capture_output=True, text=True)
    assert umount.returncode == 0, umount.stderr
    if c.version == "v1":
        with open(os.path.join(c.cgroup_dir, "devices.deny"), "w") as deny:
            deny.write("c 10:232 rwm")
        refused = "devices.list does not allow c 10:232 rwm"
    else:  # the hook's prologue taken away: runc's code alone refuses kvm
        cgroups.set_prologues(c.cgroup_dir, lambda _index, _current: [])
        fd = os.open(c.cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _, (prog_id,) = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
        finally:
            os.close(fd)
        refused = f"device program {prog_id} refuses c 10:232 "
    oci_env.assert_refused(c, "/dev/kvm", "r")

    rc, checks = _checks(c)
    assert rc == 1
    wrong = {x["item"]: x["detail"] for x in checks if not x["ok"]}
    assert {x["device"] for x in checks if not x["ok"]} == {KVM}
    assert set(wrong) == {"node /dev/kvm", "mount /etc/cdi-config.txt", "cgroup c 10:232 rwm"}, wrong
    assert wrong["node /dev/kvm"] == "mode 600, not 660"
    assert wrong["mount /etc/cdi-config.txt"] == "not mounted"
    assert wrong["cgroup c 10:232 rwm"].startswith(refused), wrong
    assert {x["item"] for x in checks if x["ok"]} == EXPECTED_ITEMS - set(wrong)

    done = c.run("verify", c.address)  # text: one line per discrepancy, naming device and item
    assert done.returncode == 1
    assert sorted(done.stdout.splitlines()) == sorted(f"{KVM}: {item}: {detail}" for item, detail in wrong.items())
