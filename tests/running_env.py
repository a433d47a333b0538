"""Helpers of tests/test_running_*.py: a spec of safe host devices, the CLI as a process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import hook_env
from cdi_hook import attachments
import oci_env

VENDOR = hook_env.VENDOR
KVM = f"{VENDOR}=kvm"
LOOP = f"{VENDOR}=loop"
BAD = f"{VENDOR}=bad"
PAIR = f"{VENDOR}=pair"


def spec(tmp_path: Path) -> tuple[dict, dict]:
    """(spec, host sources): kvm = /dev/kvm + a read-only file + a library; loop = /dev/loop0;
    bad = a mount into /proc, which every attach refuses (after kvm's work, in one attach);
    pair = kvm's edits plus loop0's node at /dev/cdi-loop0 (a rule loop may have granted already)."""
    sources = hook_env.host_files(tmp_path)
    library = hook_env.LIB_DIR_IN_CONTAINER + "/" + os.path.basename(sources["library"])
    kvm_node = {"path": "/dev/kvm", "fileMode": 0o660, "uid": 0, "gid": 44}
    kvm_mounts = [
        {"hostPath": sources["file"], "containerPath": "/etc/cdi-config.txt", "options": ["ro", "nosuid", "nodev", "bind"]},
        {"hostPath": sources["dir"], "containerPath": "/mnt/cdi-dir", "options": ["rw", "rbind"]},
        {"hostPath": sources["library"], "containerPath": library, "options": ["ro", "nosuid", "nodev", "bind"]},
    ]
    document = {
        "cdiVersion": "0.6.0",
        "kind": VENDOR,
        "devices": [
            {"name": "kvm", "containerEdits": {"deviceNodes": [kvm_node], "mounts": kvm_mounts}},
            {"name": "loop", "containerEdits": {"deviceNodes": [{"path": "/dev/loop0"}]}},
            {"name": "bad", "containerEdits": {
                "deviceNodes": [{"path": "/dev/loop1"}],
                "mounts": [{"hostPath": sources["file"], "containerPath": "/proc/cdi-bad", "options": ["ro", "bind"]}]}},
            {"name": "pair", "containerEdits": {
                "deviceNodes": [kvm_node, {"path": "/dev/cdi-loop0", "hostPath": "/dev/loop0"}], "mounts": kvm_mounts}},
        ],
    }
    sources["library_in_container"] = library
    return document, sources


def cli(spec_dir: Path, *args: str, enter: list[str] | None = None, env: dict | None = None,
        python_code: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """The CLI as a process; python_code replaces `-m cdi_hook` (to change a module constant
    first). Its output goes through files, not pipes: a process it left behind cannot keep a
    timed-out run waiting for their end."""
    env = dict(os.environ, CDI_SPEC_DIRS=str(spec_dir), CDI_HOOK_INSECURE_SPECS="1", **(env or {}))
    program = ["-c", python_code] if python_code else ["-m", "cdi_hook"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(list(enter or []) + [sys.executable, *program, *args], stdout=out, stderr=err,
                              text=True, timeout=timeout, env=env, cwd=str(oci_env.REPO), stdin=subprocess.DEVNULL)
        out.seek(0)
        err.seek(0)
        done.stdout, done.stderr = out.read(), err.read()
    return done


def verify_json(spec_dir: Path, address: str, *extra: str, enter=None) -> tuple[int, list[dict]]:
    done = cli(spec_dir, "verify", address, "--format", "json", *extra, enter=enter)
    assert done.returncode in (0, 1) and done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def failed(checks: list[dict]) -> list[tuple[str, str]]:
    return [(c["device"], c["item"]) for c in checks if not c["ok"]]


def mountinfo_of(pid: int) -> list[str]:
    """The container's mount points (field 5 of /proc/PID/mountinfo)."""
    return sorted(line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())


def record_files() -> list[str]:
    directory = Path(os.environ["CDI_HOOK_STATE_DIR"]).parent / "attachments"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


@contextlib.contextmanager
def unsavable_records(top: Path, container_id: str, enter: list[str] | None = None):
    """Environment for the CLI whose attachment records live on a read-only mount (as a
    state dir on a read-only filesystem would): reading them works, saving one fails, which
    is attach's last step, after the rootfs work and the device cgroup. `enter` runs the
    mount commands where the CLI runs (the cgroup2 namespace)."""
    records = top / "attachments"
    records.mkdir(mode=0o700, parents=True)
    lock = Path(attachments.lock_path(container_id)).name  # made as attach makes it: it only locks it then
    (records / lock).touch(mode=0o600)
    run = lambda *argv: subprocess.run(list(enter or []) + list(argv), capture_output=True, text=True)  # noqa: E731
    done = run("mount", "--bind", str(records), str(records))
    assert done.returncode == 0, done.stderr
    try:
        done = run("mount", "-o", "remount,bind,ro", str(records))
        assert done.returncode == 0, done.stderr
        yield {"CDI_HOOK_STATE_DIR": str(top / "held")}
        assert [p.name for p in records.iterdir()] == [lock]
    finally:
        run("umount", str(records))
