"""Who asked for each device: the kubelet, a pod author, the local administrator, or unknown.

A config.json says which runtime built it and, for a Kubernetes container, which of its
annotations the kubelet sent. The rules below follow the runtimes' own sources
(docs/kubernetes/who-may-ask.md); where the source cannot be told, the answer is "unknown",
which the default policy refuses (fail closed).

CRI-O (internal/factory/container/container.go, SpecAddAnnotations): the pod's annotations
are copied first, then CRI-O's own keys, among them `io.container.manager: cri-o`,
`io.kubernetes.cri-o.ContainerType: container` and `io.kubernetes.cri-o.Annotations`, the
JSON object of the annotations the kubelet sent for this container; then those kubelet
annotations as top-level keys. A pod author cannot overwrite CRI-O's keys in an app
container, so a `cdi.k8s.io/` key is the kubelet's exactly when the JSON object holds it
with the same value; otherwise it came from the pod. Infra (sandbox) configs never get
devices: a pod author can overwrite CRI-O's keys there, so they are told by the keys only
CRI-O writes into them (a pod author can add keys, never remove CRI-O's).

containerd (CRI plugin; 1.6/1.7 pkg/cri/server/container_create_linux.go containerSpec,
2.x internal/cri/annotations DefaultCRIAnnotations): passes through, unmarked, the pod and
container annotations its `pod_annotations` / `container_annotations` settings allow, then
writes its own keys, which win every collision: `io.kubernetes.cri.sandbox-id`,
`...sandbox-namespace`, `...sandbox-name`, `...container-name`, `...image-name`,
`...container-type`. Which one a `cdi.k8s.io/` key came from cannot be told from
config.json: "unknown", unless the node's policy states that containerd passes
`cdi.k8s.io/*` through `container_annotations` only (then it is the kubelet's).

Podman writes `io.container.manager: libpod` (and a few `io.kubernetes.cri-o.*` keys of its
own): its annotations come from whoever runs podman, the administrator. A config with no
Kubernetes keys at all (runc bundles, Docker) is the administrator's too. Any other config
with `io.kubernetes.` keys is a Kubernetes container of a runtime cdi-hook does not know:
"unknown".

Markers a pod author can add. Each runtime writes its own keys after the pod's, but never
removes another runtime's: a pod author on CRI-O can add `io.kubernetes.cri.*` keys, and
one on a containerd passing pod annotations can add CRI-O's. So a config carrying markers
of two runtimes (containerd's `io.kubernetes.cri.` keys with `io.container.manager` or an
`io.kubernetes.cri-o.` key; Podman's manager with another Kubernetes runtime's keys), or a
runtime's marker without the keys that runtime always writes beside it, is "unknown"; and
a Kubernetes container's namespace and pod come only from keys its runtime writes after
the pod's (containerd's sandbox-namespace/-name; CRI-O's io.kubernetes.cri-o.Labels, the
kubelet's labels as CRI-O recorded them), never from an unknown runtime's config.
"""

from __future__ import annotations

from collections import namedtuple

from cdi_hook.request import ANNOTATION_PREFIX, parse_annotation
from cdi_hook.spec.names import quote

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

KUBELET, POD, ADMIN, UNKNOWN = "kubelet", "pod", "admin", "unknown"
SOURCES = (KUBELET, POD, ADMIN, UNKNOWN)

MANAGER = "io.container.manager"
CRIO_PREFIX = "io.kubernetes.cri-o."
CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_KUBELET_ANNOTATIONS = "io.kubernetes.cri-o.Annotations"
# json.Marshal of the container config's labels (the kubelet's: io.kubernetes.pod.namespace,
# io.kubernetes.pod.name, ...), written after the pod's annotations: the one record of the
# pod's namespace no pod annotation can reach (kubelet/kuberuntime/labels.go, newContainerLabels).
CRIO_LABELS = "io.kubernetes.cri-o.Labels"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_NAME_LABEL = "io.kubernetes.pod.name"
# Written by CRI-O into every app container's config after the pod's annotations
# (internal/factory/container/container.go, SpecAddAnnotations).
CRIO_OWN = (CRIO_CONTAINER_TYPE, "io.kubernetes.cri-o.ContainerID", "io.kubernetes.cri-o.SandboxID",
            "io.kubernetes.cri-o.Name", CRIO_LABELS)
# Written by CRI-O into infra (pod sandbox) configs only (server/sandbox_run_linux.go).
CRIO_SANDBOX_ONLY = ("io.kubernetes.cri-o.KubeName", "io.kubernetes.cri-o.HostNetwork",
                     "io.kubernetes.cri-o.NamespaceOptions", "io.kubernetes.cri-o.PortMappings",
                     "io.kubernetes.cri-o.ShmPath", "io.kubernetes.cri-o.HostnamePath", "io.kubernetes.cri-o.CNIResult")
CONTAINERD_PREFIX = "io.kubernetes.cri."
CONTAINERD_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CONTAINERD_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
CONTAINERD_POD_NAME = "io.kubernetes.cri.sandbox-name"
# Written by containerd into every app container's config after the passed-through
# annotations (1.6/1.7 pkg/cri/server/container_create_linux.go containerSpec; 2.x
# internal/cri/annotations DefaultCRIAnnotations, which adds sandbox-uid).
CONTAINERD_OWN = (CONTAINERD_CONTAINER_TYPE, "io.kubernetes.cri.sandbox-id", CONTAINERD_POD_NAMESPACE,
                  CONTAINERD_POD_NAME, "io.kubernetes.cri.container-name", "io.kubernetes.cri.image-name")

# runtime: "cri-o", "containerd", "podman", "oci" (no Kubernetes keys) or "kubernetes"
# (an unknown runtime's Kubernetes container, or markers of two runtimes neither of which
# stands out); namespace/pod: "" outside Kubernetes and wherever the runtime cannot be
# told; refusal: why no request of this container can be attributed at all (a sandbox,
# markers of two runtimes, a broken kubelet annotation), or "".
Container = namedtuple("Container", ["runtime", "namespace", "pod", "refusal"])
# device: the qualified name; key: the annotation that asked for it; why: how the source was told
Request = namedtuple("Request", ["device", "key", "source", "why"])


def classify(annotations: dict) -> Container:
    """Which runtime built this config.json, and for which pod."""
    mixed = _two_runtimes(annotations)
    if mixed:
        # Neither runtime's keys can be believed, its namespace least of all.
        return Container(_likeliest(annotations), "", "", mixed)
    if CONTAINERD_CONTAINER_TYPE in annotations:
        kind = annotations[CONTAINERD_CONTAINER_TYPE]
        if kind != "container":
            return Container("containerd", "", "", f"{CONTAINERD_CONTAINER_TYPE} is {_show(kind)}, not "
                                                   "\"container\" (a pod sandbox gets no devices)")
        missing = _missing(annotations, CONTAINERD_OWN)
        if missing:
            return Container("containerd", "", "", f"{CONTAINERD_CONTAINER_TYPE} is set but not {missing}, which "
                                                   "containerd writes beside it: a marker a pod author added, not "
                                                   "containerd's")
        # containerd writes these after every passed-through annotation: the pod's own
        # io.kubernetes.cri.sandbox-namespace never reaches config.json.
        return Container("containerd", annotations[CONTAINERD_POD_NAMESPACE], annotations[CONTAINERD_POD_NAME], "")
    manager = annotations.get(MANAGER)
    if manager == "cri-o" or (CRIO_CONTAINER_TYPE in annotations and manager != "libpod"):
        container = Container("cri-o", "", "", "")
        kind = annotations.get(CRIO_CONTAINER_TYPE)
        sandbox_keys = sorted(key for key in CRIO_SANDBOX_ONLY if key in annotations)
        if sandbox_keys:
            # A pod author can overwrite CRI-O's keys in an infra config (even the JSON of
            # "kubelet" annotations, which there holds the pod's); keys only infra configs
            # carry cannot be removed by anyone but CRI-O.
            return container._replace(refusal=f"{sandbox_keys[0]} is set: a CRI-O pod sandbox (infra) config, "
                                              "which gets no devices")
        if manager != "cri-o" or kind != "container":
            return container._replace(refusal=f"{MANAGER} is {_show(manager)} and {CRIO_CONTAINER_TYPE} is "
                                              f"{_show(kind)}; CRI-O writes \"cri-o\" and \"container\" for an app "
                                              "container (a pod sandbox gets no devices)")
        missing = _missing(annotations, CRIO_OWN)
        if missing:
            return container._replace(refusal=f"{MANAGER} is \"cri-o\" but {missing} is not set, which CRI-O "
                                              "writes beside it: a marker a pod author added, not CRI-O's")
        labels = _json_strings(annotations[CRIO_LABELS], CRIO_LABELS)
        if isinstance(labels, str):
            return container._replace(refusal=labels)
        return container._replace(namespace=labels.get(POD_NAMESPACE_LABEL, ""), pod=labels.get(POD_NAME_LABEL, ""))
    if manager == "libpod":
        return Container("podman", "", "", "")
    if any(isinstance(key, str) and key.startswith("io.kubernetes.") for key in annotations):
        # Which keys this runtime writes after the pod's is not known: no namespace.
        return Container("kubernetes", "", "", "")
    return Container("oci", "", "", "")


def _two_runtimes(annotations: dict) -> str:
    """Why config.json carries markers of two runtimes, or ""."""
    containerd_key = _first_key(annotations, CONTAINERD_PREFIX)
    crio_key = MANAGER if MANAGER in annotations else _first_key(annotations, CRIO_PREFIX)
    if annotations.get(MANAGER) == "libpod":
        # Podman's own keys are io.container.manager and io.kubernetes.cri-o.*; any other
        # io.kubernetes. key (the kubelet's labels, containerd's keys) is a Kubernetes
        # runtime's, where a pod author could have written Podman's manager.
        other = _first_key(annotations, "io.kubernetes.", but=CRIO_PREFIX)
        if other:
            return (f"config.json carries markers of two runtimes (Podman's {MANAGER}: \"libpod\" and a Kubernetes "
                    f"runtime's {quote(other)}); a pod author can add another runtime's keys, so neither is believed")
    if containerd_key and crio_key:
        return (f"config.json carries markers of two runtimes (containerd's {quote(containerd_key)} and CRI-O's or "
                f"Podman's {quote(crio_key)}); a pod author can add another runtime's keys, so neither is believed")
    return ""


def _likeliest(annotations: dict) -> str:
    """The runtime whose own keys a mixed config holds all of, for the refusal's wording only."""
    crio = not _missing(annotations, CRIO_OWN) and annotations.get(MANAGER) == "cri-o"
    containerd = not _missing(annotations, CONTAINERD_OWN)
    return "cri-o" if crio and not containerd else "containerd" if containerd and not crio else "kubernetes"


def _missing(annotations: dict, keys: tuple[str, ...]) -> str:
    """The first of keys that config.json lacks (or holds as a non-string), or ""."""
    return next((key for key in keys if not isinstance(annotations.get(key), str)), "")


def _first_key(annotations: dict, prefix: str, but: str = "") -> str:
    return min((key for key in annotations if isinstance(key, str) and key.startswith(prefix)
                and not (but and key.startswith(but))), default="")


def attribute(annotations: dict, names: Iterable[str], *,
              containerd_kubelet_only: bool = False) -> tuple[Container, list[Request]]:
    """The container and one Request per requested name (in `names`' order).

    annotations: the config.json's annotations; names: the devices still to apply.
    containerd_kubelet_only: the node's policy says containerd passes cdi.k8s.io/* through
    its container_annotations only.
    """
    container = classify(annotations)
    key_of = _request_keys(annotations)
    requests = []
    kubelet_sent = None
    for name in names:
        key = key_of.get(name, "")
        if container.refusal:
            source, why = UNKNOWN, container.refusal
        elif container.runtime in ("oci", "podman"):
            source, why = ADMIN, ("no Kubernetes annotations: a runc bundle or Docker" if container.runtime == "oci"
                                  else "Podman (io.container.manager: libpod): whoever runs podman")
        elif container.runtime == "cri-o":
            if kubelet_sent is None:
                kubelet_sent = _kubelet_annotations(annotations)
            if isinstance(kubelet_sent, str):
                source, why = UNKNOWN, kubelet_sent
            elif key and kubelet_sent.get(key) == annotations.get(key):
                source, why = KUBELET, f"{key} is among the kubelet's annotations ({CRIO_KUBELET_ANNOTATIONS})"
            else:
                source, why = POD, f"{key} is not among the kubelet's annotations ({CRIO_KUBELET_ANNOTATIONS}): " \
                                   "a pod annotation"
        elif container.runtime == "containerd":
            if containerd_kubelet_only:
                source, why = KUBELET, ("the policy says containerd passes cdi.k8s.io/* through its "
                                        "container_annotations only")
            else:
                source, why = UNKNOWN, ("containerd does not mark whether an annotation came from the pod or the "
                                        "kubelet; set containerd.cdiAnnotations: container in the policy once its "
                                        "pod_annotations no longer pass cdi.k8s.io/*")
        else:
            source, why = UNKNOWN, "a Kubernetes container of a runtime cdi-hook cannot attribute requests for"
        requests.append(Request(name, key, source, why))
    return container, requests


def _request_keys(annotations: dict) -> dict[str, str]:
    """Device name -> the first cdi.k8s.io/ key naming it."""
    keys: dict[str, str] = {}
    for key, value in annotations.items():
        if isinstance(key, str) and key.startswith(ANNOTATION_PREFIX):
            for name in parse_annotation(key, value):
                keys.setdefault(name, key)
    return keys


def _kubelet_annotations(annotations: dict) -> dict[str, str] | str:
    """CRI-O's JSON object of the kubelet's annotations, or a string saying why it is unusable."""
    raw = annotations.get(CRIO_KUBELET_ANNOTATIONS)
    if raw is None:
        return f"{CRIO_KUBELET_ANNOTATIONS} is missing; CRI-O always writes it"
    return _json_strings(raw, CRIO_KUBELET_ANNOTATIONS)


def _json_strings(raw: object, key: str) -> dict[str, str] | str:
    """A JSON object of strings CRI-O wrote under key, or a string saying why it is unusable.

    CRI-O writes it with Go's json.Marshal of a map: one object, string values, no key
    twice ("null" for none). Anything else did not come from CRI-O: refuse, never guess.
    """
    if not isinstance(raw, str):
        return f"{key} is not a string"

    def strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise ValueError("a key appears twice")
        return obj

    try:
        import json  # only for CRI-O's records (json imports re and enum: ~10 ms of a start)

        decoded = json.loads(raw, object_pairs_hook=strict_object)
    except (ValueError, RecursionError) as error:
        return f"{key} is not valid JSON ({' '.join(str(error).split())[:120]})"
    if decoded is None:
        return {}
    if not isinstance(decoded, dict) or not all(isinstance(v, str) for v in decoded.values()):
        return f"{key} is not a JSON object of strings"
    return decoded


def _show(value: object) -> str:
    from cdi_hook import jsonio

    return "absent" if value is None else jsonio.dumps(value)[:80]
