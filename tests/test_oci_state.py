"""Reading the OCI state and config.json: every malformed piece is one clear CdiError."""

from __future__ import annotations

import json

import pytest

from cdi_hook.errors import CdiError
from cdi_hook.oci import MAX_JSON_DEPTH, json_depth, parse_config, parse_state, read_config


def state(**fields) -> bytes:
    doc = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42, "bundle": "/b"}
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def test_state_fields():
    s = parse_state(state(annotations={"cdi.k8s.io/x": "a.com/b=c"}))
    assert (s.id, s.pid, s.bundle, s.status) == ("c1", 42, "/b", "creating")
    assert s.annotations == {"cdi.k8s.io/x": "a.com/b=c"}
    assert s.raw == state(annotations={"cdi.k8s.io/x": "a.com/b=c"})


def test_state_accepts_crun_root_and_unknown_keys():
    s = parse_state(state(root="/run/crun/c1/rootfs", extra={"anything": 1}))
    assert s.root == "/run/crun/c1/rootfs"


def test_state_without_pid_is_allowed_for_poststop():
    assert parse_state(state(pid=None, status="stopped")).pid is None
    assert parse_state(state(pid=0)).pid is None


@pytest.mark.parametrize("data, field", [
    (b"", "not valid JSON"),
    (b"{not json", "not valid JSON"),
    (b"[]", "not a JSON object"),
    (b"\xff\xfe", "not valid JSON"),
    (state(id=None), "id: missing"),
    (state(id=""), "id: must be"),
    (state(id=7), "id: must be"),
    (state(bundle=None), "bundle: missing"),
    (state(bundle="relative/b"), "bundle: must be an absolute path"),
    (state(pid="42"), "pid: must be"),
    (state(pid=-1), "pid: must be"),
    (state(pid=True), "pid: must be"),
    (state(annotations=["x"]), "annotations: must be"),
    (state(annotations={"k": 1}), "annotations: must be"),
    (state(status=3), "status: must be"),
])
def test_malformed_state_is_one_clear_line(data, field):
    with pytest.raises(CdiError) as info:
        parse_state(data)
    message = str(info.value)
    assert "OCI state on stdin" in message and field in message
    assert "\n" not in message


def test_huge_state_is_refused():
    with pytest.raises(CdiError, match="larger than"):
        parse_state(b" " * (2 << 20))


def config(**fields) -> dict:
    doc = {"root": {"path": "rootfs"}, "process": {"user": {"uid": 0, "gid": 0}}, "linux": {}}
    doc.update(fields)
    return doc


def test_config_rootfs_relative_and_absolute():
    assert parse_config(config(), "/bundles/b", "/bundles/b/config.json").rootfs == "/bundles/b/rootfs"
    assert parse_config(config(root={"path": "/srv/r/"}), "/b", "c").rootfs == "/srv/r"


def test_config_user_namespace_and_mappings():
    mapping = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    c = parse_config(config(linux={"namespaces": [{"type": "mount"}, {"type": "user"}],
                                   "uidMappings": mapping, "gidMappings": mapping},
                            process={"user": {"uid": 1000, "gid": 44}}), "/b", "c")
    assert c.user_namespace and c.uid_mappings[0].host_id == 100000 and c.gid_mappings[0].size == 65536
    assert (c.process_uid, c.process_gid) == (1000, 44)
    assert not parse_config(config(linux={"namespaces": [{"type": "mount"}]}), "/b", "c").user_namespace


@pytest.mark.parametrize("doc, field", [
    (config(root=None), "root: missing"),
    (config(root={"path": ""}), "root: path"),
    (config(root={"path": 5}), "root: path"),
    (config(linux=[]), "linux: must be an object"),
    (config(linux={"namespaces": {"type": "user"}}), "linux.namespaces"),
    (config(linux={"uidMappings": [{"containerID": -1, "hostID": 0, "size": 1}]}), "uidMappings[0]"),
    (config(linux={"gidMappings": "x"}), "gidMappings"),
    (config(process={"user": {"uid": "0"}}), "process.user: uid"),
    (config(annotations={"a": None}), "annotations"),
])
def test_malformed_config_is_one_clear_line(doc, field):
    with pytest.raises(CdiError) as info:
        parse_config(doc, "/b", "/b/config.json")
    assert field in str(info.value) and "/b/config.json" in str(info.value)


def test_read_config_errors_name_the_file(tmp_path):
    with pytest.raises(CdiError, match="config.json: cannot read"):
        read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CdiError, match="config.json: not valid JSON"):
        read_config(str(tmp_path))


@pytest.mark.parametrize("text, depth", [
    ('{}', 1),
    ('{"a": [1, {"b": []}]}', 4),
    ('{"a": "[[[[{{{{"}', 1),  # brackets in strings are data
    ('{"a": "\\\\", "b": [[]]}', 3),  # an escaped backslash ends before the quote
    ('{"a": "\\"[[[", "b": "]]]\\""}', 1),  # escaped quotes do not end the string
    ('["\\u005b\\u005b"]', 1),
])
def test_json_depth_counts_structure_only(text, depth):
    assert json_depth(text.encode()) == depth
    assert json_depth(text.encode()) == _depth_of(json.loads(text))


def _depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth_of, value), default=0)
    return 0


def test_nesting_is_bounded_before_parsing():
    ok = b'{"id": "c1", "bundle": "/b", "x": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert parse_state(ok).id == "c1"
    too_deep = ok.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1)
    with pytest.raises(CdiError, match=f"OCI state on stdin: nested deeper than {MAX_JSON_DEPTH} levels"):
        parse_state(too_deep)
    with pytest.raises(CdiError, match="nested deeper"):
        parse_state(b"[" * 1_000_000)  # no parse at all, however malformed


def test_bad_values_are_echoed_short_and_escaped():
    with pytest.raises(CdiError) as info:
        parse_state(state(bundle="rel/\x1b[31m" + "x" * 100_000))
    message = str(info.value)
    assert len(message) < 300 and "\x1b" not in message and "\\x1b" in message, message
