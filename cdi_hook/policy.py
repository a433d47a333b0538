"""Whether a request is honoured: the node's policy over the attributed requests.

Default (no policy file): requests from the kubelet and the administrator are honoured; a
pod author's, or one whose source cannot be told, is refused. A policy file changes that:

    # /etc/cdi-hook/policy.yaml (root-owned, not writable by group or others, nor any folder above)
    version: "1"
    containerd:
      cdiAnnotations: container     # containerd passes cdi.k8s.io/* via container_annotations only
    rules:                          # the first matching rule decides; none: the default above
      - action: allow               # allow | deny
        sources: [pod]              # optional: kubelet, pod, admin, unknown
        namespaces: [ml-team, "dev-*"]  # optional: Kubernetes namespaces (a trailing * is a prefix)
        devices: ["example.com/gpu=*"]  # vendor.com/class=name, vendor.com/class=*, vendor.com/*, *
    exclusive: ["example.com/fpga=*"]   # devices held by one running container at a time

A rule with `namespaces` matches only Kubernetes containers. The file is validated
strictly (unknown keys, bad patterns: one line naming the field); it is read through a
compiled copy in the cache dir (keyed on the file's stat) so a start does not parse YAML.
"""

from __future__ import annotations

import os
import stat
from collections import namedtuple

from cdi_hook.attribution import ADMIN, KUBELET, POD, SOURCES, UNKNOWN
from cdi_hook.errors import CdiError
from cdi_hook.settings import POLICY_ENV, Settings
from cdi_hook.settings import current as current_settings
from cdi_hook.spec.names import device_name_problem, kind_problem, quote

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, NoReturn

    from cdi_hook.attribution import Container, Request

    _Fail = Callable[[str, str], NoReturn]  # (field, message): raises CdiError

POLICY_VERSION = "1"
DEFAULT_ALLOWED = (KUBELET, ADMIN)
MAX_POLICY_SIZE = 1 << 20
# Used only when a policy file is parsed (re is imported then: not on a start with a
# compiled policy).
_NAMESPACE = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?|[a-z0-9][-a-z0-9]{0,61}\*|\*"
_PLAIN_KEY = r"[A-Za-z0-9_.-]{1,64}"

Rule = namedtuple("Rule", ["action", "sources", "namespaces", "devices", "field"])  # field: "rules[2]"
# path: where it came from ("" for the built-in default)
Policy = namedtuple("Policy", ["path", "containerd_kubelet_only", "rules", "exclusive"])
Decision = namedtuple("Decision", ["request", "allowed", "reason"])

DEFAULT = Policy("", False, (), ())


def policy_path(settings: Settings | None = None) -> str:
    return (settings or current_settings()).policy


def load(path: str | None = None, settings: Settings | None = None) -> Policy:
    """The policy in force: the file at path ($CDI_HOOK_POLICY, else the default path), or
    the built-in default when the default path does not exist. A file named by
    $CDI_HOOK_POLICY must exist: a typo must not quietly drop a node's rules."""
    settings = settings or current_settings()
    explicit = path is not None or settings.policy_explicit
    path = path or settings.policy
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if explicit:
            raise CdiError(f"{path}: policy file does not exist ({POLICY_ENV} names it)") from None
        return DEFAULT
    except OSError as error:
        raise CdiError(f"{path}: cannot read the policy file: {error.strerror}") from None
    from cdi_hook import cache

    signature = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid, st.st_mode)
    compiled = cache.load_policy(signature, settings)
    if compiled is not None:
        try:
            path_, kubelet_only, rules, exclusive = compiled
            return Policy(path_, kubelet_only, tuple(Rule(*rule) for rule in rules), tuple(exclusive))
        except (TypeError, ValueError):
            pass  # not what this code writes: read the file
    policy = read(path)
    cache.store_policy(signature, (policy.path, policy.containerd_kubelet_only,
                                   tuple(tuple(rule) for rule in policy.rules), policy.exclusive), st, settings)
    return policy


def read(path: str) -> Policy:
    """Read, check the owner and mode (the file's and every folder's down to it), parse and
    validate a policy file. Run only when the compiled policy's stat signature no longer
    matches: a file renamed over the policy has another inode and ctime, so it is read,
    and checked, here."""
    from cdi_hook.spec.parse import decode_document
    from cdi_hook.trust import file_problem, folders_problem

    if os.geteuid() == 0:
        found = folders_problem(path)
        if found:
            folder, why = found
            raise CdiError(f"{path}: refused: folder {folder} above the policy file is {why}; every folder "
                           "from / down to it must be root's and writable by root only")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise CdiError(f"{path}: cannot read the policy file: {error.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CdiError(f"{path}: the policy is not a regular file")
        if os.geteuid() == 0:
            problem = file_problem(st)
            if problem:
                raise CdiError(f"{path}: refused: the policy file is {problem}; it must be writable by root only")
        data = os.read(fd, MAX_POLICY_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_POLICY_SIZE:
        raise CdiError(f"{path}: the policy file is larger than {MAX_POLICY_SIZE} bytes")
    yaml_path = path if path.endswith((".json", ".yaml", ".yml")) else path + ".yaml"
    document = decode_document(data, yaml_path)
    return parse(document, path)


def parse(document: Any, path: str) -> Policy:
    """A Policy from the decoded document; CdiError "FILE: field: message" on the first problem."""
    def fail(field: str, message: str) -> NoReturn:
        raise CdiError(f"{path}: {field}: {message}")

    top = _mapping(document, "(top level)", fail, {"version", "containerd", "rules", "exclusive"})
    if top.get("version") != POLICY_VERSION:
        fail("version", f"must be \"{POLICY_VERSION}\", got {quote(top.get('version'))}")
    kubelet_only = False
    if "containerd" in top:
        containerd = _mapping(top["containerd"], "containerd", fail, {"cdiAnnotations"})
        value = containerd.get("cdiAnnotations", "unknown")
        if value not in ("container", "unknown"):
            fail("containerd.cdiAnnotations", f"must be \"container\" or \"unknown\", got {quote(value)}")
        kubelet_only = value == "container"
    rules = []
    for i, item in enumerate(_list(top.get("rules", []), "rules", fail)):
        field = f"rules[{i}]"
        rule = _mapping(item, field, fail, {"action", "sources", "namespaces", "devices"})
        if rule.get("action") not in ("allow", "deny"):
            fail(f"{field}.action", f"must be allow or deny, got {quote(rule.get('action'))}")
        sources = tuple(_strings(rule.get("sources", list(SOURCES)), f"{field}.sources", fail))
        for j, source in enumerate(sources):
            if source not in SOURCES:
                fail(f"{field}.sources[{j}]", f"{quote(source)} is not one of {', '.join(SOURCES)}")
        namespaces = None
        if "namespaces" in rule:
            namespaces = tuple(_strings(rule["namespaces"], f"{field}.namespaces", fail))
            for j, namespace in enumerate(namespaces):
                if not _fullmatch(_NAMESPACE, namespace):
                    fail(f"{field}.namespaces[{j}]", f"{quote(namespace)} is not a Kubernetes namespace name "
                                                      "(lowercase letters, digits, '-'; a trailing * for a prefix)")
        if "devices" not in rule:
            fail(f"{field}.devices", "required (use [\"*\"] for every device)")
        devices = tuple(_strings(rule["devices"], f"{field}.devices", fail))
        for j, pattern in enumerate(devices):
            problem = device_pattern_problem(pattern)
            if problem:
                fail(f"{field}.devices[{j}]", problem)
        rules.append(Rule(rule["action"], sources, namespaces, devices, field))
    exclusive = tuple(_strings(top.get("exclusive", []), "exclusive", fail))
    for j, pattern in enumerate(exclusive):
        problem = device_pattern_problem(pattern)
        if problem:
            fail(f"exclusive[{j}]", problem)
    return Policy(path, kubelet_only, tuple(rules), exclusive)


def device_pattern_problem(pattern: str) -> str | None:
    """Why pattern is not *, vendor.com/*, vendor.com/class=* or vendor.com/class=name."""
    if pattern == "*":
        return None
    if pattern.endswith("/*") and pattern.count("/") == 1:
        problem = kind_problem(pattern[:-2] + "/x")
        return f"{quote(pattern)}: vendor part: {problem}" if problem else None
    kind, sep, name = pattern.partition("=")
    problem = kind_problem(kind) if sep else f"{quote(pattern)} is not *, vendor.com/*, vendor.com/class=* " \
                                              "or vendor.com/class=name"
    if problem:
        return problem
    if name != "*":
        problem = device_name_problem(name)
        if problem:
            return problem
    return None


def device_matches(pattern: str, device: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("/*") and "=" not in pattern:
        return device.startswith(pattern[:-1])
    if pattern.endswith("=*"):
        return device.startswith(pattern[:-1])
    return device == pattern


def _namespace_matches(pattern: str, namespace: str) -> bool:
    return namespace.startswith(pattern[:-1]) if pattern.endswith("*") else namespace == pattern


def decide(policy: Policy, container: Container, requests: Iterable[Request]) -> list[Decision]:
    """One Decision per attribution.Request: the first matching rule, else the default."""
    decisions = []
    for request in requests:
        decisions.append(_decide_one(policy, container, request))
    return decisions


def _decide_one(policy: Policy, container: Container, request: Request) -> Decision:
    for rule in policy.rules:
        if request.source not in rule.sources:
            continue
        if rule.namespaces is not None and not (container.namespace and any(
                _namespace_matches(p, container.namespace) for p in rule.namespaces)):
            continue
        if not any(device_matches(p, request.device) for p in rule.devices):
            continue
        return Decision(request, rule.action == "allow", f"{policy.path} {rule.field}: {rule.action}")
    allowed = request.source in DEFAULT_ALLOWED
    if allowed:
        return Decision(request, True, f"requests from the {request.source} are honoured by default")
    what = {POD: "a pod author's request", UNKNOWN: "a request whose source cannot be told"}[request.source]
    return Decision(request, False, f"{what} is refused by default")


def refusal_message(container: Container, decisions: Iterable[Decision]) -> str:
    """One line naming every refused device, its requester, the pod, why, and how to allow it."""
    refused = [d for d in decisions if not d.allowed]
    where = f"pod {container.namespace}/{container.pod}" if container.pod or container.namespace else \
        f"a {container.runtime} container"
    parts = [f"{d.request.device} (asked by {d.request.source} through {d.request.key or 'an annotation'}: "
             f"{d.request.why}; {d.reason})" for d in refused]
    hint = ("give devices through a device plugin (the kubelet's annotations), or allow them in the policy file "
            f"{policy_path()} (rules: action allow, sources, namespaces, devices)")
    return f"refused CDI request{'s' if len(refused) > 1 else ''} in {where}: {'; '.join(parts)}; {hint}"


def authorize(policy: Policy, annotations: dict, names: Iterable[str]) -> tuple[Container, list[Decision]]:
    """(container, decisions) for the names a container asks for; CdiError when any is refused.

    Fails closed: every name must be honoured before anything on the host changes.
    """
    from cdi_hook import attribution

    container, requests = attribution.attribute(annotations, names,
                                                containerd_kubelet_only=policy.containerd_kubelet_only)
    decisions = decide(policy, container, requests)
    if not all(d.allowed for d in decisions):
        raise CdiError(refusal_message(container, decisions))
    return container, decisions


def _mapping(value: Any, field: str, fail: _Fail, allowed: set[str]) -> dict:
    if type(value) is not dict:
        if isinstance(value, dict):
            fail(field, f"duplicate key {quote(value.duplicate)}")  # type: ignore[attr-defined]  # _DuplicateKeys
        fail(field, "expected a mapping")
    for key in value:
        if key not in allowed:
            name = key if isinstance(key, str) and _fullmatch(_PLAIN_KEY, key) else quote(key)
            fail(f"{field}.{name}" if field != "(top level)" else name,
                 f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def _fullmatch(pattern: str, text: str) -> bool:
    import re

    return re.fullmatch(pattern, text) is not None


def _list(value: Any, field: str, fail: _Fail) -> list:
    if not isinstance(value, list):
        fail(field, "expected a list")
    return value


def _strings(value: Any, field: str, fail: _Fail) -> list:
    items = _list(value, field, fail)
    for j, item in enumerate(items):
        if not isinstance(item, str):
            fail(f"{field}[{j}]", "expected a string")
    return items


def exclusive_devices(policy: Policy, names: Iterable[str]) -> list[str]:
    """The requested names the policy makes exclusive."""
    return [name for name in names if any(device_matches(p, name) for p in policy.exclusive)]
