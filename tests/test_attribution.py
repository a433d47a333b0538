"""Who asked: attribution of each request on configs shaped as each runtime writes them,
including a pod author's attempts to pass as the kubelet."""

from __future__ import annotations

import json

import pytest

import runtime_shapes as shapes
from cdi_hook.attribution import ADMIN, KUBELET, POD, UNKNOWN, attribute, classify

GPU = "example.com/gpu=gpu0"
REQUEST = {"cdi.k8s.io/gpu": GPU}


def sources(annotations, **kwargs):
    names = [GPU] if any(k.startswith("cdi.k8s.io/") for k in annotations) else []
    container, requests = attribute(annotations, names or [GPU], **kwargs)
    return container, [r.source for r in requests]


def test_crio_kubelet_request_is_the_kubelets():
    container, found = sources(shapes.crio(kubelet_annotations=REQUEST))
    assert (container.runtime, container.namespace, container.pod) == ("cri-o", "ml", "train-0")
    assert found == [KUBELET]


def test_crio_pod_annotation_is_the_pod_authors():
    assert sources(shapes.crio(pod_annotations=REQUEST))[1] == [POD]


def test_crio_pod_author_cannot_forge_the_kubelets_json():
    forged = json.dumps(REQUEST)
    annotations = shapes.crio(pod_annotations={**REQUEST, "io.kubernetes.cri-o.Annotations": forged,
                                               "io.kubernetes.cri-o.ContainerType": "container"})
    # CRI-O writes its own keys after the pod's: the forged JSON never reaches config.json
    assert annotations["io.kubernetes.cri-o.Annotations"] != forged
    assert sources(annotations)[1] == [POD]


def test_crio_kubelet_wins_a_key_the_pod_also_sets():
    annotations = shapes.crio(pod_annotations={"cdi.k8s.io/gpu": "example.com/gpu=gpu1"}, kubelet_annotations=REQUEST)
    assert annotations["cdi.k8s.io/gpu"] == GPU
    assert sources(annotations)[1] == [KUBELET]


def test_crio_value_must_match_what_the_kubelet_sent():
    annotations = shapes.crio(kubelet_annotations=REQUEST)
    annotations["cdi.k8s.io/gpu"] = "example.com/gpu=gpu1"  # not what CRI-O would write
    container, requests = attribute(annotations, ["example.com/gpu=gpu1"])
    assert requests[0].source == POD


@pytest.mark.parametrize("raw, why", [
    ('{"cdi.k8s.io/gpu": "example.com/gpu=gpu0", "cdi.k8s.io/gpu": "example.com/gpu=gpu0"}', "appears twice"),
    ('{"cdi.k8s.io/gpu": ', "not valid JSON"),
    ('["cdi.k8s.io/gpu"]', "not a JSON object of strings"),
    ('{"cdi.k8s.io/gpu": 1}', "not a JSON object of strings"),
])
def test_crio_broken_kubelet_json_refuses_every_request(raw, why):
    annotations = shapes.crio(kubelet_annotations=REQUEST)
    annotations["io.kubernetes.cri-o.Annotations"] = raw
    container, requests = attribute(annotations, [GPU])
    assert requests[0].source == UNKNOWN and why in requests[0].why


def test_crio_null_kubelet_annotations_mean_none():
    annotations = shapes.crio(pod_annotations=REQUEST)
    annotations["io.kubernetes.cri-o.Annotations"] = "null"
    assert sources(annotations)[1] == [POD]


def test_crio_sandbox_never_gets_devices_even_with_forged_keys():
    annotations = shapes.crio(pod_annotations={**REQUEST, "io.kubernetes.cri-o.ContainerType": "sandbox"},
                              sandbox=True)
    container, requests = attribute(annotations, [GPU])
    assert container.refusal and requests[0].source == UNKNOWN


def test_crio_sandbox_forged_as_container_is_refused():
    # In an infra config the pod's annotations overwrite CRI-O's keys, and the JSON of
    # "kubelet" annotations holds the pod's own: the keys only infra configs carry tell it.
    annotations = shapes.crio(pod_annotations={**REQUEST, "io.kubernetes.cri-o.ContainerType": "container"},
                              sandbox=True)
    assert json.loads(annotations["io.kubernetes.cri-o.Annotations"])["cdi.k8s.io/gpu"] == GPU
    container, requests = attribute(annotations, [GPU])
    assert requests[0].source == UNKNOWN and "pod sandbox" in requests[0].why


def test_containerd_is_unknown_unless_the_policy_vouches():
    annotations = shapes.containerd(container_annotations=REQUEST)
    container, found = sources(annotations)
    assert (container.runtime, container.namespace, container.pod) == ("containerd", "ml", "train-0")
    assert found == [UNKNOWN]
    assert sources(annotations, containerd_kubelet_only=True)[1] == [KUBELET]


def test_containerd_keys_beat_a_pod_authors_crio_disguise():
    disguise = {**REQUEST, "io.container.manager": "cri-o", "io.kubernetes.cri-o.ContainerType": "container",
                "io.kubernetes.cri-o.Annotations": json.dumps(REQUEST)}
    annotations = shapes.containerd(pod_annotations=disguise, pod_passthrough=("*",))
    container, found = sources(annotations)
    assert container.runtime == "containerd" and found == [UNKNOWN]


def test_containerd_sandbox_is_refused():
    annotations = shapes.containerd(pod_annotations=REQUEST, pod_passthrough=("cdi.k8s.io/*",), sandbox=True)
    container, found = sources(annotations, containerd_kubelet_only=True)
    assert container.refusal and found == [UNKNOWN]


def test_podman_and_plain_bundles_are_the_administrators():
    assert sources(shapes.podman(REQUEST)) == (classify(shapes.podman(REQUEST)), [ADMIN])
    assert sources(dict(REQUEST))[1] == [ADMIN]


def test_unknown_kubernetes_runtime_is_unknown():
    container, found = sources({**REQUEST, "io.kubernetes.pod.namespace": "ml", "io.kubernetes.pod.name": "p"})
    assert container.runtime == "kubernetes" and found == [UNKNOWN]


def test_manager_cri_o_with_a_missing_container_type_is_refused():
    annotations = shapes.crio(kubelet_annotations=REQUEST)
    del annotations["io.kubernetes.cri-o.ContainerType"]
    assert sources(annotations)[1] == [UNKNOWN]


# Issue 22, class 5: markers a pod author can add must not decide the runtime.
CONTAINERD_DISGUISE = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-namespace": "ml"}


@pytest.mark.parametrize("vouched", [False, True])
def test_crio_pod_adding_containerds_markers_is_refused(vouched):
    """A CRI-O pod that adds containerd's container-type is not taken for containerd's: the
    policy's containerd.cdiAnnotations no longer makes its request the kubelet's."""
    annotations = shapes.crio(pod_annotations={**REQUEST, **CONTAINERD_DISGUISE}, namespace="prod")
    container, requests = attribute(annotations, [GPU], containerd_kubelet_only=vouched)
    assert container.refusal and requests[0].source == UNKNOWN
    assert "markers of two runtimes" in requests[0].why and "io.kubernetes.cri.container-type" in requests[0].why
    assert (container.runtime, container.namespace, container.pod) == ("cri-o", "", "")


def test_crio_pod_adding_containerds_whole_key_set_is_still_refused():
    disguise = shapes.containerd(namespace="ml")
    annotations = shapes.crio(pod_annotations={**REQUEST, **disguise}, namespace="prod")
    container, found = sources(annotations, containerd_kubelet_only=True)
    assert found == [UNKNOWN] and container.runtime == "kubernetes" and container.namespace == ""


def test_crio_namespace_comes_from_crios_labels_not_the_pods_annotations():
    annotations = shapes.crio(pod_annotations={**REQUEST, "io.kubernetes.pod.namespace": "ml"}, namespace="prod")
    annotations["io.kubernetes.pod.namespace"] = "ml"  # even were a top-level key left as the pod wrote it
    assert classify(annotations).namespace == "prod"


@pytest.mark.parametrize("broken, why", [("[]", "not a JSON object of strings"), ("{", "not valid JSON")])
def test_crio_broken_labels_refuse(broken, why):
    annotations = shapes.crio(kubelet_annotations=REQUEST)
    annotations["io.kubernetes.cri-o.Labels"] = broken
    container, found = sources(annotations)
    assert found == [UNKNOWN] and why in container.refusal


def test_containerd_marker_without_containerds_own_keys_is_refused():
    """An unknown runtime passing pod annotations: containerd's container-type alone is a marker a
    pod author wrote; its namespace is not read."""
    annotations = {**REQUEST, **CONTAINERD_DISGUISE, "io.kubernetes.pod.name": "p"}
    container, found = sources(annotations, containerd_kubelet_only=True)
    assert found == [UNKNOWN] and "io.kubernetes.cri.sandbox-id" in container.refusal
    assert container.namespace == ""


def test_crio_manager_without_crios_own_keys_is_refused():
    annotations = {**REQUEST, "io.container.manager": "cri-o", "io.kubernetes.cri-o.ContainerType": "container",
                   "io.kubernetes.cri-o.Annotations": json.dumps(REQUEST)}
    container, found = sources(annotations)
    assert found == [UNKNOWN] and "io.kubernetes.cri-o.ContainerID" in container.refusal


def test_podman_manager_on_a_kubernetes_config_is_refused():
    """A pod author on a runtime passing pod annotations writes Podman's manager: not the admin's."""
    annotations = {**REQUEST, "io.container.manager": "libpod", "io.kubernetes.pod.namespace": "ml"}
    container, found = sources(annotations)
    assert found == [UNKNOWN] and "Podman" in container.refusal


def test_unknown_kubernetes_runtime_has_no_namespace():
    container, found = sources({**REQUEST, "io.kubernetes.pod.namespace": "ml", "io.kubernetes.pod.name": "p"})
    assert (container.namespace, container.pod) == ("", "")
