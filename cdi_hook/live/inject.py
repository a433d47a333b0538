"""The live injector: carry out a Plan on a container the runtime is creating.

An executor of plan.Plan, like config_editor.py; it decides nothing about what a device
means. At createRuntime (or prestart, whichever the runtime was given), in the order a
runtime orders its own stages: the rootfs work in a worker inside the container's mount
namespace (nodes, mounts, ld cache) beside the device cgroup, then RDT, network devices,
the spec's prestart and createRuntime hooks (here, in the runtime's namespaces), then the
spec's createContainer hooks (run by the worker in the container's namespaces, before the
runtime pivots: live/containerhooks.py), then commit. A spec with startContainer hooks is
refused before anything changes: they run inside the container after pivot_root, which a
hook cannot reach; the config.json editors (`precreate`, `inject --mode edits`) hand them
to the runtime. At other stages only the spec's hooks of that stage (and at poststop the
network devices go home and the RDT monitoring group goes). Any failure undoes the rootfs
work and reaches the CLI as one line naming the step and the device.
"""

from __future__ import annotations

import os

from cdi_hook.errors import CdiError, HookError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from cdi_hook.live.cgroups import DeviceRule
    from cdi_hook.live.child import Report
    from cdi_hook.live.devices import NodeJob
    from cdi_hook.live.mounts import MountJob
    from cdi_hook.live.worker import Worker
    from cdi_hook.log import ContainerLog
    from cdi_hook.oci import Config, IdMapping, State
    from cdi_hook.plan import Plan
    from cdi_hook.spec.model import Hook

INJECTION_STAGES = ("createRuntime", "prestart")


def run_stage(stage: str, plan: Plan, state: State, config: Config, log: ContainerLog,
              spec_hooks: bool = True, before_commit: Callable[[Report | None], None] | None = None) -> Report | None:
    """spec_hooks=False: at poststop, only undo what createRuntime did (a request the policy
    no longer honours gets no spec hook run). At an injection stage: the worker's READY
    report (what it made, by identity: for the container record), or None without one;
    before_commit(report) runs once every step succeeded, before the undo journal is
    dropped: if it fails (the container record cannot be written), everything is undone."""
    if stage not in INJECTION_STAGES:
        if stage == "poststop":
            _return_net_devices(state, config, plan, log)
            _release_rdt(state, plan, log)
        if spec_hooks:
            with log.step("spec hooks"):
                _run_spec_hooks(plan.hooks_at(stage), state)
        return None
    return inject(stage, plan, state, config, log, before_commit)


def inject(stage: str, plan: Plan, state: State, config: Config, log: ContainerLog,
           before_commit: Callable[[Report | None], None] | None = None) -> Report | None:
    if not state.pid:
        raise CdiError(f"OCI state on stdin: pid: missing, needed at {stage} to reach the container")
    _refuse_start_container_hooks(plan)
    from cdi_hook import oci

    pidfd = oci.check_container_process(state.pid, config.rootfs)
    try:
        _warn_unapplicable(plan, config, log)
        with log.step("worker"):
            worker = _start_rootfs_work(pidfd, config, plan, log, state)
    finally:
        os.close(pidfd)
    committed = False
    moved_net_devices = False
    made = None
    try:
        # The device cgroup is the runtime's, on the host: opened while the worker works in
        # the container (on another CPU). The two steps are independent; if either fails,
        # the worker undoes its work and the container never runs (its cgroup goes with it).
        with log.step("device cgroup"):
            _allow_devices(state.pid, plan)
        if worker is not None:
            with log.step("worker"):
                made = _wait_rootfs_work(worker, log)
        if plan.intel_rdt:
            from cdi_hook.live import rdt

            with log.step("rdt"):
                rdt.apply(state.pid, *plan.intel_rdt, container_id=state.id)
        # Interfaces move last before the spec hooks: a moved veth dies with a container that
        # never starts, so everything that can fail on its own comes first.
        if plan.net_devices:
            from cdi_hook.live import netdev

            with log.step("netdev"):
                netdev.move_into_container(state.pid, list(plan.net_devices), state.id)
            moved_net_devices = True
        # One invocation injects, at prestart or createRuntime, whichever the runtime was
        # given: it runs the spec's hooks of both stages (prestart first, as runtimes order them).
        with log.step("spec hooks"):
            _run_spec_hooks(plan.hooks_at("prestart", "createRuntime"), state)
        if worker is not None and worker.runs_container_hooks:
            with log.step("createContainer hooks"):
                worker.run_container_hooks()
        if before_commit is not None:
            before_commit(made)
        committed = True
    finally:
        if moved_net_devices and not committed:
            _return_net_devices(state, config, plan, log)
        if worker is not None:
            for problem in worker.finish(commit=committed):
                log.warning(f"undo: {problem}")
    return made


def _run_spec_hooks(hooks: list[tuple[str, Hook]], state: State) -> None:
    if hooks:  # spechooks imports subprocess (~2 ms): only when a spec has hooks to run
        from cdi_hook.live import spechooks

        spechooks.run_hooks(hooks, state.raw)


def _return_net_devices(state: State, config: Config, plan: Plan, log: ContainerLog) -> None:
    """At poststop the container is gone already: a device that cannot go home is a warning."""
    if not plan.net_devices:
        return
    from cdi_hook.live import netdev

    try:
        for note in netdev.return_to_host(state, config, list(plan.net_devices)):
            log.note(note)
    except CdiError as error:
        log.warning(str(error))


def node_jobs(plan: Plan) -> list[NodeJob]:
    """The worker's device node jobs, in plan order. The plan's None owner is the runtime's
    default: the container's root."""
    from cdi_hook.live.devices import NodeJob

    return [NodeJob(p.origin, p.node, 0 if p.uid is None else p.uid, 0 if p.gid is None else p.gid)
            for p in plan.nodes]


def mount_jobs(plan: Plan) -> list[MountJob]:
    """The worker's mount jobs, in plan order (parents before children)."""
    from cdi_hook.live import mounts

    return [mounts.MountJob(origin, mount, mounts.parse_options(mount)) for origin, mount in plan.mounts]


def cgroup_rules(plan: Plan) -> list[DeviceRule]:
    """The device cgroup rules to add. A planned rule with no access ("none") allows nothing,
    so it adds nothing: the runtime's deny stays."""
    from cdi_hook.live import cgroups

    return [cgroups.DeviceRule(r.type, r.major, r.minor, r.access) for r in plan.device_rules if r.access]


def _refuse_start_container_hooks(plan: Plan) -> None:
    """startContainer hooks run inside the container after pivot_root, just before the user's
    program: a hook, which runs before the runtime pivots, has no faithful way to run them."""
    hooks = plan.hooks_at("startContainer")
    if hooks:
        from cdi_hook.errors import listed

        paths = listed(dict.fromkeys(hook.path for _, hook in hooks))
        raise HookError("spec hook", listed(dict.fromkeys(origin for origin, _ in hooks)),
                        f"startContainer hook {paths} runs inside the container after pivot_root, which "
                        "a live hook cannot do; use `cdi-hook precreate` or `cdi-hook inject --mode edits`, "
                        "which hand it to the runtime")


def _start_rootfs_work(pidfd: int, config: Config, plan: Plan, log: ContainerLog, state: State) -> Worker | None:
    nodes, mounts = node_jobs(plan), mount_jobs(plan)
    for job in mounts:
        if job.options.ignored:
            log.warning(f"{job.origin}: mount {job.mount.container_path}: options {','.join(job.options.ignored)} "
                        "mean nothing for a bind mount; ignored")
    container_hooks = plan.hooks_at("createContainer")
    if not nodes and not mounts and not container_hooks:
        return None
    from cdi_hook.live import worker

    programs, hook_state = [], b""
    if container_hooks:
        from cdi_hook.live import containerhooks

        # Opened here, on the host and before anything changes: a missing program stops the
        # start with nothing done; the worker inherits the fds across its fork.
        programs = containerhooks.open_programs(container_hooks)
    try:
        if programs:
            hook_state = containerhooks.container_state(state.raw, state.pid)
        work = worker.RootfsWork(config.rootfs, nodes, mounts, by_bind_mount=config.user_namespace,
                                 creator_ids=host_ids_of_container_root(config),
                                 container_hooks=programs, hook_state=hook_state)
        return worker.start(pidfd, work)
    finally:
        if programs:
            containerhooks.close_programs(programs)  # the worker has its own copies


def _wait_rootfs_work(handle: Worker, log: ContainerLog) -> Report:
    """The worker's READY report, its notes and step times logged; CdiError when it failed
    (it has undone its work and exited then)."""
    report = handle.wait_report()
    for note in report.notes:
        log.note(note)
    for step, ms in (report.steps_ms or {}).items():
        log.record_step(step, ms)
    return report


def host_ids_of_container_root(config: Config) -> tuple[int, int] | None:
    if not config.user_namespace:
        return None

    def host_id(mappings: Iterable[IdMapping]) -> int:
        for m in mappings:
            if m.container_id <= 0 < m.container_id + m.size:
                return m.host_id - m.container_id
        return 0  # no mapping given: the runtime maps our root, nothing better to use

    return host_id(config.uid_mappings), host_id(config.gid_mappings)


def _allow_devices(pid: int, plan: Plan) -> None:
    rules = cgroup_rules(plan)
    if not rules:
        return
    from cdi_hook.live import cgroups

    try:
        cgroups.allow_devices(pid, rules)
    except HookError as error:
        # cgroups speaks in numbers ("c 10:232"); the user asked for CDI names.
        origins = ", ".join(dict.fromkeys(rule.origin for rule in plan.device_rules if rule.access))
        raise HookError(error.step, origins, f"{error.device}: {error.detail}" if error.device else error.detail) from None


def _warn_unapplicable(plan: Plan, config: Config, log: ContainerLog) -> None:
    """env and additionalGids belong to config.json; a live hook is too late for them. Those
    config.json already holds as the spec says (a runtime with CDI of its own applied the
    same request, or an editor did) need nothing: no warning for them."""
    process = config.raw.get("process")
    process = process if isinstance(process, dict) else {}
    user = process.get("user")
    user = user if isinstance(user, dict) else {}
    present = {"environment variables": process.get("env"), "additional GIDs": user.get("additionalGids")}
    for items, what in ((plan.env, "environment variables"), (plan.additional_gids, "additional GIDs")):
        found = present[what]
        there: list = found if isinstance(found, list) else []
        by_origin: dict[str, list[str]] = {}
        for origin, item in items:
            if item not in there:
                by_origin.setdefault(origin, []).append(str(item).split("=", 1)[0])
        for origin, names in by_origin.items():
            log.warning(f"{origin}: {what} {', '.join(names)} cannot be applied by a live hook; "
                        "use `cdi-hook precreate` or `cdi-hook inject --mode edits` for them")


def _release_rdt(state: State, plan: Plan, log: ContainerLog) -> None:
    """At poststop the container's MON group (and a group named after it) goes; failures only warn."""
    if not plan.intel_rdt:
        return
    from cdi_hook.live import rdt

    try:
        rdt.release(*plan.intel_rdt, container_id=state.id)
    except CdiError as error:
        log.warning(str(error))
