"""Spec files -> model objects: size limit, JSON or YAML, strict field and type checks.

Only the shape is checked here (known fields, no duplicate keys, right types, integers in
range); the CDI rules on values live in validate.py. A required field that is missing is
left at its zero value for validate.py to report, as the reference library does, so both
"absent" and "empty" get the same message.

YAML is imported only when a YAML file is parsed: the hook's hot path stays cheap for
JSON specs. YAML documents are loaded with a safe loader (libyaml's when present) that
refuses duplicate keys, recursive aliases and alias expansion past a bound, so a
"billion laughs" file fails in milliseconds.
"""

from __future__ import annotations

import json
import os
import re
import stat

from cdi_hook import settings
from cdi_hook.errors import SpecError
from cdi_hook.settings import MAX_SPEC_SIZE_ENV
from cdi_hook.spec.model import ContainerEdits, Device, DeviceNode, Hook, IntelRdt, Mount, NetDevice, Spec
from cdi_hook.spec.names import quote

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from typing import Any

    import yaml

    _Convert = Callable[[Any, str], Any]  # (value from the document, field path) -> model value

JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")
SPEC_SUFFIXES = JSON_SUFFIXES + YAML_SUFFIXES

# Nodes that YAML aliases may add beyond the document's own nodes. Real specs use a few
# anchors at most; a billion-laughs document asks for ~10^9.
MAX_ALIAS_EXPANSION = 100_000
# Flow collections ([ and {) nested deeper than this are refused before libyaml sees them:
# Debian 12's libyaml (0.2.5, python3-yaml 6.0) has no nesting limit and crashes the process
# (SIGSEGV) somewhere past 30,000 levels; PyPI's wheels stop at libyaml's own limit, and the
# pure-Python loader at the recursion limit, both near 1,000.
MAX_YAML_FLOW_DEPTH = 1000
_YAML_FLOW_BRACKETS = re.compile(rb"[\[\]{}]")

U32_MAX = 0xFFFFFFFF


def is_spec_file_name(name: str) -> bool:
    return name.endswith(SPEC_SUFFIXES)


def max_spec_size(override: int | None = None) -> int:
    """The size limit: the parameter, else the settings' ($CDI_HOOK_MAX_SPEC_SIZE, else 4 MiB)."""
    return override if override is not None else settings.current().max_spec_size


# ---------------------------------------------------------------------------------------
# Reading


def read_spec_bytes(path: str, max_size: int | None = None) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its fstat, refusing non-regular and oversized files before reading.

    O_NONBLOCK keeps a FIFO planted in a spec dir from hanging the hook; the size is checked
    on fstat first and again while reading, in case the file grows.
    """
    limit = max_spec_size(max_size)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as error:
        raise SpecError(path, "", f"cannot open: {error.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(path, "", "not a regular file")
        if st.st_size > limit:
            raise SpecError(path, "", f"file is {st.st_size} bytes, over the {limit}-byte limit ({MAX_SPEC_SIZE_ENV})")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, min(limit + 1 - total, 1 << 20) or 1)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise SpecError(path, "", f"file is over the {limit}-byte limit ({MAX_SPEC_SIZE_ENV})")
    except OSError as error:
        raise SpecError(path, "", f"cannot read: {error.strerror}") from None
    finally:
        os.close(fd)
    return b"".join(chunks), st


class _DuplicateKeys(dict):
    """A mapping that had a key twice; the builder reports it with its field path."""

    def __init__(self, pairs: Sequence[tuple[Any, Any]] | dict[Any, Any], duplicate: Any) -> None:
        super().__init__(pairs)
        self.duplicate = duplicate


def _json_object(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return _DuplicateKeys(obj, key)
        seen.add(key)
    raise AssertionError("unreachable")


def decode_document(data: bytes, path: str) -> Any:
    """The document as plain Python data (dicts, lists, scalars); SpecError on bad syntax."""
    if not data.strip():
        raise SpecError(path, "", "file is empty")
    if path.endswith(YAML_SUFFIXES):
        return _decode_yaml(data, path)
    try:
        return json.loads(data, object_pairs_hook=_json_object)
    except json.JSONDecodeError as error:
        raise SpecError(path, "", f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError:
        raise SpecError(path, "", "not valid UTF-8") from None
    except RecursionError:
        raise SpecError(path, "", "nested too deeply") from None
    except ValueError as error:  # e.g. an integer past Python's 4300-digit conversion limit
        raise SpecError(path, "", f"invalid JSON: {' '.join(str(error).split())}") from None


_yaml_loader = None


def _strict_yaml_loader() -> type[yaml.SafeLoader]:
    """A safe loader class (libyaml's CSafeLoader when present) that marks duplicate keys."""
    global _yaml_loader
    if _yaml_loader is not None:
        return _yaml_loader
    import yaml

    base = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

    class StrictSafeLoader(base):  # type: ignore[misc,valid-type]  # a base chosen at run time
        def construct_strict_map(self, node: yaml.MappingNode) -> Iterator[dict[Any, Any]]:
            duplicate = self._duplicate_key(node)
            data = {} if duplicate is None else _DuplicateKeys((), duplicate)
            yield data
            data.update(self.construct_mapping(node))

        def _duplicate_key(self, node: yaml.MappingNode) -> Any:
            seen = set()
            for key_node, _ in node.value:
                # "<<" merge keys may legitimately override; only literal keys count.
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        return key
                    seen.add(key)
                except TypeError:
                    continue
            return None

    StrictSafeLoader.add_constructor("tag:yaml.org,2002:map", StrictSafeLoader.construct_strict_map)
    _yaml_loader = StrictSafeLoader
    return StrictSafeLoader


def _alias_expansion(root: yaml.Node) -> int:
    """How many nodes aliases add when the document is expanded; ValueError on a recursive alias.

    Memoized per node, so it costs one pass over the distinct nodes however far the aliases
    would expand (the totals are plain integers, even at 10^9).
    """
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        known = sizes.get(id(node))
        if known is not None:
            if known < 0:
                raise ValueError("recursive alias")
            return known
        sizes[id(node)] = -1
        total = 1
        value = node.value
        if isinstance(value, list):
            for item in value:
                if isinstance(item, tuple):
                    total += size(item[0]) + size(item[1])
                else:
                    total += size(item)
        sizes[id(node)] = total
        return total

    expanded = size(root)
    return expanded - len(sizes)


_YAML_STR = "tag:yaml.org,2002:str"
_YAML_SEQ = "tag:yaml.org,2002:seq"
_YAML_MAP = "tag:yaml.org,2002:map"
_YAML_MERGE = "tag:yaml.org,2002:merge"


def _yaml_to_python(loader: yaml.SafeLoader, root: yaml.Node) -> Any:
    """Plain data from the composed nodes.

    Strings, lists and mappings (nearly all of a spec) are converted here directly, which is
    several times faster than PyYAML's generic constructor; every other node (integers,
    booleans, null, "<<" merges, explicit tags) goes through the safe constructor, so the
    semantics stay PyYAML's.
    """
    import yaml

    scalar, sequence, mapping = yaml.ScalarNode, yaml.SequenceNode, yaml.MappingNode

    def convert(node: yaml.Node) -> Any:
        tag = node.tag
        kind = type(node)
        if tag == _YAML_STR and kind is scalar:
            return node.value
        if tag == _YAML_SEQ and kind is sequence:
            return [convert(child) for child in node.value]
        if tag == _YAML_MAP and kind is mapping and not any(k.tag == _YAML_MERGE for k, _ in node.value):
            result = {}
            duplicate = None
            for key_node, value_node in node.value:
                key = convert(key_node)
                try:
                    if key in result and duplicate is None:
                        duplicate = key
                    result[key] = convert(value_node)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "found an unhashable mapping key", key_node.start_mark) from None
            return result if duplicate is None else _DuplicateKeys(result, duplicate)
        return loader.construct_object(node, deep=True)

    return convert(root)


def _flow_depth_exceeds(data: bytes, limit: int) -> bool:
    """Whether [ and { nest deeper than limit, counted over the raw bytes (quoted and
    commented brackets too: a spec that is not a crafted one has nowhere near that many)."""
    if data.count(b"[") + data.count(b"{") <= limit:  # the common path: two scans in C
        return False
    depth = 0
    for match in _YAML_FLOW_BRACKETS.finditer(data):
        depth = depth + 1 if match.group() in (b"[", b"{") else max(depth - 1, 0)
        if depth > limit:
            return True
    return False


def _decode_yaml(data: bytes, path: str) -> Any:
    import yaml

    if _flow_depth_exceeds(data, MAX_YAML_FLOW_DEPTH):
        raise SpecError(path, "", f"invalid YAML: nested too deeply (more than {MAX_YAML_FLOW_DEPTH} levels)")
    loader = _strict_yaml_loader()(data)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(path, "", "file is empty")
        if b"*" in data:  # no '*', no alias: skip the walk on the common path
            try:
                extra = _alias_expansion(node)
            except ValueError:
                raise SpecError(path, "", "recursive YAML alias") from None
            if extra > MAX_ALIAS_EXPANSION:
                raise SpecError(path, "",
                                f"YAML aliases expand the document by more than {MAX_ALIAS_EXPANSION} nodes")
        return _yaml_to_python(loader, node)
    except yaml.YAMLError as error:
        message = " ".join(str(error).split()).replace(' in "<byte string>",', " at")
        raise SpecError(path, "", "invalid YAML: " + message) from None
    except UnicodeDecodeError:
        raise SpecError(path, "", "not valid UTF-8") from None
    except RecursionError:
        raise SpecError(path, "", "nested too deeply") from None
    except ValueError as error:  # a scalar its constructor refuses: a 5000-digit integer, 2001-02-30
        raise SpecError(path, "", f"invalid YAML value: {' '.join(str(error).split())}") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------
# Building the model: one table per object, camelCase JSON name -> (attribute, converter)


class _FieldError(Exception):
    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./-]{1,80}")


def _child(path: str, key: str) -> str:
    """The field path of a key the file chose (unknown field, annotation key), kept on one line."""
    name = key if _PLAIN_KEY.fullmatch(key) else f"[{quote(key)}]"
    if not path:
        return name
    return path + name if name.startswith("[") else f"{path}.{name}"


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean " + ("true" if value else "false")
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return "string " + quote(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _string(value: Any, path: str) -> str:
    if type(value) is not str:
        raise _FieldError(path, f"expected a string, got {_describe(value)}")
    return value


def _boolean(value: Any, path: str) -> bool:
    if type(value) is not bool:
        raise _FieldError(path, f"expected true or false, got {_describe(value)}")
    return value


def _integer(low: int, high: int, what: str = "an integer") -> Callable[[Any, str], int]:
    def convert(value: Any, path: str) -> int:
        if type(value) is not int:  # bool is an int subclass: refused here on purpose
            raise _FieldError(path, f"expected {what}, got {_describe(value)}")
        if value < low:
            raise _FieldError(path, f"{value} is negative" if low == 0 else f"{value} is below {low}")
        if value > high:
            raise _FieldError(path, f"{value} is over the maximum {high}")
        return value

    return convert


def _list_of(convert_item: _Convert) -> Callable[[Any, str], tuple[Any, ...]]:
    def convert(value: Any, path: str) -> tuple[Any, ...]:
        if type(value) is not list:
            raise _FieldError(path, f"expected a list, got {_describe(value)}")
        return tuple(convert_item(item, f"{path}[{i}]") for i, item in enumerate(value))

    return convert


def _mapping(value: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _FieldError(path, f"expected a mapping, got {_describe(value)}")
    if type(value) is not dict:
        raise _FieldError(path, f"duplicate key {quote(value.duplicate)}")  # type: ignore[attr-defined]  # _DuplicateKeys
    return value


def _string_map(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """annotations: str -> str, kept in file order as pairs (the model is frozen)."""
    pairs = []
    for key, item in _mapping(value, path).items():
        if type(key) is not str:
            raise _FieldError(path, f"key {_describe(key)} is not a string")
        pairs.append((key, _string(item, _child(path, key))))
    return tuple(pairs)


def _object(cls: Callable[..., Any], fields: Mapping[str, tuple[str, _Convert]]) -> _Convert:
    def convert(value: Any, path: str) -> Any:
        kwargs = {}
        for key, item in _mapping(value, path).items():
            field = fields.get(key) if type(key) is str else None
            if field is None:
                if type(key) is str:
                    raise _FieldError(_child(path, key), "unknown field")
                raise _FieldError(path, f"unknown field {_describe(key)}")
            where = f"{path}.{key}" if path else key  # a known field name: safe to print as is
            if item is None:  # JSON null / empty YAML value: absent, as in the reference library
                continue
            attr, convert_field = field
            kwargs[attr] = convert_field(item, where)
        return cls(**kwargs)

    convert.fields = fields  # type: ignore[attr-defined]  # for introspection
    convert.cls = cls  # type: ignore[attr-defined]
    return convert


_u32 = _integer(0, U32_MAX, "a non-negative integer")
_strings = _list_of(_string)

DEVICE_NODE_FIELDS = {
    "path": ("path", _string),
    "hostPath": ("host_path", _string),
    "type": ("type", _string),
    "major": ("major", _u32),
    "minor": ("minor", _u32),
    "fileMode": ("file_mode", _integer(0, 0o7777, "a file mode (integer)")),
    "permissions": ("permissions", _string),
    "uid": ("uid", _u32),
    "gid": ("gid", _u32),
}
MOUNT_FIELDS = {
    "hostPath": ("host_path", _string),
    "containerPath": ("container_path", _string),
    "options": ("options", _strings),
    "type": ("type", _string),
}
HOOK_FIELDS = {
    "hookName": ("hook_name", _string),
    "path": ("path", _string),
    "args": ("args", _strings),
    "env": ("env", _strings),
    "timeout": ("timeout", _integer(-(2**31), 2**31 - 1)),
}
INTEL_RDT_FIELDS = {
    "closID": ("clos_id", _string),
    "l3CacheSchema": ("l3_cache_schema", _string),
    "memBwSchema": ("mem_bw_schema", _string),
    "schemata": ("schemata", _strings),
    "enableMonitoring": ("enable_monitoring", _boolean),
}
NET_DEVICE_FIELDS = {
    "hostInterfaceName": ("host_interface_name", _string),
    "name": ("name", _string),
}


def _with_defaults(cls: Callable[..., Any], **defaults: Any) -> Callable[..., Any]:
    """cls(...) with the zero values of required fields filled in, for validate.py to judge."""

    def make(**kwargs: Any) -> Any:
        return cls(**{**defaults, **kwargs})

    return make


CONTAINER_EDITS_FIELDS = {
    "env": ("env", _strings),
    "deviceNodes": ("device_nodes", _list_of(_object(_with_defaults(DeviceNode, path=""), DEVICE_NODE_FIELDS))),
    "mounts": ("mounts", _list_of(_object(_with_defaults(Mount, host_path="", container_path=""), MOUNT_FIELDS))),
    "hooks": ("hooks", _list_of(_object(_with_defaults(Hook, hook_name="", path=""), HOOK_FIELDS))),
    "additionalGids": ("additional_gids", _list_of(_u32)),
    "intelRdt": ("intel_rdt", _object(IntelRdt, INTEL_RDT_FIELDS)),
    "netDevices": ("net_devices", _list_of(_object(_with_defaults(NetDevice, host_interface_name="", name=""),
                                                      NET_DEVICE_FIELDS))),
}
_container_edits = _object(ContainerEdits, CONTAINER_EDITS_FIELDS)
DEVICE_FIELDS = {
    "name": ("name", _string),
    "annotations": ("annotations", _string_map),
    "containerEdits": ("container_edits", _container_edits),
}
SPEC_FIELDS = {
    "cdiVersion": ("cdi_version", _string),
    "kind": ("kind", _string),
    "annotations": ("annotations", _string_map),
    "devices": ("devices", _list_of(_object(_with_defaults(Device, name="", container_edits=ContainerEdits()),
                                            DEVICE_FIELDS))),
    "containerEdits": ("container_edits", _container_edits),
}
_spec = _object(_with_defaults(Spec, cdi_version="", kind="", devices=()), SPEC_FIELDS)


def build_spec(document: Any, path: str) -> Spec:
    """The Spec for a decoded document; SpecError(path, field path, problem) on a shape error."""
    if document is None:  # "null", or a YAML document with no content
        raise SpecError(path, "", "file is empty")
    try:
        spec = _spec(document, "")
    except _FieldError as error:
        if not error.path and error.message.startswith("expected a mapping"):
            raise SpecError(path, "", "the document is not a mapping of spec fields") from None
        raise SpecError(path, error.path, error.message) from None
    except RecursionError:
        raise SpecError(path, "", "nested too deeply") from None
    return spec._replace(path=path)


def parse_spec_bytes(data: bytes, path: str) -> Spec:
    return build_spec(decode_document(data, path), path)


def load_spec(path: str, max_size: int | None = None) -> Spec:
    """Read and parse one spec file (shape only; see validate.validate_spec for the rules)."""
    data, _ = read_spec_bytes(path, max_size)
    return parse_spec_bytes(data, path)


# ---------------------------------------------------------------------------------------
# The way back: model -> CDI camelCase data (for `show`, and for tests that write specs)

_EDIT_TABLES: dict[type, Mapping[str, tuple[str, _Convert]]] = {
    DeviceNode: DEVICE_NODE_FIELDS,
    Mount: MOUNT_FIELDS,
    Hook: HOOK_FIELDS,
    IntelRdt: INTEL_RDT_FIELDS,
    NetDevice: NET_DEVICE_FIELDS,
    ContainerEdits: CONTAINER_EDITS_FIELDS,
    Device: DEVICE_FIELDS,
    Spec: SPEC_FIELDS,
}


def to_cdi_data(obj: Any) -> Any:
    """A model object as CDI JSON data: camelCase keys, absent/empty fields left out."""
    fields = _EDIT_TABLES.get(type(obj))
    if fields is None:
        return obj
    out: dict[str, Any] = {}
    for json_name, (attr, _) in fields.items():
        value = getattr(obj, attr)
        if value is None or value == "" or value == () or value is False:
            continue
        if json_name == "annotations":
            out[json_name] = dict(value)
        elif type(value) is tuple:  # a list field; model records are namedtuples, not lists
            out[json_name] = [to_cdi_data(item) for item in value]
        else:
            out[json_name] = to_cdi_data(value)
    return out
