"""verify / attach / detach on real detached runc containers under cgroup v1.

The container is started with cdi-hook as its createRuntime hook and one device (loop)
requested at creation; kvm is attached and detached while it runs. What the container
sees is asked from inside it (runc exec): the device cgroup refusing a node it made itself
before the attach, opening it after, the mounted file, the loader cache.
"""

from __future__ import annotations

import os
import stat

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require
from running_env import BAD, KVM, LOOP


@pytest.fixture
def started(runc, tmp_path):
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    document, sources = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [LOOP], "sleep 120")
    # The image's own nodes of the devices: the device cgroup alone decides their opening.
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    os.mknod(bundle / "rootfs" / "tmp" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    with oci_env.detached_container(bundle, runc=runc) as container:
        container.spec_dir = tmp_path / "cdi"
        container.sources = sources
        container.rootfs = bundle / "rootfs"
        container.address = f"runc:{container.id}"
        yield container


def test_verify_attach_detach(started):
    c = started
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and checks, checks
    assert {(x["device"], x["item"]) for x in checks} == {(LOOP, "node /dev/loop0"), (LOOP, "cgroup b 7:0 rwm")}

    oci_env.assert_refused(c, "/tmp/kvm", "r")  # the cgroup refuses kvm before the attach
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    oci_env.assert_opens(c, "/tmp/kvm", "r")
    shown = c.exec(["sh", "-c", "cat /etc/cdi-config.txt; stat -c '%a %u:%g %t:%T' /dev/kvm; "
                                "echo x > /etc/cdi-config.txt || echo RO-REFUSED"])
    assert shown.stdout.splitlines() == ["read-only config", "660 0:44 a:e8", "RO-REFUSED"], shown
    cache = (c.rootfs / "etc" / "ld.so.cache").read_bytes()
    assert c.sources["library_in_container"].encode() + b"\0" in cache
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)
    items = {(x["device"], x["item"]) for x in checks}
    assert (KVM, "cgroup c 10:232 rwm") in items and (KVM, "mount /etc/cdi-config.txt") in items
    assert (KVM, f"ld cache {c.sources['library_in_container']}") in items
    assert f"{c.id}.json" in env.record_files()
    record = f"{c.id}.json"
    record_path = os.path.join(os.path.dirname(os.environ["CDI_HOOK_STATE_DIR"]), "attachments", record)
    assert stat.S_IMODE(os.stat(record_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(record_path)).st_mode) == 0o700

    again = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert again.returncode == 1 and "already given" in again.stderr

    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    gone = c.exec(["sh", "-c", "ls /dev/kvm /etc/cdi-config.txt /mnt/cdi-dir /opt/cdi-libs 2>&1; "
                               "grep -c cdi /proc/mounts"])
    assert gone.stdout.count("No such file") == 4 and gone.stdout.splitlines()[-1] == "0", gone
    oci_env.assert_refused(c, "/tmp/kvm", "r")  # access withdrawn
    oci_env.assert_opens(c, "/tmp/loop0", "r")  # the creation device keeps its own
    assert c.sources["library_in_container"].encode() not in (c.rootfs / "etc" / "ld.so.cache").read_bytes()
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)

    # A node removed inside the container: verify names it, exit 1, one line in text form.
    assert c.exec(["rm", "/dev/loop0"]).returncode == 0
    done = env.cli(c.spec_dir, "verify", c.address)
    assert done.returncode == 1 and done.stdout.strip() == f"{LOOP}: node /dev/loop0: missing", done

    # A device given at creation can be detached too: its access goes.
    done = env.cli(c.spec_dir, "detach", c.address, LOOP)
    assert done.returncode == 0, done.stderr
    oci_env.assert_refused(c, "/tmp/loop0", "r")
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert (rc, checks) == (0, [])


def test_failed_attach_leaves_nothing(started):
    c = started
    before_tree = oci_env.tree_snapshot(c.rootfs)
    before_mounts = env.mountinfo_of(c.pid)
    done = env.cli(c.spec_dir, "attach", c.address, KVM, BAD)
    assert done.returncode == 1
    assert "/proc/cdi-bad" in done.stderr and BAD in done.stderr, done.stderr
    assert oci_env.tree_snapshot(c.rootfs) == before_tree
    assert env.mountinfo_of(c.pid) == before_mounts
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)


def test_refusals(started, tmp_path):
    c = started
    done = env.cli(c.spec_dir, "attach", c.address, f"{env.VENDOR}=nosuch")
    assert done.returncode == 1 and "nosuch" in done.stderr
    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 1 and "not given" in done.stderr
    done = env.cli(c.spec_dir, "verify", "runc:cdi-test-nosuch")
    assert done.returncode == 1 and "cdi-test-nosuch" in done.stderr and "Traceback" not in done.stderr
    assert env.cli(c.spec_dir, "verify", f"pid:{c.pid}").returncode == 1  # no --bundle: said so
    rc, _ = env.verify_json(c.spec_dir, f"pid:{c.pid}", "--bundle", str(tmp_path / "bundle"))
    assert rc == 0
    assert c.exec(["true"]).returncode == 0
    assert os.system(f"runc pause {c.id}") == 0
    try:
        done = env.cli(c.spec_dir, "attach", c.address, KVM)
        assert done.returncode == 1 and "paused" in done.stderr, done.stderr
    finally:
        os.system(f"runc resume {c.id}")
