"""The plan: everything the requested devices do to one container, decided once.

The single meeting point of the project. Resolving names gives a Selection (which spec
edits apply, in which order: registry.py); `build` turns it into a Plan in which nothing
is left to decide. The config.json editor (config_editor.py) and the live injector
(live/inject.py) are plain executors of a Plan: they never re-decide what a device means.

What is decided here, following the CDI reference library (pkg/cdi ContainerEdits.Apply,
applied once to the merged edits, as Cache.InjectDevices does):

  nodes        completed from the host node (hostdev.complete_node: type, major, minor,
               fileMode, by lstat); owner = the spec's uid/gid, else the container
               process's when it is > 0, else None (the runtime's default: root)
  device_rules one per b/c node (and per "u" node, as "c"), access "" -> "rwm", "none" -> ""
               (no access at all)
  mounts       a destination named again replaces the earlier mount (exact string, as the
               reference's RemoveMount); then a stable sort by depth of the cleaned
               destination, so parents are mounted before children; a destination that
               is the root itself is refused
  env          a variable named again replaces the earlier value, in its place
  hooks        grouped by stage, in plan order
  gids         additionalGids without 0 and without repeats
  intel_rdt    the last device that sets one wins (a container has one RDT group)
  net_devices  each host interface once; two devices asking for one host interface, or
               for one container-side name, are refused
  identities   what each requested device is on the host, for exclusive holds: "c 195:0" /
               "b 7:0" for its device-level nodes (spec-level ones are control devices every
               unit shares), "mount /host/path" for its device-level bind mounts; a device
               with neither is its name ("name vendor.com/class=name"). Aliases (`0`, `all`,
               `GPU-uuid` naming one host GPU) share keys, so a hold on one excludes the others

Which host devices a device's nodes are (host_devices: type, major, minor as completed
above) is decided here too: the device plugin counts devices by it, not by name.

Every item keeps its origin (the qualified device name, or "vendor/class (spec-level)"),
so every error can name the device.
"""

from __future__ import annotations

import posixpath
from collections import namedtuple

from cdi_hook.errors import CdiError
from cdi_hook.spec import HOOK_STAGES
from cdi_hook.spec.rules import NO_PERMISSIONS, is_interface_name_template, mount_destination_problem

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from cdi_hook.registry import Selection
    from cdi_hook.spec.model import DeviceNode, Mount

# Which host device a device node is, as the plan completes it: its type ("u" is "c"),
# major and minor; path "" then. A fifo (no numbers), or a node that cannot be completed
# (the plan refuses its device), is known by its host path, type "p" or "?".
HostDevice = namedtuple("HostDevice", ["type", "major", "minor", "path"])
# origin: "vendor.com/class=name" or "vendor.com/class (spec-level)". node: a completed
# DeviceNode; uid/gid: the owner to give it, None for the runtime's default (root).
PlannedNode = namedtuple("PlannedNode", ["origin", "node", "uid", "gid"])
# One device cgroup rule; access: a subset of "rwm", "" for a node the container may not open.
DeviceRule = namedtuple("DeviceRule", ["origin", "type", "major", "minor", "access"])


class Plan(namedtuple("Plan", ["devices", "nodes", "device_rules", "mounts", "env", "hooks",
                               "additional_gids", "intel_rdt", "net_devices", "shared", "identities", "shares"],
                      defaults=((), (), ()))):
    """devices: the qualified names, request order. Every other field is a tuple of
    (origin, item) pairs, or PlannedNode / DeviceRule records; hooks is a tuple of
    (stage, ((origin, Hook), ...)) in HOOK_STAGES order; intel_rdt is (origin, IntelRdt) or None.
    shared: (("node" or "mount", path, origins), ...) for a node path or mount destination
    that more than one origin names: the plan keeps it once, under the last, but it is each
    of theirs (taking one device back must leave it to the others). identities: ((device,
    (key, ...)), ...) in request order, each device's host identity (see the module's notes).
    shares: ((device, N), ...) for the requested devices N containers may hold at once (their
    spec's share count): each is held, by its identity, in one of N slots (live/holds.py)."""

    __slots__ = ()

    def identity_of(self, devices: Iterable[str]) -> list[tuple[str, tuple[str, ...]]]:
        """(device, keys) for the given devices that the plan knows, in request order."""
        wanted = set(devices)
        return [(device, keys) for device, keys in self.identities if device in wanted]

    def counted(self, exclusive: Iterable[str]) -> list[str]:
        """The requested devices that are held while a container has them: the policy's
        exclusive ones and the shareable ones (their spec's count), in request order."""
        wanted = set(exclusive) | {device for device, _ in self.shares}
        return [device for device in self.devices if device in wanted]

    def hooks_at(self, *stages: str) -> list:
        """(origin, Hook) for the given stages, in the order the stages are given."""
        by_stage = dict(self.hooks)
        return [item for stage in stages for item in by_stage.get(stage, ())]

    def is_empty(self) -> bool:
        return not (self.nodes or self.device_rules or self.mounts or self.env or self.hooks
                    or self.additional_gids or self.intel_rdt is not None or self.net_devices)


def resolve(names: Iterable[str], spec_dirs: Iterable[str] | None = None, *, process_uid: int = 0,
            process_gid: int = 0) -> Plan:
    """The Plan for requested names against the spec dirs (through the compiled cache).

    ResolveError (a CdiError) names every unknown device; CdiError names the device and the
    host node when a node cannot be completed.
    """
    from cdi_hook import cache

    return build(cache.select(names, spec_dirs), process_uid=process_uid, process_gid=process_gid)


def build(selection: Selection, *, process_uid: int = 0, process_gid: int = 0, stat_host: bool = True) -> Plan:
    """Decide everything about a registry.Selection for a container whose process runs as
    process_uid:process_gid. stat_host=False takes device nodes as the spec gives them
    (fully specified ones, in tests); otherwise they are completed from the host."""
    identities: dict[str, dict[str, None]] = {device: {} for device in selection.devices}
    nodes, rules = _nodes(selection, process_uid, process_gid, stat_host, identities)
    mounts = _mounts(selection, identities)
    return Plan(
        devices=tuple(selection.devices),
        nodes=nodes,
        device_rules=rules,
        mounts=mounts,
        env=_env(selection),
        hooks=_hooks(selection),
        additional_gids=_gids(selection),
        intel_rdt=_last(selection, "intel_rdt"),
        net_devices=_net_devices(selection),
        shared=_shared(selection, {p.node.path for p in nodes}, {m.container_path for _, m in mounts}),
        identities=tuple((device, tuple(keys) or (f"name {device}",)) for device, keys in identities.items()),
        shares=tuple(selection.shares),
    )


def _shared(selection: Selection, node_paths: set[str], destinations: set[str]) -> tuple:
    named: dict[tuple[str, str], dict[str, None]] = {}
    for origin, node in selection.each("device_nodes"):
        named.setdefault(("node", node.path), {})[origin] = None
    for origin, mount in selection.each("mounts"):
        named.setdefault(("mount", mount.container_path), {})[origin] = None
    return tuple((kind, path, tuple(origins)) for (kind, path), origins in named.items()
                 if len(origins) > 1 and path in (node_paths if kind == "node" else destinations))


def _nodes(selection: Selection, process_uid: int, process_gid: int, stat_host: bool,
           identities: dict[str, dict[str, None]]) -> tuple[tuple[PlannedNode, ...], tuple[DeviceRule, ...]]:
    from cdi_hook.hostdev import complete_node

    nodes: list[PlannedNode] = []
    rules: list[DeviceRule] = []
    for origin, node in selection.each("device_nodes"):
        if stat_host:
            node = complete_node(node, origin)
        elif not node.host_path:
            node = node._replace(host_path=node.path)
        uid = node.uid if node.uid is not None else (process_uid if process_uid > 0 else None)
        gid = node.gid if node.gid is not None else (process_gid if process_gid > 0 else None)
        # A path named again replaces the earlier node (the reference's RemoveDevice + AddDevice).
        nodes = [planned for planned in nodes if planned.node.path != node.path]
        nodes.append(PlannedNode(origin, node, uid, gid))
        if node.type in ("b", "c", "u"):
            # "u" (unbuffered) is a character device to the kernel and its device cgroup. The
            # reference writes rules for b and c only, leaving a "u" node unopenable under
            # runc's default deny; cdi-hook allows it as "c" in both paths (docs/reference/live-hook.md).
            rule_type = "c" if node.type == "u" else node.type
            rules.append(DeviceRule(origin, rule_type, node.major or 0, node.minor or 0, cgroup_access(node)))
            # every node the device names counts, also one a later device's node at the same
            # path replaced in the container: the device is still that host node
            if origin in identities:
                identities[origin][host_device_text(host_device(node))] = None
    return tuple(nodes), tuple(rules)


def host_devices(nodes: Iterable[DeviceNode], origin: str = "", host_root: str = "/") -> frozenset[HostDevice]:
    """The host devices that nodes give a container, each completed as _nodes completes it:
    what tells two devices apart, whatever their names or host paths (`0`, `GPU-<uuid>` and,
    on a one-GPU node, `all` are one device)."""
    from cdi_hook.hostdev import complete_node

    found = set()
    for node in nodes:
        try:
            node = complete_node(node, origin, host_root)
        except CdiError:
            found.add(HostDevice("?", 0, 0, posixpath.normpath(node.host_path or node.path)))
            continue
        found.add(host_device(node))
    return frozenset(found)


def host_device(node: DeviceNode) -> HostDevice:
    """The host device a completed node is: a fifo by its host path, any other by its type
    ("u", unbuffered, is a character device to the kernel) and numbers."""
    if node.type == "p":
        return HostDevice("p", 0, 0, posixpath.normpath(node.host_path))
    return HostDevice("c" if node.type == "u" else node.type, node.major or 0, node.minor or 0, "")


def host_device_text(device: HostDevice) -> str:
    """`c 226:0`, or the host path of one known by it: a hold's key, a log line's words."""
    return f"{device.type} {device.path}" if device.path else f"{device.type} {device.major}:{device.minor}"


def cgroup_access(node: DeviceNode) -> str:
    if node.permissions == "":
        return "rwm"
    if node.permissions == NO_PERMISSIONS:
        return ""
    return node.permissions


def mount_depth(destination: str) -> int:
    """The number of "/" in the destination cleaned like Go's filepath.Clean (the sort key)."""
    cleaned = posixpath.normpath(destination) if destination else "."
    if cleaned.startswith("//"):  # POSIX normpath keeps a leading "//", Go does not
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned.count("/")


def _mounts(selection: Selection, identities: dict[str, dict[str, None]]) -> tuple:
    planned: list[tuple] = []
    for origin, mount in selection.each("mounts"):
        problem = mount_destination_problem(mount.container_path)
        if problem:
            raise CdiError(f"{origin}: mount {mount.host_path} on {mount.container_path!r}: {problem}")
        if origin in identities and is_bind(mount) and mount.host_path.startswith("/"):
            identities[origin]["mount " + posixpath.normpath(mount.host_path)] = None
        for i, (_, earlier) in enumerate(planned):
            if earlier.container_path == mount.container_path:
                del planned[i]
                break
        planned.append((origin, mount))
    planned.sort(key=lambda item: mount_depth(item[1].container_path))  # stable
    return tuple(planned)


def is_bind(mount: Mount) -> bool:
    return mount.type in ("", "bind", "rbind") or bool({"bind", "rbind"} & set(mount.options))


def _env(selection: Selection) -> tuple:
    merged: dict[str, tuple[str, str]] = {}  # name -> (origin, NAME=VALUE); keeps first position
    for origin, variable in selection.each("env"):
        merged[variable.split("=", 1)[0]] = (origin, variable)
    return tuple(merged.values())


def _hooks(selection: Selection) -> tuple:
    by_stage: dict[str, list] = {}
    for origin, hook in selection.each("hooks"):
        if hook.hook_name not in HOOK_STAGES:
            raise CdiError(f"{origin}: unknown hookName {hook.hook_name!r}")
        by_stage.setdefault(hook.hook_name, []).append((origin, hook))
    return tuple((stage, tuple(by_stage[stage])) for stage in HOOK_STAGES if stage in by_stage)


def _gids(selection: Selection) -> tuple:
    seen: dict[int, str] = {}
    for origin, gid in selection.each("additional_gids"):
        if gid != 0 and gid not in seen:  # the reference skips gid 0
            seen[gid] = origin
    return tuple((origin, gid) for gid, origin in seen.items())


def _last(selection: Selection, field: str) -> tuple[str, Any] | None:
    found = None
    for part in selection.parts:
        value = getattr(part.edits, field)
        if value is not None:
            found = (part.origin, value)
    return found


def _net_devices(selection: Selection) -> tuple:
    host_names: dict[str, str] = {}
    inner_names: dict[str, str] = {}
    planned = []
    for origin, device in selection.each("net_devices"):
        host, inner = device.host_interface_name, device.name or device.host_interface_name
        if host in host_names:
            raise CdiError(f"{origin}: host interface {host!r} is also requested by {host_names[host]}")
        if inner in inner_names and not is_interface_name_template(inner):
            raise CdiError(f"{origin}: container interface name {inner!r} is also used by {inner_names[inner]}")
        host_names[host] = inner_names[inner] = origin
        planned.append((origin, device))
    return tuple(planned)
