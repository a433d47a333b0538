"""Records, from a second review: each of these failed before its fix.

1. Devices given by `cdi-hook attach` are re-derived from today's specs by verify, detach
   (the devices that stay) and not seen by `stale` at all: after a driver-upgrade-style
   rewrite verify reports the new node and library "missing" (issue 21's bug, for attached
   devices), and a deleted spec of one attached device makes detach of another fail.
2. `cdi-hook stale` prunes the record of a container whose process has exited but which
   the runtime has not deleted yet (poststop still to come): poststop then finds no record,
   goes the older way from today's specs, and the recorded poststop work is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require
from test_record import GPU, LIB, _install_all_stages, _spec

OTHER = "other.example/dev=one"


def _sources(tmp_path: Path) -> Path:
    sources = tmp_path / "host"
    real = os.path.realpath(hook_env.LIBRARY_SOURCE)
    for version in (1, 2):
        (sources / f"v{version}").mkdir(parents=True)
        shutil.copy(real, sources / f"v{version}" / LIB)
    return sources


def _other_spec() -> dict:
    return {"cdiVersion": "0.6.0", "kind": OTHER.split("=")[0],
            "devices": [{"name": "one", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-null",
                                                                              "hostPath": "/dev/null"}]}}]}


@pytest.fixture
def plain(runc, tmp_path):
    """A running runc container no hook gave anything; devices come by `attach` only."""
    require(os.path.exists("/dev/loop0") and os.path.exists("/dev/loop1"), "needs /dev/loop0 and /dev/loop1")
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["sleep", "120"],
                                 rootfs=hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs"))
    with oci_env.detached_container(bundle, runc=runc) as c:
        c.spec_dir = tmp_path / "cdi"
        c.address = f"runc:{c.id}"
        yield c


def test_attached_device_after_upgrade_is_stale_not_missing(plain, tmp_path):
    c = plain
    sources = _sources(tmp_path)
    oci_env.write_spec(c.spec_dir, "test.json", _spec(sources, 1))
    done = env.cli(c.spec_dir, "attach", c.address, GPU)
    assert done.returncode == 0, done.stderr
    oci_env.write_spec(c.spec_dir, "test.json", _spec(sources, 2))  # the driver upgrade
    shutil.rmtree(sources / "v1")
    rc, checks = env.verify_json(c.spec_dir, c.address)
    # Today: node /dev/cdi-gpu1 and mount <lib dir 2> "missing", the old ones never checked.
    assert [x["item"] for x in checks if not x["ok"] and not x.get("stale")] == [], checks
    assert [x["device"] for x in checks if x.get("stale")] == [GPU], checks
    listed = env.cli(c.spec_dir, "stale")
    assert listed.returncode == 1 and c.id in listed.stdout, listed  # today: "no running container ..."


def test_detach_one_attached_device_when_another_ones_spec_is_gone(plain, tmp_path):
    c = plain
    sources = _sources(tmp_path)
    oci_env.write_spec(c.spec_dir, "test.json", _spec(sources, 1))
    oci_env.write_spec(c.spec_dir, "other.json", _other_spec())
    done = env.cli(c.spec_dir, "attach", c.address, GPU, OTHER)
    assert done.returncode == 0, done.stderr
    (c.spec_dir / "test.json").unlink()  # the vendor's spec of GPU is removed
    done = env.cli(c.spec_dir, "detach", c.address, OTHER)
    # Today: exit 1, "unresolvable CDI devices ... gpu": OTHER cannot be taken back at all.
    assert done.returncode == 0, (done.stdout, done.stderr)


def _wait_stopped(c, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(c._runc + ["state", c.id], capture_output=True, text=True)
        if state.returncode == 0 and json.loads(state.stdout)["status"] == "stopped":
            return
        time.sleep(0.1)
    raise AssertionError("the container did not stop")


@pytest.mark.parametrize("run_stale", [False, True])
def test_stale_between_exit_and_delete_keeps_poststop_work(runc, tmp_path, run_stale):
    """A spec poststop hook is recorded at createRuntime. The container's process exits; the
    spec is removed (the upgrade); the operator runs `cdi-hook stale`; then the runtime
    deletes the container and runs poststop: the recorded poststop hook must still run."""
    require(os.path.exists("/dev/loop0"), "needs /dev/loop0")
    marker = tmp_path / "poststop-ran"
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "gpu", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-gpu0", "hostPath": "/dev/loop0"}],
        "hooks": [{"hookName": "poststop", "path": shutil.which("touch"), "args": ["touch", str(marker)]}]}}]}
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [GPU], "sleep 120")
    _install_all_stages(bundle, tmp_path)
    with oci_env.detached_container(bundle, runc=runc) as c:
        os.kill(c.pid, signal.SIGKILL)
        _wait_stopped(c)
        for found in (tmp_path / "cdi").iterdir():
            found.unlink()
        if run_stale:
            listed = env.cli(tmp_path / "cdi", "stale")
            assert listed.returncode == 0, listed
        subprocess.run(c._runc + ["delete", c.id], capture_output=True, text=True)
    poststop = [line for line in hook_env.log_lines(log_file) if line["stage"] == "poststop"]
    assert marker.exists(), poststop
    assert [line.get("from") for line in poststop] == ["record"], poststop
