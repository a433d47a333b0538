"""Attacks on the container record (record.py, commands/hook.py _later_stage_from_record,
commands/running.py _state/_record_edited/_detach, `cdi-hook stale`).

Each test states the attack and asserts the safe behaviour: a test that fails today is a
finding (see the review report). Real runc where the finding needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require

DEV = hook_env.VENDOR


def _records() -> Path:
    return Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers"


def _all_stages(bundle: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    for stage in ("poststart", "poststop"):
        config["hooks"][stage] = [dict(entry, args=entry["args"][:-1] + [stage])]
    (bundle / "config.json").write_text(json.dumps(config))


def _edit_config(bundle: Path, change) -> None:
    config = json.loads((bundle / "config.json").read_text())
    change(config)
    (bundle / "config.json").write_text(json.dumps(config))


# --- 1. an earlier container's record, the same id, the same bundle ---------------------

def test_stale_record_of_same_id_is_not_carried_out_by_a_new_container(runc, tmp_path):
    """Container A (id X) got a device whose spec has a poststop hook. A failed poststop
    removes the record too (poststop does not come again); a record left by a runtime that
    crashed before poststop is played here by putting A's record back. Container B reuses id
    X and the same bundle: asking for no device, its poststop never looks at records; asking
    for the device, its createRuntime replaces the record, and a config.json written anew
    tells A's record from B's in any case. B's poststop must not run A's spec hook."""
    mark, fail = tmp_path / "ran", tmp_path / "fail-once"
    spec = {"cdiVersion": "0.6.0", "kind": DEV, "devices": [{"name": "post", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
        "hooks": [{"hookName": "poststop", "path": "/bin/sh",
                   "args": ["sh", "-c", f"echo ran >> {mark}; test ! -e {fail}"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [f"{DEV}=post"], "sleep 60")
    _all_stages(bundle)
    cid = "cdi-attack-" + uuid.uuid4().hex[:10]
    record = _records() / f"{cid}.json"
    fail.touch()
    with oci_env.detached_container(bundle, runc=runc) as a:
        kept = (_records() / f"{a.id}.json").read_bytes()
    assert mark.read_text() == "ran\n"
    assert not (_records() / f"{a.id}.json").exists(), "a failed poststop removes the record"
    fail.unlink()
    mark.unlink()
    try:
        record.write_bytes(kept.replace(a.id.encode(), cid.encode()))
        _rechecksum(record)
        os.chmod(record, 0o600)
        # B: same id, same bundle, asks for nothing.
        _edit_config(bundle, lambda c: (c.pop("annotations", None), c["process"].update(args=["true"])))
        oci_env.run_container(bundle, runc=runc, container_id=cid)
        assert not mark.exists(), "B's poststop ran the spec hook of a device only A was given"
        # B': same id and bundle, asks for the device again: its own record, its own hook run once.
        _edit_config(bundle, lambda c: c.update(annotations={"cdi.k8s.io/test": f"{DEV}=post"}))
        record.write_bytes(kept.replace(a.id.encode(), cid.encode()))
        _rechecksum(record)
        oci_env.run_container(bundle, runc=runc, container_id=cid)
        assert mark.read_text() == "ran\n"
    finally:
        record.unlink(missing_ok=True)


def _rechecksum(path: Path) -> None:
    import zlib

    body = path.read_bytes().split(b"\n", 1)[1]
    path.write_bytes(b"crc32 %08x\n" % zlib.crc32(body) + body)


# --- 3. two devices that share an item (AMD's /dev/kfd in every GPU, a shared library) ---

SHARED_LIB = os.path.basename(hook_env.LIBRARY_SOURCE)


def _shared_spec(sources: Path) -> dict:
    """a and b both name /dev/cdi-shared (loop0) and the same library mount; b also has
    its own node. The plan keeps each path once, under the later device (b)."""
    real = os.path.realpath(hook_env.LIBRARY_SOURCE)
    sources.mkdir(exist_ok=True)
    shutil.copy(real, sources / SHARED_LIB)  # named as its soname: ldconfig lists it so
    shared_node = {"path": "/dev/cdi-shared", "hostPath": "/dev/loop0"}
    shared_mount = {"hostPath": str(sources / SHARED_LIB), "containerPath": f"/opt/shared/{SHARED_LIB}",
                    "options": ["ro", "bind"]}
    return {"cdiVersion": "0.6.0", "kind": DEV, "devices": [
        {"name": "a", "containerEdits": {"deviceNodes": [shared_node], "mounts": [shared_mount]}},
        {"name": "b", "containerEdits": {"deviceNodes": [shared_node, {"path": "/dev/cdi-b", "hostPath": "/dev/loop1"}],
                                         "mounts": [shared_mount]}},
    ]}


@pytest.fixture
def shared(runc, tmp_path):
    require(os.path.exists("/dev/loop0") and os.path.exists("/dev/loop1"), "needs /dev/loop0 and /dev/loop1")
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _shared_spec(tmp_path / "host"), [f"{DEV}=a", f"{DEV}=b"],
                                          "sleep 120")
    with oci_env.detached_container(bundle, runc=runc) as c:
        c.spec_dir = tmp_path / "cdi"
        c.address = f"runc:{c.id}"
        yield c


def test_detach_one_device_keeps_what_the_other_shares(shared):
    """detach b while a stays: /dev/cdi-shared and the shared library are a's too. The record
    keeps each path under the last device only (plan dedup), so the remaining plan of a,
    taken from the record, no longer names them and detach removes them from under a."""
    c = shared
    done = env.cli(c.spec_dir, "detach", c.address, f"{DEV}=b")
    assert done.returncode == 0, done.stderr
    seen = c.exec(["sh", "-c", f"ls /dev/cdi-shared /dev/cdi-b /opt/shared/{SHARED_LIB} 2>&1"])
    assert "/dev/cdi-b: No such file" in seen.stdout, seen
    lost = [] if f"/opt/shared/{SHARED_LIB}" in env.mountinfo_of(c.pid) else ["the shared library's mount"]
    lost += ["/dev/cdi-shared"] if "/dev/cdi-shared: No such file" in seen.stdout else []
    assert lost == [], f"a lost what it shares with b: {lost}"
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, [x for x in checks if not x["ok"]]


def test_unchanged_spec_shared_items_are_not_stale(shared):
    """Nothing changed in the spec: neither verify nor `cdi-hook stale` may call a device
    stale. Each device is resolved alone today, but compared with the record's deduplicated
    items, so a (whose shared items the record files under b) reads as "new in the spec"."""
    c = shared
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert [x for x in checks if x.get("stale")] == [], checks
    listed = env.cli(c.spec_dir, "stale")
    assert c.id not in listed.stdout, listed.stdout


# --- 3b. spec-level edits (nvidia-ctk puts every library and /dev/nvidiactl there) -------

def test_driver_upgrade_of_spec_level_edits_is_stale(runc, tmp_path):
    """The driver upgrade rewrites only the spec-level containerEdits (the libraries, as
    nvidia-ctk's specs hold them): verify and `cdi-hook stale` must say the container runs
    an older version. differences() compares items whose origin is the device's exact name,
    so every "vendor/class (spec-level)" item is ignored and the upgrade goes unseen."""
    require(os.path.exists("/dev/loop0"), "needs /dev/loop0")
    real = os.path.realpath(hook_env.LIBRARY_SOURCE)
    for version in (1, 2):
        (tmp_path / f"v{version}").mkdir()
        shutil.copy(real, tmp_path / f"v{version}" / "libvendor.so.1")

    def spec(version: int) -> dict:
        return {"cdiVersion": "0.6.0", "kind": DEV,
                "containerEdits": {"mounts": [{"hostPath": str(tmp_path / f"v{version}" / "libvendor.so.1"),
                                               "containerPath": f"/opt/v{version}/libvendor.so.1",
                                               "options": ["ro", "bind"]}]},
                "devices": [{"name": "gpu", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-gpu",
                                                                                 "hostPath": "/dev/loop0"}]}}]}

    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec(1), [f"{DEV}=gpu"], "sleep 120")
    with oci_env.detached_container(bundle, runc=runc) as c:
        spec_dir = tmp_path / "cdi"
        oci_env.write_spec(spec_dir, "test.json", spec(2))
        rc, checks = env.verify_json(spec_dir, f"runc:{c.id}")
        assert [x["device"] for x in checks if x.get("stale")] == [f"{DEV}=gpu"], checks
        listed = env.cli(spec_dir, "stale")
        assert listed.returncode == 1 and c.id in listed.stdout, listed.stdout


# --- 4. the applied annotation is the pod author's to write ------------------------------

APPLIED = "io.github.cdi-hook.applied"


def test_pod_set_applied_annotation_cannot_block_detach(runc, tmp_path):
    """A pod author adds `io.github.cdi-hook.applied: <a name no spec knows>` to the pod's
    annotations (CRI-O copies them into config.json). The hook gave the container a real
    device; the administrator's detach of that device must still work. Today _state derives
    an edited record for every applied name and resolves it: one unknown name fails
    verify, attach and detach of the whole container."""
    require(os.path.exists("/dev/loop0"), "needs /dev/loop0")
    spec = {"cdiVersion": "0.6.0", "kind": DEV, "devices": [
        {"name": "gpu", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-gpu", "hostPath": "/dev/loop0"}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [f"{DEV}=gpu"], "sleep 120",
                                          annotations={APPLIED: "example.com/nosuch=x"})
    with oci_env.detached_container(bundle, runc=runc) as c:
        spec_dir = tmp_path / "cdi"
        done = env.cli(spec_dir, "detach", f"runc:{c.id}", f"{DEV}=gpu")
        assert done.returncode == 0, done.stderr
        assert c.exec(["ls", "/dev/cdi-gpu"]).returncode != 0


def test_pod_set_applied_annotation_does_not_make_a_record(runc, tmp_path):
    """A pod that asked for no device, with `io.github.cdi-hook.applied: <a real device>` and
    a volume of its own at the path the device's spec mounts: neither verify nor the record
    may say the container was given the device (no hook, no editor, no policy gave it), and
    verify (which "changes nothing") must not write a record."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "vendor").mkdir()
    spec = {"cdiVersion": "0.6.0", "kind": DEV, "devices": [{"name": "lib", "containerEdits": {
        "mounts": [{"hostPath": str(tmp_path / "vendor"), "containerPath": "/mnt/vendor", "options": ["ro", "rbind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [], "sleep 120", annotations={APPLIED: f"{DEV}=lib"})
    _edit_config(bundle, lambda cfg: cfg["mounts"].append(
        {"destination": "/mnt/vendor", "type": "bind", "source": str(tmp_path / "mine"), "options": ["rbind"]}))
    with oci_env.detached_container(bundle, runc=runc) as c:
        spec_dir = tmp_path / "cdi"
        rc, checks = env.verify_json(spec_dir, f"runc:{c.id}")
        record = _records() / f"{c.id}.json"
        try:
            problems = [f"verify lists the device as given: {checks}"] if checks else []
            problems += ["verify wrote a record that says the pod got the device"] if record.exists() else []
            done = env.cli(spec_dir, "detach", f"runc:{c.id}", f"{DEV}=lib")
            problems += [] if "/mnt/vendor" in env.mountinfo_of(c.pid) else ["detach unmounted the pod's own volume"]
            problems += [] if done.returncode != 0 else [f"detach said: {done.stdout.strip()}"]
            assert problems == []
        finally:
            record.unlink(missing_ok=True)


# --- 5. a careless operator: the records folder opened to others --------------------------

def test_records_folder_opened_to_others_still_gets_poststop_cleanup(runc, tmp_path):
    """`chmod -R a+rX /run/cdi-hook` while a container with an exclusive device runs. The
    record is then refused (right: never believed), but poststop raises instead of falling
    back to the older way: the exclusive hold (and a moved interface, an RDT group) is
    never given back; the error must be one line."""
    require(os.path.exists("/dev/loop0"), "needs /dev/loop0")
    spec = {"cdiVersion": "0.6.0", "kind": DEV, "devices": [
        {"name": "gpu", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-gpu", "hostPath": "/dev/loop0"}]}}]}
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{DEV}=gpu"]\n')
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [f"{DEV}=gpu"], "sleep 120",
                                                 extra_env={"CDI_HOOK_POLICY": str(policy)})
    _all_stages(bundle)
    held = Path(os.environ["CDI_HOOK_STATE_DIR"])
    hold = held / "node-b-7-0.json"  # held as what it is on the host: loop0
    records = _records()
    try:
        with oci_env.detached_container(bundle, runc=runc) as c:
            assert hold.exists() and (records / f"{c.id}.json").exists()
            os.chmod(records, 0o755)
    finally:
        os.chmod(records, 0o700)
    poststop = [line for line in hook_env.log_lines(log_file) if line["stage"] == "poststop"]
    assert not hold.exists(), f"the hold outlived its container; poststop log: {poststop}"


# --- 6. the hot path: a container that asks for no device ---------------------------------

@pytest.mark.parametrize("stage", ["poststart", "poststop"])
def test_no_device_container_pays_nothing_new_at_later_stages(tmp_path, stage):
    """A container with no cdi.k8s.io/ annotation (most of a node's): poststart and poststop
    must cost what they did before records (parse the state, read config.json, return).
    Today they import record/state/settings (~0.4 ms) and open the records folder and the
    record (3 syscalls) before looking at the annotations."""
    import subprocess
    import sys

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["true"]}, "annotations": {"a": "b"}}))
    state = json.dumps({"ociVersion": "1.0.2", "id": "no-device-" + uuid.uuid4().hex[:8], "status": "stopped",
                        "bundle": str(bundle), "annotations": {"a": "b"}})
    probe = ("import sys, io, json; from cdi_hook.commands import hook; "
             "rc = hook.run(sys.argv[1], None, io.BytesIO(sys.argv[2].encode())); "
             "print(json.dumps([rc, sorted(m for m in sys.modules if m.startswith('cdi_hook'))]))")
    done = subprocess.run(["strace", "-f", "-e", "trace=openat", "-o", str(tmp_path / "trace"), sys.executable,
                           "-I", "-c", probe, stage, state], capture_output=True, text=True, env=dict(os.environ),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    rc, modules = json.loads(done.stdout)
    opened = [line for line in (tmp_path / "trace").read_text().splitlines() if str(_records()) in line]
    assert rc == 0
    assert {"cdi_hook.record", "cdi_hook.state"} & set(modules) == set() and opened == [], (modules, opened)


# --- 3c. a node the image had, replaced by the hook ---------------------------------------

def test_detach_puts_back_the_image_node_the_hook_replaced(runc, tmp_path):
    """The image has /opt/devs/full (c 1:7, 0666). The spec names the same device at that
    path with fileMode 0600: the hook replaces the image's node and the record says so
    (created, replaced "c 1:7 666 0:0"). detach must leave the container what it had
    without the device (the image's node); today it unlinks the path and the image's node
    is gone."""
    import stat as stat_module

    spec = {"cdiVersion": "0.6.0", "kind": DEV, "devices": [{"name": "full", "containerEdits": {
        "deviceNodes": [{"path": "/opt/devs/full", "hostPath": "/dev/full", "fileMode": 0o600}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [f"{DEV}=full"], "sleep 120")
    (bundle / "rootfs" / "opt" / "devs").mkdir(parents=True)
    os.mknod(bundle / "rootfs" / "opt" / "devs" / "full", stat_module.S_IFCHR | 0o666, os.makedev(1, 7))
    os.chmod(bundle / "rootfs" / "opt" / "devs" / "full", 0o666)
    with oci_env.detached_container(bundle, runc=runc) as c:
        record = json.loads((_records() / f"{c.id}.json").read_text().split("\n", 1)[1])
        assert record["items"]["nodes"][0][4:] == [True, "c 1:7 666 0:0"], record["items"]["nodes"]
        done = env.cli(tmp_path / "cdi", "detach", f"runc:{c.id}", f"{DEV}=full")
        assert done.returncode == 0, done.stderr
        seen = c.exec(["stat", "-c", "%F %t:%T %a", "/opt/devs/full"])
        assert seen.returncode == 0 and seen.stdout.split() == ["character", "special", "file", "1:7", "666"], \
            (done.stdout, seen.stdout, seen.stderr)
