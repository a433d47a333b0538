"""Spec dirs -> device index: priority, conflicts, bad files, trust checks, resolve order."""

from __future__ import annotations

import json
import os

import pytest

from cdi_hook import settings
from cdi_hook.errors import ResolveError
from cdi_hook.plan import resolve
from cdi_hook.registry import DEFAULT_SPEC_DIRS, EditsPart, Registry
from cdi_hook.spec.model import ContainerEdits


def spec(kind="acme.com/gpu", devices=("gpu0",), spec_env=None, version="0.6.0", tag=""):
    doc = {"cdiVersion": version, "kind": kind,
           "devices": [{"name": d, "containerEdits": {"env": [f"DEV={d}{tag}"]}} for d in devices]}
    if spec_env:
        doc["containerEdits"] = {"env": spec_env}
    return doc


def write(directory, name, doc, mode=None):
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    if mode is not None:
        os.chmod(path, mode)
    return str(path)


@pytest.fixture(autouse=True)
def strict_by_default(monkeypatch):
    monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS", raising=False)
    monkeypatch.delenv("CDI_HOOK_MAX_SPEC_SIZE", raising=False)


def test_default_dirs():
    assert DEFAULT_SPEC_DIRS == ("/etc/cdi", "/var/run/cdi")
    assert Registry.load([]).spec_dirs == ()


def test_indexes_valid_specs_json_and_yaml(tmp_path):
    d = tmp_path / "cdi"
    write(d, "a.json", spec(devices=("gpu0", "gpu1")))
    write(d, "b.yaml", "cdiVersion: 0.3.0\nkind: other.com/nic\ndevices:\n- {name: eth, containerEdits: {env: [N=1]}}\n")
    write(d, "c.yml", spec(kind="third.com/x"))
    registry = Registry.load([str(d)])
    assert sorted(registry.devices) == ["acme.com/gpu=gpu0", "acme.com/gpu=gpu1", "other.com/nic=eth", "third.com/x=gpu0"]
    assert registry.errors == {}
    spec_obj, device = registry.devices["other.com/nic=eth"]
    assert spec_obj.path == str(d / "b.yaml") and device.name == "eth"


def test_missing_dirs_are_fine(tmp_path):
    registry = Registry.load([str(tmp_path / "nope"), str(tmp_path / "also-nope")])
    assert registry.devices == {} and registry.errors == {}


def test_a_file_where_a_dir_should_be_is_an_error(tmp_path):
    (tmp_path / "file").write_text("")
    registry = Registry.load([str(tmp_path / "file")])
    assert registry.errors == {str(tmp_path / "file"): [f"{tmp_path / 'file'}: spec dir is not a directory"]}


def test_other_names_and_subdirs_are_ignored(tmp_path):
    d = tmp_path / "cdi"
    write(d, "a.json.bak", spec(kind="bak.com/x"))
    write(d, "README", "not a spec")
    write(d, "notes.txt", "{}")
    write(d / "sub", "nested.json", spec(kind="nested.com/x"))
    (d / "dir.json").mkdir()
    write(d, "ok.json", spec())
    registry = Registry.load([str(d)])
    assert list(registry.devices) == ["acme.com/gpu=gpu0"]
    assert registry.errors == {}


def test_one_invalid_spec_never_hides_valid_ones(tmp_path):
    d = tmp_path / "cdi"
    bad = write(d, "a-bad.json", {**spec(kind="broken.com/x"), "cdiVersion": "9.9.9"})
    broken = write(d, "b-broken.yaml", "kind: [\n")
    write(d, "c-good.json", spec())
    registry = Registry.load([str(d)])
    assert list(registry.devices) == ["acme.com/gpu=gpu0"]
    assert set(registry.errors) == {bad, broken}
    assert registry.errors[bad] == [f'{bad}: cdiVersion: "9.9.9" is not a supported CDI version '
                                    "(0.3.0, 0.4.0, 0.5.0, 0.6.0, 0.7.0, 0.8.0, 1.0.0, 1.1.0, optionally with a leading v)"]
    assert registry.errors[broken][0].startswith(f"{broken}: invalid YAML")


def test_later_dirs_win(tmp_path):
    low, high = tmp_path / "etc", tmp_path / "run"
    write(low, "a.json", spec(devices=("gpu0", "gpu1"), tag="-etc"))
    write(high, "a.json", spec(devices=("gpu1",), tag="-run"))
    registry = Registry.load([str(low), str(high)])
    assert registry.devices["acme.com/gpu=gpu1"][1].container_edits.env == ("DEV=gpu1-run",)
    assert registry.devices["acme.com/gpu=gpu0"][1].container_edits.env == ("DEV=gpu0-etc",)
    assert registry.errors == {}
    # and the other order
    registry = Registry.load([str(high), str(low)])
    assert registry.devices["acme.com/gpu=gpu1"][1].container_edits.env == ("DEV=gpu1-etc",)


def test_same_priority_duplicates_conflict(tmp_path):
    d = tmp_path / "cdi"
    first = write(d, "a.json", spec(devices=("gpu0", "gpu1")))
    second = write(d, "b.json", spec(devices=("gpu1", "gpu2")))
    registry = Registry.load([str(d)])
    assert sorted(registry.devices) == ["acme.com/gpu=gpu0", "acme.com/gpu=gpu2"]
    assert registry.conflicts == {"acme.com/gpu=gpu1": (first, second)}
    assert len(registry.errors[first]) == 1 and second in registry.errors[first][0]
    assert len(registry.errors[second]) == 1 and first in registry.errors[second][0]
    assert "acme.com/gpu=gpu1" in registry.errors[first][0]
    with pytest.raises(ResolveError, match="defined twice at the same priority"):
        registry.select(["acme.com/gpu=gpu1"])


def test_higher_priority_definition_settles_a_lower_conflict(tmp_path):
    low, high = tmp_path / "etc", tmp_path / "run"
    write(low, "a.json", spec(tag="-a"))
    write(low, "b.json", spec(tag="-b"))
    write(high, "c.json", spec(tag="-run"))
    registry = Registry.load([str(low), str(high)])
    assert registry.devices["acme.com/gpu=gpu0"][1].container_edits.env == ("DEV=gpu0-run",)
    assert len(registry.errors) == 2  # still reported, so `validate` fails and someone cleans up


def test_invalid_spec_in_a_higher_dir_does_not_hide_the_lower_one(tmp_path):
    low, high = tmp_path / "etc", tmp_path / "run"
    write(low, "a.json", spec(tag="-etc"))
    write(high, "a.json", {**spec(tag="-run"), "bogus": 1})
    registry = Registry.load([str(low), str(high)])
    assert registry.devices["acme.com/gpu=gpu0"][1].container_edits.env == ("DEV=gpu0-etc",)


def test_resolve_builds_the_plan_in_request_order(tmp_path):
    d = tmp_path / "cdi"
    gpu = write(d, "gpu.json", spec(devices=("gpu0", "gpu1"), spec_env=["GPU_SPEC=1"]))
    nic = write(d, "nic.json", spec(kind="acme.com/nic", devices=("eth",), spec_env=["NIC_SPEC=1"]))
    bare = write(d, "bare.json", spec(kind="bare.com/x", devices=("x",)))
    plan = Registry.load([str(d)]).select(
        ["acme.com/gpu=gpu1", "acme.com/nic=eth", "bare.com/x=x", "acme.com/gpu=gpu0", "acme.com/gpu=gpu1"])
    assert plan.devices == ("acme.com/gpu=gpu1", "acme.com/nic=eth", "bare.com/x=x", "acme.com/gpu=gpu0")
    assert plan.parts == (
        EditsPart("acme.com/gpu (spec-level)", gpu, ContainerEdits(env=("GPU_SPEC=1",))),
        EditsPart("acme.com/gpu=gpu1", gpu, ContainerEdits(env=("DEV=gpu1",))),
        EditsPart("acme.com/nic (spec-level)", nic, ContainerEdits(env=("NIC_SPEC=1",))),
        EditsPart("acme.com/nic=eth", nic, ContainerEdits(env=("DEV=eth",))),
        EditsPart("bare.com/x=x", bare, ContainerEdits(env=("DEV=x",))),
        EditsPart("acme.com/gpu=gpu0", gpu, ContainerEdits(env=("DEV=gpu0",))),
    )
    assert plan.merged().env == ("GPU_SPEC=1", "DEV=gpu1", "NIC_SPEC=1", "DEV=eth", "DEV=x", "DEV=gpu0")


def test_resolve_nothing_is_an_empty_plan(tmp_path):
    plan = Registry.load([str(tmp_path)]).select([])
    assert plan.devices == () and plan.parts == ()


def test_unknown_names_fail_the_whole_request_listing_all(tmp_path):
    d1, d2 = tmp_path / "one", tmp_path / "two"
    write(d1, "a.json", spec())
    with pytest.raises(ResolveError) as error:
        Registry.load([str(d1), str(d2)]).select(["acme.com/gpu=gpu0", "acme.com/gpu=gpu9", "x.com/y=z", "junk"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith('unresolvable CDI devices: acme.com/gpu=gpu9, x.com/y=z, "junk"')
    assert f"spec dirs searched: {d1}, {d2}" in message
    assert "acme.com/gpu=gpu0," not in message
    assert '"junk" is not a qualified name' in message


def test_unknown_name_mentions_an_invalid_spec_of_its_kind(tmp_path):
    d = tmp_path / "cdi"
    bad = write(d, "a.json", {**spec(), "cdiVersion": "0.1.0"})
    with pytest.raises(ResolveError) as error:
        resolve(["acme.com/gpu=gpu0"], [str(d)])
    assert f"a spec for acme.com/gpu is invalid ({bad})" in str(error.value)
    assert "run `cdi-hook validate`" in str(error.value)


def test_plan_resolve_goes_through_the_registry(tmp_path):
    d = tmp_path / "cdi"
    write(d, "a.json", spec())
    assert resolve(["acme.com/gpu=gpu0"], [str(d)]).devices == ("acme.com/gpu=gpu0",)


def test_size_limit_applies_per_file(tmp_path):
    d = tmp_path / "cdi"
    big = write(d, "big.json", spec(kind="big.com/x", devices=[f"d{i}" for i in range(50)]))
    write(d, "small.json", spec())
    registry = Registry.load([str(d)], max_size=600)
    assert list(registry.devices) == ["acme.com/gpu=gpu0"]
    assert "limit" in registry.errors[big][0]


def test_fifo_in_spec_dir_does_not_hang(tmp_path):
    d = tmp_path / "cdi"
    write(d, "a.json", spec())
    os.mkfifo(d / "fifo.json")
    registry = Registry.load([str(d)])
    assert list(registry.devices) == ["acme.com/gpu=gpu0"]
    assert "not a regular file" in registry.errors[str(d / "fifo.json")][0]


# --- trust: as root, specs writable or owned by non-root users are refused --------------------

NOBODY = 65534


@pytest.mark.parametrize("change, problem", [
    (lambda p: os.chmod(p, 0o666), "writable by every user"),
    (lambda p: os.chmod(p, 0o602), "writable by every user"),
    (lambda p: os.chown(p, NOBODY, 0), f"owned by uid {NOBODY}"),
    (lambda p: (os.chown(p, 0, NOBODY), os.chmod(p, 0o664)), f"writable by group {NOBODY}"),
])
def test_root_refuses_untrusted_spec_files(root_only, tmp_path, change, problem):
    d = tmp_path / "cdi"
    d.mkdir(mode=0o755)
    good = write(d, "good.json", spec(kind="good.com/x"))
    bad = write(d, "bad.json", spec())
    change(bad)
    registry = Registry.load([str(d)])
    assert list(registry.devices) == ["good.com/x=gpu0"]
    assert good not in registry.errors
    (line,) = registry.errors[bad]
    assert line.startswith(f"{bad}: refused: the spec file is {problem}")
    assert "CDI_HOOK_INSECURE_SPECS=1" in line
    with pytest.raises(ResolveError, match="have errors"):
        registry.select(["acme.com/gpu=gpu0"])


def test_root_accepts_root_group_writable(root_only, tmp_path):
    d = tmp_path / "cdi"
    d.mkdir(mode=0o775)
    os.chown(d, 0, 0)
    write(d, "a.json", spec(), mode=0o664)
    os.chown(d / "a.json", 0, 0)
    assert list(Registry.load([str(d)]).devices) == ["acme.com/gpu=gpu0"]


@pytest.mark.parametrize("change, problem", [
    (lambda p: os.chmod(p, 0o777), "writable by every user"),
    (lambda p: os.chmod(p, 0o1777), "writable by every user"),
    (lambda p: os.chown(p, NOBODY, NOBODY), f"owned by uid {NOBODY}"),
])
def test_root_refuses_untrusted_spec_dirs(root_only, tmp_path, change, problem):
    d = tmp_path / "cdi"
    write(d, "a.json", spec())
    change(d)
    registry = Registry.load([str(d)])
    assert registry.devices == {}
    assert registry.errors[str(d)][0].startswith(f"{d}: refused: the spec dir is {problem}")


def test_insecure_override(root_only, tmp_path, monkeypatch):
    d = tmp_path / "cdi"
    write(d, "a.json", spec(), mode=0o666)
    assert Registry.load([str(d)]).devices == {}
    assert list(Registry.load([str(d)], insecure=True).devices) == ["acme.com/gpu=gpu0"]
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    settings.use(None)  # read again
    assert list(Registry.load([str(d)]).devices) == ["acme.com/gpu=gpu0"]
    assert Registry.load([str(d)], insecure=False).devices == {}


# Issue 22, class 6: trust does not stop at the file; every folder from / down counts.
def _group_writable(path, gid=NOBODY):
    os.chown(path, 0, gid)
    os.chmod(path, 0o775)


def test_root_refuses_a_spec_dir_whose_parent_is_group_writable(root_only, tmp_path):
    parent = tmp_path / "vendor"
    d = parent / "cdi"
    write(d, "a.json", spec())
    _group_writable(parent)
    registry = Registry.load([str(d)])
    assert registry.devices == {}
    (line,) = registry.errors[str(d)]
    assert line.startswith(f"{d}: refused: folder {parent} above the spec dir is writable by group {NOBODY}")
    assert "\n" not in line and "CDI_HOOK_INSECURE_SPECS=1" in line
    assert list(Registry.load([str(d)], insecure=True).devices) == ["acme.com/gpu=gpu0"]


def test_root_refuses_a_folder_further_up_owned_by_another_user(root_only, tmp_path):
    top = tmp_path / "top"
    d = top / "a" / "b" / "cdi"
    write(d, "a.json", spec())
    os.chown(top, NOBODY, 0)
    (line,) = Registry.load([str(d)]).errors[str(d)]
    assert f"refused: folder {top} above the spec dir is owned by uid {NOBODY}, not root" in line


def test_root_accepts_a_sticky_folder_above_a_root_owned_one(root_only, tmp_path):
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    d = sticky / "cdi"
    write(d, "a.json", spec())
    assert list(Registry.load([str(d)]).devices) == ["acme.com/gpu=gpu0"]
    # ... but not above an entry another user owns there (they may rename their own)
    theirs = sticky / "theirs"
    theirs.mkdir(mode=0o755)
    write(theirs / "cdi", "a.json", spec())
    os.chown(theirs, NOBODY, NOBODY)
    (line,) = Registry.load([str(theirs / "cdi")]).errors[str(theirs / "cdi")]
    assert f"folder {sticky} above the spec dir is writable by every user (sticky, but theirs in it" in line


def test_root_follows_a_spec_symlink_to_a_loose_folder(root_only, tmp_path):
    d = tmp_path / "cdi"
    loose = tmp_path / "loose"
    target = write(loose, "real.json", spec(kind="link.com/x"))
    _group_writable(loose)
    write(d, "plain.json", spec(kind="plain.com/x"))
    os.symlink(target, d / "link.json")
    registry = Registry.load([str(d)])
    assert list(registry.devices) == ["plain.com/x=gpu0"]
    (line,) = registry.errors[str(d / "link.json")]
    assert f"refused: folder {loose} above the spec file is writable by group {NOBODY}" in line


def test_root_follows_a_symlinked_spec_dir(root_only, tmp_path):
    loose = tmp_path / "loose"
    write(loose / "cdi", "a.json", spec())
    _group_writable(loose)
    os.symlink(loose / "cdi", tmp_path / "cdi")
    (line,) = Registry.load([str(tmp_path / "cdi")]).errors[str(tmp_path / "cdi")]
    assert f"folder {loose} above the spec dir is writable by group {NOBODY}" in line
