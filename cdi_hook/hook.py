"""`cdi-hook hook`: inject the requested CDI devices into a container the runtime is creating.

Flow: OCI state -> config.json -> requested names (minus those a config.json editor already
applied) -> plan -> at createRuntime/prestart: rootfs work in a worker inside the container's
mount namespace (nodes, mounts, ld cache), device cgroup, network devices, RDT, then the
spec's hooks for this stage; at other stages only the spec's hooks (and at poststop the
network devices go home). Any failure undoes the rootfs work and exits non-zero with one line.

Imports are lazy: a container that asks for no device costs a JSON parse and nothing more.
"""

from __future__ import annotations

import os
import posixpath

from cdi_hook.errors import CdiError, HookError

INJECTION_STAGES = ("createRuntime", "prestart")


def run(stage: str, spec_dirs: list[str] | None, stdin) -> int:
    from cdi_hook import oci

    state = oci.parse_state(stdin.read(oci.MAX_STATE_SIZE + 1))
    config = oci.read_config(state.bundle)
    names = devices_to_apply(state, config)
    if not names:
        return 0

    from cdi_hook.log import ContainerLog

    log = ContainerLog(state.id, stage, names)
    try:
        from cdi_hook import registry

        plan = registry.resolve(names, spec_dirs)
        apply_plan(stage, plan, state, config, log)
    except CdiError as error:
        log.finish(error=str(error))
        raise
    log.finish()
    return 0


def devices_to_apply(state, config) -> list[str]:
    """Requested names from the state's and config.json's annotations, minus already applied ones."""
    annotation_maps = (state.annotations, config.annotations)
    if not any(key.startswith("cdi.k8s.io/") for m in annotation_maps for key in m):
        return []
    from cdi_hook.request import APPLIED_ANNOTATION, requested_devices

    applied = {name.strip() for m in annotation_maps for name in m.get(APPLIED_ANNOTATION, "").split(",")}
    return [name for name in requested_devices(*annotation_maps) if name not in applied]


def apply_plan(stage: str, plan, state, config, log) -> None:
    # One invocation injects, at prestart or createRuntime, whichever the runtime was given:
    # it runs the spec's hooks of both stages (prestart first, as runtimes order them).
    hook_stages = ("prestart", "createRuntime") if stage in INJECTION_STAGES else (stage,)
    stage_hooks = [(origin, hook) for name in hook_stages for origin, hook in plan.each("hooks")
                   if hook.hook_name == name]
    if stage not in INJECTION_STAGES:
        if stage == "poststop":
            _return_net_devices(state, config, plan, log)
            _release_rdt(state, plan, log)
        _run_spec_hooks(stage_hooks, state)
        return

    if not state.pid:
        raise CdiError(f"OCI state on stdin: pid: missing, needed at {stage} to reach the container")
    from cdi_hook import oci

    pidfd = oci.check_container_process(state.pid, config.rootfs)
    try:
        _warn_unapplicable(plan, log)
        node_jobs = _node_jobs(plan, config)
        worker = _start_rootfs_work(pidfd, config, node_jobs, plan, log)
    finally:
        os.close(pidfd)
    committed = False
    net_devices = list(plan.each("net_devices"))
    moved_net_devices = False
    try:
        _allow_devices(state.pid, node_jobs)
        rdt_part = _rdt_part(plan)
        if rdt_part:
            from cdi_hook.live import rdt

            rdt.apply(state.pid, *rdt_part, container_id=state.id)
        # Interfaces move last before the spec hooks: a moved veth dies with a container that
        # never starts, so everything that can fail on its own comes first.
        if net_devices:
            from cdi_hook.live import netdev

            netdev.move_into_container(state.pid, net_devices)
            moved_net_devices = True
        _run_spec_hooks(stage_hooks, state)
        committed = True
    finally:
        if moved_net_devices and not committed:
            _return_net_devices(state, config, plan, log)
        if worker is not None:
            for problem in worker.finish(commit=committed):
                log.warning(f"undo: {problem}")


def _run_spec_hooks(stage_hooks, state) -> None:
    if stage_hooks:  # spechooks imports subprocess (~2 ms): only when a spec has hooks to run
        from cdi_hook.live import spechooks

        spechooks.run_hooks(stage_hooks, state.raw)


def _return_net_devices(state, config, plan, log) -> None:
    """At poststop the container is gone already: a device that cannot go home is a warning."""
    net_devices = list(plan.each("net_devices"))
    if not net_devices:
        return
    from cdi_hook.live import netdev

    try:
        for note in netdev.return_to_host(state, config, net_devices):
            log.note(note)
    except CdiError as error:
        log.warning(str(error))


def _node_jobs(plan, config):
    from cdi_hook.hostdev import complete_node
    from cdi_hook.live.devices import NodeJob, default_owner

    jobs = []
    for origin, node in plan.each("device_nodes"):
        node = complete_node(node, origin)
        uid, gid = default_owner(config.process_uid, config.process_gid, node)
        jobs.append(NodeJob(origin, node, uid, gid))
    return jobs


def _start_rootfs_work(pidfd: int, config, node_jobs, plan, log):
    from cdi_hook.live import mounts

    # A destination named twice (spec-level and device-level, say): the later one replaces the
    # earlier, as the CDI reference does when it edits config.json; never two stacked mounts.
    last_for_destination = {}
    for origin, mount in plan.each("mounts"):
        last_for_destination.pop(posixpath.normpath("/" + mount.container_path), None)
        last_for_destination[posixpath.normpath("/" + mount.container_path)] = (origin, mount)
    mount_jobs = []
    for origin, mount in last_for_destination.values():
        options = mounts.parse_options(mount)
        if options.ignored:
            log.warning(f"{origin}: mount {mount.container_path}: options {','.join(options.ignored)} "
                        "mean nothing for a bind mount; ignored")
        mount_jobs.append(mounts.MountJob(origin, mount, options))
    if not node_jobs and not mount_jobs:
        return None
    from cdi_hook.live import worker

    work = worker.RootfsWork(config.rootfs, node_jobs, mount_jobs, by_bind_mount=config.user_namespace,
                             creator_ids=_host_ids_of_container_root(config))
    handle = worker.start(pidfd, work)
    report = handle.wait_report()
    for note in report.get("notes", []):
        log.note(note)
    return handle


def _host_ids_of_container_root(config) -> tuple[int, int] | None:
    if not config.user_namespace:
        return None

    def host_id(mappings) -> int:
        for m in mappings:
            if m.container_id <= 0 < m.container_id + m.size:
                return m.host_id - m.container_id
        return 0  # no mapping given: the runtime maps our root, nothing better to use

    return host_id(config.uid_mappings), host_id(config.gid_mappings)


def _allow_devices(pid: int, node_jobs) -> None:
    rules_by_origin = [(job.origin, job.node) for job in node_jobs if job.node.type in ("b", "c", "u")]
    if not rules_by_origin:
        return
    from cdi_hook.live import cgroups

    rules = [cgroups.DeviceRule("c" if node.type == "u" else node.type, node.major, node.minor,
                                node.permissions or "rwm") for _, node in rules_by_origin]
    try:
        cgroups.allow_devices(pid, rules)
    except HookError as error:
        # cgroups speaks in numbers ("c 10:232"); the user asked for CDI names.
        origins = ", ".join(dict.fromkeys(origin for origin, _ in rules_by_origin))
        raise HookError(error.step, origins, f"{error.device}: {error.detail}" if error.device else error.detail) from None


def _warn_unapplicable(plan, log) -> None:
    """env and additionalGids belong to config.json; a live hook is too late for them."""
    for field, what in (("env", "environment variables"), ("additional_gids", "additional GIDs")):
        by_origin: dict[str, list[str]] = {}
        for origin, item in plan.each(field):
            by_origin.setdefault(origin, []).append(str(item).split("=", 1)[0])
        for origin, items in by_origin.items():
            log.warning(f"{origin}: {what} {', '.join(items)} cannot be applied by a live hook; "
                        "use `cdi-hook precreate` or `cdi-hook inject --mode edits` for them")


def _rdt_part(plan):
    """(origin, IntelRdt) of the last part that sets one: a container has one RDT group (plan.merged)."""
    parts = [(part.origin, part.edits.intel_rdt) for part in plan.parts if part.edits.intel_rdt is not None]
    return parts[-1] if parts else None


def _release_rdt(state, plan, log) -> None:
    """At poststop the container's MON group (and a group named after it) goes; failures only warn."""
    rdt_part = _rdt_part(plan)
    if not rdt_part:
        return
    from cdi_hook.live import rdt

    try:
        rdt.release(*rdt_part, container_id=state.id)
    except CdiError as error:
        log.warning(str(error))
