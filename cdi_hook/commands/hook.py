"""`cdi-hook hook`: the OCI hook. The OCI state on stdin; the bundle's config.json says
which devices the container asks for; plan.resolve decides what they mean; the live
injector (live/inject.py) carries the plan out at this stage.

Imports are lazy: a container that asks for no device costs a JSON parse of the state and
config.json, and nothing more. This is the hot path's one lazy boundary.
"""

from __future__ import annotations


def run(stage: str, spec_dirs: list[str] | None, stdin) -> int:
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
        from cdi_hook import plan
        from cdi_hook.live import inject

        with log.step("resolve"):
            container_plan = plan.resolve(names, spec_dirs, process_uid=config.process_uid,
                                          process_gid=config.process_gid)
        inject.run_stage(stage, container_plan, state, config, log)
    except CdiError as error:
        log.finish(error=str(error))
        raise
    log.finish()
    return 0
