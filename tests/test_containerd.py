"""containerd for real (Debian 12: 1.6, Debian 13: 1.7), with examples/runc-cdi as the runc
binary of its io.containerd.runc.v2 shim (deploy/containerd/README.md).

Each test starts its own containerd (own root, state, temp, opt dir and sockets under
tmp_path, the CRI plugin disabled), imports a busybox image built here as an OCI layout tar
(no registry), and runs containers with `ctr run --runc-binary runc-cdi`. ctr sets the same
runc options (BinaryName, Root) that the CRI plugin takes from config.toml, and its
`--annotation` puts config.json annotations exactly where the CRI plugin puts them, so the
CRI-shaped requests are tests/runtime_shapes.py's containerd annotations. The wrapper's
environment (CDI_SPEC_DIRS, CDI_HOOK_POLICY, ...) is containerd's own: the shim inherits it
(runtime/v2/shim/util.go, Command) and go-runc hands it to runc (command_linux.go).

Afterwards nothing may be left: no process naming the test's dirs, no mount under them (the
overlayfs snapshotter mounts each container's rootfs), no container cgroup, no shim socket
in /run/containerd/s (where containerd 1.6/1.7 put them whatever the state dir).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import hook_env
import oci_env
import runtime_shapes as shapes
from ci_rules import TIME_FACTOR
from conftest import require_program

WRAPPER = oci_env.REPO / "examples" / "runc-cdi"
IMAGE = "cdi-hook.test/busybox:latest"
NAMESPACE = "cdi-hook-test"
DEVICE = f"{hook_env.VENDOR}=all"
SCRIPT = "test -c /dev/cdi-null && echo NODE; cat /etc/cdi-config.txt; echo CDI_ENV=$CDI_ENV"
SHIM_SOCKETS = Path("/run/containerd/s")   # runtime/v2/shim/util_unix.go: socketRoot, fixed


def write_spec(tmp_path: Path) -> Path:
    """One device: a node (the host's /dev/null), a read-only file and an env variable."""
    (tmp_path / "config.txt").write_text("vendor config\n")
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "vendor.json", {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [
        {"name": "all", "containerEdits": {
            "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
            "mounts": [{"hostPath": str(tmp_path / "config.txt"), "containerPath": "/etc/cdi-config.txt",
                        "options": ["ro", "bind"]}],
            "env": ["CDI_ENV=from-spec"]}}]})
    return spec_dir


def image_tar(tmp_path: Path) -> Path:
    """An OCI image layout tar (oci-layout, index.json, blobs) of one uncompressed busybox layer."""
    rootfs = oci_env.make_rootfs(tmp_path / "image-rootfs")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        tar.add(rootfs, arcname=".")
    out = tmp_path / "image.tar"
    with tarfile.open(out, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        def blob(data: bytes, media_type: str) -> dict:
            digest = hashlib.sha256(data).hexdigest()
            add(f"blobs/sha256/{digest}", data)
            return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

        layer_desc = blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)  # GOARCH
        config = blob(json.dumps({"architecture": arch, "os": "linux", "config": {"Cmd": ["sh"]},
                                  "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}).encode(),
                      "application/vnd.oci.image.config.v1+json")
        manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": config, "layers": [layer_desc]}).encode(),
                        "application/vnd.oci.image.manifest.v1+json")
        manifest["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
        add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add("index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode())
    return out


class Containerd:
    """One containerd daemon of this test, and ctr against it."""

    def __init__(self, top: Path, env: dict):
        self.top = top
        self.address = str(top / "containerd.sock")
        self.tag = "cdi-ctrd-" + uuid.uuid4().hex[:8]   # container ids and cgroup names
        self.ids: list[str] = []
        top.mkdir(mode=0o700)
        config = top / "config.toml"
        # The CRI plugin is off: it would want CNI, a sandbox image and a kubelet. The opt
        # plugin's default (/opt/containerd) and the temp mounts of unpacking go here too.
        config.write_text(f"""version = 2
root = "{top}/root"
state = "{top}/state"
temp = "{top}/tmp"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.address}"
[ttrpc]
  address = "{top}/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{top}/opt"
""")
        (top / "tmp").mkdir()
        self.log = open(top / "containerd.log", "w")
        self.process = subprocess.Popen(["containerd", "--config", str(config)], env=env, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20 * TIME_FACTOR
        while self.ctr("version").returncode != 0:
            assert self.process.poll() is None, (top / "containerd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "containerd did not answer on its socket in time"
            time.sleep(0.1)

    def ctr(self, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run(self, annotations: dict, script: str = SCRIPT) -> subprocess.CompletedProcess:
        """`ctr run --rm` a container whose runc is the wrapper; its output."""
        cid = f"{self.tag}-{len(self.ids)}"
        self.ids.append(cid)
        args = ["run", "--rm", "--fifo-dir", str(self.top / "fifo"), "--runc-binary", str(WRAPPER),
                "--runc-root", str(self.top / "runc"), "--cgroup", f"/{cid}"]
        for key, value in annotations.items():
            args += ["--annotation", f"{key}={value}"]
        return self.ctr(*args, IMAGE, cid, "sh", "-c", script)

    def detached(self, annotations: dict) -> str:
        """`ctr run -d` a container that sleeps; its id."""
        cid = f"{self.tag}-{len(self.ids)}"
        self.ids.append(cid)
        args = ["run", "--detach", "--fifo-dir", str(self.top / "fifo"), "--runc-binary", str(WRAPPER),
                "--runc-root", str(self.top / "runc"), "--cgroup", f"/{cid}"]
        for key, value in annotations.items():
            args += ["--annotation", f"{key}={value}"]
        started = self.ctr(*args, IMAGE, cid, "sleep", "60")
        assert started.returncode == 0, started.stderr
        return cid

    def remove(self, cid: str) -> None:
        """Kill and delete a detached container, its task and its snapshot."""
        deleted = self.ctr("tasks", "delete", "--force", cid)
        assert deleted.returncode == 0, deleted.stderr
        deleted = self.ctr("containers", "delete", cid)
        assert deleted.returncode == 0, deleted.stderr

    def traces(self, cid: str) -> dict:
        """What a running container of this daemon has on the host, as stop() looks for it."""
        mine = str(self.top)
        return {
            "shim process": any(_cmdline_names(pid, mine) and pid != str(self.process.pid)
                                for pid in os.listdir("/proc") if pid.isdigit()),
            "rootfs mount": f"{self.top}/state/io.containerd.runtime.v2.task/{NAMESPACE}/{cid}/rootfs"
                            in oci_env.host_mount_points(),
            "cgroup": bool(glob.glob(f"/sys/fs/cgroup/{cid}") + glob.glob(f"/sys/fs/cgroup/*/{cid}")),
            "shim socket": self.shim_socket(cid).exists(),
        }

    def stop(self) -> dict:
        """Stop the daemon; what it left behind (and then clear that away)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        mine = str(self.top)
        left = {
            "processes": [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_names(pid, mine)],
            "mounts": [m for m in oci_env.host_mount_points() if m.startswith(mine)],
            "cgroups": [p for cid in self.ids for p in glob.glob(f"/sys/fs/cgroup/{cid}")
                        + glob.glob(f"/sys/fs/cgroup/*/{cid}")],
            "shim sockets": [str(s) for s in map(self.shim_socket, self.ids) if s.exists()],
        }
        # Clear it away, so one failure does not spill into the next tests: shims, then the
        # containers' own processes (found through their cgroups), mounts, cgroups, sockets.
        victims = set(left["processes"])
        for cgroup in left["cgroups"]:
            with _ignoring(OSError):
                victims.update(Path(cgroup, "cgroup.procs").read_text().split())
        for pid in victims:
            with _ignoring(OSError):
                os.kill(int(pid), signal.SIGKILL)
        for mount in reversed(left["mounts"]):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        deadline = time.monotonic() + 5
        for cgroup in left["cgroups"]:
            while os.path.exists(cgroup) and time.monotonic() < deadline:
                with _ignoring(OSError):
                    os.rmdir(cgroup)   # busy until the killed processes are gone
                time.sleep(0.05)
        for socket in left["shim sockets"]:
            with _ignoring(OSError):
                os.unlink(socket)
        return {what: found for what, found in left.items() if found}

    def shim_socket(self, cid: str) -> Path:
        """runtime/v2/shim/util_unix.go, SocketAddress: sha256 of address/namespace/id."""
        return SHIM_SOCKETS / hashlib.sha256(os.path.join(self.address, NAMESPACE, cid).encode()).hexdigest()


@contextmanager
def _ignoring(*errors):
    try:
        yield
    except errors:
        pass


def _cmdline_names(pid: str, path: str) -> bool:
    try:
        return path in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@contextmanager
def containerd(tmp_path: Path, name: str, spec_dir: Path, **settings: str):
    """A containerd whose environment carries the wrapper's settings; checked clean afterwards."""
    env = dict(os.environ, CDI_HOOK=f"{oci_env.REPO}/.venv/bin/cdi-hook", CDI_SPEC_DIRS=str(spec_dir),
               CDI_HOOK_INSECURE_SPECS="1", **settings)   # tmp_path specs are not under a root-only tree
    run_containerd_existed = Path("/run/containerd").exists()
    sockets_existed = SHIM_SOCKETS.exists()
    daemon = Containerd(tmp_path / name, env)
    try:
        imported = daemon.ctr("images", "import", "--base-name", IMAGE.split(":")[0], str(image_tar(tmp_path / name)))
        assert imported.returncode == 0, imported.stderr
        yield daemon
        containers = daemon.ctr("containers", "list", "--quiet").stdout.split()
        assert containers == [], f"containers left in containerd: {containers}"
    finally:
        left = daemon.stop()
        # The shims' socket dir is fixed; where this test made it, it takes it away again.
        for made, existed in ((SHIM_SOCKETS, sockets_existed), (SHIM_SOCKETS.parent, run_containerd_existed)):
            if not existed:
                with _ignoring(OSError):
                    made.rmdir()
    assert left == {}, f"containerd left behind: {left}"


def ready() -> None:
    require_program("containerd")
    require_program("ctr")


def test_ctr_annotation_gives_the_device_through_the_wrapper(runc, tmp_path):
    """An administrator's `ctr run --annotation`: no Kubernetes keys, honoured by default;
    node, file and env all reach the container."""
    ready()
    spec_dir = write_spec(tmp_path)
    mounts_before = oci_env.host_mount_points()
    with containerd(tmp_path, "daemon", spec_dir) as daemon:
        result = daemon.run({"cdi.k8s.io/test": DEVICE})
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:3] == ["NODE", "vendor config", "CDI_ENV=from-spec"]
        # Control: the same container without the annotation gets nothing.
        control = daemon.run({})
        assert control.returncode == 0, control.stderr
        assert control.stdout.split("\n")[:2] == ["CDI_ENV=", ""]
        # A running one, to show that the leftover checks below look in the right places.
        cid = daemon.detached({"cdi.k8s.io/test": DEVICE})
        try:
            assert daemon.traces(cid) == {"shim process": True, "rootfs mount": True, "cgroup": True,
                                          "shim socket": True}
            # An exec'd process: containerd builds its spec from the container spec it keeps,
            # which never saw the wrapper's edits, so the node is there and the env is not.
            execd = daemon.ctr("tasks", "exec", "--exec-id", "probe", "--fifo-dir", str(daemon.top / "fifo"), cid,
                               "sh", "-c", SCRIPT)
            assert execd.returncode == 0, execd.stderr
            assert execd.stdout.split("\n")[:3] == ["NODE", "vendor config", "CDI_ENV="]
        finally:
            daemon.remove(cid)
        assert not any(daemon.traces(cid).values())
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []


def test_cri_shaped_request_is_refused_by_default_and_honoured_with_the_policy(runc, tmp_path):
    """A config.json as containerd's CRI plugin writes it for a Kubernetes container (the
    request passed through container_annotations): its source cannot be told, so it is
    refused, with cdi-hook's error in ctr's; once containerd's environment names a policy
    saying containerd.cdiAnnotations: container, the same container gets the device."""
    ready()
    spec_dir = write_spec(tmp_path)
    annotations = shapes.containerd(container_annotations={"cdi.k8s.io/gpu": DEVICE})
    with containerd(tmp_path, "default", spec_dir) as daemon:
        refused = daemon.run(annotations)
        assert refused.returncode != 0
        assert "OCI runtime create failed: cdi-hook: refused CDI request in pod ml/train-0" in refused.stderr, \
            refused.stderr
        assert f"{DEVICE} (asked by unknown through cdi.k8s.io/gpu: containerd does not mark" in refused.stderr
        assert "NODE" not in refused.stdout and "vendor config" not in refused.stdout

    policy = tmp_path / "policy.yaml"   # root-owned, 0644, as the policy's trust rules want
    policy.write_text('version: "1"\ncontainerd:\n  cdiAnnotations: container\n')
    policy.chmod(0o644)
    with containerd(tmp_path, "vouched", spec_dir, CDI_HOOK_POLICY=str(policy)) as daemon:
        result = daemon.run(annotations)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[:3] == ["NODE", "vendor config", "CDI_ENV=from-spec"]


def test_deploy_snippet_is_what_containerd_reads(root_only, tmp_path):
    """deploy/containerd/config.toml, as containerd itself parses it (`config dump`): the CRI
    plugin's runc runtime gets the wrapper as BinaryName and passes only the container's
    (the kubelet's) cdi.k8s.io/ annotations."""
    ready()
    import tomllib

    config = tmp_path / "config.toml"
    config.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n'
                      + (oci_env.REPO / "deploy" / "containerd" / "config.toml").read_text())
    dumped = subprocess.run(["containerd", "--config", str(config), "config", "dump"], capture_output=True,
                            text=True, timeout=30, check=True).stdout
    runc = tomllib.loads(dumped)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"]["BinaryName"] == "/usr/local/bin/runc-cdi"
    assert runc["container_annotations"] == ["cdi.k8s.io/*"]
    assert runc["pod_annotations"] == []


def test_containerd_version_is_one_this_test_knows():
    """The findings of deploy/containerd/README.md were checked on 1.6 and 1.7."""
    ready()
    version = subprocess.run(["containerd", "--version"], capture_output=True, text=True, check=True).stdout
    number = version.split()[2].lstrip("v")
    assert number.startswith(("1.6.", "1.7.")), f"untested containerd {number}: check deploy/containerd/README.md"

