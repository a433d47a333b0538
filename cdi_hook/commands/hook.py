"""`cdi-hook hook`: the OCI hook. The OCI state on stdin; the bundle's config.json says
which devices the container asks for and who asked (attribution.py); the node's policy
honours or refuses each request before anything on the host changes (policy.py);
plan.resolve decides what the devices mean; the live injector (live/inject.py) carries the
plan out at this stage.

Imports are lazy: a container that asks for no device costs a JSON parse of the state and
config.json, and nothing more. This is the hot path's one lazy boundary.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import BinaryIO

    from cdi_hook.errors import CdiError
    from cdi_hook.live.child import Report
    from cdi_hook.log import ContainerLog
    from cdi_hook.oci import Config, State
    from cdi_hook.plan import Plan
    from cdi_hook.record import Record


def run(stage: str, spec_dirs: list[str] | None, stdin: BinaryIO) -> int:
    from cdi_hook import oci

    state = oci.parse_state(stdin.read(oci.MAX_STATE_SIZE + 1))
    config = oci.read_config(state.bundle)
    annotation_maps = (state.annotations, config.annotations)
    if not any(key.startswith("cdi.k8s.io/") for m in annotation_maps for key in m):
        return 0
    if stage in ("poststart", "poststop") and _later_stage_from_record(stage, state):
        return 0
    from cdi_hook.request import pending_devices

    names = pending_devices(*annotation_maps)
    if not names:
        return 0

    from cdi_hook.errors import CdiError
    from cdi_hook.log import ContainerLog

    log = ContainerLog(state.id, stage, names)
    try:
        from cdi_hook import plan, policy
        from cdi_hook.live import inject

        refusal = None
        with log.step("policy"):
            try:
                rules = policy.load()
                # config.json's annotations are the runtime's own record; the state's repeat them
                _, decisions = policy.authorize(rules, {**state.annotations, **config.annotations}, names)
                log.fields["sources"] = {d.request.device: d.request.source for d in decisions}
            except CdiError as error:
                # At poststop the container is gone: what createRuntime did for it (moved
                # interfaces, holds, RDT groups, each found by its own record) is undone even
                # if the policy changed or broke meanwhile; only the spec's hooks need it.
                if stage != "poststop":
                    raise
                refusal = error
        with log.step("resolve"):
            container_plan = plan.resolve(names, spec_dirs, process_uid=config.process_uid,
                                          process_gid=config.process_gid)
        if stage in inject.INJECTION_STAGES:
            from cdi_hook import record

            record.remove(state.id)  # an earlier container's under this id: never this one's
            counted = container_plan.counted(policy.exclusive_devices(rules, names))
            _inject_holding(counted, stage, container_plan, state, config, log)
        else:
            # No record of this container (started by a cdi-hook older than records, or its
            # record could not be matched): the older way, from today's specs.
            log.note("no container record: this stage resolved the devices from today's specs")
            # only this container's holds are released, a no-op for the rest: what today's
            # specs say the devices are, and the names holds were kept by before keys
            from cdi_hook.live.holds import name_key

            keys = [key for _, device_keys in container_plan.identities for key in device_keys]
            _later_stage(stage, container_plan, state, config, log, refusal, keys + [name_key(n) for n in names])
    except CdiError as error:
        log.finish(error=str(error))
        raise
    log.finish()
    return 0


def _inject_holding(exclusive: list[str], stage: str, container_plan: Plan, state: State, config: Config,
                    log: ContainerLog) -> None:
    """Inject with the policy's exclusive devices and the shareable ones held (by what they
    are on the host, as the plan says: aliases of one device exclude each other; a shareable
    one in one of its spec's count of slots); a failed start gives them back."""
    from cdi_hook.live import inject

    if not exclusive:
        inject.run_stage(stage, container_plan, state, config, log,
                         before_commit=lambda made: _save_record(container_plan, state, config, log, [], made))
        return
    from cdi_hook.errors import CdiError, HookError
    from cdi_hook.live import holds

    if not state.pid:
        raise CdiError(f"OCI state on stdin: pid: missing, needed at {stage} to reach the container")
    held = container_plan.identity_of(exclusive)
    taken = holds.hold(held, state.id, state.pid, dict(container_plan.shares))
    try:
        inject.run_stage(stage, container_plan, state, config, log,
                         before_commit=lambda made: _save_record(container_plan, state, config, log, held, made))
    except BaseException:
        try:
            holds.release(taken, state.id)
        except (OSError, HookError) as error:
            log.warning(f"releasing exclusive devices: {error}")
        raise


def _save_record(container_plan: Plan, state: State, config: Config, log: ContainerLog,
                 holds: list[tuple[str, tuple[str, ...]]], made: Report | None) -> None:
    """The container's record, after every step succeeded and before the undo journal is
    dropped: what later stages and commands read instead of today's specs. A record that
    cannot be written (a full or read-only state folder) fails the start with one line and
    the injection is undone: a container whose gifts nobody could later find or take back
    must not run."""
    from cdi_hook import record, settings
    from cdi_hook.containers import process_start_time

    with log.step("record"):
        post_stages = settings.current().post_stages
        given = record.from_plan(container_plan, state.id, state.pid, process_start_time(state.pid), state.bundle,
                                 log.fields.get("sources", {}), holds, made,
                                 None if post_stages is None else list(post_stages))
        record.save(given)
    missing = [stage for stage in given.work if given.entries is not None and stage not in given.entries]
    if missing:
        # inject --mode hook wrote entries for the stages the devices needed then; the
        # specs (or the policy's exclusive devices) changed since. The start goes on: what
        # those stages would do is not needed for it.
        log.warning(f"{', '.join(container_plan.devices)}: {config.path} runs no cdi-hook entry at {', '.join(missing)} "
                    "(`cdi-hook inject --mode hook` wrote none), where these devices now have work (spec hooks, "
                    "interfaces to send home, holds to give back); it will not be done: inject the bundle again")


def _later_stage_from_record(stage: str, state: State) -> bool:
    """poststart or poststop of a container that asks for devices, from its record; False
    when it has none of its own (the caller goes the older way, from today's specs). Imports
    only what reading the record needs unless the record holds work for this stage."""
    from cdi_hook import record
    from cdi_hook.state import StateError

    try:
        found = record.load(state.id)
    except StateError as error:
        # Never believed, never acted on; but the container's clean-up (holds, interfaces,
        # RDT groups) must not be stranded by a records folder that went wrong.
        from cdi_hook.log import warn

        warn(f"{error}; {stage} goes the older way, from today's specs")
        return False
    if found is None or not record.is_of(found, state.id, state.bundle, state.pid if stage == "poststart" else None):
        return False
    try:
        if stage in found.work:
            _carry_out_record(stage, found, state)
    finally:
        if stage == "poststop":  # done, or failed: poststop does not come again for this container
            record.remove(state.id, only=found)
    return True


def _carry_out_record(stage: str, found: Record, state: State) -> None:
    from cdi_hook import oci, record
    from cdi_hook.errors import CdiError
    from cdi_hook.log import ContainerLog

    log = ContainerLog(state.id, stage, found.devices)
    log.fields["from"] = "record"
    try:
        given = record.given_plan(found)
        config = oci.read_config(state.bundle)  # the container's network namespace, its annotations
        refusal = _policy_refusal(found, state, config) if given.hooks_at(stage) else None
        # only this very process's holds: a hold under this id taken by a later process is not ours
        _later_stage(stage, given, state, config, log, refusal, record.held_keys(found), (found.pid, found.start_time))
    except CdiError as error:
        log.finish(error=str(error))
        raise
    log.finish()


def _later_stage(stage: str, container_plan: Plan, state: State, config: Config, log: ContainerLog,
                 refusal: CdiError | None, held: list[str], process: tuple[int, int | None] | None = None) -> None:
    """poststart or poststop: the spec's hooks of the stage, and at poststop the undo of what
    createRuntime did (interfaces, RDT, holds: held, the hold keys, of process (pid, start
    time) when known). A request the policy refuses now still gets its undo; only its spec
    hooks do not run, and the refusal is the stage's error."""
    from cdi_hook.live import inject

    inject.run_stage(stage, container_plan, state, config, log, spec_hooks=refusal is None)
    if stage == "poststop" and held:
        from cdi_hook.live import holds

        holds.release(held, state.id, *(process or (None, None)))
    if refusal is not None:
        raise refusal


def _policy_refusal(found: Record, state: State, config: Config) -> CdiError | None:
    """The spec hooks a record holds run code on the host: the node's policy of today is
    asked again before they run (an operator may have withdrawn the device meanwhile)."""
    from cdi_hook import policy
    from cdi_hook.errors import CdiError

    try:
        policy.authorize(policy.load(), {**state.annotations, **config.annotations}, found.devices)
    except CdiError as error:
        return error
    return None
