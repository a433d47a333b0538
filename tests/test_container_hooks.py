"""A spec's createContainer hooks run by the live hook, as runc runs them from config.json.

Each recording hook finds the rootfs through the bundle in the OCI state on its stdin (as
NVIDIA's nvidia-cdi-hook does), writes what it saw into a file it creates there, and makes a
symlink the container then reads. The same spec through `cdi-hook inject --mode edits` lets
runc run the hooks itself: both records are compared field by field; the differences are
the ones docs/reference/live-hook.md names.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

import hook_env
import oci_env
from cdi_hook.cli import main
from ci_rules import TIME_FACTOR
from conftest import require
from cdi_hook.errors import HookError
from cdi_hook.live import containerhooks

ALL = f"{hook_env.VENDOR}=all"
NAMESPACES = ("mnt", "net", "uts", "ipc", "pid", "cgroup", "user")

# The recorder: a Python script (so a #! line with an argument) the spec names by its host path.
RECORDER = """#!/usr/bin/python3 -I
import json, os, stat, sys, time

state = json.loads(sys.stdin.read())
with open(os.path.join(state["bundle"], "config.json")) as f:
    root = json.load(f)["root"]["path"]
rootfs = os.path.join(state["bundle"], root)
action = sys.argv[1] if len(sys.argv) > 1 else "record"
if action == "fail":
    print("the vendor tool is unhappy")
    sys.exit(1)
if action == "sleep":
    print("about to sleep", flush=True)
    time.sleep(60)
with open("/proc/self/cmdline", "rb") as f:
    cmdline = [a.decode() for a in f.read().split(b"\\0")[:-1]]
kvm = os.path.join(rootfs, "dev/kvm")
with open("/proc/self/cgroup") as f:  # the v1 devices line, or the unified one on a cgroup v2-only host
    lines = f.read().splitlines()
devices_cgroup = ([line.split(":", 2)[2].strip() for line in lines if ":devices:" in line]
                  or [line.split(":", 2)[2].strip() for line in lines if line.startswith("0::")])
record = {
    "cmdline": cmdline,
    "env": dict(os.environ),
    "cwd": os.getcwd(),
    "state": state,
    "uid": os.getuid(),
    "ns": {kind: os.readlink("/proc/self/ns/" + kind) for kind in %(namespaces)r},
    "mounted_file": (open(os.path.join(rootfs, "etc/cdi-config.txt")).read()
                     if os.path.exists(os.path.join(rootfs, "etc/cdi-config.txt")) else None),
    "node_is_char": os.path.exists(kvm) and stat.S_ISCHR(os.stat(kvm).st_mode),
    "hostname": os.uname().nodename,
    "devices_cgroup": devices_cgroup,
}
os.makedirs(os.path.join(rootfs, "opt"), exist_ok=True)
os.symlink("/etc/cdi-config.txt", os.path.join(rootfs, "opt/cdi-hook-link"))
with open(os.path.join(rootfs, "record.json"), "w") as f:
    json.dump(record, f)
""" % {"namespaces": NAMESPACES}

# What the container itself prints, to compare with what the hook saw.
CONTAINER_SCRIPT = "; ".join([
    *[f"echo NS {kind} $(readlink /proc/self/ns/{kind})" for kind in NAMESPACES],
    "echo CGROUP $( (grep :devices: /proc/self/cgroup || grep '^0::' /proc/self/cgroup) | cut -d: -f3)",
    "echo LINK $(cat /opt/cdi-hook-link)",
    "echo ELF $(cat /elf-record)",
    "echo RAN",
])


def _spec(tmp_path, hooks: list[dict]) -> dict:
    sources = hook_env.host_files(tmp_path)
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/kvm"}],
        "mounts": [{"hostPath": sources["file"], "containerPath": "/etc/cdi-config.txt",
                    "options": ["ro", "nosuid", "nodev", "bind"]}],
        "hooks": hooks}}]}


def _recorder(tmp_path) -> str:
    path = tmp_path / "vendor-hook"
    path.write_text(RECORDER)
    path.chmod(0o755)
    return str(path)


def _hooks(recorder: str, action: str = "record", timeout: int | None = None) -> list[dict]:
    """The recorder (a script) and an ELF hook (busybox) whose args[0] differs from its path."""
    hook = {"hookName": "createContainer", "path": recorder, "args": ["vendor-hook", action, "--x=1"],
            "env": ["VENDOR_ENV=one", "PATH=/usr/bin:/bin"]}
    if timeout:
        hook["timeout"] = timeout
    elf = {"hookName": "createContainer", "path": "/bin/busybox",
           "args": ["sh", "-c", 'echo "$0 $1 $PWD $ELF_ENV" > ./elf-record', "elf-argv0", "one"],
           "env": ["ELF_ENV=two"]}
    return [hook, elf]


def _container_view(stdout: str) -> dict:
    view = {"ns": {}}
    for line in stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key == "NS":
            kind, value = rest.split(" ", 1)
            view["ns"][kind] = value
        elif key in ("CGROUP", "LINK", "ELF"):
            view[key] = rest
    return view


def _run_live(tmp_path, hooks: list[dict], script: str = CONTAINER_SCRIPT):
    spec = _spec(tmp_path, hooks)
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script)
    return bundle, oci_env.run_container(bundle), log_file


def _run_edits(tmp_path, hooks: list[dict], monkeypatch, script: str = CONTAINER_SCRIPT):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    oci_env.write_spec(tmp_path / "cdi", "test.json", _spec(tmp_path, hooks))
    bundle = oci_env.make_bundle(tmp_path / "bundle", ["sh", "-c", script],
                                 rootfs=hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs"))
    assert main(["inject", "--bundle", str(bundle), "--spec-dir", str(tmp_path / "cdi"),
                 "--device", ALL, "--mode", "edits"]) == 0
    return bundle, oci_env.run_container(bundle)


def test_create_container_hooks_see_what_runc_shows_them(runc, tmp_path, monkeypatch):
    live_dir, edits_dir = tmp_path / "live", tmp_path / "edits"
    live_dir.mkdir()
    edits_dir.mkdir()
    live_bundle, live, log_file = _run_live(live_dir, _hooks(_recorder(live_dir)))
    assert live.returncode == 0, live.stderr
    edits_bundle, edits = _run_edits(edits_dir, _hooks(_recorder(edits_dir)), monkeypatch)
    assert edits.returncode == 0, edits.stderr
    assert "error" not in hook_env.log_lines(log_file)[0]

    records, views = {}, {}
    for name, bundle, result in (("live", live_bundle, live), ("edits", edits_bundle, edits)):
        record = json.loads((bundle / "rootfs" / "record.json").read_text())
        view = _container_view(result.stdout)
        records[name], views[name] = record, view
        # What the hook saw: the state (pid as the container sees it), cdi-hook's (or runc's)
        # mount and node, the rootfs as its working folder, the container's namespaces.
        assert record["state"]["status"] == "creating" and record["state"]["pid"] == 1
        assert record["state"]["bundle"] == str(bundle)
        assert record["cwd"] == str(bundle / "rootfs")
        assert record["mounted_file"] == "read-only config\n" and record["node_is_char"] is True
        assert record["uid"] == 0
        for kind in ("mnt", "net", "uts", "ipc", "pid", "cgroup"):
            assert record["ns"][kind] == view["ns"][kind], (name, kind)
        assert record["ns"]["user"] == os.readlink("/proc/self/ns/user")  # no user namespace here
        # What the container sees of the hooks' work.
        assert view["LINK"] == "read-only config"
        assert view["ELF"] == f"elf-argv0 one {bundle / 'rootfs'} two", result.stdout
        assert "RAN" in result.stdout

    live_record, edits_record = records["live"], records["edits"]
    assert live_record["env"] == edits_record["env"]  # exactly the spec's env on both paths
    assert live_record["hostname"] == edits_record["hostname"]
    # argv: the interpreter, its argument, the script, args[1:]. The script is the one file
    # opened on the host: /dev/fd/N live (what the kernel names a script exec'd from an fd),
    # its path when runc execs it by path. The ELF hook's argv is the same (view["ELF"]).
    live_script, edits_script = live_record["cmdline"][2], edits_record["cmdline"][2]
    assert live_record["cmdline"][:2] == edits_record["cmdline"][:2] == ["/usr/bin/python3", "-I"]
    assert live_record["cmdline"][3:] == edits_record["cmdline"][3:] == ["record", "--x=1"]
    assert live_script.startswith("/dev/fd/") and edits_script == str(edits_dir / "vendor-hook")
    # The state: the runtime's, pid as the container sees it; annotations differ only by the
    # editor's own record and the live hook's request annotation.
    for key in ("ociVersion", "status", "pid"):
        assert live_record["state"][key] == edits_record["state"][key]
    # The cgroup: runc runs them in runc init, already in the container's cgroup; the live
    # hook's run stays in the runtime's (the device cgroup would refuse a vendor tool its devices).
    assert edits_record["devices_cgroup"] == [views["edits"]["CGROUP"]]
    assert live_record["devices_cgroup"] != [views["live"]["CGROUP"]]


def test_a_hook_without_env_gets_an_empty_env_not_the_containers(runc, tmp_path, monkeypatch):
    """runc 1.1 gives a createContainer hook with no env runc init's environment, which is
    the container's process.env by then; the live hook gives it nothing (the control shows runc)."""
    hook = {"hookName": "createContainer", "path": "/bin/busybox", "args": ["sh", "-c", "env > ./env-record"]}
    records = {}
    for name in ("live", "edits"):
        (tmp_path / name).mkdir()
        if name == "live":
            bundle, result, _ = _run_live(tmp_path / name, [hook], script="echo RAN")
        else:
            bundle, result = _run_edits(tmp_path / name, [hook], monkeypatch, script="echo RAN")
        assert result.returncode == 0, result.stderr
        records[name] = {line.split("=", 1)[0] for line in (bundle / "rootfs" / "env-record").read_text().splitlines()}
    assert records["live"] - {"PWD", "SHLVL", "PATH"} == set()  # busybox sh's own (a default PATH)
    assert "TERM" in records["edits"]  # runc spec's process.env: PATH, TERM


# The recorder is a Python script: under TCG emulation (the QEMU guest) it needs seconds to
# print before it sleeps, so its timeout stretches with the machine.
HOOK_TIMEOUT_S = max(1, round(TIME_FACTOR))


@pytest.mark.parametrize("case", ["exit 1", "timeout", "exec format error"])
def test_failing_create_container_hook_stops_the_container_and_undoes(runc, tmp_path, case):
    recorder = _recorder(tmp_path)
    if case == "exec format error":  # executable, neither ELF nor #!: the exec itself fails, in the worker
        (tmp_path / "garbage").write_text("not a program\n")
        (tmp_path / "garbage").chmod(0o755)
        hooks = [{"hookName": "createContainer", "path": str(tmp_path / "garbage")}]
    else:
        hooks = _hooks(recorder, action="fail") if case == "exit 1" else \
            _hooks(recorder, action="sleep", timeout=HOOK_TIMEOUT_S)
    spec = _spec(tmp_path, hooks)
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    before = oci_env.tree_snapshot(rootfs)
    mounts_before = oci_env.host_mount_points()
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    started = time.monotonic()
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    error = result.stderr
    if case == "exit 1":
        assert (f"spec hook for {ALL}: createContainer hook {recorder} failed (exit status 1): "
                "the vendor tool is unhappy") in error, error
    elif case == "exec format error":
        assert f"spec hook for {ALL}: cannot run createContainer hook {tmp_path / 'garbage'}: Exec format error" in error
    else:
        assert time.monotonic() - started < 30 * TIME_FACTOR
        assert (f"spec hook for {ALL}: createContainer hook {recorder} timed out after {HOOK_TIMEOUT_S}s "
                "(its process group was killed): about to sleep") in error, error
    assert oci_env.tree_snapshot(rootfs) == before  # cdi-hook's node, mount point and file gone
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    assert "createContainer hook" in hook_env.log_lines(log_file)[0]["error"]


@pytest.mark.parametrize("case", ["missing", "interpreter is a script", "not executable"])
def test_unrunnable_create_container_hook_is_refused_before_any_change(runc, tmp_path, case):
    recorder = _recorder(tmp_path)
    if case == "missing":
        path, expect = str(tmp_path / "no-such-hook"), "cannot open it on the host: No such file or directory"
    elif case == "interpreter is a script":
        interpreter = tmp_path / "interpreter"
        interpreter.write_text("#!/bin/sh\nexec /usr/bin/python3 \"$@\"\n")
        interpreter.chmod(0o755)
        path = str(tmp_path / "nested")
        (tmp_path / "nested").write_text(f"#!{interpreter}\nprint('never')\n")
        (tmp_path / "nested").chmod(0o755)
        expect = f"its interpreter {interpreter} is itself a script"
    else:
        path, expect = recorder, "not executable"
        os.chmod(recorder, 0o644)
    hooks = [{"hookName": "createContainer", "path": path, "args": ["x"]}]
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    before = oci_env.tree_snapshot(rootfs)
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(tmp_path, hooks), [ALL], "echo RAN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert f"spec hook for {ALL}: createContainer hook {path}: {expect}" in result.stderr, result.stderr
    assert oci_env.tree_snapshot(rootfs) == before


def test_start_container_hooks_are_refused_live_and_run_through_the_editor(runc, tmp_path, monkeypatch):
    start = {"hookName": "startContainer", "path": "/bin/sh", "args": ["sh", "-c", "echo started > /started"]}
    live_dir, edits_dir = tmp_path / "live", tmp_path / "edits"
    live_dir.mkdir()
    edits_dir.mkdir()
    rootfs = hook_env.glibc_like_rootfs(live_dir / "bundle" / "rootfs")
    before = oci_env.tree_snapshot(rootfs)
    mounts_before = oci_env.host_mount_points()
    bundle, _ = hook_env.bundle_with_hook(live_dir, _spec(live_dir, [start]), [ALL], "echo RAN", rootfs=rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert (f"spec hook for {ALL}: startContainer hook /bin/sh runs inside the container after pivot_root"
            in result.stderr), result.stderr
    assert "cdi-hook precreate" in result.stderr and "cdi-hook inject --mode edits" in result.stderr
    assert oci_env.tree_snapshot(rootfs) == before
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []

    edits_bundle, edits = _run_edits(edits_dir, [start], monkeypatch, script="cat /started; echo RAN")
    assert edits.returncode == 0, edits.stderr
    assert edits.stdout.split() == ["started", "RAN"]


def test_hooks_alone_in_a_user_namespace_run_as_host_root(runc):
    """A spec with nothing but a createContainer hook still gets its worker; with a user
    namespace the hook joins the container's other namespaces, not that one."""
    tmp_path = Path(tempfile.mkdtemp(prefix="cdi-hook-cc-userns-"))  # uid 200000 must reach the rootfs
    try:
        hook = {"hookName": "createContainer", "path": _recorder(tmp_path), "args": ["vendor-hook"]}
        spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [
            {"name": "all", "containerEdits": {"hooks": [hook]}}]}
        mapping = [{"containerID": 0, "hostID": 200000, "size": 65536}]
        namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]
        script = "; ".join(f"echo NS {kind} $(readlink /proc/self/ns/{kind})" for kind in NAMESPACES)
        bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script + "; echo RAN", namespaces=namespaces,
                                              extra_linux={"uidMappings": mapping, "gidMappings": mapping})
        tmp_path.chmod(0o755)
        result = oci_env.run_container(bundle)
        require("user namespace" not in result.stderr or result.returncode == 0, "runc cannot make user namespaces here")
        assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
        record = json.loads((bundle / "rootfs" / "record.json").read_text())
        view = _container_view(result.stdout)
        for kind in ("mnt", "net", "uts", "ipc", "pid", "cgroup"):
            assert record["ns"][kind] == view["ns"][kind], kind
        assert record["ns"]["user"] == os.readlink("/proc/self/ns/user") != view["ns"]["user"]
        assert record["uid"] == 0 and record["state"]["pid"] == 1
        assert (bundle / "rootfs" / "record.json").stat().st_uid == 0  # host root's, not 200000's
    finally:
        shutil.rmtree(tmp_path)


class _Hook:
    def __init__(self, path):
        self.path, self.args, self.env, self.timeout = path, (), (), None


@pytest.mark.parametrize("line, expected", [
    (b"#!/usr/bin/python3 -I\n", ("/usr/bin/python3", "-I")),
    (b"#! \t/bin/sh  -e -x \t\nbody", ("/bin/sh", "-e -x")),  # one argument, inner blanks kept
    (b"#!/bin/sh\n", ("/bin/sh", "")),
])
def test_interpreter_line_is_parsed_as_the_kernel_does(line, expected):
    assert containerhooks._interpreter_line(line, lambda message: HookError("t", "", message)) == expected


@pytest.mark.parametrize("line, message", [
    (b"#!sh\n", "not an absolute path"),
    (b"#!   \n", "names no interpreter"),
    (b"#!/bin/" + b"x" * 300, "longer than 255 bytes"),
])
def test_bad_interpreter_lines_are_refused(line, message):
    with pytest.raises(HookError, match=message):
        containerhooks._interpreter_line(line[:containerhooks.SHEBANG_LIMIT], lambda m: HookError("t", "", m))


def test_a_directory_is_not_a_hook(tmp_path):
    with pytest.raises(HookError, match="not a regular file"):
        containerhooks.open_programs([("v/c=d", _Hook(str(tmp_path)))])
    assert stat.S_ISDIR(os.stat(tmp_path).st_mode)
