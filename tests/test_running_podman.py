"""Addressing a real Podman container (`podman:NAME`): podman inspect gives its init's pid
and the OCI config Podman handed runc; attach, verify and detach work through them.
Offline: the container runs a local busybox rootfs (`--rootfs`), no image."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid

import pytest

import oci_env
import running_env as env
from conftest import require, require_program
from running_env import KVM


@pytest.fixture
def podman_container(runc, tmp_path):
    require_program("podman")
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    document, _ = env.spec(tmp_path)
    oci_env.write_spec(tmp_path / "cdi", "test.json", document)
    rootfs = oci_env.make_rootfs(tmp_path / "rootfs")
    (rootfs / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    os.mknod(rootfs / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    name = "cdi-test-" + uuid.uuid4().hex[:12]
    # --network none: no firewall work (Podman 5's netavark needs nft, which a minimal Debian 13 lacks)
    started = subprocess.run(["podman", "run", "-d", "--name", name, "--runtime", "runc", "--network", "none",
                              "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000",
                              "--rootfs", str(rootfs), "sleep", "120"],
                             capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    try:
        assert started.returncode == 0, started.stderr
        container = oci_env.DetachedContainer(name, 0, ["podman"])
        container.spec_dir = tmp_path / "cdi"
        container.address = f"podman:{name}"
        yield container
    finally:
        subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)


def test_podman_attach_verify_detach(podman_container):
    c = podman_container
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    assert c.exec(["cat", "/etc/cdi-config.txt"]).stdout == "read-only config\n"
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and (KVM, "node /dev/kvm") in {(x["device"], x["item"]) for x in checks}, env.failed(checks)
    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert c.exec(["ls", "/dev/kvm"]).returncode != 0
    subprocess.run(["podman", "stop", "-t", "0", c.id], capture_output=True, timeout=120)
    done = env.cli(c.spec_dir, "verify", c.address)
    assert done.returncode == 1 and "not running" in done.stderr, done.stderr
