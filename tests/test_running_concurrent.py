"""attach and detach of one container at the same time: neither loses the other's change to
the record (each holds the container's lock from the record's load to its save)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import hook_env
import oci_env
import running_env as env
from conftest import require
from running_env import KVM, LOOP


def _start(spec_dir, *args: str) -> subprocess.Popen:
    environment = dict(os.environ, CDI_SPEC_DIRS=str(spec_dir), CDI_HOOK_INSECURE_SPECS="1")
    return subprocess.Popen([sys.executable, "-m", "cdi_hook", *args], env=environment, cwd=str(oci_env.REPO),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _both(spec_dir, command: str, address: str) -> None:
    runs = [_start(spec_dir, command, address, name) for name in (KVM, LOOP)]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, (out, err)


def test_concurrent_attaches_and_detaches_keep_every_record_update(runc, tmp_path):
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    document, _ = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [], "sleep 120")
    spec_dir = tmp_path / "cdi"
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))  # the image's own
    with oci_env.detached_container(bundle, runc=runc) as c:
        address = f"runc:{c.id}"
        _both(spec_dir, "attach", address)
        rc, checks = env.verify_json(spec_dir, address)
        assert rc == 0 and {x["device"] for x in checks} == {KVM, LOOP}, env.failed(checks)
        _both(spec_dir, "detach", address)
        rc, checks = env.verify_json(spec_dir, address)
        assert (rc, checks) == (0, [])
        assert f"{c.id}.json" not in env.record_files()
        oci_env.assert_refused(c, "/tmp/kvm", "r")  # kvm's access withdrawn
