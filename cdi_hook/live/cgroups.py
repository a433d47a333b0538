"""Let a running container use its injected devices: the device cgroup step of the hook.

The runtime has already restricted the container's devices (runc denies everything but a
short default list). cgroup v1: one `TYPE MAJOR:MINOR ACCESS` line per device into the
container's devices.allow. cgroup v2: the runtime's BPF device program is replaced by the
same program with a prologue that also allows our devices (see bpf.py); every rule of the
runtime stays as it was.

Runs in the runtime's (host) namespaces, while the container's init waits to start the
user's process.

For the commands on a running container (`attach`, `detach`, `verify`) the same module edits
and restores: CgroupChange allows rules and, on undo, gives the cgroup back what it had (v1:
only the access it added is denied; v2: the earlier prologue, the runtime's code behind it
unchanged), withdraw() takes rules away, check_cgroup() tells whether the cgroup lets a
rule's access through (v1: devices.list; v2: the attached programs run on the device in
bpf_eval's small interpreter).
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Sequence

from cdi_hook.errors import HookError
from cdi_hook.live import mountinfo
from cdi_hook.live.mountinfo import MountInfo

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cdi_hook.live import bpf

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
    rules = normalise(rules)
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

    def fail(what: str, detail: str | None) -> HookError:
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

def normalise(rules: Sequence[DeviceRule]) -> list[DeviceRule]:
    """The rules as the kernel takes them, checked: 'p' dropped (a FIFO is not a device), 'u' as 'c', access validated."""
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


def _cgroup_dir(mounts: list[MountInfo], cgroup_path: str, wanted: Callable[[MountInfo], bool]) -> str | None:
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


# --- edit and restore, for `cdi-hook attach`, `detach` and `verify` ----------------------
# (bpf and bpf_eval are imported in each function: the hook's own step above needs neither
# bpf_eval nor these, and a start pays for every module imported.)


def _allow(rule: DeviceRule) -> bpf.DeviceAllow:
    from cdi_hook.live import bpf

    return bpf.DeviceAllow(bpf.DEV_BLOCK if rule.type == "b" else bpf.DEV_CHAR, rule.major, rule.minor,
                           _access_bits(rule.permissions))


def v1_list(directory: str) -> list[tuple[str, str, str, str]]:
    """devices.list as (type, major, minor, access), '*' kept."""
    entries = []
    with open(os.path.join(directory, "devices.list")) as f:
        for line in f:
            kind, numbers, access = line.split()
            major, _, minor = numbers.partition(":")
            entries.append((kind, major, minor, access))
    return entries


def v1_allows(entries: Iterable[tuple[str, str, str, str]], rule: DeviceRule) -> bool:
    """Whether one entry of devices.list grants all of the rule's access (the kernel looks for
    one exception that covers the whole request)."""
    for kind, major, minor, access in entries:
        if (kind in ("a", rule.type) and major in ("*", str(rule.major)) and minor in ("*", str(rule.minor))
                and set(rule.permissions) <= set(access)):
            return True
    return False


def _v1_missing(entries: list[tuple[str, str, str, str]], rule: DeviceRule) -> DeviceRule:
    """The rule less the access letters devices.list allowed already: what allowing it adds,
    and all that undoing it may deny (had r, asked rw: only w goes again)."""
    return rule._replace(access="".join(c for c in rule.permissions
                                        if not v1_allows(entries, rule._replace(access=c))))


def _v1_write(directory: str, name: str, rules: Iterable[DeviceRule]) -> None:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for rule in rules:
            os.write(fd, f"{rule.type} {rule.major}:{rule.minor} {rule.permissions}".encode())
    finally:
        os.close(fd)


class CgroupChange:
    """Allow rules now; undo() gives the cgroup back what it had (only what this added goes)."""

    def __init__(self, pid: int, rules: Sequence[DeviceRule], names: str):
        self.rules = normalise(rules)
        self.names = names
        self.version: str | None
        self.directory: str | None
        self.version, self.directory = device_cgroup(pid, self.rules) if self.rules else (None, None)
        self._undo: Callable[[], None] | None = None

    def allow(self) -> None:
        if not self.rules:
            return
        assert self.directory is not None  # device_cgroup found it: there are rules
        try:
            before: list
            if self.version == "v1":
                before = v1_list(self.directory)
                added = [m for m in (_v1_missing(before, r) for r in self.rules) if m.access]
                self._undo = lambda: _v1_write(self.directory, "devices.deny", added)
                allow_devices_v1(self.directory, self.rules)
            else:
                before = prologue_allows(self.directory)
                self._undo = lambda: set_prologues(self.directory,
                                                   lambda i, _: before[i] if i < len(before) else [])
                allow_devices_v2(self.directory, self.rules)
        except OSError as error:
            raise HookError(STEP, self.names, f"{self.directory}: {error.strerror}") from None

    def undo(self) -> list[str]:
        from cdi_hook.errors import CdiError

        if self._undo is None:
            return []
        try:
            self._undo()
        except (OSError, CdiError) as error:
            return [f"device cgroup: {error}"]
        return []


def prologue_allows(directory: str) -> list[list]:
    """The devices cdi-hook's prologue allows, per attached program (in the kernel's order)."""
    from cdi_hook.live import bpf

    found = []
    for _, insns in attached_programs(directory):
        found.append(bpf.split_prologue(insns)[0])
    return found


def attached_programs(directory: str) -> list[tuple[int, list]]:
    """(id, instructions) of each device program attached to the cgroup dir, in the kernel's order."""
    from cdi_hook.live import bpf

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _, ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
    finally:
        os.close(fd)
    programs = []
    for prog_id in ids:
        prog_fd = bpf.prog_get_fd_by_id(prog_id)
        try:
            programs.append((prog_id, bpf.prog_info(prog_fd).insns))
        finally:
            os.close(prog_fd)
    return programs


def set_prologues(directory: str, choose: Callable[[int, list[bpf.DeviceAllow]], list[bpf.DeviceAllow]]) -> None:
    """Replace each attached program by its original code behind a prologue allowing
    choose(index, current allows); no prologue at all when that is empty. The runtime's code
    after the prologue is never changed."""
    from cdi_hook.errors import CdiError
    from cdi_hook.live import bpf

    cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags, ids = bpf.prog_query(cgroup_fd, bpf.BPF_CGROUP_DEVICE)
        for index, prog_id in enumerate(ids):
            old_fd = bpf.prog_get_fd_by_id(prog_id)
            try:
                old = bpf.prog_info(old_fd)
                current, original = bpf.split_prologue(old.insns)
                wanted = bpf.merge_allows(choose(index, current))
                if wanted == bpf.merge_allows(current):
                    continue
                problem = bpf.reloadable_problem(original)
                if problem:
                    raise CdiError(f"device cgroup: cannot reload program {prog_id} of {directory}: {problem}")
                program = (bpf.build_prologue(wanted) if wanted else []) + original
                new_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program,
                                       "GPL" if old.gpl_compatible else "Apache", "cdi_hook_dev")
                try:
                    if flags & bpf.BPF_F_ALLOW_MULTI:
                        bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE, flags | bpf.BPF_F_REPLACE,
                                        replace_fd=old_fd)
                    else:
                        bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE, flags)
                finally:
                    os.close(new_fd)
            finally:
                os.close(old_fd)
    finally:
        os.close(cgroup_fd)


def withdraw(pid: int, rules: Sequence[DeviceRule], names: str) -> list[str]:
    """Take the rules' access away again; notes of what was done."""
    rules = normalise(rules)
    if not rules:
        return []
    version, directory = device_cgroup(pid, rules)
    try:
        if version == "v1":
            _v1_write(directory, "devices.deny", rules)
        else:
            gone = {(a.dev_type, a.major, a.minor) for a in map(_allow, rules)}
            set_prologues(directory, lambda _, current: [a for a in current
                                                        if (a.dev_type, a.major, a.minor) not in gone])
    except OSError as error:
        raise HookError(STEP, names, f"{directory}: {error.strerror}") from None
    return [f"device cgroup: withdrew {', '.join(str(r) for r in rules)}"]


def check_cgroup(pid: int, rule: DeviceRule) -> tuple[bool, str]:
    """Whether the container's device cgroup lets the planned access through, and how we know."""
    from cdi_hook.live import bpf, bpf_eval

    rule = normalise([rule])[0]
    version, directory = device_cgroup(pid, [rule])
    if version == "v1":
        ok = v1_allows(v1_list(directory), rule)
        return ok, f"devices.list {'allows' if ok else 'does not allow'} {rule} {rule.permissions}"
    programs = attached_programs(directory)
    if not programs:
        return True, "no device program attached: no restriction"
    allow = _allow(rule)
    for prog_id, insns in programs:
        for bits in {allow.access, *(b for b in (bpf.ACC_MKNOD, bpf.ACC_READ, bpf.ACC_WRITE) if allow.access & b)}:
            try:
                verdict = bpf_eval.run_device_program(insns, allow.dev_type | bits << 16, rule.major, rule.minor)
            except ValueError as error:
                return False, f"cannot evaluate device program {prog_id}: {error}"
            if not verdict:
                return False, f"device program {prog_id} refuses {rule} {_access_text(bits)}"
    return True, f"every attached device program allows {rule} {rule.permissions}"


def _access_text(bits: int) -> str:
    from cdi_hook.live import bpf

    return "".join(c for c, b in (("r", bpf.ACC_READ), ("w", bpf.ACC_WRITE), ("m", bpf.ACC_MKNOD)) if bits & b)
