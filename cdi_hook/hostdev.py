"""Complete a spec's device node from the host node it names, as the CDI spec says.

A "minimally specified" node gives only a path; type, major, minor and fileMode then come
from the host node (hostPath, default path). Both the live hook and the config.json
editors call this, so both see the same numbers. The host path is checked with lstat: a
symlink or a regular file is refused, never followed, so a spec cannot be tricked into
describing some other device than the one its path names.
"""

from __future__ import annotations

import os
import stat

from cdi_hook.errors import CdiError
from cdi_hook.spec.model import DeviceNode

_TYPE_OF_MODE = {stat.S_IFCHR: "c", stat.S_IFBLK: "b", stat.S_IFIFO: "p"}


def host_node_type(mode: int) -> str | None:
    return _TYPE_OF_MODE.get(stat.S_IFMT(mode))


def is_fully_specified(node: DeviceNode) -> bool:
    return node.type != "" and (bool(node.major) or node.type == "p")


def complete_node(node: DeviceNode, origin: str = "", host_root: str = "/") -> DeviceNode:
    """The node with host_path, type, major, minor and file_mode filled in.

    Raises CdiError naming the device (origin) and the host path when the host node is
    missing, is not a device node, or has another type than the spec says. host_root: where
    the host's filesystem is seen (the device plugin in its container: "/host"); host_path
    stays the host's own path.
    """
    host_path = node.host_path or node.path
    node = node._replace(host_path=host_path)
    if is_fully_specified(node) and node.file_mode is not None:
        return node
    who = f"{origin}: " if origin else ""
    try:
        st = os.lstat(host_path if host_root == "/" else os.path.join(host_root, host_path.lstrip("/")))
    except FileNotFoundError:
        if is_fully_specified(node):
            return node  # fully described by the spec; the host node is optional
        raise CdiError(f"{who}host device {host_path} does not exist") from None
    except OSError as error:
        raise CdiError(f"{who}cannot stat host device {host_path}: {error.strerror}") from None
    host_type = host_node_type(st.st_mode)
    if host_type is None:
        if is_fully_specified(node):
            return node
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a device node"
        raise CdiError(f"{who}host path {host_path} is {kind}; deviceNodes need a character, block or fifo node")
    wanted = {"u": "c"}.get(node.type, node.type)
    if wanted and wanted != host_type:
        raise CdiError(f"{who}{node.path}: spec says type {node.type!r} but host node {host_path} is {host_type!r}")
    changes: dict = {}
    if not node.type:
        changes["type"] = host_type
    if not node.major and (node.type or host_type) != "p":
        changes["major"] = os.major(st.st_rdev)
        changes["minor"] = os.minor(st.st_rdev)
    if node.file_mode is None:
        changes["file_mode"] = stat.S_IMODE(st.st_mode)
    return node._replace(**changes)
