"""Hostile but valid-looking specs: clear one-line errors or bounded work, never a traceback or a hang.

Specs are trusted to be root-owned, but they are still written by hand or by vendor tools
with bugs; the hook reads them on every container start. Cases: `..` in container paths
(clamped to the rootfs by real runc), a device hostPath that is a symlink to another device,
huge counts of devices, nodes and mounts, deep JSON and YAML nesting, a YAML alias bomb.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

import hook_env
import oci_env
from ci_rules import TIME_FACTOR

ALL = f"{hook_env.VENDOR}=all"
CORPUS = Path(__file__).parent / "fuzz_corpus"


def _cli(args: list[str], spec_dir: Path, timeout: int = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {"PATH": "/usr/bin:/bin", "CDI_SPEC_DIRS": str(spec_dir), "CDI_HOOK_INSECURE_SPECS": "1"}
    started = time.monotonic()
    result = subprocess.run([oci_env.PYTHON, "-I", "-m", "cdi_hook", *args], capture_output=True, text=True,
                            env=env, cwd=oci_env.REPO, timeout=timeout)
    return result, time.monotonic() - started


def _assert_clean(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    for line in result.stderr.splitlines():
        assert len(line) < 5000, "an error line that long is no longer a clear message"


def test_dotdot_container_paths_stay_inside_the_rootfs(runc, tmp_path):
    sources = hook_env.host_files(tmp_path)
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/../../../../cdi-escape-node", "hostPath": "/dev/zero"}],
        "mounts": [{"hostPath": sources["file"], "containerPath": "../../../../../cdi-escape-file",
                    "options": ["ro", "bind"]},
                   {"hostPath": sources["dir"], "containerPath": "/mnt/../../../cdi-escape-dir", "options": ["rbind"]}],
    }}]}
    script = "test -c /cdi-escape-node && cat /cdi-escape-file /cdi-escape-dir/hello && echo INSIDE"
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], script)
    host_paths = [Path("/cdi-escape-node"), Path("/cdi-escape-file"), Path("/cdi-escape-dir"),
                  tmp_path / "cdi-escape-node", tmp_path / "cdi-escape-file"]
    result = oci_env.run_container(bundle)
    _assert_clean(result)
    if result.returncode == 0:
        assert "INSIDE" in result.stdout, result.stdout + result.stderr
    else:  # a validation refusal is fine too, as long as it says so
        assert "containerPath" in result.stderr or "path" in result.stderr, result.stderr
    assert not any(p.exists() for p in host_paths)


def test_device_host_path_that_is_a_symlink_to_another_device_is_refused(runc, tmp_path):
    link = tmp_path / "looks-like-zero"
    link.symlink_to("/dev/kvm")
    spec = {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": {
        "deviceNodes": [{"path": "/dev/cdi-zero", "hostPath": str(link)}]}}]}
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, [ALL], "echo RAN")
    result = oci_env.run_container(bundle)
    _assert_clean(result)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert "symlink" in result.stderr and str(link) in result.stderr, result.stderr


def test_huge_counts_are_bounded_work(tmp_path):
    spec_dir = tmp_path / "cdi"
    devices = [{"name": f"d{i}", "containerEdits": {"deviceNodes": [{"path": f"/dev/cdi/{i}", "type": "c",
                                                                     "major": 1, "minor": 3}]}}
               for i in range(20_000)]
    devices.append({"name": "wide", "containerEdits": {
        "deviceNodes": [{"path": f"/dev/wide/{i}", "type": "c", "major": 1, "minor": 3} for i in range(5_000)],
        "mounts": [{"hostPath": "/etc/hostname", "containerPath": f"/m/{i}", "options": ["ro", "bind"]}
                   for i in range(5_000)]}})
    spec_dir.mkdir()
    data = json.dumps({"cdiVersion": "0.6.0", "kind": "huge.com/dev", "devices": devices}, separators=(",", ":"))
    assert len(data) < 4 << 20  # under the default size limit, which bounds the rest
    (spec_dir / "huge.json").write_text(data)
    result, seconds = _cli(["validate"], spec_dir)
    _assert_clean(result)
    assert result.returncode == 0 and "20001 device(s)" in result.stdout + result.stderr, result.stdout + result.stderr
    assert seconds < 20 * TIME_FACTOR, f"validate took {seconds:.1f}s"
    result, seconds = _cli(["show", "huge.com/dev=wide", "huge.com/dev=d19999"], spec_dir)
    _assert_clean(result)
    assert result.returncode == 0 and len(json.loads(result.stdout)["containerEdits"]["mounts"]) == 5_000
    assert seconds < 20 * TIME_FACTOR, f"show took {seconds:.1f}s"


@pytest.mark.parametrize("case", ["json-deep", "yaml-flow-deep", "yaml-block-deep", "yaml-alias-bomb",
                                  "yaml-recursive-alias", "json-huge-number", "yaml-huge-number",
                                  "yaml-impossible-date"])
def test_nesting_and_alias_bombs_are_clear_errors(tmp_path, case):
    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    head = 'cdiVersion: "0.6.0"\nkind: a.com/b\n'
    if case == "json-deep":
        (spec_dir / "s.json").write_text('{"cdiVersion":"0.6.0","kind":"a.com/b","devices":' + "[" * 200_000
                                         + "]" * 200_000 + "}")
    elif case == "yaml-flow-deep":
        (spec_dir / "s.yaml").write_text(head + "devices: " + "[" * 100_000 + "]" * 100_000 + "\n")
    elif case == "yaml-block-deep":
        (spec_dir / "s.yaml").write_text(head + "devices:\n" + "".join(" " * i + "- \n" for i in range(1, 1500)))
    elif case == "yaml-alias-bomb":
        (spec_dir / "s.yaml").write_bytes((CORPUS / "yaml-alias-bomb.yaml").read_bytes())
    elif case == "yaml-recursive-alias":
        (spec_dir / "s.yaml").write_text(head + "devices: &a [*a]\n")
    elif case == "yaml-huge-number":
        (spec_dir / "s.yaml").write_bytes((CORPUS / "huge-integer.yaml").read_bytes())
    elif case == "yaml-impossible-date":
        (spec_dir / "s.yaml").write_bytes((CORPUS / "impossible-date.yaml").read_bytes())
    else:
        (spec_dir / "s.json").write_text('{"cdiVersion":"0.6.0","kind":"a.com/b","devices":[{"name":"x",'
                                         '"containerEdits":{"deviceNodes":[{"path":"/dev/x","major":1'
                                         + "0" * 5000 + "}]}}]}")
    result, seconds = _cli(["validate"], spec_dir, timeout=60)
    _assert_clean(result)
    assert result.returncode != 0, result.stdout
    assert "s.json" in result.stderr + result.stdout or "s.yaml" in result.stderr + result.stdout
    assert seconds < 15 * TIME_FACTOR, f"{case}: {seconds:.1f}s"
