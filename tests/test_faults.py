"""Each step of the live injection fails in turn: nothing is left half-done.

For every step (mknod, a bind mount, a typed mount, the read-only setattr, the propagation
remount, ldconfig, the device cgroup write (v1) or device program replacement (v2), a spec
hook, and a spec hook after the network device moved) the hook exits non-zero with an error naming the step and the device, runc
does not start the container, and the rootfs on disk is entry for entry what it was
(paths, types, modes, owners, contents, link targets).

Faults are real where the system offers one (a typed mount with a bad option, an ld.so.cache
that is a directory, a parent cgroup that denies the device, a failing hook). Where it does
not, the hook runs under a seccomp filter that makes one syscall fail with EIO: the filter is
installed by a small wrapper (the hook entry's program) before it execs the unchanged hook,
so the hook process itself is not patched in any way.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

import hook_env
import oci_env
from conftest import require_program
from fault_env import run_and_check, small_tmpfs, with_failing_syscalls
from ci_rules import require_cgroup_v1

ALL = f"{hook_env.VENDOR}=all"
def _spec(sources: dict, **edits) -> dict:
    """Nodes and mounts in new folders (so undo must remove folders, too), then `edits`."""
    container_edits = {
        "deviceNodes": [{"path": "/cdi/nodes/kvm", "hostPath": "/dev/kvm"},
                        {"path": "/cdi/nodes/zero", "hostPath": "/dev/zero"}],
        "mounts": [{"hostPath": sources["file"], "containerPath": "/cdi/files/config.txt", "options": ["ro", "bind"]},
                   {"hostPath": sources["dir"], "containerPath": "/cdi/dirs/data", "options": ["rbind", "rprivate"]},
                   {"hostPath": sources["library"], "containerPath": "/cdi/lib/libz.so.1", "options": ["ro", "bind"]}],
    }
    for key, value in edits.items():
        container_edits[key] = container_edits.get(key, []) + value
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR,
            "devices": [{"name": "all", "containerEdits": container_edits}]}


def _bundle(tmp_path: Path, spec: dict, rootfs: Path | None = None, **kwargs):
    rootfs = rootfs or hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "etc" / "ld.so.cache").write_bytes(b"the image's own cache") if not (
        rootfs / "etc" / "ld.so.cache").exists() else None
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs, **kwargs)
    return bundle, rootfs


@pytest.mark.parametrize("syscall,step", [("mknodat", "device node"), ("move_mount", "mount"),
                                          ("mount_setattr", "mount"), ("mount", "mount")],
                         ids=["mknod", "bind-mount", "read-only-setattr", "propagation-remount"])
def test_a_failing_syscall_undoes_everything(runc, tmp_path, syscall, step):
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
    with_failing_syscalls(bundle, tmp_path, [syscall])
    run_and_check(tmp_path, bundle, rootfs, step, "Input/output error")


def test_a_typed_mount_with_a_bad_option_undoes_everything(runc, tmp_path):
    spec = _spec(hook_env.host_files(tmp_path), mounts=[
        {"hostPath": "tmpfs", "containerPath": "/cdi/tmp/scratch", "type": "tmpfs", "options": ["size=bogus"]}])
    bundle, rootfs = _bundle(tmp_path, spec)
    run_and_check(tmp_path, bundle, rootfs, "mount", "/cdi/tmp/scratch")


def test_a_failing_ldconfig_undoes_everything(runc, tmp_path):
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    (rootfs / "etc" / "ld.so.cache").mkdir()  # ldconfig cannot rename its new cache over it
    (rootfs / "etc" / "ld.so.cache" / "image-file").write_text("kept\n")
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)), rootfs=rootfs)
    run_and_check(tmp_path, bundle, rootfs, "ldconfig")


def test_a_failing_spec_hook_undoes_everything(runc, tmp_path):
    spec = _spec(hook_env.host_files(tmp_path), hooks=[
        {"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}])
    bundle, rootfs = _bundle(tmp_path, spec)
    run_and_check(tmp_path, bundle, rootfs, "spec hook", "broken")


def test_a_refused_cgroup_write_undoes_everything(runc, tmp_path):
    """cgroup v1: a parent devices cgroup that denies /dev/kvm makes the child's allow fail."""
    devices = Path("/sys/fs/cgroup/devices")
    require_cgroup_v1()
    parent_name = "cdi-fault-" + uuid.uuid4().hex[:8]
    parent = devices / parent_name
    parent.mkdir()
    try:
        (parent / "devices.deny").write_text("a")
        for rule in ("c *:* m", "b *:* m", "c 1:* rwm", "c 5:* rwm", "c 136:* rwm", "c 10:200 rwm"):
            (parent / "devices.allow").write_text(rule)  # runc's defaults, not 10:232 (kvm)
        bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
        config = json.loads((bundle / "config.json").read_text())
        config["linux"]["cgroupsPath"] = f"/{parent_name}/{uuid.uuid4().hex[:8]}"
        config["linux"]["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
        (bundle / "config.json").write_text(json.dumps(config))
        run_and_check(tmp_path, bundle, rootfs, "device cgroup", "10:232")
    finally:
        for child in parent.iterdir():
            if child.is_dir():
                child.rmdir()
        parent.rmdir()


def test_a_failing_spec_hook_sends_the_network_device_home(runc, tmp_path):
    name = "cdif" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True)
    try:
        spec = _spec(hook_env.host_files(tmp_path), hooks=[
            {"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}])
        spec["cdiVersion"] = "1.1.0"
        spec["devices"][0]["containerEdits"]["netDevices"] = [{"hostInterfaceName": name, "name": "cdi0"}]
        bundle, rootfs = _bundle(tmp_path, spec)
        run_and_check(tmp_path, bundle, rootfs, "spec hook", "broken")
        shown = subprocess.run(["ip", "link", "show", name], capture_output=True, text=True)
        assert shown.returncode == 0, f"{name} did not come back to the host: {shown.stderr}"
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.mark.parametrize("cache", ["symlink-to-host", "odd-owner-and-mode", "absent"])
def test_undo_puts_the_image_cache_back_as_it_was(runc, tmp_path, cache):
    """ldconfig succeeded and replaced etc/ld.so.cache; a later step fails: the image's cache
    comes back exactly (a symlink as the same symlink, a file with its owner and mode)."""
    host_file = tmp_path / "host-cache"
    host_file.write_bytes(b"host file, never written")
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    image_cache = rootfs / "etc" / "ld.so.cache"
    if cache == "symlink-to-host":
        image_cache.symlink_to(host_file)
    elif cache == "odd-owner-and-mode":
        image_cache.write_bytes(b"the image's own cache")
        os.chown(image_cache, 1234, 4321)
        os.chmod(image_cache, 0o600)
    spec = _spec(hook_env.host_files(tmp_path), hooks=[
        {"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}])
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    run_and_check(tmp_path, bundle, rootfs, "spec hook", "broken")
    assert host_file.read_bytes() == b"host file, never written"


def test_undo_puts_an_existing_conf_file_back(runc, tmp_path):
    """The image already has etc/ld.so.conf.d/00-cdi-hook.conf (its own, or a leftover): the
    hook rewrites it, a later step fails, and the image's file is back as it was."""
    rootfs = hook_env.glibc_like_rootfs(tmp_path / "bundle" / "rootfs")
    conf = rootfs / "etc" / "ld.so.conf.d" / "00-cdi-hook.conf"
    conf.parent.mkdir()
    conf.write_text("/the/image/own/folder\n")
    os.chmod(conf, 0o640)
    spec = _spec(hook_env.host_files(tmp_path), hooks=[
        {"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}])
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN", rootfs=rootfs)
    run_and_check(tmp_path, bundle, rootfs, "spec hook", "broken")


def test_a_failing_device_program_load_undoes_everything_cgroup_v2(runc, tmp_path):
    """cgroup v2: the bpf() calls that read and replace runc's device program fail (EIO)."""
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
    with_failing_syscalls(bundle, tmp_path, ["bpf"])
    with oci_env.cgroup2_namespace() as namespace:
        def run_v2(bundle: Path) -> subprocess.CompletedProcess:
            cid = "cdi-fault-v2-" + uuid.uuid4().hex[:8]
            command = namespace.enter + ["runc"]
            try:
                return subprocess.run(command + ["run", "--bundle", str(bundle), cid], capture_output=True,
                                      text=True, timeout=120, stdin=subprocess.DEVNULL)
            finally:
                subprocess.run(command + ["delete", "--force", cid], capture_output=True)

        run_and_check(tmp_path, bundle, rootfs, "device cgroup", "Input/output error", run=run_v2)


# --- Node faults (issue 27): a full or read-only filesystem under what the hook writes ----

def _started(tmp_path: Path, bundle: Path) -> subprocess.CompletedProcess:
    result = oci_env.run_container(bundle)
    assert result.returncode == 0 and "RAN" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _hook_stderr_to(bundle: Path, stderr_file: Path | None, **env: str) -> None:
    """Each cdi-hook entry's stderr also kept in stderr_file (runc shows a hook's stderr only
    when the hook fails), and env set in the entry."""
    config = json.loads((bundle / "config.json").read_text())
    for entries in config["hooks"].values():
        for entry in entries:
            if stderr_file is not None:
                entry["args"] = ["sh", "-c", f'exec "$0" "$@" 2>>{stderr_file}', entry["path"], *entry["args"][1:]]
                entry["path"] = "/bin/sh"
            entry["env"] = [e for e in entry["env"] if e.split("=", 1)[0] not in env] + [f"{k}={v}" for k, v in env.items()]
    (bundle / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fault", ["full", "readonly", "missing-folder", "a-directory", "a-fifo"])
def test_a_log_that_cannot_be_written_never_fails_a_start(runc, tmp_path, fault):
    """The log line goes to stderr instead, and the container starts with its devices."""
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
    log_dir = tmp_path / "logfs"
    log_file = log_dir / "cdi-hook.log"
    stderr_file = tmp_path / "hook-stderr"
    _hook_stderr_to(bundle, stderr_file, CDI_HOOK_LOG=str(log_file))
    with contextlib.ExitStack() as stack:
        if fault in ("full", "readonly"):
            spoil = stack.enter_context(small_tmpfs(log_dir, full=fault == "full", readonly=fault == "readonly"))
            log_file.write_text("")  # the file exists: the line is appended to it
            spoil()
        elif fault == "a-directory":
            log_file.mkdir(parents=True)
        elif fault == "a-fifo":
            log_dir.mkdir()
            os.mkfifo(log_file)  # no reader: opening it for writing must not hang the start
        _started(tmp_path, bundle)
    stderr = stderr_file.read_text()
    assert "cdi-hook: warning: cannot write log file" in stderr and str(log_file) in stderr, stderr
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]  # the line itself, on stderr
    assert [x["event"] for x in lines] == ["cdi-hook injected"] and lines[0]["devices"] == [ALL], stderr
    assert "Traceback" not in stderr, stderr


def _settled_spec(tmp_path: Path) -> None:
    """The spec older than the cache's settle window, so the start tries to compile it."""
    old = time.time() - 60
    for path in (tmp_path / "cdi").iterdir():
        os.utime(path, (old, old))
    os.utime(tmp_path / "cdi", (old, old))


@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_a_cache_dir_that_cannot_be_written_never_fails_a_start(runc, tmp_path, fault):
    """The compiled cache and the ldconfig memo (both under CDI_HOOK_CACHE_DIR) are best
    effort: the start succeeds, the devices and the library are there."""
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = ["sh", "-c", "test -c /cdi/nodes/zero && grep -q cdi /etc/ld.so.cache && echo RAN"]
    (bundle / "config.json").write_text(json.dumps(config))
    _settled_spec(tmp_path)
    cache_dir = tmp_path / "cachefs"
    stderr_file = tmp_path / "hook-stderr"
    _hook_stderr_to(bundle, stderr_file, CDI_HOOK_CACHE_DIR=str(cache_dir))
    with small_tmpfs(cache_dir, full=fault == "full", readonly=fault == "readonly") as spoil:
        spoil()
        _started(tmp_path, bundle)
        files = [p.name for p in cache_dir.rglob("*") if not p.is_dir()]
        assert files == (["filler"] if fault == "full" else []), files
    assert "Traceback" not in stderr_file.read_text()


@pytest.mark.parametrize("what", ["record", "holds"])
@pytest.mark.parametrize("fault", ["full", "readonly"])
def test_safety_state_that_cannot_be_written_fails_the_start_cleanly(runc, tmp_path, fault, what):
    """The container record and the exclusive devices' holds guard safety: they fail closed,
    with one line naming the folder and the error; the rootfs, the host's mounts and the
    state folder are as they were (the injection is undone)."""
    bundle, rootfs = _bundle(tmp_path, _spec(hook_env.host_files(tmp_path)))
    state_dir = tmp_path / "statefs"
    env = {"CDI_HOOK_STATE_DIR": str(state_dir / "held")}
    if what == "holds":
        env["CDI_HOOK_POLICY"] = _exclusive_policy(tmp_path)
    _hook_stderr_to(bundle, None, **env)
    with small_tmpfs(state_dir, full=fault == "full", readonly=fault == "readonly") as spoil:
        for sub in ("containers", "held", "netdev", "attachments"):
            (state_dir / sub).mkdir(mode=0o700)
        spoil()
        before = oci_env.tree_snapshot(state_dir)
        # read-only: the first write of a start is the removal of an earlier container's
        # record under this id, before any hold is taken
        failing = "record" if what == "record" or fault == "readonly" else "holds"
        if failing == "record":
            stderr = run_and_check(tmp_path, bundle, rootfs, "record", device="")
        else:
            stderr = run_and_check(tmp_path, bundle, rootfs, "exclusive device")
        assert oci_env.tree_snapshot(state_dir) == before
    line = next(x for x in stderr.splitlines() if "cdi-hook" in x)
    assert str(state_dir / ("containers" if failing == "record" else "held")) in line, stderr
    assert ("No space left on device" if fault == "full" else "Read-only file system") in line, stderr


def _exclusive_policy(tmp_path: Path) -> str:
    """A policy that holds every device of the test vendor exclusively: its path."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'version: "1"\nexclusive: ["{hook_env.VENDOR}=*"]\n')
    policy.chmod(0o644)
    return str(policy)


@pytest.mark.parametrize("what", ["record", "holds"])
def test_safety_state_on_a_failing_disk_fails_the_start_cleanly(runc, tmp_path, what):
    """EIO where a failing disk reports a buffered write: every fsync of the hook fails (the
    seccomp filter; this kernel has no device-mapper for an `error` target). The record and
    the holds are written durably, so they fail closed: one line naming the folder and the
    error, the injection undone. The spec has no library: ldconfig's own fsync would fail first."""
    spec = _spec(hook_env.host_files(tmp_path))
    edits = spec["devices"][0]["containerEdits"]
    edits["mounts"] = [m for m in edits["mounts"] if not m["containerPath"].endswith(".so.1")]
    bundle, rootfs = _bundle(tmp_path, spec)
    state_dir = tmp_path / "state"
    for sub in ("held", "containers"):
        (state_dir / sub).mkdir(mode=0o700, parents=True)
    os.chmod(state_dir, 0o700)
    env = {"CDI_HOOK_STATE_DIR": str(state_dir / "held")}
    if what == "holds":
        env["CDI_HOOK_POLICY"] = _exclusive_policy(tmp_path)
    _hook_stderr_to(bundle, None, **env)
    with_failing_syscalls(bundle, tmp_path, ["fsync"])
    before = oci_env.tree_snapshot(state_dir)
    if what == "record":
        stderr = run_and_check(tmp_path, bundle, rootfs, "record", device="")
    else:
        stderr = run_and_check(tmp_path, bundle, rootfs, "exclusive device")
    assert oci_env.tree_snapshot(state_dir) == before
    line = next(x for x in stderr.splitlines() if "cdi-hook" in x)
    assert str(state_dir / ("containers" if what == "record" else "held")) in line, stderr
    assert "Input/output error" in line, stderr


class _InPlaceRewriter:
    """Rewrites a spec file in place, as `cat > file` or a script does: truncate, then the
    bytes in a few writes, over and over, until stopped; each version is the same spec."""

    def __init__(self, path: Path, pieces: int = 4, pause: float = 0.002):
        self.path, self.pieces, self.pause = path, pieces, pause
        self.data = path.read_bytes()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        step = -(-len(self.data) // self.pieces)
        while not self._stop.is_set():
            with open(self.path, "r+b") as out:
                out.truncate(0)
                for start in range(0, len(self.data), step):
                    out.write(self.data[start:start + step])
                    out.flush()
                    time.sleep(self.pause)
            self.rounds += 1
            time.sleep(self.pause)

    def __enter__(self) -> "_InPlaceRewriter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.write_bytes(self.data)


def test_starts_while_a_spec_is_rewritten_in_place_all_succeed(runc, tmp_path):
    """40 real starts while the spec is truncated and written again in a loop: each waits
    for the file to settle (a fresh file that fails to parse is read again) and succeeds."""
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [
        {"name": "all", "containerEdits": {"deviceNodes": [{"path": "/cdi/nodes/zero", "hostPath": "/dev/zero"}],
                                          "env": [f"PADDING{i}=" + "x" * 64 for i in range(40)]}}]}
    bundle, log_file = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "test -c /cdi/nodes/zero && echo RAN")
    failures = []
    with _InPlaceRewriter(tmp_path / "cdi" / "test.json") as rewriter:
        for _ in range(40):
            result = oci_env.run_container(bundle)
            if result.returncode != 0 or "RAN" not in result.stdout:
                failures.append(result.stderr.strip()[-300:])
    assert rewriter.rounds > 40
    assert failures == [], f"{len(failures)} of 40 starts failed: {failures[:3]}"


def test_a_broken_spec_that_is_old_fails_at_once_and_a_fresh_one_is_being_written(tmp_path, monkeypatch):
    """Pure registry checks (no root): an old broken spec is reported at once; a broken spec
    still changing is read again for about a second, then reported as being written, by
    the registry and by `cdi-hook validate`."""
    from cdi_hook import cache, registry

    assert registry.FRESH_NS == cache.FRESH_NS  # one settle window for the cache and the reader
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    broken = spec_dir / "broken.json"
    broken.write_text('{"cdiVersion": "0.6.0", "kind": "')
    monkeypatch.setattr(registry, "FRESH_NS", 100_000_000)  # old: its mtime and ctime 0.1 s behind
    time.sleep(0.15)
    started = time.monotonic()
    loaded = registry.Registry.load([str(spec_dir)], insecure=True)
    assert time.monotonic() - started < 0.2
    assert list(loaded.errors) == [str(broken)] and loaded.being_written == []
    assert "being written" not in " ".join(loaded.all_errors())

    monkeypatch.setattr(registry, "FRESH_NS", cache.FRESH_NS)
    broken.write_text('{"cdiVersion": "0.6.0", "kind": "')  # fresh now
    started = time.monotonic()
    loaded = registry.Registry.load([str(spec_dir)], insecure=True)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 1.5, waited
    assert loaded.being_written == [str(broken)]
    assert "invalid JSON" in loaded.all_errors()[0] and "being written" in loaded.all_errors()[0]
    broken.write_text('{"cdiVersion": "0.6.0", "kind": "')  # fresh again
    validate = subprocess.run([oci_env.PYTHON, "-m", "cdi_hook", "validate"], capture_output=True, text=True,
                              env={**os.environ, "CDI_SPEC_DIRS": str(spec_dir), "CDI_HOOK_INSECURE_SPECS": "1"})
    assert validate.returncode == 1 and "being written" in validate.stderr, validate.stderr


def test_a_fresh_spec_that_settles_within_the_budget_is_read_whole(tmp_path):
    """A spec truncated and then written in a slow second piece: the load waits for it."""
    from cdi_hook import registry

    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    path = spec_dir / "test.json"
    data = json.dumps({"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [
        {"name": "all", "containerEdits": {"env": ["A=1"]}}]}).encode()
    path.write_bytes(data[:20])

    def finish() -> None:
        time.sleep(0.3)
        with open(path, "r+b") as out:
            out.seek(20)
            out.write(data[20:])

    writer = threading.Thread(target=finish)
    writer.start()
    try:
        loaded = registry.Registry.load([str(spec_dir)], insecure=True)
    finally:
        writer.join()
    assert loaded.errors == {} and ALL in loaded.devices


def test_logrotate_while_hooks_write_loses_and_splits_no_line(runc, tmp_path):
    """The shipped configuration (create, no postrotate), forced again and again with real
    logrotate while real runc starts log: every start's line is in exactly one file, whole."""
    from concurrent.futures import ThreadPoolExecutor
    import gzip

    from cdi_hook.commands import install

    logrotate = require_program("logrotate")
    log_file = tmp_path / "cdi-hook.log"
    bundles = []
    for worker in range(4):  # a bundle (and rootfs) each: starts run four at a time
        bundle, _ = hook_env.bundle_with_hook(tmp_path / f"w{worker}", _spec(hook_env.host_files(tmp_path / f"w{worker}")),
                                              [ALL], "echo RAN")
        _hook_stderr_to(bundle, None, CDI_HOOK_LOG=str(log_file))
        bundles.append(bundle)
    conf = tmp_path / "logrotate.conf"
    conf.write_text(install.logrotate_config(str(log_file)).replace("rotate 8", "rotate 1000"))
    os.chmod(conf, 0o644)
    stop = threading.Event()
    rotations = []

    def rotate() -> None:
        while not stop.is_set():
            done = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
                                  capture_output=True, text=True)
            rotations.append(done.returncode == 0 or done.stderr)
            time.sleep(0.02)

    ids = [f"cdi-rotate-{uuid.uuid4().hex[:10]}" for _ in range(40)]
    rotator = threading.Thread(target=rotate)
    rotator.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            def starts(worker: int) -> list[subprocess.CompletedProcess]:
                return [oci_env.run_container(bundles[worker], container_id=cid) for cid in ids[worker::4]]

            results = [r for done in pool.map(starts, range(4)) for r in done]
    finally:
        stop.set()
        rotator.join()
    assert all(r.returncode == 0 and "RAN" in r.stdout for r in results), [r.stderr for r in results if r.returncode]
    assert rotations and all(r is True for r in rotations), rotations[:3]
    assert len(rotations) >= 3
    texts = []
    for path in tmp_path.glob("cdi-hook.log*"):
        texts.append(gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text())
    assert len(texts) >= 3  # it did rotate while the hooks wrote
    lines = [line for text in texts for line in text.splitlines()]
    assert all(text.endswith("\n") for text in texts if text)
    containers = sorted(json.loads(line)["container"] for line in lines)  # each line whole JSON
    assert containers == sorted(ids)  # each start's line exactly once: none lost, none doubled
