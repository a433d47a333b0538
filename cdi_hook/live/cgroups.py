"""Let a running container use its injected devices: the device cgroup step of the hook.

The runtime has already restricted the container's devices (runc denies everything but a
short default list). cgroup v1: one `TYPE MAJOR:MINOR ACCESS` line per device into the
container's devices.allow. cgroup v2: the runtime's BPF device program is replaced by the
same program with a prologue that also allows our devices (see bpf.py); every rule of the
runtime stays as it was.

Runs in the runtime's (host) namespaces, while the container's init waits to start the
user's process.
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Sequence

from cdi_hook.errors import HookError
from cdi_hook.live import mountinfo
from cdi_hook.live.mountinfo import MountInfo

STEP = "device cgroup"
# The cgroup mount point systemd and runtimes use; the runtime is in unified (v2) mode when
# it holds a cgroup2 file system, like runc's IsCgroup2UnifiedMode decides.
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"

# Linux dev_t: 12-bit major, 20-bit minor.
MAX_MAJOR = (1 << 12) - 1
MAX_MINOR = (1 << 20) - 1


class DeviceRule(namedtuple("DeviceRule", ["type", "major", "minor", "access"], defaults=("",))):
    """Allow one device: type 'b' or 'c' ('u' counts as 'c', 'p' needs no rule), access
    a subset of "rwm" ("" meaning all of it)."""

    __slots__ = ()

    @property
    def permissions(self) -> str:
        return self.access or "rwm"

    def __str__(self) -> str:
        return f"{self.type} {self.major}:{self.minor}"


def allow_devices(container_pid: int, rules: Sequence[DeviceRule]) -> None:
    """Allow the container whose init is `container_pid` to use the devices of `rules`.

    Raises HookError naming the step and the device(s) when the cgroup cannot be found or
    changed. Allowing an already allowed device again is harmless.
    """
    rules = _normalise(rules)
    if not rules:
        return
    version, directory = device_cgroup(container_pid, rules)
    if version == "v1":
        allow_devices_v1(directory, rules)
    else:
        allow_devices_v2(directory, rules)


def device_cgroup(container_pid: int, rules: Sequence[DeviceRule] = ()) -> tuple[str, str]:
    """("v1", its devices cgroup dir) or ("v2", its cgroup2 dir) for the process; HookError
    naming `rules` when neither can be found. Also used by `cdi-hook attach/detach/verify`."""
    memberships = _read_memberships(container_pid, rules)
    mounts = mountinfo.read()
    # Decide as the runtime does: cgroup2 on /sys/fs/cgroup means v2. The kernel still lists
    # a v1 devices line on a hybrid host even for a runtime running in v2 mode.
    if not _is_unified(DEFAULT_CGROUP_ROOT, mounts) and "devices" in memberships:
        directory = _cgroup_dir(mounts, memberships["devices"], lambda m: m.fs_type == "cgroup"
                                and "devices" in m.super_options.split(","))
        if directory is not None:
            return "v1", directory
        if memberships["devices"] != "/":
            raise HookError(STEP, _names(rules), f"no devices cgroup mount shows {memberships['devices']!r} "
                            f"(cgroup of process {container_pid})")
    if "" not in memberships:
        raise HookError(STEP, _names(rules), f"process {container_pid} has no devices cgroup (v1) "
                        "and no cgroup v2 membership")
    directory = _cgroup_dir(_prefer_mount_point(mounts, DEFAULT_CGROUP_ROOT), memberships[""],
                            lambda m: m.fs_type == "cgroup2")
    if directory is None:
        raise HookError(STEP, _names(rules), f"no cgroup2 mount holds {memberships['']!r} "
                        f"(cgroup of process {container_pid})")
    return "v2", directory


def allow_devices_v1(cgroup_dir: str, rules: Sequence[DeviceRule]) -> None:
    path = os.path.join(cgroup_dir, "devices.allow")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise HookError(STEP, _names(rules), f"cannot open {path}: {e.strerror}") from None
    try:
        for rule in rules:
            try:
                # The kernel parses one rule per write.
                os.write(fd, f"{rule.type} {rule.major}:{rule.minor} {rule.permissions}".encode())
            except OSError as e:
                raise HookError(STEP, str(rule), f"cannot write {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def allow_devices_v2(cgroup_dir: str, rules: Sequence[DeviceRule]) -> None:
    """Replace each device program attached to the cgroup by one that also allows `rules`.

    No program attached means no device restriction: nothing to do. The attach flags the
    runtime used are mirrored (runc 1.1 uses BPF_F_ALLOW_MULTI; with it the replacement is
    atomic through BPF_F_REPLACE, without it attaching again replaces the single program).
    """
    from cdi_hook.live import bpf

    allows = [bpf.DeviceAllow(bpf.DEV_BLOCK if rule.type == "b" else bpf.DEV_CHAR, rule.major, rule.minor,
                              _access_bits(rule.permissions)) for rule in rules]
    names = _names(rules)
    try:
        cgroup_fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HookError(STEP, names, f"cannot open cgroup {cgroup_dir}: {e.strerror}") from None
    try:
        try:
            attach_flags, prog_ids = bpf.prog_query(cgroup_fd, bpf.BPF_CGROUP_DEVICE)
        except OSError as e:
            raise HookError(STEP, names, f"cannot query the device programs of {cgroup_dir}: {e.strerror}") from None
        for prog_id in prog_ids:
            _replace_program(cgroup_fd, cgroup_dir, prog_id, attach_flags, allows, names)
    finally:
        os.close(cgroup_fd)


def _replace_program(cgroup_fd: int, cgroup_dir: str, prog_id: int, attach_flags: int,
                     allows: list, names: str) -> None:
    """Swap one attached program for its extension; the old one stays until the swap."""
    from cdi_hook.live import bpf

    def fail(what: str, detail: str):
        return HookError(STEP, names, f"{what} (device program {prog_id} of {cgroup_dir}): {detail}")

    try:
        old_fd = bpf.prog_get_fd_by_id(prog_id)
    except OSError as e:
        raise fail("cannot open the attached program", e.strerror) from None
    try:
        try:
            old = bpf.prog_info(old_fd)
        except OSError as e:
            raise fail("cannot read the attached program", e.strerror) from None
        if bpf.already_allows(old.insns, allows):
            return
        problem = bpf.reloadable_problem(old.insns)
        if problem:
            raise fail("cannot extend the attached program", problem)
        program = bpf.extend_program(old.insns, allows)
        license = "GPL" if old.gpl_compatible else "Apache"
        try:
            new_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program, license, "cdi_hook_dev")
        except bpf.ProgLoadError as e:
            raise fail("the kernel refused the extended program", f"{e.strerror}: {_last_lines(e.log)}") from None
        try:
            if attach_flags & bpf.BPF_F_ALLOW_MULTI:
                bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE,
                                attach_flags | bpf.BPF_F_REPLACE, replace_fd=old_fd)
            else:
                bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE, attach_flags)
        except OSError as e:
            raise fail("cannot attach the extended program", e.strerror) from None
        finally:
            os.close(new_fd)
    finally:
        os.close(old_fd)


# --- helpers ----------------------------------------------------------------------------

def _normalise(rules: Sequence[DeviceRule]) -> list[DeviceRule]:
    """Checked rules: 'p' dropped (a FIFO is not a device), 'u' as 'c', access validated."""
    result = []
    for rule in rules:
        if rule.type == "p":
            continue
        if rule.type not in ("b", "c", "u"):
            raise HookError(STEP, str(rule), f"unknown device type {rule.type!r} (want b, c, u or p)")
        if not (isinstance(rule.major, int) and 0 <= rule.major <= MAX_MAJOR
                and isinstance(rule.minor, int) and 0 <= rule.minor <= MAX_MINOR):
            raise HookError(STEP, str(rule), "major/minor out of range")
        if not set(rule.access) <= set("rwm"):
            raise HookError(STEP, str(rule), f"access {rule.access!r} is not a subset of 'rwm'")
        access = "".join(bit for bit in "rwm" if bit in rule.permissions)
        result.append(DeviceRule("c" if rule.type == "u" else rule.type, rule.major, rule.minor, access))
    return result


def _access_bits(permissions: str) -> int:
    from cdi_hook.live import bpf

    bits = {"m": bpf.ACC_MKNOD, "r": bpf.ACC_READ, "w": bpf.ACC_WRITE}
    return sum(bits[bit] for bit in set(permissions))


def _names(rules: Sequence[DeviceRule]) -> str:
    return ", ".join(str(rule) for rule in rules)


def _read_memberships(pid: int, rules: Sequence[DeviceRule]) -> dict[str, str]:
    """controller -> cgroup path from /proc/<pid>/cgroup; "" is the unified (v2) hierarchy."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
    except OSError as e:
        raise HookError(STEP, _names(rules), f"cannot read the cgroup of process {pid}: {e.strerror}") from None
    memberships = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if parts[0] == "0" and controllers == "":
            memberships[""] = path
        for controller in controllers.split(","):
            if controller:
                memberships[controller] = path
    return memberships


def _prefer_mount_point(mounts: list[MountInfo], mount_point: str) -> list[MountInfo]:
    """Mounts at `mount_point` first, the latest (the visible one) first among them."""
    at_point = [m for m in reversed(mounts) if m.mount_point == mount_point]
    return at_point + [m for m in mounts if m.mount_point != mount_point]


def _cgroup_dir(mounts: list[MountInfo], cgroup_path: str, wanted) -> str | None:
    """The directory of `cgroup_path` under the first wanted mount that shows it."""
    for mount in mounts:
        if not wanted(mount):
            continue
        root = mount.root.rstrip("/")
        if cgroup_path == root or cgroup_path.startswith(root + "/"):
            directory = mount.mount_point.rstrip("/") + cgroup_path[len(root):]
            if os.path.isdir(directory):
                return directory or "/"
    return None


def _is_unified(path: str, mounts: list[MountInfo] | None = None) -> bool:
    """True when the mount visible at `path` is a cgroup2 file system: the last mountinfo
    entry at that point (a later mount over it hides the earlier ones). Read from mountinfo,
    which this step reads anyway; statfs(2)'s f_type would need ctypes (~3 ms of a start)."""
    visible = None
    for mount in mountinfo.read() if mounts is None else mounts:
        if mount.mount_point == path:
            visible = mount
    return visible is not None and visible.fs_type == "cgroup2"


def _last_lines(log: str, count: int = 3) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "no verifier log"
