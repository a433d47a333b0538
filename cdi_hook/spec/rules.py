"""Rules that both validation and the appliers need: each is decided here, once.

validate.py reports them as spec errors; the plan (and, where the kernel is involved, the
live injector) calls the same functions, so a spec that validates never fails them later.
"""

from __future__ import annotations

import posixpath

from cdi_hook.spec.names import quote

IFNAMSIZ = 16  # Linux interface names: at most 15 bytes (include/uapi/linux/if.h)
PERMISSION_CHARS = frozenset("rwm")
NO_PERMISSIONS = "none"  # CDI (reference main): a device node with no cgroup access


def is_interface_name_template(name: str) -> bool:
    """A "%d" template: the kernel picks the number (dev_alloc_name)."""
    return "%d" in name


def interface_name_problem(name: str, *, template_allowed: bool = True) -> str | None:
    """Why the kernel would refuse `name` as an interface name (net/core/dev.c
    dev_valid_name, plus dev_alloc_name's one "%d"), or None."""
    if not name:
        return "required"
    if len(name.encode()) >= IFNAMSIZ:
        return f"{quote(name)} is longer than {IFNAMSIZ - 1} bytes"
    if name in (".", "..") or any(c in "/:\0" or c.isspace() for c in name):
        return f"{quote(name)} is not a valid interface name (no '/', ':', spaces; not '.' or '..')"
    if "%" in name:
        if not template_allowed:
            return f"{quote(name)} cannot be a template: a host interface must be named exactly"
        if name.count("%") > 1 or not is_interface_name_template(name):
            return f"{quote(name)} may contain '%' only once, as the template '%d'"
    return None


def mount_destination_problem(container_path: str) -> str | None:
    """Why a mount cannot go to container_path, or None.

    A destination that cleans to the root ("/", ".", "/..", "") would cover the whole
    rootfs; runc refuses such a mount, so every path of cdi-hook refuses it up front.
    """
    if not container_path:
        return "required"
    if "\0" in container_path:
        return "contains a NUL byte"
    if posixpath.normpath("/" + container_path.lstrip("/")) == "/":  # normpath keeps a leading "//"
        return "a mount on the container's root directory is not allowed"
    return None


def permissions_problem(permissions: str) -> str | None:
    """A device node's cgroup permissions: "" (all), a combination of r, w, m, or "none"."""
    if permissions == NO_PERMISSIONS or PERMISSION_CHARS.issuperset(permissions):
        return None
    return f"{quote(permissions)} is not a combination of r, w, m"


# A device's own annotation (cdi-hook's key, in the reverse-DNS form of its other key,
# io.github.cdi-hook.applied): how many containers may hold it at once. `generate --shared
# N` writes it; the hook's holds and the device plugin's units count by it. A positive
# decimal integer up to MAX_SHARED: a typo must not turn a limit into none.
SHARED_ANNOTATION = "io.github.cdi-hook.shared"
MAX_SHARED = 100_000


def shared_count_problem(value: str) -> str | None:
    """Why value cannot be a SHARED_ANNOTATION count, or None."""
    if not (value.isascii() and value.isdigit()) or value.startswith("0") or int(value) > MAX_SHARED:
        return f"{SHARED_ANNOTATION} {quote(value)} is not a whole number from 1 to {MAX_SHARED}"
    return None


def shared_count(annotations: tuple[tuple[str, str], ...]) -> int | None:
    """How many containers may hold a device with these annotations at once; None when it
    declares no count (or a bad one, which validation has already refused)."""
    for key, value in annotations:
        if key == SHARED_ANNOTATION:
            return None if shared_count_problem(value) else int(value)
    return None
