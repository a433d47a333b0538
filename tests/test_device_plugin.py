"""`cdi-hook device-plugin` end to end, without a cluster: a test kubelet speaks the kubelet's
side of the device plugin API v1beta1 (the Registration server on kubelet.sock; then, as
the kubelet does on Register, it dials the plugin's endpoint and follows its ListAndWatch
stream) and drives the real plugin process through registration, listing, allocation, a
device going unhealthy and back, spec changes, a kubelet restart and SIGTERM. Last, the
allocation's annotations go into a config.json shaped as CRI-O writes it for a container
the kubelet annotated, and runc with the live hook gives the container the devices.

Devices are counted as host devices, not names (issue 22): a spec in the nvidia-ctk layout
(`0`, `GPU-<uuid>`, `all`) on loop devices is listed as one unit per GPU, and the units the
kubelet hands out never put one host node in two runc containers. Every kind gets its own
socket and annotation key (hypothesis, over kinds that differ in where the '/' is).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import hook_env
import oci_env
import runtime_shapes as shapes
from ci_rules import require
from cdi_hook.kubelet import api_pb2, api_pb2_grpc

KIND = "test.cdi-hook.io/dp"
OTHER_KIND = "test.cdi-hook.io/dp-other"
GPU_KIND = "test.cdi-hook.io/gpu"
ENDPOINT = "cdi-hook-test.cdi-hook.io_dp.sock"
ANNOTATION = "cdi.k8s.io/cdi-hook_test.cdi-hook.io_dp"
NULL, ZERO = os.makedev(1, 3), os.makedev(1, 5)
TIMEOUT = 10  # seconds for anything the plugin does within a poll or two (it polls every 0.1 s)


class TestKubelet(api_pb2_grpc.RegistrationServicer):
    """The kubelet's device manager, as far as a plugin sees it."""

    __test__ = False  # not a pytest class

    def __init__(self, socket_dir: Path):
        self.socket_dir = socket_dir
        self.path = socket_dir / "kubelet.sock"
        self.registrations: queue.Queue = queue.Queue()
        self.updates: queue.Queue = queue.Queue()  # (resource, {device id: health}) per ListAndWatch message
        self.plugins: dict[str, api_pb2_grpc.DevicePluginStub] = {}
        self.channels: list[grpc.Channel] = []
        self.server = None

    def start(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        api_pb2_grpc.add_RegistrationServicer_to_server(self, self.server)
        assert self.server.add_insecure_port(f"unix://{self.path}")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(None).wait()
            self.server = None
        for channel in self.channels:
            channel.close()  # ends the ListAndWatch streams, as a dying kubelet does
        self.channels.clear()
        self.plugins.clear()

    def restart(self, remove_plugin_sockets: bool) -> None:
        """Stop, remove kubelet.sock and serve a new one. The kubelet's device manager also
        removes every other socket in the dir when it starts (remove_plugin_sockets)."""
        self.stop()
        for entry in self.socket_dir.iterdir():
            if entry == self.path or (remove_plugin_sockets and stat.S_ISSOCK(entry.lstat().st_mode)):
                entry.unlink()
        self.start()

    def Register(self, request, context):
        # What the kubelet checks (devicemanager/plugin/v1beta1/server.go), then its dial back.
        if request.version != "v1beta1":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unsupported version {request.version}")
        if "/" not in request.resource_name or request.resource_name.startswith("kubernetes.io/"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid resource name {request.resource_name}")
        channel = grpc.insecure_channel(f"unix://{self.socket_dir / request.endpoint}")
        self.channels.append(channel)
        stub = api_pb2_grpc.DevicePluginStub(channel)
        stub.GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT)
        stream = stub.ListAndWatch(api_pb2.Empty())
        threading.Thread(target=self._follow, args=(request.resource_name, stream), daemon=True).start()
        self.plugins[request.resource_name] = stub
        self.registrations.put(request)
        return api_pb2.Empty()

    def _follow(self, resource: str, stream) -> None:
        try:
            for response in stream:
                self.updates.put((resource, {device.ID: device.health for device in response.devices}))
        except grpc.RpcError:
            pass  # the stream ended: the plugin stopped or this kubelet closed the channel

    def next_registration(self, resource: str = KIND):
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                request = self.registrations.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if request.resource_name == resource:
                return request
        raise AssertionError(f"no registration for {resource} within {TIMEOUT} s")

    def listing(self, resource: str) -> dict:
        """The next ListAndWatch message of resource (id -> health)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                name, devices = self.updates.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if name == resource:
                return devices
        raise AssertionError(f"{resource}: nothing listed within {TIMEOUT} s")

    def wait_for(self, resource: str, expected: dict) -> None:
        """Until a ListAndWatch message of resource lists exactly expected (id -> health)."""
        seen = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                name, devices = self.updates.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if name == resource:
                seen.append(devices)
                if devices == expected:
                    return
        raise AssertionError(f"{resource}: never listed {expected}; listed {seen}")


class Node:
    """The test node: spec dir, a host device node in a tmp dir, the test kubelet, the plugin."""

    def __init__(self, tmp_path: Path, socket_dir: Path):
        self.tmp_path = tmp_path
        self.socket_dir = socket_dir
        self.spec_dir = tmp_path / "cdi"
        self.host_node = tmp_path / "host" / "dp0"
        self.kubelet = TestKubelet(socket_dir)
        self.log = tmp_path / "plugin.log"
        self.process = None
        self.processes: list[subprocess.Popen] = []

    def spec(self, extra_devices: tuple = ()) -> dict:
        return {"cdiVersion": "0.6.0", "kind": KIND, "devices": [
            # fully specified: Healthy only while the host node is a character device 1:3
            {"name": "node0", "containerEdits": {"deviceNodes": [
                {"path": "/dev/cdi-dp0", "hostPath": str(self.host_node), "type": "c", "major": 1, "minor": 3,
                 "permissions": "rw"}]}},
            {"name": "zero", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-dp1", "hostPath": "/dev/zero"}]}},
            {"name": "plain", "containerEdits": {"env": ["DP_PLAIN=1"]}},  # no nodes: always Healthy
            *extra_devices,
        ]}

    def start(self) -> None:
        self.host_node.parent.mkdir()
        os.mknod(self.host_node, stat.S_IFCHR | 0o666, NULL)
        oci_env.write_spec(self.spec_dir, "dp.json", self.spec())
        self.kubelet.start()
        self.process = self.spawn(self.log)

    def spawn(self, log_path: Path) -> subprocess.Popen:
        """`cdi-hook device-plugin` as the DaemonSet runs it, polling fast; stops with the node."""
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-I", "-m", "cdi_hook", "device-plugin", "--socket-dir", str(self.socket_dir),
                 "--spec-dir", str(self.spec_dir), "--poll-interval", "0.1"],
                cwd=oci_env.REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.kubelet.stop()

    def plugin(self, resource: str = KIND) -> api_pb2_grpc.DevicePluginStub:
        return self.kubelet.plugins[resource]

    def allocate(self, *containers: list[str], resource: str = KIND):
        request = api_pb2.AllocateRequest(container_requests=[
            api_pb2.ContainerAllocateRequest(devices_ids=ids) for ids in containers])
        return self.plugin(resource).Allocate(request, timeout=TIMEOUT)

    def replace_host_node(self, device: int | None) -> None:
        """Put a character node of `device` at the host path (atomically), or remove it (None)."""
        if device is None:
            self.host_node.unlink()
            return
        new = self.host_node.with_name("dp0.new")
        os.mknod(new, stat.S_IFCHR | 0o666, device)
        os.rename(new, self.host_node)

    def plugin_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


HEALTHY_ALL = {"node0": "Healthy", "zero": "Healthy", "plain": "Healthy"}

# The layout of `nvidia-ctk cdi generate` (tests/vendor/nvidia-ctk-1.17.yaml) for two GPUs:
# each physical GPU listed as its index and as its UUID, and `all` naming every GPU's
# nodes; the control devices are spec-level. Stand-ins: /dev/loop0+2 are GPU 0's nodes,
# /dev/loop1+3 GPU 1's, /dev/null is nvidiactl. GPU 1's UUID entry names its main node
# through another host path (a node of the same numbers): one device, whatever the path.
GPU_UUIDS = ("GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c", "GPU-9a3e1f07-5b2d-4c8e-a1f6-0d7b3c2e8f41")
GPU_NODES = {"/dev/loop0": "/dev/nvidia0", "/dev/loop2": "/dev/dri/renderD128",
             "/dev/loop1": "/dev/nvidia1", "/dev/loop3": "/dev/dri/renderD129"}


def gpu_spec(loop1_again: Path) -> dict:
    def nodes(*host_paths: str) -> dict:
        return {"deviceNodes": [{"path": GPU_NODES.get(host, "/dev/nvidia1"), "hostPath": host}
                                for host in host_paths]}

    return {"cdiVersion": "0.5.0", "kind": GPU_KIND,
            "containerEdits": {"deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": "/dev/null"}],
                               "env": ["NVIDIA_VISIBLE_DEVICES=void"]},
            "devices": [
                {"name": "0", "containerEdits": nodes("/dev/loop0", "/dev/loop2")},
                {"name": GPU_UUIDS[0], "containerEdits": nodes("/dev/loop2", "/dev/loop0")},
                {"name": "1", "containerEdits": nodes("/dev/loop1", "/dev/loop3")},
                {"name": GPU_UUIDS[1], "containerEdits": nodes(str(loop1_again), "/dev/loop3")},
                {"name": "all", "containerEdits": nodes("/dev/loop0", "/dev/loop2", "/dev/loop1", "/dev/loop3")},
            ]}


def host_devices(spec: dict, names: list[str]) -> set[int]:
    """The rdevs of the device-level host nodes that the named devices of spec name."""
    by_name = {device["name"]: device for device in spec["devices"]}
    return {os.stat(node["hostPath"]).st_rdev for name in names
            for node in by_name[name]["containerEdits"]["deviceNodes"]}


@pytest.fixture
def gpus(node):
    """The node with the nvidia-ctk-shaped spec added; (node, spec)."""
    for path in ("/dev/loop0", "/dev/loop1", "/dev/loop2", "/dev/loop3"):
        require(os.path.exists(path) and stat.S_ISBLK(os.stat(path).st_mode), f"needs the block device {path}")
    loop1_again = node.tmp_path / "host" / "loop1-again"
    os.mknod(loop1_again, stat.S_IFBLK | 0o600, os.stat("/dev/loop1").st_rdev)
    spec = gpu_spec(loop1_again)
    oci_env.write_spec(node.spec_dir, "gpu.json", spec)
    registered(node, GPU_KIND)
    return node, spec


def allocate_one_each(node: Node, listed: dict) -> dict[str, list[str]]:
    """What the kubelet does with pods that each ask for one unit: every listed id goes to
    its own container; id -> the names in the container's annotation."""
    allocations = {}
    for device_id in sorted(listed):
        response = node.allocate([device_id], resource=GPU_KIND)
        [container] = response.container_responses
        [value] = container.annotations.values()
        allocations[device_id] = [name.split("=", 1)[1] for name in value.split(",")]
    return allocations


@pytest.fixture
def node(root_only, tmp_path):
    # A short socket dir: a unix socket path holds at most 107 bytes, pytest's tmp_path is long.
    socket_dir = Path(tempfile.mkdtemp(prefix="cdi-dp-", dir="/tmp"))
    node = Node(tmp_path, socket_dir)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def registered(node: Node, resource: str = KIND):
    try:
        request = node.kubelet.next_registration(resource)
    except AssertionError as error:
        raise AssertionError(f"{error}; plugin log:\n{node.plugin_log()}") from None
    return request


def test_registers_lists_and_allocates(node):
    request = registered(node)
    assert (request.version, request.endpoint, request.resource_name) == ("v1beta1", ENDPOINT, KIND)
    assert stat.S_ISSOCK((node.socket_dir / ENDPOINT).lstat().st_mode)
    assert request.options.get_preferred_allocation_available and not request.options.pre_start_required
    node.kubelet.wait_for(KIND, HEALTHY_ALL)

    options = node.plugin().GetDevicePluginOptions(api_pb2.Empty(), timeout=TIMEOUT)
    assert (options.pre_start_required, options.get_preferred_allocation_available) == (False, True)

    response = node.allocate(["node0"], ["zero", "plain", "zero"])
    first, second = response.container_responses
    assert dict(first.annotations) == {ANNOTATION: f"{KIND}=node0"}
    assert [d.name for d in first.cdi_devices] == [f"{KIND}=node0"]
    assert dict(second.annotations) == {ANNOTATION: f"{KIND}=zero,{KIND}=plain"}
    assert [d.name for d in second.cdi_devices] == [f"{KIND}=zero", f"{KIND}=plain"]
    assert not (first.envs or first.mounts or first.devices)  # CDI carries everything

    with pytest.raises(grpc.RpcError) as refused:
        node.allocate(["node0", "gpu7"])
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpu7'" in refused.value.details() and KIND in refused.value.details(), refused.value.details()

    preferred = node.plugin().GetPreferredAllocation(api_pb2.PreferredAllocationRequest(container_requests=[
        api_pb2.ContainerPreferredAllocationRequest(available_deviceIDs=["node0", "zero", "plain"],
                                                    must_include_deviceIDs=["plain"], allocation_size=2)]),
        timeout=TIMEOUT)
    assert list(preferred.container_responses[0].deviceIDs) == ["plain", "node0"]
    node.plugin().PreStartContainer(api_pb2.PreStartContainerRequest(devices_ids=["node0"]), timeout=TIMEOUT)


def test_device_goes_unhealthy_and_back(node):
    registered(node)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    unhealthy = dict(HEALTHY_ALL, node0="Unhealthy")

    node.replace_host_node(ZERO)  # another device at the path: not the node the spec names
    node.kubelet.wait_for(KIND, unhealthy)
    node.replace_host_node(NULL)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    node.replace_host_node(None)  # gone
    node.kubelet.wait_for(KIND, unhealthy)
    node.replace_host_node(NULL)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    regular = node.host_node.with_name("regular")
    regular.write_text("not a device\n")
    os.rename(regular, node.host_node)  # a regular file where the node was
    node.kubelet.wait_for(KIND, unhealthy)
    node.replace_host_node(NULL)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    log = node.plugin_log()
    assert "is 1:5, the spec says 1:3" in log and "No such file or directory" in log and "not a device node" in log


def test_resources_follow_the_specs(node):
    registered(node)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)

    # A device added to the kind: listed. A new kind: a new resource, registered.
    oci_env.write_spec(node.spec_dir, "dp.json", node.spec(({"name": "late", "containerEdits": {"env": ["X=1"]}},)))
    node.kubelet.wait_for(KIND, dict(HEALTHY_ALL, late="Healthy"))
    other = oci_env.write_spec(node.spec_dir, "other.json", {"cdiVersion": "0.6.0", "kind": OTHER_KIND, "devices": [
        {"name": "a", "containerEdits": {"env": ["A=1"]}}]})
    request = registered(node, OTHER_KIND)
    assert request.endpoint == "cdi-hook-test.cdi-hook.io_dp-other.sock"
    node.kubelet.wait_for(OTHER_KIND, {"a": "Healthy"})
    response = node.allocate(["a"], resource=OTHER_KIND)
    assert dict(response.container_responses[0].annotations) == {
        "cdi.k8s.io/cdi-hook_test.cdi-hook.io_dp-other": f"{OTHER_KIND}=a"}

    # The device and the kind removed again: unlisted, unallocatable; the kind's socket gone.
    oci_env.write_spec(node.spec_dir, "dp.json", node.spec())
    other.unlink()
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    deadline = time.monotonic() + TIMEOUT
    while (node.socket_dir / request.endpoint).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (node.socket_dir / request.endpoint).exists()
    with pytest.raises(grpc.RpcError) as refused:
        node.allocate(["late"])
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "'late'" in refused.value.details()


def test_probe_specs_are_never_advertised(node):
    """The spec of a `cdi-hook doctor --probe` (/dev/null as a device), one a killed doctor left
    and one whose doctor still runs (this process), is no resource: never registered, no
    socket, nothing for the kubelet to give a pod."""
    from cdi_hook import probe_spec

    registered(node)
    child = subprocess.Popen(["sleep", "60"])
    dead = probe_spec.writer_identity(child.pid)
    child.kill()
    child.wait()
    for name, writer in (("dead", dead), ("alive", probe_spec.writer_identity())):
        oci_env.write_spec(node.spec_dir, f"{probe_spec.SPEC_PREFIX}{name}.json", {
            "cdiVersion": "0.6.0", "kind": probe_spec.PROBE_KIND, "annotations": {probe_spec.WRITER_ANNOTATION: writer},
            "devices": [{"name": f"p{name}", "containerEdits": {
                "deviceNodes": [{"path": "/dev/cdi-hook-probe", "hostPath": "/dev/null"}]}}]})
    # A kind written after the probe specs: once it is registered, a poll has seen them all.
    oci_env.write_spec(node.spec_dir, "other.json", {"cdiVersion": "0.6.0", "kind": OTHER_KIND, "devices": [
        {"name": "a", "containerEdits": {"env": ["A=1"]}}]})
    registered(node, OTHER_KIND)
    time.sleep(0.3)  # a few more polls
    seen = []
    while not node.kubelet.registrations.empty():
        seen.append(node.kubelet.registrations.get().resource_name)
    assert probe_spec.PROBE_KIND not in seen + list(node.kubelet.plugins), seen
    assert not [p.name for p in node.socket_dir.iterdir() if "doctor" in p.name]
    assert probe_spec.PROBE_KIND not in node.plugin_log()


@pytest.mark.parametrize("remove_plugin_sockets", [True, False], ids=["as-the-kubelet", "kubelet-sock-only"])
def test_kubelet_restart_registers_again(node, remove_plugin_sockets):
    registered(node)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)

    # The plugin must notice from the sockets alone: a new kubelet.sock (however quickly
    # made again, even on the same inode number), or its own endpoint socket gone.
    node.kubelet.restart(remove_plugin_sockets)
    request = registered(node)
    assert request.endpoint == ENDPOINT
    assert stat.S_ISSOCK((node.socket_dir / ENDPOINT).lstat().st_mode)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)  # the new kubelet's own ListAndWatch stream
    response = node.allocate(["node0"])
    assert dict(response.container_responses[0].annotations) == {ANNOTATION: f"{KIND}=node0"}
    assert node.kubelet.registrations.empty()  # registered once per kubelet, not once per poll
    served_again = '"event": "endpoint socket gone, serving again"' in node.plugin_log()
    assert served_again == remove_plugin_sockets, node.plugin_log()


def test_a_kubelet_that_comes_later_is_registered_with(node):
    registered(node)
    node.kubelet.stop()
    node.kubelet.path.unlink(missing_ok=True)  # gRPC removes it on stop; a crashed kubelet would not
    deadline = time.monotonic() + TIMEOUT
    while '"state": "missing"' not in node.plugin_log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"state": "missing"' in node.plugin_log()
    time.sleep(0.3)  # a few polls without a kubelet: nothing to do, nothing logged per poll
    node.kubelet.start()
    registered(node)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    time.sleep(0.3)
    assert node.kubelet.registrations.empty()  # once, not once per poll


def test_a_second_instance_waits_then_replaces_a_crashed_ones_socket(node):
    registered(node)
    endpoint = node.socket_dir / ENDPOINT
    second_log = node.tmp_path / "second.log"
    second = node.spawn(second_log)
    deadline = time.monotonic() + TIMEOUT
    while "another process serves on" not in second_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"another process serves on {endpoint}; waiting for it to stop" in second_log.read_text()
    time.sleep(0.3)
    assert node.kubelet.registrations.empty()  # the first keeps its socket: no ping-pong

    node.process.kill()  # a crash: its socket stays behind, nobody listening on it
    node.process.wait()
    assert stat.S_ISSOCK(endpoint.lstat().st_mode)
    registered(node)  # the second one took the stale socket's place
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    assert second.poll() is None and '"event": "serving"' in second_log.read_text()


def test_sigterm_stops_and_removes_its_sockets(node):
    registered(node)
    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(TIMEOUT) == 0, node.plugin_log()
    assert sorted(p.name for p in node.socket_dir.iterdir()) == ["kubelet.sock"]
    assert '"event": "device plugin stopped"' in node.plugin_log()


def test_allocated_devices_reach_a_runc_container_through_the_hook(node, runc):
    registered(node)
    node.kubelet.wait_for(KIND, HEALTHY_ALL)
    annotations = dict(node.allocate(["node0", "zero"]).container_responses[0].annotations)
    script = ("test -c /dev/cdi-dp0 && echo written > /dev/cdi-dp0 && test -c /dev/cdi-dp1 "
              "&& head -c 3 /dev/cdi-dp1 | od -An -tx1 && echo HAS-DEVICES")

    # The kubelet sets the annotations on the container; CRI-O records them as the kubelet's.
    top = node.tmp_path / "kubelet"
    top.mkdir()
    (top / "cdi").symlink_to(node.spec_dir)  # the hook reads the plugin's spec dir
    bundle, log_file = hook_env.bundle_with_hook(top, None, [], script,
                                                 annotations=shapes.crio(kubelet_annotations=annotations))
    result = oci_env.run_container(bundle)
    assert result.returncode == 0, result.stderr
    assert "00 00 00" in result.stdout and "HAS-DEVICES" in result.stdout, result.stdout
    [line] = hook_env.log_lines(log_file)
    assert line["devices"] == [f"{KIND}=node0", f"{KIND}=zero"], line

    # Control: the very same annotations put on the pod by its author are refused.
    top = node.tmp_path / "pod"
    top.mkdir()
    (top / "cdi").symlink_to(node.spec_dir)
    bundle, _ = hook_env.bundle_with_hook(top, None, [], script, annotations=shapes.crio(pod_annotations=annotations))
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "refused CDI request" in result.stderr, result.stderr
    assert not (bundle / "rootfs" / "dev" / "cdi-dp0").exists()


def test_nvidia_layout_is_advertised_as_physical_units_that_never_overlap(gpus):
    # The attack: listed as 5 ids for 2 GPUs, `0` went to one pod and `GPU-...` to another.
    node, spec = gpus
    listed = node.kubelet.listing(GPU_KIND)
    allocations = allocate_one_each(node, listed)
    given: dict[int, str] = {}
    for device_id, names in allocations.items():
        for rdev in host_devices(spec, names):
            assert rdev not in given, (f"host device {os.major(rdev)}:{os.minor(rdev)} given to the containers "
                                       f"allocated {given[rdev]!r} and {device_id!r} (listed: {sorted(listed)})")
            given[rdev] = device_id
    assert listed == {"0": "Healthy", "1": "Healthy"}, node.plugin_log()
    assert allocations == {"0": ["0"], "1": ["1"]}
    assert set(given) == {os.stat(f"/dev/loop{i}").st_rdev for i in range(4)}  # both GPUs, all their nodes

    # The aliases and `all` are not ids the kubelet could hand out.
    for alias in (*GPU_UUIDS, "all"):
        with pytest.raises(grpc.RpcError) as refused:
            node.allocate([alias], resource=GPU_KIND)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, alias
        assert f"'{alias}' (not a unit: " in refused.value.details(), refused.value.details()
    log = [json.loads(line) for line in node.plugin_log().splitlines() if line.startswith("{")]
    units = {line["device"]: line.get("aliases") for line in log if line.get("resource") == GPU_KIND
             and line["event"] == "device"}
    assert units == {"0": GPU_UUIDS[0], "1": GPU_UUIDS[1]}, units
    unlisted = {line["device"]: line["why"] for line in log if line.get("resource") == GPU_KIND
                and line["event"] == "device not listed"}
    assert unlisted == {GPU_UUIDS[0]: "the same device as 0", GPU_UUIDS[1]: "the same device as 1",
                        "all": "its device nodes are those of units 0, 1"}, unlisted


def test_nvidia_layout_units_reach_runc_containers_without_sharing_a_gpu(gpus, runc):
    # Each unit the kubelet hands out, in a container of its own through the hook: no two
    # containers get one GPU node; each gets the spec-level control node (shared by design).
    node, _ = gpus
    allocations = allocate_one_each(node, node.kubelet.listing(GPU_KIND))
    script = ("for f in /dev/nvidia* /dev/dri/*; do if [ -b $f ]; then stat -c 'BLK %n %t:%T' $f; fi; done; "
              "test -c /dev/nvidiactl && stat -c 'CTL %t:%T' /dev/nvidiactl; true")
    seen: dict[str, str] = {}
    for device_id in sorted(allocations):
        annotations = dict(node.allocate([device_id], resource=GPU_KIND).container_responses[0].annotations)
        top = node.tmp_path / f"kubelet-{device_id}"
        top.mkdir()
        (top / "cdi").symlink_to(node.spec_dir)
        bundle, _ = hook_env.bundle_with_hook(top, None, [], script,
                                              annotations=shapes.crio(kubelet_annotations=annotations))
        result = oci_env.run_container(bundle)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.split("\n")
        assert "CTL 1:3" in lines, result.stdout
        numbers = [line.split()[-1] for line in lines if line.startswith("BLK ")]
        assert len(numbers) == 2, result.stdout  # one GPU: its two nodes
        for number in numbers:
            assert number not in seen, f"host device {number} in the containers of {seen[number]!r} and {device_id!r}"
            seen[number] = device_id
    assert sorted(seen) == ["7:0", "7:1", "7:2", "7:3"] and sorted(set(seen.values())) == ["0", "1"], seen


def _host(*numbers: int) -> frozenset:
    from cdi_hook.plan import HostDevice

    return frozenset(HostDevice("c", 195, n, "") for n in numbers)


@pytest.mark.parametrize("devices, units, unlisted", [
    # nvidia-ctk, one GPU: `all` is the GPU too, an alias like its UUID.
    ({"0": _host(0), "GPU-a": _host(0), "all": _host(0)}, {"0": ("GPU-a", "all")},
     {"GPU-a": "the same device as 0", "all": "the same device as 0"}),
    # Two GPUs: `all` is their union, no unit of its own.
    ({"0": _host(0, 10), "1": _host(1, 11), "all": _host(0, 1, 10, 11)}, {"0": (), "1": ()},
     {"all": "its device nodes are those of units 0, 1"}),
    # MIG-shaped: instances share their GPU's node; the smallest unit, the GPU, is listed.
    ({"0": _host(0), "0:0": _host(0, 100), "0:1": _host(0, 101)}, {"0": ()},
     {"0:0": "it shares device nodes with unit 0", "0:1": "it shares device nodes with unit 0"}),
    # MIG instances without their GPU listed: the GPU's node is every instance's, shared.
    ({"0:0": _host(0, 100), "0:1": _host(0, 101)}, {"0:0": (), "0:1": ()}, {}),
    # amd-ctk, two GPUs: /dev/kfd (here 99) is listed with each, a control device.
    ({"0": _host(1, 2, 99), "1": _host(3, 4, 99), "all": _host(1, 2, 3, 4, 99)}, {"0": (), "1": ()},
     {"all": "its device nodes are those of units 0, 1"}),
    # Overlapping without a union; a device without nodes of its own is a unit.
    ({"a": _host(1, 2), "b": _host(2, 3), "c": _host(3), "env-only": frozenset()}, {"a": (), "c": (), "env-only": ()},
     {"b": "it shares device nodes with units a, c"}),
], ids=["one-gpu", "two-gpus", "mig", "mig-instances-only", "amd-two-gpus", "overlap"])
def test_physical_units(devices, units, unlisted):
    from cdi_hook.commands.device_plugin import physical_units

    found = physical_units(devices)
    assert (found.units, found.unlisted) == (units, unlisted)
    # No host device in two units, but for the control devices every device of the kind has.
    taken = [node for unit in units for node in devices[unit] - found.shared]
    assert len(taken) == len(set(taken))
    assert all(found.shared < devices[unit] for unit in units if devices[unit]) and not found.shared & set(taken)


def test_a_new_alias_does_not_rename_a_listed_unit():
    # `GPU-a` was listed (the kubelet may have given it out); `0` appears for the same GPU.
    from cdi_hook.commands.device_plugin import physical_units

    devices = {"0": _host(0), "GPU-a": _host(0), "1": _host(1)}
    assert physical_units(devices, {"GPU-a", "1"}).units == {"1": (), "GPU-a": ("0",)}
    assert physical_units(devices).units == {"0": ("GPU-a",), "1": ()}


def test_host_devices_are_numbers_not_paths(root_only, tmp_path):
    from cdi_hook.plan import HostDevice, host_devices
    from cdi_hook.spec.model import DeviceNode

    (tmp_path / "dev").mkdir()
    os.mknod(tmp_path / "dev" / "gpu", stat.S_IFCHR | 0o600, os.makedev(195, 0))
    os.mknod(tmp_path / "dev" / "gpu-again", stat.S_IFCHR | 0o600, os.makedev(195, 0))
    gpu = HostDevice("c", 195, 0, "")
    assert host_devices([DeviceNode(path="/dev/x", host_path=str(tmp_path / "dev" / "gpu")),
                         DeviceNode(path="/dev/y", host_path=str(tmp_path / "dev" / "gpu-again"))]) == {gpu}
    # Under --host-root, as the plugin's container sees the host; numbers the spec gives win.
    assert host_devices([DeviceNode(path="/dev/gpu-again", host_path="/dev/gpu")], host_root=str(tmp_path)) == {gpu}
    assert host_devices([DeviceNode(path="/dev/u", type="u", major=195, minor=0)]) == {gpu}
    # A node that is not there cannot be completed: known by its host path.
    assert host_devices([DeviceNode(path="/dev/gone", host_path="/dev/../dev/no-such-gpu")]) == {
        HostDevice("?", 0, 0, "/dev/no-such-gpu")}


def test_the_nvidia_ctk_fixture_is_one_unit(root_only, tmp_path):
    # tests/vendor/nvidia-ctk-1.17.yaml as generated for one GPU: `0`, its UUID and `all`.
    from cdi_hook.commands.device_plugin import inventory
    from cdi_hook.registry import Registry

    text = (oci_env.REPO / "tests" / "vendor" / "nvidia-ctk-1.17.yaml").read_text()
    spec = yaml.safe_load(text.replace("__HOST__", str(tmp_path / "host")).replace("__BIN__", "/bin"))
    nodes = [node["hostPath"] for edits in [spec["containerEdits"], *(d["containerEdits"] for d in spec["devices"])]
             for node in edits["deviceNodes"]]
    for minor, host_path in enumerate(dict.fromkeys(nodes)):
        Path(host_path).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(host_path, stat.S_IFCHR | 0o600, os.makedev(195, minor))
    oci_env.write_spec(tmp_path / "cdi", "nvidia.json", spec)
    [(kind, found)] = inventory(Registry.load([str(tmp_path / "cdi")], insecure=True)).items()
    assert kind == "nvidia.com/gpu"
    assert found.units == {"0": ("Healthy", "", ("GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c", "all"))}
    assert set(found.unlisted) == {"GPU-4cf8db2d-06c0-7d70-1a51-e59b25b2c16c", "all"}


def _names(first: str, middle: str, max_middle: int) -> st.SearchStrategy[str]:
    """Valid vendor or class names ([first](?:[middle]*[alnum])?) over a few characters, so
    that near-misses (`_` against `/`, long names with one front) come up often."""
    return st.one_of(st.sampled_from(first), st.builds(
        lambda a, b, c: a + b + c, st.sampled_from(first), st.text(middle, max_size=max_middle),
        st.sampled_from("aZ1")))


KINDS = st.builds(lambda vendor, device_class: f"{vendor}/{device_class}",
                  _names("aZ", "aZ1_.-", 40), _names("aZ", "aZ1_.-", 40))


def _endpoint_and_key(kind: str) -> tuple[str, str]:
    from cdi_hook.commands.device_plugin import allocation_key, socket_name
    from cdi_hook.request import ANNOTATION_PREFIX, key_name_problem
    from cdi_hook.spec.names import kind_problem

    assert kind_problem(kind) is None, kind
    endpoint, key = socket_name(kind), allocation_key(kind)
    assert key.startswith(ANNOTATION_PREFIX) and key_name_problem(key[len(ANNOTATION_PREFIX):]) is None, key
    # In the kubelet's dir, within the 107 bytes of a unix socket path; a plain file name.
    assert len("/var/lib/kubelet/device-plugins/" + endpoint) <= 107 and "/" not in endpoint, endpoint
    assert endpoint.isascii() and endpoint.isprintable() and endpoint != "kubelet.sock"
    return endpoint, key


def test_kinds_that_differ_only_in_underscore_and_slash_get_their_own_socket_and_key():
    # Both `a.b/c_d` and `a.b_c/d` were `a.b_c_d`: one socket, one annotation key.
    assert _endpoint_and_key("a.b/c_d") != _endpoint_and_key("a.b_c/d")
    # Kinds that fit keep a readable name; the common ones keep today's.
    assert _endpoint_and_key(KIND) == (ENDPOINT, ANNOTATION)
    assert _endpoint_and_key("nvidia.com/gpu") == ("cdi-hook-nvidia.com_gpu.sock", "cdi.k8s.io/cdi-hook_nvidia.com_gpu")
    # Too long for a key: a readable front and a digest, still one per kind.
    long_a, long_b = "example.com/" + "x" * 60 + "a", "example.com/" + "x" * 60 + "b"
    (socket_a, key_a), (socket_b, key_b) = _endpoint_and_key(long_a), _endpoint_and_key(long_b)
    assert socket_a != socket_b and key_a != key_b and "example.com" in key_a


def _slash_moved(kind: str) -> set[str]:
    """The valid kinds that differ from kind by where the '/' is among its '/' and '_'s."""
    from cdi_hook.spec.names import kind_problem

    flat = kind.replace("/", "_")
    moved = {flat[:i] + "/" + flat[i + 1:] for i, char in enumerate(flat) if char == "_"}
    return {other for other in moved if kind_problem(other) is None}


@settings(max_examples=300, deadline=None)
@given(st.sets(KINDS, min_size=2, max_size=30))
def test_every_two_kinds_get_distinct_sockets_and_keys(kinds):
    kinds = set(kinds).union(*(_slash_moved(kind) for kind in kinds))
    endpoints, keys = zip(*(_endpoint_and_key(kind) for kind in kinds))
    assert len(set(endpoints)) == len(kinds) and len(set(keys)) == len(kinds), sorted(zip(kinds, keys))


def test_socket_identity_tells_a_remade_socket_from_the_old_one(tmp_path):
    import socket

    from cdi_hook.commands.device_plugin import socket_identity

    path = tmp_path / "kubelet.sock"
    identities = []
    for _ in range(2):  # the second socket often gets the first one's inode number back
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            identities.append(socket_identity(str(path)))
        path.unlink()
    assert None not in identities and identities[0] != identities[1]
    path.write_text("")
    assert socket_identity(str(path)) is None  # not a socket


def test_only_the_device_plugin_imports_grpc(tmp_path):
    # The hook runs at every container start: grpc (and protobuf) must never load there.
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text('{"root": {"path": "rootfs"}, "annotations": {"cdi.k8s.io/x": "%s=zero"}}'
                                        % KIND)
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "dp.json", {"cdiVersion": "0.6.0", "kind": KIND, "devices": [
        {"name": "zero", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-dp1", "hostPath": "/dev/zero"}]}}]})
    state = '{"id": "c", "bundle": "%s"}' % bundle  # no pid: fails after resolving the device
    result = subprocess.run([sys.executable, "-I", "-X", "importtime", "-m", "cdi_hook", "hook", "--spec-dir",
                             str(spec_dir)], input=state, capture_output=True, text=True, cwd=oci_env.REPO,
                            env={"CDI_HOOK_INSECURE_SPECS": "1", "CDI_HOOK_LOG": "/dev/null"})
    assert "pid: missing" in result.stderr, result.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "cdi_hook.registry" in imported  # the probe went past the cheap exit
    assert [name for name in imported if name.startswith(("grpc", "google", "cdi_hook.kubelet",
                                                          "cdi_hook.commands.device_plugin"))] == []


def test_health_checks_look_under_the_host_root(root_only, tmp_path):
    # In the DaemonSet the node's /dev is at /host/dev and the plugin runs with --host-root /host.
    from cdi_hook.commands.device_plugin import node_problem
    from cdi_hook.spec.model import DeviceNode

    (tmp_path / "dev").mkdir()
    os.mknod(tmp_path / "dev" / "cdi-dp0", stat.S_IFCHR | 0o600, NULL)
    node = DeviceNode(path="/dev/cdi-dp0", type="c", major=1, minor=3)
    assert node_problem(node, str(tmp_path)) is None
    assert node_problem(node._replace(minor=5), str(tmp_path)) == "host device /dev/cdi-dp0 is 1:3, the spec says 1:5"
    assert "No such file" in node_problem(node, "/")  # names the host path, not where it looked


def test_the_daemonset_runs_what_this_repository_builds():
    import yaml

    from cdi_hook.cli import build_parser

    deploy = oci_env.REPO / "deploy"
    namespace, daemonset = yaml.safe_load_all((deploy / "kubernetes" / "cdi-hook.yaml").read_text())
    assert namespace["metadata"]["name"] == daemonset["metadata"]["namespace"]
    pod = daemonset["spec"]["template"]["spec"]
    [init], [plugin] = pod["initContainers"], pod["containers"]
    for container in (init, plugin):
        context = container["securityContext"]
        assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]} and context["readOnlyRootFilesystem"] is True
    # The plugin's command line is one cdi-hook accepts, with the mounts it names.
    assert plugin["command"][:4] == ["/opt/cdi-hook/current/bin/python3", "-I", "-m", "cdi_hook"]
    args = build_parser().parse_args(plugin["command"][4:])
    mounts = {m["mountPath"]: m for m in plugin["volumeMounts"]}
    assert args.command == "device-plugin" and args.socket_dir in mounts and args.host_root + "/dev" in mounts
    assert all(d in mounts and mounts[d]["readOnly"] for d in args.spec_dir)
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert host_paths[mounts[args.socket_dir]["name"]] == "/var/lib/kubelet/device-plugins"
    # The init container runs the script build-image installs, onto the paths it writes.
    assert init["command"] == ["/bin/sh", "/bin/cdi-hook-node-install"]
    assert "deploy/node-install" in (deploy / "build-image").read_text()
    script = (deploy / "node-install").read_text()
    assert {m["mountPath"] for m in init["volumeMounts"]} == {"/host/opt/cdi-hook", "/host/hooks.d"}
    assert "/host/opt/cdi-hook" in script and "install --hooks-dir /host/hooks.d" in script
