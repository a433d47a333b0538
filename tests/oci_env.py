"""Test helpers: busybox rootfs, OCI bundles, spec dirs and real runc runs.

Everything lives under a pytest tmp_path; container ids are unique per call, and
`run_container` deletes the container whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUSYBOX = "/bin/busybox"

# The hook as a runtime runs it: an isolated interpreter, an explicit environment.
PYTHON = sys.executable


def hook_entry(spec_dirs: list[str], stage: str = "createRuntime", extra_env: dict | None = None,
               log_file: str | None = None) -> dict:
    """The entry install writes (cdi_hook.hook_entry), with the tests' private settings."""
    from cdi_hook.hook_entry import hook_entry as build

    settings = {"CDI_HOOK_INSECURE_SPECS": "1"}  # tmp_path specs are not under a root-only tree
    # The session's private cache dir and log (tests/conftest.py), so tests leave nothing
    # in /run/cdi-hook or /var/log; a test's own log_file wins.
    for name in ("CDI_HOOK_CACHE_DIR", "CDI_HOOK_LOG", "CDI_HOOK_STATE_DIR", "CDI_HOOK_POLICY"):
        if os.environ.get(name):
            settings[name] = os.environ[name]
    if log_file:
        settings["CDI_HOOK_LOG"] = log_file
    settings.update(extra_env or {})
    return build("hook", "--stage", stage, python=PYTHON, spec_dirs=spec_dirs, settings=settings)


def make_rootfs(path: Path) -> Path:
    """A minimal busybox rootfs: /bin/<applets>, /etc/passwd and /etc/group."""
    (path / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = path / "bin" / applet
        if not link.exists() and applet != "busybox":
            link.symlink_to("busybox")
    for d in ("etc", "proc", "sys", "dev", "tmp", "root"):
        (path / d).mkdir(exist_ok=True)
    (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    (path / "etc" / "group").write_text("root:x:0:\nvideo:x:44:\nnogroup:x:65534:\n")
    return path


def make_bundle(bundle: Path, args: list[str], *, rootfs: Path | None = None,
                annotations: dict | None = None, hooks: dict | None = None,
                namespaces: list[dict] | None = None, extra_linux: dict | None = None) -> Path:
    """An OCI bundle whose config.json is runc's default with our args, hooks and annotations."""
    bundle.mkdir(parents=True, exist_ok=True)
    if rootfs is None:
        rootfs = make_rootfs(bundle / "rootfs")
    subprocess.run(["runc", "spec", "--bundle", str(bundle)], check=True)
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["root"] = {"path": os.path.relpath(rootfs, bundle) if rootfs.is_relative_to(bundle) else str(rootfs),
                      "readonly": False}
    config["process"]["terminal"] = False
    config["process"]["args"] = args
    if annotations:
        config["annotations"] = annotations
    if hooks:
        config["hooks"] = hooks
    if namespaces is not None:
        config["linux"]["namespaces"] = namespaces
    for key, value in (extra_linux or {}).items():
        config["linux"][key] = value
    config_path.write_text(json.dumps(config, indent=2))
    return bundle


def run_container(bundle: Path, *, timeout: int = 120, runc: str = "runc",
                  root: str | None = None, container_id: str | None = None) -> subprocess.CompletedProcess:
    """`runc run` the bundle to completion; returns its output. Always deletes the container."""
    cid = container_id or "cdi-test-" + uuid.uuid4().hex[:12]
    global_args = [runc] + (["--root", root] if root else [])
    try:
        return subprocess.run(global_args + ["run", "--bundle", str(bundle), cid],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(global_args + ["delete", "--force", cid], capture_output=True)


def write_spec(spec_dir: Path, name: str, spec: dict) -> Path:
    spec_dir.mkdir(parents=True, exist_ok=True)
    path = spec_dir / name
    path.write_text(json.dumps(spec, indent=2))
    return path


class DetachedContainer:
    """A container started with `runc run -d`: its id, its init's pid, and `exec` into it."""

    def __init__(self, cid: str, pid: int, runc_command: list[str]):
        self.id = cid
        self.pid = pid
        self._runc = runc_command

    def exec(self, args: list[str], timeout: int = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self._runc + ["exec", self.id] + args, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def detached_container(bundle: Path, *, runc: str = "runc", root: str | None = None,
                       wrapper: list[str] | None = None, timeout: int = 60):
    """Start the bundle detached (its process should wait, e.g. `sleep 60`); always deleted.

    `wrapper` prefixes every runc command (e.g. the nsenter of `cgroup2_namespace`).
    """
    cid = "cdi-test-" + uuid.uuid4().hex[:12]
    command = list(wrapper or []) + [runc] + (["--root", root] if root else [])
    try:
        # The detached container keeps runc's stdio: no pipes, or run() would wait for it.
        with open(bundle / "runc-run.log", "w+") as log:
            started = subprocess.run(command + ["run", "-d", "--bundle", str(bundle), cid],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                     timeout=timeout)
            log.seek(0)
            if started.returncode != 0:
                raise RuntimeError(f"runc run -d failed: {log.read()}")
        state = subprocess.run(command + ["state", cid], capture_output=True, text=True, check=True)
        yield DetachedContainer(cid, json.loads(state.stdout)["pid"], command)
    finally:
        subprocess.run(command + ["delete", "--force", cid], capture_output=True)


class Cgroup2Namespace:
    def __init__(self, holder_pid: int):
        self.holder_pid = holder_pid
        self.enter = ["nsenter", f"--target={holder_pid}", "--mount", f"--wd={REPO}", "--"]

    def path(self, inside: str) -> str:
        return f"/proc/{self.holder_pid}/root{inside}"


@contextlib.contextmanager
def cgroup2_namespace():
    """A private mount namespace with cgroup2 on /sys/fs/cgroup: runc there runs in v2 mode.

    Yields a Cgroup2Namespace: `enter` prefixes a command to run it inside (nsenter), `path`
    maps a path inside to the same file seen from here (through /proc/<holder>/root). The
    namespace lives as long as its holder process; killing it at the end leaves no mount behind.
    """
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         # A cgroup v2-only host (the QEMU guest of vm-tests/qemu) has cgroup2 there already.
         "{ [ \"$(stat -f -c %T /sys/fs/cgroup)\" = cgroup2fs ] || mount -t cgroup2 none /sys/fs/cgroup; }"
         " && echo ready && exec sleep 3600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "ready":
            raise RuntimeError("could not mount cgroup2 in a private mount namespace")
        yield Cgroup2Namespace(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def host_device_entries(paths: list[str], file_mode: int = 0o666) -> list[dict]:
    """config.json `linux.devices` entries copying host device nodes (type, major, minor)."""
    entries = []
    for path in paths:
        st = os.stat(path)
        kind = "b" if (st.st_mode & 0o170000) == 0o060000 else "c"
        entries.append({"path": path, "type": kind, "major": os.major(st.st_rdev),
                        "minor": os.minor(st.st_rdev), "fileMode": file_mode, "uid": 0, "gid": 0})
    return entries


def open_in_container(container: "DetachedContainer", path: str, mode: str = "r") -> subprocess.CompletedProcess:
    """Open `path` inside the container with the shell ('r', 'w' or 'rw'); nothing is read or written."""
    redirect = {"r": "<", "w": ">>", "rw": "<>"}[mode]
    return container.exec(["sh", "-c", f"exec 3{redirect} {path}"])


def assert_opens(container: "DetachedContainer", path: str, mode: str) -> None:
    result = open_in_container(container, path, mode)
    assert result.returncode == 0, f"{path} ({mode}): {result.stderr.strip()}"


def assert_refused(container: "DetachedContainer", path: str, mode: str) -> None:
    """Refused by the device cgroup (v1 rules or the v2 BPF program): EPERM on open."""
    result = open_in_container(container, path, mode)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr, \
        f"{path} ({mode}) should be refused by the device cgroup: rc={result.returncode} {result.stderr!r}"


def assert_rules_enforced(container: "DetachedContainer") -> None:
    """After allowing c 10:232 rwm, b 7:0 rw and b 7:2 r (the cgroup tests' rules): exactly
    those opens work, loop1 stays refused, and the runtime's own rules are kept."""
    assert_opens(container, "/dev/kvm", "rw")
    assert_opens(container, "/dev/loop0", "r")
    assert_opens(container, "/dev/loop0", "w")
    assert_refused(container, "/dev/loop1", "r")   # not requested
    assert_opens(container, "/dev/loop2", "r")     # read-only rule ...
    assert_refused(container, "/dev/loop2", "w")   # ... refuses a write open
    assert_opens(container, "/dev/null", "rw")     # runc's own rules kept
    assert_opens(container, "/dev/zero", "r")


def tree_snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root (root included): type, mode, owner, and content, symlink target or rdev.

    Times are left out: a directory whose entry was created and removed again is the same tree.
    """
    import stat as stat_module

    found: dict[str, tuple] = {}

    def visit(path: str, key: str) -> None:
        st = os.lstat(path)
        kind = stat_module.S_IFMT(st.st_mode)
        if stat_module.S_ISLNK(st.st_mode):
            detail = os.readlink(path)
        elif stat_module.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                detail = f.read()
        elif stat_module.S_ISCHR(st.st_mode) or stat_module.S_ISBLK(st.st_mode):
            detail = st.st_rdev
        else:
            detail = None
        found[key] = (kind, stat_module.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail)
        if stat_module.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(os.path.join(path, name), f"{key}/{name}" if key else name)

    visit(str(root), "")
    return found


def host_mount_points() -> list[str]:
    """Mount points of this process's mount namespace (/proc/self/mountinfo field 5)."""
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


# Where other tests running at the same time (podman, runc with their own tmp dirs) mount.
_OTHER_TESTS_MOUNT = ("/tmp/", "/run/", "/var/run/", "/var/lib/containers/")


def new_host_mounts(before: list[str], after: list[str], mine: Path) -> list[str]:
    """Mount points in after, not in before, that this test could have made: under `mine`
    (its tmp dir), or anywhere outside the dirs concurrent tests mount in."""
    seen = set(before)
    return [m for m in after if m not in seen and (m.startswith(str(mine)) or not m.startswith(_OTHER_TESTS_MOUNT))]


@contextmanager
def private_cache_and_log(top: Path):
    """Point cdi-hook's cache and log at top (made 0700, as the cache's trust rules want)
    through os.environ, for in-process calls, hook entries and `cdi-hook install` alike;
    the previous values come back afterwards."""
    names = ("CDI_HOOK_CACHE_DIR", "CDI_HOOK_LOG", "CDI_HOOK_STATE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.chmod(top, 0o700)
    (top / "cache").mkdir(mode=0o700, exist_ok=True)
    os.environ["CDI_HOOK_CACHE_DIR"] = str(top / "cache")
    os.environ["CDI_HOOK_LOG"] = str(top / "cdi-hook.log")
    os.environ["CDI_HOOK_STATE_DIR"] = str(top / "held")
    from cdi_hook import settings

    settings.use(None)  # read again, with these
    try:
        yield top
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        settings.use(None)
