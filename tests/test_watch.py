"""`cdi-hook watch`: real inotify on spec dirs in tmp, the generation a hook start reads, and
what happens when the watcher is gone, stuck or cannot vouch.

The rule under test: a change the watcher has seen is used by every later start; without a
healthy watcher every start checks every spec file (the files stay the truth).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cdi_hook import cache, plan, settings
from cdi_hook.commands import install
from cdi_hook.errors import ResolveError
from oci_env import PYTHON, REPO, write_spec

DEVICE = "watch.example.com/gpu=gpu0"
SEEN_WITHIN_S = 1.0


def spec(value: str = "A=1", name: str = "gpu0", kind: str = "watch.example.com/gpu") -> dict:
    return {"cdiVersion": "0.6.0", "kind": kind,
            "devices": [{"name": name, "containerEdits": {"env": [value]}}]}


def env_of(spec_dirs) -> tuple[str, ...]:
    return plan.build(cache.select([DEVICE], [str(d) for d in spec_dirs]), stat_host=False).env[-1][1]


class Watcher:
    """`cdi-hook watch` in a subprocess, with $NOTIFY_SOCKET as systemd gives it."""

    def __init__(self, tmp_path: Path, spec_dirs: list[Path], cache_dir: Path):
        self.dirs = tuple(str(d) for d in spec_dirs)
        self.socket_path = tmp_path / f"notify-{len(list(tmp_path.glob('notify-*')))}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.socket_path))
        self.socket.settimeout(30)
        env = {"PATH": "/usr/bin:/bin", "CDI_HOOK_CACHE_DIR": str(cache_dir), "NOTIFY_SOCKET": str(self.socket_path)}
        argv = [PYTHON, "-I", "-m", "cdi_hook", "watch"] + [f"--spec-dir={d}" for d in self.dirs]
        self.process = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.messages: list[bytes] = []

    def wait_for(self, message: bytes) -> None:
        while message not in self.messages:
            self.messages.append(self.socket.recv(4096))

    def generation(self):
        return cache.watched_generation(self.dirs)

    def wait_trusted(self, timeout: float = 20) -> bytes:
        deadline = time.monotonic() + timeout
        while (generation := self.generation()) is None:
            assert time.monotonic() < deadline, "the watcher did not vouch for the files"
            time.sleep(0.005)
        return generation

    def wait_moved(self, before, timeout: float = SEEN_WITHIN_S) -> float:
        started = time.monotonic()
        while self.generation() == before:
            assert time.monotonic() - started < timeout, f"the watcher did not see the change within {timeout} s"
            time.sleep(0.001)
        return time.monotonic() - started

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        _, err = self.process.communicate(timeout=30)
        self.stderr = err.decode()
        self.socket.close()
        return self.process.returncode


@pytest.fixture
def setup(tmp_path, monkeypatch, root_only):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(cache_dir))
    monkeypatch.delenv("CDI_HOOK_INSECURE_SPECS", raising=False)
    monkeypatch.delenv("CDI_HOOK_MAX_SPEC_SIZE", raising=False)
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir(mode=0o755)
    started = []

    def start(dirs=None) -> Watcher:
        watcher = Watcher(tmp_path, dirs or [spec_dir], cache_dir)
        started.append(watcher)
        watcher.wait_for(b"READY=1")
        return watcher

    yield spec_dir, start
    for watcher in started:
        if watcher.process.poll() is None:
            watcher.stop(signal.SIGKILL)


def test_ready_then_starts_skip_the_per_file_checks(setup, monkeypatch):
    spec_dir, start = setup
    write_spec(spec_dir, "a.json", spec())
    watcher = start()
    watcher.wait_trusted()
    assert env_of([spec_dir]) == "A=1"  # the cache the watcher rebuilt, or one this start writes
    monkeypatch.setattr(cache, "snapshot", lambda dirs: pytest.fail("a start with a healthy watcher stat()ed the files"))
    assert env_of([spec_dir]) == "A=1"
    assert watcher.stop() == 0


def test_an_in_place_edit_is_used_by_the_next_start(setup):
    spec_dir, start = setup
    path = write_spec(spec_dir, "a.json", spec("A=1"))
    watcher = start()
    generation = watcher.wait_trusted()
    env_of([spec_dir])
    with open(path, "r+") as out:  # the same inode, the same size
        out.write(json.dumps(spec("A=2"), indent=2))
    watcher.wait_moved(generation)
    assert env_of([spec_dir]) == "A=2"  # seen: this start checked the files
    watcher.wait_trusted()
    assert env_of([spec_dir]) == "A=2"  # and the rebuilt cache has it
    assert watcher.stop() == 0


@pytest.mark.parametrize("change", ["new file", "renamed in", "removed", "renamed out", "chmod", "hard link written"])
def test_every_kind_of_change_is_seen(setup, tmp_path, change):
    spec_dir, start = setup
    path = write_spec(spec_dir, "a.json", spec("A=1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if change == "hard link written":
        os.link(path, elsewhere / "link.json")
    watcher = start()
    generation = watcher.wait_trusted()
    env_of([spec_dir])
    if change == "new file":
        write_spec(spec_dir, "b.json", spec("B=1", kind="other.example.com/gpu"))
    elif change == "renamed in":
        write_spec(elsewhere, "b.json", spec("A=2"))
        path.unlink()
        os.rename(elsewhere / "b.json", spec_dir / "b.json")
    elif change in ("removed", "renamed out"):
        path.unlink() if change == "removed" else os.rename(path, elsewhere / "a.json")
    elif change == "chmod":
        os.chmod(path, 0o666)  # writable by all: refused as untrusted from now on
    else:
        with open(elsewhere / "link.json", "r+") as out:  # through another name of the same inode
            out.write(json.dumps(spec("A=3"), indent=2))
    watcher.wait_moved(generation)
    if change in ("removed", "renamed out", "chmod"):
        with pytest.raises(ResolveError):
            env_of([spec_dir])
    else:
        expected = {"new file": "A=1", "renamed in": "A=2", "hard link written": "A=3"}[change]
        assert env_of([spec_dir]) == expected
    assert watcher.stop() == 0


def test_a_dir_that_appears_later_is_watched(setup, tmp_path):
    _, start = setup
    later = tmp_path / "later" / "cdi"
    watcher = start([later])
    with pytest.raises(ResolveError):
        env_of([later])
    generation = watcher.wait_trusted()
    later.mkdir(parents=True)
    watcher.wait_moved(generation)
    generation = watcher.wait_trusted()
    write_spec(later, "a.json", spec("A=later"))
    watcher.wait_moved(generation)
    assert env_of([later]) == "A=later"
    generation = watcher.wait_trusted()
    with open(later / "a.json", "r+") as out:
        out.write(json.dumps(spec("A=again"), indent=2))
    watcher.wait_moved(generation)
    assert env_of([later]) == "A=again"
    assert watcher.stop() == 0


def test_a_watcher_that_dies_is_not_trusted_and_starts_check_the_files(setup):
    spec_dir, start = setup
    path = write_spec(spec_dir, "a.json", spec("A=1"))
    watcher = start()
    watcher.wait_trusted()
    assert env_of([spec_dir]) == "A=1"
    watcher.stop(signal.SIGKILL)  # no cleanup: the generation file stays, its lock goes with the process
    assert Path(cache.generation_path(watcher.dirs)).exists()
    assert watcher.generation() is None
    with open(path, "r+") as out:  # a change nobody watches
        out.write(json.dumps(spec("A=2"), indent=2))
    assert env_of([spec_dir]) == "A=2"


def test_a_stopped_watcher_is_not_trusted_after_the_heartbeat_timeout(setup):
    spec_dir, start = setup
    write_spec(spec_dir, "a.json", spec())
    watcher = start()
    watcher.wait_trusted()
    watcher.process.send_signal(signal.SIGSTOP)
    try:
        later = time.time_ns() + cache.HEARTBEAT_TIMEOUT_NS + 1
        assert cache.watched_generation(watcher.dirs, now_ns=later) is None
    finally:
        watcher.process.send_signal(signal.SIGCONT)
    assert watcher.stop() == 0


def test_sigterm_exits_cleanly(setup):
    spec_dir, start = setup
    write_spec(spec_dir, "a.json", spec())
    watcher = start()
    watcher.wait_trusted()
    path = Path(cache.generation_path(watcher.dirs))
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600
    assert watcher.stop(signal.SIGTERM) == 0
    watcher.messages.append(b"")  # STOPPING=1 came before the exit
    assert not path.exists() and "Traceback" not in watcher.stderr, watcher.stderr


def test_a_symlinked_spec_is_never_vouched_for(setup, tmp_path):
    spec_dir, start = setup
    target = write_spec(tmp_path / "elsewhere", "a.json", spec("A=1"))
    (spec_dir / "a.json").symlink_to(target)
    watcher = start()
    time.sleep(0.3)
    assert watcher.generation() is None  # inotify on the dir cannot see the target change
    assert env_of([spec_dir]) == "A=1"
    with open(target, "r+") as out:
        out.write(json.dumps(spec("A=2"), indent=2))
    assert env_of([spec_dir]) == "A=2"
    assert watcher.stop() == 0


def test_a_second_watcher_of_the_same_dirs_refuses(setup, tmp_path):
    spec_dir, start = setup
    watcher = start()
    second = Watcher(tmp_path, [spec_dir], Path(os.environ[settings.CACHE_DIR_ENV]))
    second.process.wait(timeout=30)
    assert second.stop() == 1 and "another cdi-hook watch" in second.stderr, second.stderr
    assert watcher.generation() is not None
    assert watcher.stop() == 0


def test_install_writes_the_unit_and_deploy_holds_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("CDI_HOOK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CDI_SPEC_DIRS", "/etc/cdi:/srv/cdi")
    monkeypatch.setenv("CDI_HOOK_STATE_DIR", str(tmp_path / "state" / "held"))
    written = install.install_watch_unit(str(tmp_path / "systemd"), python=PYTHON, spec_dirs=["/etc/cdi", "/srv/cdi"])
    text = Path(written).read_text()
    assert f"ExecStart={os.path.abspath(PYTHON)} -I -m cdi_hook watch\n" in text
    assert "Type=notify\n" in text and "Environment=CDI_SPEC_DIRS=/etc/cdi:/srv/cdi\n" in text
    assert f"Environment=CDI_HOOK_CACHE_DIR={tmp_path / 'cache'}\n" in text
    assert f"ReadWritePaths={tmp_path / 'cache'}\n" in text
    # the records' folder it prunes (the state root), made root-only for ReadWritePaths=
    assert f"ReadWritePaths={tmp_path / 'state'}\n" in text and (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert install.uninstall_watch_unit(str(tmp_path / "systemd")) == written and not Path(written).exists()
    shipped = (REPO / "deploy" / "systemd" / "cdi-hook-watch.service").read_text()
    assert shipped == install.watch_unit("/opt/cdi-hook/bin/python3", None, {})


def test_an_older_serving_units_watch_serve_is_still_accepted():
    """A systemd unit an older `install --watch --serve` wrote runs `watch --serve`: the
    option is accepted (and warned about), so the watcher keeps running after an upgrade."""
    from cdi_hook import cli

    args = cli.build_parser().parse_args(["watch", "--serve"])
    assert args.command == "watch" and args.serve is True


def test_a_spec_being_written_is_never_vouched_for_as_broken(setup):
    """A spec truncated and half written, finished 1.8 s later: the watcher's rebuild reads it
    again for its settle budget, then gives up without vouching, so a start at 1.5 s checks
    the files itself (and waits for the end of the write) instead of trusting a cache that
    calls the file broken."""
    spec_dir, start = setup
    path = write_spec(spec_dir, "a.json", spec("A=1"))
    data = path.read_bytes()
    watcher = start()
    watcher.wait_trusted()
    with open(path, "r+b") as out:
        out.truncate(0)
        out.write(data[:len(data) // 2])
    started = time.monotonic()
    time.sleep(1.5)
    with open(path, "r+b") as out:
        out.seek(len(data) // 2)
        finisher = threading.Timer(max(0.0, 1.8 - (time.monotonic() - started)),
                                   lambda: (out.write(data[len(data) // 2:]), out.flush()))
        finisher.start()
        try:
            assert env_of([spec_dir]) == "A=1"
        finally:
            finisher.join()
    watcher.wait_trusted()
    assert env_of([spec_dir]) == "A=1"
    assert watcher.stop() == 0
