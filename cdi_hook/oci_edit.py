"""Apply a plan to an OCI config.json, as the CDI reference library edits an OCI spec.

Two commands use this editor:
  * `cdi-hook precreate`: Podman's precreate filter (oci-hooks(5) extension stage): the
    proposed config.json on stdin, the edited one on stdout.
  * `cdi-hook inject --bundle DIR`: rewrites a bundle's config.json for manual runc use,
    either with the edits themselves (--mode edits) or with the annotation and hook
    entries that let the live hook do the work (--mode hook).

The rules follow tags.cncf.io/container-device-interface pkg/cdi (ContainerEdits.Apply,
applied once to the plan's merged edits, which is what Cache.InjectDevices does):
  env       replace the variable of the same name (its last occurrence), else append
  devices   fill type/major/minor/fileMode from the host node as the current reference's
            fillMissingInfo does (Podman 4.3 vendors an older copy that leaves fileMode out,
            so runc makes 0666; see README "Differences"); uid/gid default to
            process.user uid/gid when > 0; remove the first device with the same path,
            then replace a remaining one with that path in place, else append; one cgroup
            allow rule per b/c node (permissions "" -> "rwm", "none" -> no access)
  netDevs   linux.netDevices[hostInterfaceName] = {"name": name}
  mounts    remove the first mount with the same destination, append; then a stable sort
            of ALL mounts by the number of "/" in the cleaned destination
  hooks     appended to hooks.<hookName>
  intelRdt  replaces linux.intelRdt (the last one in the plan wins)
  gids      appended to process.user.additionalGids, skipping 0 and duplicates
Deliberate difference: newer reference versions add "idmap"/"ridmap" to bind mounts of
containers with a user namespace; runc 1.1 and Podman 4.3 (our targets) do not support
idmapped mounts, so we do not add them.

Every device the editor applied is listed in the annotation io.github.cdi-hook.applied, so
the live hook (and a second editor run) skips it: each device is applied exactly once.
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import sys
import tempfile

from cdi_hook.errors import CdiError
from cdi_hook.hostdev import complete_node
from cdi_hook.plan import Plan
from cdi_hook.request import APPLIED_ANNOTATION, annotation_value, requested_devices
from cdi_hook.spec import HOOK_STAGES as OCI_HOOK_STAGES
from cdi_hook.spec.model import DeviceNode, Hook, IntelRdt, Mount

INJECT_ANNOTATION = "cdi.k8s.io/cdi-hook"  # the key `inject --mode hook` requests devices under
NO_PERMISSIONS = "none"  # CDI: an explicit empty cgroup access


# ---------------------------------------------------------------------------- the editor


def apply_plan(config: dict, plan: Plan, *, stat_host: bool = True) -> dict:
    """A copy of config with every edit of plan applied; config itself is not changed.

    stat_host=False takes device nodes exactly as the spec gives them (for callers whose
    nodes are fully specified, and for tests); otherwise type, major and minor are completed
    from the host through hostdev.complete_node, the same function the live hook uses.
    Raises CdiError for a config.json field of the wrong type or a host node problem.
    """
    if not isinstance(config, dict):
        raise CdiError("config.json: the top level is not a JSON object")
    edited = copy.deepcopy(config)
    if not plan.devices and not plan.parts:
        return edited
    _apply_env(edited, plan)
    _apply_device_nodes(edited, plan, stat_host)
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
    variables = [v for _, v in plan.each("env")]
    if not variables:
        return
    env = _array(_object(config, "process", "process"), "env", "process.env")
    # Like the reference: an index of the existing names (the last occurrence wins), kept up
    # to date as variables are appended, so a later edit replaces an earlier edit's value.
    index = {}
    for i, existing in enumerate(env):
        if isinstance(existing, str):
            index[existing.split("=", 1)[0]] = i
    for variable in variables:
        name = variable.split("=", 1)[0]
        if name in index:
            env[index[name]] = variable
        else:
            env.append(variable)
            index[name] = len(env) - 1


def _process_id(config: dict, field: str) -> int | None:
    """process.user.uid/gid when it is > 0: the reference's default owner of a device node."""
    process = config.get("process")
    if not isinstance(process, dict) or not isinstance(process.get("user"), dict):
        return None
    value = process["user"].get(field)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def oci_device(node: DeviceNode, config: dict) -> dict:
    """The linux.devices entry for a (completed) CDI device node."""
    device = {"path": node.path, "type": node.type, "major": node.major or 0, "minor": node.minor or 0}
    if node.file_mode is not None:
        device["fileMode"] = node.file_mode
    uid = node.uid if node.uid is not None else _process_id(config, "uid")
    gid = node.gid if node.gid is not None else _process_id(config, "gid")
    if uid is not None:
        device["uid"] = uid
    if gid is not None:
        device["gid"] = gid
    return device


def cgroup_access(permissions: str) -> str:
    if permissions == "":
        return "rwm"
    if permissions == NO_PERMISSIONS:
        return ""
    return permissions


def _apply_device_nodes(config: dict, plan: Plan, stat_host: bool) -> None:
    nodes = list(plan.each("device_nodes"))
    if not nodes:
        return
    linux = _object(config, "linux", "linux")
    devices = _array(linux, "devices", "linux.devices")
    rules = None
    for origin, node in nodes:
        if stat_host:
            # The same completion the live hook uses, so both paths give the same node.
            node = complete_node(node, origin)
        device = oci_device(node, config)
        _remove_first(devices, "path", device["path"])
        _replace_or_append(devices, "path", device)
        if device["type"] in ("b", "c"):
            if rules is None:
                resources = _object(linux, "resources", "linux.resources")
                rules = _array(resources, "devices", "linux.resources.devices")
            rule = {"allow": True, "type": device["type"], "major": device["major"], "minor": device["minor"]}
            access = cgroup_access(node.permissions)
            if access:
                rule["access"] = access
            rules.append(rule)


def _remove_first(items: list, key: str, value) -> None:
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
    net_devices = list(plan.each("net_devices"))
    if not net_devices:
        return
    table = _object(_object(config, "linux", "linux"), "netDevices", "linux.netDevices")
    for _, device in net_devices:
        table[device.host_interface_name] = {"name": device.name} if device.name else {}


def oci_mount(mount: Mount) -> dict:
    entry = {"destination": mount.container_path}
    if mount.type:
        entry["type"] = mount.type
    entry["source"] = mount.host_path
    if mount.options:
        entry["options"] = list(mount.options)
    return entry


def mount_depth(destination: str) -> int:
    """The number of "/" in the destination cleaned like Go's filepath.Clean (the sort key)."""
    cleaned = posixpath.normpath(destination) if destination else "."
    if cleaned.startswith("//"):  # POSIX normpath keeps a leading "//", Go does not
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned.count("/")


def _apply_mounts(config: dict, plan: Plan) -> None:
    new_mounts = list(plan.each("mounts"))
    if not new_mounts:
        return
    mounts = _array(config, "mounts", "mounts")
    for _, mount in new_mounts:
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
    hooks = list(plan.each("hooks"))
    if not hooks:
        return
    table = _object(config, "hooks", "hooks")
    for origin, hook in hooks:
        if hook.hook_name not in OCI_HOOK_STAGES:
            raise CdiError(f"{origin}: unknown hookName {hook.hook_name!r}")
        _array(table, hook.hook_name, f"hooks.{hook.hook_name}").append(oci_hook(hook))


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
    rdt = None
    for part in plan.parts:
        if part.edits.intel_rdt is not None:
            rdt = part.edits.intel_rdt
    if rdt is not None:
        _object(config, "linux", "linux")["intelRdt"] = oci_intel_rdt(rdt)


def _apply_additional_gids(config: dict, plan: Plan) -> None:
    gids = [g for _, g in plan.each("additional_gids") if g != 0]  # the reference skips gid 0
    if not gids:
        return
    user = _object(_object(config, "process", "process"), "user", "process.user")
    existing = _array(user, "additionalGids", "process.user.additionalGids")
    for gid in gids:
        if gid not in existing:
            existing.append(gid)


# ---------------------------------------------------------------------------- annotations


def _annotations(config: dict) -> dict:
    annotations = config.get("annotations")
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise CdiError("config.json: annotations is not a JSON object")
    return annotations


def applied_devices(config: dict) -> list[str]:
    """The names the marker annotation says an editor already applied."""
    value = _annotations(config).get(APPLIED_ANNOTATION, "")
    if not isinstance(value, str):
        return []
    return [name.strip() for name in value.split(",") if name.strip()]


def mark_applied(config: dict, names) -> None:
    merged = applied_devices(config)
    merged += [name for name in names if name not in merged]
    if merged:
        _object(config, "annotations", "annotations")[APPLIED_ANNOTATION] = ",".join(merged)


def _requested(config: dict) -> list[str]:
    return requested_devices(_annotations(config))


# ---------------------------------------------------------------------------- precreate


def _parse_config(raw: bytes, where: str) -> dict:
    from cdi_hook.oci import MAX_CONFIG_SIZE, json_object

    return json_object(raw, where, MAX_CONFIG_SIZE)


def cmd_precreate(spec_dirs, stdin, stdout) -> int:
    """Podman's precreate filter: config.json on stdin, the edited config.json on stdout.

    With no device requested (or all already applied), the input goes back byte for byte.
    On error nothing is written to stdout: the CdiError reaches the CLI, which prints one
    line on stderr and exits non-zero, and Podman refuses to create the container.
    """
    raw = stdin.read()
    config = _parse_config(raw, "precreate: config.json on stdin")
    already = set(applied_devices(config))
    pending = [name for name in _requested(config) if name not in already]
    if not pending:
        stdout.write(raw)
        stdout.flush()
        return 0
    from cdi_hook import registry

    plan = registry.resolve(pending, spec_dirs)
    edited = apply_plan(config, plan)
    stdout.write(json.dumps(edited, separators=(",", ":")).encode())
    stdout.flush()
    return 0


# ---------------------------------------------------------------------------- inject


def read_bundle_config(bundle: str) -> tuple[str, bytes, dict]:
    """(path, raw bytes, parsed) of a bundle's config.json; CdiError if it is not usable."""
    path = os.path.join(bundle, "config.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CdiError(f"{path}: no such file; --bundle must name an OCI bundle directory") from None
    except OSError as error:
        raise CdiError(f"{path}: cannot read: {error.strerror}") from None
    config = _parse_config(raw, path)
    root = config.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise CdiError(f"{path}: root.path is missing; not an OCI runtime config")
    return path, raw, config


def _unique(names) -> list[str]:
    seen: list[str] = []
    for name in names:
        if name not in seen:
            seen.append(name)
    return seen


def add_hook_request(config: dict, names: list[str], spec_dirs) -> dict:
    """A copy of config that asks the live hook for names: the annotation plus hook entries."""
    from cdi_hook.install import LIVE_HOOK_STAGES, live_hook_entry

    edited = copy.deepcopy(config)
    annotations = _object(edited, "annotations", "annotations")
    current = annotations.get(INJECT_ANNOTATION, "")
    listed = [n.strip() for n in current.split(",") if n.strip()] if isinstance(current, str) else []
    annotations[INJECT_ANNOTATION] = annotation_value(_unique(listed + names))
    hooks = _object(edited, "hooks", "hooks")
    for stage in LIVE_HOOK_STAGES:
        entry = live_hook_entry(stage, sys.executable, spec_dirs)
        entries = _array(hooks, stage, f"hooks.{stage}")
        if not any(_same_hook(existing, entry) for existing in entries):
            entries.append(entry)
    return edited


def _same_hook(existing, entry: dict) -> bool:
    return isinstance(existing, dict) and existing.get("path") == entry["path"] and existing.get("args") == entry["args"]


def write_file_atomic(path: str, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace path with data all at once: a temp file in the same dir, fsync, rename.

    A reader (runc, Podman's hooks.d monitor) sees either the old file or the new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def cmd_inject(args, spec_dirs) -> int:
    """Edit a bundle's config.json so that runc gives the container the named devices.

    Everything is decided before anything is written: an invalid bundle or an unknown
    device leaves config.json as it was. The first inject keeps the pristine config as
    config.json.orig; later injects leave that backup alone, so it always holds the
    config from before cdi-hook touched it.
    """
    path, raw, config = read_bundle_config(args.bundle)
    names = _unique(args.device)
    from cdi_hook import registry

    if args.mode == "edits":
        already = set(applied_devices(config))
        pending = [name for name in names if name not in already]
        if not pending:
            print(f"{path}: already has {', '.join(names)}; nothing to do")
            return 0
        plan = registry.resolve(pending, spec_dirs)
        edited = apply_plan(config, plan)
    else:
        registry.resolve(names, spec_dirs)  # refuse unknown devices now, not at container start
        edited = add_hook_request(config, names, spec_dirs)

    st = os.stat(path)
    mode = st.st_mode & 0o7777
    backup = path + ".orig"
    try:
        if not os.path.lexists(backup):
            write_file_atomic(backup, raw, mode, (st.st_uid, st.st_gid))
        write_file_atomic(path, (json.dumps(edited, indent=2) + "\n").encode(), mode, (st.st_uid, st.st_gid))
    except OSError as error:
        raise CdiError(f"{path}: cannot write: {error.strerror}") from None
    how = "edits" if args.mode == "edits" else "live hook entries"
    print(f"{path}: injected {', '.join(names)} ({how}); original kept in {backup}")
    return 0
