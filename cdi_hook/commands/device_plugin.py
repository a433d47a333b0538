"""`cdi-hook device-plugin`: the kubelet's device plugin API v1beta1 for every CDI kind.

On a Kubernetes node whose runtime only runs hooks, a container gets a CDI device when the
kubelet sets a `cdi.k8s.io/` annotation on it, and the kubelet does that only for what a
device plugin's Allocate answer carries (docs/kubernetes/who-may-ask.md). This command
is that device plugin:

* One extended resource per CDI kind found in the spec dirs (`vendor.com/class`), but for
  the throwaway kind of `cdi-hook doctor --probe` (cdi_hook/probe_spec.py); its
  device IDs are physical units, not names: devices of the kind whose own device nodes
  are the same host devices (plan.host_devices: type, major, minor) are one unit, listed
  under the first name (`0`; its aliases such as `GPU-<uuid>` are logged); a device whose
  nodes another unit already has (`all`, the union of every GPU) is not listed; a device
  with no node of its own is a unit. The kubelet hands each unit to one container, so no
  device-level host node reaches two (control devices are shared: spec-level nodes, and
  a device-level node every device of the kind has, as AMD's /dev/kfd).
  Each resource has its own gRPC server on its own socket in the kubelet's device plugin
  dir (`cdi-hook-<kind id>.sock`, kind_id) and registers there with the kubelet
  (kubelet.sock, API version v1beta1).
* A shareable device (its spec's io.github.cdi-hook.shared annotation: N, as `generate
  --shared N` writes it) is N units, `<name>#0` .. `<name>#N-1` ('#' is in no CDI name):
  the kubelet hands each to one container, so at most N containers have it at once, as
  the hook's holds allow (live/holds.py); an allocation names the device once however
  many of its units a container gets.
* Every POLL seconds the spec dirs are read again and every device node is checked: kinds
  come and go with their specs, devices with their entries, and a device is Healthy while
  each of its device nodes' host paths is the node the spec names (lstat: a character,
  block or fifo node, of the spec's type and major:minor when it gives them; in a
  container, --host-root names where the host's /dev is mounted). ListAndWatch streams
  send the whole list again on any change.
* The kubelet, when it restarts, makes a new kubelet.sock (and deletes every other socket
  in the dir): a changed kubelet.sock (inode and change time) means register again; a missing or
  replaced endpoint socket means serve again on a new one first.
* Allocate answers, per container, one annotation `cdi.k8s.io/cdi-hook_<kind id>`
  naming the devices (vendor.com/class=name,...), for runtimes that only run hooks (the
  kubelet sets it on the container; CRI-O records it as the kubelet's, which cdi-hook's
  request policy honours), and the same names as CDIDevices, for runtimes with native CDI.
  One key per resource: the kubelet merges the annotations of every resource a container
  gets, and keeps the first of two equal keys.

Polling, not inotify: a few stats and spec reads every few seconds cost nothing next to
a container start, and nothing is missed when a dir is replaced or mounted over, or when
a device node appears under /dev.

Logs are JSON lines on stderr (structlog), one per change, not one per poll. SIGTERM or
SIGINT stops the servers and removes their sockets.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import sys
import threading
from collections import Counter, namedtuple
from concurrent import futures

import grpc

from cdi_hook.errors import CdiError, listed, printable
from cdi_hook.hostdev import host_node_type
from cdi_hook.kubelet import api_pb2, api_pb2_grpc
from cdi_hook.log import LEVELS, configured_level, structlog_logger
from cdi_hook.plan import host_device_text, host_devices
from cdi_hook.probe_spec import PROBE_KIND
from cdi_hook.registry import Registry
from cdi_hook.request import ANNOTATION_PREFIX, MAX_KEY_NAME_LENGTH, build_annotations, key_name_problem
from cdi_hook.spec.names import ALNUM
from cdi_hook.spec.rules import shared_count

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Container, Iterator, Sequence
    from types import FrameType
    from typing import Any, TextIO

    from cdi_hook.plan import HostDevice
    from cdi_hook.spec.model import DeviceNode

    SocketIdentity = tuple[int, int, int]  # st_dev, st_ino, st_ctime_ns

API_VERSION = "v1beta1"
UNIT_MARK = "#"  # name#3: the fourth unit of a shared device; '#' is in no CDI device name
KUBELET_SOCKET = "kubelet.sock"
HEALTHY, UNHEALTHY = "Healthy", "Unhealthy"
# The plugin part of every annotation key: cdi.k8s.io/cdi-hook_<kind id>.
PLUGIN_NAME = "cdi-hook"
# A kind too long for the key: its first characters, then this many hex digits of its
# SHA-256 (128 bits: two kinds meeting by chance is not a concern), in the 63 of a key name.
DIGEST_HEX_DIGITS = 32
READABLE_FRONT = MAX_KEY_NAME_LENGTH - len(PLUGIN_NAME + "_") - len("_0x") - DIGEST_HEX_DIGITS
# The longest path a unix socket address holds (sun_path, with its terminating NUL).
MAX_SOCKET_PATH = 107
REGISTER_TIMEOUT_SECONDS = 5
# Worker threads of one resource's gRPC server. Each open ListAndWatch stream holds one for
# as long as it lasts (one per kubelet, two for a moment across a kubelet restart); the
# rest answer Allocate and the other short calls.
SERVER_THREADS = 8
OPTIONS = api_pb2.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)


class Log:
    """JSON lines on stderr through structlog (cdi_hook.log's processors); every string
    escaped and cut (errors.printable): device names and spec errors come from spec files."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.logger = structlog_logger(stream or sys.stderr)
        self.level = configured_level()

    def _emit(self, level: str, event: str, fields: dict) -> None:
        if LEVELS[level] >= self.level:
            clean = {key: printable(value) if isinstance(value, str) else value for key, value in fields.items()}
            getattr(self.logger, level)(event, **clean)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def node_problem(node: DeviceNode, host_root: str = "/") -> str | None:
    """Why a spec's device node is not present on the host as the spec names it, or None.

    host_root: where the host's filesystem is seen ("/" on the host; "/host" in a container
    that has the host's /dev at /host/dev).
    """
    host_path = node.host_path or node.path
    try:
        st = os.lstat(os.path.join(host_root, host_path.lstrip("/")))
    except OSError as error:
        return f"host device {host_path}: {error.strerror}"
    host_type = host_node_type(st.st_mode)
    if host_type is None:
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a device node"
        return f"host path {host_path} is {kind}"
    wanted = {"u": "c"}.get(node.type, node.type)
    if wanted and wanted != host_type:
        return f"host device {host_path} is of type {host_type!r}, the spec says {node.type!r}"
    # major 0 means "not given" in CDI, as in hostdev.is_fully_specified; minor then defaults to 0.
    if node.major and host_type != "p":
        have = (os.major(st.st_rdev), os.minor(st.st_rdev))
        want = (node.major, node.minor or 0)
        if have != want:
            return f"host device {host_path} is {have[0]}:{have[1]}, the spec says {want[0]}:{want[1]}"
    return None


# One device ID of a resource: health, why it is Unhealthy ("" if not), and the names of
# the kind that are the same device (aliases: not listed, logged).
Unit = namedtuple("Unit", ["health", "why", "aliases"])
# A kind's devices as the kubelet sees them: units (ID -> Unit), the names not listed
# (name -> why: an alias, or a device whose nodes are other units'), and the device-level
# nodes every device has (control devices, as spec-level ones: given with every unit).
Inventory = namedtuple("Inventory", ["units", "unlisted", "shared"])
PhysicalUnits = namedtuple("PhysicalUnits", ["units", "unlisted", "shared"])


def physical_units(devices: dict[str, frozenset[HostDevice]], listed_before: Container[str] = ()) -> PhysicalUnits:
    """Which of a kind's devices (name -> the host devices of its own nodes) are units the
    kubelet may hand out, no host device in two: units (unit -> its aliases), unlisted
    (name -> why not a unit) and shared (the control devices every unit has).

    Names with the same host devices are one unit, under the name it was listed as before
    (listed_before: a new alias never renames a unit the kubelet may have handed out), else
    the first by name. A host device that
    every device of the kind has, beside nodes of its own (AMD's generator lists /dev/kfd
    with each GPU), is a control device like a spec-level one: shared, not counted. Then
    the units, the smallest first: one that has a host device an earlier unit has is not
    listed (`all`, or a device that overlaps another; a MIG instance shares its GPU's node,
    so the GPU is the unit), so every listed unit's other host devices are its own. A
    device with no node of its own shares nothing: a unit.
    """
    units: dict[str, tuple[str, ...]] = {}
    unlisted: dict[str, str] = {}
    same: dict[frozenset[HostDevice], list[str]] = {}
    for name in sorted(devices, key=lambda name: (name not in listed_before, name)):
        if devices[name]:
            same.setdefault(devices[name], []).append(name)
        else:
            units[name] = ()
    shared = frozenset.intersection(*same) if len(same) > 1 else frozenset()
    if shared in same:
        shared = frozenset()  # a device that is only those nodes: they are its own, not control devices
    owner: dict[HostDevice, str] = {}  # host device -> the unit that has it
    for nodes, (unit, *aliases) in sorted(((nodes - shared, names) for nodes, names in same.items()),
                                          key=lambda item: (len(item[0]), item[1][0])):
        others = sorted({owner[node] for node in nodes if node in owner})
        if others:
            union = len(others) > 1 and set(nodes) == {node for node, holder in owner.items() if holder in others}
            why = (f"its device nodes are those of units {listed(others)}" if union else
                   f"it shares device nodes with unit{'s' if len(others) > 1 else ''} {listed(others)}")
            unlisted.update(dict.fromkeys((unit, *aliases), why))
            continue
        units[unit] = tuple(aliases)
        unlisted.update((alias, f"the same device as {unit}") for alias in aliases)
        owner.update(dict.fromkeys(nodes, unit))
    return PhysicalUnits(dict(sorted(units.items())), unlisted, shared)


def inventory(registry: Registry, host_root: str = "/",
              listed_before: dict[str, Container[str]] | None = None) -> dict[str, Inventory]:
    """kind -> its units and the names not listed, for every resolvable device
    (listed_before: kind -> the units listed until now, which keep their names).

    A unit's health is its device's: Healthy while each of its nodes is on the host as the
    spec says, its spec's spec-level nodes (every device of the spec gets them) and its own.
    """
    health: dict[str, dict[str, tuple[str, str]]] = {}
    own_nodes: dict[str, dict[str, frozenset[HostDevice]]] = {}
    shares: dict[str, dict[str, int]] = {}
    for qualified, (spec, device) in registry.devices.items():
        if spec.kind == PROBE_KIND:
            continue  # doctor's throwaway device: never a pod's
        count = shared_count(device.annotations)
        if count is not None and count > 1:
            shares.setdefault(spec.kind, {})[device.name] = count
        nodes = spec.container_edits.device_nodes + device.container_edits.device_nodes
        problems = [problem for problem in (node_problem(node, host_root) for node in nodes) if problem]
        health.setdefault(spec.kind, {})[device.name] = (UNHEALTHY, "; ".join(problems)) if problems else (HEALTHY, "")
        own_nodes.setdefault(spec.kind, {})[device.name] = host_devices(device.container_edits.device_nodes,
                                                                        qualified, host_root)
    kinds = {}
    for kind, devices in own_nodes.items():
        found = physical_units(devices, (listed_before or {}).get(kind, ()))
        counts = shares.get(kind, {})
        units = {unit_id: Unit(*health[kind][name], aliases) for name, aliases in found.units.items()
                 for unit_id in unit_ids(name, counts.get(name, 1))}
        kinds[kind] = Inventory(units, found.unlisted, found.shared)
    return kinds


def unit_ids(name: str, count: int) -> list[str]:
    """The device ids of a device N containers may share: name#0 .. name#N-1 (its name alone
    when it is not shared)."""
    return [name] if count <= 1 else [f"{name}{UNIT_MARK}{i}" for i in range(count)]


def device_of(unit_id: str) -> str:
    """The device name of a unit id (name#3 -> name)."""
    return unit_id.partition(UNIT_MARK)[0]


def socket_identity(path: str) -> SocketIdentity | None:
    """Which unix socket is at path (None: none): a socket removed and made again is another.

    The inode number alone does not tell: a filesystem hands a freed inode number to the
    next file made (ext4 does, at once), so the change time, nanoseconds, is part of it.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None


def listening(path: str) -> bool:
    """Whether a process accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def kind_id(kind: str) -> str:
    """The kind in its socket name and annotation key: one per kind, no two kinds alike.

    Every '_' doubled, then '/' as one '_' (`a.b/c_d` is `a.b_c__d`, `a.b_c/d` is `a.b__c_d`).
    A vendor ends with a letter or digit and a class starts with a letter, so the '/' is
    the one run of '_' of odd length, and it has a letter after it: the kind reads back.
    A kind whose key would pass 63 characters is `<front>_0x<digest>`: its first characters
    (without '_' or '/'), then 32 hex digits of SHA-256; a '_' followed by a digit is no
    '/', so such an id is never another kind's full one.
    """
    escaped = kind.replace("_", "__").replace("/", "_")
    if key_name_problem(f"{PLUGIN_NAME}_{escaped}") is None:
        return escaped
    front = "".join(char if char in ALNUM or char in ".-" else "-" for char in kind[:READABLE_FRONT])
    digest = hashlib.sha256(kind.encode()).hexdigest()[:DIGEST_HEX_DIGITS]
    return f"{front.rstrip('.-')}_0x{digest}"


def socket_name(kind: str) -> str:
    """The kind's endpoint socket, a file name in the kubelet's device plugin dir."""
    return f"{PLUGIN_NAME}-{kind_id(kind)}.sock"


def allocation_key(kind: str) -> str:
    """The annotation key of the kind's allocations: cdi.k8s.io/cdi-hook_<kind id>."""
    return f"{ANNOTATION_PREFIX}{PLUGIN_NAME}_{kind_id(kind)}"


def unknown_id(device_id: str, unlisted: dict[str, str]) -> str:
    """A refused device id for a message: quoted, with why it is no unit when it is a name of the kind."""
    why = unlisted.get(device_id)
    return repr(printable(device_id, 100)) + (f" (not a unit: {why})" if why else "")


def preferred(request: Any) -> list[str]:
    """The must-include devices, then the first available ones, up to allocation_size."""
    chosen = list(dict.fromkeys(request.must_include_deviceIDs))
    for device_id in request.available_deviceIDs:
        if len(chosen) >= request.allocation_size:
            break
        if device_id not in chosen:
            chosen.append(device_id)
    return chosen


class Resource(api_pb2_grpc.DevicePluginServicer):
    """One CDI kind as one extended resource: its devices, its gRPC server and socket."""

    def __init__(self, kind: str, socket_dir: str, log: Log):
        self.kind = kind
        self.log = log
        self.endpoint = socket_name(kind)
        self.path = os.path.join(socket_dir, self.endpoint)
        self.annotation_id = kind_id(kind)
        self.devices: dict[str, str] = {}  # unit -> health
        self.units: dict[str, Unit] = {}  # the last poll's, for its log lines
        self.unlisted: dict[str, str] = {}  # name -> why it is not a unit
        self.shared: frozenset[HostDevice] = frozenset()
        self.changed = threading.Condition()
        self.version = 0  # bumped on every change of self.devices; streams send when it moves
        self.server: grpc.Server | None = None
        self.serving: SocketIdentity | None = None  # socket_identity of the socket self.server listens on
        self.registered_with: SocketIdentity | None = None  # socket_identity of the kubelet.sock we registered with
        self.last_problem = ""  # the last serve/register error logged, so a retry logs nothing new
        self.stopping = False  # set by stop(): ends this server's ListAndWatch streams

    # -- state, from the poll loop ------------------------------------------------------

    def update(self, inventory: Inventory) -> None:
        """Take the poll's units and unlisted names; streams are woken only when a unit
        comes, goes or changes health (a different reason to be Unhealthy is no news)."""
        for name, why in sorted(inventory.unlisted.items()):
            if self.unlisted.get(name) != why:
                self.log.info("device not listed", resource=self.kind, device=name, why=why)
        self.unlisted = inventory.unlisted
        if inventory.shared != self.shared and inventory.shared:
            self.log.info("device nodes every unit has", resource=self.kind,
                          nodes=listed(sorted(map(host_device_text, inventory.shared))))
        self.shared = inventory.shared
        health = {name: unit.health for name, unit in inventory.units.items()}
        shared_units = Counter(device_of(name) for name in inventory.units if UNIT_MARK in name)
        for name, unit in sorted(inventory.units.items()):
            device, mark, number = name.partition(UNIT_MARK)
            if mark and number != "0":
                continue  # a shared device's units come, go and change health together: one line
            before = self.units.get(name)
            if before is None or (before.health, before.aliases) != (unit.health, unit.aliases):
                fields = {"resource": self.kind, "device": device, "health": unit.health}
                if mark:
                    fields["units"] = shared_units[device]
                if unit.why:
                    fields["why"] = unit.why
                if unit.aliases:
                    fields["aliases"] = listed(unit.aliases)
                (self.log.warning if unit.health == UNHEALTHY else self.log.info)("device", **fields)
        self.units = inventory.units
        if health == self.devices:
            return
        gone = sorted(set(self.devices) - set(health))
        if gone:
            self.log.info("devices removed", resource=self.kind, devices=listed(gone))
        with self.changed:
            self.devices = health
            self.version += 1
            self.changed.notify_all()

    def ensure_serving(self) -> bool:
        """Serve on self.path unless already serving on the socket that is there now; True
        when serving. The kubelet deletes every socket in its dir when it starts."""
        if self.server is not None and self.serving == socket_identity(self.path):
            return True
        if self.server is not None:
            self.log.info("endpoint socket gone, serving again", resource=self.kind, socket=self.path)
            self.stop()
        self.registered_with = None
        if not os.path.isdir(os.path.dirname(self.path)):
            # Checked here, not left to the bind: gRPC's core would log its own line every poll.
            self.problem(f"socket dir {os.path.dirname(self.path)} does not exist (is the kubelet running?)")
            return False
        if len(self.path) > MAX_SOCKET_PATH:
            self.problem(f"socket path {self.path} is longer than {MAX_SOCKET_PATH} bytes")
            return False
        if os.path.lexists(self.path):
            if socket_identity(self.path) is None:
                self.problem(f"{self.path} exists and is not a socket; not replacing it")
                return False
            if listening(self.path):
                # Another instance (a DaemonSet pod being replaced): taking its socket over
                # would make it take ours back at its next poll. It removes it when it stops.
                self.problem(f"another process serves on {self.path}; waiting for it to stop")
                return False
            os.unlink(self.path)  # left by a run that ended without removing it
        with self.changed:
            self.stopping = False
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS,
                                                        thread_name_prefix="cdi-hook-" + self.kind))
        api_pb2_grpc.add_DevicePluginServicer_to_server(self, server)
        try:
            port = server.add_insecure_port("unix://" + self.path)
        except RuntimeError as error:
            port, reason = 0, str(error)
        else:
            reason = "gRPC could not bind it"
        if not port:
            server.stop(None)
            self.problem(f"cannot listen on {self.path}: {reason}")
            return False
        server.start()
        self.server, self.serving = server, socket_identity(self.path)
        self.last_problem = ""
        self.log.info("serving", resource=self.kind, socket=self.path, devices=len(self.devices))
        return True

    def register(self, kubelet_path: str, kubelet_identity: SocketIdentity) -> None:
        """Register with the kubelet at kubelet_path unless already registered with this one."""
        if self.registered_with == kubelet_identity:
            return
        request = api_pb2.RegisterRequest(version=API_VERSION, endpoint=self.endpoint, resource_name=self.kind,
                                          options=OPTIONS)
        try:
            with grpc.insecure_channel("unix://" + kubelet_path) as channel:
                api_pb2_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            self.problem(f"registering with the kubelet at {kubelet_path} failed: "
                         f"{error.code().name}: {error.details()}")
            return
        self.registered_with = kubelet_identity
        self.last_problem = ""
        self.log.info("registered", resource=self.kind, kubelet=kubelet_path, endpoint=self.endpoint,
                      version=API_VERSION)

    def problem(self, message: str) -> None:
        """Log an error once, until it changes or the step succeeds (the poll retries it)."""
        if message != self.last_problem:
            self.log.error("resource problem", resource=self.kind, error=message)
            self.last_problem = message

    def stop(self) -> None:
        """Stop serving: end the streams, stop the server, remove our socket (only ours)."""
        with self.changed:
            self.stopping = True
            self.changed.notify_all()
        if self.server is not None:
            self.server.stop(grace=1).wait()
            if self.serving is not None and socket_identity(self.path) == self.serving:
                os.unlink(self.path)
        self.server = self.serving = self.registered_with = None

    # -- the DevicePlugin service, from gRPC's threads ----------------------------------

    def GetDevicePluginOptions(self, request: Any, context: grpc.ServicerContext) -> Any:
        return OPTIONS

    def ListAndWatch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        sent = None
        while True:
            with self.changed:
                # Woken by every change and by stop(); the timeout notices a kubelet that left.
                while self.version == sent and not self.stopping and context.is_active():
                    self.changed.wait(timeout=1.0)
                if self.stopping or not context.is_active():
                    return
                sent = self.version
                devices = [api_pb2.Device(ID=name, health=health) for name, health in sorted(self.devices.items())]
            yield api_pb2.ListAndWatchResponse(devices=devices)

    def GetPreferredAllocation(self, request: Any, context: grpc.ServicerContext) -> Any:
        return api_pb2.PreferredAllocationResponse(container_responses=[
            api_pb2.ContainerPreferredAllocationResponse(deviceIDs=preferred(r)) for r in request.container_requests])

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.changed:
            known, unlisted = dict(self.devices), self.unlisted
        responses = []
        for container in request.container_requests:
            ids = list(dict.fromkeys(container.devices_ids))
            unknown = [device_id for device_id in ids if device_id not in known]
            if unknown:
                message = (f"resource {self.kind}: unknown device id{'s' if len(unknown) > 1 else ''} "
                           f"{listed(unknown_id(i, unlisted) for i in unknown)} (the devices of {self.kind} are: "
                           f"{listed(sorted(known)) or 'none'})")
                self.log.warning("allocate refused", resource=self.kind, error=message)
                context.abort(grpc.StatusCode.NOT_FOUND, message)
            if not ids:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resource {self.kind}: a container request with no "
                                                                 "device ids")
            names = list(dict.fromkeys(f"{self.kind}={device_of(device_id)}" for device_id in ids))
            try:
                annotations = build_annotations(PLUGIN_NAME, self.annotation_id, names)
            except CdiError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"resource {self.kind}: {error}")
            responses.append(api_pb2.ContainerAllocateResponse(
                annotations=annotations, cdi_devices=[api_pb2.CDIDevice(name=name) for name in names]))
            self.log.info("allocated", resource=self.kind, devices=listed(names), annotations=annotations)
        return api_pb2.AllocateResponse(container_responses=responses)

    def PreStartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return api_pb2.PreStartContainerResponse()  # pre_start_required is false: nothing to do


class Plugin:
    """Every resource, kept in step with the spec dirs and the kubelet by poll()."""

    def __init__(self, socket_dir: str, spec_dirs: Sequence[str] | None, log: Log, host_root: str = "/"):
        self.socket_dir = socket_dir
        self.host_root = host_root
        self.kubelet_path = os.path.join(socket_dir, KUBELET_SOCKET)
        self.spec_dirs = spec_dirs
        self.log = log
        self.resources: dict[str, Resource] = {}
        self.spec_errors: list[str] = []
        self.kubelet_identity: SocketIdentity | str | None = "not looked at yet"  # then socket_identity(kubelet.sock)

    def poll(self) -> None:
        registry = Registry.load(self.spec_dirs)
        errors = registry.all_errors()
        if errors != self.spec_errors:
            for line in errors:
                self.log.error("spec error", error=line)
            self.spec_errors = errors
        kinds = inventory(registry, self.host_root, {kind: resource.units for kind, resource in self.resources.items()})
        for kind in sorted(set(self.resources) - set(kinds)):
            self.log.info("resource removed", resource=kind)
            self.resources.pop(kind).stop()
        for kind, devices in sorted(kinds.items()):
            resource = self.resources.get(kind)
            if resource is None:
                resource = self.resources[kind] = Resource(kind, self.socket_dir, self.log)
                self.log.info("resource found", resource=kind, devices=len(devices.units))
            resource.update(devices)
        identity = socket_identity(self.kubelet_path)
        if identity != self.kubelet_identity:
            state = "missing" if identity is None else "new" if isinstance(self.kubelet_identity, tuple) else "found"
            self.log.info("kubelet socket", path=self.kubelet_path, state=state)
            self.kubelet_identity = identity
        for resource in self.resources.values():
            if resource.ensure_serving() and identity is not None:
                resource.register(self.kubelet_path, identity)

    def close(self) -> None:
        for resource in self.resources.values():
            resource.stop()
        self.resources.clear()


def cmd_device_plugin(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    if not 0 < args.poll_interval <= 3600:
        raise CdiError(f"--poll-interval {args.poll_interval}: must be more than 0 and at most 3600 seconds")
    log = Log()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    plugin = Plugin(args.socket_dir, spec_dirs, log, args.host_root)
    log.info("device plugin started", socket_dir=args.socket_dir, host_root=args.host_root, api_version=API_VERSION,
             spec_dirs=",".join(spec_dirs) if spec_dirs else "default", poll_seconds=args.poll_interval)
    try:
        while not stop.is_set():
            try:
                plugin.poll()
            except Exception as error:  # a long-running daemon: log, retry at the next poll
                log.error("poll failed", error=f"{type(error).__name__}: {error}")
            stop.wait(args.poll_interval)
    finally:
        plugin.close()
        log.info("device plugin stopped")
    return 0
