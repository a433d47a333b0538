"""CDI names: vendor, class, device name, kind (vendor/class), qualified name (kind=name).

Pure and cheap to import (no `re`: with enum it costs ~10 ms of a hook start): the hook's
hot path parses the requested names before it knows whether any spec needs loading. The
patterns are the CDI ones, written out as character sets (fits_pattern), checked over the
whole name, so a trailing newline never slips by.
"""

from __future__ import annotations

from cdi_hook.errors import CdiError

LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
ALNUM = LETTERS | frozenset("0123456789")
# [A-Za-z](?:[A-Za-z0-9_.-]*[A-Za-z0-9])? for vendors and classes, and
# [A-Za-z0-9](?:[A-Za-z0-9_.:-]*[A-Za-z0-9])? for device names: (first, middle) sets.
VENDOR_PATTERN = (LETTERS, ALNUM | frozenset("_.-"))
CLASS_PATTERN = VENDOR_PATTERN
DEVICE_PATTERN = (ALNUM, ALNUM | frozenset("_.:-"))


def fits_pattern(text: str, pattern: tuple[frozenset, frozenset]) -> bool:
    """Whether all of text matches [first](?:[middle]*[A-Za-z0-9])? (re.fullmatch, without re)."""
    first, middle = pattern
    if not text or text[0] not in first:
        return False
    return len(text) == 1 or (text[-1] in ALNUM and set(text[1:-1]) <= middle)

_QUOTE_LIMIT = 80


_NAMED_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape(text: str) -> str:
    """text.encode("unicode_escape").decode("ascii"), by hand: the codec is a module loaded
    on first use (~0.5 ms of a start), and the hook's worker, which escapes the image's names,
    can import nothing once inside the container."""
    if text.isascii() and text.isprintable():
        return text.replace("\\", "\\\\")
    out = []
    for char in text:
        code = ord(char)
        if char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        elif 0x20 <= code < 0x7f:
            out.append(char)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def quote(text: object) -> str:
    """text in double quotes on one line: control and non-ASCII characters escaped, long text cut.

    Every message that echoes user input goes through here, so a hostile name can never
    break the one-line error format.
    """
    text = str(text)
    if len(text) > _QUOTE_LIMIT:
        text = text[:_QUOTE_LIMIT] + "..."
    return '"' + escape(text).replace('"', '\\"') + '"'


def vendor_problem(vendor: str) -> str | None:
    """Why vendor is not a valid CDI vendor name, or None when it is."""
    if fits_pattern(vendor, VENDOR_PATTERN):
        return None
    return (f"vendor {quote(vendor)} must start with a letter, end with a letter or digit, "
            "and contain only letters, digits, '_', '.', '-'")


def class_problem(device_class: str) -> str | None:
    """Why device_class is not a valid CDI class name, or None when it is."""
    if fits_pattern(device_class, CLASS_PATTERN):
        return None
    return (f"class {quote(device_class)} must start with a letter, end with a letter or digit, "
            "and contain only letters, digits, '_', '.', '-'")


def device_name_problem(name: str) -> str | None:
    """Why name is not a valid CDI device name, or None when it is."""
    if fits_pattern(name, DEVICE_PATTERN):
        return None
    return (f"device name {quote(name)} must start and end with a letter or digit "
            "and contain only letters, digits, '_', '.', ':', '-'")


def kind_problem(kind: str) -> str | None:
    """Why kind is not a valid vendor/class, or None when it is."""
    if kind.count("/") != 1:
        return f"kind {quote(kind)} must be vendor/class with exactly one '/'"
    vendor, device_class = kind.split("/")
    return vendor_problem(vendor) or class_problem(device_class)


def parse_kind(kind: str) -> tuple[str, str]:
    """(vendor, class) of a kind; CdiError when malformed."""
    problem = kind_problem(kind) if isinstance(kind, str) else "kind must be a string"
    if problem:
        raise CdiError(problem)
    vendor, device_class = kind.split("/")
    return vendor, device_class


def parse_qualified_name(name: str) -> tuple[str, str, str]:
    """(vendor, class, device name) of "vendor.com/class=name"; CdiError when malformed."""
    if not isinstance(name, str):
        raise CdiError(f"{quote(name)} is not a qualified CDI device name (vendor.com/class=name)")
    kind, sep, device = name.partition("=")
    problem = None
    if not sep:
        problem = "no '=' between kind and device name"
    else:
        problem = kind_problem(kind) or device_name_problem(device)
    if problem:
        raise CdiError(f"{quote(name)} is not a qualified CDI device name (vendor.com/class=name): {problem}")
    vendor, device_class = kind.split("/")
    return vendor, device_class, device


def is_qualified_name(name: str) -> bool:
    try:
        parse_qualified_name(name)
    except CdiError:
        return False
    return True


def qualified_name(vendor: str, device_class: str, device: str) -> str:
    """"vendor/class=device", checked; CdiError naming the bad part."""
    problem = vendor_problem(vendor) or class_problem(device_class) or device_name_problem(device)
    if problem:
        raise CdiError(problem)
    return f"{vendor}/{device_class}={device}"
