"""The read-only commands: list, validate, show. Output is deterministic (sorted, stable keys).

Error lines go to stderr, one per problem, each starting with the file it is about, so an
editor or grep can jump to it; results go to stdout.
"""

from __future__ import annotations

import json
import sys

from cdi_hook.registry import Registry, load_spec_file
from cdi_hook.spec.parse import to_cdi_data

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence


def _dump(data: object, fmt: str) -> str:
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip("\n")
    return json.dumps(data, indent=2, ensure_ascii=False)


def _warn_errors(registry: Registry) -> None:
    if registry.errors:
        print(f"cdi-hook: {len(registry.errors)} spec file(s) or dir(s) have errors: "
              "run `cdi-hook validate`", file=sys.stderr)


def cmd_list(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    """Every resolvable device with the spec file defining it."""
    registry = Registry.load(spec_dirs)
    rows = [
        {"name": name, "kind": spec.kind, "device": device.name, "spec": spec.path, "cdiVersion": spec.cdi_version}
        for name, (spec, device) in sorted(registry.devices.items())
    ]
    fmt = getattr(args, "format", "table")
    if fmt in ("json", "yaml"):
        print(_dump(rows, fmt))
    elif rows:
        width = max(len("DEVICE"), *(len(row["name"]) for row in rows))
        print(f"{'DEVICE':<{width}}  SPEC")
        for row in rows:
            print(f"{row['name']:<{width}}  {row['spec']}")
    else:
        print(f"cdi-hook: no CDI devices in {', '.join(registry.spec_dirs) or 'no spec dirs'}", file=sys.stderr)
    _warn_errors(registry)
    return 0


def cmd_validate(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    """The given files, or every spec in the spec dirs (with conflicts); 1 if anything is wrong."""
    files = list(getattr(args, "files", None) or ())
    if files:
        results = [load_spec_file(path) for path in files]
        errors = [line for result in results for line in result.errors]
        valid = [result.spec for result in results if result.spec is not None]
        summary = f"{len(files)} spec file(s): {len(valid)} valid, {len(files) - len(valid)} invalid"
    else:
        registry = Registry.load(spec_dirs)
        errors = registry.all_errors()
        valid_paths = {spec.path for spec in registry.specs}
        invalid = sum(1 for path in registry.errors if path not in valid_paths)
        summary = (f"{len(registry.specs) + invalid} spec file(s) in {', '.join(registry.spec_dirs)}: "
                   f"{len(registry.specs)} valid, {invalid} invalid, {len(registry.conflicts)} conflicting "
                   f"device name(s); {len(registry.devices)} device(s) available")
    for line in errors:
        print(line, file=sys.stderr)
    print(summary)
    return 1 if errors else 0


def cmd_show(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    """The merged edits the named devices would apply, in CDI field names."""
    selection = Registry.load(spec_dirs).select(args.names)
    data = {"devices": list(selection.devices), "containerEdits": to_cdi_data(selection.merged())}
    print(_dump(data, getattr(args, "format", "json")))
    return 0
