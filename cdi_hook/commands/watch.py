"""`cdi-hook watch`: keep the compiled spec cache current, and let hook starts skip the
per-file checks while it runs.

A long-running process (deploy/systemd/cdi-hook-watch.service) that watches the spec dirs
with inotify: files created, written, closed after writing, removed, renamed in or out,
their owner and mode; each spec file's own inode too (a write through another hard link);
the dirs themselves being replaced; dirs that appear later (the nearest existing parent is
watched for them); mounts on or above them (/proc/self/mountinfo). Every change it sees
moves the generation in its generation file (cache.watched_generation reads it) at once,
before anything else; then a rebuild, in a child process (the parent stays small), compiles
the cache anew for a generation set just before it looked at the files, and the cache is
put in place only if no change came in meanwhile.

What a hook start gets (cache.py has the reasoning): while this process holds the flock on
its generation file and its heartbeat is fresh, a start whose cache was recorded at the
current generation uses it without a stat per spec file; any other start checks every
file as without a watcher. So a spec change is used by every container whose hook starts
after the watcher has seen the change (read its inotify event and written the new
generation: normally well under a millisecond after the write); a watcher that dies stops
being trusted at once (the kernel drops its lock), one that hangs after
cache.HEARTBEAT_TIMEOUT_NS. The watcher vouches only while every spec file is a regular
file: a symlinked spec (whose target inotify cannot follow reliably) makes it write the
"no trust" generation, and every start checks the files.

Readiness: with $NOTIFY_SOCKET (systemd Type=notify) it sends READY=1 once the first cache
is in place, WATCHDOG=1 with each heartbeat when $WATCHDOG_USEC is set, STOPPING=1 on
SIGTERM or SIGINT, after which it removes its generation file and exits 0.
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time

from cdi_hook import cache, state
from cdi_hook import inotify as ino
from cdi_hook.errors import CdiError, printable
from cdi_hook.live import mountinfo
from cdi_hook.settings import CACHE_DIR_ENV

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from types import FrameType
    from typing import NoReturn

NO_TRUST = bytes(16)  # the generation written while the watcher cannot vouch for the files
DEBOUNCE_S = 0.05  # a rebuild starts once the files were quiet this long...
MAX_DELAY_S = 1.0  # ...or this long after the first change it covers
# Records of containers that ended with no poststop of cdi-hook's to come (inject --mode hook
# writes none for devices with nothing to do then) are removed this often (record.prune).
PRUNE_INTERVAL_S = 60.0
SELF_EVENTS = ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_IGNORED | ino.IN_UNMOUNT
DIR_MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_MODIFY
            | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)
PARENT_MASK = (ino.IN_CREATE | ino.IN_DELETE | ino.IN_MOVED_FROM | ino.IN_MOVED_TO | ino.IN_ATTRIB
               | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF | ino.IN_ONLYDIR)
FILE_MASK = ino.IN_MODIFY | ino.IN_CLOSE_WRITE | ino.IN_ATTRIB | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
SPEC_DIR, PARENT, SPEC_FILE = "dir", "parent", "file"

REBUILD = """
import sys
from cdi_hook.commands.watch import rebuild
rebuild(bytes.fromhex(sys.argv[1]), tuple(sys.argv[2:]))
"""


class _Stop(Exception):
    """SIGTERM or SIGINT: leave the loop and clean up."""


def cmd_watch(args: argparse.Namespace, spec_dirs: Sequence[str] | None) -> int:
    if os.geteuid() != 0:
        raise CdiError("watch: must run as root (the cache it keeps is root's)")
    watcher = Watcher(cache.spec_dir_tuple(spec_dirs))
    return watcher.run()


def log(message: str) -> None:
    print(f"cdi-hook watch: {printable(message)}", file=sys.stderr, flush=True)


class Watcher:
    def __init__(self, dirs: tuple[str, ...]):
        self.dirs = dirs
        path = cache.generation_path(dirs)
        if path is None:
            raise CdiError(f"watch: {CACHE_DIR_ENV} must be an absolute path")
        self.path = path
        self.inotify = ino.Inotify()
        self.watches: dict[int, tuple[str, str]] = {}  # wd -> (kind, the name that matters / the path)
        self.file_inodes: dict[str, tuple[int, int]] = {}  # spec file path -> (st_dev, st_ino) watched
        self.generation = NO_TRUST
        self.gen_fd = -1
        self.mounts: list = []
        self.dirty_since: float | None = None  # a change not yet covered by a rebuild
        self.last_change = 0.0
        self.child: subprocess.Popen[bytes] | None = None
        self.child_generation = NO_TRUST
        self.ready = False
        self.vouching = True

    # -- the generation file ------------------------------------------------------------

    def take_generation_file(self) -> None:
        """A fresh file, flock'ed before it is renamed into place: a hook never sees it
        unlocked, nor this watcher's lock on a file holding an older watcher's generation."""
        import fcntl

        state.ensure_private_dir(os.path.dirname(self.path))
        try:
            old = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            pass
        else:
            try:
                fcntl.flock(old, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CdiError(f"watch: another cdi-hook watch holds {self.path} for these spec dirs") from None
            finally:
                os.close(old)
        fd, temp = state.new_file_beside(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.pwrite(fd, cache.generation_content(self.dirs, NO_TRUST), 0)
            state.rename_into_place(temp, self.path)  # the fd stays open: its flock says the watcher lives
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        self.gen_fd = fd

    def set_generation(self, generation: bytes) -> None:
        # The same length every time (the dirs do not change): a rewrite in place leaves no tail.
        os.pwrite(self.gen_fd, cache.generation_content(self.dirs, generation), 0)
        self.generation = generation
        os.utime(self.gen_fd)  # and a heartbeat

    def still_ours(self) -> bool:
        try:
            st, mine = os.lstat(self.path), os.fstat(self.gen_fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release_generation_file(self) -> None:
        if self.gen_fd < 0:
            return
        if self.still_ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.gen_fd)
        self.gen_fd = -1

    # -- what is watched ----------------------------------------------------------------

    def arm(self) -> None:
        """Watch each spec dir, or its nearest existing parent, and every parent above it."""
        for wd in list(self.watches):
            self.inotify.rm_watch(wd)
        self.watches.clear()
        self.file_inodes.clear()
        for spec_dir in self.dirs:
            path = os.path.normpath(os.path.abspath(spec_dir))
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts) + 1):
                here = "/" + "/".join(parts[:depth])
                is_dir = depth == len(parts)
                try:
                    wd = self.inotify.add_watch(here, DIR_MASK if is_dir else PARENT_MASK)
                except OSError:
                    break  # missing (its parent's watch sees it appear) or not a directory
                self.watches[wd] = (SPEC_DIR, here) if is_dir else (PARENT, parts[depth])
        self.mounts = self.relevant_mounts()

    def watch_files(self) -> bool:
        """A watch on every spec file's inode (a write through another link is seen); True
        when every spec file is a regular file, so the watcher can vouch for them."""
        vouch = True
        for spec_dir in self.dirs:
            try:
                names = [n for n in os.listdir(spec_dir) if n.endswith(cache.SPEC_SUFFIXES)]
            except FileNotFoundError:
                continue
            except OSError:
                return False
            for name in names:
                path = os.path.join(spec_dir, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        vouch = False  # a symlink (or a folder named like a spec)
                        continue
                    if self.file_inodes.get(path) == (st.st_dev, st.st_ino):
                        continue  # watched already (one lstat per file: this runs in the event loop)
                    wd = self.inotify.add_watch(path, FILE_MASK)
                except OSError:
                    return False  # gone meanwhile (its event is queued) or out of watches
                self.watches.setdefault(wd, (SPEC_FILE, path))
                self.file_inodes[path] = (st.st_dev, st.st_ino)
        return vouch

    def relevant_mounts(self) -> list:
        """The mounts on a spec dir, under one, or on one of their parents (as written or
        with symlinks resolved): a new or removed one changes what the paths show."""
        on, under = set(), []
        for spec_dir in self.dirs:
            for path in {os.path.normpath(os.path.abspath(spec_dir)), os.path.realpath(spec_dir)}:
                under.append(path.rstrip("/") + "/")
                while True:
                    on.add(path)
                    if path == "/":
                        break
                    path = os.path.dirname(path)
        try:
            mounts = mountinfo.read()
        except OSError:
            return [None]  # unreadable: compare unequal to anything, so a change is assumed
        prefixes = tuple(under)
        return sorted((m.mount_point, m.mount_id, m.major, m.minor, m.root) for m in mounts
                      if m.mount_point in on or m.mount_point.startswith(prefixes))

    # -- events -------------------------------------------------------------------------

    def handle(self, events: list[tuple[int, int, str]]) -> None:
        changed = rearm = False
        for wd, mask, name in events:
            if mask & ino.IN_Q_OVERFLOW:
                changed = rearm = True
                continue
            kind, what = self.watches.get(wd, (None, ""))
            if kind is None:
                continue  # a watch removed since
            if kind == SPEC_FILE:
                if mask & ino.IN_IGNORED:
                    self.watches.pop(wd, None)
                    self.file_inodes.pop(what, None)
                changed = True
            elif kind == SPEC_DIR:
                if mask & SELF_EVENTS:
                    changed = rearm = True
                elif not name or name.endswith(cache.SPEC_SUFFIXES):
                    changed = True
            elif mask & SELF_EVENTS or name == what:
                changed = rearm = True
        if changed:
            self.change_seen(rearm)

    def change_seen(self, rearm: bool) -> None:
        # First of all: hooks stop trusting any cache. The next rebuild vouches again, with a
        # new generation, once it has watched the files as they are now (a new file's inode
        # included) and before it looks at them.
        if self.generation != NO_TRUST:
            self.set_generation(NO_TRUST)
        if rearm:
            self.arm()
        now = time.monotonic()
        self.last_change = now
        if self.dirty_since is None:
            self.dirty_since = now

    def mounts_changed(self) -> None:
        mounts = self.relevant_mounts()
        if mounts != self.mounts:
            self.change_seen(rearm=True)

    # -- rebuilding ---------------------------------------------------------------------

    def rebuild_due(self, now: float) -> bool:
        return (self.child is None and self.dirty_since is not None
                and (now - self.last_change >= DEBOUNCE_S or now - self.dirty_since >= MAX_DELAY_S))

    def start_rebuild(self) -> None:
        self.dirty_since = None
        vouch = self.watch_files()
        if vouch != self.vouching:
            self.vouching = vouch
            if not vouch:
                log("not vouching for the spec files (a symlinked spec, or no inotify watch left): "
                    "every start checks them")
        # Set before the child looks at the files: a change after this moves it again.
        self.set_generation(os.urandom(16) if vouch else NO_TRUST)
        self.child_generation = self.generation
        self.child = subprocess.Popen([sys.executable, "-I", "-c", REBUILD, self.generation.hex(), *self.dirs],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd="/")

    def finish_rebuild(self) -> None:
        child, self.child = self.child, None
        assert child is not None and child.stdout is not None  # start_rebuild started it, stdout a pipe
        output = child.stdout.read().decode(errors="replace").split("\n")[0]
        child.stdout.close()
        code = child.wait()
        temp, _, target = output.partition("\t")
        if code == 0 and output == "~":
            # a spec was being written: no trust until a later rebuild reads it settled
            if self.generation != NO_TRUST:
                self.set_generation(NO_TRUST)
            self.last_change = time.monotonic()
            self.dirty_since = self.dirty_since or self.last_change
        elif code != 0 or not output:
            log(f"rebuilding the cache failed (exit status {code}); starts check every spec file")
            if self.generation != NO_TRUST:
                self.set_generation(NO_TRUST)
        elif target and self.generation == self.child_generation:
            state.rename_into_place(temp, target)  # still current: no change came in while it looked
        elif target:
            os.unlink(temp)  # a change came in: the next rebuild covers it
        if not self.ready:
            self.ready = True
            sd_notify("READY=1")
            log(f"watching {', '.join(self.dirs)} (generation file {self.path}); ready")

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        def stop(signum: int, frame: FrameType | None) -> NoReturn:
            raise _Stop()

        old_handlers = [signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)]
        mount_table = open(mountinfo.path(), "rb")  # POLLPRI when a mount comes or goes
        try:
            self.take_generation_file()
            self.arm()
            self.dirty_since = self.last_change = time.monotonic() - MAX_DELAY_S
            poller = select.poll()
            poller.register(self.inotify.fileno(), select.POLLIN)
            poller.register(mount_table.fileno(), select.POLLPRI | select.POLLERR)
            watchdog = _watchdog_interval()
            next_beat = next_prune = time.monotonic()
            while True:
                now = time.monotonic()
                if self.rebuild_due(now):
                    self.start_rebuild()
                    assert self.child is not None and self.child.stdout is not None
                    poller.register(self.child.stdout.fileno(), select.POLLIN | select.POLLHUP)
                if now >= next_beat:
                    if not self.still_ours():
                        raise CdiError(f"watch: {self.path} was replaced (another watcher?)")
                    os.utime(self.gen_fd)
                    if watchdog:
                        sd_notify("WATCHDOG=1")
                    next_beat = now + cache.HEARTBEAT_NS / 1e9
                    if now >= next_prune:
                        prune_records()
                        next_prune = now + PRUNE_INTERVAL_S
                wait = next_beat - now
                if self.dirty_since is not None and self.child is None:
                    wait = min(wait, max(0.0, min(self.last_change + DEBOUNCE_S, self.dirty_since + MAX_DELAY_S) - now))
                for fd, _ in poller.poll(max(1, int(wait * 1000))):
                    if fd == self.inotify.fileno():
                        self.handle(self.inotify.read_events())
                    elif fd == mount_table.fileno():
                        self.mounts_changed()
                    elif self.child is not None and self.child.stdout is not None and fd == self.child.stdout.fileno():
                        poller.unregister(fd)
                        self.finish_rebuild()
        except _Stop:
            sd_notify("STOPPING=1")
            return 0
        finally:
            if self.child is not None:
                self.child.kill()
                self.child.wait()
            self.release_generation_file()
            self.inotify.close()
            mount_table.close()
            for s, handler in zip((signal.SIGTERM, signal.SIGINT), old_handlers):
                signal.signal(s, handler)


def prune_records() -> None:
    """record.prune, said in the watcher's log; a records folder that went wrong is said too,
    and watching goes on."""
    from cdi_hook import record

    try:
        removed = record.prune()
    except (CdiError, OSError) as error:  # OSError: a records folder on a failing disk
        log(f"pruning container records: {error}")
        return
    if removed:
        log(f"removed the records of {len(removed)} ended container(s) no poststop comes for")


def rebuild(generation: bytes, dirs: tuple[str, ...]) -> None:
    """In the child: compile the cache for the files as they are now, into a temp file; print
    "temp<TAB>cache path" for the watcher, which renames it if its generation is still this."""
    from cdi_hook import registry

    key = cache._key(dirs, registry)
    listing = cache.snapshot(dirs)
    loaded = registry.Registry.load(dirs)
    if loaded.being_written:
        # A spec still being written (in place) when the load's settle budget ran out: no
        # cache that calls it broken is vouched for; the watcher tries again shortly.
        print("~", flush=True)
        return
    settled = cache.is_settled(listing)
    if not settled and generation == NO_TRUST:
        print("-", flush=True)  # neither a listing nor a generation to vouch for it: nothing to keep
        return
    data = cache.encode(key, listing if settled else None, loaded, generation if generation != NO_TRUST else None)
    target = cache.cache_path(key)
    state.ensure_private_dir(os.path.dirname(target))
    fd, temp = state.new_file_beside(target)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    print(f"{temp}\t{target}", flush=True)


def sd_notify(message: str) -> None:
    """sd_notify(3) over $NOTIFY_SOCKET with a plain datagram socket; nothing without it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    import socket

    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as error:
        log(f"cannot notify systemd ({message}): {error.strerror}")


def _watchdog_interval() -> bool:
    """Whether systemd wants WATCHDOG=1 pings (WatchdogSec=) from this process."""
    pid = os.environ.get("WATCHDOG_PID")
    return bool(os.environ.get("WATCHDOG_USEC")) and (not pid or pid == str(os.getpid()))

