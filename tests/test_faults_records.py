"""Node faults (issue 27, item 4) under the records of moved network devices and of
attachments: <state>/netdev and <state>/attachments each on a small tmpfs of their own,
filled to the last byte or remounted read-only, with real runc; and a disk that fails
(EIO): this kernel has no device-mapper for an `error` target, so the hook or the command
runs under the seccomp filter of fault_env that fails every fsync with EIO, where a
failing disk reports a buffered write (the records are written durably, fsync'd).

Both records guard safety (without the netdev record poststop cannot tell the moved
interface from one the container made; without the attachment record a device could be
given twice or never taken back), so a write that cannot be made fails with one line
naming the file and the error, and the container and the host are as they were. A
removal needs no space: on a full folder it succeeds.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require, require_program
from fault_env import failing_syscalls, run_and_check, small_tmpfs, with_failing_syscalls
from running_env import KVM, LOOP

ERRORS = {"full": "No space left on device", "readonly": "Read-only file system", "eio": "Input/output error"}


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


@contextlib.contextmanager
def _spoiled(where: Path, fault: str):
    """The folder on a full or a read-only tmpfs of its own (spoiled at once, nothing to keep
    in it); for eio a plain folder (the filter fails the write)."""
    if fault == "eio":
        where.mkdir(mode=0o700)
        yield
        return
    with small_tmpfs(where, full=fault == "full", readonly=fault == "readonly") as spoil:
        spoil()
        yield


@pytest.mark.parametrize("fault", ["full", "readonly", "eio"])
def test_a_netdev_record_that_cannot_be_written_fails_the_start_cleanly(runc, tmp_path, fault):
    """createRuntime moves the interface, then cannot record it: the start fails with one
    line naming the record and the error; the interface is back on the host as it was (name,
    state, MTU), the rootfs, the host's mounts and the state folder as they were."""
    top = _state_root(tmp_path)
    with _veth() as name:
        subprocess.run(["ip", "link", "set", name, "mtu", "1400"], check=True)
        before_link = _link(name)
        bundle, _ = hook_env.bundle_with_hook(tmp_path, _net_spec(tmp_path, name), [f"{hook_env.VENDOR}=all"],
                                              "echo RAN", rootfs=hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs"),
                                              extra_env={"CDI_HOOK_STATE_DIR": str(top / "held")})
        rootfs = bundle / "rootfs"
        if fault == "eio":
            with_failing_syscalls(bundle, tmp_path, ["fsync"])
        with _spoiled(top / "netdev", fault):
            before = oci_env.tree_snapshot(top)
            stderr = run_and_check(tmp_path, bundle, rootfs, "network device", ERRORS[fault])
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


# --- attachments: <state>/attachments -------------------------------------------------

@pytest.fixture
def running(runc, tmp_path):
    """A container given loop at creation (its hook keeps its records in the test's state
    root), and that state root; attach and detach run with the same one."""
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    top = _state_root(tmp_path)
    settings = {"CDI_HOOK_STATE_DIR": str(top / "held")}
    document, _ = env.spec(tmp_path)
    document["devices"].append({"name": "null", "containerEdits": {  # a node alone: attach runs no ldconfig
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}]}})
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [LOOP], "sleep 120", extra_env=settings)
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    os.mknod(bundle / "rootfs" / "tmp" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    with oci_env.detached_container(bundle, runc=runc) as container:
        container.spec_dir = tmp_path / "cdi"
        container.rootfs = bundle / "rootfs"
        container.address = f"runc:{container.id}"
        container.top = top
        container.settings = settings
        yield container


def _what_it_has(c) -> tuple:
    """The container as attach and detach may change it: its rootfs, its mounts, what it
    may open, and what verify says it was given."""
    opens = tuple(oci_env.open_in_container(c, path, "r").returncode == 0 for path in ("/tmp/kvm", "/tmp/loop0"))
    rc, checks = _verify(c)
    return oci_env.tree_snapshot(c.rootfs), env.mountinfo_of(c.pid), opens, rc, checks


def _verify(c) -> tuple[int, list]:
    done = env.cli(c.spec_dir, "verify", c.address, "--format", "json", env=c.settings)
    assert done.returncode in (0, 1) and done.stdout, done.stderr
    return done.returncode, sorted((x["device"], x["item"], x["ok"]) for x in json.loads(done.stdout))


@pytest.mark.parametrize("fault", ["full", "readonly", "eio"])
@pytest.mark.parametrize("action", ["attach", "detach-attached", "detach-given"])
def test_an_attachment_record_that_cannot_be_written(running, tmp_path, fault, action):
    """attach: the record is written last; it cannot be, so the nodes, mounts, loader cache
    and device cgroup go back. detach: the record it will write is prepared before anything
    is taken away, so it fails first. Each: one line naming the record and the error, the
    container as it was. The one exception is a detach whose record is just removed, on a
    full folder: a removal needs no space, it succeeds. (eio attaches a node alone: the
    filter would fail ldconfig's own fsync first.)"""
    c = running
    records = c.top / "attachments"
    with contextlib.ExitStack() as stack:
        spoil = (lambda: None) if fault == "eio" else stack.enter_context(
            small_tmpfs(records, full=fault == "full", readonly=fault == "readonly"))
        if action == "detach-attached":
            done = env.cli(c.spec_dir, "attach", c.address, KVM, env=c.settings)
            assert done.returncode == 0, done.stderr
        else:  # the lock file is there (made as attach makes it: it only locks it later)
            records.mkdir(mode=0o700, exist_ok=True)
            (records / f"{c.id}.lock").touch(mode=0o600)
        spoil()
        before = _what_it_has(c)
        files_before = oci_env.tree_snapshot(records)
        command, device = {"attach": ("attach", f"{env.VENDOR}=null" if fault == "eio" else KVM),
                           "detach-attached": ("detach", KVM), "detach-given": ("detach", LOOP)}[action]
        enter = failing_syscalls(tmp_path, ["fsync"]) if fault == "eio" else None
        done = env.cli(c.spec_dir, command, c.address, device, env=c.settings, enter=enter)
        assert "Traceback" not in done.stderr, done.stderr
        if action == "detach-attached" and fault == "full":
            assert done.returncode == 0, done.stderr
            assert not (records / f"{c.id}.json").exists()
            oci_env.assert_refused(c, "/tmp/kvm", "r")
            return
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
        assert f"{records}/{c.id}.json: cannot write the attachment record: {ERRORS[fault]}" in done.stderr, \
            done.stderr
        assert _what_it_has(c) == before
        assert oci_env.tree_snapshot(records) == files_before  # no temp file left either
