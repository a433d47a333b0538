"""cdi-hook inject --bundle: atomic rewrite, backup, untouched on error, and a real runc run."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from cdi_hook.commands import edit
from cdi_hook.cli import main
from cdi_hook.commands.edit import INJECT_ANNOTATION
from cdi_hook.hook_entry import entry_code, site_paths
from cdi_hook.request import APPLIED_ANNOTATION
from oci_env import make_bundle, run_container, write_spec


@pytest.fixture(autouse=True)
def no_carried_settings(monkeypatch):
    """The session's private cache/log settings (conftest) would be carried into the files."""
    from cdi_hook.hook_entry import CARRIED_SETTINGS

    for name in CARRIED_SETTINGS:
        monkeypatch.delenv(name, raising=False)


SPEC = {
    "cdiVersion": "0.6.0",
    "kind": "vendor.com/class",
    "devices": [
        {"name": "zero", "containerEdits": {"deviceNodes": [{"path": "/dev/zero"}], "env": ["ZERO=1"]}},
        {"name": "null", "containerEdits": {"deviceNodes": [{"path": "/dev/vendor-null", "hostPath": "/dev/null"}]}},
    ],
}

CONFIG = {
    "ociVersion": "1.0.2",
    "root": {"path": "rootfs"},
    "process": {"args": ["sh"], "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "cwd": "/"},
    "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
    "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
}


@pytest.fixture
def spec_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    write_spec(tmp_path / "cdi", "vendor.json", SPEC)
    return str(tmp_path / "cdi")


@pytest.fixture
def bundle(tmp_path):
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "config.json").write_text(json.dumps(CONFIG, indent=1))
    os.chmod(b / "config.json", 0o640)
    return b


def inject(bundle, spec_dir, *devices, mode="edits") -> int:
    argv = ["inject", "--bundle", str(bundle), "--spec-dir", spec_dir, "--mode", mode]
    for device in devices:
        argv += ["--device", device]
    return main(argv)


def config_of(bundle) -> dict:
    return json.loads((bundle / "config.json").read_text())


def snapshot(bundle) -> dict:
    """Names, bytes and inode of every file in the bundle dir (to prove nothing changed)."""
    return {p.name: (p.read_bytes(), p.stat().st_ino) for p in bundle.iterdir() if p.is_file()}


def test_edits_mode_rewrites_config_and_keeps_backup(bundle, spec_dir, capsys):
    original = (bundle / "config.json").read_bytes()
    inode = (bundle / "config.json").stat().st_ino
    assert inject(bundle, spec_dir, "vendor.com/class=zero") == 0
    config = config_of(bundle)
    assert config["linux"]["devices"][0]["path"] == "/dev/zero"
    assert config["process"]["env"] == ["PATH=/bin", "ZERO=1"]
    assert config["annotations"][APPLIED_ANNOTATION] == "vendor.com/class=zero"
    assert (bundle / "config.json.orig").read_bytes() == original
    assert stat.S_IMODE((bundle / "config.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((bundle / "config.json.orig").stat().st_mode) == 0o640
    assert (bundle / "config.json").stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "config.json.orig"]  # no temp files
    assert "vendor.com/class=zero" in capsys.readouterr().out


def test_second_inject_keeps_first_backup_and_adds_only_new(bundle, spec_dir):
    original = (bundle / "config.json").read_bytes()
    inject(bundle, spec_dir, "vendor.com/class=zero")
    inject(bundle, spec_dir, "vendor.com/class=zero", "vendor.com/class=null")
    config = config_of(bundle)
    assert [d["path"] for d in config["linux"]["devices"]] == ["/dev/zero", "/dev/vendor-null"]
    assert len(config["linux"]["resources"]["devices"]) == 3  # deny-all + one rule per device, no repeats
    assert config["annotations"][APPLIED_ANNOTATION] == "vendor.com/class=zero,vendor.com/class=null"
    assert (bundle / "config.json.orig").read_bytes() == original


def test_repeat_inject_is_a_no_op(bundle, spec_dir, capsys):
    inject(bundle, spec_dir, "vendor.com/class=zero")
    before = snapshot(bundle)
    assert inject(bundle, spec_dir, "vendor.com/class=zero") == 0
    assert snapshot(bundle) == before
    assert "nothing to do" in capsys.readouterr().out


def test_hook_mode_adds_annotation_and_live_hook_entries(bundle, spec_dir):
    assert inject(bundle, spec_dir, "vendor.com/class=zero", mode="hook") == 0
    assert inject(bundle, spec_dir, "vendor.com/class=null", "vendor.com/class=zero", mode="hook") == 0
    config = config_of(bundle)
    assert config["annotations"][INJECT_ANNOTATION] == "vendor.com/class=zero,vendor.com/class=null"
    assert "devices" not in config["linux"]  # the live hook does the work
    python = os.path.abspath(sys.executable)
    # nothing to do after the start for these devices: no post entry, no interpreter started for one
    assert set(config["hooks"]) == {"createRuntime"}
    for stage in ("createRuntime",):
        entries = config["hooks"][stage]
        assert len(entries) == 1, stage  # not added twice
        assert entries[0]["path"] == python
        assert entries[0]["args"] == [python, "-I", "-S", "-c", entry_code(site_paths(python)), "hook", "--stage",
                                      stage]
        # CDI_HOOK_POST_STAGES: the later stages it wrote entries for (none): the record knows no poststop comes
        assert entries[0]["env"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", f"CDI_SPEC_DIRS={spec_dir}",
                                     "CDI_HOOK_POST_STAGES="]
    assert not {"prestart", "createContainer", "startContainer"} & set(config["hooks"])


LATER_WORK = {
    "poststart hook": ({"hooks": [{"hookName": "poststart", "path": "/bin/true"}]}, None, ["poststart"]),
    "poststop hook": ({"hooks": [{"hookName": "poststop", "path": "/bin/true"}]}, None, ["poststop"]),
    "network device": ({"netDevices": [{"hostInterfaceName": "cdi-x0", "name": "eth9"}]}, None, ["poststop"]),
    "exclusive in the policy": ({"env": ["X=1"]}, "exclusive", ["poststop"]),
    "shareable (held)": ({"env": ["X=1"]}, "shared", ["poststop"]),
    "nothing later": ({"env": ["X=1"]}, None, []),
}


@pytest.mark.parametrize("case", LATER_WORK)
def test_hook_mode_writes_the_later_stages_the_devices_have_work_at(bundle, tmp_path, monkeypatch, case):
    """inject --mode hook writes createRuntime and only the later stages the plan has work at
    (record.needed_stages, the same rule the record's work follows): a later stage with
    nothing to do would start an interpreter on every start for nothing."""
    edits, policy, stages = LATER_WORK[case]
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    device = {"name": "d", "containerEdits": edits}
    if policy == "shared":
        device["annotations"] = {"io.github.cdi-hook.shared": "2"}
    write_spec(tmp_path / "later", "later.json", {"cdiVersion": "1.1.0", "kind": "vendor.com/later",
                                                  "devices": [device]})
    if policy == "exclusive":
        path = tmp_path / "policy.yaml"
        path.write_text('version: "1"\nexclusive: [vendor.com/later=d]\n')
        os.chmod(path, 0o600)
        monkeypatch.setenv("CDI_HOOK_POLICY", str(path))
    assert inject(bundle, str(tmp_path / "later"), "vendor.com/later=d", mode="hook") == 0
    hooks = config_of(bundle)["hooks"]
    assert sorted(hooks) == sorted(["createRuntime", *stages])
    assert all(hooks[stage][0]["args"][-1] == stage for stage in hooks)
    assert hooks["createRuntime"][0]["env"][-1] == "CDI_HOOK_POST_STAGES=" + ",".join(stages)


def test_hook_mode_plans_the_stages_for_every_request_the_hook_will_act_on(bundle, tmp_path, monkeypatch):
    """A config.json that already asks for a device with later work (a cdi.k8s.io/
    annotation of its own) gets that stage's entry when inject adds a device with none: the
    hook acts on every pending request, not only inject's. A second inject that needs the
    stage adds it and says so in the createRuntime entry it wrote before."""
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    write_spec(tmp_path / "later", "later.json", {"cdiVersion": "1.1.0", "kind": "vendor.com/later", "devices": [
        {"name": "idle", "containerEdits": {"env": ["X=1"]}},
        {"name": "late", "containerEdits": {"hooks": [{"hookName": "poststop", "path": "/bin/true"}]}}]})
    config = config_of(bundle)
    config["annotations"] = {"cdi.k8s.io/other": "vendor.com/later=late"}
    (bundle / "config.json").write_text(json.dumps(config))
    assert inject(bundle, str(tmp_path / "later"), "vendor.com/later=idle", mode="hook") == 0
    hooks = config_of(bundle)["hooks"]
    assert sorted(hooks) == ["createRuntime", "poststop"]
    assert hooks["createRuntime"][0]["env"][-1] == "CDI_HOOK_POST_STAGES=poststop"
    # again, on a bundle whose first inject wrote createRuntime alone
    (bundle / "config.json").write_text(json.dumps(CONFIG))
    assert inject(bundle, str(tmp_path / "later"), "vendor.com/later=idle", mode="hook") == 0
    assert config_of(bundle)["hooks"]["createRuntime"][0]["env"][-1] == "CDI_HOOK_POST_STAGES="
    assert inject(bundle, str(tmp_path / "later"), "vendor.com/later=late", mode="hook") == 0
    hooks = config_of(bundle)["hooks"]
    assert sorted(hooks) == ["createRuntime", "poststop"] and len(hooks["createRuntime"]) == 1
    assert hooks["createRuntime"][0]["env"][-1] == "CDI_HOOK_POST_STAGES=poststop"


def test_hook_mode_keeps_an_entry_an_older_version_wrote_with_dash_m(spec_dir):
    """A bundle given the live hook by a version that wrote `-I -m cdi_hook` is not given a
    second entry of today's `-I -c` form (the hook would run twice)."""
    python = os.path.abspath(sys.executable)
    first = edit.add_hook_request(CONFIG, ["vendor.com/class=zero"], [spec_dir])
    for entries in first["hooks"].values():
        entries[0]["args"][1:5] = ["-I", "-m", "cdi_hook"]
    again = edit.add_hook_request(first, ["vendor.com/class=zero"], [spec_dir])
    for stage, entries in again["hooks"].items():
        assert [e["args"][:4] for e in entries] == [[python, "-I", "-m", "cdi_hook"]], stage


def test_hook_mode_without_spec_dirs_sets_no_spec_dir_env(bundle, spec_dir, monkeypatch):
    monkeypatch.delenv("CDI_SPEC_DIRS", raising=False)
    edited = edit.add_hook_request(CONFIG, ["vendor.com/class=zero"], None)
    assert edited["hooks"]["createRuntime"][0]["env"] == ["PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                                                           "CDI_HOOK_POST_STAGES=poststart,poststop"]


@pytest.mark.parametrize("mode", ["edits", "hook"])
def test_unknown_device_leaves_bundle_untouched(bundle, spec_dir, capsys, mode):
    before = snapshot(bundle)
    assert inject(bundle, spec_dir, "vendor.com/class=zero", "vendor.com/class=nope", mode=mode) == 1
    assert snapshot(bundle) == before
    err = capsys.readouterr().err
    assert "vendor.com/class=nope" in err and err.count("\n") == 1


def test_missing_host_node_leaves_bundle_untouched(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    write_spec(tmp_path / "gone", "gone.json", {"cdiVersion": "0.5.0", "kind": "vendor.com/gone", "devices": [
        {"name": "x", "containerEdits": {"deviceNodes": [{"path": "/dev/cdi-hook-missing"}]}}]})
    before = snapshot(bundle)
    assert inject(bundle, str(tmp_path / "gone"), "vendor.com/gone=x") == 1
    assert snapshot(bundle) == before
    assert "/dev/cdi-hook-missing" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"{garbage", "not valid JSON"),
    (b'["a list"]', "not a JSON object"),
    (b'{"ociVersion": "1.0.2", "process": {}}', "root.path"),
    (b'{"root": {"path": ""}}', "root.path"),
])
def test_invalid_bundle_is_refused_untouched(tmp_path, spec_dir, capsys, content, message):
    b = tmp_path / "bad"
    b.mkdir()
    if content is not None:
        (b / "config.json").write_bytes(content)
    before = snapshot(b)
    assert inject(b, spec_dir, "vendor.com/class=zero") == 1
    assert snapshot(b) == before
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_failed_rename_leaves_config_and_no_temp(bundle, spec_dir, monkeypatch, capsys):
    original = (bundle / "config.json").read_bytes()
    real_rename = os.rename

    def failing_rename(src, dst, **dir_fds):
        if str(dst).endswith("config.json"):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst, **dir_fds)

    monkeypatch.setattr(os, "rename", failing_rename)
    assert inject(bundle, spec_dir, "vendor.com/class=zero") == 1
    assert (bundle / "config.json").read_bytes() == original
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "config.json.orig"]
    assert "No space left" in capsys.readouterr().err


def test_runc_sees_injected_node_and_mount(runc, tmp_path, monkeypatch):
    """inject --mode edits, then a real runc run: the node exists, opens (runc applied the
    cgroup allow rule from linux.resources.devices) and the file mount is there."""
    kvm = "/dev/kvm"
    if not os.path.exists(kvm):
        pytest.fail("the test host has no /dev/kvm (the brief lists it as a safe test device)")
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    host_file = tmp_path / "vendor.conf"
    host_file.write_text("vendor-config\n")
    write_spec(tmp_path / "cdi", "kvm.json", {
        "cdiVersion": "0.6.0", "kind": "vendor.com/vm",
        "devices": [{"name": "kvm", "containerEdits": {
            "deviceNodes": [{"path": kvm}],
            "mounts": [{"hostPath": str(host_file), "containerPath": "/etc/vendor/vendor.conf",
                        "options": ["ro", "bind"]}],
        }}],
    })
    script = ("stat -c '%F %t:%T %a' /dev/kvm && cat /etc/vendor/vendor.conf && "
              "(exec 3<>/dev/kvm && echo KVM-OPENED) && "
              "(echo x > /etc/vendor/vendor.conf 2>/dev/null && echo WRITABLE || echo READONLY)")
    bundle = make_bundle(tmp_path / "bundle", ["sh", "-c", script])

    before = run_container(bundle)
    assert "KVM-OPENED" not in before.stdout  # without the device the container cannot open it

    assert main(["inject", "--bundle", str(bundle), "--spec-dir", str(tmp_path / "cdi"),
                 "--device", "vendor.com/vm=kvm"]) == 0
    result = run_container(bundle)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The spec sets no fileMode: the host node's mode, as the live hook and the current CDI
    # reference library give (Podman 4.3's older copy gives 0666 here).
    assert lines[0] == f"character special file a:e8 {os.stat('/dev/kvm').st_mode & 0o777:o}"
    assert lines[1:] == ["vendor-config", "KVM-OPENED", "READONLY"]
    assert host_file.read_text() == "vendor-config\n"
