"""Node faults (issue 27, item 4) under the records of moved network devices:
<state>/netdev on a small tmpfs of its own, filled to the last byte or remounted
read-only, with real runc.

The record guards safety (without it poststop cannot tell the moved interface from one
the container made), so a write that cannot be made fails with one line naming the file
and the error, and the container and the host are as they were. A removal needs no
space: on a full folder it succeeds.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from pathlib import Path

import pytest

import hook_env
import oci_env
from conftest import require_program
from fault_env import small_tmpfs

ERRORS = {"full": "No space left on device", "readonly": "Read-only file system"}


def _state_root(tmp_path: Path) -> Path:
    """A state root of the test's own (its folders private, as the hook makes them)."""
    top = tmp_path / "state"
    top.mkdir(mode=0o700)
    for sub in ("held", "containers"):
        (top / sub).mkdir(mode=0o700)
    return top


# --- moved network devices: <state>/netdev --------------------------------------------

@contextlib.contextmanager
def _veth():
    require_program("ip")
    name = "cdif" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def _link(name: str, netns: str | None = None) -> dict | None:
    """The interface as `ip -j link show` gives it (None when it is not there)."""
    shown = subprocess.run((["ip", "-n", netns] if netns else ["ip"]) + ["-j", "link", "show", name],
                           capture_output=True, text=True)
    return json.loads(shown.stdout)[0] if shown.returncode == 0 else None


def _net_spec(tmp_path: Path, name: str) -> dict:
    sources = hook_env.host_files(tmp_path)
    return {"cdiVersion": "1.1.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/cdi/nodes/zero", "hostPath": "/dev/zero"}],
        "mounts": [{"hostPath": sources["file"], "containerPath": "/cdi/files/config.txt", "options": ["ro", "bind"]}],
        "netDevices": [{"hostInterfaceName": name, "name": "cdi0"}]}}]}


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_a_netdev_record_that_cannot_be_written_fails_the_start_cleanly(runc, tmp_path, fault):
    """createRuntime moves the interface, then cannot record it: the start fails with one
    line naming the record and the error; the interface is back on the host as it was (name,
    state, MTU), the rootfs, the host's mounts and the state folder as they were."""
    from test_faults import _run_and_check  # the faults' shared check: rootfs, mounts, one line

    top = _state_root(tmp_path)
    with _veth() as name:
        subprocess.run(["ip", "link", "set", name, "mtu", "1400"], check=True)
        before_link = _link(name)
        bundle, _ = hook_env.bundle_with_hook(tmp_path, _net_spec(tmp_path, name), [f"{hook_env.VENDOR}=all"],
                                              "echo RAN", rootfs=hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs"),
                                              extra_env={"CDI_HOOK_STATE_DIR": str(top / "held")})
        rootfs = bundle / "rootfs"
        with small_tmpfs(top / "netdev", full=fault == "full", readonly=fault == "readonly") as spoil:
            spoil()
            before = oci_env.tree_snapshot(top)
            stderr = _run_and_check(tmp_path, bundle, rootfs, "network device", ERRORS[fault])
            assert oci_env.tree_snapshot(top) == before
        line = next(x for x in stderr.splitlines() if "cdi-hook" in x)
        assert f"recording the moved interfaces in {top}/netdev/" in line and ERRORS[fault] in line, stderr
        after_link = _link(name)
        assert after_link is not None, f"{name} did not come back to the host"
        assert {k: after_link.get(k) for k in ("ifname", "mtu", "operstate", "flags")} == \
            {k: before_link.get(k) for k in ("ifname", "mtu", "operstate", "flags")}


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_poststop_sends_the_interface_home_when_its_record_cannot_be_removed(runc, tmp_path, fault):
    """The netdev folder fills up or turns read-only while the container runs: poststop
    still reads the record and sends the interface home under its host name. Full: the
    record's removal needs no space, nothing to say. Read-only: the record stays, and the
    log's warning names it and the error."""
    require_program("ip")
    top = _state_root(tmp_path)
    netns = "cdi-test-" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "netns", "add", netns], check=True)  # outlives the container, as with CNI
    log_file = tmp_path / "cdi-hook.log"
    try:
        with _veth() as name, small_tmpfs(top / "netdev", full=fault == "full",
                                          readonly=fault == "readonly") as spoil:
            namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")] + [
                {"type": "network", "path": f"/run/netns/{netns}"}]
            settings = {"CDI_HOOK_STATE_DIR": str(top / "held")}
            bundle, _ = hook_env.bundle_with_hook(tmp_path, _net_spec(tmp_path, name), [f"{hook_env.VENDOR}=all"],
                                                  "sleep 120", namespaces=namespaces, extra_env=settings)
            config = json.loads((bundle / "config.json").read_text())
            config["hooks"]["poststop"] = [oci_env.hook_entry([str(tmp_path / "cdi")], stage="poststop",
                                                              log_file=str(log_file), extra_env=settings)]
            (bundle / "config.json").write_text(json.dumps(config))
            with oci_env.detached_container(bundle, runc=runc) as container:
                assert _link("cdi0", netns) is not None and _link(name) is None
                record = top / "netdev" / f"{container.id}.json"
                assert record.is_file()
                spoil()
            # runc delete ran the poststop hook
            assert _link(name) is not None, f"{name} did not come back: {log_file.read_text()}"
            assert _link("cdi0", netns) is None
            lines = hook_env.log_lines(log_file)
            poststop = [x for x in lines if x.get("stage") == "poststop"]
            assert len(poststop) == 1, lines
            warnings = " ".join(str(w) for w in poststop[0].get("warnings", []))
            if fault == "full":
                assert not record.exists() and warnings == "", poststop
            else:
                assert record.exists(), "the read-only folder lost the record"
                assert f"cannot remove {record}: Read-only file system" in warnings, poststop
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
