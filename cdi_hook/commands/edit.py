"""`cdi-hook precreate` and `cdi-hook inject`: the commands that edit a config.json.

  * precreate: Podman's precreate filter (oci-hooks(5) extension stage): the proposed
    config.json on stdin, the edited one on stdout.
  * inject --bundle DIR: rewrites a bundle's config.json for manual runc use, either with
    the edits themselves (--mode edits, through config_editor) or with the annotation and
    hook entries that let the live hook do the work (--mode hook).

Both resolve requests into a Plan (plan.resolve) and hand it to the config_editor.
precreate first attributes and authorizes every request (policy.py), as the live hook
does; inject is the administrator's own command.
"""

from __future__ import annotations

import copy
import json
import os

from cdi_hook import config_editor, oci
from cdi_hook.errors import CdiError
from cdi_hook.request import annotation_value, applied_devices, pending_devices
from cdi_hook.state import write_atomic

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any, BinaryIO

    from cdi_hook.plan import Plan
    from cdi_hook.policy import Policy

INJECT_ANNOTATION = "cdi.k8s.io/cdi-hook"  # the key `inject --mode hook` requests devices under


def _plan_for(config: dict, names: list[str], spec_dirs: Sequence[str] | None) -> Plan:
    from cdi_hook import plan

    uid, gid = config_editor.process_ids(config)
    return plan.resolve(names, spec_dirs, process_uid=uid, process_gid=gid)


def cmd_precreate(spec_dirs: Sequence[str] | None, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Podman's precreate filter: config.json on stdin, the edited config.json on stdout.

    With no device requested (or all already applied), the input goes back byte for byte.
    On error nothing is written to stdout: the CdiError reaches the CLI, which prints one
    line on stderr and exits non-zero, and Podman refuses to create the container.
    """
    raw = stdin.read(oci.MAX_CONFIG_SIZE + 1)  # one byte more: "larger than" without reading it all
    config = oci.json_object(raw, "precreate: config.json on stdin", oci.MAX_CONFIG_SIZE)
    annotations = config_editor.annotations_of(config)
    pending = pending_devices(annotations)
    if not pending:
        stdout.write(raw)
        stdout.flush()
        return 0
    from cdi_hook import policy

    rules = policy.load()
    policy.authorize(rules, annotations, pending)  # refused: CdiError, nothing written
    container_plan = _plan_for(config, pending, spec_dirs)
    _refuse_counted(rules, container_plan)
    edited = config_editor.apply_plan(config, container_plan)
    stdout.write(json.dumps(edited, separators=(",", ":")).encode())
    stdout.flush()
    return 0


def _refuse_counted(rules: Policy, container_plan: Plan) -> None:
    """An exclusive or shareable device is held from createRuntime to poststop, which only
    the live hook sees; an edited config.json would give it away with no hold."""
    from cdi_hook import policy

    exclusive = policy.exclusive_devices(rules, container_plan.devices)
    if exclusive:
        raise CdiError(f"{', '.join(exclusive)}: exclusive in the policy {rules.path}; exclusive devices are given "
                       "by the live hook only (cdi-hook install --mode hook, or inject --mode hook)")
    if container_plan.shares:
        shared = ", ".join(f"{device} (shared by {count})" for device, count in container_plan.shares)
        raise CdiError(f"{shared}: its spec limits how many containers may hold it at once; such devices are "
                       "given by the live hook only (cdi-hook install --mode hook, or inject --mode hook)")


def read_bundle_config(bundle: str) -> tuple[str, bytes, dict]:
    """(path, raw bytes, parsed) of a bundle's config.json; CdiError if it is not usable."""
    path = os.path.join(bundle, "config.json")
    raw, config = oci.read_config_file(path)
    root = config.get("root")
    if not isinstance(root, dict) or not isinstance(root.get("path"), str) or not root["path"]:
        raise CdiError(f"{path}: root.path is missing; not an OCI runtime config")
    return path, raw, config


def add_hook_request(config: dict, names: list[str], spec_dirs: Sequence[str] | None,
                     later_stages: Sequence[str] = ("poststart", "poststop")) -> dict:
    """A copy of config that asks the live hook for names: the annotation plus hook entries,
    at createRuntime and at the later_stages (record.needed_stages: a later stage with
    nothing to do costs every start an interpreter otherwise)."""
    from cdi_hook.hook_entry import LIVE_HOOK_STAGES, hook_stages, live_hook_entry, mark_post_stages
    from cdi_hook.settings import POST_STAGES

    edited = copy.deepcopy(config)
    annotations = config_editor.annotations_of(edited)
    edited["annotations"] = annotations
    current = annotations.get(INJECT_ANNOTATION, "")
    listed = [n.strip() for n in current.split(",") if n.strip()] if isinstance(current, str) else []
    annotations[INJECT_ANNOTATION] = annotation_value(dict.fromkeys(listed + names))
    hooks = edited.get("hooks")
    if hooks is None:
        hooks = edited["hooks"] = {}
    if not isinstance(hooks, dict):
        raise CdiError("config.json: hooks is not a JSON object")
    for stage in LIVE_HOOK_STAGES:
        if stage != "createRuntime" and stage not in later_stages:
            continue
        entry = live_hook_entry(stage, spec_dirs=spec_dirs)
        entries = hooks.get(stage)
        if entries is None:
            entries = hooks[stage] = []
        if not isinstance(entries, list):
            raise CdiError(f"config.json: hooks.{stage} is not a JSON array")
        if not any(_same_hook(existing, entry) for existing in entries):
            entries.append(entry)
    mark_post_stages(hooks, [stage for stage in POST_STAGES if stage in hook_stages(hooks)])
    return edited


def _later_stages(config: dict, names: list[str], spec_dirs: Sequence[str] | None) -> Sequence[str]:
    """The later stages the live hook will have work at for this config (record.needed_stages):
    for every request it will act on, the ones config.json holds already as well as names.
    Any doubt (one that does not resolve today, a policy that does not load): every stage,
    since a missing poststop strands what createRuntime did and an idle one only costs time.
    A record that no poststop will remove is pruned once its container has ended."""
    from cdi_hook import policy, record
    from cdi_hook.settings import POST_STAGES

    requested = list(dict.fromkeys(pending_devices(config_editor.annotations_of(config)) + names))
    try:
        container_plan = _plan_for(config, requested, spec_dirs)
        # held by the live hook, given back at poststop: the policy's exclusive devices and the shareable ones
        held = container_plan.counted(policy.exclusive_devices(policy.load(), requested))
    except CdiError:
        return POST_STAGES
    return record.needed_stages(container_plan, bool(held))


def _same_hook(existing: Any, entry: dict) -> bool:
    """The same interpreter running the same cdi-hook command, in today's entry form or the
    -m form older versions wrote (a bundle edited by one is not given a second hook)."""
    from cdi_hook.hook_entry import entry_command, is_cdi_hook_argv

    if not isinstance(existing, dict) or existing.get("path") != entry["path"]:
        return False
    args: Any = existing.get("args")
    return args == entry["args"] or (is_cdi_hook_argv(args) and args[0] == entry["args"][0]
                                     and entry_command(args) == entry_command(entry["args"]))


def cmd_inject(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    """Edit a bundle's config.json so that runc gives the container the named devices.

    Everything is decided before anything is written: an invalid bundle or an unknown
    device leaves config.json as it was. The first inject keeps the pristine config as
    config.json.orig; later injects leave that backup alone, so it always holds the
    config from before cdi-hook touched it.
    """
    path, raw, config = read_bundle_config(args.bundle)
    names = list(dict.fromkeys(args.device))
    if args.mode == "edits":
        already = set(applied_devices(config_editor.annotations_of(config)))
        pending = [name for name in names if name not in already]
        if not pending:
            print(f"{path}: already has {', '.join(names)}; nothing to do")
            return 0
        from cdi_hook import policy

        container_plan = _plan_for(config, pending, spec_dirs)
        _refuse_counted(policy.load(), container_plan)
        edited = config_editor.apply_plan(config, container_plan)
    else:
        _plan_for(config, names, spec_dirs)  # refuse unknown devices now, not at container start
        edited = add_hook_request(config, names, spec_dirs, _later_stages(config, names, spec_dirs))

    st = os.stat(path)
    mode = st.st_mode & 0o7777
    backup = path + ".orig"
    try:
        if not os.path.lexists(backup):
            write_atomic(backup, raw, mode, (st.st_uid, st.st_gid))
        write_atomic(path, (json.dumps(edited, indent=2) + "\n").encode(), mode, (st.st_uid, st.st_gid))
    except OSError as error:
        raise CdiError(f"{path}: cannot write: {error.strerror}") from None
    how = "edits" if args.mode == "edits" else "live hook entries"
    print(f"{path}: injected {', '.join(names)} ({how}); original kept in {backup}")
    _prune_records()
    return 0


def _prune_records() -> None:
    """The records of ended containers no poststop removes (record.prune), also from here:
    on a node that runs runc by hand, inject runs once a bundle, and without `cdi-hook watch`
    nothing else might ever remove them. Best effort, as root only: the bundle is edited."""
    if os.geteuid() != 0:
        return
    from cdi_hook import record

    try:
        record.prune()
    except (CdiError, OSError):
        pass  # `cdi-hook stale` says what is wrong with the records folder
