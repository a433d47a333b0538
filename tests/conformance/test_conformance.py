"""The CDI reference library's table-driven tests, as data (cases/*.yaml), run against cdi-hook's CLI.

One runner for every case: each case names an `action` (validate, min_version, apply,
show, precreate, annotation_key, qualified_name, cache) that says how its inputs reach
`cdi-hook` and how its expected outcome is observed. README.md in this folder describes
the actions, the data format, and which reference cases are not ported and why.

The CLI runs in-process (`cdi_hook.cli.main`) with stdin, stdout and stderr swapped for
buffers: the same argv, exit codes and output as `cdi-hook ...`, without a new interpreter
per case. Markers in the data:
  xfail: "<reason>"           the case runs as pytest.xfail(strict=True): a disagreement
                              owned by another part of cdi-hook, reported, not hidden.
  not_applicable: "<reason>"  the reference needs something cdi-hook's runtimes lack; the
                              case must be in DOCUMENTED_NOT_APPLICABLE (and README.md) and
                              runs against `instead`, cdi-hook's documented behaviour.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from cdi_hook.cli import main

HERE = Path(__file__).resolve().parent
CASE_DIR = HERE / "cases"
README = HERE / "README.md"

ACTIONS = ("validate", "min_version", "apply", "show", "precreate", "annotation_key", "qualified_name", "cache")

# Every case marked not_applicable in the data, by id; README.md lists the same, with why.
DOCUMENTED_NOT_APPLICABLE = frozenset({
    "container-edits::TestApplyContainerEdits/mount added to container with Linux user namespace and uid/gid mappings",
    "cache::TestNewCache/no spec dirs",
})

# The spec that wraps `edits` / `device` / `src` cases: the newest version, so every field
# is allowed and only the rule under test can fail.
WRAP_VERSION = "1.1.0"
WRAP_KIND = "vendor.com/device"
ANNOTATION_PREFIX = "cdi.k8s.io/"
MARKER_PREFIX = "io.github.cdi-hook."  # cdi-hook's own annotations (the applied-devices marker)
_QUALIFIED_SHAPE = re.compile(r"[^/=,]+/[^/=,]+=[^/=,]+")


# ---------------------------------------------------------------------------------------
# Loading the data


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


DOCS = {path.stem: _load(path) for path in sorted(CASE_DIR.glob("*.yaml"))}
VERSIONS_DOC = DOCS["version"]
SUPPORTED_VERSIONS = VERSIONS_DOC["spec_versions"][VERSIONS_DOC["spec_versions"].index(
    VERSIONS_DOC["earliest_supported"]):]
ALL_CASES = [(f"{stem}::{case['name']}", case) for stem, doc in DOCS.items() for case in doc["cases"]]


def _params(not_applicable: bool):
    params = []
    for case_id, case in ALL_CASES:
        if bool(case.get("not_applicable")) != not_applicable:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=case["xfail"])] if case.get("xfail") else []
        params.append(pytest.param(case, marks=marks, id=case_id))
    return params


# ---------------------------------------------------------------------------------------
# Running the CLI in-process


class Result:
    def __init__(self, rc: int, stdout: str, stderr: str):
        self.rc, self.stdout, self.stderr = rc, stdout, stderr

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"rc={self.rc}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def cli(*argv: str, stdin: bytes = b"") -> Result:
    """`cdi-hook argv...` in this process: exit code, stdout and stderr as text."""
    out_bytes = io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", newline="\n")
    err = io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"), out, err
    try:
        rc = main(list(argv))
    except SystemExit as exit_:  # argparse
        rc = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        out.flush()
        sys.stdin, sys.stdout, sys.stderr = saved
    return Result(rc, out_bytes.getvalue().decode("utf-8"), err.getvalue())


@pytest.fixture(autouse=True)
def cdi_env(monkeypatch, tmp_path_factory):
    # Spec files in pytest temp dirs are not in a root-only tree.
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    monkeypatch.delenv("CDI_SPEC_DIRS", raising=False)
    if not os.environ.get("CDI_HOOK_CACHE_DIR"):  # tests/conftest.py normally sets a private one
        cache = tmp_path_factory.mktemp("conformance-cache")
        os.chmod(cache, 0o700)
        monkeypatch.setenv("CDI_HOOK_CACHE_DIR", str(cache))


# ---------------------------------------------------------------------------------------
# Building inputs


def write_files(directory: Path, files: dict | None) -> None:
    """Spec files by name: text as is, a mapping as JSON, "remove" deletes the file."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        path = directory / name
        if content == "remove":
            path.unlink()
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content, indent=2), encoding="utf-8")


def wrap_edits(edits: dict | None) -> dict:
    """ContainerEdits.Validate: the edits as spec-level edits (which may be empty)."""
    doc = {"cdiVersion": WRAP_VERSION, "kind": WRAP_KIND,
           "devices": [{"name": "dev", "containerEdits": {"env": ["DEV=1"]}}]}
    if edits is not None:
        doc["containerEdits"] = edits
    return doc


def _fill_edits(edits: dict) -> None:
    for i, node in enumerate(edits.get("deviceNodes") or ()):
        node.setdefault("path", node.get("hostPath") or "/dev/null")
    for i, mount in enumerate(edits.get("mounts") or ()):
        mount.setdefault("hostPath", f"/filled/host{i}")
        mount.setdefault("containerPath", f"/filled/container{i}")
    for i, device in enumerate(edits.get("netDevices") or ()):
        device.setdefault("hostInterfaceName", f"host{i}")
        device.setdefault("name", f"ctr{i}")


def fill(fragment: dict, version: str) -> dict:
    """A Go test's partial cdi.Spec made a complete file (README "Filling fragments")."""
    doc = copy.deepcopy(fragment or {})
    doc["cdiVersion"] = version
    doc.setdefault("kind", WRAP_KIND)
    devices = doc.get("devices") or [{}]
    for i, device in enumerate(devices):
        if not device.get("name"):
            device["name"] = f"dev{i}"
        if not device.get("containerEdits"):
            device["containerEdits"] = {"env": ["FILLED=1"]}
        _fill_edits(device["containerEdits"])
    doc["devices"] = devices
    if doc.get("containerEdits"):
        _fill_edits(doc["containerEdits"])
    return doc


def spec_file_for(case: dict, tmp: Path) -> Path:
    """The file a validate case is about."""
    if "path" in case:
        return HERE / case["path"]
    if "spec_text" in case:
        text = case["spec_text"]
        name = case.get("file") or ("spec.json" if text.strip().startswith("{") else "spec.yaml")
        write_files(tmp, {name: text})
        return tmp / name
    if "edits" in case:
        doc = wrap_edits(case["edits"])
    elif "device" in case:
        doc = {"cdiVersion": WRAP_VERSION, "kind": WRAP_KIND, "devices": [case["device"]]}
    elif "fragment" in case:
        doc = fill(case["fragment"], case["version"])
    else:
        raise AssertionError(f"validate case without an input: {case['name']}")
    name = case.get("file") or "spec.json"
    write_files(tmp, {name: doc})
    return tmp / name


def normalize(value):
    """Go's JSON without the zero values its structs omit: drop None, "", [] and {} from
    mappings, recursively (list items are kept as they are, even empty ones)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = normalize(item)
            if item is None or item == "" or item == [] or item == {}:
                continue
            out[key] = item
        return out
    if isinstance(value, list):
        return [normalize(item) for item in value]
    return value


def specs_for_names(directory: Path, names) -> None:
    """One spec per kind defining each name, each device with its own env variable."""
    by_kind: dict[str, list[str]] = {}
    for name in names:
        kind, _, device = name.partition("=")
        if device not in by_kind.setdefault(kind, []):
            by_kind[kind].append(device)
    files = {}
    for kind, devices in by_kind.items():
        files[kind.replace("/", "_") + ".json"] = {
            "cdiVersion": WRAP_VERSION, "kind": kind,
            "devices": [{"name": d, "containerEdits": {"env": [env_of(f"{kind}={d}")]}} for d in devices],
        }
    write_files(directory, files)


def env_of(name: str) -> str:
    return "CDI_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "=1"


# ---------------------------------------------------------------------------------------
# Actions


def check_validate(case: dict, tmp: Path) -> None:
    path = spec_file_for(case, tmp)
    result = cli("validate", str(path))
    assert all(line.startswith(f"{path}: ") for line in result.error_lines), result
    if case["valid"]:
        assert result.rc == 0 and not result.error_lines, result
        return
    assert result.rc == 1 and result.error_lines, result
    if "error_field" in case:
        assert any(line.startswith(f"{path}: {case['error_field']}: ") for line in result.error_lines), result
    if "error_contains" in case:
        assert any(case["error_contains"] in line for line in result.error_lines), result


def _validates(doc: dict, tmp: Path, name: str) -> Result:
    write_files(tmp, {name: doc})
    return cli("validate", str(tmp / name))


def check_min_version(case: dict, tmp: Path) -> None:
    want = case["want"]
    at_want = _validates(fill(case["fragment"], want), tmp, "at-want.json")
    assert at_want.rc == 0, f"valid at {want} expected\n{at_want}"
    newest = _validates(fill(case["fragment"], SUPPORTED_VERSIONS[-1]), tmp, "at-newest.json")
    assert newest.rc == 0, f"valid at {SUPPORTED_VERSIONS[-1]} expected\n{newest}"
    index = SUPPORTED_VERSIONS.index(want)
    if index > 0:
        below = SUPPORTED_VERSIONS[index - 1]
        too_old = _validates(fill(case["fragment"], below), tmp, "below-want.json")
        assert too_old.rc == 1 and too_old.error_lines, f"invalid at {below} expected\n{too_old}"


def check_apply(case: dict, tmp: Path, expected: dict) -> None:
    etc, run = tmp / "etc", tmp / "run"
    if "edits" in case:
        write_files(etc, {"vendor.json": {"cdiVersion": WRAP_VERSION, "kind": WRAP_KIND,
                                          "devices": [{"name": "dev", "containerEdits": case["edits"]}]}})
        devices = [f"{WRAP_KIND}=dev"]
    else:
        write_files(etc, case["spec_dirs"].get("etc"))
        write_files(run, case["spec_dirs"].get("run"))
        devices = case["devices"]
    bundle = tmp / "bundle"
    bundle.mkdir()
    config_path = bundle / "config.json"
    config_path.write_text(json.dumps({**copy.deepcopy(case["oci"]), "root": {"path": "rootfs"}}, indent=2))
    before = config_path.read_bytes()
    argv = ["inject", "--bundle", str(bundle), "--mode", "edits", "--spec-dir", str(etc), "--spec-dir", str(run)]
    for device in devices:
        argv += ["--device", device]
    result = cli(*argv)
    if case.get("unresolved"):
        assert result.rc != 0, result
        assert "unresolvable" in result.stderr and all(name in result.stderr for name in case["unresolved"]), result
        assert config_path.read_bytes() == before, "config.json changed although injection failed"
        return
    assert result.rc == 0, result
    config = json.loads(config_path.read_text())
    assert config.pop("root") == {"path": "rootfs"}
    annotations = config.get("annotations") or {}
    for key in [k for k in annotations if k.startswith(MARKER_PREFIX)]:
        del annotations[key]
    assert normalize(config) == normalize(expected)


def check_show(case: dict, tmp: Path) -> None:
    spec = {"cdiVersion": WRAP_VERSION, "kind": WRAP_KIND,
            "devices": [{"name": f"d{i}", "containerEdits": edits} for i, edits in enumerate(case["src"])]}
    if case.get("dst") is not None:
        spec["containerEdits"] = case["dst"]
    write_files(tmp / "cdi", {"vendor.json": spec})
    names = [f"{WRAP_KIND}=d{i}" for i in range(len(case["src"]))]
    result = cli("show", *names, "--format", "json", "--spec-dir", str(tmp / "cdi"))
    assert result.rc == 0, result
    shown = json.loads(result.stdout)
    assert shown["devices"] == names
    assert normalize(shown["containerEdits"]) == normalize(case["result"])


def build_annotations(injections: list[dict]) -> dict:
    """What a device plugin puts on a container: one annotation per injection."""
    annotations = {}
    for injection in injections:
        key = ANNOTATION_PREFIX + injection["plugin"] + "_" + injection["device_id"].replace("/", "_")
        annotations[key] = ",".join(injection["devices"])
    return annotations


def precreate(annotations: dict, spec_dir: Path) -> Result:
    config = {"ociVersion": "1.0.2", "root": {"path": "rootfs"},
              "process": {"args": ["sh"], "env": ["PATH=/bin"]}, "annotations": annotations}
    return cli("precreate", "--spec-dir", str(spec_dir), stdin=json.dumps(config).encode())


def assert_applied(result: Result, names: list[str]) -> None:
    assert result.rc == 0, result
    config = json.loads(result.stdout)
    marker = [v for k, v in config["annotations"].items() if k.startswith(MARKER_PREFIX)]
    assert len(marker) == 1, config["annotations"]
    assert sorted(marker[0].split(",")) == sorted(names)
    assert sorted(config["process"]["env"]) == sorted(["PATH=/bin"] + [env_of(name) for name in names])


def assert_refused(result: Result) -> None:
    assert result.rc != 0 and result.stdout == "", result
    assert len(result.error_lines) == 1, result


def check_precreate(case: dict, tmp: Path) -> None:
    if "injections" in case:
        annotations = build_annotations(case["injections"])
        if "annotations" in case:
            assert annotations == case["annotations"], "the data's injections and annotations disagree"
    else:
        annotations = case["annotations"]
    values = [item for value in annotations.values() for item in value.split(",")]
    specs_for_names(tmp / "cdi", [name for name in values if _QUALIFIED_SHAPE.fullmatch(name)])
    result = precreate(annotations, tmp / "cdi")
    if case.get("valid", True):
        assert_applied(result, case["parsed"])
    else:
        assert_refused(result)


def check_annotation_key(case: dict, tmp: Path) -> None:
    derived = ANNOTATION_PREFIX + case["plugin"] + "_" + case["device_id"].replace("/", "_")
    assert case["key"] == derived, "the data's key is not <prefix><plugin>_<device id>"
    device = "vendor.com/class=device"
    specs_for_names(tmp / "cdi", [device])
    result = precreate({case["key"]: device}, tmp / "cdi")
    if case["valid"]:
        assert_applied(result, [device])
    else:
        assert_refused(result)
        assert case["key"] in result.stderr, result


def check_qualified_name(case: dict, tmp: Path) -> None:
    device = case["device"]
    kind = f"{case['vendor']}/{case['class']}"
    spec = {"cdiVersion": WRAP_VERSION, "kind": kind,
            "devices": [{"name": case["device_name"], "containerEdits": {"env": [env_of(device)]}}]}
    write_files(tmp / "cdi", {"spec.json": spec})
    validated = cli("validate", str(tmp / "cdi" / "spec.json"))
    shown = cli("show", device, "--spec-dir", str(tmp / "cdi"))
    in_annotation = precreate({ANNOTATION_PREFIX + "test": device}, tmp / "cdi")
    if case["qualified"]:
        assert validated.rc == 0, validated
        listed = cli("list", "--format", "json", "--spec-dir", str(tmp / "cdi"))
        assert listed.rc == 0, listed
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["kind"], r["device"]) for r in rows] == [(device, kind, case["device_name"])]
        assert shown.rc == 0 and json.loads(shown.stdout)["devices"] == [device], shown
        assert_applied(in_annotation, [device])
    else:
        assert validated.rc == 1, validated
        assert shown.rc != 0 and device in shown.stderr, shown
        assert_refused(in_annotation)


def check_cache(case: dict, tmp: Path, steps: list[dict]) -> None:
    etc, run = tmp / "etc", tmp / "run"
    if case.get("create_dirs", True):
        etc.mkdir()
        run.mkdir()
    dirs = ["--spec-dir", str(etc), "--spec-dir", str(run)]
    for number, step in enumerate(steps):
        where = f"step {number}"
        if step.get("etc"):
            write_files(etc, step["etc"])
        if step.get("run"):
            write_files(run, step["run"])
        listed = cli("list", "--format", "json", *dirs)
        assert listed.rc == 0, f"{where}: {listed}"
        rows = {row["name"]: row for row in json.loads(listed.stdout)}
        if "devices" in step:
            assert sorted(rows) == sorted(step["devices"]), where
        for name, source in (step.get("sources") or {}).items():
            assert rows[name]["spec"] == str(tmp / source), where
        for name, priority in (step.get("priority") or {}).items():
            assert os.path.dirname(rows[name]["spec"]) == str([etc, run][priority]), where
        if "vendors" in step:
            assert sorted({row["kind"].split("/")[0] for row in rows.values()}) == step["vendors"], where
        if "classes" in step:
            assert sorted({row["kind"].split("/")[1] for row in rows.values()}) == step["classes"], where
        if "errors" in step:
            validated = cli("validate", *dirs)
            bad = {os.path.relpath(line.split(": ", 1)[0], tmp) for line in validated.error_lines}
            assert bad == set(step["errors"]), f"{where}: {validated}"
            assert validated.rc == (1 if step["errors"] else 0), f"{where}: {validated}"


def run_case(case: dict, tmp: Path, *, instead: bool = False) -> None:
    action = case["action"]
    if action == "validate":
        check_validate(case, tmp)
    elif action == "min_version":
        check_min_version(case, tmp)
    elif action == "apply":
        check_apply(case, tmp, case["instead"] if instead else case["result"])
    elif action == "show":
        check_show(case, tmp)
    elif action == "precreate":
        check_precreate(case, tmp)
    elif action == "annotation_key":
        check_annotation_key(case, tmp)
    elif action == "qualified_name":
        check_qualified_name(case, tmp)
    elif action == "cache":
        check_cache(case, tmp, case["instead"] if instead else case["steps"])
    else:
        raise AssertionError(f"unknown action {action!r}")


# ---------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", _params(not_applicable=False))
def test_reference_case(case, tmp_path):
    run_case(case, tmp_path)


@pytest.mark.parametrize("case", _params(not_applicable=True))
def test_not_applicable_case_runs_cdi_hooks_documented_behaviour(case, tmp_path):
    assert case.get("instead") is not None, "a not_applicable case must say what cdi-hook does instead"
    run_case(case, tmp_path, instead=True)


def test_not_applicable_cases_are_exactly_the_documented_ones():
    marked = {case_id for case_id, case in ALL_CASES if case.get("not_applicable")}
    assert marked == DOCUMENTED_NOT_APPLICABLE
    readme = README.read_text(encoding="utf-8")
    for case_id in DOCUMENTED_NOT_APPLICABLE:
        assert case_id.split("::", 1)[1] in readme, f"README.md does not list {case_id}"


def test_case_files_are_well_formed():
    ids = [case_id for case_id, _ in ALL_CASES]
    assert len(ids) == len(set(ids)), "two cases share a name"
    for stem, doc in DOCS.items():
        assert doc.get("reference"), f"{stem}.yaml names no reference file"
    for case_id, case in ALL_CASES:
        assert case.get("action") in ACTIONS, case_id
        if case["action"] == "min_version":
            assert case["want"] in SUPPORTED_VERSIONS, case_id
        for marker in ("xfail", "not_applicable"):
            assert marker not in case or (isinstance(case[marker], str) and case[marker].strip()), case_id
    for path in sorted((HERE / "schema-testdata").rglob("*.json")):
        listed = [case for _, case in ALL_CASES if case.get("path") == str(path.relative_to(HERE))]
        assert listed, f"{path} is in no case"
