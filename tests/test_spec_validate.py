"""The CDI rules on values, each with a valid and an invalid case, and the version table."""

from __future__ import annotations

import copy
import json

import pytest

from cdi_hook.spec.parse import parse_spec_bytes
from cdi_hook.spec.validate import validate_spec
from cdi_hook.spec.version import VERSIONS, normalize

PATH = "/etc/cdi/acme.json"


def base(version="1.1.0", edits=None, **top):
    doc = {"cdiVersion": version, "kind": "acme.com/gpu",
           "devices": [{"name": "gpu0", "containerEdits": edits or {"env": ["A=1"]}}]}
    doc.update(top)
    return doc


def problems(doc) -> list[str]:
    spec = parse_spec_bytes(json.dumps(doc).encode(), PATH)
    return [str(e) for e in validate_spec(spec)]


def assert_valid(doc):
    assert problems(doc) == []


def assert_invalid(doc, field_path, fragment=""):
    found = problems(doc)
    matching = [p for p in found if p.startswith(f"{PATH}: {field_path}: ") and fragment in p]
    assert matching, f"no error at {field_path} containing {fragment!r}; got {found}"
    assert all("\n" not in p for p in found)


E = "devices[0].containerEdits"


# --- rule: value, valid case, invalid case -------------------------------------------------

@pytest.mark.parametrize("edits_ok, edits_bad, field_path, fragment", [
    # env needs NAME=VALUE with a non-empty NAME
    ({"env": ["A=1", "B=", "C=x=y"]}, {"env": ["A=1", "NOEQUALS"]}, f"{E}.env[1]", "NAME=VALUE"),
    ({"env": ["A="]}, {"env": ["=value"]}, f"{E}.env[0]", "non-empty NAME"),
    # device nodes: path required; type b,c,u,p or empty; permissions from r, w, m
    ({"deviceNodes": [{"path": "/dev/x"}]}, {"deviceNodes": [{"path": ""}]}, f"{E}.deviceNodes[0].path", "required"),
    ({"deviceNodes": [{"path": "/dev/x", "type": "c"}]}, {"deviceNodes": [{"hostPath": "/dev/x"}]},
     f"{E}.deviceNodes[0].path", "required"),
    ({"deviceNodes": [{"path": "/dev/x", "type": t} for t in ("b", "c", "u", "p", "")]},
     {"deviceNodes": [{"path": "/dev/x", "type": "x"}]}, f"{E}.deviceNodes[0].type", '"x" is not one of b, c, u, p'),
    ({"deviceNodes": [{"path": "/dev/x", "permissions": p} for p in ("r", "rw", "rwm", "m", "")]},
     {"deviceNodes": [{"path": "/dev/x"}, {"path": "/dev/y", "permissions": "rwx"}]},
     f"{E}.deviceNodes[1].permissions", '"rwx" is not a combination of r, w, m'),
    # mounts need both paths
    ({"mounts": [{"hostPath": "/a", "containerPath": "/b"}]}, {"mounts": [{"hostPath": "/a"}]},
     f"{E}.mounts[0].containerPath", "required"),
    ({"mounts": [{"hostPath": "/a", "containerPath": "/b"}]}, {"mounts": [{"containerPath": "/b", "hostPath": ""}]},
     f"{E}.mounts[0].hostPath", "required"),
    # hooks: known hookName, an absolute path, valid env, positive timeout
    ({"hooks": [{"hookName": n, "path": "/bin/true"} for n in
                ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")]},
     {"hooks": [{"hookName": "preStart", "path": "/bin/true"}]}, f"{E}.hooks[0].hookName", '"preStart" is not one of'),
    ({"hooks": [{"hookName": "poststop", "path": "/bin/true"}]}, {"hooks": [{"hookName": "poststop"}]},
     f"{E}.hooks[0].path", "required"),
    ({"hooks": [{"hookName": "poststop", "path": "/bin/true"}]}, {"hooks": [{"hookName": "poststop", "path": "true"}]},
     f"{E}.hooks[0].path", "not an absolute path"),
    ({"hooks": [{"hookName": "poststop", "path": "/x", "env": ["A=1"]}]},
     {"hooks": [{"hookName": "poststop", "path": "/x", "env": ["A"]}]}, f"{E}.hooks[0].env[0]", "NAME=VALUE"),
    ({"hooks": [{"hookName": "poststop", "path": "/x", "timeout": 1}]},
     {"hooks": [{"hookName": "poststop", "path": "/x", "timeout": 0}]}, f"{E}.hooks[0].timeout", "greater than zero"),
    # closID: one safe path component
    ({"intelRdt": {"closID": "clos-1.x"}}, {"intelRdt": {"closID": "../../etc"}}, f"{E}.intelRdt.closID", "resctrl"),
    ({"intelRdt": {"closID": ""}}, {"intelRdt": {"closID": ".."}}, f"{E}.intelRdt.closID", "resctrl"),
    ({"intelRdt": {"closID": "a" * 255}}, {"intelRdt": {"closID": "a" * 256}}, f"{E}.intelRdt.closID", "255 bytes"),
    ({"intelRdt": {"closID": "group"}}, {"intelRdt": {"closID": "a\nb"}}, f"{E}.intelRdt.closID", "newline"),
    ({"intelRdt": {"closID": "/"}}, {"intelRdt": {"closID": "/a"}}, f"{E}.intelRdt.closID", "resctrl"),  # "/" = root
    ({"intelRdt": {"closID": "group"}}, {"intelRdt": {"closID": "."}}, f"{E}.intelRdt.closID", "resctrl"),
    # net devices: both names, valid interface names, no repeats in one edits block
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "net0"}, {"hostInterfaceName": "eth2", "name": "net1"}]},
     {"netDevices": [{"hostInterfaceName": "eth1"}]}, f"{E}.netDevices[0].name", "required"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "net0"}]},
     {"netDevices": [{"name": "net0"}]}, f"{E}.netDevices[0].hostInterfaceName", "required"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "n"}, {"hostInterfaceName": "eth2", "name": "m"}]},
     {"netDevices": [{"hostInterfaceName": "eth1", "name": "n"}, {"hostInterfaceName": "eth2", "name": "n"}]},
     f"{E}.netDevices[1].name", "repeats"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "n"}]},
     {"netDevices": [{"hostInterfaceName": "eth1", "name": "n"}, {"hostInterfaceName": "eth1", "name": "m"}]},
     f"{E}.netDevices[1].hostInterfaceName", "repeats"),
    ({"netDevices": [{"hostInterfaceName": "e" * 15, "name": "n"}]},
     {"netDevices": [{"hostInterfaceName": "e" * 16, "name": "n"}]}, f"{E}.netDevices[0].hostInterfaceName", "longer"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "n"}]},
     {"netDevices": [{"hostInterfaceName": "eth1", "name": "../x"}]}, f"{E}.netDevices[0].name", "interface name"),
    # the kernel picks the number of a "%d" name inside the container; a host interface is named exactly
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "net%d"}, {"hostInterfaceName": "eth2", "name": "net%d"}]},
     {"netDevices": [{"hostInterfaceName": "eth%d", "name": "n"}]}, f"{E}.netDevices[0].hostInterfaceName",
     "cannot be a template"),
    ({"netDevices": [{"hostInterfaceName": "eth1", "name": "n%d"}]},
     {"netDevices": [{"hostInterfaceName": "eth1", "name": "n%s"}]}, f"{E}.netDevices[0].name", "only once"),
    # a mount may not cover the container's root
    ({"mounts": [{"hostPath": "/a", "containerPath": "/opt/x/.."}, {"hostPath": "/a", "containerPath": "/b"}]},
     {"mounts": [{"hostPath": "/a", "containerPath": "/b/.."}]}, f"{E}.mounts[0].containerPath", "root directory"),
    # "none": the node with no cgroup access (CDI reference main)
    ({"deviceNodes": [{"path": "/dev/x", "permissions": "none"}]},
     {"deviceNodes": [{"path": "/dev/x", "permissions": "nonE"}]}, f"{E}.deviceNodes[0].permissions", "r, w, m"),
])
def test_edit_rules(edits_ok, edits_bad, field_path, fragment):
    assert_valid(base(edits=edits_ok))
    assert_invalid(base(edits=edits_bad), field_path, fragment)


def test_same_edit_rules_apply_to_spec_level_edits():
    assert_valid(base(containerEdits={"deviceNodes": [{"path": "/dev/x", "permissions": "rw"}]}))
    assert_invalid(base(containerEdits={"deviceNodes": [{"path": "/dev/x", "permissions": "rwx"}]}),
                   "containerEdits.deviceNodes[0].permissions", "not a combination of r, w, m")


def test_net_device_names_may_repeat_across_edit_blocks():
    nic = {"netDevices": [{"hostInterfaceName": "eth1", "name": "net0"}]}
    doc = base(edits=nic)
    doc["devices"].append({"name": "gpu1", "containerEdits": copy.deepcopy(nic)})
    assert_valid(doc)


# --- names, devices, spec --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["acme.com/gpu", "a/b", "acme.com/gpu.x", "x-y_z.com/c1"])
def test_valid_kinds(kind):
    assert_valid(base(kind=kind))


@pytest.mark.parametrize("kind, fragment", [("acme.com", "exactly one '/'"), ("acme.com/gpu/x", "exactly one '/'"),
                                            ("1acme.com/gpu", "vendor"), ("acme.com/gpu-", "class"),
                                            ("", "required")])
def test_invalid_kinds(kind, fragment):
    assert_invalid(base(kind=kind), "kind", fragment)


def test_kind_is_required_when_missing():
    doc = base()
    del doc["kind"]
    assert_invalid(doc, "kind", "required")


@pytest.mark.parametrize("name", ["gpu0", "0", "a:b", "A.b_c-9"])
def test_valid_device_names(name):
    doc = base()
    doc["devices"][0]["name"] = name
    assert_valid(doc)


@pytest.mark.parametrize("name, fragment", [("", "required"), ("-gpu", "device name"), ("gpu/0", "device name"),
                                            ("gpu=0", "device name"), ("gpu.", "device name")])
def test_invalid_device_names(name, fragment):
    doc = base()
    doc["devices"][0]["name"] = name
    assert_invalid(doc, "devices[0].name", fragment)


def test_device_names_are_unique_in_a_spec():
    doc = base()
    doc["devices"].append({"name": "gpu1", "containerEdits": {"env": ["B=1"]}})
    assert_valid(doc)
    doc["devices"].append({"name": "gpu0", "containerEdits": {"env": ["B=1"]}})
    assert_invalid(doc, "devices[2].name", '"gpu0" repeats devices[0].name')


def test_a_spec_needs_a_device():
    assert_valid(base())
    assert_invalid(base(devices=[]), "devices", "at least one device")
    doc = base()
    del doc["devices"]
    assert_invalid(doc, "devices", "at least one device")


def test_every_device_needs_edits():
    assert_valid(base(edits={"mounts": [{"hostPath": "/a", "containerPath": "/b"}]}))
    for empty in ({}, {"env": []}, None):
        doc = base()
        doc["devices"][0]["containerEdits"] = empty
        assert_invalid(doc, "devices[0].containerEdits", "at least one edit")
    doc = base()
    del doc["devices"][0]["containerEdits"]
    assert_invalid(doc, "devices[0].containerEdits", "at least one edit")


def test_spec_level_edits_may_be_empty():
    assert_valid(base(containerEdits={}))


def test_annotation_keys():
    assert_valid(base(annotations={"acme.com/key": "v", "plain_key.1": "", "a": "b"}))
    assert_invalid(base(annotations={"Bad Key": "v"}), "annotations", "annotation key")
    assert_invalid(base(annotations={"UPPER.com/k": "v"}), "annotations", "prefix")
    doc = base()
    doc["devices"][0]["annotations"] = {"-k": "v"}
    assert_invalid(doc, "devices[0].annotations", "annotation key")


def test_annotations_total_size_is_bounded():
    assert_invalid(base(annotations={"k": "v" * (256 * 1024)}), "annotations", "over the")


def test_all_errors_are_reported_at_once():
    doc = base(kind="bad", edits={"env": ["X"], "deviceNodes": [{"path": "", "permissions": "z"}]})
    found = problems(doc)
    assert len(found) == 4, found


# --- versions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", list(VERSIONS) + ["v" + v for v in VERSIONS])
def test_known_versions(version):
    assert normalize(version) == version.lstrip("v")
    assert_valid(base(version=version))


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "1.2.0", "1.0", "1", "V1.0.0", "1.0.0 ", "vv1.0.0", "latest"])
def test_unknown_versions(version):
    assert normalize(version) is None
    assert_invalid(base(version=version), "cdiVersion", "not a supported CDI version")


def test_version_is_required():
    doc = base()
    del doc["cdiVersion"]
    assert_invalid(doc, "cdiVersion", "required")


NODE = {"path": "/dev/x"}

# (field path, needed version, a document using the feature at that version)
VERSION_TABLE = [
    (f"{E}.mounts[0].type", "0.4.0", lambda v: base(v, {"mounts": [{"hostPath": "/a", "containerPath": "/b",
                                                                     "type": "bind"}]})),
    (f"{E}.deviceNodes[0].hostPath", "0.5.0", lambda v: base(v, {"deviceNodes": [{**NODE, "hostPath": "/dev/y"}]})),
    ("devices[0].name", "0.5.0",
     lambda v: {**base(v), "devices": [{"name": "0gpu", "containerEdits": {"env": ["A=1"]}}]}),
    ("annotations", "0.6.0", lambda v: base(v, annotations={"a": "b"})),
    ("devices[0].annotations", "0.6.0",
     lambda v: {**base(v), "devices": [{"name": "g", "annotations": {"a": "b"}, "containerEdits": {"env": ["A=1"]}}]}),
    ("kind", "0.6.0", lambda v: base(v, kind="acme.com/gpu.x")),
    (f"{E}.intelRdt", "0.7.0", lambda v: base(v, {"intelRdt": {"closID": "c"}})),
    (f"{E}.additionalGids", "0.7.0", lambda v: base(v, {"additionalGids": [44]})),
    (f"{E}.netDevices", "1.1.0", lambda v: base(v, {"netDevices": [{"hostInterfaceName": "e", "name": "n"}]})),
    (f"{E}.intelRdt.schemata", "1.1.0", lambda v: base(v, {"intelRdt": {"schemata": ["L3:0=f"]}})),
    (f"{E}.intelRdt.enableMonitoring", "1.1.0", lambda v: base(v, {"intelRdt": {"enableMonitoring": True}})),
]


@pytest.mark.parametrize("field_path, needed, make", VERSION_TABLE, ids=[row[0] + "@" + row[1] for row in VERSION_TABLE])
def test_version_table(field_path, needed, make):
    for version in VERSIONS:
        doc = make(version)
        found = [p for p in problems(doc) if p.startswith(f"{PATH}: {field_path}: ")]
        if VERSIONS.index(version) >= VERSIONS.index(needed):
            assert found == [], (version, found)
        else:
            assert len(found) == 1, (version, problems(doc))
            assert f"needs cdiVersion {needed} or later" in found[0]
            assert f'declares "{version}"' in found[0]


def test_oldest_version_accepts_the_oldest_fields():
    doc = base("0.3.0", {"env": ["A=1"], "deviceNodes": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3,
                                                          "permissions": "rw"}],
                         "mounts": [{"hostPath": "/a", "containerPath": "/b", "options": ["ro"]}],
                         "hooks": [{"hookName": "createContainer", "path": "/bin/true", "timeout": 3}]},
               containerEdits={"env": ["S=1"]})
    assert_valid(doc)


def test_validation_and_the_appliers_share_one_rule_each():
    """The function validate reports with is the one the plan and the live injector apply."""
    from cdi_hook import plan
    from cdi_hook.live import netdev
    from cdi_hook.spec import rules, validate

    assert validate.interface_name_problem is netdev.interface_name_problem is rules.interface_name_problem
    assert validate.mount_destination_problem is plan.mount_destination_problem is rules.mount_destination_problem
    assert validate.permissions_problem is rules.permissions_problem
    assert plan.NO_PERMISSIONS is rules.NO_PERMISSIONS
