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

    from cdi_hook.log import ContainerLog
    from cdi_hook.oci import Config, State
    from cdi_hook.plan import Plan


def run(stage: str, spec_dirs: list[str] | None, stdin: BinaryIO) -> int:
    from cdi_hook import oci

    state = oci.parse_state(stdin.read(oci.MAX_STATE_SIZE + 1))
    config = oci.read_config(state.bundle)
    annotation_maps = (state.annotations, config.annotations)
    if not any(key.startswith("cdi.k8s.io/") for m in annotation_maps for key in m):
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
            _inject_holding(policy.exclusive_devices(rules, names), stage, container_plan, state, config, log)
        else:
            inject.run_stage(stage, container_plan, state, config, log, spec_hooks=refusal is None)
            if stage == "poststop":
                from cdi_hook.live import holds

                holds.release(names, state.id)  # only this container's holds: a no-op for the rest
            if refusal is not None:
                raise refusal
    except CdiError as error:
        log.finish(error=str(error))
        raise
    log.finish()
    return 0


def _inject_holding(exclusive: list[str], stage: str, container_plan: Plan, state: State, config: Config,
                    log: ContainerLog) -> None:
    """Inject with the policy's exclusive devices held; a failed start gives them back."""
    from cdi_hook.live import inject

    if not exclusive:
        inject.run_stage(stage, container_plan, state, config, log)
        return
    from cdi_hook.errors import CdiError, HookError
    from cdi_hook.live import holds

    if not state.pid:
        raise CdiError(f"OCI state on stdin: pid: missing, needed at {stage} to reach the container")
    taken = holds.hold(exclusive, state.id, state.pid)
    try:
        inject.run_stage(stage, container_plan, state, config, log)
    except BaseException:
        try:
            holds.release(taken, state.id)
        except (OSError, HookError) as error:
            log.warning(f"releasing exclusive devices: {error}")
        raise
