"""A state whose pid is not a process of this container is refused before anything changes.

The hook acts on /proc/<pid>: it enters that mount namespace to create nodes and mounts,
writes that process's device cgroup, moves interfaces into its network namespace. A dead
pid, a host process (pid 1, the caller itself) or another container's process must never
receive the devices: the hook exits non-zero naming the pid, and neither the bundle's rootfs
nor the other process's world changed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import hook_env
import oci_env

ALL = f"{hook_env.VENDOR}=all"


def _hook(bundle: Path, spec_dir: Path, pid: int, log_file: Path) -> subprocess.CompletedProcess:
    state = {"ociVersion": "1.0.2", "id": "cdi-attack-pid", "status": "creating", "pid": pid,
             "bundle": str(bundle), "annotations": {}}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CDI_SPEC_DIRS": str(spec_dir),
           "CDI_HOOK_INSECURE_SPECS": "1", "CDI_HOOK_LOG": str(log_file)}
    return subprocess.run([oci_env.PYTHON, "-I", "-m", "cdi_hook", "hook", "--stage", "createRuntime"],
                          input=json.dumps(state).encode(), capture_output=True, env=env, cwd=oci_env.REPO,
                          timeout=60)


def _setup(tmp_path: Path):
    sources = hook_env.host_files(tmp_path)
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, hook_env.full_spec(sources), [ALL], "echo RAN")
    return bundle, tmp_path / "cdi", log_file


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("who", ["dead pid", "host pid 1", "the test process"])
def test_pid_of_no_container_is_refused(root_only, tmp_path, who):
    bundle, spec_dir, log_file = _setup(tmp_path)
    pid = {"dead pid": _dead_pid, "host pid 1": lambda: 1, "the test process": os.getpid}[who]()
    rootfs = bundle / "rootfs"
    before = oci_env.tree_snapshot(rootfs)
    mounts_before = oci_env.host_mount_points()
    devices_list = Path("/sys/fs/cgroup/devices/devices.list")
    cgroup_before = devices_list.read_text() if devices_list.exists() else None
    result = _hook(bundle, spec_dir, pid, log_file)
    stderr = result.stderr.decode()
    assert result.returncode != 0, stderr
    assert "pid" in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert oci_env.tree_snapshot(rootfs) == before
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    if cgroup_before is not None:
        assert devices_list.read_text() == cgroup_before
    [line] = hook_env.log_lines(log_file)
    assert "pid" in line["error"]


def test_pid_of_another_container_is_refused(runc, tmp_path):
    """A running container (already pivoted into its own rootfs) is not the bundle's container."""
    other = oci_env.make_bundle(tmp_path / "other", ["sleep", "60"])
    bundle, spec_dir, log_file = _setup(tmp_path)
    with oci_env.detached_container(other) as container:
        before_other = container.exec(["ls", "-la", "/dev", "/etc", "/opt", "/mnt"]).stdout
        result = _hook(bundle, spec_dir, container.pid, log_file)
        stderr = result.stderr.decode()
        assert result.returncode != 0 and "not this container's process" in stderr, stderr
        assert container.exec(["ls", "-la", "/dev", "/etc", "/opt", "/mnt"]).stdout == before_other
        assert container.exec(["cat", "/sys/fs/cgroup/devices/devices.list"]).stdout.count("10:232") == 0


def test_the_real_container_pid_is_accepted(runc, tmp_path):
    """The check lets the runtime's own pid through, at createRuntime (before pivot_root)."""
    bundle, _, _ = _setup(tmp_path)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
