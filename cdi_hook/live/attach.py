"""The rootfs work of `cdi-hook attach`, `detach` and `verify` in a container that runs.

The rootfs work is done as the hook does it (live/worker.py), by a forked child speaking
live/child.py's protocol: it clones host sources while still in the host's mount namespace,
setns()'s into the container's mount namespace through the pinned pidfd, and opens "/"
there: after the runtime's pivot_root the root of that namespace is the container's root,
so every path is resolved from that fd with openat2 RESOLVE_IN_ROOT (live/rootfs.py) and
the nodes, mounts and the loader cache are made by live/devices.py, live/mounts.py and
live/ldcache.py, the hook's own code. attach keeps the child's undo journal until the
parent's command: the device cgroup (written by the parent, on the host: live/cgroups.py)
and the record must succeed too, or the child undoes everything and the cgroup gets its
earlier rules back. attach reports what it made by identity (child.MountRecord: the mount
id and the source's device and inode); detach finds a mount by that id in the container's
mount table, wherever the container has moved it since, and checks its source before it
unmounts it (a record without ids, of an older cdi-hook: by its path, as before).
"""

from __future__ import annotations

import os
import stat

from cdi_hook.errors import CdiError, HookError
from cdi_hook.live import child, devices, ldcache, mountinfo, mounts, syscalls
from cdi_hook.live.rootfs import Rootfs
from cdi_hook.live.syscalls import mount_id

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Any

    from cdi_hook.live.devices import NodeJob
    from cdi_hook.live.mounts import MountJob
    from cdi_hook.plan import Plan, PlannedNode
    from cdi_hook.spec.model import Mount

    _Work = Callable[[Any, child.Channel], None]  # (what prepare() returned, the channel to the parent)

# --- the child in the container's mount namespace ----------------------------------------


# How long the parent waits for each report of the worker. The worker is in the container's
# pid namespace, where the container's root can stop it (SIGSTOP): no report ever comes.
WORKER_DEADLINE_S = 30.0


def _fork(pidfd: int, prepare: Callable[[], Any], work: _Work) -> child.Child:
    """Run prepare() in a child on the host side (clones of host sources are taken in the
    host's mount namespace), then work(prepared, channel) in the container.

    The work runs in a grandchild that is in the container's mount AND pid namespaces: after
    pivot_root, /proc there is the container's procfs, where only a process of its pid
    namespace finds /proc/self, which the fd-relative code needs (fd paths, fdinfo,
    mountinfo). Whatever either raises is reported as one line (child.fork).

    Both are non-dumpable, as runc makes runc init (CVE-2016-9962): the container's root, in
    whose pid namespace the worker is, cannot ptrace it or open its /proc entries (its fds
    are the host's). Both are one process group, which the parent kills when the worker
    stops answering (child.Child.read)."""

    def run(channel: child.Channel) -> int:
        import prctl

        prctl.set_dumpable(False)  # before setns: never visible to the container while dumpable
        prepared = prepare()
        _preload()
        try:
            syscalls.setns(pidfd, syscalls.CLONE_NEWNS | syscalls.CLONE_NEWPID)
        except OSError as error:
            raise HookError("enter container", "", f"setns into its namespaces: {error.strerror}") from None
        child.seal_imports()  # an import now would read the image's files, as root
        worker = os.fork()
        if worker == 0:
            code = 1
            try:
                work(prepared, channel)
                code = 0
            except BaseException as error:  # noqa: BLE001 - a bug must still report, not hang the parent
                channel.send(child.failure(child.one_line(error)))
            finally:
                os._exit(code)
        _, status = os.waitpid(worker, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            channel.send(child.failure(f"the worker in the container was killed by signal {-code}"))
        return max(code, 0)

    return child.fork(run, WORKER_DEADLINE_S, group=True)


def _preload() -> None:
    """Import now what the work imports lazily: after setns the container's root is ours,
    and the interpreter's modules are on the host. (The image's names are escaped by
    names.escape, by hand: no codec module to load.)"""
    import cdi_hook.cache  # noqa: F401 - ldmemo's, when ldconfig runs
    import cdi_hook.live.ldmemo  # noqa: F401 - ldcache's


def _enter(creator_ids: tuple[int, int] | None = None) -> Rootfs:
    # setns made the namespace's root ours: after pivot_root, the container's root.
    return Rootfs.open("/", creator_ids)


def path_and_parents(paths: Iterable[str]) -> list[str]:
    """Every path and each of its parents, parents first, each once (normalised, absolute)."""
    found: dict[str, None] = {}
    for path in paths:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for i in range(1, len(parts) + 1):
            found.setdefault("/" + "/".join(parts[:i]), None)
    return sorted(found, key=lambda p: p.count("/"))


# --- attach -------------------------------------------------------------------------------


class AttachWork:
    def __init__(self, node_jobs: list[NodeJob], mount_jobs: list[MountJob], library_dirs: list[str], libraries: str,
                 by_bind_mount: bool, creator_ids: tuple[int, int] | None):
        self.node_jobs = node_jobs
        self.mount_jobs = mount_jobs
        self.library_dirs = library_dirs  # every mounted library's folder, old and new: the conf lists them all
        self.libraries = libraries  # the attached devices that bring libraries ("" for none)
        self.by_bind_mount = by_bind_mount
        self.creator_ids = creator_ids


def start_attach(pidfd: int, work: AttachWork) -> child.Child:
    """Fork the child that makes nodes, mounts and the loader cache; its first report is
    READY (notes, created, mounts, nodes) or FAILED (then it has undone its work); after it
    the parent sends COMMIT or UNDO and reads FINISHED."""

    def prepare() -> int | None:
        devices.clone_host_nodes(work.node_jobs)
        mounts.clone_sources(work.mount_jobs)
        return ldcache.open_host_ldconfig() if work.libraries else None

    def body(ldconfig_fd: int | None, channel: child.Channel) -> None:
        mounted: list[int] = []
        notes: list[str] = []
        made_nodes: list[child.NodeRecord] = []
        made_mounts: list[child.MountRecord] = []
        journal = child.Journal()
        try:
            rootfs = _enter(work.creator_ids)
            journal.add("rootfs", rootfs.undo, keep=rootfs.forget)
            journal.add("mounts", lambda: mounts.unmount_all(mounted), keep=lambda: _close_all(mounted))
            watched = path_and_parents([j.node.path for j in work.node_jobs]
                                       + [j.mount.container_path for j in work.mount_jobs])
            missing = [p for p in watched if not ldcache.exists(rootfs, p)]
            devices.create_nodes(rootfs, work.node_jobs, work.by_bind_mount, mounted, notes, None,
                                 made_nodes, made_mounts)
            mounts.apply(rootfs, work.mount_jobs, mounted, notes, made_mounts)
            if work.libraries:
                ldcache.update(rootfs, work.library_dirs, ldconfig_fd, notes, device=work.libraries)
            created = [p for p in missing if ldcache.exists(rootfs, p)]
        except BaseException as error:  # noqa: BLE001 - undone and reported, see child.one_line
            channel.send(child.failure(child.one_line(error) + child.undo_note(journal.undo())))
            return
        channel.send(child.Report(child.READY, notes=notes, created=created, mounts=made_mounts, nodes=made_nodes))
        try:
            command = channel.command()
        except child.ProtocolError as error:
            channel.send(child.Report(child.FINISHED, problems=[str(error)] + journal.undo()))
            return
        if command == child.COMMIT:
            journal.keep()
            channel.send(child.Report(child.FINISHED))
        else:
            channel.send(child.Report(child.FINISHED, problems=journal.undo()))

    return _fork(pidfd, prepare, body)


def finish_attach(handle: child.Child, commit: bool) -> list[str]:
    """Send the verdict, reap the child; the problems of its undo (or of its silence)."""
    handle.send(child.COMMIT if commit else child.UNDO)
    final = handle.read()
    handle.close()
    if final.kind == child.FINISHED:
        return list(final.problems)
    return [final.error]


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# --- detach -------------------------------------------------------------------------------


class DetachWork:
    def __init__(self, nodes: list[tuple[str, str, str, int, bool, str | None]],
                 mounts_: list[tuple[str, str, tuple[int, int] | None, str, int | None]], created: list[str], library_dirs: list[str], rebuild_cache: bool, libraries: str,
                 creator_ids: tuple[int, int] | None):
        # [(device, path, type, rdev, remove, replaced)]: remove False = unmount only, never unlink;
        # replaced: the entry the hook replaced there ("c 1:7 666 0:0"), put back after ours goes
        self.nodes = nodes
        # [(device, destination, (st_dev, st_ino) of the host source or None, fstype, mount id or None)]:
        # with the id attach recorded, the mount is found by it wherever it is now; None: by its path.
        self.mounts = mounts_
        self.created = created  # paths attach created (mount points, folders): removed when empty
        self.library_dirs = library_dirs  # the folders still holding mounted libraries
        self.rebuild_cache = rebuild_cache
        self.libraries = libraries
        self.creator_ids = creator_ids  # as AttachWork's: the rewritten conf file is the container root's


def run_detach(pidfd: int, work: DetachWork) -> child.Report:
    """RESULT (notes, problems: best effort, every problem named; failed: the origins whose
    node or mount is still there) or FAILED (error)."""

    def prepare() -> int | None:
        return ldcache.open_host_ldconfig() if work.rebuild_cache else None

    def body(ldconfig_fd: int | None, channel: child.Channel) -> None:
        notes: list[str] = []
        problems: list[str] = []
        rootfs = _enter(work.creator_ids)
        table = None
        failed: dict[str, None] = {}  # origins with a node or mount left in place
        for device, where, source, fstype, *recorded in sorted(work.mounts, key=lambda m: -m[1].count("/")):
            wanted = recorded[0] if recorded else None
            before = len(problems)
            if wanted is None:
                _unmount(rootfs, device, where, source, fstype, notes, problems)
            else:
                if table is None:  # our root is the container's: its mount points as the container sees them
                    table = mountinfo.by_id(mountinfo.read())
                _unmount_by_id(rootfs, device, where, source, fstype, wanted, table, notes, problems)
            if len(problems) > before:
                failed[device] = None
        for device, path, kind, rdev, remove, replaced in work.nodes:
            before = len(problems)
            _remove_node(rootfs, device, path, kind, rdev, remove, notes, problems, replaced)
            if len(problems) > before:
                failed[device] = None
        for path in reversed(work.created):
            _remove_if_empty(rootfs, path, notes)
        if work.rebuild_cache:
            try:
                ldcache.update(rootfs, work.library_dirs, ldconfig_fd, notes, device=work.libraries, rebuild=True)
            except CdiError as error:
                problems.append(str(error))
            rootfs.forget()
        channel.send(child.Report(child.RESULT, notes=notes, problems=problems, failed=list(failed)))

    handle = _fork(pidfd, prepare, body)
    try:
        return handle.read()
    finally:
        handle.close()


def _unmount_by_id(rootfs: Rootfs, device: str, where: str, source: Sequence[int] | None, fstype: str,
                   wanted: int, table: dict[int, mountinfo.MountInfo], notes: list[str], problems: list[str]) -> None:
    """Unmount the mount attach made, found by its id wherever it is now: a container that
    renamed a folder above the mount point (or moved the mount) does not keep it."""
    mount = table.get(wanted)
    if mount is None:
        notes.append(f"{device}: {where} is not mounted any more")
        return
    now = mount.mount_point
    moved = os.path.normpath(now) != os.path.normpath("/" + where.lstrip("/"))
    at = f"{where} (now at {now})" if moved else where
    try:
        fd = rootfs.open_path(now)
    except OSError as error:
        problems.append(f"{device}: mount {at}: {error.strerror}")
        return
    try:
        if mount_id(fd) != wanted:
            problems.append(f"{device}: mount {at}: another mount covers it; left alone")
            return
        _unmount_if_ours(fd, mount.fs_type, device, at, source, fstype, notes, problems)
    except OSError as error:
        problems.append(f"{device}: mount {at}: {error.strerror}")
    finally:
        os.close(fd)


def _unmount_if_ours(fd: int, mounted_type: str | None, device: str, at: str, source: Sequence[int] | None,
                     fstype: str, notes: list[str], problems: list[str]) -> None:
    """Unmount what fd is on when it is the device's: its host source by identity (a bind
    mount), else its filesystem type; otherwise a problem, and it stays."""
    st = os.fstat(fd)
    if source is not None and (st.st_dev, st.st_ino) != tuple(source):
        problems.append(f"{device}: mount {at}: what is mounted there is not the device's source; left alone")
        return
    if source is None and mounted_type != fstype:
        problems.append(f"{device}: mount {at}: a {mounted_type} is mounted there, not {fstype}; left alone")
        return
    syscalls.umount2(syscalls.fd_path(fd), syscalls.MNT_DETACH)
    notes.append(f"{device}: unmounted {at}")


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


def _unmount(rootfs: Rootfs, device: str, where: str, source: Sequence[int] | None, fstype: str, notes: list[str],
             problems: list[str]) -> None:
    try:
        fd = rootfs.open_path(where)
    except OSError as error:
        problems.append(f"{device}: mount {where}: {error.strerror}")
        return
    try:
        if not _is_mount_point(rootfs, fd, where):
            notes.append(f"{device}: {where} is not mounted")
            return
        _unmount_if_ours(fd, _mount_types().get(mount_id(fd)), device, where, source, fstype, notes, problems)
    except OSError as error:
        problems.append(f"{device}: mount {where}: {error.strerror}")
    finally:
        os.close(fd)


def _mount_types() -> dict[int, str]:
    return {mount.mount_id: mount.fs_type for mount in mountinfo.read()}


def _resolved_entry(rootfs: Rootfs, path: str) -> tuple[int, str, os.stat_result] | None:
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


def _remove_node(rootfs: Rootfs, device: str, path: str, kind: str, rdev: int, remove: bool, notes: list[str],
                 problems: list[str], replaced: str | None = None) -> None:
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
        if replaced:
            _put_back(parent_fd, name, replaced)
            notes.append(f"{device}: put back the node the container had at {path} ({replaced})")
    except OSError as error:
        problems.append(f"{device}: node {path}: {error.strerror}")
    finally:
        os.close(parent_fd)


def _put_back(parent_fd: int, name: str, replaced: str) -> None:
    """Make again the node the hook replaced, as the record describes it: "c 1:7 666 0:0"."""
    kind, numbers, mode_text, owner = replaced.split()
    major, minor = (int(n) for n in numbers.split(":"))
    uid, gid = (int(n) for n in owner.split(":"))
    mode = int(mode_text, 8)
    os.mknod(name, devices._S_IFMT[kind] | 0o600, os.makedev(major, minor), dir_fd=parent_fd)
    devices._set_owner_mode(os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd), uid, gid,
                            mode, close=True)


def _remove_if_empty(rootfs: Rootfs, path: str, notes: list[str]) -> None:
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


def check_rootfs(pidfd: int, plan: Plan, node_owner: Callable[[PlannedNode], tuple[int, int]],
                 host_sources: dict) -> list[dict]:
    """{device, item, ok, detail} for every node, mount and mounted library of the plan, seen
    from inside the container. host_sources: host path -> (st_dev, st_ino), taken on the host."""

    def body(_: None, channel: child.Channel) -> None:
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
            listed = ldcache.cached_paths(rootfs)
            for origin, path in libraries:
                ok = listed is not None and os.path.normpath(path) in listed
                detail = "listed" if ok else ("the container has no readable etc/ld.so.cache" if listed is None
                                              else "not in etc/ld.so.cache")
                checks.append({"device": origin, "item": f"ld cache {path}", "ok": ok, "detail": detail})
        channel.send(child.Report(child.RESULT, checks=checks))

    handle = _fork(pidfd, lambda: None, body)
    try:
        report = handle.read()
    finally:
        handle.close()
    if not report.ok:
        raise CdiError(report.error or "verify: the worker in the container failed")
    return list(report.checks)


def _is_bind(mount: Mount) -> bool:
    return mount.type in ("", "bind", "rbind") or bool({"bind", "rbind"} & set(mount.options))


def _check_node(rootfs: Rootfs, planned: PlannedNode, owner: tuple[int, int]) -> dict:
    node = planned.node
    item = f"node {node.path}"

    def result(ok: bool, detail: str | None) -> dict:
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


def _check_mount(rootfs: Rootfs, origin: str, mount: Mount, source: tuple[int, int] | None,
                 types: dict[int, tuple[list[str], str]]) -> dict:
    where = mount.container_path
    item = f"mount {where}"

    def result(ok: bool, detail: str | None) -> dict:
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
