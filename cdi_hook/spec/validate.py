"""The CDI rules (0.3.0 .. 1.1.0) on a parsed Spec: names, edits, and the version table.

validate_spec returns every problem it finds, not just the first, so one `cdi-hook
validate` run shows a vendor everything to fix. Each problem is a SpecError naming the
file and the field path (devices[2].containerEdits.deviceNodes[0].permissions).
"""

from __future__ import annotations

import re

from cdi_hook.errors import SpecError
from cdi_hook.spec import HOOK_STAGES as HOOK_NAMES
from cdi_hook.spec import version as versions
from cdi_hook.spec.model import ContainerEdits, Spec
from cdi_hook.spec.names import device_name_problem, kind_problem, quote
from cdi_hook.spec.rules import (
    interface_name_problem,
    is_interface_name_template,
    SHARED_ANNOTATION,
    mount_destination_problem,
    permissions_problem,
    shared_count_problem,
)

NODE_TYPES = ("b", "c", "u", "p")
_HOOK_NAME_SET = frozenset(HOOK_NAMES)
_NODE_TYPE_SET = frozenset(NODE_TYPES) | {""}
# closID "/" is the root CLOS (runtime-spec #1289, reference library v1.1.0): the
# container joins the resctrl root group, which always exists. No version rule either:
# it needs only what intelRdt needs (0.7.0).
ROOT_CLOS_ID = "/"

# Annotation keys as Kubernetes (and the reference library) accept them: [prefix/]name.
_ANNOTATION_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")
MAX_ANNOTATIONS_SIZE = 256 * 1024

NAME_MAX = 255  # one path component, for the resctrl group directory named by closID


def clos_id_problem(clos_id: str) -> str | None:
    """Why closID cannot name a resctrl group: the CDI rule (a valid Linux file name, or "/"
    for the root CLOS) made strict.

    The live hook creates the directory <resctrl>/<closID>, so anything but "/" must be
    exactly one path component: no '/', newline or NUL, not '.' or '..', at most NAME_MAX bytes.
    """
    if clos_id == ROOT_CLOS_ID:
        return None
    if clos_id in (".", "..") or any(c in "/\n\0" for c in clos_id) or len(clos_id.encode()) > NAME_MAX:
        return (f"{quote(clos_id)} is not a valid resctrl group name "
                f"(\"/\" for the root group, else one path component: no '/', newline or NUL, "
                f"not '.' or '..', at most {NAME_MAX} bytes)")
    return None


def annotation_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return f"annotation key {quote(key)}: prefix must be a DNS subdomain (lowercase, at most 253 characters)"
    if len(name) > 63 or not _ANNOTATION_NAME.fullmatch(name):
        return (f"annotation key {quote(key)}: name must be at most 63 characters, start and end with "
                "a letter or digit, and contain only letters, digits, '_', '.', '-'")
    return None


def env_problem(entry: str) -> str | None:
    if entry.find("=") <= 0:
        return f"{quote(entry)} is not NAME=VALUE with a non-empty NAME"
    if "\0" in entry:
        return f"{quote(entry)} contains a NUL byte"
    return None


class _Checker:
    def __init__(self, spec: Spec):
        self.path = spec.path
        self.errors: list[SpecError] = []
        self.declared = spec.cdi_version
        # With an unknown version every later field is judged by the newest rules only.
        self.version = versions.normalize(spec.cdi_version) or versions.LATEST

    def error(self, field: str, message: str) -> None:
        self.errors.append(SpecError(self.path, field, message))

    def need(self, field: str, needed: str, what: str) -> None:
        if not versions.at_least(self.version, needed):
            self.error(field, f"{what} needs cdiVersion {needed} or later; the spec declares {quote(self.declared)}")

    def annotations(self, field: str, annotations: tuple[tuple[str, str], ...]) -> None:
        if not annotations:
            return
        self.need(field, versions.ANNOTATIONS, "annotations")
        size = 0
        for key, value in annotations:
            problem = annotation_key_problem(key)
            if problem:
                self.error(field, problem)
            size += len(key) + len(value)
        if size > MAX_ANNOTATIONS_SIZE:
            self.error(field, f"annotations total {size} bytes, over the {MAX_ANNOTATIONS_SIZE}-byte limit")

    def edits(self, field: str, edits: ContainerEdits) -> None:
        prefix = field + "." if field else ""
        for i, entry in enumerate(edits.env):
            problem = env_problem(entry)
            if problem:
                self.error(f"{prefix}env[{i}]", problem)
        for i, node in enumerate(edits.device_nodes):
            where = f"{prefix}deviceNodes[{i}]"
            if not node.path:
                self.error(f"{where}.path", "required")
            if node.host_path is not None:
                self.need(f"{where}.hostPath", versions.NODE_HOST_PATH, "hostPath on a device node")
            if node.type not in _NODE_TYPE_SET:
                self.error(f"{where}.type", f"{quote(node.type)} is not one of b, c, u, p")
            problem = permissions_problem(node.permissions)
            if problem:
                self.error(f"{where}.permissions", problem)
        for i, mount in enumerate(edits.mounts):
            where = f"{prefix}mounts[{i}]"
            if not mount.host_path:
                self.error(f"{where}.hostPath", "required")
            problem = mount_destination_problem(mount.container_path)
            if problem:
                self.error(f"{where}.containerPath", problem)
            if mount.type:
                self.need(f"{where}.type", versions.MOUNT_TYPE, "a mount type")
        for i, hook in enumerate(edits.hooks):
            where = f"{prefix}hooks[{i}]"
            if hook.hook_name not in _HOOK_NAME_SET:
                self.error(f"{where}.hookName", f"{quote(hook.hook_name)} is not one of {', '.join(HOOK_NAMES)}")
            if not hook.path:
                self.error(f"{where}.path", "required")
            elif not hook.path.startswith("/"):
                self.error(f"{where}.path", f"{quote(hook.path)} is not an absolute path")
            for j, entry in enumerate(hook.env):
                problem = env_problem(entry)
                if problem:
                    self.error(f"{where}.env[{j}]", problem)
            if hook.timeout is not None and hook.timeout <= 0:
                self.error(f"{where}.timeout", f"{hook.timeout} is not greater than zero")
        if edits.additional_gids:
            self.need(f"{prefix}additionalGids", versions.ADDITIONAL_GIDS, "additionalGids")
        rdt = edits.intel_rdt
        if rdt is not None:
            where = f"{prefix}intelRdt"
            self.need(where, versions.INTEL_RDT, "intelRdt")
            problem = clos_id_problem(rdt.clos_id)
            if problem:
                self.error(f"{where}.closID", problem)
            if rdt.schemata:
                self.need(f"{where}.schemata", versions.RDT_SCHEMATA, "intelRdt.schemata")
            if rdt.enable_monitoring:
                self.need(f"{where}.enableMonitoring", versions.RDT_ENABLE_MONITORING, "intelRdt.enableMonitoring")
        if edits.net_devices:
            self.need(f"{prefix}netDevices", versions.NET_DEVICES, "netDevices")
            host_names: dict[str, int] = {}
            names: dict[str, int] = {}
            for i, device in enumerate(edits.net_devices):
                where = f"{prefix}netDevices[{i}]"
                for attr, json_name, seen in (("host_interface_name", "hostInterfaceName", host_names),
                                              ("name", "name", names)):
                    value = getattr(device, attr)
                    # The same rule the live injector applies: a host interface is named
                    # exactly, a container-side name may be a "%d" template.
                    problem = interface_name_problem(value, template_allowed=json_name == "name")
                    if problem:
                        self.error(f"{where}.{json_name}", problem)
                    elif value in seen and not is_interface_name_template(value):
                        self.error(f"{where}.{json_name}",
                                   f"{quote(value)} repeats {prefix}netDevices[{seen[value]}].{json_name}")
                    else:
                        seen[value] = i

    def spec(self, spec: Spec) -> None:
        if not spec.cdi_version:
            self.error("cdiVersion", "required")
        elif versions.normalize(spec.cdi_version) is None:
            self.error("cdiVersion", f"{quote(spec.cdi_version)} is not a supported CDI version "
                                     f"({', '.join(versions.VERSIONS)}, optionally with a leading v)")
        if not spec.kind:
            self.error("kind", "required")
        else:
            problem = kind_problem(spec.kind)
            if problem:
                self.error("kind", problem)
            elif "." in spec.kind.split("/", 1)[1]:
                self.need("kind", versions.DOT_IN_CLASS, "a '.' in the class name")
        self.annotations("annotations", spec.annotations)
        self.edits("containerEdits", spec.container_edits)
        if not spec.devices:
            self.error("devices", "a spec needs at least one device")
        seen: dict[str, int] = {}
        for i, device in enumerate(spec.devices):
            where = f"devices[{i}]"
            if not device.name:
                self.error(f"{where}.name", "required")
            else:
                problem = device_name_problem(device.name)
                if problem:
                    self.error(f"{where}.name", problem)
                elif device.name[0].isdigit():
                    self.need(f"{where}.name", versions.DEVICE_NAME_STARTS_WITH_DIGIT,
                              "a device name starting with a digit")
                if device.name in seen:
                    self.error(f"{where}.name", f"{quote(device.name)} repeats devices[{seen[device.name]}].name")
                else:
                    seen[device.name] = i
            self.annotations(f"{where}.annotations", device.annotations)
            for key, value in device.annotations:
                problem = shared_count_problem(value) if key == SHARED_ANNOTATION else None
                if problem:
                    self.error(f"{where}.annotations", problem)
            if device.container_edits.is_empty():
                self.error(f"{where}.containerEdits", "a device needs at least one edit")
            else:
                self.edits(f"{where}.containerEdits", device.container_edits)


def validate_spec(spec: Spec) -> list[SpecError]:
    """Every CDI rule the spec breaks, in file order; [] when it is valid."""
    checker = _Checker(spec)
    checker.spec(spec)
    return checker.errors
