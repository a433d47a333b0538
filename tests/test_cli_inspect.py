"""`cdi-hook list / validate / show` through cli.main: exit codes, stdout, stderr lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cdi_hook.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from gen_specs import generate  # noqa: E402
from ci_rules import TIME_FACTOR

GPU = {
    "cdiVersion": "0.7.0",
    "kind": "acme.com/gpu",
    "containerEdits": {"env": ["ACME=1"], "mounts": [{"hostPath": "/usr/lib/libacme.so",
                                                      "containerPath": "/usr/lib/libacme.so", "options": ["ro"]}]},
    "devices": [
        {"name": "gpu0", "containerEdits": {"deviceNodes": [{"path": "/dev/acme0", "hostPath": "/dev/null",
                                                             "permissions": "rw"}]}},
        {"name": "gpu1", "containerEdits": {"env": ["GPU=1"], "additionalGids": [44]}},
    ],
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("CDI_SPEC_DIRS", raising=False)
    monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS", raising=False)
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")  # tmp dirs are fine for these tests


@pytest.fixture
def spec_dir(tmp_path):
    d = tmp_path / "cdi"
    d.mkdir()
    (d / "acme.json").write_text(json.dumps(GPU))
    (d / "nic.yaml").write_text("cdiVersion: 1.1.0\nkind: acme.com/nic\ndevices:\n"
                                "- name: eth\n  containerEdits:\n    netDevices: [{hostInterfaceName: eth9, name: net0}]\n")
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_list_table(capsys, spec_dir):
    code, out, err = run(capsys, "list", "--spec-dir", spec_dir)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        "DEVICE             SPEC",
        f"acme.com/gpu=gpu0  {spec_dir}/acme.json",
        f"acme.com/gpu=gpu1  {spec_dir}/acme.json",
        f"acme.com/nic=eth   {spec_dir}/nic.yaml",
    ]


def test_list_json_and_yaml(capsys, spec_dir):
    code, out, _ = run(capsys, "list", "--spec-dir", spec_dir, "--format", "json")
    rows = json.loads(out)
    assert code == 0
    assert [(r["name"], r["spec"]) for r in rows] == [
        ("acme.com/gpu=gpu0", f"{spec_dir}/acme.json"), ("acme.com/gpu=gpu1", f"{spec_dir}/acme.json"),
        ("acme.com/nic=eth", f"{spec_dir}/nic.yaml")]
    code, out_yaml, _ = run(capsys, "list", "--spec-dir", spec_dir, "--format", "yaml")
    assert code == 0 and yaml.safe_load(out_yaml) == rows


def test_list_uses_cdi_spec_dirs(capsys, spec_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CDI_SPEC_DIRS", f"{tmp_path / 'none'}:{spec_dir}")
    code, out, _ = run(capsys, "list", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 3


def test_list_warns_about_bad_specs(capsys, spec_dir):
    (spec_dir / "zz.json").write_text("{")
    code, out, err = run(capsys, "list", "--spec-dir", spec_dir)
    assert code == 0 and "acme.com/gpu=gpu0" in out
    assert err.splitlines() == ["cdi-hook: 1 spec file(s) or dir(s) have errors: run `cdi-hook validate`"]


def test_list_empty(capsys, tmp_path):
    code, out, err = run(capsys, "list", "--spec-dir", tmp_path)
    assert code == 0 and out == ""
    assert err.strip() == f"cdi-hook: no CDI devices in {tmp_path}"
    code, out, _ = run(capsys, "list", "--spec-dir", tmp_path, "--format", "json")
    assert json.loads(out) == []


def test_validate_all_good(capsys, spec_dir):
    code, out, err = run(capsys, "validate", "--spec-dir", spec_dir)
    assert code == 0 and err == ""
    assert out.strip() == (f"2 spec file(s) in {spec_dir}: 2 valid, 0 invalid, 0 conflicting device name(s); "
                           "3 device(s) available")


def test_validate_reports_every_error_and_fails(capsys, spec_dir):
    bad = {**GPU, "kind": "bad.com/x"}
    bad["devices"] = [{"name": "d", "containerEdits": {"deviceNodes": [{"path": "/dev/x", "permissions": "rwx"}]}},
                      {"name": "e", "containerEdits": {}}]
    (spec_dir / "bad.json").write_text(json.dumps(bad))
    code, out, err = run(capsys, "validate", "--spec-dir", spec_dir)
    assert code == 1
    path = spec_dir / "bad.json"
    assert err.splitlines() == [
        f'{path}: devices[0].containerEdits.deviceNodes[0].permissions: "rwx" is not a combination of r, w, m',
        f"{path}: devices[1].containerEdits: a device needs at least one edit",
    ]
    assert "1 invalid" in out


def test_validate_reports_conflicts(capsys, spec_dir):
    (spec_dir / "copy.json").write_text(json.dumps(GPU))
    code, out, err = run(capsys, "validate", "--spec-dir", spec_dir)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 4  # two devices, each named in both files
    assert all("at the same priority" in line for line in lines)
    assert "2 conflicting device name(s)" in out


def test_validate_given_files(capsys, spec_dir, tmp_path):
    elsewhere = tmp_path / "draft.yaml"
    elsewhere.write_text("cdiVersion: 0.3.0\nkind: acme.com/gpu\ndevices:\n- name: x\n  containerEdits: {env: [A]}\n")
    code, out, err = run(capsys, "validate", spec_dir / "acme.json", elsewhere, tmp_path / "missing.json")
    assert code == 1
    assert err.splitlines() == [
        f'{elsewhere}: devices[0].containerEdits.env[0]: "A" is not NAME=VALUE with a non-empty NAME',
        f"{tmp_path / 'missing.json'}: cannot open: No such file or directory",
    ]
    assert out.strip() == "3 spec file(s): 1 valid, 2 invalid"
    code, _, err = run(capsys, "validate", spec_dir / "acme.json")
    assert code == 0 and err == ""


def test_show_json_in_cdi_field_names(capsys, spec_dir):
    code, out, err = run(capsys, "show", "--spec-dir", spec_dir, "acme.com/gpu=gpu1", "acme.com/gpu=gpu0",
                         "acme.com/nic=eth")
    assert code == 0 and err == ""
    assert json.loads(out) == {
        "devices": ["acme.com/gpu=gpu1", "acme.com/gpu=gpu0", "acme.com/nic=eth"],
        "containerEdits": {
            "env": ["ACME=1", "GPU=1"],
            "deviceNodes": [{"path": "/dev/acme0", "hostPath": "/dev/null", "permissions": "rw"}],
            "mounts": [{"hostPath": "/usr/lib/libacme.so", "containerPath": "/usr/lib/libacme.so", "options": ["ro"]}],
            "additionalGids": [44],
            "netDevices": [{"hostInterfaceName": "eth9", "name": "net0"}],
        },
    }


def test_show_yaml_is_the_same_data_and_deterministic(capsys, spec_dir):
    _, out_json, _ = run(capsys, "show", "--spec-dir", spec_dir, "acme.com/gpu=gpu0")
    code, out_yaml, _ = run(capsys, "show", "--spec-dir", spec_dir, "acme.com/gpu=gpu0", "--format", "yaml")
    assert code == 0 and yaml.safe_load(out_yaml) == json.loads(out_json)
    _, again, _ = run(capsys, "show", "--spec-dir", spec_dir, "acme.com/gpu=gpu0", "--format", "yaml")
    assert again == out_yaml


def test_show_unknown_device_is_one_line_error(capsys, spec_dir):
    code, out, err = run(capsys, "show", "--spec-dir", spec_dir, "acme.com/gpu=gpu7", "nope")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        f'cdi-hook: unresolvable CDI devices: acme.com/gpu=gpu7, "nope" (spec dirs searched: {spec_dir}); '
        '"nope" is not a qualified name (vendor.com/class=name)'
    ]


@pytest.mark.slow
def test_validate_speed_1000_specs(capsys, tmp_path):
    """The performance page's figure (docs/development/performance.md), checked: 1,000 specs x 10 devices validated in under 2 s of CPU."""
    d = tmp_path / "many"
    generate(str(d), files=1000, devices=10)
    started = time.process_time()
    code, out, err = run(capsys, "validate", "--spec-dir", d)
    elapsed = time.process_time() - started
    assert code == 0 and err == ""
    assert "10000 device(s) available" in out
    assert elapsed < 2.0 * TIME_FACTOR, f"validate took {elapsed:.2f} s of CPU"


def test_command_line_entry_point(spec_dir):
    """The console script itself: exit code and stderr through a real process."""
    env = {**os.environ, "CDI_HOOK_INSECURE_SPECS": "1"}
    (spec_dir / "bad.json").write_text("[]")
    done = subprocess.run([sys.executable, "-m", "cdi_hook", "validate", "--spec-dir", str(spec_dir)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert done.stderr == f"{spec_dir}/bad.json: the document is not a mapping of spec fields\n"


def test_closed_stdout_is_no_traceback(tmp_path):
    """`cdi-hook list | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    spec_dir = tmp_path / "cdi"
    spec_dir.mkdir()
    for i in range(2000):  # well over a pipe buffer of output, so the write really fails
        (spec_dir / f"v{i}.json").write_text(
            '{"cdiVersion": "0.3.0", "kind": "vendor.com/c%d", "devices": [{"name": "d", '
            '"containerEdits": {"env": ["A=1"]}}]}' % i)
    result = subprocess.run(f"{sys.executable} -m cdi_hook list --spec-dir {spec_dir} | head -1",
                            shell=True, capture_output=True, text=True,
                            env={"CDI_HOOK_INSECURE_SPECS": "1", "PATH": "/usr/bin:/bin"})
    assert result.stdout.startswith("DEVICE")
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_device_plugin_without_the_kubernetes_extra_says_which_extra(tmp_path):
    """An install without [kubernetes] (no grpc): one line naming the extra, no traceback."""
    import subprocess
    import sys

    for blocked in ("grpc", "google.protobuf"):
        code = (f"import sys; sys.modules[{blocked!r}] = None; "
                "from cdi_hook.cli import main; sys.exit(main(['device-plugin', '--socket-dir', sys.argv[1]]))")
        done = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cdi-hook: device-plugin needs the [kubernetes] extra"), lines
