"""Which CDI devices a container asks for: `cdi.k8s.io/<key>` annotations, read and built.

The value of each such annotation is a comma-separated list of qualified device names
(vendor.com/class=name). On the hook's hot path, so it imports only names.py (no `re`):
no YAML, no registry, until a device is actually requested.
"""

from __future__ import annotations

from cdi_hook.errors import CdiError
from cdi_hook.spec.names import ALNUM, fits_pattern, parse_qualified_name, quote

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Iterable

ANNOTATION_PREFIX = "cdi.k8s.io/"
# Written by the config.json editors (precreate, inject --mode edits): the devices they
# applied, which the live hook then skips, so a device is applied once when both run.
APPLIED_ANNOTATION = "io.github.cdi-hook.applied"
MAX_KEY_NAME_LENGTH = 63
# A container asks for at most this many devices, through at most this many cdi.k8s.io/
# annotations (the kubelet writes one per device plugin allocation). A node with 8 GPUs
# split 7 ways by MIG, plus NICs and accelerators, stays well below; beyond, every later
# step (attribution, the policy, the plan, the error and log lines) would grow with a
# pod author's annotation count: refused with one line instead.
MAX_REQUESTS = 256
_KEY_NAME = (ALNUM, ALNUM | frozenset("_.-"))  # [A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?


def key_name_problem(name: str) -> str | None:
    """Why name cannot follow the cdi.k8s.io/ prefix, or None."""
    if len(name) > MAX_KEY_NAME_LENGTH:
        return f"the part after {ANNOTATION_PREFIX} is longer than {MAX_KEY_NAME_LENGTH} characters"
    if not fits_pattern(name, _KEY_NAME):
        return (f"the part after {ANNOTATION_PREFIX} must start and end with a letter or digit "
                "and contain only letters, digits, '_', '.', '-'")
    return None


def parse_annotation(key: str, value: object) -> list[str]:
    """The qualified names in one cdi.k8s.io/ annotation; CdiError naming the key if malformed."""
    problem = key_name_problem(key[len(ANNOTATION_PREFIX):])
    if problem:
        raise CdiError(f"annotation {quote(key)}: {problem}")
    if not isinstance(value, str):
        raise CdiError(f"annotation {quote(key)}: value must be a string of device names")
    names = []
    for item in value.split(","):
        item = item.strip()
        try:
            parse_qualified_name(item)
        except CdiError as error:
            raise CdiError(f"annotation {quote(key)}: {error}") from None
        names.append(item)
    return names


def requested_devices(*annotation_maps: object) -> list[str]:
    """Qualified names from every cdi.k8s.io/ annotation of the maps, in order, each once.

    Maps may be None (a config.json without annotations). Other annotations are ignored.
    """
    names: dict[str, None] = {}
    keys: set[str] = set()  # the state's annotations repeat config.json's: count each key once
    for annotation_map in annotation_maps:
        if not annotation_map:
            continue
        if not isinstance(annotation_map, dict):
            raise CdiError("annotations must be a mapping of strings")
        for key, value in annotation_map.items():
            if isinstance(key, str) and key.startswith(ANNOTATION_PREFIX):
                keys.add(key)
                if len(keys) > MAX_REQUESTS:
                    raise CdiError(f"more than {MAX_REQUESTS} {ANNOTATION_PREFIX} annotations; "
                                   f"at most {MAX_REQUESTS} are read per container")
                for name in parse_annotation(key, value):
                    names.setdefault(name, None)
                if len(names) > MAX_REQUESTS:
                    raise CdiError(f"annotation {quote(key)}: more than {MAX_REQUESTS} CDI devices requested; "
                                   f"at most {MAX_REQUESTS} are given per container")
    return list(names)


def annotation_key(plugin_name: str, device_id: str) -> str:
    """cdi.k8s.io/<plugin>_<device id> as the reference library builds it ('/' becomes '_')."""
    if not plugin_name:
        raise CdiError("annotation key: empty plugin name")
    if not device_id:
        raise CdiError("annotation key: empty device id")
    name = plugin_name + "_" + device_id.replace("/", "_")
    problem = key_name_problem(name)
    if problem:
        raise CdiError(f"annotation key {quote(ANNOTATION_PREFIX + name)}: {problem}")
    return ANNOTATION_PREFIX + name


def annotation_value(devices: Iterable[str]) -> str:
    """The comma-separated value for a list of qualified names (each checked)."""
    devices = list(devices)
    if not devices:
        raise CdiError("annotation value: no devices")
    for name in devices:
        parse_qualified_name(name)
    return ",".join(devices)


def build_annotations(plugin_name: str, device_id: str, devices: Iterable[str],
                      annotations: dict | None = None) -> dict:
    """annotations (copied) plus one cdi.k8s.io/ annotation requesting devices."""
    key = annotation_key(plugin_name, device_id)
    out = dict(annotations or {})
    if key in out:
        raise CdiError(f"annotation {quote(key)} is already set")
    out[key] = annotation_value(devices)
    return out


def applied_devices(*annotation_maps: object) -> list[str]:
    """The names the APPLIED_ANNOTATION of the maps lists (a config.json editor applied them)."""
    names: dict[str, None] = {}
    for annotation_map in annotation_maps:
        value = annotation_map.get(APPLIED_ANNOTATION) if isinstance(annotation_map, dict) else None
        if isinstance(value, str):
            names.update((name.strip(), None) for name in value.split(",") if name.strip())
    return list(names)


def pending_devices(*annotation_maps: object) -> list[str]:
    """Requested names minus those an editor already applied: each device is applied once,
    by whichever path (precreate, inject --mode edits, the live hook) meets it first."""
    applied = set(applied_devices(*annotation_maps))
    return [name for name in requested_devices(*annotation_maps) if name not in applied]
