"""What this host has under /dev and /sys, for `cdi-hook generate`: the device nodes a path,
a glob, a stable link or a USB vendor:product[:serial] stands for. Reads only.

The roots are parameters (dev_root, sys_root), so tests scan a fake tree; a node found at
DEV_ROOT/ttyUSB0 is the container's /dev/ttyUSB0 and the host's DEV_ROOT/ttyUSB0.

Nodes are judged by lstat, as hostdev.py judges a spec's: only character and block nodes
count; a symlink is followed only by resolving it (realpath) to a node inside dev_root,
which is what a stable link (/dev/serial/by-id/...) is for.

USB devices are found as the kernel lays them out (Documentation/ABI/stable/sysfs-bus-usb):
each entry of /sys/bus/usb/devices with an idVendor is a device (interfaces, "1-1:1.0",
have none), with idProduct, an optional serial, busnum and devnum; its device node is
/dev/bus/usb/BBB/DDD (its uevent's DEVNAME), and every node of a function below it (a tty,
hidraw, video4linux or input child) is a folder with a `dev` file ("major:minor") whose
uevent names it (DEVNAME=ttyUSB0; without a uevent, the folder's name). A child that is
itself a USB device (behind a hub) is its own entry, not this one's.
"""

from __future__ import annotations

import glob
import os
import stat
from collections import namedtuple

from cdi_hook.errors import CdiError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator

# path: where the container sees it ("/dev/ttyUSB0"); host_path: where it is here.
HostNode = namedtuple("HostNode", ["path", "host_path", "type", "major", "minor"])
# One thing a selector matched: name (for a template's {name}: a basename, a link's
# name, a USB serial), what (for messages), nodes (HostNode, at least one).
Match = namedtuple("Match", ["name", "what", "nodes"])

_TYPES = {stat.S_IFCHR: "c", stat.S_IFBLK: "b"}
USB_DEVICES = "bus/usb/devices"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(4096).strip()
    except OSError:
        return None


class Scanner:
    """The host's /dev and /sys, seen at dev_root and sys_root."""

    def __init__(self, dev_root: str = "/dev", sys_root: str = "/sys"):
        self.dev_root = os.path.realpath(dev_root)
        self.sys_root = sys_root

    def container_path(self, host_path: str) -> str | None:
        """/dev/<relative> for a host path inside dev_root, else None."""
        rel = os.path.relpath(host_path, self.dev_root)
        return None if rel == ".." or rel.startswith("../") or rel == "." else "/dev/" + rel

    def host_path(self, dev_path: str) -> str:
        """Where a /dev/... path of the selector is on this host."""
        return os.path.join(self.dev_root, dev_path[len("/dev/"):])

    def node(self, host_path: str, path: str | None = None) -> HostNode | None:
        """The character or block node at host_path (lstat: no symlink), or None."""
        try:
            st = os.lstat(host_path)
        except OSError:
            return None
        kind = _TYPES.get(stat.S_IFMT(st.st_mode))
        container = path or self.container_path(host_path)
        if kind is None or container is None:
            return None
        return HostNode(container, host_path, kind, os.major(st.st_rdev), os.minor(st.st_rdev))

    def paths(self, pattern: str) -> tuple[list[Match], list[str]]:
        """The nodes a /dev path or glob names, one Match per node (sorted by path), and
        why each other thing it matched is not one (a folder, a file, a dangling link)."""
        if not pattern.startswith("/dev/") or "/../" in pattern + "/":
            raise CdiError(f"selector {pattern!r}: a path selector is an absolute path under /dev")
        matches, skipped = [], []
        host_pattern = os.path.join(glob.escape(self.dev_root), pattern[len("/dev/"):])
        for host_path in sorted(glob.glob(host_pattern)):
            dev_path = self.container_path(host_path) or host_path
            if os.path.islink(host_path):
                target = os.path.realpath(host_path)
                node = self.node(target)
                if node is None:
                    skipped.append(f"{dev_path}: a link to no device node under /dev")
                    continue
                # the node where it is, and again under the stable name the link gives it
                nodes = (node, node._replace(path=dev_path))
                matches.append(Match(os.path.basename(host_path), f"{dev_path} -> {node.path}", nodes))
                continue
            node = self.node(host_path)
            if node is None:
                skipped.append(f"{dev_path}: not a character or block device node")
                continue
            matches.append(Match(os.path.basename(host_path), dev_path, (node,)))
        return matches, skipped

    def usb(self, vendor: str, product: str | None, serial: str | None) -> tuple[list[Match], list[str]]:
        """Every USB device of vendor:product (product None: any of the vendor's; and serial),
        one Match each with every node of it, and why a matching device gave none (its nodes
        not made under /dev yet)."""
        matches, skipped = [], []
        top = os.path.join(self.sys_root, USB_DEVICES)
        try:
            entries = sorted(os.listdir(top))
        except FileNotFoundError:
            return [], [f"{top} does not exist (no USB bus on this host)"]
        except OSError as error:
            raise CdiError(f"{top}: cannot list USB devices: {error.strerror}") from None
        for entry in entries:
            folder = os.path.realpath(os.path.join(top, entry))
            if ((_read(os.path.join(folder, "idVendor")) or "").lower() != vendor
                    or (product is not None and (_read(os.path.join(folder, "idProduct")) or "").lower() != product)
                    or (serial is not None and _read(os.path.join(folder, "serial")) != serial)):
                continue
            nodes = []
            for devname, numbers in _usb_nodes(folder):
                node = self.node(os.path.join(self.dev_root, devname))
                if node is not None and (numbers is None or numbers == (node.major, node.minor)):
                    nodes.append(node)
                else:
                    skipped.append(f"USB device {entry}: /dev/{devname} is not (yet) its device node")
            if nodes:
                name = _read(os.path.join(folder, "serial")) or entry
                matches.append(Match(name, f"USB device {entry} ({vendor}:{product or '*'})", tuple(nodes)))
        return matches, skipped


def _usb_nodes(folder: str) -> Iterator[tuple[str, tuple[int, int] | None]]:
    """(DEVNAME, (major, minor) or None) of the USB device in folder and of every function
    below it, not descending into a USB device behind it (a hub's) nor following links."""
    for here, dirs, files in os.walk(folder):
        if here != folder and "idVendor" in files:
            dirs.clear()  # another USB device: its own entry
            continue
        dirs.sort()
        if "dev" not in files:
            continue
        numbers = _numbers(_read(os.path.join(here, "dev")))
        uevent = dict(line.partition("=")[::2] for line in (_read(os.path.join(here, "uevent")) or "").splitlines())
        devname = uevent.get("DEVNAME")
        if not devname and here == folder:
            bus, device = _read(os.path.join(here, "busnum")), _read(os.path.join(here, "devnum"))
            if not (bus and device and bus.isdigit() and device.isdigit()):
                continue
            devname = f"bus/usb/{int(bus):03d}/{int(device):03d}"
        devname = devname or os.path.basename(here)
        if devname.startswith("/") or ".." in devname.split("/"):
            continue  # not a name under /dev
        yield devname, numbers


def _numbers(text: str | None) -> tuple[int, int] | None:
    major, _, minor = (text or "").partition(":")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None
