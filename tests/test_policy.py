"""The policy file: strict validation, trust, the decisions, the compiled copy, `policy check`."""

from __future__ import annotations

import json
import os

import pytest

import runtime_shapes as shapes
from cdi_hook import cache, policy, settings
from cdi_hook.cli import main
from cdi_hook.errors import CdiError

GPU = "example.com/gpu=gpu0"


def write_policy(tmp_path, text: str, name: str = "policy.yaml", mode: int = 0o644):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


GOOD = """
version: "1"
containerd:
  cdiAnnotations: container
rules:
  - action: allow
    sources: [pod]
    namespaces: [ml, "dev-*"]
    devices: ["example.com/gpu=*"]
  - action: deny
    devices: ["example.com/fpga=*"]
exclusive: ["example.com/fpga=*", "other.com/*"]
"""


def test_a_good_policy_reads_back(tmp_path):
    p = policy.read(write_policy(tmp_path, GOOD))
    assert p.containerd_kubelet_only is True
    assert [(r.action, r.sources, r.namespaces, r.devices) for r in p.rules] == [
        ("allow", ("pod",), ("ml", "dev-*"), ("example.com/gpu=*",)),
        ("deny", ("kubelet", "pod", "admin", "unknown"), None, ("example.com/fpga=*",))]
    assert policy.exclusive_devices(p, ["example.com/fpga=f0", GPU, "other.com/x=y"]) == ["example.com/fpga=f0",
                                                                                         "other.com/x=y"]


@pytest.mark.parametrize("text, message", [
    ('version: "1"\nrule: []\n', "rule: unknown field"),
    ('version: "2"\n', 'version: must be "1"'),
    ('version: "1"\nrules:\n  - action: permit\n    devices: ["*"]\n', "rules[0].action: must be allow or deny"),
    ('version: "1"\nrules:\n  - action: allow\n', "rules[0].devices: required"),
    ('version: "1"\nrules:\n  - action: allow\n    devices: ["example.com"]\n', "rules[0].devices[0]:"),
    ('version: "1"\nrules:\n  - action: allow\n    devices: ["example.com/gpu=a b"]\n', "rules[0].devices[0]:"),
    ('version: "1"\nrules:\n  - action: allow\n    sources: [root]\n    devices: ["*"]\n',
     'rules[0].sources[0]: "root" is not one of'),
    ('version: "1"\nrules:\n  - action: allow\n    namespaces: [Bad_NS]\n    devices: ["*"]\n',
     "rules[0].namespaces[0]:"),
    ('version: "1"\nrules:\n  - action: allow\n    devices: ["*"]\n    extra: 1\n', "rules[0].extra: unknown field"),
    ('version: "1"\nversion: "1"\n', "duplicate"),
    ('version: "1"\ncontainerd:\n  cdiAnnotations: pod\n', "containerd.cdiAnnotations: must be"),
    ('version: "1"\nexclusive: "example.com/*"\n', "exclusive: expected a list"),
    ("{{{", "invalid"),
])
def test_bad_policies_are_one_line_errors_naming_the_field(tmp_path, text, message):
    path = write_policy(tmp_path, text)
    with pytest.raises(CdiError) as raised:
        policy.read(path)
    assert str(raised.value).startswith(path) and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_group_writable_or_foreign_policy_is_refused(tmp_path):
    path = write_policy(tmp_path, GOOD, mode=0o664)
    os.chown(path, 0, 1000)
    with pytest.raises(CdiError, match="refused: the policy file is writable by group 1000"):
        policy.read(path)
    os.chmod(path, 0o644)
    os.chown(path, 1000, 0)
    with pytest.raises(CdiError, match="owned by uid 1000"):
        policy.read(path)


def test_missing_policy_named_by_the_environment_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_POLICY", str(tmp_path / "nope.yaml"))
    with pytest.raises(CdiError, match="policy file does not exist"):
        policy.load()


def test_missing_default_policy_is_the_default(monkeypatch, tmp_path):
    monkeypatch.delenv("CDI_HOOK_POLICY", raising=False)
    settings.use(settings.current()._replace(policy=str(tmp_path / "absent.yaml")))  # the default path, moved
    assert policy.load() == policy.DEFAULT


def test_a_settled_policy_is_read_from_its_compiled_copy(tmp_path, monkeypatch):
    path = write_policy(tmp_path, GOOD)
    old = 1_600_000_000
    os.utime(path, (old, old))
    monkeypatch.setattr(cache, "FRESH_NS", 3_600_000_000_000)  # its ctime is fresh, however slow the machine
    # (the cache dir is the session's: other tests' hooks may have stored their policies there)
    def stored() -> set[str]:
        folder = cache.cache_dir()
        return {n for n in os.listdir(folder) if n.startswith("policy-")} if folder and os.path.isdir(folder) else set()

    before = stored()
    first = policy.load(path)  # read, not stored yet
    assert stored() == before
    monkeypatch.setattr(cache, "FRESH_NS", 0)
    assert policy.load(path) == first  # stored now
    monkeypatch.setattr(policy, "read", lambda path: pytest.fail("parsed again"))
    assert policy.load(path) == first
    with open(path, "a") as f:
        f.write("# changed\n")
    monkeypatch.undo()
    assert policy.load(path) == first  # a changed file is read again (same rules)



def test_a_policy_renamed_into_a_loose_folder_is_refused_even_after_its_compiled_copy(root_only, tmp_path,
                                                                                       monkeypatch):
    """Issue 22, class 6: the folder counts, not only the file. A compiled copy does not vouch
    for a file renamed over the policy: its inode and ctime differ, so it is read and refused."""
    folder = tmp_path / "etc"
    folder.mkdir(mode=0o755)
    path = write_policy(folder, 'version: "1"\n')
    old = 1_600_000_000
    os.utime(path, (old, old))
    monkeypatch.setattr(cache, "FRESH_NS", 0)
    assert policy.load(path).rules == ()
    assert policy.load(path).rules == ()  # from its compiled copy now
    backup = write_policy(folder, GOOD, name="policy.yaml.bak")
    os.chown(folder, 0, 1000)
    os.chmod(folder, 0o775)
    os.rename(backup, path)
    with pytest.raises(CdiError) as error:
        policy.load(path)
    assert str(error.value).startswith(f"{path}: refused: folder {folder} above the policy file is writable by "
                                       "group 1000")
    assert "\n" not in str(error.value)


def decide(annotations, p=policy.DEFAULT, names=(GPU,)):
    from cdi_hook.attribution import attribute

    container, requests = attribute(annotations, list(names), containerd_kubelet_only=p.containerd_kubelet_only)
    return [(d.allowed, d.reason) for d in policy.decide(p, container, requests)]


def test_default_decisions():
    assert decide(shapes.crio(kubelet_annotations={"cdi.k8s.io/g": GPU}))[0][0] is True
    assert decide(shapes.crio(pod_annotations={"cdi.k8s.io/g": GPU}))[0][0] is False
    assert decide(shapes.containerd(container_annotations={"cdi.k8s.io/g": GPU}))[0][0] is False
    assert decide({"cdi.k8s.io/g": GPU})[0][0] is True
    assert decide(shapes.podman({"cdi.k8s.io/g": GPU}))[0][0] is True


def test_rules_by_namespace_and_device(tmp_path):
    p = policy.read(write_policy(tmp_path, GOOD))
    pod_request = {"cdi.k8s.io/g": GPU}
    assert decide(shapes.crio(pod_annotations=pod_request, namespace="ml"), p)[0] == (True, f"{p.path} rules[0]: allow")
    assert decide(shapes.crio(pod_annotations=pod_request, namespace="dev-42"), p)[0][0] is True
    assert decide(shapes.crio(pod_annotations=pod_request, namespace="prod"), p)[0][0] is False
    fpga = {"cdi.k8s.io/f": "example.com/fpga=f0"}
    assert decide(shapes.crio(kubelet_annotations=fpga), p, ["example.com/fpga=f0"])[0] == (
        False, f"{p.path} rules[1]: deny")
    # a namespaced rule never matches the administrator's containers
    assert decide({"cdi.k8s.io/g": GPU}, p)[0][0] is True
    # the policy vouches for containerd
    assert decide(shapes.containerd(container_annotations={"cdi.k8s.io/g": GPU}), p)[0][0] is True


def test_refusal_is_one_line_naming_device_pod_and_remedy():
    annotations = shapes.crio(pod_annotations={"cdi.k8s.io/g": GPU}, namespace="ml", pod="train-0")
    with pytest.raises(CdiError) as raised:
        policy.authorize(policy.DEFAULT, annotations, [GPU])
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"refused CDI request in pod ml/train-0: {GPU} (asked by pod through cdi.k8s.io/g")
    assert "device plugin" in message and "policy file" in message


def test_policy_check_command(tmp_path, capsys):
    assert main(["policy", "check", write_policy(tmp_path, GOOD)]) == 0
    assert "2 rule(s)" in capsys.readouterr().out
    assert main(["policy", "check", write_policy(tmp_path, 'version: "1"\nrules: 1\n', "bad.yaml")]) == 1
    assert "bad.yaml: rules: expected a list" in capsys.readouterr().err


def test_explain_command(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    annotations = shapes.crio(pod_annotations={"cdi.k8s.io/a": "example.com/gpu=gpu1"},
                              kubelet_annotations={"cdi.k8s.io/g": GPU})
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}, "annotations": annotations}))
    assert main(["explain", "--bundle", str(bundle), "--format", "json"]) == 1  # one request is refused
    report = json.loads(capsys.readouterr().out)
    assert report["container"] == {"runtime": "cri-o", "namespace": "ml", "pod": "train-0"}
    assert [(r["device"], r["source"], r["honoured"]) for r in report["requests"]] == [
        ("example.com/gpu=gpu1", "pod", False), (GPU, "kubelet", True)]
