"""cdi-hook precreate: Podman's config filter, run as Podman runs it (argv, stdin, stdout)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from cdi_hook.errors import CdiError
from cdi_hook.commands.edit import cmd_precreate
from cdi_hook.request import APPLIED_ANNOTATION
from oci_env import write_spec

SPEC = {
    "cdiVersion": "0.7.0",
    "kind": "vendor.com/class",
    "containerEdits": {"env": ["VENDOR_SPEC=1"]},
    "devices": [
        {"name": "null", "containerEdits": {
            "env": ["TERM=dumb"],
            "deviceNodes": [{"path": "/dev/vendor-null", "hostPath": "/dev/null"}],
            "mounts": [{"hostPath": "/etc/hostname", "containerPath": "/etc/vendor/hostname", "options": ["ro", "bind"]}],
            "hooks": [{"hookName": "poststop", "path": "/bin/true", "args": ["true"]}],
            "additionalGids": [44],
        }},
        {"name": "zero", "containerEdits": {"deviceNodes": [{"path": "/dev/zero"}]}},
    ],
}

# Podman writes compact JSON; this input has odd spacing and key order on purpose, so only a
# byte-for-byte echo can reproduce it.
PASSTHROUGH = (b'{ "ociVersion":"1.0.2-dev",  "root":{"path":"/var/lib/x/merged"},\n'
               b' "process":{"env":["PATH=/bin"],"args":["sh"], "user":{"uid":0,"gid":0}},'
               b'"annotations":{"io.podman.x":"1","zz":"\\u00e9"} }')


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")  # tmp_path is not a root-only tree
    write_spec(tmp_path / "cdi", "vendor.json", SPEC)
    return str(tmp_path / "cdi")


def config_bytes(annotations: dict) -> bytes:
    return json.dumps({
        "ociVersion": "1.0.2-dev", "root": {"path": "/merged"},
        "process": {"args": ["sh"], "env": ["PATH=/bin", "TERM=xterm"], "user": {"uid": 0, "gid": 0}},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
        "annotations": annotations,
    }).encode()


def precreate(spec_dir, stdin: bytes) -> bytes:
    out = io.BytesIO()
    assert cmd_precreate([spec_dir], io.BytesIO(stdin), out) == 0
    return out.getvalue()


def test_no_request_is_byte_for_byte_passthrough(spec_dir):
    assert precreate(spec_dir, PASSTHROUGH) == PASSTHROUGH


def test_no_annotations_at_all_is_passthrough(spec_dir):
    raw = b'{"ociVersion":"1.0.2","root":{"path":"r"}}\n'
    assert precreate(spec_dir, raw) == raw


def test_already_applied_is_passthrough(spec_dir):
    raw = config_bytes({"cdi.k8s.io/x": "vendor.com/class=null", APPLIED_ANNOTATION: "vendor.com/class=null"})
    assert precreate(spec_dir, raw) == raw


def test_requested_devices_are_applied(spec_dir):
    raw = config_bytes({"cdi.k8s.io/x": "vendor.com/class=null,vendor.com/class=zero"})
    out = json.loads(precreate(spec_dir, raw))
    assert out["process"]["env"] == ["PATH=/bin", "TERM=dumb", "VENDOR_SPEC=1"]
    devices = {d["path"]: d for d in out["linux"]["devices"]}
    assert (devices["/dev/vendor-null"]["type"], devices["/dev/vendor-null"]["major"],
            devices["/dev/vendor-null"]["minor"]) == ("c", 1, 3)
    assert (devices["/dev/zero"]["major"], devices["/dev/zero"]["minor"]) == (1, 5)
    assert out["linux"]["resources"]["devices"][1:] == [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"}]
    assert {"destination": "/etc/vendor/hostname", "source": "/etc/hostname", "options": ["ro", "bind"]} in out["mounts"]
    assert out["hooks"] == {"poststop": [{"path": "/bin/true", "args": ["true"]}]}
    assert out["process"]["user"]["additionalGids"] == [44]
    assert out["annotations"][APPLIED_ANNOTATION] == "vendor.com/class=null,vendor.com/class=zero"


def test_only_pending_devices_are_applied(spec_dir):
    raw = config_bytes({"cdi.k8s.io/x": "vendor.com/class=null,vendor.com/class=zero",
                        APPLIED_ANNOTATION: "vendor.com/class=null"})
    out = json.loads(precreate(spec_dir, raw))
    assert [d["path"] for d in out["linux"]["devices"]] == ["/dev/zero"]
    assert "hooks" not in out  # null's hook was applied before; not added twice
    assert out["annotations"][APPLIED_ANNOTATION] == "vendor.com/class=null,vendor.com/class=zero"


def test_applying_twice_equals_applying_once(spec_dir):
    raw = config_bytes({"cdi.k8s.io/x": "vendor.com/class=null"})
    once = precreate(spec_dir, raw)
    assert precreate(spec_dir, once) == once


def test_errors_raise_and_write_nothing(spec_dir):
    for stdin, expected in (
        (config_bytes({"cdi.k8s.io/x": "vendor.com/class=nope"}), "vendor.com/class=nope"),
        (config_bytes({"cdi.k8s.io/x": "not a name"}), "cdi.k8s.io/x"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
    ):
        out = io.BytesIO()
        with pytest.raises(CdiError) as error:
            cmd_precreate([spec_dir], io.BytesIO(stdin), out)
        assert expected in str(error.value) and "\n" not in str(error.value)
        assert out.getvalue() == b""


def run_cli(spec_dir, stdin: bytes) -> subprocess.CompletedProcess:
    """As Podman runs the hook: the isolated interpreter, an explicit env, config on stdin."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CDI_SPEC_DIRS": spec_dir, "CDI_HOOK_INSECURE_SPECS": "1"}
    return subprocess.run([sys.executable, "-I", "-m", "cdi_hook", "precreate"], input=stdin, env=env,
                          capture_output=True, cwd="/")


def test_cli_passthrough_and_edit(spec_dir):
    result = run_cli(spec_dir, PASSTHROUGH)
    assert result.returncode == 0 and result.stdout == PASSTHROUGH, result.stderr
    result = run_cli(spec_dir, config_bytes({"cdi.k8s.io/x": "vendor.com/class=zero"}))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["linux"]["devices"][0]["path"] == "/dev/zero"


def test_cli_error_is_one_line_and_stdout_empty(spec_dir):
    result = run_cli(spec_dir, config_bytes({"cdi.k8s.io/x": "vendor.com/class=nope"}))
    assert result.returncode != 0
    assert result.stdout == b""
    assert result.stderr.decode().count("\n") == 1 and "vendor.com/class=nope" in result.stderr.decode()
    assert "Traceback" not in result.stderr.decode()


def test_host_device_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    spec = {"cdiVersion": "0.5.0", "kind": "vendor.com/gone",
            "devices": [{"name": "x", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-hook-missing"}]}}]}
    write_spec(tmp_path / "cdi", "gone.json", spec)
    result = run_cli(str(tmp_path / "cdi"), config_bytes({"cdi.k8s.io/x": "vendor.com/gone=x"}))
    assert result.returncode != 0 and result.stdout == b""
    assert "/dev/cdi-hook-missing" in result.stderr.decode() and result.stderr.decode().count("\n") == 1
    assert not os.path.exists("/dev/cdi-hook-missing")


def test_a_pod_authors_request_through_the_runc_wrapper_is_refused(spec_dir):
    """runc-cdi on containerd: the config carries containerd's keys and a passed-through pod
    annotation; by default nobody can tell it from the kubelet's, so it is refused."""
    import runtime_shapes as shapes

    annotations = shapes.containerd(pod_annotations={"cdi.k8s.io/x": "vendor.com/class=null"},
                                    pod_passthrough=("cdi.k8s.io/*",), namespace="team", pod="web")
    out = io.BytesIO()
    with pytest.raises(CdiError, match=r"^refused CDI request in pod team/web: vendor.com/class=null \(asked by "
                                       r"unknown through cdi.k8s.io/x: containerd does not mark"):
        cmd_precreate([spec_dir], io.BytesIO(config_bytes(annotations)), out)
    assert out.getvalue() == b""
