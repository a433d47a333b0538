"""A hostile image against the loader-cache step: hard links, links into host mounts, leftovers.

The hook writes etc/ld.so.conf.d/00-cdi-hook.conf and runs the host's ldconfig, as host root,
for every start that mounts a library. An image controls every name there:

* hard links: a rootfs that is a plain directory (a runc bundle) or an overlay's lower or
  upper dir can hold hard links to host files on the same filesystem, under the names the
  hook or ldconfig write (the conf file, ldconfig's etc/ld.so.cache~ and
  var/cache/ldconfig/aux-cache~, which it opens with O_TRUNC); in a user namespace the new
  cache is then given to the container's root. A write, truncate, chmod or chown there
  lands on the host file.
* symlinks into host mounts: var/cache/ldconfig (where ldconfig keeps its aux-cache) or
  etc/ld.so.conf.d may lead into a read-write host folder mounted into the container by a
  spec or by the runtime; ldconfig, following it as host root, would write there.
* leftovers: what ldconfig writes besides ld.so.cache (its aux-cache and that folder) must
  go when a later step fails, like everything else the hook did.

Each attack runs with real runc; a control run of the same image without a device request
shows what runc alone does. The host files are compared entry by entry (content, mode,
owner), and the container still gets its library on the loader's path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

import hook_env
import oci_env
from conftest import require

ALL = f"{hook_env.VENDOR}=all"
LIBRARY_IN_CONTAINER = "/opt/lib/libz.so.1"
# Where the hook or ldconfig write, each planted as a hard link to its own host file.
HARD_LINKED = {"conf": "etc/ld.so.conf.d/00-cdi-hook.conf", "temp-cache": "etc/ld.so.cache~",
               "temp-aux-cache": "var/cache/ldconfig/aux-cache~"}
SHOWS_THE_CACHE = ("cat /etc/ld.so.conf.d/00-cdi-hook.conf; "
                   f"grep -q {LIBRARY_IN_CONTAINER} /etc/ld.so.cache && echo CACHED; echo RAN")


def _spec(sources: dict, extra_mounts: list | None = None, hooks: list | None = None) -> dict:
    edits = {"mounts": [{"hostPath": sources["library"], "containerPath": LIBRARY_IN_CONTAINER,
                         "options": ["ro", "bind"]}] + (extra_mounts or [])}
    if hooks:
        edits["hooks"] = hooks
    return {"cdiVersion": "0.6.0", "kind": hook_env.VENDOR, "devices": [{"name": "all", "containerEdits": edits}]}


def _image(path: Path) -> Path:
    """A glibc-like image as distributions ship it: etc/ld.so.cache and var/cache exist."""
    hook_env.glibc_like_rootfs(path)
    (path / "etc" / "ld.so.cache").write_bytes(b"the image's own cache")
    (path / "var" / "cache").mkdir(parents=True)
    return path


def _host_files(tmp_path: Path) -> Path:
    """One host file per hard-linked name, on the rootfs's filesystem, root-only."""
    host = tmp_path / "hard-linked"
    host.mkdir()
    for key in HARD_LINKED:
        (host / key).write_bytes(f"host file {key}: never written\n".encode())
        os.chmod(host / key, 0o600)
    return host


def _plant_hard_links(layer: Path, host: Path) -> None:
    for key, inside in HARD_LINKED.items():
        (layer / inside).parent.mkdir(parents=True, exist_ok=True)
        os.link(host / key, layer / inside)


@contextmanager
def _rootfs(tmp_path: Path, layout: str, host: Path):
    """The image at tmp_path/bundle/rootfs: a plain folder with the hard links in it, or an
    overlay mount whose lower (image) or upper (container) dir holds them."""
    rootfs = tmp_path / "bundle" / "rootfs"
    if layout == "dir":
        _plant_hard_links(_image(rootfs), host)
        yield rootfs
        return
    lower, upper, work = (tmp_path / name for name in ("lower", "upper", "work"))
    _image(lower)
    upper.mkdir()
    work.mkdir()
    _plant_hard_links(lower if layout == "overlay-lower" else upper, host)
    rootfs.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                              f"lowerdir={lower},upperdir={upper},workdir={work}", str(rootfs)],
                             capture_output=True, text=True)
    require(mounted.returncode == 0, f"cannot mount an overlay here: {mounted.stderr.strip()}")
    try:
        yield rootfs
    finally:
        subprocess.run(["umount", str(rootfs)], check=True)


def _run(tmp_path: Path, rootfs: Path, devices: list[str], spec: dict, script: str = SHOWS_THE_CACHE, **bundle_args):
    bundle, _ = hook_env.bundle_with_hook(tmp_path, spec, devices, script, rootfs=rootfs, **bundle_args)
    return oci_env.run_container(bundle)


def _delta(before: dict, after: dict) -> dict:
    """What changed, entry by entry: (type, mode, uid, gid, the first bytes) before and after."""
    def short(entry):
        return entry if entry is None or not isinstance(entry[4], bytes) else (*entry[:4], entry[4][:40])

    return {key: (short(before.get(key)), short(after.get(key))) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}


def _assert_library_cached(result) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "/opt/lib\n" in result.stdout and "CACHED" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("layout", ["dir", "overlay-lower", "overlay-upper"])
def test_hard_links_to_host_files_are_never_written(runc, tmp_path, layout):
    for run, devices in (("control", []), ("attack", [ALL])):
        base = tmp_path / run
        base.mkdir()
        host = _host_files(base)
        before = oci_env.tree_snapshot(host)
        with _rootfs(base, layout, host) as rootfs:
            result = _run(base, rootfs, devices, _spec(hook_env.host_files(base)))
        changed = _delta(before, oci_env.tree_snapshot(host))
        assert changed == {}, f"{run}: a host file hard-linked into the image changed: {changed}"
        if devices:
            _assert_library_cached(result)
        else:
            assert result.returncode == 0 and "RAN" in result.stdout, result.stderr


def test_hard_links_in_a_user_namespace_keep_their_owner(runc):
    """With a user namespace, what the hook makes goes to the container's root (chown): never
    a host file that the image hard-linked under one of the names written."""
    # The container's root (uid 200000 on the host) must reach the rootfs: not under
    # pytest's 0700 tmp_path.
    tmp_path = Path(tempfile.mkdtemp(prefix="cdi-hook-ldconfig-userns-"))
    try:
        _user_namespace_case(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _user_namespace_case(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    mapping = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "network", "cgroup", "user")]
    host = _host_files(tmp_path)
    before = oci_env.tree_snapshot(host)
    # The image as a user-namespaced runtime prepares it: owned by the container's root.
    rootfs = _image(tmp_path / "bundle" / "rootfs")
    for inside in HARD_LINKED.values():
        (rootfs / inside).parent.mkdir(parents=True, exist_ok=True)
    for path in (rootfs, *rootfs.rglob("*")):
        os.lchown(path, 200000, 200000)
    _plant_hard_links(rootfs, host)
    result = _run(tmp_path, rootfs, [ALL], _spec(hook_env.host_files(tmp_path)), namespaces=namespaces,
                  extra_linux={"uidMappings": mapping, "gidMappings": mapping})
    require("user namespace" not in result.stderr or result.returncode == 0, "runc cannot make user namespaces here")
    changed = _delta(before, oci_env.tree_snapshot(host))
    assert changed == {}, f"a host file hard-linked into the image changed: {changed}"
    _assert_library_cached(result)
    for name in ("etc/ld.so.cache", "etc/ld.so.conf.d/00-cdi-hook.conf"):
        st = (rootfs / name).lstat()
        assert (st.st_uid, st.st_gid, st.st_nlink) == (200000, 200000, 1), name


@pytest.mark.parametrize("mounted_by", ["spec", "runtime"])
@pytest.mark.parametrize("link", ["var/cache/ldconfig", "etc/ld.so.conf.d"])
def test_links_into_a_host_mount_never_get_written_through(runc, tmp_path, link, mounted_by):
    """The image links a folder the hook or ldconfig writes in to a read-write host folder
    that a spec (or the runtime, from config.json) mounts into the container."""
    for run, devices in (("control", []), ("attack", [ALL])):
        base = tmp_path / run
        base.mkdir()
        shared = base / "shared"
        shared.mkdir()
        (shared / "kept").write_text("host data\n")
        rootfs = _image(base / "bundle" / "rootfs")
        (rootfs / "mnt" / "shared").mkdir(parents=True)
        if link == "etc/ld.so.conf.d":
            (rootfs / link).mkdir()
            os.rename(rootfs / link, rootfs / "etc" / "ld.so.conf.d.image")
        (rootfs / link).parent.mkdir(parents=True, exist_ok=True)
        (rootfs / link).symlink_to("/mnt/shared")
        mount = {"hostPath": str(shared), "containerPath": "/mnt/shared", "options": ["rw", "rbind"]}
        spec = _spec(hook_env.host_files(base), [mount] if mounted_by == "spec" else [])
        bundle, _ = hook_env.bundle_with_hook(base, spec, devices, SHOWS_THE_CACHE, rootfs=rootfs)
        if mounted_by == "runtime":
            oci_mount = {"destination": "/mnt/shared", "type": "bind", "source": str(shared), "options": ["rbind", "rw"]}
            config = json.loads((bundle / "config.json").read_text())
            config["mounts"].append(oci_mount)
            (bundle / "config.json").write_text(json.dumps(config))
        before = oci_env.tree_snapshot(shared)
        result = oci_env.run_container(bundle)
        assert "Traceback" not in result.stderr, result.stderr
        changed = _delta(before, oci_env.tree_snapshot(shared))
        assert changed == {}, f"{run}: written into the host folder: {changed}"
        if not devices:
            assert result.returncode == 0 and "RAN" in result.stdout, result.stderr
        elif link == "var/cache/ldconfig":
            _assert_library_cached(result)  # ldconfig's side files are not needed: it still works
        else:  # the conf file's folder is on another filesystem: refused, one line
            assert result.returncode != 0 and "RAN" not in result.stdout, result.stdout
            line = next(x for x in result.stderr.splitlines() if "cdi-hook" in x)
            assert "ldconfig" in line and ALL in line and "etc/ld.so.conf.d" in line, result.stderr


def test_a_failure_after_ldconfig_leaves_no_side_file(runc, tmp_path):
    """ldconfig ran (and would have written var/cache/ldconfig/aux-cache), then a spec hook
    fails: the rootfs is entry for entry what it was."""
    rootfs = _image(tmp_path / "bundle" / "rootfs")
    failing = [{"hookName": "createRuntime", "path": "/bin/sh", "args": ["sh", "-c", "echo broken >&2; exit 3"]}]
    before = oci_env.tree_snapshot(rootfs)
    result = _run(tmp_path, rootfs, [ALL], _spec(hook_env.host_files(tmp_path), hooks=failing))
    assert result.returncode != 0 and "RAN" not in result.stdout and "broken" in result.stderr, result.stderr
    changed = _delta(before, oci_env.tree_snapshot(rootfs))
    assert changed == {}, changed


def test_a_successful_start_changes_only_the_cache_and_the_conf_file(runc, tmp_path):
    """ldconfig writes nothing else in the image (no aux-cache, no var/cache/ldconfig)."""
    rootfs = _image(tmp_path / "bundle" / "rootfs")
    before = oci_env.tree_snapshot(rootfs)
    _assert_library_cached(_run(tmp_path, rootfs, [ALL], _spec(hook_env.host_files(tmp_path))))
    changed = set(_delta(before, oci_env.tree_snapshot(rootfs)))
    made_by_the_mount = {"opt", "opt/lib", "opt/lib/libz.so.1"}  # the bind mount's target, kept
    assert changed - made_by_the_mount == {"etc/ld.so.cache", "etc/ld.so.conf.d",
                                           "etc/ld.so.conf.d/00-cdi-hook.conf"}, changed


def test_ldconfigs_complaints_reach_the_error_escaped(runc, tmp_path):
    """ldconfig fails (its rename(2) of the new cache fails, by a seccomp filter on the hook)
    after complaining about an image file whose name holds a terminal escape: the error
    names it with the control bytes escaped, and the rootfs is what it was. (runc quotes a
    hook's stderr itself; the next test holds the hook's own message to the same rule.)"""
    import fault_env

    rootfs = _image(tmp_path / "bundle" / "rootfs")
    (rootfs / "opt" / "lib").mkdir(parents=True)
    hostile = "lib\x1b[2J\x1b[31mevil.so.1"
    (rootfs / "opt" / "lib" / hostile).touch()  # "File /opt/lib/... is empty, not checked."
    bundle, _ = hook_env.bundle_with_hook(tmp_path, _spec(hook_env.host_files(tmp_path)), [ALL], "echo RAN",
                                          rootfs=rootfs)
    fault_env.with_failing_syscalls(bundle, tmp_path, ["rename"])  # ldconfig's; the hook renames with renameat
    before = oci_env.tree_snapshot(rootfs)
    result = oci_env.run_container(bundle)
    assert result.returncode != 0 and "RAN" not in result.stdout, result.stderr
    assert "Traceback" not in result.stderr and "\x1b" not in result.stderr, repr(result.stderr)
    assert f"ldconfig for {ALL}: exit status 1" in result.stderr, result.stderr
    shown = result.stderr.replace("\\\\", "\\")  # runc's log line quotes the hook's backslashes once more
    assert "/opt/lib/lib\\x1b[2J\\x1b[31mevil.so.1 is empty" in shown, result.stderr
    assert _delta(before, oci_env.tree_snapshot(rootfs)) == {}


def test_ldconfig_output_is_escaped_in_the_message_the_hook_builds(root_only, tmp_path, monkeypatch):
    """Not left to the printing of the CLI, the log or runc (which all quote it again): the
    HookError text itself holds no control character."""
    from cdi_hook.errors import CdiError
    from cdi_hook.live import ldcache
    from cdi_hook.live.rootfs import Rootfs

    monkeypatch.setattr(ldcache, "_run_chrooted", lambda *args, **kwargs: (
        "exit status 1", "ldconfig: Cannot stat /opt/lib/lib\x1b]0;owned\x07\x1b[31m.so.1\r\x00\u202e\n"))
    rootfs = Rootfs.open(str(hook_env.glibc_like_rootfs(tmp_path / "rootfs")))
    try:
        with pytest.raises(CdiError) as raised:
            ldcache.update(rootfs, ["/opt/lib"], rootfs.root_fd, [], ALL)
        assert rootfs.undo() == []
    finally:
        rootfs.close()
    message = str(raised.value)
    assert message.isprintable() and message.isascii(), repr(message)
    assert "lib\\x1b]0;owned\\x07\\x1b[31m.so.1" in message, message
