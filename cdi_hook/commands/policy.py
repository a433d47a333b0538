"""`cdi-hook policy check [FILE]` and `cdi-hook explain`: the request policy for operators."""

from __future__ import annotations

import json
import sys

from cdi_hook import oci, policy
from cdi_hook.errors import CdiError, printable
from cdi_hook.request import pending_devices

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Validate a policy file (default: the one in force); one line per problem, exit 1."""
    path = args.file or policy.policy_path()
    try:
        checked = policy.read(path)
    except FileNotFoundError:
        raise CdiError(f"{path}: no such policy file") from None
    print(f"{path}: valid: {len(checked.rules)} rule(s), {len(checked.exclusive)} exclusive pattern(s), "
          f"containerd cdi.k8s.io/* annotations attributed to "
          f"{'the kubelet' if checked.containerd_kubelet_only else 'nobody (refused)'}")
    return 0


def cmd_explain(args: argparse.Namespace, spec_dirs: Sequence[str] | None = None) -> int:
    """Which devices a container asks for, from which source, and whether each is honoured;
    for an exclusive one, which container holds it (by the host devices it is, under any of
    its names).

    Reads the bundle's config.json (--bundle), or an OCI state on stdin whose bundle it
    reads. Exit 0 when every request is honoured, 1 when any is refused.
    """
    container_address = getattr(args, "container", None)
    if container_address and args.bundle:
        raise CdiError("explain: give a CONTAINER or --bundle DIR, not both")
    if container_address:
        import os

        from cdi_hook import containers

        path = containers.config_path(container_address, runc_root=args.runc_root, crio_socket=args.crio_socket)
        _, doc = oci.read_config_file(path)
        config = oci.parse_config(doc, os.path.dirname(path), path)
        annotations = dict(config.annotations)
    elif args.bundle:
        config = oci.read_config(args.bundle)
        annotations = dict(config.annotations)
    else:
        state = oci.parse_state(sys.stdin.buffer.read(oci.MAX_STATE_SIZE + 1))
        config = oci.read_config(state.bundle)
        annotations = {**state.annotations, **config.annotations}
    rules = policy.load()
    names = pending_devices(annotations)
    from cdi_hook import attribution

    container, requests = attribution.attribute(annotations, names,
                                                containerd_kubelet_only=rules.containerd_kubelet_only)
    decisions = policy.decide(rules, container, requests)
    exclusive = policy.exclusive_devices(rules, names)
    shares = _share_counts(names, spec_dirs)
    counted = list(dict.fromkeys(exclusive + list(shares)))
    held = _holds_of(counted, spec_dirs) if counted else {}
    report: dict[str, Any] = {
        "container": {"runtime": container.runtime, "namespace": container.namespace, "pod": container.pod},
        "policy": rules.path or "built-in default",
        "requests": [{"device": d.request.device, "annotation": d.request.key, "source": d.request.source,
                      "why": d.request.why, "honoured": d.allowed, "reason": d.reason,
                      **({"exclusive": True, **held[d.request.device]} if d.request.device in held else {}),
                      **({"shared": shares[d.request.device]} if d.request.device in shares else {})}
                     for d in decisions],
    }
    if getattr(args, "format", "text") == "json":
        print(json.dumps(report, indent=2))
    else:
        where = f"pod {container.namespace}/{container.pod}" if container.pod else "no pod"
        # pod names and keys come from annotations: escaped like every other printed line
        print(printable(f"container: {container.runtime} ({where}); policy: {report['policy']}"))
        if not decisions:
            print("no CDI devices requested")
        for item in report["requests"]:
            verdict = "honoured" if item["honoured"] else "REFUSED"
            extra = ""
            if item.get("shared"):
                extra = f"; shared by {item['shared']}, " + _hold_text(item)
            elif item.get("exclusive"):
                extra = "; exclusive, " + _hold_text(item)
            print(printable(f"{item['device']}: {verdict}: asked by {item['source']} through {item['annotation']} "
                            f"({item['why']}); {item['reason']}{extra}"))
    return 0 if all(d.allowed for d in decisions) else 1


def _share_counts(names: list[str], spec_dirs: Sequence[str] | None) -> dict[str, int]:
    """device -> how many containers its spec lets hold it at once, for the shareable ones
    (held like exclusive ones, in that many slots)."""
    if not names:
        return {}
    from cdi_hook.registry import Registry
    from cdi_hook.spec.rules import shared_count

    known = Registry.load(spec_dirs).devices
    counts = {name: shared_count(known[name][1].annotations) for name in names if name in known}
    return {name: count for name, count in counts.items() if count is not None}


def _holds_of(devices: list[str], spec_dirs: Sequence[str] | None) -> dict[str, dict]:
    """device -> {"held_by": the holder's container id or None, "held": [{"key", "as",
    "container", "pid"}...], "identity": its hold keys}: a device is held when any host
    device or path it is (the plan's identity, as the hook holds it) is held, under
    whichever name. "hold_error" when its identity cannot be told (no spec knows it now)."""
    from cdi_hook import plan
    from cdi_hook.live import holds

    current = holds.holders()
    found: dict[str, dict] = {}
    for device in devices:
        error = None
        try:
            keys = [key for _, device_keys in plan.resolve([device], spec_dirs).identities for key in device_keys]
        except CdiError as unresolved:
            keys, error = [], str(unresolved)
        # what it is on the host, its hold of before identities, and (its spec gone) holds
        # taken under its very name
        held = [{"key": key, "as": record.get("device") or device, "container": record.get("container"),
                 "pid": record.get("pid")} for key, record in current
                if key in keys or key == holds.name_key(device) or record.get("device") == device]
        # in the order of the device's identity (its nodes first, as the plan lists them), not
        # the order the folder happens to list the holds in
        held.sort(key=lambda h: (keys.index(h["key"]) if h["key"] in keys else len(keys), h["key"],
                                 str(h["container"])))  # a shared device's holders: by container id
        found[device] = {"held_by": held[0]["container"] if held else None, "held": held, "identity": keys,
                         **({"hold_error": error} if error else {})}
    return found


def _hold_text(item: dict) -> str:
    if item["held"]:
        return "; ".join(f"held by {h['container']} as {h['as']} ({h['key']})" for h in item["held"])
    if item.get("hold_error"):
        return f"cannot tell its holders under other names: {item['hold_error']}"
    return "free (" + ", ".join(item["identity"]) + ")"
