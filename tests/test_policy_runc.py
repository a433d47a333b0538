"""Who may ask for a device, with real runc: config.json files shaped as CRI-O and containerd
write them for a Kubernetes container (tests/runtime_shapes.py), the administrator's own
bundles, a policy file, and exclusive devices held across containers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import hook_env
import oci_env
import runtime_shapes as shapes

ALL = f"{hook_env.VENDOR}=all"
SCRIPT = "test -c /dev/cdi-null && echo NODE; cat /etc/cdi-config.txt"


def spec(tmp_path: Path) -> dict:
    """One device: a node, a read-only file and a createRuntime spec hook leaving a marker."""
    (tmp_path / "config.txt").write_text("vendor config\n")
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-null", "hostPath": "/dev/null"}],
        "mounts": [{"hostPath": str(tmp_path / "config.txt"), "containerPath": "/etc/cdi-config.txt",
                    "options": ["ro", "bind"]}],
        "hooks": [{"hookName": "createRuntime", "path": "/bin/sh",
                   "args": ["sh", "-c", f"echo ran >> {tmp_path / 'spec-hook-ran'}"]}],
    }}]}


def policy_file(tmp_path: Path, text: str, mode: int = 0o644) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def bundle(tmp_path: Path, annotations: dict, extra_env: dict | None = None, script: str = SCRIPT,
           name: str = "bundle"):
    top = tmp_path / name
    top.mkdir()
    return hook_env.bundle_with_hook(top, spec(tmp_path), [], script, annotations=annotations, extra_env=extra_env)


def assert_refused_untouched(tmp_path: Path, bundle_dir: Path, result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "refused CDI request" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "spec-hook-ran").exists(), "a spec hook ran for a refused request"
    assert not (bundle_dir / "rootfs" / "dev" / "cdi-null").exists()
    assert not (bundle_dir / "rootfs" / "etc" / "cdi-config.txt").exists()


def test_crio_pod_authors_request_is_refused_and_nothing_changes(runc, tmp_path):
    mounts_before = oci_env.host_mount_points()
    b, log_file = bundle(tmp_path, shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL}, namespace="ml",
                                               pod="train-0"))
    result = oci_env.run_container(b)
    assert_refused_untouched(tmp_path, b, result, f"in pod ml/train-0: {ALL} (asked by pod through cdi.k8s.io/gpu",
                             "device plugin")
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    [line] = hook_env.log_lines(log_file)
    assert line["level"] == "error" and "refused CDI request" in line["error"]


def test_crio_kubelets_request_is_honoured(runc, tmp_path):
    b, log_file = bundle(tmp_path, shapes.crio(kubelet_annotations={"cdi.k8s.io/gpu": ALL}))
    result = oci_env.run_container(b)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["NODE", "vendor config"]
    assert (tmp_path / "spec-hook-ran").read_text() == "ran\n"
    [line] = hook_env.log_lines(log_file)
    assert line["sources"] == {ALL: "kubelet"}


def test_administrators_bundle_is_honoured(runc, tmp_path):
    b, log_file = bundle(tmp_path, {"cdi.k8s.io/test": ALL})
    result = oci_env.run_container(b)
    assert result.returncode == 0, result.stderr
    assert hook_env.log_lines(log_file)[0]["sources"] == {ALL: "admin"}


def test_containerd_request_is_refused_until_the_policy_vouches(runc, tmp_path):
    annotations = shapes.containerd(pod_annotations={"cdi.k8s.io/gpu": ALL}, pod_passthrough=("cdi.k8s.io/*",))
    b, _ = bundle(tmp_path, annotations)
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "(asked by unknown",
                             "containerd does not mark")
    vouched = policy_file(tmp_path, 'version: "1"\ncontainerd:\n  cdiAnnotations: container\n')
    b2, log_file = bundle(tmp_path, annotations, {"CDI_HOOK_POLICY": vouched}, name="vouched")
    result = oci_env.run_container(b2)
    assert result.returncode == 0, result.stderr
    assert hook_env.log_lines(log_file)[-1]["sources"] == {ALL: "kubelet"}


def test_policy_allows_a_namespace_and_denies_a_device(runc, tmp_path):
    path = policy_file(tmp_path, f"""version: "1"
rules:
  - action: allow
    sources: [pod]
    namespaces: [ml]
    devices: ["{hook_env.VENDOR}=*"]
  - action: deny
    sources: [admin]
    devices: ["{hook_env.VENDOR.split('/')[0]}/*"]
""")
    env = {"CDI_HOOK_POLICY": path}
    b, _ = bundle(tmp_path, shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL}, namespace="ml"), env, name="ml")
    result = oci_env.run_container(b)
    assert result.returncode == 0, result.stderr
    (tmp_path / "spec-hook-ran").unlink()
    b, _ = bundle(tmp_path, shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL}, namespace="prod"), env,
                  name="prod")
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "in pod prod/train-0", "refused by default")
    b, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, env, name="admin")
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), f"{path} rules[1]: deny")


def test_bad_policy_file_refuses_with_a_clear_error(runc, tmp_path):
    bad = policy_file(tmp_path, 'version: "1"\nrules:\n  - action: maybe\n    devices: ["*"]\n')
    b, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, {"CDI_HOOK_POLICY": bad})
    result = oci_env.run_container(b)
    assert result.returncode != 0 and f"{bad}: rules[0].action: must be allow or deny" in result.stderr
    writable = tmp_path / "writable"
    writable.mkdir()
    loose = policy_file(writable, 'version: "1"\n', mode=0o666)
    b, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, {"CDI_HOOK_POLICY": loose}, name="loose")
    result = oci_env.run_container(b)
    assert result.returncode != 0 and "refused: the policy file is writable by every user" in result.stderr
    assert not (tmp_path / "spec-hook-ran").exists()


def _with_poststop(bundle_dir: Path) -> None:
    config = json.loads((bundle_dir / "config.json").read_text())
    entry = dict(config["hooks"]["createRuntime"][0])
    entry["args"] = entry["args"][:-1] + ["poststop"]
    config["hooks"]["poststop"] = [entry]
    (bundle_dir / "config.json").write_text(json.dumps(config))


def test_exclusive_device_is_held_by_one_running_container(runc, tmp_path):
    path = policy_file(tmp_path, f'version: "1"\nexclusive: ["{ALL}"]\n')
    env = {"CDI_HOOK_POLICY": path}
    first, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, env, script="sleep 60", name="first")
    second, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, env, name="second")
    for b in (first, second):
        _with_poststop(b)
    with oci_env.detached_container(first) as holder:
        result = oci_env.run_container(second)
        assert result.returncode != 0
        assert (f"exclusive device for {ALL}: held as {ALL} by running container '{holder.id}' (pid {holder.pid}; "
                f"host device c 1:3)") in result.stderr, result.stderr
        explain = subprocess.run([oci_env.PYTHON, "-I", "-m", "cdi_hook", "explain", "--bundle", str(second)],
                                 capture_output=True, text=True, env=_env(env))
        assert f"exclusive, held by {holder.id}" in explain.stdout, explain.stdout + explain.stderr
    # `runc delete` ran the first container's poststop hook: the device is free again
    result = oci_env.run_container(second)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NODE")


def test_exclusive_hold_of_a_vanished_container_is_taken_over(runc, tmp_path):
    path = policy_file(tmp_path, f'version: "1"\nexclusive: ["{ALL}"]\n')
    b, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, {"CDI_HOOK_POLICY": path})
    # a record left by a container whose process is gone (no poststop ran: a crash, a reboot of runc)
    import os

    held = Path(os.environ["CDI_HOOK_STATE_DIR"])
    held.mkdir(mode=0o700, exist_ok=True)
    from cdi_hook import state

    # one by the host device (/dev/null), one by name (a cdi-hook of before identities)
    state.write_atomic(str(held / "node-c-1-3.json"), state.encode_record(
        {"container": "gone", "pid": 999999999, "start": 1, "device": ALL, "key": "c 1:3"}))
    state.write_atomic(str(held / (ALL.replace("/", "%2F") + ".json")),
                       state.encode_record({"container": "gone", "pid": 999999999, "start": 1}))
    result = oci_env.run_container(b)
    assert result.returncode == 0, result.stderr


def _env(extra: dict) -> dict:
    import os

    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CDI_HOOK_INSECURE_SPECS": "1"}
    for name in ("CDI_HOOK_CACHE_DIR", "CDI_HOOK_STATE_DIR", "CDI_HOOK_LOG"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    env.update(extra)
    return env


def test_poststop_undoes_the_hold_even_when_the_policy_no_longer_allows_the_device(runc, tmp_path):
    """An operator tightens the policy while a container runs: at its poststop the hook still
    gives back what createRuntime took (the hold), runs no spec hook, and says why."""
    import os

    path = policy_file(tmp_path, f'version: "1"\nexclusive: ["{ALL}"]\n')
    env = {"CDI_HOOK_POLICY": path}
    first, log_file = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, env, script="sleep 60", name="first")
    _with_poststop(first)
    record = Path(os.environ["CDI_HOOK_STATE_DIR"]) / "node-c-1-3.json"  # /dev/null, the device's node
    with oci_env.detached_container(first):
        assert record.exists()
        Path(path).write_text(f'version: "1"\nexclusive: ["{ALL}"]\nrules:\n  - action: deny\n'
                              f'    devices: ["{ALL}"]\n')
    assert not record.exists(), "the hold outlived its container"
    # poststop works from the container's record: what createRuntime was allowed and took is
    # given back; the policy is not asked again (this spec has no poststop hook to refuse).
    poststop = [line for line in hook_env.log_lines(log_file) if line["stage"] == "poststop"]
    assert poststop and poststop[-1].get("from") == "record" and "error" not in poststop[-1], poststop


# Issue 22, class 5: markers a pod author adds decide nothing.
CONTAINERD_DISGUISE = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-namespace": "ml"}


def test_crio_pod_posing_as_containerd_is_refused_under_a_vouching_policy(runc, tmp_path):
    """On CRI-O, a pod's io.kubernetes.cri.container-type no longer makes the config containerd's,
    and containerd.cdiAnnotations: container no longer makes the pod's request the kubelet's."""
    vouched = policy_file(tmp_path, 'version: "1"\ncontainerd:\n  cdiAnnotations: container\n')
    annotations = shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL, **CONTAINERD_DISGUISE}, namespace="prod")
    mounts_before = oci_env.host_mount_points()
    b, log_file = bundle(tmp_path, annotations, {"CDI_HOOK_POLICY": vouched})
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "(asked by unknown",
                             "markers of two runtimes", "io.kubernetes.cri.container-type")
    assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    [line] = hook_env.log_lines(log_file)
    assert line["level"] == "error" and "markers of two runtimes" in line["error"]


def test_pods_own_sandbox_namespace_does_not_match_a_namespace_rule(runc, tmp_path):
    """A rule for namespace ml (any source) is not met by a pod in prod writing containerd's
    sandbox-namespace: ml on CRI-O; the pod in ml itself still gets the device."""
    path = policy_file(tmp_path, f'version: "1"\nrules:\n  - action: allow\n    namespaces: [ml]\n'
                                 f'    devices: ["{hook_env.VENDOR}=*"]\n')
    env = {"CDI_HOOK_POLICY": path}
    annotations = shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL, **CONTAINERD_DISGUISE}, namespace="prod")
    b, _ = bundle(tmp_path, annotations, env, name="prod")
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "markers of two runtimes")
    b, _ = bundle(tmp_path, shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL}, namespace="ml"), env, name="ml")
    result = oci_env.run_container(b)
    assert result.returncode == 0, result.stderr


def test_containerd_marker_alone_is_refused(runc, tmp_path):
    """An unknown runtime passing the pod's annotations: containerd's container-type without the
    keys containerd writes beside it is a pod author's, refused under a vouching policy."""
    vouched = policy_file(tmp_path, 'version: "1"\ncontainerd:\n  cdiAnnotations: container\n')
    annotations = {"cdi.k8s.io/gpu": ALL, **CONTAINERD_DISGUISE, **shapes.kubelet_labels()}
    b, _ = bundle(tmp_path, annotations, {"CDI_HOOK_POLICY": vouched})
    assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "(asked by unknown",
                             "io.kubernetes.cri.sandbox-id")


# Issue 22, class 6: a policy file is trusted only with every folder down to it root's.
def test_policy_renamed_over_by_a_user_who_can_write_its_folder_is_refused(runc, tmp_path):
    """A user who can write the policy's folder renames a looser, root-owned policy.yaml.bak
    over policy.yaml: the next start is refused, naming the folder, before anything changes."""
    import os
    import shutil
    import tempfile

    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="cdi-hook-policy-"))  # under /tmp, which nobody can walk through
    try:
        top.chmod(0o755)
        folder = top / "etc-cdi-hook"
        folder.mkdir(mode=0o755)
        strict = policy_file(folder, 'version: "1"\n')
        loose = folder / "policy.yaml.bak"
        loose.write_text(f'version: "1"\nrules:\n  - action: allow\n    sources: [pod]\n    devices: ["{ALL}"]\n')
        annotations = shapes.crio(pod_annotations={"cdi.k8s.io/gpu": ALL})
        b, _ = bundle(tmp_path, annotations, {"CDI_HOOK_POLICY": strict}, name="before")
        assert_refused_untouched(tmp_path, b, oci_env.run_container(b), "a pod author's request is refused by default")
        os.chown(folder, 0, nobody)
        os.chmod(folder, 0o775)
        moved = subprocess.run(["mv", str(loose), strict], user=nobody, group=nobody, extra_groups=[],
                               capture_output=True, text=True)
        assert moved.returncode == 0, moved.stderr
        mounts_before = oci_env.host_mount_points()
        b, _ = bundle(tmp_path, annotations, {"CDI_HOOK_POLICY": strict}, name="after")
        result = oci_env.run_container(b)
        assert result.returncode != 0
        assert f"{strict}: refused: folder {folder} above the policy file is writable by group {nobody}" \
            in result.stderr, result.stderr
        assert not (tmp_path / "spec-hook-ran").exists(), "a spec hook ran under a policy a user put in place"
        assert not (b / "rootfs" / "dev" / "cdi-null").exists()
        assert oci_env.new_host_mounts(mounts_before, oci_env.host_mount_points(), tmp_path) == []
    finally:
        shutil.rmtree(top)


def test_spec_dir_under_a_group_writable_folder_is_refused(runc, tmp_path):
    """With the specs' trust check on (no CDI_HOOK_INSECURE_SPECS), a spec dir whose parent a
    group can write gives no device, and the one line names that folder."""
    import os

    b, _ = bundle(tmp_path, {"cdi.k8s.io/test": ALL}, {"CDI_HOOK_INSECURE_SPECS": "0"})
    result = oci_env.run_container(b)  # every folder is root's, writable by root only: honoured
    assert result.returncode == 0, result.stderr
    (tmp_path / "spec-hook-ran").unlink()
    parent = tmp_path / "bundle"  # the spec dir's: hook_env puts it at bundle/cdi
    os.chown(parent, 0, 65534)
    os.chmod(parent, 0o775)
    result = oci_env.run_container(b)
    assert result.returncode != 0
    assert f"{parent / 'cdi'}: refused: folder {parent} above the spec dir is writable by group 65534" \
        in result.stderr, result.stderr
    assert not (tmp_path / "spec-hook-ran").exists()
    assert not (b / "rootfs" / "dev" / "cdi-null").exists()
