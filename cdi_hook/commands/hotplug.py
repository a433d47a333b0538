"""`cdi-hook watch --generate FILE`: keep a generated spec current as devices come and go.

A long-running process for one `generate --from` FILE: it regenerates the spec (commands/
generate.py) at start, then whenever something under /dev is created, removed, renamed
or changes owner or mode (inotify on /dev and every folder below it: udev makes a node,
its /dev/bus/usb/BBB/DDD and its /dev/serial/by-id link as a device is plugged, and
removes them as it goes), after the events have been quiet for DEBOUNCE_S, and every
--rescan-interval seconds besides (a sysfs attribute such as a serial number changes
without an event under /dev). The spec is written atomically and only when its bytes
change, so the device plugin's next poll (health, units) and the next container start see
the new devices, and the spec-dir watcher's cache is not rebuilt for nothing.

Devices going away is what hotplug is: a selector that matches nothing here is a logged
warning, not an error (the spec file is removed when no selector matches anything, so the
kind goes with its last device). Any other problem (a template that makes two devices one
name) is logged and the spec left as it was, until the next change. One log line per
change on stderr; SIGTERM or SIGINT ends it with status 0.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

from cdi_hook import inotify as ino
from cdi_hook.commands import generate
from cdi_hook.errors import CdiError, printable
from cdi_hook.hostscan import Scanner

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from types import FrameType
    from typing import NoReturn

DEBOUNCE_S = 0.05  # udev makes a node, then its links: one regeneration for the lot...
MAX_DELAY_S = 0.5  # ...but never later than this after the first event
DIR_MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_ATTRIB
            | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)


class _Stop(Exception):
    """SIGTERM or SIGINT."""


def log(message: str) -> None:
    print(f"cdi-hook watch --generate: {printable(message)}", file=sys.stderr, flush=True)


class Hotplug:
    def __init__(self, request: generate.Request, scanner: Scanner, output: str):
        self.request = request._replace(allow_empty=True)  # a device unplugged is no error here
        self.scanner = scanner
        self.output = output
        self.inotify = ino.Inotify()
        self.watched: dict[str, int] = {}  # folder -> watch descriptor
        self.warnings: list[str] = []
        self.last_error = ""

    def watch_tree(self) -> None:
        """Watch dev_root and every folder below it not watched yet (links not followed):
        a new folder (/dev/serial/by-id, made with the first adapter) is watched when its
        parent's event says it came."""
        for here, dirs, _ in os.walk(self.scanner.dev_root):
            if here in self.watched:
                continue
            try:
                self.watched[here] = self.inotify.add_watch(here, DIR_MASK)
            except OSError:
                dirs.clear()  # gone again, or not a folder any more: its parent's event says so

    def forget(self, wd: int, moved: bool) -> None:
        """A watched folder went (IN_IGNORED) or moved away (IN_MOVE_SELF): its path may hold
        a new folder, which watch_tree must watch. A moved folder's watches, and those of the
        folders it took along, are dropped (they now watch a place outside /dev's names)."""
        path = next((p for p, w in self.watched.items() if w == wd), None)
        if path is None:
            return
        for gone in [p for p in self.watched if p == path or (moved and p.startswith(path + "/"))]:
            old = self.watched.pop(gone)
            if moved:
                self.inotify.rm_watch(old)

    def regenerate(self) -> None:
        # SIGTERM waits until the spec is written and said so: a stop between the write and
        # its log line would leave a change nobody was told of.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            self._regenerate()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def _regenerate(self) -> None:
        warnings: list[str] = []
        try:
            spec, changed = generate.generate(self.request, self.scanner, self.output, warnings.append)
        except CdiError as error:
            if str(error) != self.last_error:
                log(f"error, {self.output} left as it was: {error}")
                self.last_error = str(error)
            return
        self.last_error = ""
        for line in warnings:
            if line not in self.warnings:
                log(f"warning: {line}")
        self.warnings = warnings
        if changed:
            names = [device.name for device in spec.devices] if spec is not None else []
            log(f"{self.output}: " + (f"written, {len(names)} device(s): {', '.join(names)}" if names
                                      else "removed, no device matches"))

    def run(self, rescan_interval: float) -> int:
        def stop(signum: int, frame: FrameType | None) -> NoReturn:
            raise _Stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log(f"watching {self.scanner.dev_root} for {self.request.source}, writing {self.output}")
        try:
            self.watch_tree()
            self.regenerate()
            next_scan = time.monotonic() + rescan_interval
            first_event = None
            while True:
                now = time.monotonic()
                if first_event is not None:
                    timeout = max(0.0, min(DEBOUNCE_S, first_event + MAX_DELAY_S - now))
                else:
                    timeout = max(0.0, next_scan - now)
                ready, _, _ = select.select([self.inotify], [], [], timeout)
                if ready:
                    events = self.inotify.read_events()
                    if events:
                        first_event = first_event or time.monotonic()
                        if any(mask & (ino.IN_ISDIR | ino.IN_Q_OVERFLOW) for _, mask, _ in events):
                            self.watch_tree()
                        for wd, mask, _ in events:
                            if mask & (ino.IN_IGNORED | ino.IN_MOVE_SELF):
                                self.forget(wd, moved=bool(mask & ino.IN_MOVE_SELF))
                        if time.monotonic() - first_event < MAX_DELAY_S:
                            continue  # not quiet yet
                if first_event is not None or time.monotonic() >= next_scan:
                    self.watch_tree()  # a folder made between its event and our watch
                    self.regenerate()
                    first_event = None
                    next_scan = time.monotonic() + rescan_interval
        except _Stop:
            log("stopped")
            return 0
        finally:
            self.inotify.close()


def cmd_watch_generate(args: argparse.Namespace) -> int:
    request = generate.load_request(args.generate)
    output = args.output or request.output
    if not output:
        raise CdiError(f"watch --generate {args.generate}: no output: give --output FILE or `output:` in the file")
    if not 0 < args.rescan_interval <= 86400:
        raise CdiError(f"--rescan-interval {args.rescan_interval}: must be more than 0 and at most 86400 seconds")
    if not os.path.isdir(args.dev_root):
        raise CdiError(f"--dev-root {args.dev_root}: not a folder")
    return Hotplug(request, Scanner(args.dev_root, args.sys_root), output).run(args.rescan_interval)
