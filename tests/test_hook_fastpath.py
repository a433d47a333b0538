"""The hook's cheap paths and its input errors, run as a runtime runs it (a child process)."""

from __future__ import annotations

import json
import subprocess
import sys

import oci_env

PROBE = """
import io, sys
from cdi_hook.commands import hook
code = hook.run("createRuntime", [sys.argv[1]], io.BytesIO(sys.argv[2].encode()))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("cdi_hook", "yaml", "structlog", "pyroute2"))
print(code, " ".join(loaded))
"""


def _bundle(tmp_path, annotations=None):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"root": {"path": "rootfs"}, "annotations": annotations or {}}))
    return bundle


def test_no_device_requested_exits_at_once_importing_little(tmp_path):
    bundle = _bundle(tmp_path, {"other": "x"})
    state = json.dumps({"id": "c", "pid": 1, "bundle": str(bundle), "status": "creating"})
    out = subprocess.run([sys.executable, "-I", "-c", PROBE, str(tmp_path / "cdi"), state], cwd=oci_env.REPO,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "0"
    assert set(out[1:]) <= {"cdi_hook", "cdi_hook.commands", "cdi_hook.commands.hook", "cdi_hook.errors", "cdi_hook.oci",
                            "cdi_hook.jsonio"}, out


def _cli(stdin: bytes, *extra):
    return subprocess.run([sys.executable, "-I", "-m", "cdi_hook", "hook", *extra], input=stdin,
                          capture_output=True, cwd=oci_env.REPO, env={"CDI_SPEC_DIRS": "/nonexistent",
                                                                      "CDI_HOOK_LOG": "/dev/null"})


def test_malformed_state_is_one_line_and_nonzero():
    for stdin in (b"", b"{", b'{"id": "c"}', b'{"id": "c", "bundle": "/x", "pid": "1"}'):
        result = _cli(stdin)
        assert result.returncode != 0
        lines = result.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cdi-hook: OCI state on stdin"), lines


def test_missing_bundle_names_config_json(tmp_path):
    result = _cli(json.dumps({"id": "c", "pid": 1, "bundle": str(tmp_path / "gone")}).encode())
    assert result.returncode == 1 and b"config.json: cannot read" in result.stderr


def test_missing_pid_at_create_runtime_is_clear(tmp_path):
    bundle = _bundle(tmp_path, {"cdi.k8s.io/x": "vendor.com/c=d"})
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "s.json", {"cdiVersion": "0.6.0", "kind": "vendor.com/c", "devices": [
        {"name": "d", "containerEdits": {"deviceNodes": [{"path": "/dev/null"}]}}]})
    result = subprocess.run([sys.executable, "-I", "-m", "cdi_hook", "hook", "--spec-dir", str(spec_dir)],
                            input=json.dumps({"id": "c", "bundle": str(bundle)}).encode(), capture_output=True,
                            cwd=oci_env.REPO, env={"CDI_HOOK_INSECURE_SPECS": "1", "CDI_HOOK_LOG": "/dev/null"})
    assert result.returncode == 1 and b"pid: missing" in result.stderr, result.stderr


def test_poststop_runs_only_that_stage_spec_hooks(tmp_path):
    bundle = _bundle(tmp_path, {"cdi.k8s.io/x": "vendor.com/c=d"})
    spec_dir = tmp_path / "cdi"
    marker = tmp_path / "poststop.out"
    oci_env.write_spec(spec_dir, "s.json", {"cdiVersion": "0.6.0", "kind": "vendor.com/c", "devices": [
        {"name": "d", "containerEdits": {
            "deviceNodes": [{"path": "/dev/null"}],  # not touched at poststop: no pid, no rootfs work
            "hooks": [{"hookName": "poststop", "path": "/bin/sh", "args": ["sh", "-c", f"cat > {marker}"]},
                      {"hookName": "createRuntime", "path": "/bin/false"}]}}]})
    state = json.dumps({"id": "c", "bundle": str(bundle), "status": "stopped"}).encode()
    result = subprocess.run([sys.executable, "-I", "-m", "cdi_hook", "hook", "--stage", "poststop",
                             "--spec-dir", str(spec_dir)], input=state, capture_output=True, cwd=oci_env.REPO,
                            env={"CDI_HOOK_INSECURE_SPECS": "1", "CDI_HOOK_LOG": str(tmp_path / "log")})
    assert result.returncode == 0, result.stderr
    assert marker.read_bytes() == state


def test_injection_path_imports_no_heavy_stdlib_modules():
    """Every module a createRuntime injection loads, and none of the stdlib modules that cost
    a container start milliseconds each (dataclasses pulls inspect, ast, dis, tokenize)."""
    heavy = ("dataclasses", "inspect", "typing", "platform", "traceback", "prctl", "pickle", "subprocess",
             "argparse", "yaml", "structlog", "pyroute2")
    probe = ("import sys\n"
             "import cdi_hook.cli, cdi_hook.commands.hook, cdi_hook.oci, cdi_hook.request, cdi_hook.log, cdi_hook.registry\n"
             "import cdi_hook.cache, cdi_hook.plan, cdi_hook.policy, cdi_hook.attribution, cdi_hook.hostdev\n"
             "import cdi_hook.live.inject, cdi_hook.live.worker, cdi_hook.live.holds\n"
             "import cdi_hook.live.cgroups, cdi_hook.live.bpf\n"
             f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=oci_env.REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [], out
