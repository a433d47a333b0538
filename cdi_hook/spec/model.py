"""The CDI spec as Python data, field for field (CDI 0.3.0 .. 1.1.0).

Attribute names are the snake_case of the JSON field names; `None` means the field was
absent, which the spec often distinguishes from zero (major, fileMode, uid, gid, timeout).
Objects are frozen so a parsed spec can be shared by the registry, the plan and caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceNode:
    path: str
    host_path: str | None = None
    type: str = ""  # b, c, u, p or "" (take it from the host node)
    major: int | None = None
    minor: int | None = None
    file_mode: int | None = None
    permissions: str = ""  # subset of "rwm"; "" means rwm for the cgroup rule
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ()
    type: str = ""


@dataclass(frozen=True)
class Hook:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class IntelRdt:
    clos_id: str = ""
    l3_cache_schema: str = ""
    mem_bw_schema: str = ""
    schemata: tuple[str, ...] = ()
    enable_monitoring: bool = False


@dataclass(frozen=True)
class NetDevice:
    host_interface_name: str
    name: str


@dataclass(frozen=True)
class ContainerEdits:
    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    additional_gids: tuple[int, ...] = ()
    intel_rdt: IntelRdt | None = None
    net_devices: tuple[NetDevice, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.env
            or self.device_nodes
            or self.mounts
            or self.hooks
            or self.additional_gids
            or self.intel_rdt is not None
            or self.net_devices
        )


@dataclass(frozen=True)
class Device:
    name: str
    container_edits: ContainerEdits
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Spec:
    cdi_version: str
    kind: str  # vendor/class
    devices: tuple[Device, ...]
    container_edits: ContainerEdits = field(default_factory=ContainerEdits)
    annotations: tuple[tuple[str, str], ...] = ()
    path: str = ""  # the file it came from, for messages

    @property
    def vendor(self) -> str:
        return self.kind.split("/", 1)[0]

    @property
    def device_class(self) -> str:
        return self.kind.split("/", 1)[1]

    def qualified_name(self, device: Device) -> str:
        return f"{self.kind}={device.name}"
