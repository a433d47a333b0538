"""Spec files -> model: JSON and YAML alike, strict fields and types, size and alias limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cdi_hook.errors import SpecError
from cdi_hook.spec.model import ContainerEdits, Device, DeviceNode, Hook, IntelRdt, Mount, NetDevice
from cdi_hook import settings
from cdi_hook.settings import DEFAULT_MAX_SPEC_SIZE
from cdi_hook.spec.parse import MAX_YAML_FLOW_DEPTH, load_spec, parse_spec_bytes, to_cdi_data

FULL = {
    "cdiVersion": "1.1.0",
    "kind": "vendor.com/gpu",
    "annotations": {"vendor.com/a": "1"},
    "containerEdits": {"env": ["SPEC=1"]},
    "devices": [{
        "name": "gpu0",
        "annotations": {"b": "2"},
        "containerEdits": {
            "env": ["A=1"],
            "deviceNodes": [{"path": "/dev/gpu0", "hostPath": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0,
                             "fileMode": 0o666, "permissions": "rw", "uid": 0, "gid": 44}],
            "mounts": [{"hostPath": "/usr/lib/x.so", "containerPath": "/lib/x.so", "options": ["ro", "bind"],
                        "type": "bind"}],
            "hooks": [{"hookName": "createContainer", "path": "/bin/true", "args": ["true"], "env": ["X=1"],
                       "timeout": 5}],
            "additionalGids": [44, 45],
            "intelRdt": {"closID": "clos1", "l3CacheSchema": "L3:0=f", "memBwSchema": "MB:0=50",
                         "schemata": ["L2:0=3"], "enableMonitoring": True},
            "netDevices": [{"hostInterfaceName": "eth1", "name": "net0"}],
        },
    }],
}

FULL_YAML = """\
cdiVersion: "1.1.0"
kind: vendor.com/gpu
annotations:
  vendor.com/a: "1"
containerEdits:
  env: [SPEC=1]
devices:
  - name: gpu0
    annotations: {b: "2"}
    containerEdits:
      env: ["A=1"]
      deviceNodes:
        - {path: /dev/gpu0, hostPath: /dev/nvidia0, type: c, major: 195, minor: 0,
           fileMode: 0666, permissions: rw, uid: 0, gid: 44}
      mounts:
        - hostPath: /usr/lib/x.so
          containerPath: /lib/x.so
          options: [ro, bind]
          type: bind
      hooks:
        - {hookName: createContainer, path: /bin/true, args: ["true"], env: [X=1], timeout: 5}
      additionalGids: [44, 45]
      intelRdt: {closID: clos1, l3CacheSchema: "L3:0=f", memBwSchema: "MB:0=50", schemata: ["L2:0=3"],
                 enableMonitoring: true}
      netDevices:
        - {hostInterfaceName: eth1, name: net0}
"""


def parse_json(doc, path="/etc/cdi/x.json"):
    return parse_spec_bytes(json.dumps(doc).encode(), path)


def error_of(data: bytes, path="/etc/cdi/x.json") -> str:
    with pytest.raises(SpecError) as error:
        parse_spec_bytes(data, path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(path + ": ")
    return message


def test_every_field_is_read():
    spec = parse_json(FULL)
    assert spec.cdi_version == "1.1.0" and spec.kind == "vendor.com/gpu" and spec.path == "/etc/cdi/x.json"
    assert spec.annotations == (("vendor.com/a", "1"),)
    assert spec.container_edits == ContainerEdits(env=("SPEC=1",))
    assert spec.devices == (Device(
        name="gpu0",
        annotations=(("b", "2"),),
        container_edits=ContainerEdits(
            env=("A=1",),
            device_nodes=(DeviceNode(path="/dev/gpu0", host_path="/dev/nvidia0", type="c", major=195, minor=0,
                                     file_mode=0o666, permissions="rw", uid=0, gid=44),),
            mounts=(Mount(host_path="/usr/lib/x.so", container_path="/lib/x.so", options=("ro", "bind"),
                          type="bind"),),
            hooks=(Hook(hook_name="createContainer", path="/bin/true", args=("true",), env=("X=1",), timeout=5),),
            additional_gids=(44, 45),
            intel_rdt=IntelRdt(clos_id="clos1", l3_cache_schema="L3:0=f", mem_bw_schema="MB:0=50",
                               schemata=("L2:0=3",), enable_monitoring=True),
            net_devices=(NetDevice(host_interface_name="eth1", name="net0"),),
        ),
    ),)


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_and_json_mean_the_same(suffix):
    from_yaml = parse_spec_bytes(FULL_YAML.encode(), "/etc/cdi/x" + suffix)
    assert from_yaml._replace(path="") == parse_json(FULL)._replace(path="")


def test_to_cdi_data_round_trips():
    assert to_cdi_data(parse_json(FULL)) == FULL


def test_nulls_are_absent_fields():
    spec = parse_json({"cdiVersion": "0.3.0", "kind": "a/b", "annotations": None, "containerEdits": None,
                       "devices": [{"name": "x", "containerEdits": {"env": None, "deviceNodes": [
                           {"path": "/dev/x", "major": None}]}}]})
    assert spec.devices[0].container_edits.device_nodes[0].major is None
    assert spec.container_edits == ContainerEdits()


@pytest.mark.parametrize("doc, where", [
    ({"cdiVersion": "0.3.0", "bogus": 1}, "/etc/cdi/x.json: bogus: unknown field"),
    ({"devices": [{"name": "x", "containerEdit": {}}]}, "devices[0].containerEdit: unknown field"),
    ({"devices": [{"containerEdits": {"deviceNodes": [{"path": "/dev/x", "mode": 1}]}}]},
     "devices[0].containerEdits.deviceNodes[0].mode: unknown field"),
    ({"containerEdits": {"intelRdt": {"closId": "x"}}}, "containerEdits.intelRdt.closId: unknown field"),
])
def test_unknown_fields_are_errors(doc, where):
    assert where in error_of(json.dumps(doc).encode())


def test_hostile_keys_stay_on_one_line():
    message = error_of(json.dumps({"devices": [{"name\nx": 1}]}).encode())
    assert message.endswith('devices[0]["name\\nx"]: unknown field')
    message = error_of(json.dumps({"annotations": {"k\n": 1}}).encode())
    assert 'annotations["k\\n"]: expected a string' in message


def test_unknown_fields_in_yaml_too():
    assert "devices[0].nmae: unknown field" in error_of(b"devices:\n- nmae: x\n", "/etc/cdi/x.yaml")


def test_duplicate_json_keys_are_errors_with_their_path():
    message = error_of(b'{"devices": [{"name": "a", "containerEdits": {"env": ["A=1"], "env": ["B=2"]}}]}')
    assert message.endswith('devices[0].containerEdits: duplicate key "env"')
    assert error_of(b'{"kind": "a/b", "kind": "c/d"}').endswith(': duplicate key "kind"')


def test_duplicate_yaml_keys_are_errors_with_their_path():
    doc = b"devices:\n- name: a\n  containerEdits:\n    env: [A=1]\n    env: [B=1]\n"
    assert error_of(doc, "/x.yaml").endswith('devices[0].containerEdits: duplicate key "env"')
    doc = b"annotations:\n  a: x\n  a: y\n"
    assert error_of(doc, "/x.yaml").endswith('annotations: duplicate key "a"')


def test_yaml_merge_keys_may_override():
    from cdi_hook.spec.parse import decode_document

    assert decode_document(b"a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n", "/x.yaml")["c"] == {"x": 1, "y": 3}


@pytest.mark.parametrize("field_path, doc", [
    ("devices[0].containerEdits.deviceNodes[0].major", {"path": "/dev/x", "major": "195"}),
    ("devices[0].containerEdits.deviceNodes[0].major", {"path": "/dev/x", "major": True}),
    ("devices[0].containerEdits.deviceNodes[0].major", {"path": "/dev/x", "major": -1}),
    ("devices[0].containerEdits.deviceNodes[0].minor", {"path": "/dev/x", "minor": 1.5}),
    ("devices[0].containerEdits.deviceNodes[0].minor", {"path": "/dev/x", "minor": 2**32}),
    ("devices[0].containerEdits.deviceNodes[0].fileMode", {"path": "/dev/x", "fileMode": 0o10000}),
    ("devices[0].containerEdits.deviceNodes[0].fileMode", {"path": "/dev/x", "fileMode": "0666"}),
    ("devices[0].containerEdits.deviceNodes[0].uid", {"path": "/dev/x", "uid": -5}),
    ("devices[0].containerEdits.deviceNodes[0].gid", {"path": "/dev/x", "gid": False}),
    ("devices[0].containerEdits.deviceNodes[0].path", {"path": 7}),
    ("devices[0].containerEdits.deviceNodes[0].permissions", {"path": "/dev/x", "permissions": ["r"]}),
])
def test_device_node_type_errors(field_path, doc):
    data = json.dumps({"devices": [{"name": "x", "containerEdits": {"deviceNodes": [doc]}}]}).encode()
    assert f": {field_path}: " in error_of(data)


@pytest.mark.parametrize("edits, field_path", [
    ({"env": "A=1"}, "env"),
    ({"env": [1]}, "env[0]"),
    ({"deviceNodes": {"path": "/dev/x"}}, "deviceNodes"),
    ({"deviceNodes": ["/dev/x"]}, "deviceNodes[0]"),
    ({"mounts": [{"hostPath": "/a", "containerPath": "/b", "options": "ro"}]}, "mounts[0].options"),
    ({"hooks": [{"hookName": "poststop", "path": "/x", "timeout": "5"}]}, "hooks[0].timeout"),
    ({"hooks": [{"hookName": "poststop", "path": "/x", "args": [1]}]}, "hooks[0].args[0]"),
    ({"additionalGids": [-1]}, "additionalGids[0]"),
    ({"additionalGids": ["44"]}, "additionalGids[0]"),
    ({"intelRdt": {"enableMonitoring": "yes"}}, "intelRdt.enableMonitoring"),
    ({"intelRdt": {"closID": 1}}, "intelRdt.closID"),
    ({"intelRdt": []}, "intelRdt"),
    ({"netDevices": [{"hostInterfaceName": "eth0", "name": None, "x": 1}]}, "netDevices[0].x"),
])
def test_edit_type_errors(edits, field_path):
    data = json.dumps({"devices": [{"name": "x", "containerEdits": edits}]}).encode()
    assert f": devices[0].containerEdits.{field_path}: " in error_of(data)


@pytest.mark.parametrize("doc, field_path", [
    ({"cdiVersion": 0.3}, "cdiVersion"),
    ({"kind": ["a/b"]}, "kind"),
    ({"devices": {"name": "x"}}, "devices"),
    ({"annotations": {"a": 1}}, "annotations.a"),
    ({"annotations": ["a"]}, "annotations"),
    ({"devices": [{"name": "x", "annotations": {"k": True}}]}, "devices[0].annotations.k"),
])
def test_spec_type_errors(doc, field_path):
    assert f": {field_path}: " in error_of(json.dumps(doc).encode())


def test_yaml_implicit_types_are_checked():
    # YAML 1.1 reads yes as true: a type error, with the path, not a silent "True" string.
    doc = b"cdiVersion: 0.3.0\nkind: a/b\ndevices:\n- name: yes\n"
    assert "devices[0].name: expected a string, got boolean true" in error_of(doc, "/x.yaml")


@pytest.mark.parametrize("data, message", [
    (b"", "file is empty"),
    (b"  \n\t\n", "file is empty"),
    (b"[]", "not a mapping"),
    (b'"text"', "not a mapping"),
    (b"{", "invalid JSON at line 1"),
    (b"\xff\xfe\x00", "UTF-8"),
    (b"null", "file is empty"),
    (b"[" * 100_000, "nested too deeply"),
])
def test_bad_json_documents(data, message):
    assert message in error_of(data)


@pytest.mark.parametrize("data, message", [
    (b"# nothing but a comment\n", "file is empty"),
    (b"---\n...\n", "file is empty"),
    (b"- a\n- b\n", "not a mapping"),
    (b"a: [\n", "invalid YAML"),
    (b"a: 1\n---\nb: 2\n", "single document"),
    (b"kind: !!python/object:os.system x\n", "invalid YAML"),
    (b"kind: !custom x\n", "invalid YAML"),
    (b"? [a]\n: x\n", "unhashable"),
    (b"a: &a [*a]\n", "recursive YAML alias"),
    (b"[" * 100_000, "invalid YAML"),
])
def test_bad_yaml_documents(data, message):
    assert message in error_of(data, "/etc/cdi/x.yaml")


def billion_laughs() -> bytes:
    lines = [b'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        name, prev = chr(ord("a") + level).encode(), chr(ord("a") + level - 1).encode()
        lines.append(name + b": &" + name + b" [" + b",".join([b"*" + prev] * 9) + b"]")
    return b"\n".join(lines) + b"\n"


def test_deep_yaml_flow_nesting_is_refused_before_libyaml():
    # Debian 12's libyaml crashes the process past ~30,000 levels instead of raising; the
    # refusal must come first, balanced brackets or not, with every YAML library.
    for depth in (MAX_YAML_FLOW_DEPTH + 1, 60_000):
        assert "nested too deeply" in error_of(b"a: " + b"[" * depth + b"]" * depth + b"\n", "/etc/cdi/x.yaml")
    assert "nested too deeply" in error_of(b"a: " + b"{b: " * 60_000, "/etc/cdi/x.yaml")
    # Many flow lists side by side are no nesting: a big spec with more brackets than the
    # limit still parses.
    many = "".join(f"      - {{path: /dev/x{i}, permissions: rw}}\n        # [{{]}}\n" for i in range(MAX_YAML_FLOW_DEPTH))
    spec = parse_spec_bytes(f"""cdiVersion: 0.6.0
kind: vendor.com/gpu
devices:
  - name: all
    containerEdits:
      deviceNodes:
{many}""".encode(), "/etc/cdi/x.yaml")
    assert len(spec.devices[0].container_edits.device_nodes) == MAX_YAML_FLOW_DEPTH


def test_billion_laughs_fails_fast():
    started = time.monotonic()
    message = error_of(billion_laughs(), "/etc/cdi/lol.yaml")
    assert "YAML aliases expand the document by more than" in message
    assert time.monotonic() - started < 1.0


def test_modest_aliases_are_fine():
    doc = b"""\
cdiVersion: 0.3.0
kind: a.com/b
devices:
- name: x
  containerEdits:
    mounts:
    - &lib {hostPath: /usr/lib/a.so, containerPath: /usr/lib/a.so, options: [ro, bind]}
- name: y
  containerEdits:
    mounts: [*lib]
"""
    spec = parse_spec_bytes(doc, "/x.yaml")
    assert spec.devices[0].container_edits.mounts == spec.devices[1].container_edits.mounts


def test_size_limit_parameter(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps({**FULL, "kind": "a/" + "b" * 200}))
    with pytest.raises(SpecError, match="over the 100-byte limit"):
        load_spec(str(path), max_size=100)
    assert load_spec(str(path), max_size=10_000).kind.startswith("a/")


def test_size_limit_environment(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    path.write_text(json.dumps(FULL))
    monkeypatch.setenv("CDI_HOOK_MAX_SPEC_SIZE", "64")
    with pytest.raises(SpecError, match="64-byte limit"):
        load_spec(str(path))
    monkeypatch.setenv("CDI_HOOK_MAX_SPEC_SIZE", "lots")
    settings.use(None)  # read again
    with pytest.raises(Exception, match="CDI_HOOK_MAX_SPEC_SIZE"):
        load_spec(str(path))


def test_size_is_checked_before_reading(tmp_path):
    # A sparse 1 TiB file: reading it would take forever; the limit must refuse it at once.
    path = tmp_path / "huge.json"
    with open(path, "wb") as out:
        out.truncate(1 << 40)
    started = time.monotonic()
    with pytest.raises(SpecError, match=f"over the {DEFAULT_MAX_SPEC_SIZE}-byte limit"):
        load_spec(str(path))
    assert time.monotonic() - started < 1.0


def test_fifo_and_dirs_are_not_spec_files(tmp_path):
    fifo = tmp_path / "x.json"
    os.mkfifo(fifo)
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(str(fifo))  # O_NONBLOCK: no hang waiting for a writer
    with pytest.raises(SpecError, match="cannot open"):
        load_spec(str(tmp_path / "missing.json"))


def test_json_specs_never_import_yaml(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(FULL))
    code = ("import sys; from cdi_hook.registry import Registry; "
            f"r = Registry.load([{str(tmp_path)!r}], insecure=True); assert r.devices, r.errors; "
            "print('yaml' in sys.modules)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_libyaml_loader_is_used_when_present():
    yaml = pytest.importorskip("yaml")
    from cdi_hook.spec.parse import _strict_yaml_loader
    if getattr(yaml, "CSafeLoader", None) is not None:
        assert issubclass(_strict_yaml_loader(), yaml.CSafeLoader)
