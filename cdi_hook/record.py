"""The container record: what cdi-hook gave one container, written once by createRuntime
and read by every later step (poststart, poststop, verify, detach, stale).

A later step never asks today's spec files what a container got: after a driver upgrade
they describe another version of the device, or none. It asks the record, which holds the
plan's items for the container exactly as they were carried out (nodes with their device
numbers, mounts with their host source's identity and the mount's id, device cgroup
rules, interfaces moved, the RDT group, exclusive holds, and the
spec hooks of the stages still to come), keyed by the device that asked for each.

One file per container, `<state root>/containers/<id>.json`, through the state layer
(state.py: private folder, trusted read, checksum, atomic write). createRuntime writes it
after every step has succeeded and before the hook returns: a hook killed half-way leaves
no record (the runtime fails the start and the hook's own undo ran, or the container
never ran), never one that says more than was done. poststop removes it when its work is
done; a container that `inject --mode hook` gave no poststop entry (its devices had
nothing to do then) has its record removed by prune, from `cdi-hook stale`, the watcher
and inject, once it is gone. A container started by an older cdi-hook has no record: its
later stages keep the older behaviour (re-resolving the specs) and say so in the log.

Records are namedtuples and lists, not dataclasses: poststart and poststop read one on
every container start that asked for a device.
"""

from __future__ import annotations

import os
from collections import namedtuple
from cdi_hook import settings, state
from cdi_hook.errors import CdiError

TYPE_CHECKING = False  # typing costs ~2 ms of import on every start; type checkers treat this name as true
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from cdi_hook.live.child import Report
    from cdi_hook.plan import Plan
    from cdi_hook.settings import Settings

VERSION = 1
FOLDER = "containers"
POST_STAGES = settings.POST_STAGES

# What one container got. items: the plan's items as JSON lists (see _items); work: the
# later stages that have something to do, for poststart/poststop to return at once otherwise.
# config: the identity of the bundle's config.json when the record was made (device, inode,
# mtime, size): a later container under the same id and bundle has another. entries: the
# later stages an entry of cdi-hook's will run at, as `inject --mode hook` said in the
# createRuntime entry it wrote (settings.post_stages); None when nobody said (hooks.d files,
# whose poststop Podman runs outside config.json; hand-written entries; older records):
# then every later stage may come, and a poststop removes the record.
Record = namedtuple("Record", ["container", "pid", "start_time", "bundle", "devices", "sources", "items", "work",
                               "config", "entries"], defaults=(None,))


def folder(settings: Settings | None = None) -> str:
    if settings is None:
        from cdi_hook.settings import current

        settings = current()
    return os.path.join(settings.state_root, FOLDER)


def _where(container_id: str) -> tuple[str, str]:
    name = state.file_name(container_id) + ".json"
    return name, os.path.join(folder(), name)


# --- writing (createRuntime) -------------------------------------------------------------

def from_plan(plan: Plan, container_id: str, pid: int, start_time: int | None, bundle: str,
              sources: dict[str, str], holds: Iterable[tuple[str, Iterable[str]]],
              made: Report | None = None, entries: list[str] | None = None) -> Record:
    """The record of a container given plan at createRuntime. made: the worker's report of
    what it made (each mount's id and source identity, each node created or found, and
    what it replaced); None when there was no rootfs work. holds: (device, its hold keys)
    for each exclusive device held (live/holds.py), what poststop and detach give back."""
    items = items_of(plan, made)
    items["holds"] = [[device, list(keys)] for device, keys in holds]
    return Record(container_id, pid, start_time, bundle, list(plan.devices), dict(sources), items,
                  work_of(items), config_identity(bundle), entries)


def needed_stages(plan: Plan, held: bool) -> list[str]:
    """The later stages a container given plan will have work at (work_of, decided from the
    plan before the container exists): what `inject --mode hook` writes entries for.
    held: some of its devices are held (exclusive or shareable; given back at poststop)."""
    return work_of({"hooks": {stage: plan.hooks_at(stage) for stage in POST_STAGES},
                    "net_devices": plan.net_devices, "rdt": plan.intel_rdt, "holds": held})


def config_identity(bundle: str) -> list[int] | None:
    """The identity of the bundle's config.json: a container made again under the same id
    and bundle has written it anew (another inode, mtime or size)."""
    try:
        st = os.stat(os.path.join(bundle, "config.json"))
    except OSError:
        return None
    return [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]


def is_of(found: Record, container_id: str, bundle: str, pid: int | None = None) -> bool:
    """Whether a record describes this container, not an earlier one under the same id:
    the same bundle and config.json, and (while it runs) the same init process."""
    if found.container != container_id or found.bundle != bundle or found.config != config_identity(bundle):
        return False
    if pid:
        from cdi_hook.containers import process_start_time

        return (found.pid, found.start_time) == (pid, process_start_time(pid))
    return True


def items_of(plan: Plan, made: Report | None) -> dict:
    """The plan's items as a record keeps them (createRuntime's record, attach's entries)."""
    mounted = {m.path: m for m in made.mounts} if made is not None else {}
    outcomes = {n.path: n for n in made.nodes} if made is not None else {}
    mounts = []
    for origin, mount in plan.mounts:
        seen = mounted.get(mount.container_path)
        mounts.append([origin, list(mount[:2]) + [list(mount.options), mount.type],
                       [seen.source_dev, seen.source_ino] if seen else _source_identity(mount.host_path),
                       seen.mount_id if seen else None])
    nodes = []
    for p in plan.nodes:
        outcome = outcomes.get(p.node.path)
        # created: False for a node that was there already as the spec says (the image's,
        # the runtime's): detach must not remove what the container had without the device
        nodes.append([p.origin, list(p.node), p.uid, p.gid, outcome.created if outcome else None,
                      outcome.replaced if outcome else None])
    return {
        "nodes": nodes,
        "rules": [list(rule) for rule in plan.device_rules],
        "mounts": mounts,
        "net_devices": [[origin, list(device)] for origin, device in plan.net_devices],
        "rdt": [plan.intel_rdt[0], _plain(plan.intel_rdt[1])] if plan.intel_rdt else None,
        "hooks": {stage: [[origin, _plain(hook)] for origin, hook in plan.hooks_at(stage)] for stage in POST_STAGES
                  if plan.hooks_at(stage)},
        "shared": [[kind, path, list(origins)] for kind, path, origins in plan.shared],
    }


def _plain(record: tuple) -> list:
    return [list(value) if isinstance(value, tuple) else value for value in record]


def _source_identity(host_path: str) -> list[int] | None:
    try:
        st = os.stat(host_path)
    except (OSError, TypeError, ValueError):
        return None
    return [st.st_dev, st.st_ino]


def work_of(items: dict) -> list[str]:
    """The later stages with something to do: spec hooks of that stage; at poststop also the
    interfaces to send home, the RDT group to remove and the holds to give back."""
    work = [stage for stage in POST_STAGES if items.get("hooks", {}).get(stage)]
    if "poststop" not in work and (items.get("net_devices") or items.get("rdt") or items.get("holds")):
        work.append("poststop")
    return work


def save(record: Record) -> None:
    """Write the container's record (replacing an earlier container's of the same id), then
    its idle note (below)."""
    name, where = _where(record.container)
    try:
        dir_fd = state.open_private_dir(folder(), create=True)
        assert dir_fd is not None
        try:
            _lock(dir_fd)  # against a removal that checked the earlier record under this id (prune)
            data = state.encode_record({"version": VERSION, **record._asdict()})
            state.write_atomic_at(dir_fd, name, data)
            try:
                _write_note(dir_fd, record, data[:data.index(b"\n")])
            except OSError:
                pass  # only a faster way to an answer: without it, the post stages go the full way
        finally:
            os.close(dir_fd)
    except OSError as error:
        raise CdiError(f"{where}: cannot write the container's record: {error.strerror}") from None


# The idle note, `<id>.idle` beside `<id>.json`: the post stages whose record holds no work
# for them, what identifies the container (is_of's checks) and the checksum line of the
# record it goes with. An installed entry reads it first (cdi_hook/start.py) and returns
# at once for such a stage, without starting the rest of cdi-hook. Only a faster way to an
# answer: written after the record and not fsync'd (a lost or torn note sends the stage the
# full way); removed before the record; a note whose record was written again since (its
# checksum line differs) is not believed.
NOTE_SUFFIX = ".idle"
NOTE_VERSION = 1


def _note_name(name: str) -> str:
    return name[:-len(".json")] + NOTE_SUFFIX


def _write_note(dir_fd: int, record: Record, record_head: bytes) -> None:
    from cdi_hook import jsonio

    idle = [stage for stage in POST_STAGES if stage not in record.work]
    name = _note_name(state.file_name(record.container) + ".json")
    if not idle or record.config is None:
        state.remove_at(dir_fd, name)
        return
    note = {"version": NOTE_VERSION, "idle": idle, "container": record.container, "bundle": record.bundle,
            "config": record.config, "pid": record.pid, "start_time": record.start_time,
            "record": record_head.decode("ascii")}
    state.write_atomic_at(dir_fd, name, (jsonio.dumps(note) + "\n").encode(), durable=False)


# --- reading ----------------------------------------------------------------------------

def load(container_id: str) -> Record | None:
    """The container's record; None when it has none. StateError (one line naming the file)
    for a record that is not a private file of root's, is damaged, or is not a record."""
    name, where = _where(container_id)
    dir_fd = state.open_private_dir(folder())
    if dir_fd is None:
        return None
    try:
        document = state.read_record(dir_fd, name, where)
    finally:
        os.close(dir_fd)
    if document is None:
        return None
    return _parse(document, where, container_id)


def _parse(document: object, where: str, container_id: str | None = None) -> Record:
    try:
        if not isinstance(document, dict) or document.get("version") != VERSION:
            raise ValueError("version")
        record = Record(**{field: document[field] for field in Record._fields if field != "entries"},
                        entries=document.get("entries"))
        if (not isinstance(record.container, str) or not isinstance(record.entries, (list, type(None)))
                or (container_id is not None and record.container != container_id)
                or not isinstance(record.devices, list) or not isinstance(record.items, dict)
                or not isinstance(record.work, list) or not isinstance(record.sources, dict)):
            raise ValueError("shape")
    except (KeyError, TypeError, ValueError):
        raise state.StateError(f"{where}: not a container record of this cdi-hook; refusing to act on it") from None
    return record


def remove(container_id: str, only: Record | None = None) -> bool:
    """Remove the container's record; with only, just when it still is that record (not one a
    new container of the same id wrote since it was read: the check and the removal hold the
    folder's lock, which save takes too). Whether a record was removed."""
    name, where = _where(container_id)
    dir_fd = state.open_private_dir(folder())
    if dir_fd is None:
        return False
    try:
        if only is not None:
            _lock(dir_fd)
            document = state.read_record(dir_fd, name, where)
            if document is None or _parse(document, where, container_id) != only:
                return False
        state.remove_at(dir_fd, _note_name(name))  # first: a note never outlives its record
        state.remove_at(dir_fd, name)
    except OSError as error:  # a read-only or failing state folder: one line, no traceback
        raise CdiError(f"{where}: cannot remove the container's record: {error.strerror}") from None
    finally:
        os.close(dir_fd)
    return True


def _lock(dir_fd: int) -> None:
    """The records folder's lock (flock on its own fd; dropped when the fd is closed)."""
    import fcntl

    fcntl.flock(dir_fd, fcntl.LOCK_EX)


def is_alive(record: Record) -> bool:
    """Whether the record's container process still runs (the same pid with another start
    time is another process)."""
    from cdi_hook.containers import process_start_time

    return isinstance(record.pid, int) and record.pid > 0 and process_start_time(record.pid) == record.start_time


def all_records() -> list[tuple[Record | None, str]]:
    """Every record in the folder, with its path; None for one that is refused."""
    dir_fd = state.open_private_dir(folder())
    if dir_fd is None:
        return []
    found: list[tuple[Record | None, str]] = []
    try:
        for name in sorted(os.listdir(dir_fd)):
            if not name.endswith(".json"):  # the state layer's temp files end in .tmp
                continue
            where = os.path.join(folder(), name)
            try:
                document = state.read_record(dir_fd, name, where)
                found.append((None if document is None else _parse(document, where), where))
            except state.StateError:
                found.append((None, where))
    finally:
        os.close(dir_fd)
    return found


def awaits_poststop(record: Record) -> bool:
    """Whether a poststop of cdi-hook's will come for the record's container (and remove it)."""
    return record.entries is None or "poststop" in record.entries


def prune() -> list[str]:
    """Remove the records of containers that are gone and that no poststop will come for
    (awaits_poststop); the ids removed. Records a poststop will read are left to it."""
    if not _sees_host_pids():
        return []
    return [found.container for found, _ in all_records()
            if found is not None and not awaits_poststop(found) and not is_alive(found)
            and remove(found.container, only=found)]


def _sees_host_pids() -> bool:
    """Whether this process sees the host's process ids, as the hooks that wrote the records
    did: in the initial pid namespace, pid 2 is the kernel's kthreadd. A watcher or `stale`
    in a container of its own (no hostPID) would see every recorded container as gone."""
    try:
        with open("/proc/2/comm", "rb") as f:
            return f.read().strip() == b"kthreadd"
    except OSError:
        return False


# --- containers edited before creation (precreate, inject --mode edits) -----------------

def with_edited_devices(found: Record | None, resolved: list[tuple[str, Plan]], config_raw: dict, pid: int,
                        start_time: int | None, bundle: str, container_id: str) -> Record | None:
    """The record of a container whose config.json an editor gave devices (the applied
    annotation lists them), derived the first time a command needs it. resolved: each
    applied device with today's plan for it alone. What a device got is what config.json
    holds at the places today's spec names for it, only where it holds it as the spec says
    (the same device numbers at a node's path, the same host source at a mount's
    destination): the annotation is anyone's to write, and a pod's own volume at a spec's
    destination is not the device's. A device none of whose nodes and mounts config.json
    holds so was not given by this config, and is left out; None when no device is left and
    there is no record to extend. found: the hook's own record of the same container."""
    linux: Any = config_raw.get("linux") if isinstance(config_raw.get("linux"), dict) else {}
    nodes_in_config = {d.get("path"): d for d in linux.get("devices") or () if isinstance(d, dict)}
    mounts_in_config = {m.get("destination"): m for m in config_raw.get("mounts") or () if isinstance(m, dict)}
    resources: Any = linux.get("resources") if isinstance(linux.get("resources"), dict) else {}
    allowed = {(r.get("type"), r.get("major"), r.get("minor")) for r in resources.get("devices") or ()
               if isinstance(r, dict) and r.get("allow")}
    items = dict(found.items) if found is not None else {"net_devices": [], "rdt": None,
                                                         "hooks": {}, "holds": []}
    nodes, mounts, rules = list(items.get("nodes", ())), list(items.get("mounts", ())), list(items.get("rules", ()))
    devices = list(found.devices) if found is not None else []
    for name, today in resolved:
        got_nodes, got_mounts = [], []
        for p in today.nodes:
            entry = nodes_in_config.get(p.node.path)
            if entry is not None and (_char(entry.get("type")), entry.get("major"), entry.get("minor")) == (
                    _char(p.node.type), p.node.major, p.node.minor):
                node = p.node._replace(type=entry.get("type", p.node.type), file_mode=entry.get("fileMode"),
                                       uid=entry.get("uid"), gid=entry.get("gid"))
                got_nodes.append([p.origin, list(node), entry.get("uid"), entry.get("gid"), None, None])
        for origin, mount in today.mounts:
            entry = mounts_in_config.get(mount.container_path)
            if entry is not None and entry.get("source") == mount.host_path:
                got_mounts.append([origin, [mount.host_path, mount.container_path, list(entry.get("options") or ()),
                                            entry.get("type") or ""], _source_identity(mount.host_path), None])
        if not got_nodes and not got_mounts:
            continue
        known = {n[1][0] for n in nodes} | {m[1][1] for m in mounts}
        nodes += [n for n in got_nodes if n[1][0] not in known]
        mounts += [m for m in got_mounts if m[1][1] not in known]
        rules += [list(r) for r in today.device_rules if r.access and (r.type, r.major, r.minor) in allowed]
        devices.append(name)
    if found is None and not devices:
        return None
    items.update(nodes=nodes, mounts=mounts, rules=rules)
    if found is not None:
        bundle = found.bundle  # the runtime's spelling, which poststop compares
    return Record(container_id, pid, start_time, bundle, devices, found.sources if found is not None else {}, items,
                  work_of(items), config_identity(bundle),
                  # no createRuntime ran for a container only edited: no later stage of ours comes
                  found.entries if found is not None else [])


def _char(node_type: object) -> object:
    return "c" if node_type == "u" else node_type  # "u" (unbuffered) is a character device


# --- the plan a record describes --------------------------------------------------------

def given_plan(record: Record, devices: list[str] | None = None) -> Plan:
    """The part of the container's plan the record holds (nodes, rules, mounts, interfaces,
    RDT, later hooks), for the devices given (default: all), as plan.Plan, so the executors
    carry out a record as they carry out a plan."""
    return plan_of(record.items, record.devices, devices)


def plan_of(items: dict, recorded: list[str], devices: list[str] | None = None) -> Plan:
    """given_plan for items kept for the devices recorded (a container record's, or one
    attachment entry's)."""
    from cdi_hook.plan import DeviceRule, Plan, PlannedNode
    from cdi_hook.spec.model import DeviceNode, Hook, IntelRdt, Mount, NetDevice

    wanted = set(recorded if devices is None else devices)
    sharers = {(kind, path): origins for kind, path, origins in items.get("shared", ())}

    def wanted_origin(o: str) -> bool:
        return o in wanted or (o.endswith(" (spec-level)") and any(
            d.split("=", 1)[0] == o[:-len(" (spec-level)")] for d in wanted))

    def mine(origin: str, kind: str = "", path: str = "") -> bool:
        """An item is a device's when the device named it (it may be filed under another
        device that named it too) or it is a spec-level edit of the device's kind."""
        return any(wanted_origin(o) for o in sharers.get((kind, path), (origin,)))

    def label(origin: str, kind: str, path: str) -> str:
        """A shared item is named by a wanted device that asked for it, not by one taken back."""
        return origin if wanted_origin(origin) else next(o for o in sharers[(kind, path)] if wanted_origin(o))

    rdt = items.get("rdt")
    hooks = []
    for stage in POST_STAGES:
        stage_hooks = tuple((o, Hook(*_tuples(h))) for o, h in items.get("hooks", {}).get(stage, ()) if mine(o))
        if stage_hooks:
            hooks.append((stage, stage_hooks))
    return Plan(
        devices=tuple(d for d in recorded if d in wanted),
        nodes=tuple(PlannedNode(label(o, "node", node[0]), DeviceNode(*node), uid, gid)
                    for o, node, uid, gid, *_ in items.get("nodes", ()) if mine(o, "node", node[0])),
        device_rules=tuple(DeviceRule(*rule) for rule in items.get("rules", ()) if mine(rule[0])),
        mounts=tuple((label(o, "mount", m[1]), Mount(m[0], m[1], tuple(m[2]), m[3])) for o, m, _, _ in
                     items.get("mounts", ()) if mine(o, "mount", m[1])),
        env=(), hooks=tuple(hooks), additional_gids=(),
        intel_rdt=(rdt[0], IntelRdt(*_tuples(rdt[1]))) if rdt and mine(rdt[0]) else None,
        net_devices=tuple((o, NetDevice(*d)) for o, d in items.get("net_devices", ()) if mine(o)),
    )


def joined(plans: Iterable[Plan]) -> Plan:
    """One plan of several disjoint ones (devices given at creation, devices attached since)."""
    from cdi_hook.plan import Plan

    parts = list(plans)
    fields = {}
    for field in Plan._fields:
        if field == "intel_rdt":
            fields[field] = next((p.intel_rdt for p in parts if p.intel_rdt), None)
        else:
            fields[field] = tuple(item for p in parts for item in getattr(p, field))
    return Plan(**fields)


def _tuples(values: list) -> list:
    return [tuple(v) if isinstance(v, list) else v for v in values]


def node_outcomes(record: Record) -> dict[str, tuple[bool | None, str | None]]:
    """path -> (whether the hook made the node: False for one that was there already as the
    spec says, None when not known; the entry it replaced there, as "c 1:7 666 0:0", or None)."""
    return {node[1][0]: (node[4], node[5]) if len(node) > 5 else (None, None)
            for node in record.items.get("nodes", ())}


def held_keys(record: Record, devices: Iterable[str] | None = None) -> list[str]:
    """The hold keys the container took for its devices (default: all); a record of before
    keys lists device names, held by name."""
    from cdi_hook.live.holds import name_key

    wanted = None if devices is None else set(devices)
    keys: list[str] = []
    for entry in record.items.get("holds") or ():
        device, device_keys = (entry, [name_key(entry)]) if isinstance(entry, str) else entry
        if wanted is None or device in wanted:
            keys += device_keys
    return keys


def mount_identities(record: Record | dict) -> dict[str, tuple[tuple[int, int] | None, int | None]]:
    """destination -> (host source's (st_dev, st_ino) when it was given, the mount's id), of
    a record or of items (an attachment entry's)."""
    items = record if isinstance(record, dict) else record.items
    return {m[1]: ((src[0], src[1]) if src else None, mount_id) for _, m, src, mount_id, *_ in items.get("mounts", ())}


# --- stale: the record against today's specs ---------------------------------------------

def differences(given: Plan, today: Plan | None, sources: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """What changed between what one device gave the container (given: the record's items
    for it, its kind's spec-level edits included) and what today's specs make of it alone
    (today None: it resolves no more). Empty: not stale."""
    if today is None:
        return ["no spec describes it any more"]
    changes: list[str] = []

    def parts(plan: Plan) -> tuple[dict, dict]:
        nodes = {p.node.path: (p.node.type, p.node.major, p.node.minor) for p in plan.nodes}
        mounts = {m.container_path: m.host_path for _, m in plan.mounts}
        return nodes, mounts

    old_nodes, old_mounts = parts(given)
    new_nodes, new_mounts = parts(today)
    for path in old_nodes.keys() - new_nodes.keys():
        changes.append(f"node {path} is no longer in the spec")
    for path in new_nodes.keys() - old_nodes.keys():
        changes.append(f"node {path} is new in the spec")
    for path in old_nodes.keys() & new_nodes.keys():
        (t0, a0, b0), (t1, a1, b1) = old_nodes[path], new_nodes[path]
        if (t0, a0, b0) != (t1, a1, b1):
            changes.append(f"node {path} was {t0} {a0}:{b0}, is {t1} {a1}:{b1}")
    for path in old_mounts.keys() - new_mounts.keys():
        changes.append(f"mount {path} is no longer in the spec")
    for path in new_mounts.keys() - old_mounts.keys():
        changes.append(f"mount {path} (from {new_mounts[path]}) is new in the spec")
    for path in old_mounts.keys() & new_mounts.keys():
        if old_mounts[path] != new_mounts[path]:
            changes.append(f"mount {path} came from {old_mounts[path]}, now from {new_mounts[path]}")
        elif sources and old_mounts[path] in sources:
            # the same host path, replaced in place (an upgrade rewrote /usr/bin/nvidia-smi)
            identity = _source_identity(old_mounts[path])
            if identity is not None and tuple(identity) != sources[old_mounts[path]]:
                changes.append(f"mount {path}: its host source {old_mounts[path]} was replaced since")
    return sorted(changes)


def stale_devices(record: Record, spec_dirs: Iterable[str] | None,
                  only: list[str] | None = None) -> dict[str, list[str]]:
    """device -> what changed since the container got it, for each of its devices (or those
    of only) whose spec changed; each device is resolved alone, so one that is gone does not
    hide the others."""

    return stale_items(record.items, record.devices if only is None else [d for d in record.devices if d in only],
                       spec_dirs)


def stale_items(items: dict, devices: list[str], spec_dirs: Iterable[str] | None) -> dict[str, list[str]]:
    """stale_devices for items kept for devices (an attachment entry's too)."""
    from cdi_hook import plan

    stale: dict[str, list[str]] = {}
    for device in devices:
        try:
            today: Plan | None = plan.resolve([device], spec_dirs)
        except CdiError:
            today = None
        changes = differences(plan_of(items, devices, [device]), today, _sources(items))
        if changes:
            stale[device] = changes
    return stale


def _sources(items: dict) -> dict[str, tuple[int, int]]:
    """host source path -> the (st_dev, st_ino) it had when it was mounted."""
    return {m[0]: (src[0], src[1]) for _, m, src, *_ in items.get("mounts", ()) if src}
