"""Put the container into an Intel RDT (resctrl) group, as the OCI runtime spec's intelRdt says.

Rules followed (runtime-spec config-linux.md, "IntelRdt"):

- the group is `<resctrl>/<closID>`; `closID` "/" is the root (default) group; an empty
  closID means the container id;
- schemata lines are `l3CacheSchema`, then `memBwSchema`, then each `schemata` entry, in
  that order, none containing a newline;
- a missing group is created and given those lines; an existing group given lines must
  already have matching ones, else the container is refused (another container's class of
  service is never rewritten); a closID with no lines names a pre-configured group, which
  must exist;
- `enableMonitoring` makes a MON group `mon_groups/<container id>` under that group (the
  closID when the id is unknown) and the container's init joins it too;
- the init pid goes into the group's `tasks` (then the MON group's, whose parent it must
  already be in).

The mount point is $CDI_HOOK_RESCTRL (default /sys/fs/resctrl). At the default path it
must be a mounted resctrl filesystem; a configured path only needs the resctrl layout
(`tasks`, `schemata`, `info/`), so tests can use a plain directory tree.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cdi_hook import settings
from cdi_hook.errors import HookError
from cdi_hook.live import mountinfo
from cdi_hook.settings import DEFAULT_RESCTRL
from cdi_hook.spec.model import IntelRdt

STEP = "intel RDT"
# Names the kernel keeps for itself in the resctrl root (and in every CTRL_MON group).
RESERVED_NAMES = {"info", "mon_groups", "mon_data", "tasks", "schemata", "cpus", "cpus_list",
                  "mode", "size"}


def resctrl_root() -> Path:
    return Path(settings.current().resctrl)


def is_resctrl_mount(path: Path) -> bool:
    """Whether `path` is a mount point of type resctrl (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    try:
        mounts = mountinfo.read()
    except OSError:
        return False
    return any(mount.mount_point == target and mount.fs_type == "resctrl" for mount in mounts)


def check_root(root: Path, origin: str) -> None:
    if str(root) == DEFAULT_RESCTRL and not is_resctrl_mount(root):
        raise HookError(STEP, origin, f"no resctrl filesystem is mounted at {root} (this host has no "
                                      "Intel RDT, or it needs 'mount -t resctrl resctrl /sys/fs/resctrl')")
    if not (root / "tasks").is_file() or not (root / "info").is_dir():
        raise HookError(STEP, origin, f"{root} is not a resctrl filesystem (no tasks file or info/ directory); "
                                      "check CDI_HOOK_RESCTRL")


def schemata_lines(rdt: IntelRdt, origin: str = "") -> list[str]:
    """The lines to write to `schemata`, in the spec's order; checks each line's form."""
    lines = []
    if rdt.l3_cache_schema:
        lines.append(rdt.l3_cache_schema)
    if rdt.mem_bw_schema:
        if not rdt.mem_bw_schema.startswith("MB:"):
            raise HookError(STEP, origin, f"memBwSchema must start with 'MB:': {rdt.mem_bw_schema!r}")
        lines.append(rdt.mem_bw_schema)
    lines.extend(rdt.schemata)
    for line in lines:
        if "\n" in line or "\r" in line:
            raise HookError(STEP, origin, f"a schemata line contains a newline: {line!r}")
        if ":" not in line:
            raise HookError(STEP, origin, f"a schemata line is not 'RESOURCE:id=value;...': {line!r}")
    return lines


def parse_schemata(text: str) -> dict[str, dict[str, str]]:
    """`schemata` text -> {resource: {domain id: value}}, normalized for comparison.

    The kernel pads resource names and prints bitmasks in its own way (`L3:0=0ff;1=fff`
    may read back as `    L3:0=ff;1=fff`), so names are stripped and upper-cased and
    values compared as numbers: hex bitmasks for cache resources, decimal for MB.
    """
    parsed: dict[str, dict[str, str]] = {}
    for raw in text.splitlines():
        if ":" not in raw:
            continue
        resource, _, domains = raw.partition(":")
        resource = resource.strip().upper()
        entries = parsed.setdefault(resource, {})
        for item in domains.split(";"):
            domain, sep, value = item.partition("=")
            if sep:
                entries[domain.strip()] = _normal_value(resource, value.strip())
    return parsed


def _normal_value(resource: str, value: str) -> str:
    try:
        number = int(value, 10 if resource.startswith("MB") else 16)
    except ValueError:
        return value.lower()
    return str(number)


def schemata_mismatch(wanted: list[str], current: str) -> str | None:
    """The first wanted resource/domain the current schemata disagrees with, or None."""
    have = parse_schemata(current)
    for resource, domains in parse_schemata("\n".join(wanted)).items():
        for domain, value in domains.items():
            got = have.get(resource, {}).get(domain)
            if got != value:
                return f"{resource}:{domain} is {got if got is not None else 'unset'} in the group, the spec wants {value}"
    return None


def group_name(rdt: IntelRdt, container_id: str, origin: str) -> str:
    name = rdt.clos_id or container_id
    if not name:
        raise HookError(STEP, origin, "closID is empty and the container id is unknown")
    if name == "/":
        return name
    if "/" in name or name in (".", "..") or name in RESERVED_NAMES or "\n" in name:
        raise HookError(STEP, origin, f"closID {name!r} is not a usable resctrl group name")
    return name


def _write(path: Path, text: str, root: Path, what: str, origin: str) -> None:
    try:
        with open(path, "w") as file:
            file.write(text)
    except OSError as error:
        raise HookError(STEP, origin, f"writing {what} to {path}: {os.strerror(error.errno or errno.EIO)}"
                                      f"{_last_cmd_status(root)}") from None


def _last_cmd_status(root: Path) -> str:
    """The kernel's own reason for the last refused write, when it gives one."""
    try:
        status = (root / "info" / "last_cmd_status").read_text().strip()
    except OSError:
        return ""
    return f" ({status})" if status and status != "ok" else ""


def apply(container_pid: int, origin: str, rdt: IntelRdt, *, container_id: str = "") -> None:
    """Put `container_pid` into the RDT group (and MON group) that `rdt` describes."""
    root = resctrl_root()
    check_root(root, origin)
    name = group_name(rdt, container_id, origin)
    lines = schemata_lines(rdt, origin)
    if rdt.enable_monitoring and not (root / "info" / "L3_MON").is_dir():
        raise HookError(STEP, origin, f"enableMonitoring asked, but this host's RDT has no monitoring "
                                      f"({root}/info/L3_MON is missing)")
    group = root if name == "/" else root / name
    created = False
    if group.is_dir():
        if lines:
            current = (group / "schemata").read_text() if (group / "schemata").exists() else ""
            mismatch = schemata_mismatch(lines, current)
            if mismatch:
                raise HookError(STEP, origin, f"resctrl group {group} exists with other schemata: {mismatch}")
    elif rdt.clos_id and not lines:
        raise HookError(STEP, origin, f"closID {name!r} names no pre-configured resctrl group ({group} is missing)")
    else:
        try:
            group.mkdir()
        except OSError as error:
            raise HookError(STEP, origin, f"creating resctrl group {group}: {os.strerror(error.errno or errno.EIO)}"
                                          f"{_last_cmd_status(root)}") from None
        created = True
    made: list[tuple[Path, str]] = [(group, "resctrl group")] if created else []
    try:
        if created and lines:
            _write(group / "schemata", "\n".join(lines) + "\n", root, "the schemata", origin)
        _write(group / "tasks", f"{container_pid}\n", root, f"pid {container_pid}", origin)
        if rdt.enable_monitoring:
            _join_mon_group(group, mon_group_name(rdt, container_id, name), container_pid, root, origin, made)
    except HookError as error:
        # Undo newest first (a MON group lives inside its CTRL group). A group we cannot
        # remove is named in the same one-line error: the failure that stopped us stays first.
        problems = []
        for path, what in reversed(made):
            try:
                _remove_group(path, what, origin)
            except HookError as undo_error:
                problems.append(str(undo_error))
        if problems:
            raise HookError(STEP, origin, f"{error.detail}; undo failed too: {'; '.join(problems)}") from None
        raise


def mon_group_name(rdt: IntelRdt, container_id: str, group: str) -> str:
    """The MON group is named after the container; its CTRL group's name when the id is unknown."""
    return container_id or group.strip("/") or "default"


def _join_mon_group(group: Path, name: str, container_pid: int, root: Path, origin: str,
                    made: list[tuple[Path, str]]) -> None:
    mon = group / "mon_groups" / name
    try:
        # resctrl itself makes mon_groups/ in every CTRL_MON group; only a test tree lacks it
        mon.parent.mkdir(exist_ok=True)
        if not mon.is_dir():
            mon.mkdir()
            made.append((mon, "MON group"))
    except OSError as error:
        raise HookError(STEP, origin, f"creating MON group {mon}: {os.strerror(error.errno or errno.EIO)}"
                                      f"{_last_cmd_status(root)}") from None
    _write(mon / "tasks", f"{container_pid}\n", root, f"pid {container_pid}", origin)


def release(origin: str, rdt: IntelRdt, *, container_id: str = "") -> None:
    """After the container is deleted: remove its MON group, and its own CTRL group.

    The spec: the MON group always goes; the CTRL group only when it was named after the
    container (closID unset), never a named class of service that others may share.
    """
    root = resctrl_root()
    if not root.is_dir():
        return
    name = group_name(rdt, container_id, origin)
    group = root if name == "/" else root / name
    if rdt.enable_monitoring:
        _remove_group(group / "mon_groups" / mon_group_name(rdt, container_id, name), "MON group", origin)
    if not rdt.clos_id and group != root:
        _remove_group(group, "resctrl group", origin)


def _remove_group(path: Path, what: str, origin: str) -> None:
    """rmdir a resctrl group (the kernel moves its tasks back); gone already is fine."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise HookError(STEP, origin, f"removing {what} {path}: {os.strerror(error.errno or errno.EIO)}") from None
