"""attach / verify / detach in a runc container with a user namespace (root is uid 200000 on
the host). A node made by cdi-hook could not be opened there, so the host node arrives as a
bind mount (what runc does for linux.devices); the host's node keeps its owner and mode,
never changed. What attach makes in the rootfs (the loader's conf file, folders) belongs to
the container's root, as if it had made them; detach takes it all back."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require
from running_env import KVM

MAPPING = [{"containerID": 0, "hostID": 200000, "size": 65536}]


@pytest.fixture
def userns_container(runc):
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    # The container's root (host uid 200000) must reach its rootfs: not pytest's 0700 tmp_path.
    top = Path(tempfile.mkdtemp(prefix="cdi-hook-running-userns-"))
    try:
        document, sources = env.spec(top)
        host_node = top / "hostdev" / "kvm"
        host_node.parent.mkdir()
        os.mknod(host_node, stat.S_IFCHR | 0o666, os.stat("/dev/kvm").st_rdev)
        os.chmod(host_node, 0o666)
        kvm = next(d for d in document["devices"] if d["name"] == "kvm")
        kvm["containerEdits"]["deviceNodes"] = [{"path": "/dev/kvm", "hostPath": str(host_node)}]
        namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]
        bundle, _ = hook_env.bundle_with_hook(top, document, [], "sleep 120", namespaces=namespaces,
                                              extra_linux={"uidMappings": MAPPING, "gidMappings": MAPPING})
        rootfs = bundle / "rootfs"
        os.mknod(rootfs / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
        for entry in [rootfs, *rootfs.rglob("*")]:  # the image belongs to the container's root
            os.lchown(entry, 200000, 200000)
        top.chmod(0o755)
        with oci_env.detached_container(bundle, runc=runc) as container:
            container.spec_dir = top / "cdi"
            container.rootfs = rootfs
            container.host_node = host_node
            container.library = sources["library_in_container"]
            container.address = f"runc:{container.id}"
            yield container
    finally:
        shutil.rmtree(top)


def test_attach_in_a_user_namespace_bind_mounts_the_node(userns_container):
    c = userns_container
    host_node_before = os.stat(c.host_node)
    tree_before = oci_env.tree_snapshot(c.rootfs)
    mounts_before = env.mountinfo_of(c.pid)
    oci_env.assert_refused(c, "/tmp/kvm", "r")

    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    shown = c.exec(["sh", "-c", "stat -c '%F %t:%T %a' /dev/kvm; grep -c ' /dev/kvm ' /proc/self/mountinfo; "
                                "cat /etc/cdi-config.txt; stat -c '%u:%g' /etc/ld.so.conf.d/00-cdi-hook.conf "
                                f"{hook_env.LIB_DIR_IN_CONTAINER}"])
    assert shown.stdout.splitlines() == ["character special file a:e8 666", "1", "read-only config", "0:0", "0:0"], \
        shown  # the host's node, bind-mounted; what attach made is the container root's
    assert os.stat(c.host_node) == host_node_before  # never chowned or chmodded
    conf = c.rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf"
    assert (os.stat(conf).st_uid, os.stat(conf).st_gid) == (200000, 200000)
    assert c.library.encode() + b"\0" in (c.rootfs / "etc" / "ld.so.cache").read_bytes()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and (KVM, "node /dev/kvm") in {(x["device"], x["item"]) for x in checks}, env.failed(checks)

    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    assert "unmounted the host node on /dev/kvm" in done.stdout, done.stdout
    gone = c.exec(["ls", "/dev/kvm", "/etc/cdi-config.txt"])
    assert gone.stderr.count("No such file") == 2, gone
    assert env.mountinfo_of(c.pid) == mounts_before
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert os.stat(c.host_node) == host_node_before
    # detach rebuilds the loader cache for the libraries left (none): the conf file stays,
    # listing no folder, still the container root's; the cache no longer has the library.
    after = oci_env.tree_snapshot(c.rootfs)
    conf_key, ours = "etc/ld.so.conf.d/00-cdi-hook.conf", ("etc/ld.so.conf.d", "etc/ld.so.cache")
    assert after[conf_key][:4] == (stat.S_IFREG, 0o644, 200000, 200000)
    assert hook_env.LIB_DIR_IN_CONTAINER.encode() not in after[conf_key][4]
    assert after["etc/ld.so.conf.d"][2:4] == after["etc/ld.so.cache"][2:4] == (200000, 200000)
    assert {k: v for k, v in after.items() if not k.startswith(ours)} == \
        {k: v for k, v in tree_before.items() if not k.startswith(ours)}
    assert c.library.encode() not in (c.rootfs / "etc" / "ld.so.cache").read_bytes()
