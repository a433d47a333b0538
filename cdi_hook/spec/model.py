"""The CDI spec as Python data, field for field (CDI 0.3.0 .. 1.1.0).

Attribute names are the snake_case of the JSON field names; `None` means the field was
absent, which the spec often distinguishes from zero (major, fileMode, uid, gid, timeout).
Objects are immutable so a parsed spec can be shared by the registry, the plan and caches.

Records are namedtuples, not dataclasses: every container start imports this module, and
dataclasses (with inspect, ast, dis, tokenize) plus building the classes cost ~10 ms there.
Being tuples, they compare equal to plain tuples of the same values; nothing here relies on
that (and truthiness is always true: every record has fields). Copy with `_replace(...)`.
"""

from __future__ import annotations

from collections import namedtuple

DeviceNode = namedtuple(
    "DeviceNode",
    # type: b, c, u, p or "" (take it from the host node); permissions: subset of "rwm", "" means rwm
    ["path", "host_path", "type", "major", "minor", "file_mode", "permissions", "uid", "gid"],
    defaults=(None, "", None, None, None, "", None, None),
)

Mount = namedtuple("Mount", ["host_path", "container_path", "options", "type"], defaults=((), ""))

Hook = namedtuple("Hook", ["hook_name", "path", "args", "env", "timeout"], defaults=((), (), None))

IntelRdt = namedtuple(
    "IntelRdt",
    ["clos_id", "l3_cache_schema", "mem_bw_schema", "schemata", "enable_monitoring"],
    defaults=("", "", "", (), False),
)

NetDevice = namedtuple("NetDevice", ["host_interface_name", "name"])


class ContainerEdits(namedtuple(
    "ContainerEdits",
    ["env", "device_nodes", "mounts", "hooks", "additional_gids", "intel_rdt", "net_devices"],
    defaults=((), (), (), (), (), None, ()),
)):
    """Tuples of strings (env), DeviceNode, Mount, Hook, ints (additional_gids), NetDevice;
    intel_rdt an IntelRdt or None."""

    __slots__ = ()

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


# annotations: tuple of (key, value) pairs
Device = namedtuple("Device", ["name", "container_edits", "annotations"], defaults=((),))


class Spec(namedtuple(
    "Spec",
    ["cdi_version", "kind", "devices", "container_edits", "annotations", "path"],
    defaults=(ContainerEdits(), (), ""),
)):
    """kind is vendor/class; devices a tuple of Device; path the file it came from, for messages."""

    __slots__ = ()

    @property
    def vendor(self) -> str:
        return self.kind.split("/", 1)[0]

    @property
    def device_class(self) -> str:
        return self.kind.split("/", 1)[1]

    def qualified_name(self, device: Device) -> str:
        return f"{self.kind}={device.name}"
