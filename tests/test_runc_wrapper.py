"""examples/runc-cdi (containerd 1.6 / Docker): the annotated bundle's devices reach the container."""

import json
import os
import subprocess
import uuid

import oci_env

WRAPPER = oci_env.REPO / "examples" / "runc-cdi"


def test_wrapper_applies_annotated_devices_then_runs_runc(runc, tmp_path):
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "vm.json", {"cdiVersion": "0.6.0", "kind": "vendor.com/vm", "devices": [
        {"name": "kvm", "containerEdits": {"deviceNodes": [{"path": "/dev/kvm"}], "env": ["VM=1"]}}]})
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["sh", "-c", "stat -c '%t:%T' /dev/kvm; echo VM=$VM; true < /dev/kvm && echo OPENED"],
                                 annotations={"cdi.k8s.io/test": "vendor.com/vm=kvm"})
    env = dict(os.environ, CDI_HOOK=f"{oci_env.REPO}/.venv/bin/cdi-hook", CDI_SPEC_DIRS=str(spec_dir),
               CDI_HOOK_INSECURE_SPECS="1")
    cid = "cdi-wrap-" + uuid.uuid4().hex[:8]
    try:
        result = subprocess.run([str(WRAPPER), "--root", str(tmp_path / "state"), "run", "--bundle", str(bundle), cid],
                                capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["runc", "--root", str(tmp_path / "state"), "delete", "--force", cid], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["a:e8", "VM=1", "OPENED"]


def test_wrapper_refuses_unknown_device_and_leaves_config(runc, tmp_path):
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["true"], annotations={"cdi.k8s.io/test": "vendor.com/vm=nope"})
    before = (bundle / "config.json").read_bytes()
    env = dict(os.environ, CDI_HOOK=f"{oci_env.REPO}/.venv/bin/cdi-hook", CDI_SPEC_DIRS=str(tmp_path / "empty"))
    result = subprocess.run([str(WRAPPER), "run", "--bundle", str(bundle), "never-started"],
                            capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "vendor.com/vm=nope" in result.stderr
    assert (bundle / "config.json").read_bytes() == before
    assert json.loads(before)["annotations"]
