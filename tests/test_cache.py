"""The compiled registry cache and the hook's other speed paths (log line, argv).

The cache must never change an answer: every test compares with a fresh Registry.load,
and every way a cache can be wrong (changed, added or removed spec, corrupt file, foreign
owner, loose modes, non-root caller) must end in the files' answer.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time

import pytest

from cdi_hook import cache, cli, log, settings, state
from cdi_hook.errors import ResolveError
from cdi_hook.registry import Registry
from oci_env import write_spec


def spec(kind: str = "vendor.com/gpu", devices=("gpu0",), env: str = "A=1", path_tag: str = "x") -> dict:
    return {
        "cdiVersion": "0.6.0",
        "kind": kind,
        "containerEdits": {"env": [env]},
        "devices": [{"name": name, "containerEdits": {"env": [f"DEV_{name}={path_tag}"]}} for name in devices],
    }


@pytest.fixture
def cached(tmp_path, monkeypatch, root_only):
    """A spec dir, a cache dir, and FRESH_NS 0 so a cache is written at once (ns timestamps
    still move on every write; tests that rewrite a file sleep past the clock tick)."""
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS", raising=False)
    monkeypatch.delenv("CDI_HOOK_MAX_SPEC_SIZE", raising=False)
    monkeypatch.setattr(cache, "FRESH_NS", 0)
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir(mode=0o755)
    return spec_dir


class LoadCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = Registry.load.__func__

        def counting(cls, *args, **kwargs):
            self.calls += 1
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(Registry, "load", classmethod(counting))


def cache_files(spec_dir):
    directory = spec_dir.parent / "cache"
    return sorted(directory.iterdir()) if directory.exists() else []


def tick():
    """Past the kernel's timestamp granularity, so a rewrite moves mtime/ctime."""
    time.sleep(0.05)


def test_hit_gives_the_same_plan_without_loading(cached, monkeypatch):
    write_spec(cached, "a.json", spec(devices=("gpu0", "gpu1")))
    write_spec(cached, "b.json", spec("other.com/nic", ("nic0",)))
    names = ["vendor.com/gpu=gpu1", "other.com/nic=nic0", "vendor.com/gpu=gpu0"]
    expected = Registry.load([str(cached)]).select(names)
    first = cache.select(names, [str(cached)])
    assert first == expected
    [cache_file] = cache_files(cached)
    st = cache_file.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert stat.S_IMODE(cache_file.parent.stat().st_mode) == 0o700
    counter = LoadCounter(monkeypatch)
    assert cache.select(names, [str(cached)]) == expected
    assert counter.calls == 0


def test_changed_file_is_seen_on_the_next_start_even_with_the_same_size(cached):
    path = write_spec(cached, "a.json", spec(path_tag="1"))
    assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).parts[-1].edits.env == ("DEV_gpu0=1",)
    tick()
    size = path.stat().st_size
    write_spec(cached, "a.json", spec(path_tag="2"))
    assert path.stat().st_size == size
    assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).parts[-1].edits.env == ("DEV_gpu0=2",)


def test_added_and_removed_files_are_seen(cached):
    write_spec(cached, "a.json", spec())
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    tick()
    write_spec(cached, "b.json", spec("other.com/nic", ("nic0",)))
    assert cache.select(["other.com/nic=nic0"], [str(cached)]).devices == ("other.com/nic=nic0",)
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])  # the cache now knows b.json
    (cached / "b.json").unlink()
    with pytest.raises(ResolveError, match="other.com/nic=nic0"):
        cache.select(["other.com/nic=nic0"], [str(cached)])


def test_a_new_definition_in_a_later_dir_wins_at_once(cached, tmp_path):
    later = tmp_path / "later"
    later.mkdir(mode=0o755)
    write_spec(cached, "a.json", spec(path_tag="early"))
    dirs = [str(cached), str(later)]
    assert cache.select(["vendor.com/gpu=gpu0"], dirs).parts[-1].edits.env == ("DEV_gpu0=early",)
    write_spec(later, "a.json", spec(path_tag="late"))
    assert cache.select(["vendor.com/gpu=gpu0"], dirs).parts[-1].edits.env == ("DEV_gpu0=late",)


def test_errors_stay_the_registrys_own(cached):
    write_spec(cached, "a.json", spec())
    write_spec(cached, "b.json", spec())  # the same device at the same priority: a conflict
    write_spec(cached, "c.json", spec("broken.com/x", ("bad name!",)))
    for _ in range(2):  # without and with a cache file
        for names in (["vendor.com/gpu=gpu0"], ["nosuch.com/x=y"], ["broken.com/x=a"]):
            with pytest.raises(ResolveError) as from_cache:
                cache.select(names, [str(cached)])
            with pytest.raises(ResolveError) as from_files:
                Registry.load([str(cached)]).select(names)
            assert str(from_cache.value) == str(from_files.value)
    assert cache_files(cached)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other magic", "flipped"])
def test_corrupt_cache_is_ignored_and_rebuilt(cached, monkeypatch, damage):
    write_spec(cached, "a.json", spec(devices=("gpu0", "gpu1")))
    expected = Registry.load([str(cached)]).select(["vendor.com/gpu=gpu1"])
    cache.select(["vendor.com/gpu=gpu1"], [str(cached)])
    [cache_file] = cache_files(cached)
    data = cache_file.read_bytes()
    damaged = {"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 2], "empty": b"",
               "other magic": b"XXXXXXXX" + data[8:],
               "flipped": data[:-40] + bytes(b ^ 0xFF for b in data[-40:])}[damage]
    cache_file.write_bytes(damaged)
    assert cache.select(["vendor.com/gpu=gpu1"], [str(cached)]) == expected
    counter = LoadCounter(monkeypatch)  # rebuilt: the next start is a hit again
    assert cache.select(["vendor.com/gpu=gpu1"], [str(cached)]) == expected
    assert counter.calls == 0


@pytest.mark.parametrize("problem", ["file not root-owned", "file group-writable", "file world-writable",
                                     "dir world-writable", "dir not root-owned", "file is a symlink"])
def test_untrusted_cache_is_not_used(cached, monkeypatch, problem):
    write_spec(cached, "a.json", spec())
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    [cache_file] = cache_files(cached)
    directory = cache_file.parent
    if problem == "file not root-owned":
        os.chown(cache_file, 65534, 65534)
    elif problem == "file group-writable":
        os.chmod(cache_file, 0o620)
    elif problem == "file world-writable":
        os.chmod(cache_file, 0o602)
    elif problem == "dir world-writable":
        os.chmod(directory, 0o777)
    elif problem == "dir not root-owned":
        os.chown(directory, 65534, 65534)
    else:
        target = directory / "elsewhere"
        cache_file.rename(target)
        cache_file.symlink_to(target)
    counter = LoadCounter(monkeypatch)
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert counter.calls == 1
    if problem.startswith("dir"):  # not written into a directory others could change
        assert not list(directory.glob(".registry-*"))


def test_non_root_never_reads_or_writes(cached, monkeypatch):
    write_spec(cached, "a.json", spec())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CDI_HOOK_INSECURE_SPECS", "1")
    assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).devices == ("vendor.com/gpu=gpu0",)
    assert cache_files(cached) == []


def test_a_relative_cache_dir_is_not_used(cached, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(settings.CACHE_DIR_ENV, "relative-cache")
    write_spec(cached, "a.json", spec())
    assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).devices == ("vendor.com/gpu=gpu0",)
    assert not (tmp_path / "relative-cache").exists()


def test_fresh_files_are_not_cached_yet(cached, monkeypatch):
    monkeypatch.setattr(cache, "FRESH_NS", 60_000_000_000)
    write_spec(cached, "a.json", spec())
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert cache_files(cached) == []


def test_is_settled_looks_at_files_and_dirs():
    from array import array

    old, new = 1_000_000_000_000, 5_000_000_000_000
    listing = (("/d", (1, 2, old, old, 0o40755, 0, 0), "a.json", array("q", (3, 1, 10, old, old)).tobytes()),)
    assert cache.is_settled(listing, now_ns=new)
    assert not cache.is_settled(listing, now_ns=old + cache.FRESH_NS - 1)
    written = (("/d", (1, 2, old, old, 0o40755, 0, 0), "a.json\0b.json",
                array("q", (3, 1, 10, old, old, 4, 1, 10, old, new - 1)).tobytes()),)
    assert not cache.is_settled(written, now_ns=new)
    touched = (("/d", (1, 2, old, new - 1, 0o40755, 0, 0), "", b""),)
    assert not cache.is_settled(touched, now_ns=new)
    missing = (("/d", ("error", 2), "", b""),)
    assert cache.is_settled(missing, now_ns=new)
    refused = (("/d", (1, 2, old, old, 0o40755, 0, 0), "a.json", array("q", (-1, 13, 0, 0, 0)).tobytes()),)
    assert cache.is_settled(refused, now_ns=new)


def test_settings_that_change_the_answer_get_their_own_cache(cached, monkeypatch):
    write_spec(cached, "a.json", spec())
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    monkeypatch.setenv("CDI_HOOK_MAX_SPEC_SIZE", "10")
    settings.use(None)  # read again
    with pytest.raises(ResolveError):  # the 10-byte limit makes a.json invalid
        cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    monkeypatch.setenv("CDI_HOOK_MAX_SPEC_SIZE", "1000000")
    settings.use(None)
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert len(cache_files(cached)) == 3  # default (4 MiB), 10 and 1000000


def test_a_lookup_decodes_only_the_requested_spec(cached, monkeypatch):
    for index in range(50):
        write_spec(cached, f"s{index}.json", spec(f"vendor{index}.com/gpu", ("gpu0", "gpu1")))
    cache.select(["vendor7.com/gpu=gpu1"], [str(cached)])
    loads = []
    original = cache.decode
    def counting(data):  # decode recurses: count only the specs (class number 0)
        if type(data) is list and data[0] == 0:
            loads.append(1)
        return original(data)

    monkeypatch.setattr(cache, "decode", counting)
    counter = LoadCounter(monkeypatch)
    plan = cache.select(["vendor31.com/gpu=gpu0", "vendor31.com/gpu=gpu1"], [str(cached)])
    assert counter.calls == 0 and len(loads) == 1
    assert plan == Registry.load([str(cached)]).select(["vendor31.com/gpu=gpu0", "vendor31.com/gpu=gpu1"])


def test_write_leaves_no_temp_files_and_replaces_atomically(cached):
    write_spec(cached, "a.json", spec())
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    tick()
    write_spec(cached, "a.json", spec(devices=("gpu0", "gpu9")))
    cache.select(["vendor.com/gpu=gpu9"], [str(cached)])
    files = cache_files(cached)
    assert len(files) == 1 and not files[0].name.startswith(".")


def test_plain_data_round_trip_covers_every_model_field():
    from cdi_hook.spec.model import (ContainerEdits, Device, DeviceNode, Hook, IntelRdt, Mount, NetDevice,
                                     Spec)

    edits = ContainerEdits(
        env=("A=1",), device_nodes=(DeviceNode("/dev/x", "/dev/null", "c", 1, 3, 0o666, "rw", 0, 44),),
        mounts=(Mount("/h", "/c", ("ro", "bind"), "bind"),), hooks=(Hook("createContainer", "/bin/true", ("true",), ("E=1",), 5),),
        additional_gids=(44,), intel_rdt=IntelRdt("clos", "L3:0=f", "MB:0=50", ("L2:0=3",), True),
        net_devices=(NetDevice("eth9", "net0"),))
    original = Spec("0.7.0", "v.com/c", (Device("d", edits, (("k", "v"),)),), edits, (("a", "b"),), "/etc/cdi/x.json")
    import marshal

    assert cache.decode(marshal.loads(marshal.dumps(cache.plain(original)))) == original


def test_a_cache_can_only_make_model_objects():
    with pytest.raises(ValueError):
        cache.plain(object())
    with pytest.raises(IndexError):
        cache.decode([99, "x"])


# ---------------------------------------------------------------------------------------
# The per-container log line without structlog, the hook argv without argparse


def test_fast_log_line_is_the_line_structlog_writes():
    import structlog

    fields = {"container": "c1", "stage": "createRuntime", "devices": ["v.com/g=0", "ünï"], "duration_ms": 12.5}
    for now_ns in (1_764_180_000_123_456_789, 1_764_180_000_000_000_000):
        stamp = log.iso_utc(now_ns)
        out = io.StringIO()
        logger = structlog.wrap_logger(
            structlog.WriteLogger(out),  # as cdi_hook.log writes warning and error lines
            processors=[structlog.processors.add_log_level,
                        lambda _, __, event: dict(event, timestamp=stamp),
                        structlog.processors.JSONRenderer(sort_keys=False)])
        logger.info("cdi-hook injected", **fields)
        assert log.render_line("info", "cdi-hook injected", fields, now_ns) == out.getvalue()


def test_iso_utc_matches_datetime():
    from datetime import datetime, timezone

    for now_ns in (0, 1_764_180_000_123_456_789, 1_764_180_000_000_000_000, 1_764_180_000_000_001_000):
        expected = datetime.fromtimestamp(now_ns // 1000 / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        assert log.iso_utc(now_ns) == expected


def test_info_line_is_written_without_structlog(tmp_path, monkeypatch):
    import subprocess
    import sys

    log_file = tmp_path / "hook.log"
    code = ("import sys; from cdi_hook.log import ContainerLog; ContainerLog('c', 'poststart', ['v.com/g=0']).finish(); "
            "assert 'structlog' not in sys.modules")
    env = {"CDI_HOOK_LOG": str(log_file), "PATH": os.environ.get("PATH", "")}
    subprocess.run([sys.executable, "-I", "-c", code], env=env, check=True)
    line = json.loads(log_file.read_text())
    assert line["event"] == "cdi-hook injected" and line["level"] == "info" and line["devices"] == ["v.com/g=0"]


@pytest.mark.parametrize("argv", [
    ["hook"], ["hook", "--stage", "poststop"], ["hook", "--stage=prestart"],
    ["hook", "--spec-dir", "/a", "--spec-dir=/b", "--stage", "poststart"], ["hook", "--stage", "poststart", "--stage", "prestart"],
])
def test_fast_hook_argv_agrees_with_argparse(argv):
    fast = cli.fast_hook_args(argv)
    slow = cli.build_parser().parse_args(argv)
    assert (fast.command, fast.stage, fast.spec_dir) == (slow.command, slow.stage, slow.spec_dir)


@pytest.mark.parametrize("argv", [
    ["list"], ["hook", "--stage", "nosuch"], ["hook", "--stage"], ["hook", "--help"], ["hook", "--st", "poststop"],
    ["hook", "extra"], [],
])
def test_unusual_hook_argv_goes_to_argparse(argv):
    assert cli.fast_hook_args(argv) is None


# ---------------------------------------------------------------------------------------
# The watcher's generation (commands/watch.py writes it; tests/test_watch.py runs the watcher)


class FakeWatcher:
    """The generation file as `cdi-hook watch` keeps it: root-only, flock'ed, fresh."""

    def __init__(self, dirs, generation: bytes = b"g" * 16):
        import fcntl

        path = cache.generation_path(tuple(dirs))
        state.ensure_private_dir(os.path.dirname(path))
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.path, self.dirs = path, tuple(dirs)
        self.set(generation)

    def set(self, generation: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, cache.generation_content(self.dirs, generation), 0)
        os.utime(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def test_spec_suffixes_are_the_registrys():
    from cdi_hook.spec.parse import SPEC_SUFFIXES

    assert cache.SPEC_SUFFIXES == SPEC_SUFFIXES


def test_a_healthy_watchers_generation_replaces_the_per_file_checks(cached, monkeypatch):
    write_spec(cached, "a.json", spec(path_tag="1"))
    watcher = FakeWatcher([str(cached)])
    try:
        assert cache.watched_generation((str(cached),)) == b"g" * 16
        cache.select(["vendor.com/gpu=gpu0"], [str(cached)])  # recorded at generation g
        monkeypatch.setattr(cache, "snapshot", lambda dirs: pytest.fail("stat()ed the files"))
        assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).parts[-1].edits.env == ("DEV_gpu0=1",)
        monkeypatch.undo()
        monkeypatch.setattr(cache, "FRESH_NS", 0)
        tick()
        write_spec(cached, "a.json", spec(path_tag="2"))
        watcher.set(b"h" * 16)  # the watcher saw it
        assert cache.select(["vendor.com/gpu=gpu0"], [str(cached)]).parts[-1].edits.env == ("DEV_gpu0=2",)
    finally:
        watcher.close()


@pytest.mark.parametrize("problem", ["no lock", "stale heartbeat", "other dirs", "no trust", "loose mode", "not root"])
def test_a_generation_is_trusted_only_from_a_healthy_watcher(cached, problem):
    dirs = (str(cached),)
    watcher = FakeWatcher(dirs)
    try:
        now = None
        if problem == "no lock":
            import fcntl

            fcntl.flock(watcher.fd, fcntl.LOCK_UN)
        elif problem == "stale heartbeat":
            now = time.time_ns() + cache.HEARTBEAT_TIMEOUT_NS + 1
        elif problem == "other dirs":
            os.pwrite(watcher.fd, cache.generation_content(("/elsewhere",) + dirs[1:], b"g" * 16), 0)
        elif problem == "no trust":
            watcher.set(bytes(16))
        elif problem == "loose mode":
            os.fchmod(watcher.fd, 0o644)
        else:
            os.fchown(watcher.fd, 65534, 65534)
        assert cache.watched_generation(dirs, now_ns=now) is None
    finally:
        watcher.close()


def test_a_cache_recorded_without_a_listing_needs_the_watcher(cached, monkeypatch):
    """Written while the files were fresh: valid by generation only; once the watcher is
    gone, the start checks the files."""
    monkeypatch.setattr(cache, "FRESH_NS", 60_000_000_000)
    write_spec(cached, "a.json", spec())
    watcher = FakeWatcher([str(cached)])
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert [f for f in cache_files(cached) if f.name.startswith("registry-")]  # written: the generation vouches
    counter = LoadCounter(monkeypatch)
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert counter.calls == 0
    watcher.close()
    cache.select(["vendor.com/gpu=gpu0"], [str(cached)])
    assert counter.calls == 1
