"""The container record: what createRuntime gave a container, read by every later step.

Real runc, cdi-hook installed at createRuntime, poststart and poststop as `install` writes
them. The spec is then rewritten as a driver upgrade rewrites a vendor's spec (another
node, another library version, the old library file gone from the host): what the
container got must still be what verify checks, what detach takes back and what poststop
undoes; verify and `cdi-hook stale` say the container runs an older version of the device.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import hook_env
import oci_env
import running_env as env
from conftest import require
from test_attack_netdev import DEVICE as NIC, host_veth, links, net_bundle, persistent_netns  # noqa: F401 - fixtures

GPU = f"{hook_env.VENDOR}=gpu"
LIB_DIR = hook_env.LIB_DIR_IN_CONTAINER
LIB = os.path.basename(hook_env.LIBRARY_SOURCE)


def _library(version: int) -> str:
    return f"{LIB_DIR}{'' if version == 1 else version}/{LIB}"


def _spec(sources: Path, version: int) -> dict:
    """gpu: one node and one library. Version 1: /dev/cdi-gpu0 (loop0) and the library from
    host/v1 in LIB_DIR; version 2 (the upgrade): /dev/cdi-gpu1 (loop1) and the library from
    host/v2 in LIB_DIR2. (The library keeps its file name: ldconfig lists it by its soname.)"""
    node = {"path": f"/dev/cdi-gpu{version - 1}", "hostPath": f"/dev/loop{version - 1}"}
    library = {"hostPath": str(sources / f"v{version}" / LIB), "containerPath": _library(version),
               "options": ["ro", "nosuid", "nodev", "bind"]}
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR,
            "devices": [{"name": "gpu", "containerEdits": {"deviceNodes": [node], "mounts": [library]}}]}


@pytest.fixture
def upgraded(runc, tmp_path):
    """A running container that got gpu version 1, after the spec moved to version 2."""
    require(os.path.exists("/dev/loop0") and os.path.exists("/dev/loop1"), "needs /dev/loop0 and /dev/loop1")
    sources = tmp_path / "host"
    sources.mkdir()
    real = os.path.realpath(hook_env.LIBRARY_SOURCE)
    for version in (1, 2):
        (sources / f"v{version}").mkdir()
        shutil.copy(real, sources / f"v{version}" / LIB)
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, _spec(sources, 1), [GPU], "sleep 120")
    _install_all_stages(bundle, tmp_path)
    # The image's own node of loop0: the device cgroup alone decides whether it opens.
    os.mknod(bundle / "rootfs" / "tmp" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    with oci_env.detached_container(bundle, runc=runc) as container:
        container.spec_dir = tmp_path / "cdi"
        container.rootfs = bundle / "rootfs"
        container.address = f"runc:{container.id}"
        container.log_file = log_file
        oci_env.assert_opens(container, "/tmp/loop0", "r")
        oci_env.write_spec(container.spec_dir, "test.json", _spec(sources, 2))
        shutil.rmtree(sources / "v1")  # the upgrade removed the old library
        yield container


def _install_all_stages(bundle: Path, tmp_path: Path) -> None:
    config = json.loads((bundle / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    for stage in ("poststart", "poststop"):
        config["hooks"][stage] = [dict(entry, args=entry["args"][:-1] + [stage])]
    (bundle / "config.json").write_text(json.dumps(config))


def test_driver_upgrade_verify_stale_detach(upgraded):
    c = upgraded
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 1
    # What was given still holds; the only finding is that the device is stale.
    assert [x for x in checks if not x["ok"] and not x.get("stale")] == [], checks
    stale = [x for x in checks if x.get("stale")]
    assert [x["device"] for x in stale] == [GPU]
    assert _library(1) in stale[0]["detail"] and "/dev/cdi-gpu0" in stale[0]["detail"], stale
    assert any(x["item"] == f"mount {_library(1)}" and x["ok"] for x in checks), checks
    text = env.cli(c.spec_dir, "verify", c.address)
    assert text.returncode == 1 and text.stdout.startswith(f"{GPU}: spec: stale:"), text

    listed = env.cli(c.spec_dir, "stale")
    assert listed.returncode == 1 and c.id in listed.stdout and GPU in listed.stdout, listed
    as_json = json.loads(env.cli(c.spec_dir, "stale", "--format", "json").stdout)
    assert [(x["container"], list(x["devices"])) for x in as_json] == [(c.id, [GPU])]

    before = env.mountinfo_of(c.pid)
    done = env.cli(c.spec_dir, "detach", c.address, GPU)
    assert done.returncode == 0, done.stderr
    seen = c.exec(["sh", "-c", f"ls /dev/cdi-gpu0 /dev/cdi-gpu1 {_library(2)} 2>&1; wc -c < {_library(1)}"])
    # The old library's mount is gone; the empty file the hook made to mount it on stays
    # (the record does not yet list the mount points createRuntime created).
    assert seen.stdout.count("No such file") == 3 and seen.stdout.split()[-1] == "0", seen
    after = env.mountinfo_of(c.pid)
    assert [m for m in before if m not in after] == [_library(1)]
    oci_env.assert_refused(c, "/tmp/loop0", "r")  # the old node's access withdrawn
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert (rc, checks) == (0, [])


def test_spec_deleted_while_running_poststop_from_the_record(runc, tmp_path, host_veth, persistent_netns):  # noqa: F811
    """The spec file is deleted while the container runs: poststop still sends the moved
    interface home and gives back the exclusive hold, from the record, and removes the record."""
    end, _ = host_veth
    bundle, log_file = net_bundle(tmp_path, end, persistent_netns, "sleep 120")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{NIC}"]\n')
    config = json.loads((bundle / "config.json").read_text())
    for stage in ("createRuntime", "poststop"):
        config["hooks"][stage][0]["env"].append(f"CDI_HOOK_POLICY={policy}")
    (bundle / "config.json").write_text(json.dumps(config))
    top = Path(os.environ["CDI_HOOK_STATE_DIR"])
    hold = top / (NIC.replace("/", "%2F") + ".json")
    with oci_env.detached_container(bundle, runc=runc) as container:
        record = top.parent / "containers" / f"{container.id}.json"
        assert record.exists() and hold.exists() and end not in links()
        for spec in (tmp_path / "cdi").iterdir():
            spec.unlink()
    assert end in links(), "the interface stayed in the container's namespace"
    assert not hold.exists(), "the hold outlived its container"
    assert not record.exists()
    poststop = [line for line in hook_env.log_lines(log_file) if line["stage"] == "poststop"]
    assert [line.get("from") for line in poststop] == ["record"] and "error" not in poststop[0], poststop


def test_post_stages_without_work_import_only_the_record(upgraded, tmp_path):
    """poststart and poststop of a container whose record holds no work for them: the hook
    reads the record and returns, importing nothing that resolving or injecting needs."""
    c = upgraded
    state = json.dumps({"ociVersion": "1.0.2", "id": c.id, "status": "running", "pid": c.pid,
                        "bundle": str(c.rootfs.parent)})
    probe = ("import sys, io, json; from cdi_hook.commands import hook; "
             "sys.stdin = io.TextIOWrapper(io.BytesIO(sys.argv[2].encode())); "
             "rc = hook.run(sys.argv[1], None, sys.stdin.buffer); "
             "print(json.dumps([rc, sorted(m for m in sys.modules if m.startswith('cdi_hook'))]))")
    for stage in ("poststart", "poststop"):
        done = subprocess.run([sys.executable, "-I", "-c", probe, stage, state], capture_output=True, text=True,
                              env=dict(os.environ), timeout=60)
        assert done.returncode == 0, done.stderr
        rc, modules = json.loads(done.stdout)
        assert rc == 0
        assert set(modules) <= {"cdi_hook", "cdi_hook.commands", "cdi_hook.commands.hook", "cdi_hook.oci",
                                "cdi_hook.jsonio", "cdi_hook.errors", "cdi_hook.record", "cdi_hook.state",
                                "cdi_hook.settings", "cdi_hook.containers", "cdi_hook.spec",
                                "cdi_hook.spec.names"}, modules
        assert "cdi_hook.plan" not in modules and "cdi_hook.live.inject" not in modules


def test_refused_records(upgraded):
    """A record that is not cdi-hook's own (damaged, foreign-owned, a symlink) is refused with
    one line naming it, and never acted on."""
    c = upgraded
    path = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers" / f"{c.id}.json"
    good = path.read_bytes()
    cases = {
        "damaged": lambda: path.write_bytes(good.replace(b"cdi-gpu0", b"cdi-gpuX")),
        "foreign": lambda: (path.write_bytes(good), os.chown(path, 65534, 65534)),
        "symlink": lambda: (path.unlink(), path.with_suffix(".real").write_bytes(good),
                            path.symlink_to(path.with_suffix(".real"))),
    }
    try:
        for name, spoil in cases.items():
            spoil()
            done = env.cli(c.spec_dir, "verify", c.address)
            assert done.returncode == 1 and str(path) in done.stderr, (name, done)
            assert len(done.stderr.strip().splitlines()) == 1, (name, done.stderr)
    finally:
        path.unlink()
        path.with_suffix(".real").unlink(missing_ok=True)
        path.write_bytes(good)
        os.chmod(path, 0o600)


def test_hook_killed_half_way_leaves_no_record(runc, tmp_path):
    """The runtime kills the hook (its timeout) while a spec's createRuntime hook runs, after
    the nodes and mounts were made: no record is left, so no later step believes the container
    got what it did not keep."""
    sources = tmp_path / "host"
    sources.mkdir()
    shutil.copy(os.path.realpath(hook_env.LIBRARY_SOURCE), sources / LIB)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "slow", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
        "mounts": [{"hostPath": str(sources / LIB), "containerPath": f"{LIB_DIR}/{LIB}", "options": ["ro", "bind"]}],
        "hooks": [{"hookName": "createRuntime", "path": "/bin/sleep", "args": ["sleep", "30.0731"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [f"{hook_env.VENDOR}=slow"], "true")
    config = json.loads((bundle / "config.json").read_text())
    config["hooks"]["createRuntime"][0]["timeout"] = 2
    (bundle / "config.json").write_text(json.dumps(config))
    records = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers"
    before = sorted(records.iterdir()) if records.is_dir() else []
    done = oci_env.run_container(bundle, runc=runc)
    assert done.returncode != 0 and "timeout" in (done.stdout + done.stderr).lower(), done
    after = sorted(records.iterdir()) if records.is_dir() else []
    assert after == before
    assert subprocess.run(["pgrep", "-f", "^sleep 30.0731$"], capture_output=True).returncode == 1, "the spec hook ran on alone"


def test_detach_finds_a_creation_mount_the_container_moved(upgraded):
    """The record holds each mount's id as the hook made it: the container renames the
    folder holding the library's mount point, and detach still finds and removes that mount
    (a path lookup would miss it, report the device removed, and leave it mounted)."""
    c = upgraded
    moved = c.exec(["sh", "-c", f"mv {LIB_DIR} /opt/moved && ls /opt/moved"])
    assert moved.returncode == 0 and LIB in moved.stdout, moved
    assert f"/opt/moved/{LIB}" in env.mountinfo_of(c.pid)
    done = env.cli(c.spec_dir, "detach", c.address, GPU)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"now at /opt/moved/{LIB}" in done.stdout, done.stdout
    assert f"/opt/moved/{LIB}" not in env.mountinfo_of(c.pid)
    oci_env.assert_refused(c, "/tmp/loop0", "r")


def test_container_edited_before_creation_gets_its_record_when_first_needed(runc, tmp_path):
    """`inject --mode edits` gives the devices through config.json (runc makes them): the
    first verify derives the record from config.json and keeps it, so a later driver upgrade
    shows as stale and detach takes back what the container got."""
    require(os.path.exists("/dev/loop0") and os.path.exists("/dev/loop1"), "needs /dev/loop0 and /dev/loop1")
    sources = tmp_path / "host"
    real = os.path.realpath(hook_env.LIBRARY_SOURCE)
    for version in (1, 2):
        (sources / f"v{version}").mkdir(parents=True)
        shutil.copy(real, sources / f"v{version}" / LIB)
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "test.json", _spec(sources, 1))
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["sleep", "120"], rootfs=hook_env.glibc_like_rootfs(
        tmp_path / "bundle" / "rootfs"))
    done = env.cli(spec_dir, "inject", "--bundle", str(bundle), "--device", GPU, "--mode", "edits")
    assert done.returncode == 0, done.stderr
    records = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers"
    with oci_env.detached_container(bundle, runc=runc) as c:
        address = f"runc:{c.id}"
        assert not (records / f"{c.id}.json").exists()  # no hook ran: nothing recorded yet
        rc, checks = env.verify_json(spec_dir, address)
        # (runc runs no ldconfig for an edited config.json: the loader cache lists no library)
        assert checks and [x["item"] for x in checks if not x["ok"]] == [f"ld cache {_library(1)}"], checks
        assert (records / f"{c.id}.json").exists()  # derived from config.json, kept
        oci_env.write_spec(spec_dir, "test.json", _spec(sources, 2))
        rc, checks = env.verify_json(spec_dir, address)
        assert rc == 1 and [x["device"] for x in checks if x.get("stale")] == [GPU], checks
        assert [x["item"] for x in checks if not x["ok"] and not x.get("stale")] == [f"ld cache {_library(1)}"]
        listed = env.cli(spec_dir, "stale")
        assert listed.returncode == 1 and c.id in listed.stdout, listed
        done = env.cli(spec_dir, "detach", address, GPU)
        assert done.returncode == 0, done.stderr
        assert _library(1) not in env.mountinfo_of(c.pid)
        # The node and its cgroup rule are config.json's, which runc made and keeps: detach
        # never removes a node linux.devices lists, and says the rule stays.
        assert "b 7:0 stays allowed" in done.stdout, done.stdout


def test_inject_without_later_work_writes_no_post_entry_and_stale_prunes_its_record(runc, tmp_path):
    """`inject --mode hook` for a device with nothing to do after the start writes only the
    createRuntime entry (no interpreter at poststart or poststop). The record still says what
    the container got while it runs (verify reads it); once the container is gone, no
    poststop removes it, and `cdi-hook stale` does. A record that a poststop will still read
    (the container's config.json runs one) is left to it."""
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "test.json", {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [
        {"name": "null", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}]}}]})
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["sleep", "120"], rootfs=hook_env.glibc_like_rootfs(
        tmp_path / "bundle" / "rootfs"))
    done = env.cli(spec_dir, "inject", "--bundle", str(bundle), "--device", f"{hook_env.VENDOR}=null", "--mode", "hook")
    assert done.returncode == 0, done.stderr
    assert set(json.loads((bundle / "config.json").read_text())["hooks"]) == {"createRuntime"}
    records = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers"
    with oci_env.detached_container(bundle, runc=runc) as c:
        assert c.exec(["sh", "-c", "test -c /dev/cdi-null && echo x > /dev/cdi-null"]).returncode == 0
        record_file = records / f"{c.id}.json"
        assert record_file.exists()
        rc, checks = env.verify_json(spec_dir, f"runc:{c.id}")
        assert rc == 0 and checks, checks
        kept = env.cli(spec_dir, "stale")  # running: kept (other tests' ended containers' may go)
        assert kept.returncode == 0 and record_file.exists(), kept
    assert record_file.exists()  # runc deleted the container; no poststop of ours ran
    # A gone container whose config.json ran a poststop entry: its record waits for it.
    waiting = records / "cdi-test-awaits-poststop.json"
    data = record_file.read_bytes()
    document = json.loads(data[data.index(b"\n") + 1:])
    from cdi_hook import state
    fd = os.open(records, os.O_RDONLY | os.O_DIRECTORY)
    try:
        state.write_record(fd, waiting.name, dict(document, container="cdi-test-awaits-poststop",
                                                  entries=["poststop"]))
    finally:
        os.close(fd)
    try:
        pruned = env.cli(spec_dir, "stale")
        assert pruned.returncode == 0, pruned
        assert "removed the records of " in pruned.stderr, pruned.stderr
        assert not record_file.exists() and waiting.exists()
    finally:
        waiting.unlink(missing_ok=True)


@pytest.mark.parametrize("marked", [True, False])
def test_work_at_a_stage_config_json_runs_no_entry_at(runc, tmp_path, marked):
    """A device with a poststop hook, in a bundle whose config.json runs cdi-hook at
    createRuntime alone. Marked (inject wrote the entry, CDI_HOOK_POST_STAGES empty, before
    the spec gained the hook): the start goes on, its log line warns naming config.json and
    the stage, and `stale` removes the record once the container is gone (no poststop
    comes). Unmarked (hooks.d files, whose poststop Podman runs itself, outside config.json;
    a hand-written entry): no warning, and the record waits for its poststop."""
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "late", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
        "hooks": [{"hookName": "poststop", "path": "/bin/true"}]}}]}
    extra_env = {"CDI_HOOK_POST_STAGES": ""} if marked else None
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [f"{hook_env.VENDOR}=late"], "test -c /dev/cdi-null",
                                                 extra_env=extra_env)
    cid = "cdi-test-no-poststop-" + os.urandom(4).hex()
    done = oci_env.run_container(bundle, runc=runc, container_id=cid)
    assert done.returncode == 0, done
    warnings = [w for line in hook_env.log_lines(log_file) for w in line.get("warnings", [])]
    warned = [w for w in warnings if f"{bundle}/config.json runs no cdi-hook entry at poststop" in w]
    assert bool(warned) == marked, warnings
    path = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "containers" / f"{cid}.json"
    data = path.read_bytes()
    document = json.loads(data[data.index(b"\n") + 1:])
    assert document["work"] == ["poststop"] and document["entries"] == ([] if marked else None), document
    try:
        assert env.cli(tmp_path / "cdi", "stale").returncode == 0
        assert path.exists() != marked
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".idle").unlink(missing_ok=True)


def test_prune_from_a_pid_namespace_of_its_own_removes_nothing(tmp_path):
    """prune tells an ended container by its recorded host pid: a `stale` (or watcher) in a
    pid namespace of its own sees every pid as gone, so it removes nothing there; on the
    host the same record of an ended container is removed."""
    from cdi_hook import record, settings

    settings.use(None)
    cid = "cdi-test-pidns-" + os.urandom(4).hex()
    dead = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    record.save(record.Record(cid, int(dead), 1, str(tmp_path), [f"{hook_env.VENDOR}=x"], {}, {"holds": []}, [],
                              None, []))
    path = Path(record.folder()) / f"{cid}.json"
    try:
        cli = [sys.executable, "-I", "-m", "cdi_hook", "stale"]
        inside = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc"] + cli, capture_output=True, text=True,
                                env=dict(os.environ), timeout=60)
        assert inside.returncode == 0, inside.stderr
        assert path.exists(), "a stale in a pid namespace of its own removed a record"
        outside = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ), timeout=60)
        assert outside.returncode == 0 and not path.exists(), outside.stderr
    finally:
        record.remove(cid)
