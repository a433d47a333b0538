"""Image symlinks that steer a spec's mount onto the runtime's own mounts or into host volumes.

The image cannot name host paths (tests/test_attack_symlinks.py), but it can name the
container's own mounts: a volume the runtime bind-mounted from the host, or the runtime's
/proc, /sys, /dev and the rootfs root. Each case is run with real runc and, where runc
itself can be asked to do the same (a config.json mount through the same image symlink), a
control run of runc alone shows what the runtime does.

* A volume whose mount is shared with the host (Kubernetes Bidirectional, Podman
  `:rshared`: rootfs propagation rshared and an rshared bind of a shared host mount), and an
  image symlink into it: a mount placed there propagates to the host and outlives the
  container. runc leaks so (control); cdi-hook refuses, and the host's mount table and the
  volume's files stay as they were.
* With a user namespace, a mount point created inside a host volume the container's root
  may not write: runc refuses (control), and so does cdi-hook, instead of creating it as
  host root; the volume stays as it was.
* A destination the image turns into /proc (or a place in it), /sys, /dev or / is refused
  with one line naming the device and the destination (runc refuses /proc too: control).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import hook_env
import oci_env
from conftest import require

ALL = f"{hook_env.VENDOR}=all"
MAPPING = [{"containerID": 0, "hostID": 200000, "size": 65536}]
USERNS = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]


def _spec(source: Path, destination: str) -> dict:
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": str(source), "containerPath": destination, "options": ["ro", "rbind"]}]}}]}


def _edit_config(bundle: Path, mounts: list[dict], **linux) -> None:
    config = json.loads((bundle / "config.json").read_text())
    config["mounts"] += mounts
    config["linux"].update(linux)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))


def _source(top: Path, name: str = "vendor-files") -> Path:
    source = top / name
    source.mkdir()
    (source / "libvendor.so").write_text("vendor\n")
    return source


@pytest.fixture
def shared_volume(root_only, tmp_path):
    """A host dir that is a shared mount (as every mount on a systemd host), with x/ in it."""
    volume = tmp_path / "volume"
    (volume / "x").mkdir(parents=True)
    (volume / "x" / "host-file").write_text("host\n")
    subprocess.run(["mount", "--bind", str(volume), str(volume)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(volume)], check=True)
        yield volume
    finally:
        subprocess.run(["umount", "-R", str(volume)], check=False)  # also what a run leaked


def _bidirectional_bundle(top: Path, volume: Path, devices: list[str], extra_mounts: list[dict]) -> Path:
    rootfs = hook_env.glibc_like_rootfs(top / "bundle" / "rootfs")
    (rootfs / "opt").mkdir()
    (rootfs / "opt" / "vendor").symlink_to("/shared-vol/x")
    bundle, _ = hook_env.bundle_with_hook(top, _spec(_source(top), "/opt/vendor/lib"), devices,
                                          "ls /opt/vendor/lib && echo RAN", rootfs=rootfs)
    # What the CRI runtimes write for a Bidirectional volume.
    _edit_config(bundle, [{"destination": "/shared-vol", "type": "bind", "source": str(volume),
                           "options": ["rbind", "rw", "rshared"]}] + extra_mounts, rootfsPropagation="rshared")
    return bundle


def test_mount_through_a_bidirectional_volume_never_reaches_the_host(runc, tmp_path, shared_volume):
    # Control: runc alone, mounting through the same symlink, leaks a host mount per start.
    control = tmp_path / "control"
    control.mkdir()
    before = oci_env.host_mount_points()
    bundle = _bidirectional_bundle(control, shared_volume, [], [
        {"destination": "/opt/vendor/lib", "type": "bind", "source": str(_source(control, "runc-files")),
         "options": ["rbind"]}])
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
    leaked = oci_env.new_host_mounts(before, oci_env.host_mount_points(), tmp_path)
    # Once on Debian 12; twice on Debian 13 (runc 1.1.15, a systemd-shared host), where the
    # volume's own mount and its parent's propagate it: runc's leak either way.
    assert leaked and set(leaked) == {str(shared_volume / "x" / "lib")}, leaked
    while str(shared_volume / "x" / "lib") in oci_env.host_mount_points():  # one umount may take both
        subprocess.run(["umount", str(shared_volume / "x" / "lib")], check=True)
    os.rmdir(shared_volume / "x" / "lib")

    attack = tmp_path / "attack"
    attack.mkdir()
    volume_before = oci_env.tree_snapshot(shared_volume)
    before = oci_env.host_mount_points()
    bundle = _bidirectional_bundle(attack, shared_volume, [ALL], [])
    result = oci_env.run_container(bundle)
    assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), tmp_path) == []
    assert oci_env.tree_snapshot(shared_volume) == volume_before
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert ALL in result.stderr and "/opt/vendor/lib" in result.stderr and "shared" in result.stderr, result.stderr


def test_rshared_volume_without_shared_rootfs_is_refused_too(runc, tmp_path, shared_volume):
    """runc's default rootfs propagation (rslave) makes the volume a slave that is shared
    again in a peer group of its own: from inside, cdi-hook cannot tell who else is in that
    group, so it refuses all the same."""
    bundle = _bidirectional_bundle(tmp_path, shared_volume, [ALL], [])
    config = json.loads((bundle / "config.json").read_text())
    del config["linux"]["rootfsPropagation"]
    (bundle / "config.json").write_text(json.dumps(config))
    before = oci_env.host_mount_points()
    result = oci_env.run_container(bundle)
    assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), tmp_path) == []
    assert result.returncode != 0 and "shared" in result.stderr and "/opt/vendor/lib" in result.stderr, result.stderr


def test_spec_mounts_beside_a_shared_volume_still_work(runc, tmp_path, shared_volume):
    """Only a destination on the shared volume is refused; the rest of the rootfs is private."""
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(_source(tmp_path), "/opt/vendor/lib"), [ALL],
                                          "cat /opt/vendor/lib/libvendor.so", rootfs=rootfs)
    _edit_config(bundle, [{"destination": "/shared-vol", "type": "bind", "source": str(shared_volume),
                           "options": ["rbind", "rw", "rshared"]}], rootfsPropagation="rshared")
    before = oci_env.host_mount_points()
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and result.stdout == "vendor\n", result.stderr
    assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), tmp_path) == []


def _userns_volume_case(top: Path, devices: list[str], runc_mount: bool) -> tuple[subprocess.CompletedProcess, Path]:
    volume = top / "volume"  # host root's, 0755: the container's root (uid 200000) may not write
    (volume / "x").mkdir(parents=True)
    rootfs = hook_env.glibc_like_rootfs(top / "bundle" / "rootfs")
    (rootfs / "opt").mkdir()
    (rootfs / "opt" / "vendor").symlink_to("/shared-vol/x")
    source = _source(top)
    bundle, _ = hook_env.bundle_with_hook(top, _spec(source, "/opt/vendor/lib"), devices,
                                          "ls /opt/vendor/lib && echo RAN", rootfs=rootfs, namespaces=USERNS,
                                          extra_linux={"uidMappings": MAPPING, "gidMappings": MAPPING})
    mounts = [{"destination": "/shared-vol", "type": "bind", "source": str(volume), "options": ["rbind", "rw"]}]
    if runc_mount:
        mounts.append({"destination": "/opt/vendor/lib", "type": "bind", "source": str(source), "options": ["rbind"]})
    _edit_config(bundle, mounts)
    for entry in [rootfs, *rootfs.rglob("*")]:  # the image belongs to the container's root
        os.lchown(entry, 200000, 200000)
    top.chmod(0o755)
    return oci_env.run_container(bundle), volume


def test_user_namespace_creates_nothing_its_root_may_not(runc):
    top = Path(tempfile.mkdtemp(prefix="cdi-hook-userns-"))
    top.chmod(0o755)  # the mapped root must reach the rootfs
    try:
        control, volume = _userns_volume_case(top / "control", [], runc_mount=True)
        require("user namespace" not in control.stderr, "runc cannot make user namespaces here")
        assert control.returncode != 0 and "permission denied" in control.stderr.lower(), control.stderr
        assert os.listdir(volume / "x") == []  # runc, as the container's root, created nothing

        before = oci_env.host_mount_points()
        result, volume = _userns_volume_case(top / "attack", [ALL], runc_mount=False)
        assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), top) == []
        assert os.listdir(volume / "x") == [], "cdi-hook created a mount point in a host dir as host root"
        assert result.returncode != 0 and "RAN" not in result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert ALL in result.stderr and "/opt/vendor/lib" in result.stderr, result.stderr
        assert "Permission denied" in result.stderr, result.stderr
    finally:
        shutil.rmtree(top)


# (case id, where the image's /opt/x points, what the error names)
RUNTIME_MOUNTS = [
    ("proc", "/proc", "/proc"),
    ("in-proc", "/proc/sys/kernel", "/proc"),
    ("sys", "/sys", "/sys"),
    ("dev", "/dev", "/dev"),
    ("root", "/", "root"),
    ("root-dotdot", "../..", "root"),
]


def test_control_runc_refuses_a_mount_through_a_symlink_into_proc(runc, tmp_path):
    rootfs = oci_env.make_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "opt").mkdir()
    (rootfs / "opt" / "x").symlink_to("/proc")
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["echo", "RAN"], rootfs=rootfs)
    _edit_config(bundle, [{"destination": "/opt/x", "type": "bind", "source": str(_source(tmp_path)),
                           "options": ["rbind"]}])
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert "/proc" in result.stderr and "proc" in result.stderr, result.stderr


@pytest.mark.parametrize("case", RUNTIME_MOUNTS, ids=[c[0] for c in RUNTIME_MOUNTS])
def test_destination_turned_into_a_runtime_mount_is_refused(runc, tmp_path, case):
    _, target, named = case
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "opt").mkdir()
    (rootfs / "opt" / "x").symlink_to(target)
    image_before = oci_env.tree_snapshot(rootfs)
    before = oci_env.host_mount_points()
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(_source(tmp_path), "/opt/x"), [ALL], "echo RAN",
                                          rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout + result.stderr
    assert ALL in result.stderr and "/opt/x" in result.stderr and named in result.stderr, result.stderr
    assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), tmp_path) == []
    assert oci_env.tree_snapshot(rootfs) == image_before


def test_user_namespace_node_bind_mount_through_a_bidirectional_volume_is_refused(runc):
    """With a user namespace a node is a bind mount of the host's: the same rule holds for it
    (the volume's x/ is the container's root's here, so creating the mount point is allowed).
    The kernel already reduces the host's peers to masters for a mount namespace made in a
    less privileged user namespace, so this one would not reach the host; but from the mount
    table a peer group's members cannot be told apart, and the rule stays one rule."""
    top = Path(tempfile.mkdtemp(prefix="cdi-hook-userns-"))
    top.chmod(0o755)
    volume = top / "volume"
    (volume / "x").mkdir(parents=True)
    os.chown(volume / "x", 200000, 200000)
    subprocess.run(["mount", "--bind", str(volume), str(volume)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(volume)], check=True)
        rootfs = hook_env.glibc_like_rootfs(top / "bundle" / "rootfs")
        (rootfs / "opt").mkdir()
        (rootfs / "opt" / "vendor").symlink_to("/shared-vol/x")
        spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
            "deviceNodes": [{"path": "/opt/vendor/cdi-zero", "hostPath": "/dev/zero"}]}}]}
        bundle, _ = hook_env.bundle_with_hook(top, spec, [ALL], "echo RAN", rootfs=rootfs, namespaces=USERNS,
                                              extra_linux={"uidMappings": MAPPING, "gidMappings": MAPPING})
        _edit_config(bundle, [{"destination": "/shared-vol", "type": "bind", "source": str(volume),
                               "options": ["rbind", "rw", "rshared"]}], rootfsPropagation="rshared")
        for entry in [rootfs, *rootfs.rglob("*")]:
            os.lchown(entry, 200000, 200000)
        before = oci_env.host_mount_points()
        result = oci_env.run_container(bundle)
        require("user namespace" not in result.stderr, "runc cannot make user namespaces here")
        assert oci_env.new_host_mounts(before, oci_env.host_mount_points(), top) == []
        assert os.listdir(volume / "x") == []
        assert result.returncode != 0 and "RAN" not in result.stdout
        assert ALL in result.stderr and "/opt/vendor/cdi-zero" in result.stderr and "shared" in result.stderr, \
            result.stderr
    finally:
        subprocess.run(["umount", "-R", str(volume)], check=False)
        shutil.rmtree(top)
