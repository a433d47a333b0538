"""The live hook with real runc (cgroup v1): what the container sees after cdi-hook ran.

Each test builds a busybox bundle whose createRuntime hook is `cdi-hook hook`, a spec in a
temp spec dir, runs the container to completion and asserts from its output (and, for the
loader cache, from the rootfs it leaves behind).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import hook_env
import oci_env
from conftest import require

ALL = f"{hook_env.VENDOR}=all"


def _stat_lines(output: str) -> dict[str, str]:
    lines = {}
    for line in output.splitlines():
        if line.startswith("STAT "):
            _, path, rest = line.split(" ", 2)
            lines[path] = rest
    return lines


def test_requested_device_is_injected_as_the_spec_says(runc, tmp_path):
    sources = hook_env.host_files(tmp_path)
    script = "\n".join([
        "stat -c 'STAT %n %F %t:%T %a %u:%g' /dev/kvm /dev/loop0 /dev/null /dev/cdi/nested/zero",
        "test -e /dev/loop1 && echo LOOP1-PRESENT",
        "exec 3<>/dev/kvm && echo OPEN-KVM",
        "dd if=/dev/loop0 of=/dev/null count=0 2>/dev/null && echo OPEN-LOOP0",
        "head -c 4 /dev/cdi/nested/zero | od -An -tx1 | grep -q '00 00 00 00' && echo READ-ZERO",
        "cat /dev/null && echo OPEN-NULL",
        "cat /etc/cdi-config.txt",
        "echo changed > /etc/cdi-config.txt || echo RO-REFUSED",
        "cat /mnt/cdi-dir/hello",
        "echo new > /mnt/cdi-dir/written && echo RW-WRITTEN",
        "grep ' /etc/cdi-config.txt ' /proc/mounts",
        "grep ' /run/cdi-tmp ' /proc/mounts",
        "echo END",
    ])
    os.chmod(sources["dir"], 0o777)  # the container process is uid 1234
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, hook_env.full_spec(sources), [ALL], script,
                                                 process_user=(1234, 44))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    stats = _stat_lines(out)
    kvm, loop0, null, zero = (os.stat(p).st_rdev for p in ("/dev/kvm", "/dev/loop0", "/dev/null", "/dev/zero"))
    # spec values win; absent uid/gid default to the process user (1234:44, not root); mode from the host
    assert stats["/dev/kvm"] == f"character special file {os.major(kvm):x}:{os.minor(kvm):x} 640 1234:44"
    loop_mode = stat.S_IMODE(os.stat("/dev/loop0").st_mode)
    assert stats["/dev/loop0"] == f"block special file {os.major(loop0):x}:{os.minor(loop0):x} {loop_mode:o} 1234:44"
    assert stats["/dev/null"].startswith("character special file 1:3 666")  # runc's own, left alone
    assert stats["/dev/cdi/nested/zero"].startswith(f"character special file {os.major(zero):x}:{os.minor(zero):x}")
    assert "LOOP1-PRESENT" not in out  # same spec, not requested
    for opened in ("OPEN-KVM", "OPEN-LOOP0", "READ-ZERO", "OPEN-NULL"):
        assert opened in out, out + result.stderr
    assert "read-only config" in out and "RO-REFUSED" in out
    assert "hello from the host" in out and "RW-WRITTEN" in out
    assert (tmp_path / "host" / "dir" / "written").read_text() == "new\n"
    ro_line = next(line for line in out.splitlines() if " /etc/cdi-config.txt " in line)
    assert {"ro", "nosuid", "nodev"} <= set(ro_line.split()[3].split(","))
    tmpfs_line = next(line for line in out.splitlines() if " /run/cdi-tmp " in line)
    assert tmpfs_line.split()[2] == "tmpfs"
    assert {"nosuid", "noexec", "mode=750"} <= set(tmpfs_line.split()[3].split(","))
    assert "END" in out

    rootfs = bundle / "rootfs"
    conf = rootfs / "etc/ld.so.conf.d/00-cdi-hook.conf"
    assert hook_env.LIB_DIR_IN_CONTAINER in conf.read_text().splitlines()
    cache = subprocess.run(["ldconfig", "-C", str(rootfs / "etc/ld.so.cache"), "-p"],
                           capture_output=True, text=True, check=True).stdout
    assert f"=> {hook_env.LIB_DIR_IN_CONTAINER}/libz.so.1" in cache

    [line] = hook_env.log_lines(log_file)
    assert line["devices"] == [ALL] and line["stage"] == "createRuntime" and "error" not in line


def test_user_namespace_gets_nodes_by_bind_mount(runc):
    # The container's root is uid 200000 on the host: it must be able to reach the rootfs,
    # which pytest's 0700 tmp_path does not allow.
    tmp_path = Path(tempfile.mkdtemp(prefix="cdi-hook-userns-"))
    try:
        _user_namespace_case(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _user_namespace_case(tmp_path: Path):
    host_devs = tmp_path / "hostdev"
    host_devs.mkdir()
    kvm_rdev = os.stat("/dev/kvm").st_rdev  # c 10:232: not in runc's default allow list
    os.mknod(host_devs / "kvm", 0o666 | stat.S_IFCHR, kvm_rdev)
    os.chmod(host_devs / "kvm", 0o666)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/kvm", "hostPath": str(host_devs / "kvm")},
                        {"path": "/dev/cdi-zero", "hostPath": "/dev/zero"}]}}]}
    script = "\n".join([
        "stat -c 'STAT %n %F %t:%T' /dev/kvm /dev/cdi-zero",
        "grep -E ' /dev/(kvm|cdi-zero) ' /proc/self/mountinfo | sed 's/^/MOUNT /'",
        "exec 3<>/dev/kvm && echo OPEN-KVM",
        "head -c 2 /dev/cdi-zero | od -An -tx1 | grep -q '00 00' && echo READ-ZERO",
    ])
    mapping = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script, namespaces=namespaces,
                                          extra_linux={"uidMappings": mapping, "gidMappings": mapping})
    tmp_path.chmod(0o755)
    result = oci_env.run_container(bundle)
    require("user namespace" not in result.stderr or result.returncode == 0, "runc cannot make user namespaces here")
    assert result.returncode == 0, result.stderr
    stats = _stat_lines(result.stdout)
    assert stats["/dev/kvm"] == f"character special file {os.major(kvm_rdev):x}:{os.minor(kvm_rdev):x}"
    assert stats["/dev/cdi-zero"] == "character special file 1:5"
    assert result.stdout.count("MOUNT ") == 2, result.stdout  # bind mounts, not mknod
    assert "OPEN-KVM" in result.stdout and "READ-ZERO" in result.stdout, result.stdout + result.stderr


# A hook whose mknod is refused (as an LSM or a device cgroup confining the hook would): the
# stand-in makes os.mknod fail with EPERM for device nodes in the hook process and its worker.
_MKNOD_REFUSED = (
    "import errno, os, stat, sys\n"
    "real = os.mknod\n"
    "def refused(path, mode=0o600, device=0, *, dir_fd=None):\n"
    "    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):\n"
    "        raise PermissionError(errno.EPERM, 'Operation not permitted', path)\n"
    "    return real(path, mode, device, dir_fd=dir_fd)\n"
    "os.mknod = refused\n"
    "from cdi_hook.cli import main\n"
    "sys.exit(main())\n")


def test_refused_mknod_falls_back_to_the_host_node_by_bind_mount(runc, tmp_path):
    """Without a user namespace the host node is cloned only when mknod is refused (the worker
    goes back to the host's mount namespace for it): the container still gets the device."""
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-zero", "hostPath": "/dev/zero"}, {"path": "/dev/kvm"}]}}]}
    script = "\n".join([
        "stat -c 'STAT %n %F %t:%T' /dev/cdi-zero /dev/kvm",
        "grep -E ' /dev/(kvm|cdi-zero) ' /proc/self/mountinfo | sed 's/^/MOUNT /'",
        "head -c 2 /dev/cdi-zero | od -An -tx1 | grep -q '00 00' && echo READ-ZERO",
        "exec 3<>/dev/kvm && echo OPEN-KVM",
    ])
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script,
                                                 extra_env={"CDI_HOOK_LOG_LEVEL": "debug"})  # notes in the log
    config = json.loads((bundle / "config.json").read_text())
    [entry] = config["hooks"]["createRuntime"]
    assert entry["args"][1:4] == ["-I", "-S", "-c"], entry
    entry["args"][4] = entry["args"][4].split("; from cdi_hook.start ")[0] + "\n" + _MKNOD_REFUSED
    (bundle / "config.json").write_text(json.dumps(config))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    stats = _stat_lines(result.stdout)
    kvm = os.stat("/dev/kvm").st_rdev
    assert stats["/dev/cdi-zero"] == "character special file 1:5"
    assert stats["/dev/kvm"] == f"character special file {os.major(kvm):x}:{os.minor(kvm):x}"
    assert result.stdout.count("MOUNT ") == 2, result.stdout  # bind mounts of the host's nodes
    assert "READ-ZERO" in result.stdout and "OPEN-KVM" in result.stdout, result.stdout + result.stderr
    [line] = hook_env.log_lines(log_file)
    assert sum("mknod refused, bind-mounting the host node" in n for n in line["notes"]) == 2, line


def test_more_bind_mounts_than_one_fd_message_carries(runc, tmp_path):
    """The hook passes the clones of bind sources to its worker over a socket, at most 250 fds
    a message (SCM_MAX_FD is 253): 300 mounts arrive in order, each from its own source."""
    sources = tmp_path / "many"
    sources.mkdir()
    mounts = []
    for i in range(300):
        (sources / f"f{i}").write_text(f"{i}\n")
        mounts.append({"hostPath": str(sources / f"f{i}"), "containerPath": f"/many/f{i}", "options": ["ro", "bind"]})
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": mounts}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "for i in $(seq 0 299); do cat /many/f$i; done")
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(i) for i in range(300)]


def test_applied_names_are_skipped(runc, tmp_path):
    sources = hook_env.host_files(tmp_path)
    bundle, log_file = hook_env.bundle_with_hook(
        tmp_path, hook_env.full_spec(sources), [ALL], "test -e /dev/kvm && echo KVM; echo DONE",
        annotations={"io.github.cdi-hook.applied": ALL})
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "DONE" in result.stdout and "KVM" not in result.stdout
    assert hook_env.log_lines(log_file) == []  # nothing to do, nothing logged


def test_env_and_additional_gids_are_warned_about(runc, tmp_path):
    spec = {"cdiVersion": "0.7.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "env": ["CDI_TEST=1"], "additionalGids": [44],
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}]}}]}
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "test -c /dev/cdi-null && echo OK")
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout
    [line] = hook_env.log_lines(log_file)
    assert any("CDI_TEST" in w for w in line["warnings"]) and any("44" in w for w in line["warnings"])


def test_spec_hook_runs_with_exact_env_args_and_state(runc, tmp_path):
    out = tmp_path / "spec-hook.out"
    script = tmp_path / "spec-hook.sh"
    script.write_text(f"#!/bin/sh\n{{ echo \"ARGS $0 $*\"; env | sort; echo STATE; cat; echo; }} > {out}\n")
    script.chmod(0o755)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "hooks": [{"hookName": "createRuntime", "path": str(script), "args": ["my-hook", "one", "two"],
                   "env": ["ONLY=this"]},
                  {"hookName": "prestart", "path": "/bin/sh", "args": ["sh", "-c", f"echo PRESTART > {out}.pre"]},
                  {"hookName": "poststop", "path": "/bin/false"}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN")
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    # hooks.d registers cdi-hook at createRuntime only: that run also runs the prestart hooks
    assert (tmp_path / "spec-hook.out.pre").read_text() == "PRESTART\n"
    text = out.read_text()
    assert "ARGS my-hook one two" in text or f"ARGS {script} one two" in text
    env_lines = text.split("STATE")[0].splitlines()[1:]
    assert [line for line in env_lines if not line.startswith(("PWD=", "SHLVL=", "_="))] == ["ONLY=this"]
    assert '"status":"creating"' in text.replace(" ", "") and '"id"' in text


def test_failing_spec_hook_stops_the_container_and_undoes(runc, tmp_path):
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["file"], "containerPath": "/new/dir/file", "options": ["ro", "bind"]},
                   {"hostPath": sources["library"], "containerPath": "/new/lib/libz.so.1", "options": ["ro", "bind"]}],
        "hooks": [{"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}]}}]}
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "etc" / "ld.so.cache").write_bytes(b"the image's own cache")
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert (rootfs / "etc" / "ld.so.cache").read_bytes() == b"the image's own cache"
    assert not (rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf").exists()
    assert "spec hook" in result.stderr and "broken" in result.stderr and ALL in result.stderr
    assert not (bundle / "rootfs" / "new").exists()  # mount point and its parents removed again
    assert "error" in hook_env.log_lines(log_file)[0]


@pytest.mark.parametrize("case", ["unknown device", "invalid spec", "missing host device", "missing mount source"])
def test_failures_keep_the_container_from_starting(runc, tmp_path, case):
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": hook_env.host_files(tmp_path)["file"], "containerPath": "/created/by/hook",
                    "options": ["bind"]}],
        "deviceNodes": [{"path": "/dev/kvm"}]}}]}
    devices = [ALL]
    expect = ""
    if case == "unknown device":
        devices = [f"{hook_env.VENDOR}=nope"]
        expect = f"{hook_env.VENDOR}=nope"
    elif case == "invalid spec":
        spec["devices"][0]["containerEdits"]["deviceNodes"] = [{"path": "/dev/kvm", "type": "z"}]
        expect = "test.json"
    elif case == "missing host device":
        spec["devices"][0]["containerEdits"]["deviceNodes"] = [{"path": str(tmp_path / "no-such-device")}]
        expect = "no-such-device"
    else:
        spec["devices"][0]["containerEdits"]["mounts"].append(
            {"hostPath": str(tmp_path / "no-such-source"), "containerPath": "/later", "options": ["bind"]})
        expect = "no-such-source"
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, devices, "echo RAN")
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert expect in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (bundle / "rootfs" / "created").exists()


def test_no_ld_so_conf_skips_ldconfig_without_failing(runc, tmp_path):
    sources = hook_env.host_files(tmp_path)
    rootfs = oci_env.make_rootfs(tmp_path / "bundle" / "rootfs")  # busybox only: no ld.so.conf (like musl)
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, hook_env.full_spec(sources), [ALL],
                                                 "test -f /opt/cdi-libs/libz.so.1 && echo LIB", rootfs=rootfs,
                                                 extra_env={"CDI_HOOK_LOG_LEVEL": "debug"})
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "LIB" in result.stdout
    assert not (rootfs / "etc" / "ld.so.conf.d").exists() and not (rootfs / "etc" / "ld.so.cache").exists()
    [line] = hook_env.log_lines(log_file)
    assert any("ldconfig skipped" in note for note in line["notes"])


def test_failing_ldconfig_is_reported_with_its_output(runc, tmp_path):
    import fault_env

    sources = hook_env.host_files(tmp_path)
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": sources["library"], "containerPath": "/opt/lib/libz.so.1", "options": ["bind"]}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    # ldconfig's rename(2) of its new ld.so.cache~ fails (the hook itself renames with renameat).
    fault_env.with_failing_syscalls(bundle, tmp_path, ["rename"])  # ldconfig's; the hook renames with renameat
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert f"ldconfig for {ALL}: exit status" in result.stderr and "ld.so.cache" in result.stderr, result.stderr
    assert not (rootfs / "opt").exists() and not (rootfs / "etc" / "ld.so.conf.d").exists()


def test_prestart_stage_injects_too(runc, tmp_path):
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/kvm"}]}}]}
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "exec 3<>/dev/kvm && echo OPEN-KVM",
                                                 stage="prestart")
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "OPEN-KVM" in result.stdout
    assert hook_env.log_lines(log_file)[0]["stage"] == "prestart"


def test_cgroup_v2_injected_devices_open_others_refused(runc, tmp_path):
    """The whole hook under runc in cgroup v2 mode (the BPF device program is extended)."""
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/kvm"}, {"path": "/dev/loop0", "permissions": "r"}],
        # a host node that only gets bind-mounted: present in the container, never allowed
        "mounts": [{"hostPath": "/dev/loop1", "containerPath": "/dev/loop1-unallowed", "options": ["bind"]}]}}]}
    script = "\n".join([
        "(exec 3<>/dev/kvm) && echo OPEN-KVM",
        "dd if=/dev/loop0 of=/dev/null count=0 2>/dev/null && echo READ-LOOP0",
        "(exec 4<>/dev/loop0) 2>/dev/null && echo WRITE-LOOP0",
        "test -b /dev/loop1-unallowed && echo LOOP1-PRESENT",
        "dd if=/dev/loop1-unallowed of=/dev/null count=0 2>/dev/null && echo OPEN-LOOP1",
        "echo END",
    ])
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script)
    with oci_env.cgroup2_namespace() as namespace:
        cid = "cdi-test-v2-" + os.urandom(6).hex()
        command = namespace.enter + [runc]
        try:
            result = subprocess.run(command + ["run", "--bundle", str(bundle), cid], capture_output=True, text=True,
                                    timeout=120, stdin=subprocess.DEVNULL)
        finally:
            subprocess.run(command + ["delete", "--force", cid], capture_output=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "END" in out and "LOOP1-PRESENT" in out, out + result.stderr
    assert "OPEN-KVM" in out and "READ-LOOP0" in out, out + result.stderr
    assert "WRITE-LOOP0" not in out and "OPEN-LOOP1" not in out, out


def test_hook_at_two_stages_applies_once(runc, tmp_path):
    """Registered at createRuntime and prestart: nodes kept, bind mounts not stacked twice."""
    sources = hook_env.host_files(tmp_path)
    script = "grep -c ' /etc/cdi-config.txt ' /proc/mounts; grep -c ' /dev/kvm ' /proc/mounts; (exec 3<>/dev/kvm) && echo OPEN-KVM"
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, hook_env.full_spec(sources), [ALL], script,
                                                 extra_env={"CDI_HOOK_LOG_LEVEL": "debug"}, process_user=(1234, 44))
    config = json.loads((bundle / "config.json").read_text())
    entry = dict(config["hooks"]["createRuntime"][0])
    entry["args"] = entry["args"][:-1] + ["prestart"]
    config["hooks"]["prestart"] = [entry]
    (bundle / "config.json").write_text(json.dumps(config))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["1", "0"], result.stdout  # one mount; kvm is a node, no mount
    assert "OPEN-KVM" in result.stdout
    first, second = hook_env.log_lines(log_file)
    assert any("mknod c 10:232" in note for note in first["notes"])
    assert any("/dev/kvm: already present" in note for note in second["notes"])
    assert any("already mounted" in note for note in second["notes"])
    # At debug level each step's duration is logged, so a user sees where a start goes.
    steps = first["steps_ms"]
    assert {"resolve", "worker", "nodes", "mounts", "ldconfig", "device cgroup", "spec hooks"} <= set(steps), steps
    assert all(isinstance(ms, float) and 0 <= ms < 30_000 for ms in steps.values()), steps


def _image_node(rootfs: Path, rel: str, rdev: int, mode: int, uid: int, gid: int) -> Path:
    path = rootfs / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o600, rdev)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_nodes_already_in_the_image_are_replaced_or_restyled_as_native_cdi_does(runc, tmp_path):
    """Another device at the path is replaced; the same device gets the spec's mode and owner."""
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    _image_node(rootfs, "opt/dev/other", os.makedev(1, 7), 0o644, 0, 0)   # /dev/full where the spec wants zero
    _image_node(rootfs, "opt/dev/same", os.makedev(1, 3), 0o666, 0, 0)    # /dev/null, restyled
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/opt/dev/other", "hostPath": "/dev/zero"},
                        {"path": "/opt/dev/same", "hostPath": "/dev/null", "fileMode": 0o640, "uid": 12, "gid": 34}]}}]}
    script = "stat -c 'STAT %n %t:%T %a %u:%g' /opt/dev/other /opt/dev/same"
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script, rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    seen = _stat_lines(result.stdout)
    assert seen["/opt/dev/other"] == "1:5 666 0:0"
    assert seen["/opt/dev/same"] == "1:3 640 12:34"


def test_replaced_and_restyled_image_nodes_are_put_back_when_the_hook_fails(runc, tmp_path):
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    other = _image_node(rootfs, "opt/dev/other", os.makedev(1, 7), 0o644, 5, 6)
    same = _image_node(rootfs, "opt/dev/same", os.makedev(1, 3), 0o666, 7, 8)
    before = {p: os.lstat(p) for p in (other, same)}
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/opt/dev/other", "hostPath": "/dev/zero"},
                        {"path": "/opt/dev/same", "hostPath": "/dev/null", "fileMode": 0o600, "uid": 1, "gid": 2}],
        "hooks": [{"hookName": "createRuntime", "path": "/bin/false"}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo SHOULD-NOT-RUN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "SHOULD-NOT-RUN" not in result.stdout
    for path, old in before.items():
        now = os.lstat(path)
        assert (now.st_mode, now.st_rdev, now.st_uid, now.st_gid) == (old.st_mode, old.st_rdev, old.st_uid, old.st_gid), path


def test_user_namespace_mounts_ldconfig_and_ownership(runc):
    """A mapped user namespace: file/dir/library bind mounts work (ro refuses writes), the
    ld cache lists the library, and what cdi-hook creates is owned by the container's root."""
    tmp_path = Path(tempfile.mkdtemp(prefix="cdi-hook-userns-"))
    try:
        sources = hook_env.host_files(tmp_path)
        spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
            "mounts": [
                {"hostPath": sources["file"], "containerPath": "/etc/cdi/config.txt", "options": ["ro", "bind"]},
                {"hostPath": sources["dir"], "containerPath": "/mnt/cdi-dir", "options": ["rw", "rbind"]},
                {"hostPath": sources["library"], "containerPath": hook_env.LIB_DIR_IN_CONTAINER + "/libz.so.1",
                 "options": ["ro", "bind"]}]}}]}
        script = "\n".join([
            "cat /etc/cdi/config.txt /mnt/cdi-dir/hello",
            "(echo x > /etc/cdi/config.txt) 2>/dev/null && echo RO-WRITABLE || echo RO-REFUSED",
            f"stat -c 'OWNER %n %u:%g' /etc/cdi /etc/ld.so.conf.d/00-cdi-hook.conf {hook_env.LIB_DIR_IN_CONTAINER}",
        ])
        mapping = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]
        bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script, namespaces=namespaces,
                                              extra_linux={"uidMappings": mapping, "gidMappings": mapping})
        rootfs = bundle / "rootfs"
        for entry in [tmp_path, *rootfs.rglob("*")]:  # the image belongs to the container's root
            os.lchown(entry, 200000, 200000) if entry != tmp_path else entry.chmod(0o755)
        os.lchown(rootfs, 200000, 200000)
        result = oci_env.run_container(bundle)
        assert result.returncode == 0, result.stderr
        assert "read-only config" in result.stdout and "hello from the host" in result.stdout
        assert "RO-REFUSED" in result.stdout
        owners = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("OWNER ")]
        assert owners == ["0:0", "0:0", "0:0"], result.stdout  # container root, not nobody
        cache = subprocess.run(["ldconfig", "-C", str(rootfs / "etc" / "ld.so.cache"), "-p"],
                               capture_output=True, text=True).stdout
        assert f"{hook_env.LIB_DIR_IN_CONTAINER}/libz.so.1" in cache
    finally:
        shutil.rmtree(tmp_path)


def test_bind_mounts_never_propagate_back_to_a_shared_host_source(runc, tmp_path):
    """systemd makes the host's mounts shared. A bind mount in the container must not stay a
    peer of its host source, or a mount nested under it (here a second spec mount) would
    appear on the host too (found in the QEMU guest, a systemd host)."""
    src = tmp_path / "shared-src"
    (src / "nested").mkdir(parents=True)
    (src / "nested" / "n.txt").write_text("under\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("over\n")
    subprocess.run(["mount", "--bind", str(src), str(src)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(src)], check=True)
        before = oci_env.host_mount_points()
        spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
            "mounts": [{"hostPath": str(src), "containerPath": "/opt/data", "options": ["rbind"]},
                       {"hostPath": str(other), "containerPath": "/opt/data/nested", "options": ["ro", "bind"]}]}}]}
        bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "cat /opt/data/nested/o.txt")
        result = oci_env.run_container(bundle)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "over\n"
        assert oci_env.host_mount_points() == before
        assert (src / "nested" / "n.txt").read_text() == "under\n"  # nothing mounted over it on the host
    finally:
        subprocess.run(["umount", "-R", str(src)], check=False)
