"""`cdi-hook watch --serve`: the hook's work done by a process the watcher forks, with real
runc. The container sees the same either way; without a server that takes the request
(none, killed, other settings, a non-root peer) the hook works in-process; a server lost
after it took the request fails the start and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import hook_env
import oci_env
from cdi_hook import registry, settings
from cdi_hook.commands import serve

SCRIPT = "\n".join([
    "stat -c 'STAT %n %F %t:%T %a %u:%g' /dev/kvm /dev/loop0 /dev/cdi/nested/zero",
    "cat /etc/cdi-config.txt /mnt/cdi-dir/hello",
    "grep -c cdi-config /proc/mounts",
    "ls /etc/ld.so.conf.d",
    "echo END",
])
ALL = f"{hook_env.VENDOR}=all"


class Server:
    """`cdi-hook watch --serve` with exactly the environment of the bundle's hook entry."""

    def __init__(self, bundle: Path, extra_env: dict | None = None, umask: int | None = None):
        entry = json.loads((bundle / "config.json").read_text())["hooks"]["createRuntime"][0]
        env = dict(item.split("=", 1) for item in entry["env"])
        env.update(extra_env or {})
        self.socket = serve.socket_path(env["CDI_SPEC_DIRS"].split(":"), settings.from_environ(env))
        self.process = subprocess.Popen([oci_env.PYTHON, "-I", "-m", "cdi_hook", "watch", "--serve"], env=env,
                                        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        umask=-1 if umask is None else umask)
        # Ready: its first cache is built (and the spare forked after it); no rebuild to come.
        self.lines = []
        while not self.lines or not self.lines[-1].endswith("; ready\n"):
            self.lines.append(self.process.stderr.readline())
            assert self.lines[-1], self.lines
        assert os.path.exists(self.socket), self.lines

    def stop(self, sig=signal.SIGTERM) -> str:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=30)
        return "".join(self.lines) + err


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(bundle, extra_env=None, umask=None) -> Server:
        started.append(Server(bundle, extra_env, umask))
        return started[-1]

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


def _bundle(tmp_path: Path, spec: dict, script: str = SCRIPT):
    tmp_path.mkdir(exist_ok=True)
    if spec is None:
        spec = hook_env.full_spec(hook_env.host_files(tmp_path))
    return hook_env.bundle_with_hook(tmp_path, spec, [ALL], script,
                                     extra_env={"CDI_HOOK_CACHE_DIR": str(tmp_path / "cache")})


def _served(log_file: Path) -> list[bool]:
    return ["served_by" in line for line in hook_env.log_lines(log_file)]


def test_default_spec_dirs_agree_with_the_registry():
    assert serve.DEFAULT_SPEC_DIRS == registry.DEFAULT_SPEC_DIRS


def test_served_and_in_process_starts_see_the_same(runc, tmp_path, servers):
    bundle, log_file = _bundle(tmp_path / "a", None)
    before = oci_env.tree_snapshot(bundle / "rootfs")
    in_process = oci_env.run_container(bundle)
    assert in_process.returncode == 0, in_process.stderr
    assert _served(log_file) == [False]  # no server yet
    after_in_process = oci_env.tree_snapshot(bundle / "rootfs")
    servers(bundle)
    served = oci_env.run_container(bundle)
    assert served.returncode == 0, served.stderr
    assert _served(log_file) == [False, True]
    assert served.stdout == in_process.stdout and "END" in served.stdout and "hello from the host" in served.stdout
    assert oci_env.tree_snapshot(bundle / "rootfs") == after_in_process != before


def test_no_server_a_killed_one_or_other_settings_mean_in_process(runc, tmp_path, servers):
    bundle, log_file = _bundle(tmp_path, None)
    other = servers(bundle, {"CDI_HOOK_LOG_LEVEL": "debug"})  # not the hook's settings
    assert oci_env.run_container(bundle).returncode == 0
    other.stop()
    assert not os.path.exists(other.socket)
    server = servers(bundle)
    assert oci_env.run_container(bundle).returncode == 0
    server.stop(signal.SIGKILL)  # its socket file stays; nobody answers
    assert os.path.exists(server.socket)
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert _served(log_file) == [False, True, False]


def test_a_non_root_peer_is_refused(runc, tmp_path, servers):
    """uid 65534 with CAP_DAC_OVERRIDE (past the 0700 dir and 0600 socket) is still refused."""
    bundle, log_file = _bundle(tmp_path, None)
    server = servers(bundle)
    probe = "import os; from cdi_hook.commands import serve; print(serve.ask(['hook'], [os.environ['CDI_SPEC_DIRS']]))"
    env = {"CDI_HOOK_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    spec_dirs = json.loads((bundle / "config.json").read_text())["hooks"]["createRuntime"][0]["env"]
    env.update(item.split("=", 1) for item in spec_dirs)
    result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                             oci_env.PYTHON, "-I", "-c", probe], env=env, cwd="/", capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=30)
    assert result.stdout.strip() == "None", result.stderr  # not served: such a hook works in-process
    assert "refused an injection request from a non-root peer" in server.stop()
    assert _served(log_file) == []


def test_a_server_killed_mid_request_fails_the_start_and_leaves_nothing(runc, tmp_path, servers):
    marker = tmp_path / "marker"
    sources = hook_env.host_files(tmp_path)
    spec = hook_env.full_spec(sources)
    spec["devices"][0]["containerEdits"]["hooks"] = [{
        "hookName": "createRuntime", "path": "/bin/sh",
        "args": ["sh", "-c", f"echo $$ $PPID > {marker}.tmp && mv {marker}.tmp {marker} && exec sleep 60"]}]
    bundle, log_file = _bundle(tmp_path, spec)
    rootfs_before = oci_env.tree_snapshot(bundle / "rootfs")
    mounts_before = oci_env.host_mount_points()
    server = servers(bundle)
    run = subprocess.Popen(["runc", "run", "--bundle", str(bundle), "cdi-test-serve-kill"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert time.monotonic() < deadline and run.poll() is None, run.communicate()
            time.sleep(0.01)
        sleeper, served = (int(n) for n in marker.read_text().split())
        os.kill(served, signal.SIGKILL)  # the request's process, in the middle of the spec hooks
        server.stop(signal.SIGKILL)
        os.kill(sleeper, signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        subprocess.run(["runc", "delete", "--force", "cdi-test-serve-kill"], capture_output=True)
    assert run.returncode != 0
    assert "injection server: the connection broke before its verdict" in err
    deadline = time.monotonic() + 10  # the worker undoes once its verdict pipe has closed
    while oci_env.tree_snapshot(bundle / "rootfs") != rootfs_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert oci_env.tree_snapshot(bundle / "rootfs") == rootfs_before
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":  # not a zombie
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _mark_spec(sources: Path, which: str) -> dict:
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "mounts": [{"hostPath": str(sources / which), "containerPath": "/etc/mark", "options": ["ro", "bind"]}]}}]}


def test_a_spare_forked_before_a_spec_change_serves_the_changed_spec(runc, tmp_path, servers):
    """The spare waiting since before the edit reads the generation and the files at request
    time: every start right after an in-place edit (before any rebuild) uses the new spec."""
    sources = tmp_path / "sources"
    sources.mkdir()
    for n in range(4):
        (sources / f"m{n}").write_text(f"mark {n}\n")
    bundle, log_file = _bundle(tmp_path, _mark_spec(sources, "m0"), "cat /etc/mark")
    servers(bundle)
    assert oci_env.run_container(bundle).stdout == "mark 0\n"
    for n in range(1, 4):
        oci_env.write_spec(tmp_path / "cdi", "test.json", _mark_spec(sources, f"m{n}"))  # in place
        result = oci_env.run_container(bundle)
        assert result.returncode == 0 and result.stdout == f"mark {n}\n", result.stderr
    assert _served(log_file) == [True] * 4


def test_the_spare_holds_nothing_of_the_watchers_and_leaves_with_it(runc, tmp_path, servers):
    bundle, log_file = _bundle(tmp_path, None)
    server = servers(bundle)
    assert oci_env.run_container(bundle).returncode == 0  # served: the spare was replaced
    generation = tmp_path / "cache"
    deadline = time.monotonic() + 10
    # Retired spares and the request's process leave in a moment: one spare stays.
    while len(spares := _children(server.process.pid)) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(spares) == 1, spares
    opened = [os.readlink(f"/proc/{spares[0]}/fd/{fd}") for fd in os.listdir(f"/proc/{spares[0]}/fd")]
    # stdio, the listening socket and its socketpair: no generation file (its flock), no inotify.
    assert not [target for target in opened if str(generation) in target or "inotify" in target], opened
    assert sum(target.startswith("socket:") for target in opened) == 2, opened
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{spares[0]}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{spares[0]}"), "the spare outlived its watcher"
    assert _served(log_file) == [True]


def test_a_code_change_on_disk_sends_hooks_in_process(runc, tmp_path, servers):
    """After an upgrade the watcher's code in memory is older than the hook's: not served."""
    bundle, log_file = _bundle(tmp_path, None)
    server = servers(bundle)
    module = Path(serve.__file__)  # the client module, loaded by the watcher too
    before = module.stat()
    try:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        assert oci_env.run_container(bundle).returncode == 0
    finally:
        os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert oci_env.run_container(bundle).returncode == 0
    err = server.stop()
    assert _served(log_file) == [False, True], err
    assert "cdi-hook's code changed since this watcher started" in err


def test_a_watcher_under_no_new_privileges_does_not_serve(runc, tmp_path):
    """What the plain unit's NoNewPrivileges= does to `watch --serve`: it watches, it does not
    serve (its children could not run setuid programs as a hook can), and hooks work in-process."""
    bundle, log_file = _bundle(tmp_path, None)
    entry = json.loads((bundle / "config.json").read_text())["hooks"]["createRuntime"][0]
    env = dict(item.split("=", 1) for item in entry["env"])
    process = subprocess.Popen(["setpriv", "--no-new-privs", oci_env.PYTHON, "-I", "-m", "cdi_hook", "watch", "--serve"],
                               env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(2)]
        assert "not serving injections: it runs with NoNewPrivileges" in lines[0], lines
        assert "ready" in lines[1], lines
        assert not os.path.exists(serve.socket_path(env["CDI_SPEC_DIRS"].split(":"), settings.from_environ(env)))
        assert oci_env.run_container(bundle).returncode == 0
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert _served(log_file) == [False]


def test_a_hook_arriving_while_the_spare_serves_a_slow_start_is_served_too(runc, tmp_path, servers):
    """The next spare is forked when the request ends or, sooner, when another hook waits:
    a second start during a 4 s spec hook is served, not in-process after ASK_TIMEOUT_S."""
    assert serve.ASK_TIMEOUT_S < 4 - 1
    slow = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "hooks": [{"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "sleep 4"]}]}}]}
    bundle, log_file = _bundle(tmp_path, slow, "echo ran")
    servers(bundle)
    first = subprocess.Popen(["runc", "run", "--bundle", str(bundle), "cdi-test-serve-slow-1"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == "sh -c sleep 4"]:
            assert time.monotonic() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.01)
        second = oci_env.run_container(bundle, container_id="cdi-test-serve-slow-2")
        assert second.returncode == 0 and second.stdout == "ran\n", second.stderr
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and out == "ran\n", err
    finally:
        subprocess.run(["runc", "delete", "--force", "cdi-test-serve-slow-1"], capture_output=True)
    assert _served(log_file) == [True, True]


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_served_start_takes_the_hooks_umask(runc, tmp_path, servers):
    """The hook's umask shapes what it creates (mountpoints, /dev folders): a served start
    uses the hook's (077 here), not the watcher's (022), and leaves the same tree."""
    script = "stat -c '%a %n' /dev/cdi /dev/cdi/nested /mnt/cdi-dir /run/cdi-tmp"
    spec = hook_env.full_spec(hook_env.host_files(tmp_path))
    results, trees = [], []
    for way in ("in-process", "served"):
        bundle, log_file = _bundle(tmp_path / way, spec, script)
        if way == "served":
            servers(bundle, umask=0o022)
        result = subprocess.run(["sh", "-c", 'umask 077 && exec runc run --bundle "$1" "$2"', "sh", str(bundle),
                                 f"cdi-test-serve-umask-{way}"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=120)
        subprocess.run(["runc", "delete", "--force", f"cdi-test-serve-umask-{way}"], capture_output=True)
        assert result.returncode == 0, result.stderr
        assert _served(log_file) == [way == "served"]
        results.append(result.stdout)
        trees.append(oci_env.tree_snapshot(bundle / "rootfs"))
    assert "700 /dev/cdi\n" in results[0]
    assert results[1] == results[0]
    assert trees[1] == trees[0]


# -- who may be served: only the runtime's hook on the host (issue 22, part 1) ------------

# A root process that connects to the server with a pidfd and a state of its choosing: its
# own (a container's root that can see the cache dir), or another process's ("other").
# It never says "go": a server that answers "accepted" has already taken it for a hook.
ASK = """
import json, os, socket, subprocess, sys
path, env, stage, whose = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
argv = [b"hook", b"--stage", stage.encode()]
state = json.dumps({"ociVersion": "1.0.2", "id": "cdi-attack-serve", "status": "creating",
                    "pid": os.getpid(), "bundle": "/bundle", "annotations": {}}).encode()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(path)
read_end, write_end = os.pipe()
os.write(write_end, state)
os.close(write_end)
other = subprocess.Popen(["sleep", "30"]) if whose == "other" else None
pidfd = os.pidfd_open(other.pid if other else os.getpid())
fds = [read_end, 1, 2, os.open("/", os.O_PATH | os.O_DIRECTORY), pidfd]
message = b"\\0".join([b"cdi-hook-inject-1", b"%d" % len(argv), *argv, *(f"{k}={v}".encode() for k, v in env.items())])
sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
try:
    reply = sock.recv(1)
except OSError as error:
    reply = repr(error).encode()
print("REPLY", reply)
if other:
    other.kill()
"""


def _hook_env(bundle: Path) -> dict:
    entry = json.loads((bundle / "config.json").read_text())["hooks"]["createRuntime"][0]
    return dict(item.split("=", 1) for item in entry["env"])


def _attacker_bundle(tmp_path: Path, server: Server, env: dict, stage: str) -> Path:
    """A container without a user namespace, as root, that sees the server's socket folder
    (read-only, at the host's path) and runs the host's Python (/usr read-only)."""
    rootfs = oci_env.make_rootfs(tmp_path / "attacker" / "rootfs")
    for name in ("usr", "bundle"):
        (rootfs / name).mkdir()
    for name in ("lib", "lib64"):
        if os.path.islink(f"/{name}"):
            (rootfs / name).symlink_to(os.readlink(f"/{name}"))
    # The bundle its state names: its own, asking for the device, inside its own root.
    (rootfs / "bundle" / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "root": {"path": "/"}, "annotations": {"cdi.k8s.io/test": ALL}}))
    bundle = oci_env.make_bundle(tmp_path / "attacker", ["/usr/bin/python3", "-I", "-c", ASK, server.socket,
                                                          json.dumps(env), stage, "own"], rootfs=rootfs)
    config = json.loads((bundle / "config.json").read_text())
    assert not [ns for ns in config["linux"]["namespaces"] if ns["type"] == "user"]
    assert config["process"]["user"]["uid"] == 0
    socket_dir = os.path.dirname(server.socket)
    (rootfs / socket_dir.lstrip("/")).mkdir(parents=True)  # its mount point, before the snapshot
    config["mounts"] += [{"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
                         {"destination": socket_dir, "type": "bind", "source": socket_dir, "options": ["rbind", "ro"]}]
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


@pytest.mark.parametrize("stage", ["createRuntime", "poststart", "poststop"])
def test_a_containers_root_that_sees_the_socket_is_refused(runc, tmp_path, servers, stage):
    """Issue 22: the server took a container's root for a hook (root, SO_PEERCRED), entered
    the container's namespaces and read specs, policy and modules from its files. Every
    stage: refused before "accepted", one line in the server's log, nothing done."""
    bundle, log_file = _bundle(tmp_path, None)
    server = servers(bundle)
    attacker = _attacker_bundle(tmp_path, server, _hook_env(bundle), stage)
    rootfs_before = oci_env.tree_snapshot(attacker / "rootfs")
    result = oci_env.run_container(attacker)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "REPLY b''\n", result.stdout  # refused: the connection closed, nothing accepted
    err = server.stop()
    refusals = [line for line in err.splitlines() if "refused an injection request" in line]
    assert len(refusals) == 1 and "in another mnt namespace than the server" in refusals[0], err
    assert oci_env.tree_snapshot(attacker / "rootfs") == rootfs_before
    assert _served(log_file) == [] and not log_file.exists()


def test_a_pidfd_that_is_not_the_peers_is_refused(runc, tmp_path, servers):
    """A host root process handing over another process's pidfd: the server would take
    that process's namespaces, cwd and umask for the hook's. Refused, one line."""
    bundle, log_file = _bundle(tmp_path, None)
    server = servers(bundle)
    result = subprocess.run([oci_env.PYTHON, "-I", "-c", ASK, server.socket, json.dumps(_hook_env(bundle)),
                             "createRuntime", "other"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "REPLY b''\n", result.stdout
    err = server.stop()
    refusals = [line for line in err.splitlines() if "refused an injection request" in line]
    assert len(refusals) == 1 and "pidfd" in refusals[0], err
    assert _served(log_file) == []


# Prepended to a hook's or a watcher's code: writes each module a finder was asked for, with
# "away" when the asking process is in another mount namespace than the one it started in.
IMPORTS_SEEN = """import os, sys
class _Seen:
    home = os.readlink("/proc/self/ns/mnt")
    def find_spec(self, name, path=None, target=None):
        where = "home" if os.readlink("/proc/self/ns/mnt") == self.home else "away"
        fd = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, f"{{where}} {{os.getpid()}} {{name}}\\n".encode())
        os.close(fd)
sys.meta_path.insert(0, _Seen())
"""


@pytest.mark.parametrize("way", ["in-process", "served"])
def test_nothing_is_imported_after_entering_a_containers_mount_namespace(runc, tmp_path, way):
    """What a process imports after setns into the container's mount namespace is read from
    the container's files: its image's code would run with the hook's capabilities. Every
    module (ldconfig's confinement too) is imported before; a start with every kind of edit
    (nodes, mounts, a library and so ldconfig, spec hooks) imports nothing after."""
    from cdi_hook.hook_entry import ENTRY_CODE

    seen = tmp_path / "imports"
    spec = hook_env.full_spec(hook_env.host_files(tmp_path))
    (tmp_path / way).mkdir()
    bundle, log_file = hook_env.bundle_with_hook(tmp_path / way, spec, [ALL], SCRIPT, extra_env={
        "CDI_HOOK_CACHE_DIR": str(tmp_path / way / "cache"), "CDI_HOOK_LOG_LEVEL": "debug"})
    config = json.loads((bundle / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    assert entry["args"][1:4] == ["-I", "-c", ENTRY_CODE]
    code = IMPORTS_SEEN.format(out=str(seen))
    entry["args"][3] = code + ENTRY_CODE
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    watcher = None
    if way == "served":
        env = _hook_env(bundle)
        watcher = subprocess.Popen([oci_env.PYTHON, "-I", "-c", code + ENTRY_CODE, "watch", "--serve"], env=env,
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = []
        while not lines or not lines[-1].endswith("; ready\n"):
            lines.append(watcher.stderr.readline())
            assert lines[-1], lines
    try:
        result = oci_env.run_container(bundle)
    finally:
        if watcher is not None:
            watcher.kill()
            watcher.communicate(timeout=30)
    assert result.returncode == 0, result.stderr
    assert _served(log_file) == [way == "served"]
    assert "ran ldconfig" in json.dumps(hook_env.log_lines(log_file))  # confined by python-prctl
    recorded = seen.read_text().splitlines()
    assert [line for line in recorded if line.startswith("home ")], "the recorder saw no import at all"
    assert [line for line in recorded if line.startswith("away ")] == []
