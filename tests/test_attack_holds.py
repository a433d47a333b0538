"""Exclusive devices are held by what they are on the host, with real runc (issue 22, parts 2
and 4).

One host device listed twice, as `0` and as `all` (the NVIDIA generator's layout for a node
with one GPU): /dev/loop0 and one host folder. A hold taken under one name excludes the
other. A hold left under a container id that a new container reuses (its poststop never
ran) is replaced by the new container's, never inherited. detach that cannot take back a
mount (the container covered it with its own) exits 1 and keeps the device given and held.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require

DEV = hook_env.VENDOR
ZERO, ALL = f"{DEV}=0", f"{DEV}=all"
HOLD = "node-b-7-0.json"  # the hold on /dev/loop0, whichever name it was taken under


def _spec(host_dir: Path) -> dict:
    edits = {"deviceNodes": [{"path": "/dev/cdi-gpu0", "hostPath": "/dev/loop0"}],
             "mounts": [{"hostPath": str(host_dir), "containerPath": "/mnt/cdi-gpu0", "options": ["rw", "rbind"]}]}
    return {"cdiVersion": "0.6.0", "kind": DEV, "devices": [{"name": "0", "containerEdits": edits},
                                                             {"name": "all", "containerEdits": edits}]}


@pytest.fixture
def setting(runc, tmp_path):
    require(os.path.exists("/dev/loop0"), "needs /dev/loop0")
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "firmware.bin").write_text("device files\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{DEV}=*"]\n')
    policy.chmod(0o644)
    return {"spec": _spec(host_dir), "env": {"CDI_HOOK_POLICY": str(policy)}, "held": Path(
        os.environ["CDI_HOOK_STATE_DIR"])}


def _bundle(tmp_path: Path, setting: dict, device: str, name: str, script: str = "sleep 120") -> Path:
    top = tmp_path / name
    top.mkdir()
    bundle, _ = hook_env.bundle_with_hook(top, setting["spec"], [device], script, extra_env=setting["env"])
    config = json.loads((bundle / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    config["hooks"]["poststop"] = [dict(entry, args=entry["args"][:-1] + ["poststop"])]
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def _hold(setting: dict) -> dict:
    text = (setting["held"] / HOLD).read_text()
    return json.loads(text.split("\n", 1)[1])  # after the state layer's checksum line


def test_alias_of_a_held_device_is_refused_naming_the_holder(setting, tmp_path):
    first = _bundle(tmp_path, setting, ZERO, "first")
    second = _bundle(tmp_path, setting, ALL, "second", script="ls /mnt/cdi-gpu0")
    with oci_env.detached_container(first) as holder:
        result = oci_env.run_container(second)
        assert result.returncode != 0, "a second container got the host device another holds under another name"
        assert _hold(setting)["container"] == holder.id
        assert (f"exclusive device for {ALL}: held as {ZERO} by running container '{holder.id}' (pid {holder.pid}; "
                f"host device b 7:0)") in result.stderr, result.stderr
        assert not (second / "rootfs" / "dev" / "cdi-gpu0").exists()
        explain = env.cli(second / ".." / "cdi", "explain", "--bundle", str(second), env=setting["env"])
        assert f"exclusive, held by {holder.id} as {ZERO} (b 7:0)" in explain.stdout, explain
    result = oci_env.run_container(second)  # its poststop gave the device back
    assert result.returncode == 0 and "firmware.bin" in result.stdout, result.stderr


def test_reused_container_id_replaces_a_dead_holders_hold(setting, tmp_path, monkeypatch):
    """A container died without its poststop; a new one gets its id (runc delete, run
    again). The new one must hold the device as itself: left as the dead process's record,
    the hold is stale to everyone else, and a second container takes the device."""
    fixed = uuid.uuid4()
    monkeypatch.setattr(oci_env.uuid, "uuid4", lambda: fixed)
    cid = "cdi-test-" + fixed.hex[:12]
    setting["held"].mkdir(mode=0o700, exist_ok=True)
    from cdi_hook import state

    dead = {"container": cid, "pid": 999999999, "start": 1}
    for name, record in ((HOLD, dict(dead, device=ZERO, key="b 7:0")),  # by the host device
                         (ZERO.replace("/", "%2F") + ".json", dead)):  # by name: a cdi-hook of before
        state.write_atomic(str(setting["held"] / name), state.encode_record(record))
    first = _bundle(tmp_path, setting, ZERO, "first")
    with oci_env.detached_container(first) as holder:
        assert holder.id == cid
        monkeypatch.undo()
        result = oci_env.run_container(_bundle(tmp_path, setting, ZERO, "second", script="true"))
        assert result.returncode != 0, "a second container got the device: the holder inherited a dead hold"
        assert f"by running container '{cid}' (pid {holder.pid}" in result.stderr, result.stderr
        assert (_hold(setting)["pid"], _hold(setting)["container"]) == (holder.pid, cid)
    (setting["held"] / (ZERO.replace("/", "%2F") + ".json")).unlink(missing_ok=True)


def test_detach_that_cannot_remove_a_mount_fails_and_keeps_the_hold(setting, tmp_path):
    """The container covers the device's mount with one of its own (a container with
    CAP_SYS_ADMIN can): detach cannot reach the device's mount under it, which the
    container gets back by unmounting its cover. detach exits 1 naming the mount, the
    device stays given and held (a second container asking for it is refused); once the cover is gone, detach again takes it back and gives the hold back."""
    first = _bundle(tmp_path, setting, ZERO, "first")
    second = _bundle(tmp_path, setting, ZERO, "second", script="true")
    spec_dir = tmp_path / "first" / "cdi"
    with oci_env.detached_container(first) as c:
        def in_container(*argv: str) -> None:
            done = subprocess.run(c._runc + ["exec", "--cap", "CAP_SYS_ADMIN", c.id, *argv], capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, done.stderr

        in_container("mount", "-t", "tmpfs", "cover", "/mnt/cdi-gpu0")
        done = env.cli(spec_dir, "detach", f"runc:{c.id}", ZERO, env=setting["env"])
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert "detached" not in done.stdout, done.stdout
        refused = oci_env.run_container(second)
        assert refused.returncode != 0, "the hold was released with the device still mounted in the first container"
        assert f"held as {ZERO} by running container '{c.id}'" in refused.stderr, refused.stderr
        lines = done.stderr.splitlines()
        assert any("mount /mnt/cdi-gpu0: another mount covers it" in line for line in lines), lines
        assert any("stays given" in line and "stays held" in line for line in lines), lines
        assert _hold(setting)["container"] == c.id

        in_container("umount", "/mnt/cdi-gpu0")  # the device's files are reachable again
        assert "firmware.bin" in c.exec(["ls", "/mnt/cdi-gpu0"]).stdout
        done = env.cli(spec_dir, "detach", f"runc:{c.id}", ZERO, env=setting["env"])
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "firmware.bin" not in c.exec(["ls", "/mnt/cdi-gpu0"]).stdout
        assert not (setting["held"] / HOLD).exists()
