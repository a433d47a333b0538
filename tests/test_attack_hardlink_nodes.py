"""A device node of the image that is a hard link to a host inode.

A rootfs that is a plain directory can hold hard links to host files when it shares their
filesystem (an image unpacked next to the host's own device nodes, a rootfs a user could
write into). A node at a spec's node path with the spec's type and number used to be "adopted":
chmod/chown through the image's name, which for a hard link changes the host's node. Here the
host's node is one made with mknod in the test's tmp dir (same filesystem as the rootfs, the
kind of node a host's /dev holds); it is hard-linked into the image at the spec's path. runc
alone, asked for the same node in config.json, leaves the existing entry as it is; cdi-hook
gives the container the spec's mode and owner on a node of its own and never touches the
host's inode, also when it undoes its work.
"""

from __future__ import annotations

import json
import os
import stat

import hook_env
import oci_env

ALL = f"{hook_env.VENDOR}=all"
NULL = os.makedev(1, 3)
SPEC_NODE = {"path": "/opt/dev/null", "hostPath": "/dev/null", "fileMode": 0o666, "uid": 12, "gid": 34}


def _host_node_linked_into_image(tmp_path, rootfs):
    host_node = tmp_path / "host-dev" / "null"
    host_node.parent.mkdir()
    os.mknod(host_node, stat.S_IFCHR | 0o600, NULL)
    os.chmod(host_node, 0o600)
    (rootfs / "opt" / "dev").mkdir(parents=True)
    os.link(host_node, rootfs / "opt" / "dev" / "null")
    assert os.lstat(host_node).st_nlink == 2
    return host_node


def _identity(path) -> tuple:
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_rdev


def test_control_runc_leaves_an_existing_hard_linked_node_alone(runc, tmp_path):
    rootfs = oci_env.make_rootfs(tmp_path / "bundle" / "rootfs")
    host_node = _host_node_linked_into_image(tmp_path, rootfs)
    before = _identity(host_node)
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["stat", "-c", "STAT %a %u:%g", "/opt/dev/null"], rootfs=rootfs)
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["devices"] = [{"path": "/opt/dev/null", "type": "c", "major": 1, "minor": 3,
                                   "fileMode": 0o666, "uid": 12, "gid": 34}]
    (bundle / "config.json").write_text(json.dumps(config))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "STAT 600 0:0" in result.stdout  # runc: EEXIST, left as it is
    assert _identity(host_node) == before


def test_hard_linked_host_node_is_never_chmodded_or_chowned(runc, tmp_path):
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    host_node = _host_node_linked_into_image(tmp_path, rootfs)
    before = _identity(host_node)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [SPEC_NODE]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "stat -c 'STAT %t:%T %a %u:%g' /opt/dev/null",
                                          rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "STAT 1:3 666 12:34" in result.stdout, result.stdout  # the container gets what the spec says
    assert _identity(host_node) == before, "cdi-hook changed the host's node through a hard link"
    assert not os.path.samestat(os.lstat(host_node), os.lstat(rootfs / "opt" / "dev" / "null"))


def test_hard_linked_host_node_is_untouched_when_the_hook_undoes(runc, tmp_path):
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    host_node = _host_node_linked_into_image(tmp_path, rootfs)
    before = _identity(host_node)
    image_before = oci_env.tree_snapshot(rootfs)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [SPEC_NODE], "hooks": [{"hookName": "createRuntime", "path": "/bin/false"}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo SHOULD-NOT-RUN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "SHOULD-NOT-RUN" not in result.stdout
    assert _identity(host_node) == before
    assert oci_env.tree_snapshot(rootfs) == image_before  # the image's entry is back as it was
