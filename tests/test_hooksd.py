"""Every hooks.d file (the repo's and each one install writes) is valid oci-hooks(5) 1.0.0.

CRI-O is not packaged for Debian 12, so its file is proven here against the rules of the
1.0.0 schema as Podman's and CRI-O's pkg/hooks load it: version, hook (an OCI hook entry:
absolute path, args, env K=V, timeout > 0), when (at least one of always, annotations,
commands, hasBindMounts; regexes compile), stages (OCI stages or the precreate extension).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from cdi_hook.commands.install import ALL_FILES, hook_definitions, render
from cdi_hook.hook_entry import entry_code, site_paths


@pytest.fixture(autouse=True)
def no_carried_settings(monkeypatch):
    """The session's private cache/log settings (conftest) would be carried into the files."""
    from cdi_hook.hook_entry import CARRIED_SETTINGS

    for name in CARRIED_SETTINGS:
        monkeypatch.delenv(name, raising=False)


REPO = Path(__file__).resolve().parent.parent
OCI_STAGES = {"prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop"}
EXTENSION_STAGES = {"precreate"}  # Podman's; CRI-O knows none
PLACEHOLDER_PYTHON = "/opt/cdi-hook/bin/python3"  # the repo files' interpreter; docs/operators/install.md says install writes the real one


def oci_hooks_errors(definition) -> list[str]:
    """The oci-hooks 1.0.0 rules a definition breaks (empty when valid)."""
    errors = []

    def check(ok, message):
        if not ok:
            errors.append(message)

    if not isinstance(definition, dict):
        return ["top level is not an object"]
    check(set(definition) <= {"version", "hook", "when", "stages"}, f"unknown keys {set(definition)}")
    check(definition.get("version") == "1.0.0", "version must be 1.0.0")
    hook = definition.get("hook")
    if not isinstance(hook, dict):
        errors.append("hook must be an object")
    else:
        check(set(hook) <= {"path", "args", "env", "timeout"}, f"unknown hook keys {set(hook)}")
        path = hook.get("path")
        check(isinstance(path, str) and path.startswith("/"), "hook.path must be an absolute path")
        args = hook.get("args", [])
        check(isinstance(args, list) and all(isinstance(a, str) for a in args), "hook.args must be strings")
        env = hook.get("env", [])
        check(isinstance(env, list) and all(isinstance(e, str) and e.find("=") > 0 for e in env),
              "hook.env must be K=V strings")
        if "timeout" in hook:
            timeout = hook["timeout"]
            check(isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0,
                  "hook.timeout must be a positive integer")
    when = definition.get("when")
    if not isinstance(when, dict):
        errors.append("when must be an object")
    else:
        check(set(when) <= {"always", "annotations", "commands", "hasBindMounts"}, f"unknown when keys {set(when)}")
        check(bool(set(when) & {"always", "annotations", "commands", "hasBindMounts"}), "when needs a condition")
        for key in ("always", "hasBindMounts"):
            check(key not in when or isinstance(when[key], bool), f"when.{key} must be a boolean")
        for key, value in (when.get("annotations") or {}).items():
            for regex in (key, value):
                check(isinstance(regex, str), "annotation regexes must be strings")
                try:
                    re.compile(regex)
                except (re.error, TypeError):
                    errors.append(f"annotation regex {regex!r} does not compile")
        for command in when.get("commands", []):
            try:
                re.compile(command)
            except (re.error, TypeError):
                errors.append(f"command regex {command!r} does not compile")
    stages = definition.get("stages")
    check(isinstance(stages, list) and stages, "stages must be a non-empty array")
    for stage in stages or []:
        check(stage in OCI_STAGES | EXTENSION_STAGES, f"unknown stage {stage!r}")
    return errors


def test_validator_rejects_broken_definitions():
    good = hook_definitions("hook", PLACEHOLDER_PYTHON, None)["cdi-hook-createRuntime.json"]
    assert oci_hooks_errors(good) == []
    for breakage in (
        lambda d: d.update(version="0.1.0"),
        lambda d: d["hook"].update(path="python3"),
        lambda d: d["hook"].update(env=["NOVALUE"]),
        lambda d: d["hook"].update(timeout=0),
        lambda d: d.update(when={}),
        lambda d: d["when"].update(annotations={"(": ".*"}),
        lambda d: d.update(stages=["prestrat"]),
        lambda d: d.pop("stages"),
    ):
        broken = json.loads(json.dumps(good))
        breakage(broken)
        assert oci_hooks_errors(broken), broken


REPO_FILES = sorted((REPO / "hooks.d").glob("*.json"))


def test_repo_ships_every_file_install_writes():
    assert sorted(p.name for p in REPO_FILES) == sorted(ALL_FILES)


@pytest.mark.parametrize("path", REPO_FILES, ids=lambda p: p.name)
def test_repo_file_is_valid_and_matches_install(path):
    definition = json.loads(path.read_text())
    assert oci_hooks_errors(definition) == []
    mode = "precreate" if path.name.endswith("precreate.json") else "hook"
    # The templates are exactly what install writes, with the placeholder interpreter.
    assert path.read_bytes() == render(hook_definitions(mode, PLACEHOLDER_PYTHON, None)[path.name])


@pytest.mark.parametrize("mode", ["precreate", "hook"])
@pytest.mark.parametrize("spec_dirs", [None, ["/etc/cdi", "/tmp/x y"]])
def test_every_installed_definition_is_valid(mode, spec_dirs):
    python = os.path.abspath(sys.executable)  # an interpreter that has cdi-hook: install asks it for its paths
    for name, definition in hook_definitions(mode, python, spec_dirs).items():
        assert oci_hooks_errors(definition) == [], name
        assert definition["when"] == {"annotations": {r"^cdi\.k8s\.io/": ".*"}}
        assert re.search(list(definition["when"]["annotations"])[0], "cdi.k8s.io/gpu")
        assert not re.search(list(definition["when"]["annotations"])[0], "cdixk8s.io/gpu")
        hook = definition["hook"]
        assert hook["args"][:5] == [hook["path"], "-I", "-S", "-c", entry_code(site_paths(python))]
        env = dict(e.split("=", 1) for e in hook["env"])
        assert env["PATH"]
        assert env.get("CDI_SPEC_DIRS") == (":".join(spec_dirs) if spec_dirs else None)


def test_hook_mode_stages_each_get_their_own_argv():
    definitions = hook_definitions("hook", os.path.abspath(sys.executable), None)
    stages = {d["stages"][0]: d["hook"]["args"] for d in definitions.values()}
    assert set(stages) == {"createRuntime", "poststart", "poststop"}
    for stage, args in stages.items():
        assert args[-3:] == ["hook", "--stage", stage]
