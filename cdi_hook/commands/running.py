"""`cdi-hook verify | attach | detach CONTAINER ...`: devices of a container that runs.

CONTAINER is runc:ID, podman:NAME-OR-ID or pid:N (containers.py). The devices a container
has are the ones its config.json requested (cdi.k8s.io/ annotations) and the hook gave it,
less those detached since, plus those attached since (attachments.py keeps both lists).
Everything a device means comes from the same plan the hook uses (plan.resolve); the live
work in the container is live/attach.py's, the device cgroup's live/cgroups.py's.

All three are root's, of the host's user namespace, checked before anything is read: attach
and detach are the administrator's acts (the node's policy sees their requests as source
"admin"), and verify, though it changes nothing, enters the container's namespaces and
reads its device cgroup (BPF programs: CAP_SYS_ADMIN), and its answer describes the
container's devices. attach is all or nothing: the rootfs work is undone and the device
cgroup given its earlier rules back when any later step fails, the record's save included
(v1: only the rules attach added are denied; v2: the earlier prologue, the runtime's code
behind it unchanged). What cannot be changed in a process that already runs is
refused before anything changes: environment variables and additional GIDs (a running
process's environment and credentials are its own; only config.json can set them, for a
new container), network devices (the hook's poststop hands them back to the host from its
own record of the start, which an attached one would not be in), RDT (a container has one
RDT group, chosen at its start) and spec hooks (their stages have passed).
"""

from __future__ import annotations

import os
import sys

from cdi_hook.errors import CdiError, HookError, listed

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Sequence

    from cdi_hook.containers import Target
    from cdi_hook.live.cgroups import DeviceRule
    from cdi_hook.oci import Config
    from cdi_hook.plan import Plan, PlannedNode
    from cdi_hook.record import Record

RUNC_DEFAULT_ALLOWED = (  # runc's own rules beside config.json's (libcontainer/specconv.AllowedDevices)
    ("c", None, None, "m"), ("b", None, None, "m"), ("c", 1, 3, "rwm"), ("c", 1, 8, "rwm"),
    ("c", 1, 7, "rwm"), ("c", 5, 0, "rwm"), ("c", 1, 5, "rwm"), ("c", 1, 9, "rwm"),
    ("c", 136, None, "rwm"), ("c", 5, 2, "rwm"), ("c", 10, 200, "rwm"),
)


def _target(args: argparse.Namespace) -> Target:
    from cdi_hook import containers

    return containers.resolve(args.container, runc_root=args.runc_root, bundle=args.bundle,
                              crio_socket=args.crio_socket)


def _require_root(command: str) -> None:
    """The first thing each command does: nothing is read or changed before it. root means
    uid 0 of the host's user namespace: a root of another one (`unshare -r`) holds no power
    over the container, and would only fail half-way with a less clear error."""
    if os.geteuid() != 0 or not _host_user_namespace():
        raise CdiError(f"{command}: must run as root of the host: it enters the container's namespaces and reads "
                       "or changes its device cgroup, as the node's administrator")


def _host_user_namespace() -> bool:
    # The initial user namespace maps every uid to itself; any other maps a part.
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def _state(target: Target, spec_dirs: Sequence[str] | None = None) -> tuple[dict, Record | None, list[str], list[str]]:
    """(attachment record, container record or None, creation devices still given, attached
    devices). The devices given at creation are the container record's: what the hook gave,
    not what config.json asks today nor what today's specs would give. Devices a config.json
    editor applied are added to it the first time they are needed (record.with_edited_devices).
    A container started before records existed has none: its config.json's requests,
    resolved the older way."""
    from cdi_hook import attachments, record
    from cdi_hook.request import applied_devices, requested_devices

    attached = attachments.load(target.id, target.pid, target.start_time)
    given = record.load(target.id)
    if given is not None and (given.pid, given.start_time) != (target.pid, target.start_time):
        given = None  # an earlier container's under this id
    edited = [n for n in applied_devices(target.config.annotations) if given is None or n not in given.devices]
    if edited:
        given = _record_edited(target, given, edited, spec_dirs)
    requested = given.devices if given is not None else requested_devices(target.config.annotations)
    creation = [n for n in requested if n not in attached["detached"]]
    return attached, given, creation, attachments.attached_names(attached)


def _record_edited(target: Target, given: Record | None, edited: list[str],
                   spec_dirs: Sequence[str] | None) -> Record | None:
    """The container's record with the devices an editor applied to its config.json, derived
    now and saved, so later commands see what it got then, whatever the specs say later."""
    from cdi_hook import record

    from cdi_hook.request import pending_devices

    if given is None and pending_devices(target.config.annotations):
        return None  # the hook gave it devices before records existed: the older way for all
    resolved = []
    for name in edited:  # one at a time: a name no spec knows (any more) is left out, not fatal
        try:
            resolved.append((name, _resolve([name], spec_dirs, target.config)))
        except CdiError:
            continue
    derived = record.with_edited_devices(given, resolved, target.config.raw, target.pid, target.start_time,
                                         os.path.dirname(target.config.path), target.id)
    if derived is None or derived == given:
        return given
    record.save(derived)
    return derived


def _given_plan(target: Target, given: Record | None, names: list[str], spec_dirs: Sequence[str] | None) -> Plan:
    """What the devices given at creation are in the container: the record's items; for a
    container without a record, today's specs (the older way, the only one it has)."""
    if given is not None:
        from cdi_hook import record

        return record.given_plan(given, names)
    return _resolve(names, spec_dirs, target.config)


def _resolve(names: list[str], spec_dirs: Sequence[str] | None, config: Config) -> Plan:
    from cdi_hook import plan

    return plan.resolve(names, spec_dirs, process_uid=config.process_uid, process_gid=config.process_gid)


def _owner(planned: PlannedNode) -> tuple[int, int]:
    return (0 if planned.uid is None else planned.uid, 0 if planned.gid is None else planned.gid)


def _library_mounts(container_plan: Plan) -> list:
    from cdi_hook.live import ldcache

    return [(origin, m) for origin, m in container_plan.mounts
            if ldcache.is_library_name(m.container_path) and (m.type in ("", "bind", "rbind")
                                                              or {"bind", "rbind"} & set(m.options))]


def cmd_verify(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    _require_root("verify")
    target = _target(args)
    try:
        checks = _verify(target, spec_dirs)
    finally:
        os.close(target.pidfd)
    if args.format == "json":
        from cdi_hook import jsonio

        print(jsonio.dumps(checks))
    else:
        from cdi_hook.errors import printable

        for check in checks:
            if not check["ok"]:
                print(printable(f"{check['device']}: {check['item']}: {check['detail']}"))
        if all(check["ok"] for check in checks):
            print(f"{args.container}: {len(checks)} checks hold")
    return 0 if all(check["ok"] for check in checks) else 1


def _verify(target: Target, spec_dirs: Sequence[str] | None) -> list[dict]:
    from cdi_hook import attachments, containers, record
    from cdi_hook.live import attach

    _, given, creation, attached = _state(target, spec_dirs)
    names = creation + attached
    if not names:
        return []
    creation_plan = _given_plan(target, given, creation, spec_dirs) if creation else None
    attached_plan = _attached_plan(target, attached, spec_dirs) if attached else None
    container_plan = record.joined(p for p in (creation_plan, attached_plan) if p is not None)
    sources = {}
    identities = record.mount_identities(given) if given is not None else {}
    for entry in attachments.load(target.id, target.pid, target.start_time)["attached"]:
        if isinstance(entry.get("items"), dict):
            identities.update(record.mount_identities(entry["items"]))
    for _, mount in container_plan.mounts:
        recorded = identities.get(mount.container_path, (None, None))[0]
        if recorded is not None:
            sources[mount.host_path] = recorded  # what was mounted, even if the host file changed since
            continue
        try:
            st = os.stat(mount.host_path)
            sources[mount.host_path] = (st.st_dev, st.st_ino)
        except (OSError, TypeError):
            pass
    checks = attach.check_rootfs(target.pidfd, container_plan, _owner, sources)
    for rule in container_plan.device_rules:
        if rule.access:
            from cdi_hook.live import cgroups

            ok, detail = cgroups.check_cgroup(target.pid, cgroups.DeviceRule(rule.type, rule.major, rule.minor,
                                                                              rule.access))
            checks.append({"device": rule.origin, "item": f"cgroup {rule.type} {rule.major}:{rule.minor} {rule.access}",
                           "ok": ok, "detail": detail})
    if containers.has_exited(target.pidfd):  # the cgroup was read through /proc/PID: still that process?
        raise CdiError(f"container {target.name}: it stopped while cdi-hook verified it")
    # What was given holds; does it still match today's specs? A driver upgrade rewrites
    # them: the container then runs an older version of the device until it restarts.
    stale = record.stale_devices(given, spec_dirs, only=creation) if given is not None and creation else {}
    stale.update(_stale_attached(target, attached, spec_dirs))
    for device, changes in stale.items():
        checks.append({"device": device, "item": "spec", "ok": False, "stale": True,
                       "detail": "stale: the container runs an older version of it: " + "; ".join(changes)})
    return checks


def _stale_attached(target: Target | None, attached: list[str], spec_dirs: Sequence[str] | None,
                    entries: list[dict] | None = None) -> dict[str, list[str]]:
    """stale for the devices attached since the start, from their attachment entries."""
    from cdi_hook import attachments, record

    if entries is None:
        assert target is not None
        entries = attachments.load(target.id, target.pid, target.start_time)["attached"]
    stale: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("device") in attached and isinstance(entry.get("items"), dict):
            stale.update(record.stale_items(entry["items"], [entry["device"]], spec_dirs))
    return stale


def _refuse_unapplicable(new_plan: Plan) -> None:
    problems = []
    for items, what, why in (
            (new_plan.env, "environment variables", "a running process's environment is its own"),
            (new_plan.additional_gids, "additional GIDs", "a running process's groups are its own"),
            (new_plan.net_devices, "network devices",
             "the hook's poststop hands interfaces back from its record of the start"),
            (new_plan.intel_rdt and (new_plan.intel_rdt,), "RDT", "a container has one RDT group, chosen at its start"),
            (tuple(item for _, stage_hooks in new_plan.hooks for item in stage_hooks), "hooks",
             "their stages have passed")):
        if items:
            origins = ", ".join(dict.fromkeys(origin for origin, _ in items))
            problems.append(f"{origins}: {what} ({why})")
    if problems:
        raise CdiError(f"attach: refused, these cannot be given to a running container: {'; '.join(problems)}; "
                       "request the device when the container is created instead")


def cmd_attach(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    _require_root("attach")
    names = list(dict.fromkeys(args.devices))
    target = _target(args)
    from cdi_hook import attachments

    try:
        with attachments.locked(target.id):  # from the record's load to its save
            notes = _attach(target, names, spec_dirs)
    finally:
        os.close(target.pidfd)
    from cdi_hook.errors import printable

    for note in notes:
        print(printable(note))
    print(f"{args.container}: attached {', '.join(names)}")
    return 0


def _attach(target: Target, names: list[str], spec_dirs: Sequence[str] | None) -> list[str]:
    from cdi_hook import attachments, attribution, policy
    from cdi_hook.live import attach, cgroups, holds, inject

    record, given_record, creation, attached = _state(target, spec_dirs)
    current = creation + attached
    given = [n for n in names if n in current]
    if given:
        raise CdiError(f"attach: {', '.join(given)}: already given to container {target.name}")
    rules = policy.load()
    container = attribution.classify(target.config.annotations)
    requests = [attribution.Request(n, "", attribution.ADMIN, "attached by root with cdi-hook attach") for n in names]
    decisions = policy.decide(rules, container, requests)
    if not all(d.allowed for d in decisions):
        raise CdiError(policy.refusal_message(container, decisions))
    new_plan = _resolve(names, spec_dirs, target.config)
    _refuse_unapplicable(new_plan)
    current_plan = _current_plan(target, given_record, creation, attached, spec_dirs)
    if current_plan is not None:
        _refuse_conflicts(current_plan, new_plan)
    new_libraries = _library_mounts(new_plan)
    from cdi_hook.live import ldcache

    library_dirs = ldcache.library_dirs([m.container_path for _, m in
                                         (_library_mounts(current_plan) if current_plan else []) + new_libraries])
    work = attach.AttachWork(inject.node_jobs(new_plan), inject.mount_jobs(new_plan), library_dirs,
                             ", ".join(dict.fromkeys(o for o, _ in new_libraries)),
                             target.config.user_namespace, inject.host_ids_of_container_root(target.config))
    # held by what they are on the host (the plan's identities): an alias of a device another
    # container holds is refused as that device is
    held = new_plan.identity_of(new_plan.counted(policy.exclusive_devices(rules, names)))
    taken, cgroup, handle, report = [], None, None, None
    committed = False
    try:
        taken = holds.hold(held, target.id, target.pid, dict(new_plan.shares))
        handle = attach.start_attach(target.pidfd, work)
        report = handle.read()
        if not report.ok:
            raise CdiError(f"attach: {report.error}")
        cgroup = cgroups.CgroupChange(target.pid, inject.cgroup_rules(new_plan), ", ".join(names))
        cgroup.allow()
        mount_ids = {m.path: m.mount_id for m in report.mounts}
        from cdi_hook import record as container_record

        given_items = container_record.items_of(new_plan, report)
        for name in names:
            entry = _entry(name, new_plan, list(report.created), mount_ids, dict(held).get(name, ()))
            entry["items"] = given_items  # what it got, by identity: read instead of today's specs
            record["attached"].append(entry)
        attachments.save(record)
        committed = True
    finally:
        problems = []
        if not committed:
            if cgroup is not None:
                problems += cgroup.undo()
            try:
                holds.release(taken, target.id)
            except (OSError, HookError) as error:
                problems.append(str(error))
        if handle is not None:
            if report is not None and report.ok:
                problems += attach.finish_attach(handle, committed)
            else:  # it failed and undid its work: only reaped
                handle.close()
        if problems:
            print(f"cdi-hook: attach: undo incomplete: {'; '.join(problems)}", file=sys.stderr)
    return list(report.notes) if report is not None else []


def _current_plan(target: Target, given_record: Record | None, creation: list[str], attached: list[str],
                  spec_dirs: Sequence[str] | None) -> Plan | None:
    """What the container has now: the record's items for the devices given at creation,
    the devices attached since as today's specs describe them; None when it has none."""
    from cdi_hook import record

    plans = [_given_plan(target, given_record, creation, spec_dirs)] if creation else []
    if attached:
        plans.append(_attached_plan(target, attached, spec_dirs))
    return record.joined(plans) if plans else None


def _attached_plan(target: Target, attached: list[str], spec_dirs: Sequence[str] | None) -> Plan:
    """The devices attached since the start, as their attachment entries keep them (what
    attach gave); an entry an older cdi-hook wrote keeps no items: today's specs for it."""
    from cdi_hook import attachments, record

    entries = {e["device"]: e for e in attachments.load(target.id, target.pid, target.start_time)["attached"]}
    plans, older = [], []
    for name in attached:
        items = entries.get(name, {}).get("items")
        if isinstance(items, dict):
            plans.append(record.plan_of(items, [name], [name]))
        else:
            older.append(name)
    if older:
        plans.append(_resolve(older, spec_dirs, target.config))
    return record.joined(plans)


def _refuse_conflicts(current_plan: Plan, new_plan: Plan) -> None:
    nodes = {p.node.path: p for p in current_plan.nodes}
    for planned in new_plan.nodes:
        old = nodes.get(planned.node.path)
        if old and (old.node.type, old.node.major, old.node.minor) != (planned.node.type, planned.node.major,
                                                                      planned.node.minor):
            raise CdiError(f"attach: {planned.origin}: node {planned.node.path} is {old.origin}'s, another device")
    destinations = {m.container_path: origin for origin, m in current_plan.mounts}
    for origin, mount in new_plan.mounts:
        if mount.container_path in destinations:
            raise CdiError(f"attach: {origin}: {mount.container_path} is mounted already, for "
                           f"{destinations[mount.container_path]}")


def _entry(name: str, new_plan: Plan, created: list[str], mount_ids: dict[str, int], hold_keys: Iterable[str]) -> dict:
    """What attach gave the container for one device; each mount with the id it got in the
    container's mount table (None when attach found it mounted already), and the keys of
    its exclusive hold, for detach."""
    nodes = [p for p in new_plan.nodes if p.origin == name]
    mount_list = [m for origin, m in new_plan.mounts if origin == name]
    own = {p.node.path for p in nodes} | {m.container_path for m in mount_list}
    from cdi_hook.live.attach import path_and_parents

    mine = set(path_and_parents(own))
    return {
        "device": name,
        "nodes": [[p.node.path, p.node.type, p.node.major or 0, p.node.minor or 0] for p in nodes],
        "mounts": [[m.container_path, m.host_path, m.type, list(m.options), mount_ids.get(m.container_path)]
                   for m in mount_list],
        "rules": [[r.type, r.major, r.minor, r.access] for r in new_plan.device_rules if r.origin == name and r.access],
        "created": [p for p in created if p in mine],
        "holds": list(hold_keys),
    }


def cmd_detach(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    _require_root("detach")
    names = list(dict.fromkeys(args.devices))
    target = _target(args)
    from cdi_hook import attachments

    try:
        with attachments.locked(target.id):  # from the record's load to its save
            notes, problems = _detach(target, names, spec_dirs)
    finally:
        os.close(target.pidfd)
    from cdi_hook.errors import printable

    for note in notes:
        print(printable(note))
    for problem in problems:
        print(printable(f"cdi-hook: detach: {problem}"), file=sys.stderr)
    if problems:
        return 1
    print(f"{args.container}: detached {', '.join(names)} (a process that has a node open keeps its open file)")
    return 0


def _detach(target: Target, names: list[str], spec_dirs: Sequence[str] | None) -> tuple[list[str], list[str]]:
    from cdi_hook import attachments
    from cdi_hook.live import attach, cgroups, holds, inject, ldcache
    from cdi_hook.live.cgroups import DeviceRule

    record, given, creation, attached = _state(target, spec_dirs)
    unknown = [n for n in names if n not in creation and n not in attached]
    if unknown:
        raise CdiError(f"detach: {listed(unknown)}: not given to container {target.name}")
    remaining_plan = _current_plan(target, given, [n for n in creation if n not in names],
                                   [n for n in attached if n not in names], spec_dirs)
    from_creation = [n for n in names if n in creation]
    # Exactly what the container got, from its record: never today's specs, which after a
    # driver upgrade name other nodes and libraries than the ones in the container.
    creation_plan = _given_plan(target, given, from_creation, spec_dirs) if from_creation else None
    from cdi_hook import record as container_record

    identities = container_record.mount_identities(given) if given is not None else {}
    from_record = {m.container_path for _, m in creation_plan.mounts} if creation_plan and given is not None else set()
    entries = {e["device"]: e for e in record["attached"] if e["device"] in names}

    keep_nodes = {p.node.path for p in remaining_plan.nodes} if remaining_plan else set()
    keep_mounts = {m.container_path for _, m in remaining_plan.mounts} if remaining_plan else set()
    keep_rules = {(r.type, r.major, r.minor) for r in remaining_plan.device_rules} if remaining_plan else set()
    runtime_nodes = {d.get("path") for d in target.config.raw.get("linux", {}).get("devices", []) or []
                     if isinstance(d, dict)}

    nodes, mount_list, rules, created, library_paths = [], [], [], [], []
    outcomes = container_record.node_outcomes(given) if given is not None else {}
    for planned in creation_plan.nodes if creation_plan else ():
        node = planned.node
        if node.path not in keep_nodes:
            # a node the hook found already there as the spec says stays: the container had
            # it; one it replaced comes back as it was
            made, replaced = outcomes.get(node.path, (None, None))
            remove = node.path not in runtime_nodes and made is not False
            nodes.append((planned.origin, node.path, node.type, os.makedev(node.major or 0, node.minor or 0), remove,
                          replaced if remove else None))
    for origin, mount in creation_plan.mounts if creation_plan else ():
        # the mount's id as the hook saw it (a record has it): found wherever the container moved it
        mount_list.append((origin, mount.container_path, mount.host_path, mount.type, list(mount.options),
                           identities.get(mount.container_path, (None, None))[1]))
    for rule in creation_plan.device_rules if creation_plan else ():
        if rule.access:
            rules.append((rule.origin, rule.type, rule.major, rule.minor, rule.access))
    for name, entry in entries.items():
        for path, kind, major, minor in entry["nodes"]:
            if path not in keep_nodes:
                nodes.append((name, path, kind, os.makedev(major, minor), path in entry["created"], None))
        for destination, host_path, kind, options, *recorded in entry["mounts"]:  # no id: an older record
            mount_list.append((name, destination, host_path, kind, options, recorded[0] if recorded else None))
        for kind, major, minor, access in entry["rules"]:
            rules.append((name, kind, major, minor, access))
        created += entry["created"]
    keep_paths = set(_ancestors_of(keep_nodes | keep_mounts))
    created = [p for p in dict.fromkeys(sorted(created, key=lambda p: p.count("/"))) if p not in keep_paths]

    mounts_work = []
    for origin, destination, host_path, kind, options, recorded_id in mount_list:
        if destination in keep_mounts:
            continue
        bind = kind in ("", "bind", "rbind") or bool({"bind", "rbind"} & set(options))
        source = None
        recorded = identities.get(destination, (None, None))[0] if destination in from_record else None
        if bind and recorded is not None:
            source = recorded  # the identity the hook saw when it mounted it
        elif bind:
            try:
                st = os.stat(host_path)
                source = (st.st_dev, st.st_ino)
            except OSError as error:
                raise CdiError(f"detach: {origin}: host source {host_path}: {error.strerror}; cannot tell "
                               "its mount in the container") from None
        mounts_work.append((origin, destination, source, kind, recorded_id))
        if bind and ldcache.is_library_name(destination):
            library_paths.append(destination)

    notes, problems = [], []
    withdraw: list[DeviceRule]
    runtime_kept: list[DeviceRule]
    withdraw, runtime_kept = [], []
    for origin, kind, major, minor, access in rules:
        if (kind, major, minor) in keep_rules:
            continue
        rule = DeviceRule(kind, major, minor, access)
        (runtime_kept if _runtime_allows(target.config, rule) else withdraw).append(rule)
    for rule in runtime_kept:
        notes.append(f"device cgroup: {rule} stays allowed: the runtime's own rules allow it")
    # The record as it will be when every device goes, written beside the old one before
    # anything is taken away: a full or read-only records folder fails here, one line, with
    # the container unchanged (the record is what keeps a device held while it is reachable).
    expected = dict(record, attached=[e for e in record["attached"] if e["device"] not in names],
                    detached=list(dict.fromkeys(record["detached"] + from_creation)))
    pending = attachments.prepare(expected)
    try:
        # Access first: from here on no new open of the device succeeds. When it cannot be
        # taken away nothing else is done: the record keeps the device attached, for a later detach.
        try:
            notes += cgroups.withdraw(target.pid, withdraw, ", ".join(names))
        except CdiError as error:
            raise CdiError(f"detach: {error}; nothing else was changed: {listed(names)} stay attached") from None
        remaining_libraries = ldcache.library_dirs([m.container_path for _, m in _library_mounts(remaining_plan)]) \
            if remaining_plan else []
        work = attach.DetachWork(nodes, mounts_work, created, remaining_libraries, bool(library_paths),
                                 ", ".join(names), inject.host_ids_of_container_root(target.config))
        report = attach.run_detach(target.pidfd, work)
        if not report.ok:
            problems.append(report.error or "the worker in the container failed")
        notes += report.notes
        problems += report.problems
        # A device is gone when every node and mount of it is: one the worker could not take back
        # (covered by another mount, no longer the device's node) stays given, and held, so that
        # no second container gets it while this one can still reach it; detach again finishes it.
        left = _devices_of(report.failed, names) if report.ok else list(names)
        gone = [n for n in names if n not in left]
        record["attached"] = [e for e in record["attached"] if e["device"] not in gone]
        record["detached"] = list(dict.fromkeys(record["detached"] + [n for n in from_creation if n in gone]))
        try:
            if record == expected:
                attachments.commit(pending, target.id)
            else:
                pending.discard()
                attachments.save(record)
        except CdiError as error:
            raise CdiError(f"detach: {error}; {listed(gone)} taken away but still recorded as given to container "
                           f"{target.name}, and held") from None
    finally:
        pending.discard()  # nothing when committed
    if left:
        problems.append(f"{listed(left)}: not everything of it could be taken back: it stays given to container "
                        f"{target.name} (its device cgroup access withdrawn) and stays held; detach it again")
    still = [n for n in creation + attached if n not in gone]
    keep = set(_hold_keys(still, given, remaining_plan, _entries_of(record, still)))
    release = [k for k in _hold_keys(gone, given, creation_plan, entries) if k not in keep]
    try:
        holds.release(release, target.id, target.pid, target.start_time)
    except (OSError, CdiError) as error:
        problems.append(str(error))
    return notes, problems


def _entries_of(record: dict, names: Iterable[str]) -> dict[str, dict]:
    wanted = set(names)
    return {e["device"]: e for e in record["attached"] if e["device"] in wanted}


def _devices_of(origins: Iterable[str], names: list[str]) -> list[str]:
    """The devices detached whose items are the origins given: a device's own, or a spec-level
    edit of its kind (the kind's devices all keep it); anything else: all of them."""
    found: dict[str, None] = {}
    for origin in origins:
        if origin in names:
            found[origin] = None
        elif origin.endswith(" (spec-level)"):
            kind = origin[:-len(" (spec-level)")]
            found.update(dict.fromkeys(n for n in names if n.split("=", 1)[0] == kind))
        else:
            found.update(dict.fromkeys(names))
    return [n for n in names if n in found]


def _hold_keys(names: list[str], given: Record | None, resolved: Plan | None, entries: dict[str, dict]) -> list[str]:
    """The exclusive-hold keys of the named devices: an attached one's from its attachment
    entry, one given at creation from the container's record (or, without a record, from
    today's specs); the hold by name of before keys too, which releasing only removes when
    it is this container's."""
    from cdi_hook import record as container_record
    from cdi_hook.live.holds import name_key

    keys: list[str] = []
    for name in names:
        if name in entries:
            keys += entries[name].get("holds") or [name_key(name)]
        elif given is not None:
            keys += container_record.held_keys(given, [name])
        else:
            keys += [k for _, device_keys in (resolved.identity_of([name]) if resolved else ())
                     for k in device_keys] + [name_key(name)]
    return keys


def _ancestors_of(paths: Iterable[str]) -> list[str]:
    from cdi_hook.live.attach import path_and_parents

    return path_and_parents(paths)


def _runtime_allows(config: Config, rule: DeviceRule) -> bool:
    """Whether the runtime itself allows the rule: config.json's linux.resources.devices
    (the last matching entry decides, as runc applies them in order) or runc's defaults."""
    entries = config.raw.get("linux", {}).get("resources", {}).get("devices", []) or []
    allowed = False
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        kind = entry.get("type") or "a"
        if (kind in ("a", rule.type) and entry.get("major") in (None, rule.major)
                and entry.get("minor") in (None, rule.minor)
                and (not entry.get("allow") or set(rule.permissions) <= set(entry.get("access") or "rwm"))):
            allowed = bool(entry.get("allow"))
    if allowed:
        return True
    return any(kind == rule.type and major in (None, rule.major) and minor in (None, rule.minor)
               and set(rule.permissions) <= set(access) for kind, major, minor, access in RUNC_DEFAULT_ALLOWED)


def cmd_stale(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    """Every running container cdi-hook gave devices to whose devices no longer match today's
    specs, from the records. It changes one thing: the records of containers that ended and
    that no poststop of cdi-hook's will come for (record.prune) are removed; the record of
    any other container that ended is left for its poststop."""
    _require_root("stale")
    from cdi_hook import attachments, jsonio, record
    from cdi_hook.errors import printable

    pruned = record.prune()
    if pruned:
        print(f"cdi-hook: stale: removed the records of {len(pruned)} ended container(s) no poststop comes for",
              file=sys.stderr)
    found = []
    attachment_records = {r["container"]: r for r in attachments.live_records()}
    for given, where in record.all_records():
        if given is None:
            print(printable(f"cdi-hook: stale: {where}: not a record cdi-hook wrote; skipped"), file=sys.stderr)
            continue
        if not record.is_alive(given):
            # Ended, maybe not yet deleted: its poststop (at the runtime's delete) still reads
            # the record (prune above removed those no poststop comes for).
            continue
        attachment = attachment_records.pop(given.container, None) or attachments.empty(
            given.container, given.pid, given.start_time)
        if (attachment["pid"], attachment["start_time"]) != (given.pid, given.start_time):
            attachment = attachments.empty(given.container, given.pid, given.start_time)
        still = [d for d in given.devices if d not in attachment["detached"]]
        devices = record.stale_devices(given, spec_dirs, only=still)
        devices.update(_stale_attached(None, attachments.attached_names(attachment), spec_dirs,
                                       attachment["attached"]))
        if devices:
            found.append({"container": given.container, "name": _runtime_name(given.bundle), "pid": given.pid,
                          "bundle": given.bundle, "devices": devices})
    for attachment in attachment_records.values():  # devices attached to a container the hook gave none
        devices = _stale_attached(None, attachments.attached_names(attachment), spec_dirs, attachment["attached"])
        if devices:
            found.append({"container": attachment["container"], "name": "", "pid": attachment["pid"],
                          "bundle": "", "devices": devices})
    if args.format == "json":
        print(jsonio.dumps(found))
    else:
        for item in found:
            name = f" ({item['name']})" if item["name"] else ""
            changed = ", ".join(f"{d} ({'; '.join(changes)})" for d, changes in item["devices"].items())
            print(printable(f"{item['container']}{name}: {changed}"))
        if not found:
            print("no running container has a device whose spec changed since it started")
    return 1 if found else 0


def _runtime_name(bundle: str) -> str:
    """The name Kubernetes (CRI-O, containerd) gives the container, from its config.json's
    annotations; "" when it has none (runc's and Podman's id is the name)."""
    from cdi_hook import oci

    try:
        annotations = oci.read_config(bundle).annotations
    except (CdiError, OSError):
        return ""
    pod = [annotations.get(k, "") for k in ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name",
                                             "io.kubernetes.container.name")]
    return "/".join(pod) if all(pod) else ""
