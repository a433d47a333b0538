"""verify / attach / detach on real detached runc containers under cgroup v1.

The container is started with cdi-hook as its createRuntime hook and one device (loop)
requested at creation; kvm is attached and detached while it runs. What the container
sees is asked from inside it (runc exec): the device cgroup refusing a node it made itself
before the attach, opening it after, the mounted file, the loader cache.
"""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

import hook_env
from cdi_hook import state
import oci_env
import running_env as env
from ci_rules import require_cgroup_v1
from conftest import require, require_program
from running_env import BAD, KVM, LOOP, PAIR


@pytest.fixture
def started(runc, tmp_path):
    require(os.path.exists("/dev/kvm") and os.path.exists("/dev/loop0"), "needs /dev/kvm and /dev/loop0")
    document, sources = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [LOOP], "sleep 120")
    # The image's own nodes of the devices: the device cgroup alone decides their opening.
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    os.mknod(bundle / "rootfs" / "tmp" / "loop0", stat.S_IFBLK | 0o666, os.makedev(7, 0))
    with oci_env.detached_container(bundle, runc=runc) as container:
        container.spec_dir = tmp_path / "cdi"
        container.sources = sources
        container.rootfs = bundle / "rootfs"
        container.address = f"runc:{container.id}"
        yield container


def test_verify_attach_detach(started):
    c = started
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and checks, checks
    assert {(x["device"], x["item"]) for x in checks} == {(LOOP, "node /dev/loop0"), (LOOP, "cgroup b 7:0 rwm")}

    oci_env.assert_refused(c, "/tmp/kvm", "r")  # the cgroup refuses kvm before the attach
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    oci_env.assert_opens(c, "/tmp/kvm", "r")
    shown = c.exec(["sh", "-c", "cat /etc/cdi-config.txt; stat -c '%a %u:%g %t:%T' /dev/kvm; "
                                "echo x > /etc/cdi-config.txt || echo RO-REFUSED"])
    assert shown.stdout.splitlines() == ["read-only config", "660 0:44 a:e8", "RO-REFUSED"], shown
    cache = (c.rootfs / "etc" / "ld.so.cache").read_bytes()
    assert c.sources["library_in_container"].encode() + b"\0" in cache
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)
    items = {(x["device"], x["item"]) for x in checks}
    assert (KVM, "cgroup c 10:232 rwm") in items and (KVM, "mount /etc/cdi-config.txt") in items
    assert (KVM, f"ld cache {c.sources['library_in_container']}") in items
    assert f"{c.id}.json" in env.record_files()
    record = f"{c.id}.json"
    record_path = os.path.join(os.path.dirname(os.environ["CDI_HOOK_STATE_DIR"]), "attachments", record)
    assert stat.S_IMODE(os.stat(record_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(record_path)).st_mode) == 0o700

    again = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert again.returncode == 1 and "already given" in again.stderr

    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    gone = c.exec(["sh", "-c", "ls /dev/kvm /etc/cdi-config.txt /mnt/cdi-dir /opt/cdi-libs 2>&1; "
                               "grep -c cdi /proc/mounts"])
    assert gone.stdout.count("No such file") == 4 and gone.stdout.splitlines()[-1] == "0", gone
    oci_env.assert_refused(c, "/tmp/kvm", "r")  # access withdrawn
    oci_env.assert_opens(c, "/tmp/loop0", "r")  # the creation device keeps its own
    assert c.sources["library_in_container"].encode() not in (c.rootfs / "etc" / "ld.so.cache").read_bytes()
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)

    # A node removed inside the container: verify names it, exit 1, one line in text form.
    assert c.exec(["rm", "/dev/loop0"]).returncode == 0
    done = env.cli(c.spec_dir, "verify", c.address)
    assert done.returncode == 1 and done.stdout.strip() == f"{LOOP}: node /dev/loop0: missing", done

    # A device given at creation can be detached too: its access goes.
    done = env.cli(c.spec_dir, "detach", c.address, LOOP)
    assert done.returncode == 0, done.stderr
    oci_env.assert_refused(c, "/tmp/loop0", "r")
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert (rc, checks) == (0, [])


def test_failed_attach_leaves_nothing(started):
    c = started
    before_tree = oci_env.tree_snapshot(c.rootfs)
    before_mounts = env.mountinfo_of(c.pid)
    done = env.cli(c.spec_dir, "attach", c.address, KVM, BAD)
    assert done.returncode == 1
    assert "/proc/cdi-bad" in done.stderr and BAD in done.stderr, done.stderr
    assert oci_env.tree_snapshot(c.rootfs) == before_tree
    assert env.mountinfo_of(c.pid) == before_mounts
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)


def test_attach_failing_after_the_cgroup_step_gives_the_cgroup_back(started, tmp_path):
    """The record cannot be saved (its dir is on a read-only mount): attach fails after the
    nodes, mounts, loader cache and the device cgroup were done. Everything goes back: v1
    denies only what attach added, so loop0's rule, which the hook gave at creation and pair
    asks again, stays; kvm is refused again; the rootfs is entry for entry as it was."""
    c = started
    oci_env.assert_opens(c, "/tmp/loop0", "r")
    before_tree = oci_env.tree_snapshot(c.rootfs)
    before_mounts = env.mountinfo_of(c.pid)
    with env.unsavable_records(tmp_path / "ro-state", c.id) as state:
        done = env.cli(c.spec_dir, "attach", c.address, PAIR, env=state)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Read-only file system" in done.stderr, done.stderr
    assert oci_env.tree_snapshot(c.rootfs) == before_tree  # ld.so.cache and conf file included
    assert env.mountinfo_of(c.pid) == before_mounts
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    oci_env.assert_opens(c, "/tmp/loop0", "r")  # the rule it had before stays
    oci_env.assert_opens(c, "/dev/null", "rw")
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and {x["device"] for x in checks} == {LOOP}, env.failed(checks)


@pytest.mark.parametrize("who", ["nobody", "root of a user namespace"])
def test_not_root_is_refused_before_anything_is_read(started, tmp_path, who):
    """verify, attach and detach as nobody, or as uid 0 of a user namespace of its own (no
    power over the container): one line, and strace shows no runtime run and none of the
    container's, the specs' or the records' files opened; the container is unchanged."""
    c = started
    require_program("strace")
    enter = {"nobody": ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
             "root of a user namespace": ["unshare", "--user", "--map-root-user"]}[who]
    trace = tmp_path / "trace"
    for command, args in (("verify", []), ("attach", [KVM]), ("detach", [LOOP])):
        done = env.cli(c.spec_dir, command, c.address, *args,
                       enter=["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=execve,open,openat"] + enter)
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.splitlines() == [f"cdi-hook: {command}: must run as root of the host: it enters the "
                                            "container's namespaces and reads or changes its device cgroup, as "
                                            "the node's administrator"], done.stderr
        calls = trace.read_text().splitlines()
        programs = [line.split('"')[1] for line in calls if " execve(" in line]
        assert programs == [shutil.which(enter[0]), env.sys.executable], calls
        opened = [line.split('"')[1] for line in calls if " open" in line]
        for never in (str(tmp_path), os.path.dirname(os.environ["CDI_HOOK_STATE_DIR"]), f"/proc/{c.pid}/", "/run/"):
            assert [path for path in opened if path.startswith(never)] == [], (never, calls)
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert f"{c.id}.json" not in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0, env.failed(checks)


def test_refusals(started, tmp_path):
    c = started
    done = env.cli(c.spec_dir, "attach", c.address, f"{env.VENDOR}=nosuch")
    assert done.returncode == 1 and "nosuch" in done.stderr
    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 1 and "not given" in done.stderr
    done = env.cli(c.spec_dir, "verify", "runc:cdi-test-nosuch")
    assert done.returncode == 1 and "cdi-test-nosuch" in done.stderr and "Traceback" not in done.stderr
    assert env.cli(c.spec_dir, "verify", f"pid:{c.pid}").returncode == 1  # no --bundle: said so
    rc, _ = env.verify_json(c.spec_dir, f"pid:{c.pid}", "--bundle", str(tmp_path / "bundle"))
    assert rc == 0
    assert c.exec(["true"]).returncode == 0
    assert os.system(f"runc pause {c.id}") == 0
    try:
        done = env.cli(c.spec_dir, "attach", c.address, KVM)
        assert done.returncode == 1 and "paused" in done.stderr, done.stderr
    finally:
        os.system(f"runc resume {c.id}")


def test_detach_that_cannot_withdraw_access_keeps_the_device(started):
    """devices.deny cannot be written (a read-only file bound over it): detach fails with one
    line, before it touches the rootfs; the record still has kvm attached, its node and access
    stay, and a later detach, once deny works again, takes it all away."""
    require_cgroup_v1()  # the v1 devices.deny file is what fails here
    c = started
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    cgroup = next(line.split(":", 2)[2] for line in open(f"/proc/{c.pid}/cgroup").read().splitlines()
                  if "devices" in line.split(":")[1].split(","))
    deny = f"/sys/fs/cgroup/devices{cgroup}/devices.deny"
    assert os.system(f"mount --bind /proc/version {deny}") == 0  # a write to it fails (EIO)
    try:
        done = env.cli(c.spec_dir, "detach", c.address, KVM)
    finally:
        os.system(f"umount {deny}")
    assert done.returncode == 1 and done.stdout == "", done
    assert done.stderr.splitlines() == [done.stderr.strip()] and "device cgroup" in done.stderr, done.stderr
    assert "stay attached" in done.stderr and KVM in done.stderr, done.stderr
    oci_env.assert_opens(c, "/dev/kvm", "rw")
    assert f"{c.id}.json" in env.record_files()
    rc, checks = env.verify_json(c.spec_dir, c.address)
    assert rc == 0 and KVM in {x["device"] for x in checks}, env.failed(checks)
    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert f"{c.id}.json" not in env.record_files()


def test_v1_rollback_keeps_access_the_container_had(runc, tmp_path):
    """config.json allows c 10:232 r; attach asks kvm rwm and then fails (the record cannot be
    saved): the rollback denies only w and m, which attach added; r stays, as runc gave it."""
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    document, _ = env.spec(tmp_path)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, document, [], "sleep 120")
    config = json.loads((bundle / "config.json").read_text())
    config["linux"]["resources"]["devices"].append({"allow": True, "type": "c", "major": 10, "minor": 232,
                                                    "access": "r"})
    (bundle / "config.json").write_text(json.dumps(config))
    os.mknod(bundle / "rootfs" / "tmp" / "kvm", stat.S_IFCHR | 0o666, os.makedev(10, 232))
    with oci_env.detached_container(bundle, runc=runc) as c:
        oci_env.assert_opens(c, "/tmp/kvm", "r")
        oci_env.assert_refused(c, "/tmp/kvm", "w")
        with env.unsavable_records(tmp_path / "ro-state", c.id) as state:
            done = env.cli(tmp_path / "cdi", "attach", f"runc:{c.id}", KVM, env=state)
        assert done.returncode == 1 and "Read-only file system" in done.stderr, done.stderr
        oci_env.assert_opens(c, "/tmp/kvm", "r")  # what runc gave stays
        oci_env.assert_refused(c, "/tmp/kvm", "w")  # what attach added went


def test_attach_whose_worker_cannot_start_releases_the_hold(started, tmp_path):
    """kvm is exclusive (a hold is taken before the worker starts); the fork fails (made to,
    its os.fork replaced in the CLI's process): one line, and the hold is
    released, so another container can take kvm."""
    c = started
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{KVM}"]\n')
    os.chmod(policy, 0o644)
    code = ("import errno, os, sys; from cdi_hook import cli\n"
            "def fork(): raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))\n"
            "os.fork = fork; sys.exit(cli.main(sys.argv[1:]))")
    # A private holds dir: the session's may hold a stale kvm hold of an earlier test's
    # container, which this attach would take over and then release.
    state_dir = str(tmp_path / "held")
    settings = {"CDI_HOOK_POLICY": str(policy), "CDI_HOOK_STATE_DIR": state_dir}
    held = lambda: sorted(os.listdir(state_dir)) if os.path.isdir(state_dir) else []  # noqa: E731
    before = held()
    done = env.cli(c.spec_dir, "attach", c.address, KVM, env=settings, python_code=code)
    assert done.returncode == 1 and "Resource temporarily unavailable" in done.stderr, done
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert held() == before
    done = env.cli(c.spec_dir, "attach", c.address, KVM, env=settings)
    assert done.returncode == 0, done.stderr
    assert held() != before  # the hold a real attach takes is seen there


def test_detach_finds_a_mount_the_container_moved(started):
    """attach records each mount's id; the container then renames the folder holding a mount
    point (attach made it). detach finds the mount by its id where it is now, checks its
    source, and unmounts it: the container does not keep a device detach reports removed."""
    c = started
    done = env.cli(c.spec_dir, "attach", c.address, KVM)
    assert done.returncode == 0, done.stderr
    path = os.path.join(os.path.dirname(os.environ["CDI_HOOK_STATE_DIR"]), "attachments", f"{c.id}.json")
    entry = state.decode_record(open(path, "rb").read(), path)["attached"][0]
    assert all(isinstance(mount[4], int) for mount in entry["mounts"]), entry  # the ids detach uses
    library = c.sources["library_in_container"]
    moved = c.exec(["sh", "-c", "mv /opt/cdi-libs /opt/cdi-moved && ls /opt/cdi-moved"])
    assert moved.returncode == 0 and os.path.basename(library) in moved.stdout, moved
    assert any(point.startswith("/opt/cdi-moved/") for point in env.mountinfo_of(c.pid))

    done = env.cli(c.spec_dir, "detach", c.address, KVM)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"now at /opt/cdi-moved/{os.path.basename(library)}" in done.stdout, done.stdout
    assert not [point for point in env.mountinfo_of(c.pid) if "cdi" in point], env.mountinfo_of(c.pid)
    oci_env.assert_refused(c, "/tmp/kvm", "r")
    assert f"{c.id}.json" not in env.record_files()
