"""The live work of `cdi-hook attach`, `detach` and `verify` in a container that runs.

The rootfs work is done as the hook does it (live/worker.py), by a forked child: it clones
host sources while still in the host's mount namespace, setns()'s into the container's
mount namespace through the pinned pidfd, and opens "/" there: after the runtime's
pivot_root the root of that namespace is the container's root, so every path is resolved
from that fd with openat2 RESOLVE_IN_ROOT (live/rootfs.py) and the nodes, mounts and the
loader cache are made by live/devices.py, live/mounts.py and live/ldcache.py, the hook's
own code. attach keeps the child's undo journal until the parent's verdict: the device
cgroup (written by the parent, on the host) and the record must succeed too, or the child
undoes everything and the cgroup gets its earlier rules back.

The device cgroup: v1 rules are written to devices.allow / devices.deny; under v2 the
attached programs are replaced with ones whose cdi-hook prologue (live/bpf.py) allows
exactly the devices wanted, and the runtime's own code after it stays as it was. verify
reads v1's devices.list, and under v2 runs the attached programs on the device in a small
interpreter (live/bpf_eval.py) of the eBPF instructions the kernel reports.
"""

from __future__ import annotations

import os
import signal
import stat

from cdi_hook import jsonio
from cdi_hook.errors import CdiError, HookError
from cdi_hook.live import bpf, bpf_eval, cgroups, devices, ldcache, mountinfo, mounts, syscalls
from cdi_hook.live.rootfs import Rootfs
from cdi_hook.live.syscalls import mount_id

# --- the child in the container's mount namespace ----------------------------------------


# How long the parent waits for each report of the worker. The worker is in the container's
# pid namespace, where the container's root can stop it (SIGSTOP): no report ever comes.
WORKER_DEADLINE_S = 30.0


class _Child:
    def __init__(self, pid: int, report_fd: int, verdict_fd: int):
        self.pid = pid
        self._report_fd = report_fd
        self._verdict_fd = verdict_fd
        self._buffer = b""
        self._stopped = False

    def read(self) -> dict:
        """The worker's next report; when none comes before the deadline, the child and its
        worker (one process group) are killed and the answer is a failure saying so."""
        if self._stopped:
            return {"ok": False, "error": "the worker in the container stopped answering"}
        import select
        import time

        deadline = time.monotonic() + WORKER_DEADLINE_S
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._report_fd], [], [], left)[0]:
                self._kill()
                return {"ok": False, "error": f"the worker in the container stopped answering for "
                        f"{WORKER_DEADLINE_S:g} s (the container may have stopped it); killed it; "
                        "it may have left nodes or mounts in the container's rootfs"}
            chunk = os.read(self._report_fd, 65536)
            if not chunk:
                break
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            return jsonio.loads(line)
        except ValueError:
            return {"ok": False, "error": "the worker in the container died without a report"}

    def _kill(self) -> None:
        self._stopped = True
        try:
            os.killpg(self.pid, signal.SIGKILL)  # SIGKILL ends a stopped process too
        except OSError:
            pass

    def verdict(self, commit: bool) -> dict:
        try:
            os.write(self._verdict_fd, b"c" if commit else b"r")
        except OSError:
            pass
        return self.read()

    def close(self) -> None:
        os.close(self._report_fd)
        os.close(self._verdict_fd)
        os.waitpid(self.pid, 0)


def _fork(pidfd: int, prepare, work) -> _Child:
    """Run prepare() in a child on the host side (clones of host sources are taken in the
    host's mount namespace), then work(prepared, send, wait_verdict) in the container.

    The work runs in a grandchild that is in the container's mount AND pid namespaces: after
    pivot_root, /proc there is the container's procfs, where only a process of its pid
    namespace finds /proc/self, which the fd-relative code needs (fd paths, fdinfo,
    mountinfo). Whatever either raises is reported as one line.

    Both are non-dumpable, as runc makes runc init (CVE-2016-9962): the container's root, in
    whose pid namespace the worker is, cannot ptrace it or open its /proc entries (its fds
    are the host's). Both are one process group, which the parent kills when the worker
    stops answering (_Child.read)."""
    report_r, report_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    try:
        pid = os.fork()
    except OSError as error:
        for fd in (report_r, report_w, verdict_r, verdict_w):
            os.close(fd)
        raise HookError("start the worker", "", f"fork: {error.strerror}") from None
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            os.close(report_r)
            os.close(verdict_w)

            def send(doc: dict) -> None:
                os.write(report_w, (jsonio.dumps(doc) + "\n").encode())

            try:
                import prctl

                prctl.set_dumpable(False)  # before setns: never visible to the container while dumpable
                prepared = prepare()
                _preload()
                try:
                    syscalls.setns(pidfd, syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID)
                except OSError as error:
                    raise HookError("enter container", "", f"setns into its namespaces: {error.strerror}") from None
                worker = os.fork()
                if worker == 0:
                    try:
                        work(prepared, send, lambda: os.read(verdict_r, 1))
                        code = 0
                    except CdiError as error:
                        send({"ok": False, "error": " ".join(str(error).split())})
                    except BaseException as error:  # noqa: BLE001 - a bug must still report, not hang the parent
                        send({"ok": False, "error": f"internal error: {error!r}"})
                    finally:
                        os._exit(code)
                _, status = os.waitpid(worker, 0)
                code = os.waitstatus_to_exitcode(status)
                if code < 0:
                    send({"ok": False, "error": f"the worker in the container was killed by signal {-code}"})
            except CdiError as error:
                send({"ok": False, "error": " ".join(str(error).split())})
            except BaseException as error:  # noqa: BLE001
                send({"ok": False, "error": f"internal error: {error!r}"})
        finally:
            os._exit(max(code, 0))
    try:
        os.setpgid(pid, pid)  # as the child does itself: whichever runs first
    except OSError:
        pass
    os.close(report_w)
    os.close(verdict_r)
    return _Child(pid, report_r, verdict_w)


def _preload() -> None:
    """Import now what the work imports lazily: after setns the container's root is ours,
    and the interpreter's modules are on the host (ldconfig's confinement: ldcache._run_chrooted)."""
    import resource  # noqa: F401

    try:
        import prctl  # noqa: F401
    except ImportError:
        pass  # ldcache says so itself when it needs it


def _enter(creator_ids=None) -> Rootfs:
    # setns made the namespace's root ours: after pivot_root, the container's root.
    return Rootfs.open("/", creator_ids)


def path_and_parents(paths) -> list[str]:
    """Every path and each of its parents, parents first, each once (normalised, absolute)."""
    found: dict[str, None] = {}
    for path in paths:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for i in range(1, len(parts) + 1):
            found.setdefault("/" + "/".join(parts[:i]), None)
    return sorted(found, key=lambda p: p.count("/"))


# --- attach -------------------------------------------------------------------------------


class AttachWork:
    def __init__(self, node_jobs, mount_jobs, library_dirs, libraries: str, by_bind_mount: bool, creator_ids):
        self.node_jobs = node_jobs
        self.mount_jobs = mount_jobs
        self.library_dirs = library_dirs  # every mounted library's folder, old and new: the conf lists them all
        self.libraries = libraries  # the attached devices that bring libraries ("" for none)
        self.by_bind_mount = by_bind_mount
        self.creator_ids = creator_ids


def start_attach(pidfd: int, work: AttachWork) -> _Child:
    """Fork the child that makes nodes, mounts and the loader cache; its first report is
    {"ok", "notes", "created"} or {"ok": false, "error"} (then it has undone its work)."""

    def prepare():
        devices.clone_host_nodes(work.node_jobs)
        mounts.clone_sources(work.mount_jobs)
        return ldcache.open_host_ldconfig() if work.libraries else None

    def body(ldconfig_fd, send, wait_verdict) -> None:
        mounted: list[int] = []
        notes: list[str] = []
        rootfs = None

        def undo() -> list[str]:
            problems = mounts.unmount_all(mounted)
            return problems + (rootfs.undo() if rootfs is not None else [])

        try:
            rootfs = _enter(work.creator_ids)
            watched = path_and_parents([j.node.path for j in work.node_jobs]
                                       + [j.mount.container_path for j in work.mount_jobs])
            missing = [p for p in watched if not ldcache.exists(rootfs, p)]
            devices.create_nodes(rootfs, work.node_jobs, work.by_bind_mount, mounted, notes)
            mounts.apply(rootfs, work.mount_jobs, mounted, notes)
            if work.libraries:
                ldcache.update(rootfs, work.library_dirs, ldconfig_fd, notes, device=work.libraries)
            created = [p for p in missing if ldcache.exists(rootfs, p)]
        except BaseException as error:
            problems = undo()
            note = f" (undo incomplete: {'; '.join(problems)})" if problems else ""
            text = " ".join(str(error).split()) if isinstance(error, CdiError) else f"internal error: {error!r}"
            send({"ok": False, "error": text + note})
            return
        send({"ok": True, "notes": notes, "created": created})
        if wait_verdict() == b"c":
            for fd in mounted:
                os.close(fd)
            rootfs.forget()
            send({"ok": True, "problems": []})
        else:
            send({"ok": True, "problems": undo()})

    return _fork(pidfd, prepare, body)


# --- detach -------------------------------------------------------------------------------


class DetachWork:
    def __init__(self, nodes, mounts_, created, library_dirs, rebuild_cache: bool, libraries: str, creator_ids):
        self.nodes = nodes  # [(device, path, type, rdev, remove)]: remove False = unmount only, never unlink
        self.mounts = mounts_  # [(device, destination, (st_dev, st_ino) of the host source or None, fstype)]
        self.created = created  # paths attach created (mount points, folders): removed when empty
        self.library_dirs = library_dirs  # the folders still holding mounted libraries
        self.rebuild_cache = rebuild_cache
        self.libraries = libraries
        self.creator_ids = creator_ids  # as AttachWork's: the rewritten conf file is the container root's


def run_detach(pidfd: int, work: DetachWork) -> dict:
    """{"ok", "notes", "problems"} (or {"ok": false, "error"}): best effort, every problem named."""

    def prepare():
        return ldcache.open_host_ldconfig() if work.rebuild_cache else None

    def body(ldconfig_fd, send, _wait) -> None:
        notes: list[str] = []
        problems: list[str] = []
        rootfs = _enter(work.creator_ids)
        for device, where, source, fstype in sorted(work.mounts, key=lambda m: -m[1].count("/")):
            _unmount(rootfs, device, where, source, fstype, notes, problems)
        for device, path, kind, rdev, remove in work.nodes:
            _remove_node(rootfs, device, path, kind, rdev, remove, notes, problems)
        for path in reversed(work.created):
            _remove_if_empty(rootfs, path, notes)
        if work.rebuild_cache:
            try:
                ldcache.update(rootfs, work.library_dirs, ldconfig_fd, notes, device=work.libraries, rebuild=True)
            except CdiError as error:
                problems.append(str(error))
            rootfs.forget()
        send({"ok": True, "notes": notes, "problems": problems})

    child = _fork(pidfd, prepare, body)
    try:
        return child.read()
    finally:
        child.close()


def _is_mount_point(rootfs: Rootfs, fd: int, where: str) -> bool:
    """Whether fd (where, opened in rootfs) is on another mount than its parent folder."""
    parent_fd = rootfs.open_path(_split(where)[0])
    try:
        return mount_id(fd) != mount_id(parent_fd)
    finally:
        os.close(parent_fd)


def _split(path: str) -> tuple[str, str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts[:-1]) or ".", parts[-1] if parts else ""


def _unmount(rootfs: Rootfs, device: str, where: str, source, fstype: str, notes, problems) -> None:
    try:
        fd = rootfs.open_path(where)
    except OSError as error:
        problems.append(f"{device}: mount {where}: {error.strerror}")
        return
    try:
        if not _is_mount_point(rootfs, fd, where):
            notes.append(f"{device}: {where} is not mounted")
            return
        st = os.fstat(fd)
        mounted_type = _mount_types().get(mount_id(fd))
        if source is not None and (st.st_dev, st.st_ino) != tuple(source):
            problems.append(f"{device}: mount {where}: what is mounted there is not the device's source; left alone")
            return
        if source is None and mounted_type != fstype:
            problems.append(f"{device}: mount {where}: a {mounted_type} is mounted there, not {fstype}; left alone")
            return
        syscalls.umount2(syscalls.fd_path(fd), syscalls.MNT_DETACH)
        notes.append(f"{device}: unmounted {where}")
    except OSError as error:
        problems.append(f"{device}: mount {where}: {error.strerror}")
    finally:
        os.close(fd)


def _mount_types() -> dict[int, str]:
    return {mount.mount_id: mount.fs_type for mount in mountinfo.read()}


def _resolved_entry(rootfs: Rootfs, path: str):
    """(fd of the parent folder, name, stat) of the entry path leads to inside the rootfs, its
    symlinks followed in-root as attach followed them; None when there is none. The entry is
    found again by name in its folder and must be the same inode: what is removed by name
    afterwards is the entry checked, in a folder of the container's."""
    try:
        fd = rootfs.open_path(path)
    except OSError:
        return None
    try:
        real = os.readlink(syscalls.fd_path(fd))  # our root is the container's: a path inside it
        st = os.fstat(fd)
        folder, name = _split(real)
        if not name or not real.startswith("/"):
            return None
        parent_fd = rootfs.open_path(folder, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        again = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except OSError:
        os.close(parent_fd)
        return None
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        os.close(parent_fd)
        return None
    return parent_fd, name, st


def _remove_node(rootfs: Rootfs, device: str, path: str, kind: str, rdev: int, remove: bool, notes, problems) -> None:
    found = _resolved_entry(rootfs, path)
    if found is None:
        notes.append(f"{device}: node {path} was gone already")
        return
    parent_fd, name, st = found
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            if mount_id(fd) != mount_id(parent_fd):  # the host node bind-mounted (user namespace)
                syscalls.umount2(syscalls.fd_path(fd), syscalls.MNT_DETACH)
                notes.append(f"{device}: unmounted the host node on {path}")
                return
        finally:
            os.close(fd)
        if stat.S_IFMT(st.st_mode) != devices._S_IFMT[kind] or (kind != "p" and st.st_rdev != rdev):
            problems.append(f"{device}: node {path} is not the {kind} {os.major(rdev)}:{os.minor(rdev)} device "
                            "any more; left alone")
            return
        if not remove:
            notes.append(f"{device}: node {path} was there before it was attached; left alone")
            return
        os.unlink(name, dir_fd=parent_fd)
        notes.append(f"{device}: removed node {path}")
    except OSError as error:
        problems.append(f"{device}: node {path}: {error.strerror}")
    finally:
        os.close(parent_fd)


def _remove_if_empty(rootfs: Rootfs, path: str, notes) -> None:
    """A mount point or folder attach made: removed when it is still an empty dir or file."""
    found = _resolved_entry(rootfs, path)
    if found is None:
        return
    parent_fd, name, st = found
    try:
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(name, dir_fd=parent_fd)
        elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
            os.unlink(name, dir_fd=parent_fd)
        else:
            return
        notes.append(f"removed {path}, which attach had made")
    except OSError:
        pass  # in use, not empty, or gone: the container's now
    finally:
        os.close(parent_fd)


# --- verify -------------------------------------------------------------------------------


def check_rootfs(pidfd: int, plan, node_owner, host_sources: dict) -> list[dict]:
    """{device, item, ok, detail} for every node, mount and mounted library of the plan, seen
    from inside the container. host_sources: host path -> (st_dev, st_ino), taken on the host."""

    def body(_, send, _wait) -> None:
        rootfs = _enter()
        checks = []
        for planned in plan.nodes:
            checks.append(_check_node(rootfs, planned, node_owner(planned)))
        types = _mount_info()
        for origin, mount in plan.mounts:
            checks.append(_check_mount(rootfs, origin, mount, host_sources.get(mount.host_path), types))
        libraries = [(origin, m.container_path) for origin, m in plan.mounts
                     if ldcache.is_library_name(m.container_path) and _is_bind(m)]
        if libraries:
            listed = _cache_paths(rootfs)
            for origin, path in libraries:
                ok = listed is not None and os.path.normpath(path) in listed
                detail = "listed" if ok else ("the container has no readable etc/ld.so.cache" if listed is None
                                              else "not in etc/ld.so.cache")
                checks.append({"device": origin, "item": f"ld cache {path}", "ok": ok, "detail": detail})
        send({"ok": True, "checks": checks})

    child = _fork(pidfd, lambda: None, body)
    try:
        report = child.read()
    finally:
        child.close()
    if not report.get("ok"):
        raise CdiError(report.get("error") or "verify: the worker in the container failed")
    return report["checks"]


def _is_bind(mount) -> bool:
    return mount.type in ("", "bind", "rbind") or bool({"bind", "rbind"} & set(mount.options))


def _check_node(rootfs: Rootfs, planned, owner) -> dict:
    node = planned.node
    item = f"node {node.path}"

    def result(ok: bool, detail: str) -> dict:
        return {"device": planned.origin, "item": item, "ok": ok, "detail": detail}

    try:
        fd = rootfs.open_path(node.path)
    except FileNotFoundError:
        return result(False, "missing")
    except OSError as error:
        return result(False, error.strerror)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    want_fmt = devices._S_IFMT[node.type]
    if stat.S_IFMT(st.st_mode) != want_fmt:
        return result(False, f"not a {node.type} node")
    if node.type != "p" and st.st_rdev != os.makedev(node.major or 0, node.minor or 0):
        return result(False, f"device {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, not {node.major}:{node.minor}")
    problems = []
    if node.file_mode is not None and stat.S_IMODE(st.st_mode) != stat.S_IMODE(node.file_mode):
        problems.append(f"mode {stat.S_IMODE(st.st_mode):o}, not {stat.S_IMODE(node.file_mode):o}")
    if (st.st_uid, st.st_gid) != owner:
        problems.append(f"owner {st.st_uid}:{st.st_gid}, not {owner[0]}:{owner[1]}")
    if problems:
        return result(False, "; ".join(problems))
    return result(True, f"{node.type} {node.major}:{node.minor} {stat.S_IMODE(st.st_mode):o} {owner[0]}:{owner[1]}")


def _mount_info() -> dict[int, tuple[list[str], str]]:
    """mount id -> (its per-mount options, fs type), of this (the container's) namespace."""
    return {mount.mount_id: (mount.options.split(","), mount.fs_type) for mount in mountinfo.read()}


def _check_mount(rootfs: Rootfs, origin: str, mount, source, types) -> dict:
    where = mount.container_path
    item = f"mount {where}"

    def result(ok: bool, detail: str) -> dict:
        return {"device": origin, "item": item, "ok": ok, "detail": detail}

    try:
        fd = rootfs.open_path(where)
    except FileNotFoundError:
        return result(False, "missing")
    except OSError as error:
        return result(False, error.strerror)
    try:
        if not _is_mount_point(rootfs, fd, where):
            return result(False, "not mounted")
        options, fstype = types.get(mount_id(fd), ([], "?"))
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if _is_bind(mount):
        if source is None:
            return result(False, f"host source {mount.host_path} is missing")
        if (st.st_dev, st.st_ino) != source:
            return result(False, f"what is mounted is not {mount.host_path}")
    elif fstype != mount.type:
        return result(False, f"a {fstype} is mounted, not {mount.type}")
    want_ro = mounts.parse_options(mount).attr_set & syscalls.MOUNT_ATTR_RDONLY != 0
    if want_ro != ("ro" in options):
        return result(False, "writable, should be read-only" if want_ro else "read-only, should be writable")
    return result(True, f"{mount.host_path} ({'ro' if want_ro else 'rw'})")


def _cache_paths(rootfs: Rootfs) -> set[str] | None:
    """The library paths etc/ld.so.cache lists (glibc's new format), None when unreadable."""
    try:
        fd = syscalls.openat2(rootfs.root_fd, ldcache.CACHE, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC,
                              syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        data = f.read(ldcache.MAX_CACHE)
    return parse_ld_cache(data)


_NEW_MAGIC = b"glibc-ld.so.cache1.1"


def parse_ld_cache(data: bytes) -> set[str] | None:
    """Paths of the entries of an ld.so.cache (new format, alone or after the old one).

    Header: magic (20 bytes), nlibs, len_strings, flags and padding, extension offset, 3
    unused words (48 bytes); then nlibs entries of 24 bytes (flags, key, value, osversion,
    hwcap). key and value are string offsets from the start of the new header."""
    start = data.find(_NEW_MAGIC)
    if start < 0 or len(data) < start + 48:
        return None
    count = int.from_bytes(data[start + 20:start + 24], "little")
    paths = set()
    for i in range(count):
        entry = start + 48 + 24 * i
        if entry + 24 > len(data):
            return None
        value = start + int.from_bytes(data[entry + 8:entry + 12], "little")
        end = data.find(b"\0", value)
        if value >= len(data) or end < 0:
            return None
        paths.add(data[value:end].decode(errors="replace"))
    return paths


# --- the device cgroup ------------------------------------------------------------------------


def access_bits(access: str) -> int:
    return sum({"m": bpf.ACC_MKNOD, "r": bpf.ACC_READ, "w": bpf.ACC_WRITE}[c] for c in set(access))


def _allow(rule) -> "bpf.DeviceAllow":
    return bpf.DeviceAllow(bpf.DEV_BLOCK if rule.type == "b" else bpf.DEV_CHAR, rule.major, rule.minor,
                           access_bits(rule.permissions))


def v1_list(directory: str) -> list[tuple[str, str, str, str]]:
    """devices.list as (type, major, minor, access), '*' kept."""
    entries = []
    with open(os.path.join(directory, "devices.list")) as f:
        for line in f:
            kind, numbers, access = line.split()
            major, _, minor = numbers.partition(":")
            entries.append((kind, major, minor, access))
    return entries


def v1_allows(entries, rule) -> bool:
    """Whether one entry of devices.list grants all of the rule's access (the kernel looks for
    one exception that covers the whole request)."""
    for kind, major, minor, access in entries:
        if (kind in ("a", rule.type) and major in ("*", str(rule.major)) and minor in ("*", str(rule.minor))
                and set(rule.permissions) <= set(access)):
            return True
    return False


def _v1_missing(entries, rule):
    """The rule less the access letters devices.list allowed already: what allowing it adds,
    and all that undoing it may deny (had r, asked rw: only w goes again)."""
    return rule._replace(access="".join(c for c in rule.permissions
                                        if not v1_allows(entries, rule._replace(access=c))))


def _v1_write(directory: str, name: str, rules) -> None:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        for rule in rules:
            os.write(fd, f"{rule.type} {rule.major}:{rule.minor} {rule.permissions}".encode())
    finally:
        os.close(fd)


class CgroupChange:
    """Allow rules now; undo() gives the cgroup back what it had (only what this added goes)."""

    def __init__(self, pid: int, rules, names: str):
        self.rules = cgroups._normalise(rules)
        self.names = names
        self.version, self.directory = cgroups.device_cgroup(pid, self.rules) if self.rules else (None, None)
        self._undo = None

    def allow(self) -> None:
        if not self.rules:
            return
        try:
            if self.version == "v1":
                before = v1_list(self.directory)
                added = [m for m in (_v1_missing(before, r) for r in self.rules) if m.access]
                self._undo = lambda: _v1_write(self.directory, "devices.deny", added)
                cgroups.allow_devices_v1(self.directory, self.rules)
            else:
                before = prologue_allows(self.directory)
                self._undo = lambda: set_prologues(self.directory,
                                                   lambda i, _: before[i] if i < len(before) else [])
                cgroups.allow_devices_v2(self.directory, self.rules)
        except OSError as error:
            raise HookError(cgroups.STEP, self.names, f"{self.directory}: {error.strerror}") from None

    def undo(self) -> list[str]:
        if self._undo is None:
            return []
        try:
            self._undo()
        except (OSError, CdiError) as error:
            return [f"device cgroup: {error}"]
        return []


def prologue_allows(directory: str) -> list[list]:
    """The devices cdi-hook's prologue allows, per attached program (in the kernel's order)."""
    found = []
    for _, insns in _programs(directory):
        found.append(bpf.split_prologue(insns)[0])
    return found


def _programs(directory: str) -> list[tuple[int, list]]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _, ids = bpf.prog_query(fd, bpf.BPF_CGROUP_DEVICE)
    finally:
        os.close(fd)
    programs = []
    for prog_id in ids:
        prog_fd = bpf.prog_get_fd_by_id(prog_id)
        try:
            programs.append((prog_id, bpf.prog_info(prog_fd).insns))
        finally:
            os.close(prog_fd)
    return programs


def set_prologues(directory: str, choose) -> None:
    """Replace each attached program by its original code behind a prologue allowing
    choose(index, current allows); no prologue at all when that is empty. The runtime's code
    after the prologue is never changed."""
    cgroup_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        flags, ids = bpf.prog_query(cgroup_fd, bpf.BPF_CGROUP_DEVICE)
        for index, prog_id in enumerate(ids):
            old_fd = bpf.prog_get_fd_by_id(prog_id)
            try:
                old = bpf.prog_info(old_fd)
                current, original = bpf.split_prologue(old.insns)
                wanted = bpf.merge_allows(choose(index, current))
                if wanted == bpf.merge_allows(current):
                    continue
                problem = bpf.reloadable_problem(original)
                if problem:
                    raise CdiError(f"device cgroup: cannot reload program {prog_id} of {directory}: {problem}")
                program = (bpf.build_prologue(wanted) if wanted else []) + original
                new_fd = bpf.prog_load(bpf.BPF_PROG_TYPE_CGROUP_DEVICE, program,
                                       "GPL" if old.gpl_compatible else "Apache", "cdi_hook_dev")
                try:
                    if flags & bpf.BPF_F_ALLOW_MULTI:
                        bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE, flags | bpf.BPF_F_REPLACE,
                                        replace_fd=old_fd)
                    else:
                        bpf.prog_attach(cgroup_fd, new_fd, bpf.BPF_CGROUP_DEVICE, flags)
                finally:
                    os.close(new_fd)
            finally:
                os.close(old_fd)
    finally:
        os.close(cgroup_fd)


def withdraw(pid: int, rules, names: str) -> list[str]:
    """Take the rules' access away again; notes of what was done."""
    rules = cgroups._normalise(rules)
    if not rules:
        return []
    version, directory = cgroups.device_cgroup(pid, rules)
    try:
        if version == "v1":
            _v1_write(directory, "devices.deny", rules)
        else:
            gone = {(a.dev_type, a.major, a.minor) for a in map(_allow, rules)}
            set_prologues(directory, lambda _, current: [a for a in current
                                                        if (a.dev_type, a.major, a.minor) not in gone])
    except OSError as error:
        raise HookError(cgroups.STEP, names, f"{directory}: {error.strerror}") from None
    return [f"device cgroup: withdrew {', '.join(str(r) for r in rules)}"]


def check_cgroup(pid: int, rule) -> tuple[bool, str]:
    """Whether the container's device cgroup lets the planned access through, and how we know."""
    rule = cgroups._normalise([rule])[0]
    version, directory = cgroups.device_cgroup(pid, [rule])
    if version == "v1":
        ok = v1_allows(v1_list(directory), rule)
        return ok, f"devices.list {'allows' if ok else 'does not allow'} {rule} {rule.permissions}"
    programs = _programs(directory)
    if not programs:
        return True, "no device program attached: no restriction"
    allow = _allow(rule)
    for prog_id, insns in programs:
        for bits in {allow.access, *(b for b in (bpf.ACC_MKNOD, bpf.ACC_READ, bpf.ACC_WRITE) if allow.access & b)}:
            try:
                verdict = bpf_eval.run_device_program(insns, allow.dev_type | bits << 16, rule.major, rule.minor)
            except ValueError as error:
                return False, f"cannot evaluate device program {prog_id}: {error}"
            if not verdict:
                return False, f"device program {prog_id} refuses {rule} {_access_text(bits)}"
    return True, f"every attached device program allows {rule} {rule.permissions}"


def _access_text(bits: int) -> str:
    return "".join(c for c, b in (("r", bpf.ACC_READ), ("w", bpf.ACC_WRITE), ("m", bpf.ACC_MKNOD)) if bits & b)
