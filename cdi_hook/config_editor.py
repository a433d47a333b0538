"""Write a Plan into an OCI config.json, as the CDI reference library edits an OCI spec.

An executor: every decision (host completion, owners, cgroup access, which mount wins a
destination, env replacement, the RDT winner, gids) was made in plan.py. What is left here
is how each planned item meets what config.json already holds, the reference's own rules
(pkg/cdi ContainerEdits.Apply with runtime-tools' generator):

  env       a planned variable replaces the config's variable of the same name (its last
            occurrence), else it is appended
  devices   remove the first linux.devices entry with the same path, then replace a
            remaining one with that path in place, else append; one
            linux.resources.devices allow rule per planned rule (no "access" for none)
  netDevs   linux.netDevices[hostInterfaceName] = {"name": name}
  mounts    remove the first mount with the same destination, append; then a stable sort
            of ALL mounts by the depth of the cleaned destination (plan.mount_depth)
  hooks     appended to hooks.<stage>
  intelRdt  replaces linux.intelRdt
  gids      appended to process.user.additionalGids unless already there
Deliberate difference: newer reference versions add "idmap"/"ridmap" to bind mounts of
containers with a user namespace; runc 1.1 and Podman 4.3 (our targets) do not support
idmapped mounts (runc >= 1.2 does), so they are not added.

Every device applied is listed in the annotation io.github.cdi-hook.applied, so the live
hook (and a second editor run) skips it: each device is applied exactly once.
"""

from __future__ import annotations

import copy

from cdi_hook.errors import CdiError
from cdi_hook.plan import Plan, mount_depth
from cdi_hook.request import APPLIED_ANNOTATION, applied_devices

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable

    from cdi_hook.plan import PlannedNode
    from cdi_hook.spec.model import Hook, IntelRdt, Mount


def process_ids(config: dict) -> tuple[int, int]:
    """process.user uid and gid of a config.json (0 when absent), for plan.build."""
    process = config.get("process")
    user = process.get("user") if isinstance(process, dict) else None
    if not isinstance(user, dict):
        return 0, 0
    ids = [user.get(field) for field in ("uid", "gid")]
    uid, gid = (v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0 for v in ids)
    return uid, gid


def apply_plan(config: dict, plan: Plan) -> dict:
    """A copy of config with every item of the plan written in; config itself is unchanged.

    Raises CdiError for a config.json field of the wrong type.
    """
    if not isinstance(config, dict):
        raise CdiError("config.json: the top level is not a JSON object")
    edited = copy.deepcopy(config)
    if not plan.devices and plan.is_empty():
        return edited
    _apply_env(edited, plan)
    _apply_device_nodes(edited, plan)
    _apply_net_devices(edited, plan)
    _apply_mounts(edited, plan)
    _apply_hooks(edited, plan)
    _apply_intel_rdt(edited, plan)
    _apply_additional_gids(edited, plan)
    mark_applied(edited, plan.devices)
    return edited


def _object(parent: dict, key: str, where: str) -> dict:
    """parent[key] as a JSON object, created when absent (or null)."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    if not isinstance(value, dict):
        raise CdiError(f"config.json: {where} is not a JSON object")
    return value


def _array(parent: dict, key: str, where: str) -> list:
    """parent[key] as a JSON array, created when absent (or null)."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = []
    if not isinstance(value, list):
        raise CdiError(f"config.json: {where} is not a JSON array")
    return value


def _apply_env(config: dict, plan: Plan) -> None:
    if not plan.env:
        return
    env = _array(_object(config, "process", "process"), "env", "process.env")
    index = {}  # name -> position of its last occurrence, as the reference indexes it
    for i, existing in enumerate(env):
        if isinstance(existing, str):
            index[existing.split("=", 1)[0]] = i
    for _, variable in plan.env:
        name = variable.split("=", 1)[0]
        if name in index:
            env[index[name]] = variable
        else:
            env.append(variable)
            index[name] = len(env) - 1


def oci_device(planned: PlannedNode) -> dict:
    """The linux.devices entry for a plan.PlannedNode."""
    node = planned.node
    device = {"path": node.path, "type": node.type, "major": node.major or 0, "minor": node.minor or 0}
    if node.file_mode is not None:
        device["fileMode"] = node.file_mode
    if planned.uid is not None:
        device["uid"] = planned.uid
    if planned.gid is not None:
        device["gid"] = planned.gid
    return device


def _apply_device_nodes(config: dict, plan: Plan) -> None:
    if not plan.nodes and not plan.device_rules:
        return
    linux = _object(config, "linux", "linux")
    devices = _array(linux, "devices", "linux.devices")
    for planned in plan.nodes:
        device = oci_device(planned)
        _remove_first(devices, "path", device["path"])
        _replace_or_append(devices, "path", device)
    if plan.device_rules:
        rules = _array(_object(linux, "resources", "linux.resources"), "devices", "linux.resources.devices")
        for rule in plan.device_rules:
            entry = {"allow": True, "type": rule.type, "major": rule.major, "minor": rule.minor}
            if rule.access:
                entry["access"] = rule.access
            rules.append(entry)


def _remove_first(items: list, key: str, value: object) -> None:
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get(key) == value:
            del items[i]
            return


def _replace_or_append(items: list, key: str, new: dict) -> None:
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get(key) == new[key]:
            items[i] = new
            return
    items.append(new)


def _apply_net_devices(config: dict, plan: Plan) -> None:
    if not plan.net_devices:
        return
    table = _object(_object(config, "linux", "linux"), "netDevices", "linux.netDevices")
    for _, device in plan.net_devices:
        table[device.host_interface_name] = {"name": device.name} if device.name else {}


def oci_mount(mount: Mount) -> dict:
    entry = {"destination": mount.container_path}
    if mount.type:
        entry["type"] = mount.type
    entry["source"] = mount.host_path
    if mount.options:
        entry["options"] = list(mount.options)
    return entry


def _apply_mounts(config: dict, plan: Plan) -> None:
    if not plan.mounts:
        return
    mounts = _array(config, "mounts", "mounts")
    for _, mount in plan.mounts:
        _remove_first(mounts, "destination", mount.container_path)
        mounts.append(oci_mount(mount))
    # Stable: mounts of equal depth keep their relative order, existing ones included.
    mounts.sort(key=lambda m: mount_depth(m.get("destination", "") if isinstance(m, dict) else ""))


def oci_hook(hook: Hook) -> dict:
    entry = {"path": hook.path}
    if hook.args:
        entry["args"] = list(hook.args)
    if hook.env:
        entry["env"] = list(hook.env)
    if hook.timeout is not None:
        entry["timeout"] = hook.timeout
    return entry


def _apply_hooks(config: dict, plan: Plan) -> None:
    if not plan.hooks:
        return
    table = _object(config, "hooks", "hooks")
    for stage, hooks in plan.hooks:
        entries = _array(table, stage, f"hooks.{stage}")
        entries.extend(oci_hook(hook) for _, hook in hooks)


def oci_intel_rdt(rdt: IntelRdt) -> dict:
    entry: dict = {}
    if rdt.clos_id:
        entry["closID"] = rdt.clos_id
    if rdt.l3_cache_schema:
        entry["l3CacheSchema"] = rdt.l3_cache_schema
    if rdt.mem_bw_schema:
        entry["memBwSchema"] = rdt.mem_bw_schema
    if rdt.schemata:
        entry["schemata"] = list(rdt.schemata)
    if rdt.enable_monitoring:
        entry["enableMonitoring"] = True
    return entry


def _apply_intel_rdt(config: dict, plan: Plan) -> None:
    if plan.intel_rdt is not None:
        _object(config, "linux", "linux")["intelRdt"] = oci_intel_rdt(plan.intel_rdt[1])


def _apply_additional_gids(config: dict, plan: Plan) -> None:
    if not plan.additional_gids:
        return
    user = _object(_object(config, "process", "process"), "user", "process.user")
    existing = _array(user, "additionalGids", "process.user.additionalGids")
    for _, gid in plan.additional_gids:
        if gid not in existing:
            existing.append(gid)


def annotations_of(config: dict) -> dict:
    annotations = config.get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise CdiError("config.json: annotations is not a JSON object")
    return annotations


def mark_applied(config: dict, names: Iterable[str]) -> None:
    merged = applied_devices(annotations_of(config))
    merged += [name for name in names if name not in merged]
    if merged:
        _object(config, "annotations", "annotations")[APPLIED_ANNOTATION] = ",".join(merged)
