"""Device nodes planted in the image where the hook (or the ldconfig it runs) writes.

An image may ship device nodes (an image layer can hold any inode). The hook works as root in
the runtime's cgroup, where no device cgroup stops it: a block device node named like the
file the hook writes (etc/ld.so.conf.d/00-cdi-hook.conf) or like ldconfig's temporary cache
(etc/ld.so.cache~) would let the image make the hook write into a host disk. Here the node
is a loop device over a host file; whatever happens to the container, the file is untouched;
where the hook would replace the name it refuses with one line (ldconfig now writes its
temporary cache in a private tmpfs, so an etc/ld.so.cache~ of the image is never looked at).
A fifo there must not hang the hook either.
"""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

import hook_env
import oci_env

ALL = f"{hook_env.VENDOR}=all"


@pytest.fixture
def loop_device(root_only, tmp_path):
    backing = tmp_path / "host-disk"
    backing.write_bytes(b"\x55" * (1 << 20))
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    path = device.stdout.strip()
    try:
        yield path, backing
    finally:
        subprocess.run(["losetup", "-d", path], capture_output=True)


@pytest.mark.parametrize("where", ["etc/ld.so.conf.d/00-cdi-hook.conf", "etc/ld.so.cache~", "etc/ld.so.cache"])
def test_device_node_in_the_image_is_never_written(runc, tmp_path, loop_device, where):
    device, backing = loop_device
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    node = rootfs / where
    node.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(node, stat.S_IFBLK | 0o666, os.stat(device).st_rdev)
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1", "options": ["ro", "bind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert "Traceback" not in result.stderr, result.stderr
    subprocess.run(["blockdev", "--flushbufs", device], capture_output=True)
    assert backing.read_bytes() == b"\x55" * (1 << 20), f"the hook wrote into a host disk through {where}"
    if where == "etc/ld.so.cache~":  # ldconfig writes its temp file in a private tmpfs: this one is never looked at
        assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
    else:  # a name the hook replaces: undo could not put a node back, so it is refused
        assert result.returncode != 0 and "not a regular file" in result.stderr, result.stderr
    assert stat.S_ISBLK(node.lstat().st_mode)  # the image's node is left as it was


def test_fifo_as_conf_file_does_not_hang_the_hook(runc, tmp_path):
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "etc" / "ld.so.conf.d").mkdir()
    os.mkfifo(rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf")
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1", "options": ["ro", "bind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    result = oci_env.run_container(bundle, timeout=30)
    assert result.returncode != 0 and "not a regular file" in result.stderr, result.stderr


def test_ldconfig_runs_on_a_nodev_view(runc, tmp_path):
    """Defence in depth: ldconfig sees the rootfs through a nodev clone, so no device node of
    the image (say a library symlink to a host disk) can be opened by it."""
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1", "options": ["ro", "bind"]}]}}]}
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN",
                                                 extra_env={"CDI_HOOK_LOG_LEVEL": "debug"})
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
    [line] = hook_env.log_lines(log_file)
    assert any(note.startswith("ldconfig: cache updated") for note in line["notes"]), line
    assert not any("no nodev view" in note for note in line["notes"]), line
