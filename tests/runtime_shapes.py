"""config.json annotations built the way each runtime builds them for a Kubernetes container.

The order of each builder is the runtime's own (docs/kubernetes/who-may-ask.md):

CRI-O, internal/factory/container/container.go SpecAddAnnotations: the pod's annotations,
then CRI-O's keys (io.kubernetes.cri-o.Annotations: json.Marshal of the kubelet's
container annotations), then the kubelet's container annotations, then the kubelet's labels.

containerd, CRI plugin: the pod annotations its pod_annotations globs pass, then the
container annotations its container_annotations globs pass, then its own keys
(DefaultCRIAnnotations), last.
"""

from __future__ import annotations

import fnmatch
import json


def kubelet_labels(namespace: str = "ml", pod: str = "train-0", container: str = "main") -> dict:
    return {"io.kubernetes.pod.name": pod, "io.kubernetes.pod.namespace": namespace,
            "io.kubernetes.pod.uid": "0d5c4a5e-1c2b-4c7e-9f00-000000000001", "io.kubernetes.container.name": container}


def crio(pod_annotations: dict | None = None, kubelet_annotations: dict | None = None, *,
         namespace: str = "ml", pod: str = "train-0", sandbox: bool = False) -> dict:
    """A CRI-O app container's (or, sandbox=True, its infra container's) annotations."""
    pod_annotations = dict(pod_annotations or {})
    kubelet = {"io.kubernetes.container.hash": "1a2b3c4d", "io.kubernetes.container.restartCount": "0"}
    kubelet.update(kubelet_annotations or {})
    out: dict = {}
    if sandbox:
        # sandbox_run_linux.go: CRI-O's keys first, then the pod's annotations over them
        out.update({"io.kubernetes.cri-o.ContainerType": "sandbox", "io.container.manager": "cri-o",
                    "io.kubernetes.cri-o.Annotations": json.dumps(pod_annotations, separators=(",", ":")),
                    "io.kubernetes.cri-o.KubeName": pod, "io.kubernetes.cri-o.Namespace": namespace})
        out.update(pod_annotations)
        out.update(kubelet_labels(namespace, pod, "POD"))
        return out
    out.update(pod_annotations)
    out.update({
        "io.container.manager": "cri-o",
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.cri-o.ContainerID": "5f3e" * 16,
        "io.kubernetes.cri-o.SandboxID": "9a1b" * 16,
        "io.kubernetes.cri-o.Name": f"k8s_main_{pod}_{namespace}_0d5c4a5e_0",
        "io.kubernetes.cri-o.Labels": json.dumps(kubelet_labels(namespace, pod), separators=(",", ":")),
        "io.kubernetes.cri-o.Annotations": json.dumps(kubelet, separators=(",", ":")),
        "io.kubernetes.cri-o.TTY": "false",
    })
    out.update(kubelet)
    out.update(kubelet_labels(namespace, pod))
    return out


def containerd(pod_annotations: dict | None = None, container_annotations: dict | None = None, *,
               pod_passthrough=(), container_passthrough=("cdi.k8s.io/*",), namespace: str = "ml",
               pod: str = "train-0", sandbox: bool = False) -> dict:
    """A containerd CRI container's annotations, with the runtime's passthrough globs."""
    out: dict = {}
    for source, globs in ((pod_annotations or {}, pod_passthrough), (container_annotations or {}, container_passthrough)):
        if sandbox and globs is container_passthrough:
            continue
        for key, value in source.items():
            if any(fnmatch.fnmatchcase(key, glob) for glob in globs):
                out[key] = value
    out.update({
        "io.kubernetes.cri.sandbox-id": "7c2d" * 16,
        "io.kubernetes.cri.sandbox-namespace": namespace,
        "io.kubernetes.cri.sandbox-uid": "0d5c4a5e-1c2b-4c7e-9f00-000000000001",
        "io.kubernetes.cri.sandbox-name": pod,
    })
    if not sandbox:
        out.update({"io.kubernetes.cri.container-name": "main", "io.kubernetes.cri.image-name": "busybox:latest"})
    out["io.kubernetes.cri.container-type"] = "sandbox" if sandbox else "container"
    return out


def podman(annotations: dict | None = None) -> dict:
    """What Podman 4.3 wrote for `podman run --annotation ...` (read off this VM)."""
    out = {"io.container.manager": "libpod", "io.kubernetes.cri-o.Created": "2026-11-29T21:44:29.767023819Z",
           "io.kubernetes.cri-o.TTY": "false", "io.podman.annotations.autoremove": "FALSE",
           "io.podman.annotations.init": "FALSE", "io.podman.annotations.privileged": "FALSE",
           "io.podman.annotations.publish-all": "FALSE", "org.opencontainers.image.stopSignal": "15"}
    out.update(annotations or {})
    return out
