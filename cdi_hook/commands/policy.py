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


def cmd_explain(args: argparse.Namespace) -> int:
    """Which devices a container asks for, from which source, and whether each is honoured.

    Reads the bundle's config.json (--bundle), or an OCI state on stdin whose bundle it
    reads. Exit 0 when every request is honoured, 1 when any is refused.
    """
    if args.bundle:
        config = oci.read_config(args.bundle)
        annotations = dict(config.annotations)
    else:
        state = oci.parse_state(sys.stdin.buffer.read(oci.MAX_STATE_SIZE + 1))
        config = oci.read_config(state.bundle)
        annotations = {**state.annotations, **config.annotations}
    rules = policy.load()
    names = pending_devices(annotations)
    from cdi_hook import attribution
    from cdi_hook.live import holds

    container, requests = attribution.attribute(annotations, names,
                                                containerd_kubelet_only=rules.containerd_kubelet_only)
    decisions = policy.decide(rules, container, requests)
    exclusive = set(policy.exclusive_devices(rules, names))
    held = holds.holders() if exclusive else {}
    report: dict[str, Any] = {
        "container": {"runtime": container.runtime, "namespace": container.namespace, "pod": container.pod},
        "policy": rules.path or "built-in default",
        "requests": [{"device": d.request.device, "annotation": d.request.key, "source": d.request.source,
                      "why": d.request.why, "honoured": d.allowed, "reason": d.reason,
                      **({"exclusive": True, "held_by": held.get(d.request.device, {}).get("container")}
                         if d.request.device in exclusive else {})}
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
            if item.get("exclusive"):
                extra = f"; exclusive, held by {item['held_by']}" if item["held_by"] else "; exclusive, free"
            print(printable(f"{item['device']}: {verdict}: asked by {item['source']} through {item['annotation']} "
                            f"({item['why']}); {item['reason']}{extra}"))
    return 0 if all(d.allowed for d in decisions) else 1
