"""`cdi-hook generate`: a CDI spec for generic devices, from selectors, with no hand-written spec.

A selector names host devices: a /dev path (/dev/kvm), a glob (/dev/ttyUSB*: one device per
match), a stable link (/dev/serial/by-id/*: resolved, the device named by the link), or
`usb:VENDOR:PRODUCT[:SERIAL]` (every node of each matching USB device, hostscan.py; PRODUCT
may be `*`, every device of the vendor). Each
is given with a device name, which for many matches is a template: `{name}` (the match's
basename, the link's name, the USB serial or sysfs name) and `{index}` (0, 1, ... in
sorted order). Per selector, extra edits (env, mounts) and a share count (--shared N: the
io.github.cdi-hook.shared annotation, spec/rules.py) go on each of its devices.

The selectors come from the command line (--kind, --device NAME=SELECTOR, ...) or from a
small YAML file (--from FILE; `cdi-hook watch --generate FILE` reads the same file):

    kind: example.com/serial
    output: /etc/cdi/serial.json      # optional; --output wins
    allowEmpty: true                  # optional
    devices:
      - name: "adapter-{name}"
        selector: usb:0403:6001
        shared: 2                     # optional
        env: [SERIAL_ADAPTER=1]       # optional
        mounts: [{hostPath: /etc/ser2net, containerPath: /etc/ser2net, options: [ro, bind]}]

The spec is built here as CDI data and checked by the project's own parser and validator
(spec/parse.py, spec/validate.py): its cdiVersion is the lowest that validates, so a spec
that needs no newer field stays readable by older CDI consumers. Written to stdout, or
atomically (state.write_atomic) to --output, only when its bytes change.

Apart from scan() (the one read of the host, through hostscan.Scanner) and write_output()
(the one write, through the state layer), it is pure: it takes what the Scanner found.
"""

from __future__ import annotations

import json
import os
import sys
from collections import namedtuple

from cdi_hook.errors import CdiError, SpecError, listed
from cdi_hook.hostscan import Scanner
from cdi_hook.spec import version as versions
from cdi_hook.spec.names import device_name_problem, kind_problem, quote
from cdi_hook.spec.parse import build_spec, to_cdi_data
from cdi_hook.spec.rules import MAX_SHARED, SHARED_ANNOTATION
from cdi_hook.spec.validate import validate_spec

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

    from cdi_hook.hostscan import Match
    from cdi_hook.spec.model import Spec

# where: how a message names it ("--device kvm=/dev/kvm", "gen.yaml: devices[2]").
# selector: ("path", "/dev/ttyUSB*") or ("usb", vendor, product or None (any), serial or None).
# edits: CDI containerEdits data (env, mounts) every device of the selector gets.
Selector = namedtuple("Selector", ["where", "name", "text", "selector", "shared", "edits"])
Request = namedtuple("Request", ["source", "kind", "selectors", "output", "allow_empty"])

FILE_KEYS = {"kind", "output", "allowEmpty", "devices"}
DEVICE_KEYS = {"name", "selector", "shared", "env", "mounts"}
MAX_FILE_SIZE = 1 << 20
TEMPLATE_FIELDS = ("{name}", "{index}")
# What a template's {name} may bring into a device name: anything else becomes '_'.
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


# --- selectors and requests ---------------------------------------------------------------

def parse_selector(text: str, where: str) -> tuple:
    """("path", pattern) or ("usb", vendor, product, serial|None); CdiError naming where."""
    if text.startswith("usb:"):
        parts = text.split(":")
        ids = parts[1:3]

        def is_id(value: str, wildcard: bool) -> bool:
            return (wildcard and value == "*") or (len(value) == 4 and all(c in "0123456789abcdefABCDEF"
                                                                            for c in value))

        if (len(parts) not in (3, 4) or not is_id(ids[0], False) or not is_id(ids[1], True)
                or (len(parts) == 4 and not parts[3])):
            raise CdiError(f"{where}: selector {quote(text)} is not usb:VENDOR:PRODUCT[:SERIAL] "
                           "(four hex digits each, as lsusb shows them; PRODUCT may be * for any)")
        product = None if ids[1] == "*" else ids[1].lower()
        return ("usb", ids[0].lower(), product, parts[3] if len(parts) == 4 else None)
    if not text.startswith("/dev/") or ".." in text.split("/") or "\0" in text:
        raise CdiError(f"{where}: selector {quote(text)} is neither a path under /dev (a glob or a link may do) "
                       "nor usb:VENDOR:PRODUCT[:SERIAL]")
    return ("path", text)


def _shared(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_SHARED:
        raise CdiError(f"{where}: {quote(value)} is not a whole number from 1 to {MAX_SHARED}")
    return value


def _edits(env: Any, mounts: Any, where: str) -> dict:
    """The extra edits as CDI data, their shape checked by the spec parser (field names as
    this selector's)."""
    edits = {key: value for key, value in (("env", env), ("mounts", mounts)) if value}
    probe = {"cdiVersion": versions.LATEST, "kind": "x.com/x", "devices": [{"name": "x", "containerEdits": edits}]}
    try:
        spec = build_spec(probe, where)
    except SpecError as error:
        raise CdiError(f"{where}: {error.field.replace('devices[0].containerEdits.', '')}: {error.message}") from None
    for problem in validate_spec(spec):
        if problem.field.startswith("devices[0].containerEdits."):
            raise CdiError(f"{where}: {problem.field.replace('devices[0].containerEdits.', '')}: {problem.message}")
    return edits


def _mount_option(text: str) -> dict:
    """--mount HOST:CONTAINER[:OPTION,...] as a CDI bind mount."""
    host, _, rest = text.partition(":")
    container, _, options = rest.partition(":")
    if not host.startswith("/") or not container.startswith("/"):
        raise CdiError(f"--mount {quote(text)}: not HOST:CONTAINER[:OPTION,...] with absolute paths")
    chosen = [o for o in options.split(",") if o]
    if not {"bind", "rbind"} & set(chosen):
        chosen.insert(0, "bind")
    return {"hostPath": host, "containerPath": container, "options": chosen}


def request_from_args(args: argparse.Namespace) -> Request:
    if not args.kind or not args.device:
        raise CdiError("generate: give --kind and at least one --device NAME=SELECTOR, or --from FILE")
    problem = kind_problem(args.kind)
    if problem:
        raise CdiError(f"--kind: {problem}")
    mounts = [_mount_option(m) for m in args.mount or ()]
    selectors = []
    for item in args.device:
        name, sep, text = item.partition("=")
        where = f"--device {quote(item)}"
        if not sep or not name or not text:
            raise CdiError(f"{where}: not NAME=SELECTOR")
        selectors.append(Selector(where, name, text, parse_selector(text, where), _shared(args.shared, "--shared"),
                                  _edits(args.env, mounts, where)))
    return Request("the command line", args.kind, tuple(selectors), args.output, bool(args.allow_empty))


def load_request(path: str) -> Request:
    """The request in a generate file; CdiError with the file and field for anything amiss."""
    from cdi_hook.spec.parse import decode_document, read_spec_bytes

    if not path.endswith((".yaml", ".yml", ".json")):
        raise CdiError(f"{path}: a generate file ends in .yaml, .yml or .json")
    data, _ = read_spec_bytes(path, MAX_FILE_SIZE)
    document = decode_document(data, path)

    def fail(field: str, message: str) -> NoReturn:
        raise CdiError(f"{path}: {field}: {message}")

    if type(document) is not dict:
        fail("(top level)", "expected a mapping of kind, devices, output, allowEmpty")
    for key in document:
        if key not in FILE_KEYS:
            fail(str(key), f"unknown field (known: {', '.join(sorted(FILE_KEYS))})")
    kind = document.get("kind")
    if type(kind) is not str:
        fail("kind", "required, a string vendor.com/class")
    problem = kind_problem(kind)
    if problem:
        fail("kind", problem)
    output = document.get("output")
    if output is not None and (type(output) is not str or not output.startswith("/")):
        fail("output", "an absolute path")
    allow_empty = document.get("allowEmpty", False)
    if type(allow_empty) is not bool:
        fail("allowEmpty", "true or false")
    items = document.get("devices")
    if type(items) is not list or not items:
        fail("devices", "required, a list of {name, selector}")
    selectors = []
    for i, item in enumerate(items):
        where = f"{path}: devices[{i}]"
        if type(item) is not dict:
            fail(f"devices[{i}]", "expected a mapping of name, selector, shared, env, mounts")
        for key in item:
            if key not in DEVICE_KEYS:
                fail(f"devices[{i}].{key}", f"unknown field (known: {', '.join(sorted(DEVICE_KEYS))})")
        name, text = item.get("name"), item.get("selector")
        if type(name) is not str or not name:
            fail(f"devices[{i}].name", "required, a device name or template")
        if type(text) is not str or not text:
            fail(f"devices[{i}].selector", "required, a /dev path or glob, or usb:VENDOR:PRODUCT[:SERIAL]")
        selectors.append(Selector(where, name, text, parse_selector(text, where), _shared(item.get("shared"), f"{where}.shared"),
                                  _edits(item.get("env"), item.get("mounts"), where)))
    return Request(path, kind, tuple(selectors), output, allow_empty)


# --- scanning (the one part that reads the host) -----------------------------------------

def scan(request: Request, scanner: Scanner) -> list[tuple[Selector, list[Match], list[str]]]:
    """Each selector with what it matched and why other things it met were left out."""
    found = []
    for selector in request.selectors:
        if selector.selector[0] == "usb":
            matches, skipped = scanner.usb(*selector.selector[1:])
        else:
            matches, skipped = scanner.paths(selector.selector[1])
        found.append((selector, matches, skipped))
    return found


# --- the spec (pure) -----------------------------------------------------------------------

def device_name(selector: Selector, match: Match, index: int, count: int) -> str:
    """The selector's name, its template filled for this match; CdiError when it is no CDI
    name or when many matches would share it."""
    if count > 1 and not any(field in selector.name for field in TEMPLATE_FIELDS):
        raise CdiError(f"{selector.where}: {count} devices match, so the name {quote(selector.name)} needs "
                       "{name} or {index} to tell them apart")
    clean = "".join(c if c in _NAME_CHARS else "_" for c in match.name)
    name = selector.name.replace("{name}", clean).replace("{index}", str(index))
    problem = device_name_problem(name)
    if problem:
        raise CdiError(f"{selector.where}: for {match.what}: {problem}")
    return name


def _node_data(node: Any) -> dict:
    data: dict = {"path": node.path}
    if node.host_path != node.path:
        data["hostPath"] = node.host_path
    data.update(type=node.type, major=node.major, minor=node.minor)
    return data


def build(kind: str, found: list[tuple[Selector, list[Match], list[str]]]) -> Spec | None:
    """The spec of every match, at the lowest cdiVersion that validates; None when nothing
    matched. CdiError for two selectors naming one device."""
    devices: list[dict] = []
    named: dict[str, str] = {}
    for selector, matches, _ in found:
        for index, match in enumerate(matches):
            name = device_name(selector, match, index, len(matches))
            if name in named:
                raise CdiError(f"{selector.where}: device {quote(name)} ({match.what}) is also {named[name]}")
            named[name] = f"{selector.where}'s {match.what}"
            nodes = [_node_data(node) for node in match.nodes]
            device: dict = {"name": name, "containerEdits": {"deviceNodes": nodes, **selector.edits}}
            if selector.shared is not None:
                device["annotations"] = {SHARED_ANNOTATION: str(selector.shared)}
            devices.append(device)
    if not devices:
        return None
    spec = build_spec({"cdiVersion": versions.LATEST, "kind": kind, "devices": devices}, "generated spec")
    return lowest_version(spec)


def lowest_version(spec: Spec) -> Spec:
    """spec at the oldest cdiVersion validate accepts it at (the same rules `cdi-hook
    validate` applies); CdiError with validate's first problem when none does."""
    for version in versions.VERSIONS:
        candidate = spec._replace(cdi_version=version)
        if not validate_spec(candidate):
            return candidate
    problems = validate_spec(spec._replace(cdi_version=versions.LATEST))
    raise CdiError(f"the generated spec would be invalid: {problems[0]}")


def render(spec: Spec, yaml_format: bool) -> bytes:
    data = to_cdi_data(spec._replace(path=""))
    if not data.get("containerEdits"):
        data.pop("containerEdits", None)  # the model's empty spec-level edits: not written
    if yaml_format:
        import yaml

        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False).encode()
    return (json.dumps(data, indent=2) + "\n").encode()


def empty_problems(found: list[tuple[Selector, list[Match], list[str]]]) -> list[str]:
    """One line per selector that matched nothing, with what it met and left out."""
    lines = []
    for selector, matches, skipped in found:
        if not matches:
            why = f" ({listed(skipped, 3, '; ')})" if skipped else ""
            lines.append(f"{selector.where}: selector {quote(selector.text)} matches no device{why}")
    return lines


# --- writing -------------------------------------------------------------------------------

def write_output(path: str, data: bytes | None) -> bool:
    """Put data at path atomically (None: remove the file); True when the file changed."""
    from cdi_hook import state

    try:
        with open(path, "rb") as file:
            before: bytes | None = file.read(len(data or b"") + 1)
    except FileNotFoundError:
        before = None
    except OSError as error:
        raise CdiError(f"--output {path}: cannot read: {error.strerror}") from None
    if before == data:
        return False
    try:
        if data is None:
            os.unlink(path)
        else:
            # a spec: root's, readable by all, as a runtime reading /etc/cdi expects
            state.write_atomic(path, data, mode=0o644)
    except OSError as error:
        raise CdiError(f"--output {path}: cannot write: {error.strerror}") from None
    return True


def generate(request: Request, scanner: Scanner, output: str | None, warn: Any) -> tuple[Spec | None, bool]:
    """Scan, build and write (output) the spec; (the spec or None, whether the file changed).
    warn(line) takes each warning; CdiError when a selector matches nothing and
    empty matches are not allowed."""
    found = scan(request, scanner)
    empty = empty_problems(found)
    if empty and not request.allow_empty:
        raise CdiError(empty[0] + (f" (and {len(empty) - 1} more selector(s))" if len(empty) > 1 else ""))
    for line in empty:
        warn(line)
    spec = build(request.kind, found)
    changed = False
    if output is not None:
        data = None if spec is None else render(spec, output.endswith((".yaml", ".yml")))
        changed = write_output(output, data)
    return spec, changed


def warn_line(line: str) -> None:
    from cdi_hook.errors import printable

    print(f"cdi-hook: warning: {printable(line)}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.from_file:
        if args.kind or args.device or args.shared is not None or args.env or args.mount:
            raise CdiError("generate: --from FILE carries the kind and devices; give no --kind, --device, "
                           "--shared, --env or --mount with it")
        request = load_request(args.from_file)
    else:
        request = request_from_args(args)
    if args.allow_empty:
        request = request._replace(allow_empty=True)
    output = args.output or request.output
    spec, changed = generate(request, Scanner(args.dev_root, args.sys_root), output, warn_line)
    if output is None:
        if spec is not None:
            sys.stdout.buffer.write(render(spec, args.format == "yaml"))
        return 0
    what = "removed (no device matched)" if spec is None else f"{len(spec.devices)} device(s), cdiVersion {spec.cdi_version}"
    print(f"{output}: {what}{'' if changed else ', unchanged'}", file=sys.stderr)
    return 0
