"""CRI-O 1.33.13 for real, driven with crictl 1.34.0 as a kubelet would (issue 24).

The binaries come from ../shared/crio (the folder beside the checkout: /work/shared/crio for
/work/main), unpacked into a temp dir; Debian gives conmon, runc and the CNI plugins
(scripts/setup). How it runs here is that folder's README: one CRI-O of this module with its
own config, config dir, storage, run root, socket, logs, exits, attach and namespaces dirs,
runc root, version and shutdown files (never /etc/crio, /var/lib/crio, /run/crio), NRI off;
a busybox image imported with Podman into its storage; host-network pods with `pid: 1` and
`network: 2` in sandbox and container, which need no infra (pause) container.

cdi-hook's hooks.d files are the ones `cdi-hook install --hooks-dir DIR --mode hook` writes
(CRI-O's layout, live hook), with the module's spec dir, log and policy as the installing
environment carries them. CRI-O's own `cdi_spec_dirs` is the same spec dir: CRI-O 1.33
injects the CDI devices a container config's `cdi.k8s.io/` annotations name (the kubelet's)
itself, and refuses the container when it cannot resolve one, so a kubelet request always
meets CRI-O's native injection too (test_kubelet_request_beside_crio_native_cdi).

Afterwards nothing may be left: no pod or container in CRI-O, no process naming the temp
dir (crio, conmon), no mount under it, no container cgroup.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import oci_env
from ci_rules import TIME_FACTOR, require

SHARED = Path(__file__).resolve().parents[2] / "shared" / "crio"
ARCHIVE = "cri-o-1.33.13-amd64.tar.xz"
IMAGE = "localhost/busybox:latest"
KIND = "test.cdi-hook.io/crio"
EXCLUSIVE = "test.cdi-hook.io/excl=one"
CDI_HOOK = str(oci_env.REPO / ".venv" / "bin" / "cdi-hook")
# PID 1 of its pid namespace ignores a SIGTERM it has no handler for: without the trap every
# stop would wait out CRI-O's grace period.
SLEEPER = ("sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait")
# CRI's NamespaceMode: POD 0, CONTAINER 1, NODE 2. pid CONTAINER in sandbox and container:
# CRI-O drops the infra container (drop_infra_ctr); a POD network is a namespace CRI-O pins.
HOST_NETWORK_PID_CONTAINER = {"namespace_options": {"network": 2, "pid": 1}}
POD_NETWORK_PID_CONTAINER = {"namespace_options": {"network": 0, "pid": 1}}
KVM = f"{KIND}=kvm"
NET = "test.cdi-hook.io/net=nic"


def _require_program(name: str) -> None:
    # not conftest's: vm-tests/test_crio_differential.py imports this module beside its own conftest
    require(shutil.which(name) is not None, f"needs {name} on PATH")


def _prerequisites() -> None:
    require(os.geteuid() == 0, "needs root")
    require((SHARED / ARCHIVE).is_file(), f"needs {SHARED / ARCHIVE} (CRI-O 1.33.13 and crictl, issue 24)")
    for program in ("xz", "conmon", "runc", "podman"):   # xz: tar unpacks the .tar.xz with it
        _require_program(program)
    require(os.path.exists("/usr/lib/cni/loopback"), "needs containernetworking-plugins (/usr/lib/cni/loopback)")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")


# The node's policy: EXCLUSIVE is exclusive, and pods of namespace ml may ask for network
# devices themselves (CRI-O 1.33 cannot give them: test_net_device_moved_into_a_pod_and_home_when_its_container_is_removed).
POLICY = (f'version: "1"\nexclusive: ["{EXCLUSIVE}"]\nrules:\n'
          f'  - {{action: allow, sources: [pod], namespaces: [ml], devices: ["{NET.split("=")[0]}=*"]}}\n')


class Crio:
    """One CRI-O, and crictl against it. policy: the node's cdi-hook policy (the text);
    hooks: whether cdi-hook's hooks.d files are installed (False: CRI-O's own CDI alone,
    vm-tests/test_crio_differential.py's reference)."""

    def __init__(self, top: Path, policy: str = POLICY, hooks: bool = True):
        self.top = top
        self.socket = str(top / "crio.sock")
        self.spec_dir = top / "cdi"
        self.hooks_dir = top / "hooks.d"
        self.log_file = top / "cdi-hook.log"
        self.policy = top / "policy.yaml"
        self.spec_hooks = top / "spec-hooks.txt"
        self.pods: list[str] = []
        for name in ("cdi", "hooks.d", "conf.d", "net", "logs", "exits", "attach", "ns", "runc", "pod-logs",
                     "policies", "keys"):
            (top / name).mkdir(mode=0o755)
        (top / "dist").mkdir()
        subprocess.run(["tar", "-xJf", str(SHARED / ARCHIVE), "-C", str(top / "dist")], check=True, timeout=120)
        self.bin = top / "dist" / "cri-o-1.33.13" / "bin"
        (top / "net" / "10-loopback.conflist").write_text(json.dumps(
            {"cniVersion": "1.0.0", "name": "cdi-hook-test-lo", "plugins": [{"type": "loopback"}]}))
        self._write_specs()
        self.policy.write_text(policy)
        self.policy.chmod(0o644)
        if hooks:
            self.install_hooks()
        config = top / "crio.conf"
        config.write_text(f"""[crio]
root = "{top}/root"
runroot = "{top}/runroot"
log_dir = "{top}/logs"
storage_driver = "overlay"
version_file = "{top}/version"
version_file_persist = ""
clean_shutdown_file = "{top}/clean.shutdown"
[crio.api]
listen = "{self.socket}"
[crio.runtime]
conmon = "/usr/bin/conmon"
conmon_cgroup = "pod"
cgroup_manager = "cgroupfs"
pinns_path = "{self.bin}/pinns"
hooks_dir = ["{self.hooks_dir}"]
cdi_spec_dirs = ["{self.spec_dir}"]
container_exits_dir = "{top}/exits"
container_attach_socket_dir = "{top}/attach"
namespaces_dir = "{top}/ns"
decryption_keys_path = "{top}/keys"
irqbalance_config_file = ""
default_runtime = "runc"
[crio.runtime.runtimes.runc]
runtime_path = "/usr/sbin/runc"
runtime_root = "{top}/runc"
[crio.image]
pause_image = "{IMAGE}"
signature_policy_dir = "{top}/policies"
[crio.network]
network_dir = "{top}/net"
plugin_dirs = ["/usr/lib/cni"]
[crio.nri]
enable_nri = false
""")
        (top / "crictl.yaml").write_text(f"runtime-endpoint: unix://{self.socket}\n"
                                         f"image-endpoint: unix://{self.socket}\ntimeout: 60\n")
        self._import_image()
        self.cgroups_before = set(_crio_cgroups())
        self.log = open(top / "crio.log", "w")
        self.process = subprocess.Popen([str(self.bin / "crio"), "--config", str(config), "--config-dir",
                                         str(top / "conf.d")], stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60 * TIME_FACTOR
        while self.crictl("version").returncode != 0:
            assert self.process.poll() is None, (top / "crio.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "CRI-O did not answer on its socket in time"
            time.sleep(0.2)

    def _write_specs(self) -> None:
        """KIND=dev: a node (the host's /dev/zero), a read-only file, an environment variable
        and two spec hooks that append to a host file (poststart, poststop). KVM: /dev/kvm at
        /dev/cdi-kvm (a node no container may open by default: the device cgroup shows).
        EXCLUSIVE: a node only."""
        data = self.top / "data.txt"
        data.write_text("host data\n")
        hooks = [{"hookName": stage, "path": "/bin/sh",
                  "args": ["sh", "-c", f'echo "{stage} $(cat)" >> {self.spec_hooks}']}
                 for stage in ("poststart", "poststop")]
        oci_env.write_spec(self.spec_dir, "crio.json", {"cdiVersion": "0.6.0", "kind": KIND, "devices": [
            {"name": "dev", "containerEdits": {
                "deviceNodes": [{"path": "/dev/cdi-zero", "hostPath": "/dev/zero"}],
                "mounts": [{"hostPath": str(data), "containerPath": "/etc/cdi-data.txt", "options": ["ro", "bind"]}],
                "env": ["CDI_CRIO_DEV=1"], "hooks": hooks}},
            {"name": "kvm", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-kvm", "hostPath": "/dev/kvm"}]}}]})
        oci_env.write_spec(self.spec_dir, "excl.json", {"cdiVersion": "0.6.0", "kind": EXCLUSIVE.split("=")[0],
                                                        "devices": [{"name": "one", "containerEdits": {
                                                            "deviceNodes": [{"path": "/dev/cdi-excl",
                                                                             "hostPath": "/dev/null"}]}}]})

    def install_hooks(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")}
        env.update(CDI_SPEC_DIRS=str(self.spec_dir), CDI_HOOK_LOG=str(self.log_file), CDI_HOOK_POLICY=str(self.policy),
                   CDI_HOOK_STATE_DIR=str(self.top / "held"), CDI_HOOK_CACHE_DIR=os.environ["CDI_HOOK_CACHE_DIR"])
        done = subprocess.run([CDI_HOOK, "install", "--hooks-dir", str(self.hooks_dir), "--mode", "hook"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    def _import_image(self) -> None:
        rootfs = oci_env.make_rootfs(self.top / "image-rootfs")
        tar = self.top / "rootfs.tar"
        with tarfile.open(tar, "w") as out:
            out.add(rootfs, arcname=".")
        done = subprocess.run(["podman", "--root", f"{self.top}/root", "--runroot", f"{self.top}/runroot",
                               "--storage-driver", "overlay", "import", str(tar), IMAGE],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        shutil.rmtree(rootfs)
        tar.unlink()

    def crictl(self, *args: str, timeout: int = 90) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin / "crictl"), "--config", str(self.top / "crictl.yaml"), *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def pod(self, annotations: dict | None = None, own_network: bool = False) -> tuple[str, Path]:
        """A pod without infra container, on the host's network or (own_network) in a network
        namespace of its own; (its id, its sandbox config)."""
        name = "p-" + uuid.uuid4().hex[:8]
        config = self.top / f"{name}.json"
        config.write_text(json.dumps({
            "metadata": {"name": name, "namespace": "ml", "uid": uuid.uuid4().hex, "attempt": 0},
            "annotations": annotations or {}, "log_directory": str(self.top / "pod-logs" / name),
            "linux": {"security_context": POD_NETWORK_PID_CONTAINER if own_network else HOST_NETWORK_PID_CONTAINER}}))
        done = self.crictl("runp", str(config))
        assert done.returncode == 0, done.stderr
        self.pods.append(done.stdout.strip())
        return done.stdout.strip(), config

    def create(self, pod: tuple[str, Path], annotations: dict | None = None, command: tuple[str, ...] = SLEEPER,
               user: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
        """crictl create: the container config's annotations are the kubelet's, and so are its
        labels (the ones the kubelet always sets: kubelet/kuberuntime/labels.go)."""
        config = pod[1].with_name(pod[1].stem + "-" + uuid.uuid4().hex[:6] + ".ctr.json")
        sandbox = json.loads(pod[1].read_text())
        meta = sandbox["metadata"]
        security = dict(sandbox["linux"]["security_context"])
        if user is not None:
            security.update(run_as_user={"value": user[0]}, run_as_group={"value": user[1]})
        config.write_text(json.dumps({
            "metadata": {"name": "main"}, "image": {"image": IMAGE}, "command": list(command),
            "annotations": annotations or {}, "log_path": "main.log",
            "labels": {"io.kubernetes.container.name": "main", "io.kubernetes.pod.name": meta["name"],
                       "io.kubernetes.pod.namespace": meta["namespace"], "io.kubernetes.pod.uid": meta["uid"]},
            "linux": {"security_context": security}}))
        return self.crictl("create", pod[0], str(config), str(pod[1]))

    def run_to_end(self, pod: tuple[str, Path], annotations: dict, command: tuple[str, ...],
                   user: tuple[int, int] | None = None) -> subprocess.CompletedProcess:
        """A container that runs command to its end: its exit code and output (crictl logs),
        or the failed crictl create or start."""
        created = self.create(pod, annotations, command, user)
        if created.returncode != 0:
            return created
        cid = created.stdout.strip()
        started = self.crictl("start", cid)
        if started.returncode != 0:
            return started
        deadline = time.monotonic() + 60 * TIME_FACTOR
        while True:
            status = json.loads(self.crictl("inspect", cid).stdout)["status"]
            if status["state"] == "CONTAINER_EXITED":
                break
            assert time.monotonic() < deadline, f"container {cid} did not end: {status['state']}"
            time.sleep(0.1)
        logs = self.crictl("logs", cid)
        assert logs.returncode == 0, logs.stderr
        return subprocess.CompletedProcess(command, int(status["exitCode"]), logs.stdout, logs.stderr)

    def running(self, pod: tuple[str, Path], annotations: dict) -> str:
        created = self.create(pod, annotations)
        assert created.returncode == 0, created.stderr
        cid = created.stdout.strip()
        started = self.crictl("start", cid)
        assert started.returncode == 0, started.stderr
        return cid

    def pid(self, cid: str) -> int:
        done = self.crictl("inspect", cid)
        assert done.returncode == 0, done.stderr
        return int(json.loads(done.stdout)["info"]["pid"])

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """cdi-hook's CLI with the node's spec dir, policy and holds, and this CRI-O's socket."""
        env = dict(os.environ, CDI_SPEC_DIRS=str(self.spec_dir), CDI_HOOK_POLICY=str(self.policy),
                   CDI_HOOK_STATE_DIR=str(self.top / "held"))
        return subprocess.run([CDI_HOOK, *args, "--crio-socket", self.socket], capture_output=True, text=True,
                              timeout=60, env=env, stdin=subprocess.DEVNULL)

    def exec(self, cid: str, script: str) -> str:
        done = self.crictl("exec", cid, "sh", "-c", script)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def remove_pods(self) -> None:
        for pod in self.pods:
            done = self.crictl("rmp", "--force", pod)
            assert done.returncode == 0, done.stderr
        self.pods.clear()

    def hook_log(self, cid: str) -> list[dict]:
        if not self.log_file.exists():
            return []
        lines = [json.loads(line) for line in self.log_file.read_text().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("container") == cid]

    def stop(self) -> dict:
        """Stop CRI-O; what it left behind (and then clear that away)."""
        left_pods = self.crictl("pods", "-q").stdout.split()
        self.crictl("rmp", "-fa")
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        mine = str(self.top)
        left = {
            "pods": left_pods,
            "processes": [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_names(pid, mine)],
            "mounts": [m for m in oci_env.host_mount_points() if m.startswith(mine)],
            "cgroups": sorted(set(_crio_cgroups()) - self.cgroups_before, key=len, reverse=True),  # children first
        }
        for pid in left["processes"]:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        for mount in reversed(left["mounts"]):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        # CRI-O 1.33 with cgroupfs leaves the (empty) crio-conmon-<id> cgroup of a container
        # whose creation failed (a hook refused it): removed here, and a failure only when
        # one cannot be removed (something still in it).
        deadline = time.monotonic() + 5
        for cgroup in left.pop("cgroups"):
            while os.path.exists(cgroup) and time.monotonic() < deadline:
                try:
                    os.rmdir(cgroup)
                except OSError:
                    time.sleep(0.05)
            if os.path.exists(cgroup):
                left.setdefault("cgroups", []).append(cgroup)
        return {what: found for what, found in left.items() if found}


def _crio_cgroups() -> list[str]:
    """CRI-O's cgroups (cgroupfs: the crio parent, crio-<id>, crio-conmon-<id>), v1 and v2."""
    return [p for pattern in ("crio", "crio-*", "*/crio", "*/crio-*") for p in glob.glob(f"/sys/fs/cgroup/{pattern}")]


def _cmdline_names(pid: str, path: str) -> bool:
    try:
        return path in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.fixture(scope="module")
def crio(tmp_path_factory, private_cache_and_log):
    _prerequisites()
    top = tmp_path_factory.mktemp("crio")
    os.chmod(top, 0o755)
    daemon = Crio(top)
    try:
        yield daemon
    finally:
        left = daemon.stop()
        shutil.rmtree(top, ignore_errors=True)
    assert left == {}, f"CRI-O left behind: {left}"


@pytest.fixture
def pods(crio):
    """Each test's pods are removed after it, and CRI-O must then know none."""
    yield crio
    crio.remove_pods()
    assert crio.crictl("pods", "-q").stdout.split() == []
    assert crio.crictl("ps", "-aq").stdout.split() == []


def test_installed_hooks_run_at_every_stage_for_the_kubelets_request(pods):
    """The three hooks.d files install writes are run by CRI-O at createRuntime, poststart
    and poststop; the container config's annotation is the kubelet's (logged so)."""
    crio = pods
    assert sorted(os.listdir(crio.hooks_dir)) == ["cdi-hook-createRuntime.json", "cdi-hook-poststart.json",
                                                  "cdi-hook-poststop.json"]
    pod = crio.pod()
    cid = crio.running(pod, {"cdi.k8s.io/gpu": f"{KIND}=dev"})
    assert crio.exec(cid, "test -c /dev/cdi-zero && cat /etc/cdi-data.txt") == "host data\n"
    crio.remove_pods()   # stop and delete: runc delete runs poststop
    lines = crio.hook_log(cid)
    assert [line["stage"] for line in lines] == ["createRuntime", "poststart", "poststop"], lines
    assert all("error" not in line for line in lines), lines
    assert lines[0]["sources"] == {f"{KIND}=dev": "kubelet"}
    assert lines[0]["devices"] == [f"{KIND}=dev"]


def test_pod_authors_request_is_refused_and_the_error_reaches_crictl(pods):
    """A pod annotation (the sandbox config's, which CRI-O copies into every container's
    config.json): CRI-O does not inject it (not the kubelet's); cdi-hook refuses it at
    createRuntime, so `crictl create` fails with cdi-hook's line and nothing is given."""
    crio = pods
    pod = crio.pod({"cdi.k8s.io/mine": f"{KIND}=dev"})
    before = crio.spec_hooks.read_text() if crio.spec_hooks.exists() else ""
    created = crio.create(pod)
    assert created.returncode != 0
    pod_name = json.loads(pod[1].read_text())["metadata"]["name"]   # from the kubelet's labels
    assert f"cdi-hook: refused CDI request in pod ml/{pod_name}: " in created.stderr, created.stderr
    assert f"{KIND}=dev (asked by pod through cdi.k8s.io/mine" in created.stderr, created.stderr
    assert crio.crictl("ps", "-aq").stdout.split() == []
    assert (crio.spec_hooks.read_text() if crio.spec_hooks.exists() else "") == before   # no spec hook ran


def test_kubelet_request_beside_crio_native_cdi(pods):
    """What happens when CRI-O's own CDI and cdi-hook both apply the kubelet's request (both
    read the same spec dir): CRI-O writes the devices' nodes, cgroup rules, mount, env and
    spec hooks into config.json before runc creates the container; cdi-hook, at
    createRuntime, finds the mount and /dev/cdi-zero already there as the spec says and
    leaves them alone, replaces CRI-O's /dev/cdi-kvm by a node of the host's mode (see
    below), and writes a rule the cgroup already has. The container sees each once: one
    node per device, one mount, one cgroup rule, the variable once (CRI-O's: a live hook
    cannot set env, and says so in its log line), and the device cgroup opens kvm; verify
    holds. The spec's own hooks are not the container's to see, and they do run twice: once
    from config.json (CRI-O's injection), once from cdi-hook (doctor warns of this set-up)."""
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    crio = pods
    crio.spec_hooks.unlink(missing_ok=True)
    pod = crio.pod()
    cid = crio.running(pod, {"cdi.k8s.io/gpu": f"{KIND}=dev,{KVM}"})
    seen = crio.exec(cid, "ls /dev | grep -c '^cdi-zero$'; ls /dev | grep -c '^cdi-kvm$'; "
                          "grep -c ' /etc/cdi-data.txt ' /proc/self/mountinfo; "
                          "tr '\\0' '\\n' < /proc/1/environ | grep -c '^CDI_CRIO_DEV=1$'")
    assert seen.split() == ["1", "1", "1", "1"], seen
    if os.path.isdir("/sys/fs/cgroup/devices"):   # v1: the rules as the container reads them
        assert crio.exec(cid, "grep -c '^c 10:232 rwm$' /sys/fs/cgroup/devices/devices.list") == "1\n"
    assert _open(crio, cid, "/dev/cdi-kvm").returncode == 0
    # CRI-O's CDI 1.0.1 leaves the mode of a node without fileMode unset (runc: 0666);
    # cdi-hook reads the spec as CDI 1.1.0 does (the host node's mode) and puts its own
    # node in place of CRI-O's: one node, with cdi-hook's mode (vm-tests/test_crio_differential.py)
    host_mode = f"{stat.S_IMODE(os.stat('/dev/kvm').st_mode):o}"
    assert crio.exec(cid, "stat -c %a /dev/cdi-kvm") == host_mode + "\n"
    config = json.loads((crio.top / "runroot" / "overlay-containers" / cid / "userdata" / "config.json").read_text())
    assert [d["path"] for d in config["linux"]["devices"] if d["path"].startswith("/dev/cdi-")] == \
        ["/dev/cdi-zero", "/dev/cdi-kvm"]   # CRI-O's injection
    assert [m["destination"] for m in config["mounts"] if m["destination"] == "/etc/cdi-data.txt"] == \
        ["/etc/cdi-data.txt"]
    assert config["process"]["env"].count("CDI_CRIO_DEV=1") == 1
    assert len(config["hooks"]["poststart"]) == 2   # CRI-O's copy of the spec hook, and cdi-hook's entry
    [created] = [line for line in crio.hook_log(cid) if line["stage"] == "createRuntime"]
    assert created["devices"] == [f"{KIND}=dev", KVM] and "error" not in created, created
    assert "warnings" not in created, created   # the env CRI-O set is in config.json: nothing to warn about
    verified = crio.cli("verify", f"crio:{cid}")
    assert verified.returncode == 0 and verified.stdout == f"crio:{cid}: 5 checks hold\n", verified
    crio.remove_pods()
    ran = crio.spec_hooks.read_text().splitlines()
    assert [line.split()[0] for line in ran] == ["poststart", "poststart", "poststop", "poststop"], ran


def test_verify_and_explain_name_a_crio_container(pods):
    """`verify crio:ID` (full id and a unique prefix) and `explain crio:ID` through CRI-O's
    socket; an id CRI-O does not know is one line."""
    crio = pods
    pod = crio.pod()
    cid = crio.running(pod, {"cdi.k8s.io/gpu": f"{KIND}=dev"})
    env = dict(os.environ, CDI_SPEC_DIRS=str(crio.spec_dir), CDI_HOOK_POLICY=str(crio.policy),
               CDI_HOOK_STATE_DIR=str(crio.top / "held"))
    for name in (cid, cid[:10]):
        verified = subprocess.run([CDI_HOOK, "verify", f"crio:{name}", "--crio-socket", crio.socket],
                                  capture_output=True, text=True, timeout=60, env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.startswith(f"crio:{name}: ") and "hold" in verified.stdout, verified.stdout
    explained = subprocess.run([CDI_HOOK, "explain", f"crio:{cid[:12]}", "--crio-socket", crio.socket,
                                "--format", "json"], capture_output=True, text=True, timeout=60, env=env)
    assert explained.returncode == 0, explained.stderr
    report = json.loads(explained.stdout)
    assert report["container"]["runtime"] == "cri-o"
    assert [(r["device"], r["source"], r["honoured"]) for r in report["requests"]] == [(f"{KIND}=dev", "kubelet", True)]
    unknown = subprocess.run([CDI_HOOK, "verify", "crio:0123456789ab", "--crio-socket", crio.socket],
                             capture_output=True, text=True, timeout=60, env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        f"cdi-hook: container crio:0123456789ab: CRI-O at {crio.socket} knows no container with that id or id prefix"]


def test_exclusive_device_across_two_pods(pods):
    """The node's policy makes EXCLUSIVE exclusive: a second pod's container asking for it
    while the first runs is refused (crictl create fails with the holder named); once the
    first pod is removed (poststop releases the hold), a new container gets it."""
    crio = pods
    first = crio.pod()
    holder = crio.running(first, {"cdi.k8s.io/x": EXCLUSIVE})
    second = crio.pod()
    refused = crio.create(second, {"cdi.k8s.io/x": EXCLUSIVE})
    assert refused.returncode != 0
    # crictl shows the runtime's error, which quotes the hook's stderr (escaped once or twice):
    # each quote is the same single line, ending where the hook's one newline was
    said = set(re.findall(r"stderr: (cdi-hook: [^\\\n]*)", refused.stderr))
    assert said == {f"cdi-hook: exclusive device for {EXCLUSIVE}: held as {EXCLUSIVE} by running container "
                    f"'{holder}' (pid {crio.pid(holder)}; host device c 1:3); the policy makes it exclusive"}, \
        refused.stderr
    assert crio.crictl("ps", "-aq", "--pod", second[0]).stdout.split() == []
    done = crio.crictl("rmp", "--force", first[0])
    assert done.returncode == 0, done.stderr
    crio.pods.remove(first[0])
    later = crio.running(second, {"cdi.k8s.io/x": EXCLUSIVE})
    assert crio.exec(later, "test -c /dev/cdi-excl && echo ok") == "ok\n"


def _open(crio: Crio, cid: str, path: str) -> subprocess.CompletedProcess:
    """Open path read-write inside the container (nothing read or written)."""
    return crio.crictl("exec", cid, "sh", "-c", f"exec 3<> {path}")


def _records(crio: Crio) -> list[str]:
    """The attachment records (beside the holds' state dir; locks left out)."""
    return sorted(name for name in os.listdir(crio.top / "attachments") if name.endswith(".json"))


def test_attach_and_detach_a_crio_container(pods):
    """`attach crio:ID` gives a running CRI-O container /dev/kvm: the node appears and its
    device cgroup lets the container open it (a node of kvm's numbers the container had
    before, refused until then, opens too); `verify` holds; `detach` removes the node and
    withdraws the access again (refused, as before); the attachment's record goes."""
    require(os.path.exists("/dev/kvm"), "needs /dev/kvm")
    crio = pods
    cid = crio.running(crio.pod(), {})
    # the image's own node of kvm: only the device cgroup decides whether it opens
    os.mknod(f"/proc/{crio.pid(cid)}/root/tmp/kvm", stat.S_IFCHR | 0o666, os.stat("/dev/kvm").st_rdev)
    before = _open(crio, cid, "/tmp/kvm")
    assert before.returncode != 0 and "Operation not permitted" in before.stderr, before

    attached = crio.cli("attach", f"crio:{cid[:12]}", KVM)
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout.splitlines()[-1] == f"crio:{cid[:12]}: attached {KVM}", attached.stdout
    assert crio.exec(cid, "stat -c '%t:%T' /dev/cdi-kvm") == "a:e8\n"
    for path in ("/dev/cdi-kvm", "/tmp/kvm"):
        opened = _open(crio, cid, path)
        assert opened.returncode == 0, (path, opened.stderr)
    verified = crio.cli("verify", f"crio:{cid}", "--format", "json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert {(c["device"], c["item"], c["ok"]) for c in json.loads(verified.stdout)} == {
        (KVM, "node /dev/cdi-kvm", True), (KVM, "cgroup c 10:232 rwm", True)}, verified.stdout
    assert _records(crio) == [f"{cid}.json"]

    detached = crio.cli("detach", f"crio:{cid}", KVM)
    assert detached.returncode == 0, detached.stderr
    assert crio.exec(cid, "test -e /dev/cdi-kvm || echo gone") == "gone\n"
    after = _open(crio, cid, "/tmp/kvm")
    assert after.returncode != 0 and "Operation not permitted" in after.stderr, after
    verified = crio.cli("verify", f"crio:{cid}", "--format", "json")
    assert (verified.returncode, json.loads(verified.stdout)) == (0, []), verified.stdout + verified.stderr
    assert _records(crio) == []


def _links() -> set[str]:
    done = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30, check=True)
    return {link["ifname"] for link in json.loads(done.stdout)}


def test_net_device_moved_into_a_pod_and_home_when_its_container_is_removed(pods):
    """A `netDevices` device (CDI 1.1.0): one end of a veth pair made here is moved into the
    container's network namespace (the pod's, which CRI-O pins without an infra container)
    under the spec's name, and comes home under its own name when the container is removed
    while its pod lives (runc delete runs poststop; the pod's namespace is still there).

    Removing the pod is another matter: CRI-O unpins the pod's network namespace when it
    stops the pod (StopPodSandbox, as the kubelet and `crictl rmp` do first) and deletes its
    containers only after (RemovePodSandbox; the kubelet's garbage collector), so poststop
    finds no namespace: the kernel destroyed the veth with it (a physical interface would go
    back to the initial namespace under its container-side name). Shown here too.

    The kubelet cannot ask for it on CRI-O 1.33: CRI-O's own CDI (container-device-interface
    1.0.1) cannot parse a 1.1.0 spec with netDevices and refuses every container whose
    kubelet annotations name a device it cannot resolve, before any hook runs. So the pod
    asks, and the node's policy lets pods of namespace ml ask for this kind (cdi-hook alone
    reads pod annotations; CRI-O never injects them)."""
    _require_program("ip")
    crio = pods
    host_end = "cdt" + uuid.uuid4().hex[:8]
    subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", host_end + "p"], check=True,
                   timeout=30)
    spec = oci_env.write_spec(crio.spec_dir, "net.json", {
        "cdiVersion": "1.1.0", "kind": NET.split("=")[0], "devices": [{"name": "nic", "containerEdits": {
            "netDevices": [{"hostInterfaceName": host_end, "name": "data0"}]}}]})
    try:
        refused = crio.create(crio.pod(own_network=True), {"cdi.k8s.io/net": NET})
        assert refused.returncode != 0
        assert f"CDI device injection failed: unresolvable CDI devices {NET}" in refused.stderr, refused.stderr

        pod = crio.pod({"cdi.k8s.io/net": NET}, own_network=True)
        for _ in range(2):   # the second container gets it again from home
            cid = crio.running(pod, {})
            assert host_end not in _links()
            assert crio.exec(cid, "ip -o link show data0 | cut -d' ' -f2") == "data0@if" + \
                crio.exec(cid, "cat /sys/class/net/data0/iflink").strip() + ":\n"
            assert crio.exec(cid, "readlink /proc/1/ns/net") != os.readlink("/proc/self/ns/net") + "\n"
            for step in ("stop", "rm"):
                done = crio.crictl(step, cid)
                assert done.returncode == 0, done.stderr
            assert host_end in _links(), crio.hook_log(cid)   # home, under its own name
            lines = crio.hook_log(cid)
            assert [line["stage"] for line in lines] == ["createRuntime", "poststop"], lines
            assert all("error" not in line and "warning" not in line for line in lines), lines
            assert lines[0]["sources"] == {NET: "pod"}

        cid = crio.running(pod, {})
        assert host_end not in _links()
        crio.remove_pods()   # stop the pod (its namespace goes), then remove its container
        assert host_end not in _links() and host_end + "p" not in _links()   # destroyed with the namespace
        lines = crio.hook_log(cid)
        assert [line["stage"] for line in lines] == ["createRuntime", "poststop"]
        # said, not a debug note: the interface could not come home by name
        assert any("network namespace not found" in w for w in lines[1].get("warnings", [])), lines[1]
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True, timeout=30)
        spec.unlink()
    assert host_end not in _links() and host_end + "p" not in _links()


def test_device_plugin_allocation_reaches_a_crio_container(pods, tmp_path):
    """`cdi-hook device-plugin` as the DaemonSet runs it, against the test kubelet of
    test_device_plugin.py: registered and listed, the kubelet's Allocate answer's
    annotations become the container config's annotations given to CRI-O (what the kubelet
    does with them), and the container has both devices, through CRI-O's own CDI and
    cdi-hook (logged as the kubelet's)."""
    from test_device_plugin import HEALTHY_ALL, KIND as DP_KIND, Node, registered

    crio = pods
    socket_dir = Path(tempfile.mkdtemp(prefix="cdi-dp-", dir="/tmp"))   # a unix socket path is short
    node = Node(tmp_path, socket_dir)
    node.spec_dir = crio.spec_dir   # the node's spec dir: the plugin's, CRI-O's and the hook's
    try:
        node.start()
        registered(node)
        node.kubelet.wait_for(DP_KIND, HEALTHY_ALL)
        [answer] = node.allocate(["node0", "zero"]).container_responses
        annotations = dict(answer.annotations)
        assert list(annotations.values()) == [f"{DP_KIND}=node0,{DP_KIND}=zero"]
        cid = crio.running(crio.pod(), annotations)
        assert crio.exec(cid, "test -c /dev/cdi-dp0 && echo written > /dev/cdi-dp0 && "
                              "head -c 3 /dev/cdi-dp1 | od -An -tx1") == " 00 00 00\n"
        [line] = [line for line in crio.hook_log(cid) if line["stage"] == "createRuntime"]
        assert line["devices"] == [f"{DP_KIND}=node0", f"{DP_KIND}=zero"] and "error" not in line, line
        assert set(line["sources"].values()) == {"kubelet"}, line
    finally:
        node.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
        (crio.spec_dir / "dp.json").unlink(missing_ok=True)
