"""cdi_hook/settings.py: every CDI_* variable read once, checked, frozen; a bad value is one
line naming the variable from the real CLI, before anything else is read; doctor reads the
installed hook's settings without touching os.environ."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import oci_env
from cdi_hook import settings
from conftest import require_root
from test_doctor import Node, find

CLI = os.path.join(oci_env.REPO, ".venv", "bin", "cdi-hook")


def test_defaults():
    assert settings.from_environ({}) == settings.Settings(
        spec_dirs=None, log_file="/var/log/cdi-hook.log", log_level=20, cache_dir="/run/cdi-hook",
        max_spec_size=4 << 20, resctrl="/sys/fs/resctrl", policy="/etc/cdi-hook/policy.yaml", policy_explicit=False,
        state_dir="/run/cdi-hook/held", insecure_specs=False, post_stages=None, environ=())
    assert settings.from_environ({}).state_root == "/run/cdi-hook"


def test_values_as_given():
    environ = {"CDI_SPEC_DIRS": "/a::/b", "CDI_HOOK_LOG_LEVEL": " DEBUG ", "CDI_HOOK_CACHE_DIR": "relative",
               "CDI_HOOK_MAX_SPEC_SIZE": "64", "CDI_HOOK_POLICY": "/p.yaml", "CDI_HOOK_STATE_DIR": "/s/held/",
               "CDI_HOOK_INSECURE_SPECS": "1", "PATH": "/bin", "CDI_OTHER": "x"}
    got = settings.from_environ(environ)
    assert got.spec_dirs == ("/a", "/b") and got.log_level == 10 and got.max_spec_size == 64
    assert got.cache_dir is None  # relative: no cache rather than one in the hook's cwd
    assert got.policy == "/p.yaml" and got.policy_explicit and got.insecure_specs and got.state_root == "/s"
    assert dict(got.environ) == {k: v for k, v in environ.items() if k in settings.NAMES}
    assert settings.from_environ({"CDI_SPEC_DIRS": ""}).spec_dirs == ()  # set but empty: no dir at all
    assert settings.from_environ({"CDI_HOOK_POST_STAGES": ""}).post_stages == ()  # inject wrote no later entry
    assert settings.from_environ({"CDI_HOOK_POST_STAGES": "poststop"}).post_stages == ("poststop",)


def test_read_once_until_use(monkeypatch):
    monkeypatch.setenv("CDI_HOOK_RESCTRL", "/first")
    assert settings.current().resctrl == "/first"
    monkeypatch.setenv("CDI_HOOK_RESCTRL", "/second")
    assert settings.current().resctrl == "/first"
    settings.use(None)
    assert settings.current().resctrl == "/second"
    settings.use(settings.from_environ({}))
    assert settings.current().resctrl == "/sys/fs/resctrl"


@pytest.mark.parametrize("name, value, good", [
    ("CDI_HOOK_LOG_LEVEL", "loud", "debug"),
    ("CDI_HOOK_MAX_SPEC_SIZE", "lots", "100000"),
    ("CDI_HOOK_MAX_SPEC_SIZE", "0", "100000"),
    ("CDI_HOOK_STATE_DIR", "relative/held", "/run/cdi-hook-test/held"),
    ("CDI_HOOK_INSECURE_SPECS", "yes", "1"),
    ("CDI_HOOK_POST_STAGES", "poststop,prestart", "poststop"),
])
def test_a_bad_value_is_one_line_naming_the_variable(tmp_path, name, value, good):
    spec_dir = tmp_path / "cdi"
    oci_env.write_spec(spec_dir, "s.json", {"cdiVersion": "0.6.0", "kind": "vendor.com/c", "devices": [
        {"name": "d", "containerEdits": {"deviceNodes": [{"path": "/dev/null"}]}}]})
    log = tmp_path / "log"
    env = {"PATH": os.environ["PATH"], "CDI_SPEC_DIRS": str(spec_dir), "CDI_HOOK_INSECURE_SPECS": "1",
           "CDI_HOOK_LOG": str(log), name: value}
    result = subprocess.run([CLI, "list", "--format", "json"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"cdi-hook: {name}={value!r}"), result.stderr
    assert result.stdout == ""  # the spec dir was never listed
    assert not log.exists()
    # the same environment with a good value lists the device: the one bad value was the reason
    listed = subprocess.run([CLI, "list", "--format", "json"], env={**env, name: good}, capture_output=True, text=True)
    assert listed.returncode == 0 and "vendor.com/c=d" in listed.stdout, listed.stderr


def test_doctor_reads_the_installed_hooks_settings_without_changing_os_environ(tmp_path, monkeypatch, capsys):
    require_root()
    node = Node(tmp_path, monkeypatch)
    hook_cache = tmp_path / "hook-cache"
    monkeypatch.setenv("CDI_HOOK_CACHE_DIR", str(hook_cache))
    node.install("hook")  # the entries carry it
    assert f"CDI_HOOK_CACHE_DIR={hook_cache}" in json.loads(next(node.hooks.iterdir()).read_text())["hook"]["env"]
    monkeypatch.setenv("CDI_HOOK_CACHE_DIR", str(tmp_path / "doctor-cache"))  # this process's: not the hook's
    settings.use(None)
    before = dict(os.environ)
    written = []
    monkeypatch.setattr(os, "putenv", lambda key, value: written.append(key))
    monkeypatch.setattr(os, "unsetenv", lambda key: written.append(key))
    code, findings = node.doctor(capsys=capsys)
    assert dict(os.environ) == before and written == []
    assert settings.current().cache_dir == str(tmp_path / "doctor-cache")
    assert find(findings, "cache dir")[0]["detail"].startswith(str(hook_cache)), findings


def test_doctor_reports_a_bad_value_in_the_installed_entry(tmp_path, monkeypatch, capsys):
    require_root()
    node = Node(tmp_path, monkeypatch)
    node.install("hook")
    for path in node.hooks.iterdir():
        data = json.loads(path.read_text())
        data["hook"]["env"].append("CDI_HOOK_MAX_SPEC_SIZE=lots")
        path.write_text(json.dumps(data))
    code, findings = node.doctor(capsys=capsys)
    assert code == 1
    assert "CDI_HOOK_MAX_SPEC_SIZE='lots'" in find(findings, "hook settings", "fail")[0]["detail"]
    assert find(findings, "specs", "ok")  # the other checks ran, with that variable's default
