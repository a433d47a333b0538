"""cdi-hook benchmarks: what the hook costs a container start. Run as root: `bench/run`.

    bench/run [--runs 40] [--podman-runs 20] [--sizes 1,100,1000,10000] [--only runc,podman,scale,watch,memory]
              [--out FILE] [--nice N]

1. runc: `runc run` of a busybox container that runs `true`, in rounds; each round runs
   every way once, in a fresh random order: no hook; an empty Python hook at createRuntime
   only, and the same empty hook at the three stages cdi-hook installs; cdi-hook AS
   INSTALLED, injecting a GPU-like spec (8 device nodes, 24 library mounts, ldconfig):
   every entry `cdi-hook inject --mode hook` writes (createRuntime alone: the device has
   no later work), and that entry at the three stages `install`'s hooks.d files name
   (createRuntime, poststart, poststop, as CRI-O merges them); the same devices written into
   config.json by `cdi-hook inject --mode edits` (runc does the work itself). cdi-hook's
   entries are inject's own; the empty hook is entered the same way (the venv's
   interpreter by its full path, -I, the same explicit environment), with
   `-c 'import sys; sys.stdin.read()'`; an empty module run with `-m` (the entry form of
   installs before 2026-11-30, runpy included) is shown too. Each way's overhead is the
   median of its round-by-round differences from "no hook" (paired: robust to drift and
   load), shown with their quartiles; one post stage is (3 stages - createRuntime
   alone) / 2 in each round. The targets are ratios to ONE empty hook's overhead (the issue's
   yardstick); the ratio to the empty hook at the same three stages is shown beside. A
   ratio's spread is a bootstrap over rounds. One debug-level start per round afterwards
   gives the hook's own per-step timings, and `python -X importtime` its import profile.
2. podman: `podman run --rm` of the same image: no device, native CDI `--device`, cdi-hook
   as the precreate filter and as the live hook (`install --hooks-dir DIR --mode hook`:
   its three files), on a throwaway
   --root/--runroot, in rounds as above.
3. scale: the hook process alone, fed an OCI state (stage poststart: resolve and log, no
   rootfs work) with 1..10,000 spec files (tests/gen_specs.py, 10 devices each), one
   device requested: warm compiled cache without a watcher (a stat per spec file), with
   `cdi-hook watch` running (the generation instead), and cold (no usable cache).
4. watch: with `cdi-hook watch` running (started with $NOTIFY_SOCKET, as systemd would),
   a spec file among 1,000 edited in place: how long until the watcher has seen the change
   (the generation moves), until the cache is trusted again, and that the next start uses it.
5. memory: peak RSS (ru_maxrss from wait4: the hook and the children it reaped) of the
   hook injecting the GPU-like spec under runc, and of the scale runs.

Times are wall-clock, in milliseconds. Prints a markdown report (date, command, machine,
load) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import gen_specs  # noqa: E402  (tests/gen_specs.py: the spec dirs of the scale benchmark)
from oci_env import make_bundle, make_rootfs  # noqa: E402

from cdi_hook.hook_entry import LIVE_HOOK_STAGES  # noqa: E402
from cdi_hook.hook_entry import argv as hook_entry_argv  # noqa: E402  (the entry form install writes)

HOST_NODES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/kvm", "/dev/loop0"]
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
LIBRARY_COUNT = 24
NOOP_CODE = "import sys; sys.stdin.read()"
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
# Targets (issue 23), as ratios to ONE empty Python hook's overhead (the entry at createRuntime
# only) in the same paired rounds: cdi-hook as installed (by inject, by install's hooks.d),
# createRuntime alone, and one post stage with nothing recorded for it.
TARGETS = {"installed": 2.5, "runc": 2.0, "post": 1.0, "podman": 1.25, "scale": 1.2, "edit_s": 1.0, "memory_mib": 40}
BOOTSTRAP = 2000
EMPTY_ONE = "empty Python hook (-c), createRuntime only"
EMPTY_ALL = "empty Python hook (-c) at the same three stages"
HOOK_ONE = "cdi-hook as `inject --mode hook` writes it: createRuntime alone"
HOOK_ALL = "cdi-hook as `install` writes it (hooks.d: createRuntime, poststart, poststop)"
PODMAN_LIVE = "cdi-hook live, as installed (--hooks-dir: createRuntime, poststart, poststop)"


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float]) -> str:
    low, mid, high = stats(values)
    return f"{mid:.1f} ({low:.1f} / {high:.1f})"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def fmt_paired(values: list[float]) -> str:
    q1, q2, q3 = quartiles(values)
    return f"{q2:+.1f} ({q1:+.1f} / {q3:+.1f})"


def timed(argv: list[str], **kwargs) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return elapsed


def rounds(ways: dict, runs: int, run_one) -> dict[str, list[float]]:
    """runs rounds; each runs every way once, in a fresh random order. run_one(value) -> ms."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(runs):
        order = list(ways.items())
        random.shuffle(order)
        for name, value in order:
            times[name].append(run_one(value))
    return times


def paired(values: list[float], base: list[float]) -> list[float]:
    return [v - b for v, b in zip(values, base)]


def ratio_interval(top: list[float], bottom: list[float]) -> tuple[float, float]:
    """A 90% bootstrap interval (over rounds) of median(top) / median(bottom), paired rounds."""
    count = len(top)
    if count < 5:
        ratio = statistics.median(top) / statistics.median(bottom)
        return ratio, ratio
    ratios = []
    for _ in range(BOOTSTRAP):
        picks = [random.randrange(count) for _ in range(count)]
        denominator = statistics.median(bottom[i] for i in picks)
        if denominator > 0:
            ratios.append(statistics.median(top[i] for i in picks) / denominator)
    ratios.sort()
    return ratios[int(len(ratios) * 0.05)], ratios[int(len(ratios) * 0.95) - 1]


class Workspace:
    """A busybox rootfs with a glibc-style etc/ld.so.conf, 24 driver libraries, a GPU-like spec."""

    def __init__(self, root: Path):
        self.root = root
        self.vendor = f"b{uuid.uuid4().hex[:8]}.bench.cdi-hook.example.com"
        self.device = f"{self.vendor}/gpu=gpu0"
        self.rootfs = make_rootfs(root / "rootfs")
        (self.rootfs / "etc" / "ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
        (self.rootfs / "etc" / "ld.so.conf.d").mkdir(exist_ok=True)
        self.driver = root / "driver"
        self.driver.mkdir()
        for library in self._small_libraries():
            shutil.copy2(library, self.driver / library.name)
        self.spec_dir = root / "specs"
        self.spec_dir.mkdir()
        self.spec = self.spec_document()
        (self.spec_dir / "bench.json").write_text(json.dumps(self.spec, indent=2))
        self.cache_dir = root / "cache"  # made by the hook itself, as root, mode 0700
        # its state root (container records, holds): the bench's own, never the host's
        # /run/cdi-hook, and on a tmpfs as /run is on the hosts users run (an fsync there
        # costs nothing; this VM's /run is on its disk, where the record's two cost ~1.3 ms)
        self.state_dir = root / "state" / "held"
        self.log = root / "cdi-hook.log"
        self.python = self._lean_python(root / "venv")
        self.empty_module = self._empty_module(root / "venv")
        self.hook_argv = hook_entry_argv(self.python, "hook")
        (root / "state").mkdir()  # last: main unmounts it (a failure above leaves nothing mounted)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "cdi-bench-state", str(root / "state")],
                       check=True)

    @staticmethod
    def _lean_python(venv: Path) -> str:
        """A venv that sees the repo and the dev venv's packages through a plain .pth path list.

        The dev venv's editable install hook (__editable__ finder) costs every interpreter
        start ~12 ms of imports (pathlib, re, enum...) that a regular install does not: it
        would inflate the empty hook, the yardstick, and flatter cdi-hook's ratio. Both hooks
        run this interpreter instead, as a production venv would.
        """
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        dev_site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        (Workspace._site_packages(venv) / "cdi-hook-bench.pth").write_text(f"{REPO}\n{dev_site}\n")
        return str(venv / "bin" / "python")

    @staticmethod
    def _site_packages(venv: Path) -> Path:
        return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    @staticmethod
    def _empty_module(venv: Path) -> str:
        """An empty package run with -m, like the older `-m cdi_hook` entry: runpy's cost."""
        package = Workspace._site_packages(venv) / "cdi_bench_empty"
        package.mkdir()
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text("import sys\nsys.stdin.read()\n")
        return "cdi_bench_empty"

    @staticmethod
    def _small_libraries() -> list[Path]:
        libraries = sorted((p for p in Path(LIB_DIR).glob("lib*.so.*")
                            if p.is_file() and not p.is_symlink() and p.name.count(".so.") == 1),
                           key=lambda p: p.stat().st_size)
        if len(libraries) < LIBRARY_COUNT:
            raise RuntimeError(f"need {LIBRARY_COUNT} shared libraries in {LIB_DIR}")
        return libraries[:LIBRARY_COUNT]

    def spec_document(self) -> dict:
        nodes = [{"path": f"/dev/cdi-bench/node{i}", "hostPath": host} for i, host in enumerate(HOST_NODES)]
        mounts = [{"hostPath": str(lib), "containerPath": f"/usr/lib/cdi-bench/{lib.name}",
                   "options": ["ro", "nosuid", "nodev", "bind"]} for lib in sorted(self.driver.iterdir())]
        return {"cdiVersion": "0.5.0", "kind": f"{self.vendor}/gpu",
                "devices": [{"name": "gpu0", "containerEdits": {"deviceNodes": nodes, "mounts": mounts}}]}

    def measured(self, argv: list[str], results: Path) -> list[str]:
        """argv run by a wrapper that appends "<wall ms> <ru_maxrss KiB>" of it to results.

        The wrapper is a bare interpreter (-I -S, ~9 MiB): a child's ru_maxrss includes the
        memory it had before exec, which after a fork is the wrapper's, so it must stay small.
        """
        wrapper = self.root / "measure.py"
        if not wrapper.exists():
            wrapper.write_text(
                "import os, sys, time\n"
                "started = time.perf_counter()\n"
                "pid = os.fork()\n"
                "if pid == 0:\n"
                "    os.execv(sys.argv[2], sys.argv[2:])\n"
                "_, status, usage = os.wait4(pid, 0)\n"
                "elapsed = (time.perf_counter() - started) * 1000\n"
                "with open(sys.argv[1], 'a') as out:\n"
                "    out.write(f'{elapsed:.3f} {usage.ru_maxrss}\\n')\n"
                "sys.exit(os.waitstatus_to_exitcode(status))\n")
        return [self.python, "-I", "-S", str(wrapper), str(results)] + argv

    def wait_until_settled(self) -> None:
        """The cache is written only once the spec files are older than cdi_hook.cache.FRESH_NS."""
        from cdi_hook.cache import FRESH_NS

        newest = max(p.stat().st_mtime for p in self.root.rglob("*.json") if self.state_dir.parent not in p.parents)
        time.sleep(max(0.0, newest + FRESH_NS / 1e9 + 0.2 - time.time()))

    def hook_env(self, spec_dirs: list[str] | None = None, cache_dir: str | None = None,
                 extra: dict | None = None) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "CDI_SPEC_DIRS": ":".join(spec_dirs or [str(self.spec_dir)]),
                "CDI_HOOK_LOG": str(self.log),
                "CDI_HOOK_CACHE_DIR": cache_dir or str(self.cache_dir),
                # the bench's own state root: its container records never reach the host's /run/cdi-hook
                "CDI_HOOK_STATE_DIR": str(self.state_dir), **(extra or {})}

    def entry(self, args: list[str], env: dict | None = None) -> dict:
        """A hook entry in the form install writes (hook_entry.py): the interpreter's full
        path, -I, an explicit environment (the same for every Python hook here)."""
        return {"path": self.python, "args": [self.python, "-I", *args],
                "env": [f"{k}={v}" for k, v in (env or self.hook_env()).items()], "timeout": 60}

    def hook_entry(self, argv_prefix: list[str] | None = None, env: dict | None = None) -> dict:
        if argv_prefix:
            argv = argv_prefix + self.hook_argv + ["--stage", "createRuntime"]
            return {"path": argv[0], "args": argv, "env": [f"{k}={v}" for k, v in (env or self.hook_env()).items()],
                    "timeout": 60}
        return self.entry(self.hook_argv[2:] + ["--stage", "createRuntime"], env)


# ---------------------------------------------------------------------------------------
# 1. runc


def installed_bundle(ws: Workspace, bundle: Path, mode: str = "hook", args: list[str] | None = None) -> Path:
    """A bundle given the bench device by `cdi-hook inject --mode MODE`, run by the bench's
    interpreter with the bench's settings: --mode hook writes every entry it writes for a
    user (createRuntime, poststart, poststop), exactly as it writes them."""
    make_bundle(bundle, args or ["true"], rootfs=ws.rootfs)
    subprocess.run([ws.python, "-I", "-m", "cdi_hook", "inject", "--bundle", str(bundle), "--device", ws.device,
                    "--mode", mode], env=ws.hook_env(), check=True, capture_output=True)
    return bundle


def every_stage(source: Path, bundle: Path) -> Path:
    """A copy of source's config.json (the same rootfs) with its createRuntime entry at every
    stage install's hooks.d files name, as the runtime merges those files in: the same
    interpreter, code and env, the stage's name last."""
    bundle.mkdir()
    config = json.loads((source / "config.json").read_text())
    entry = config["hooks"]["createRuntime"][0]
    config["hooks"] = {stage: [dict(entry, args=entry["args"][:-1] + [stage])] for stage in LIVE_HOOK_STAGES}
    (bundle / "config.json").write_text(json.dumps(config, indent=2))
    return bundle


def bench_runc(ws: Workspace, runs: int) -> dict:
    annotations = {"cdi.k8s.io/bench": ws.device}
    installed = installed_bundle(ws, ws.root / "b-installed")
    stages = tuple(json.loads((installed / "config.json").read_text())["hooks"])
    if stages != ("createRuntime",):  # the bench device has no later work: no post entries
        raise RuntimeError(f"inject --mode hook wrote entries for {stages}, the bench expects createRuntime alone")
    empty = ws.entry(["-c", NOOP_CODE])
    bundles = {
        "no hook": make_bundle(ws.root / "b-none", ["true"], rootfs=ws.rootfs),
        EMPTY_ONE: make_bundle(ws.root / "b-noop", ["true"], rootfs=ws.rootfs, hooks={"createRuntime": [empty]}),
        EMPTY_ALL: make_bundle(ws.root / "b-noop-3", ["true"], rootfs=ws.rootfs,
                               hooks={stage: [empty] for stage in LIVE_HOOK_STAGES}),
        "empty Python module (-m), createRuntime": make_bundle(ws.root / "b-noop-m", ["true"], rootfs=ws.rootfs, hooks={
            "createRuntime": [ws.entry(["-m", ws.empty_module])]}),
        HOOK_ONE: installed,
        HOOK_ALL: every_stage(installed, ws.root / "b-cdi-3"),
        "same devices by inject --mode edits": installed_bundle(ws, ws.root / "b-edits", "edits"),
    }
    check = installed_bundle(ws, ws.root / "b-check", args=["sh", "-c", "ls /dev/cdi-bench | wc -l; "
                                                                       "ls /usr/lib/cdi-bench | wc -l"])
    ld_cache = ws.rootfs / "etc" / "ld.so.cache"
    ld_cache.unlink(missing_ok=True)
    out = runc_run(check, capture=True).split()
    if out != [str(len(HOST_NODES)), str(LIBRARY_COUNT)]:
        raise RuntimeError(f"cdi-hook did not inject the bench device: container saw {out}")
    if not ld_cache.exists():
        raise RuntimeError("cdi-hook did not run ldconfig in the bench rootfs")
    prune_records(ws)
    ws.wait_until_settled()
    for _ in range(3):  # warm up: page cache, the registry cache, the remembered ldconfig run
        for bundle in bundles.values():
            runc_run(bundle)
    times = rounds(bundles, runs, lambda bundle: _timed_runc(bundle))
    prune_records(ws)
    # Where the time goes: the hook's own per-step log (debug level) and its import profile.
    debug = make_bundle(ws.root / "b-debug", ["true"], rootfs=ws.rootfs, annotations=annotations,
                        hooks={"createRuntime": [ws.hook_entry(env=ws.hook_env(extra={"CDI_HOOK_LOG_LEVEL": "debug"}))]})
    log_start = ws.log.stat().st_size
    for _ in range(max(5, runs // 4)):
        runc_run(debug)
    with ws.log.open() as log:
        log.seek(log_start)
        lines = [json.loads(line) for line in log if line.strip()]
    times["steps"] = lines
    times["imports"] = import_profile(ws, annotations)
    return times


def prune_records(ws: Workspace) -> None:
    """Remove the records of the bench's ended containers that no poststop removed (inject's
    createRuntime-only bundles), as `cdi-hook stale` or the watcher does on a node; any
    record left then is a poststop's failure."""
    subprocess.run([ws.python, "-I", "-m", "cdi_hook", "stale"], env=ws.hook_env(), check=True, capture_output=True)
    records = ws.root / "state" / "containers"
    if list(records.iterdir()) if records.is_dir() else False:
        raise RuntimeError(f"a container record was left behind in {records}")


def _timed_runc(bundle: Path) -> float:
    started = time.perf_counter()
    runc_run(bundle)
    return (time.perf_counter() - started) * 1000


def import_profile(ws: Workspace, annotations: dict) -> list[tuple[str, int]]:
    """(module, self µs) from `python -X importtime` of one hook start under runc."""
    out = ws.root / "importtime.txt"
    entry = ws.hook_entry()
    entry["path"] = "/bin/sh"
    entry["args"] = ["sh", "-c", f'exec "$@" 2>>{out}', "sh", entry["args"][0], "-X", "importtime"] + entry["args"][1:]
    bundle = make_bundle(ws.root / "b-importtime", ["true"], rootfs=ws.rootfs, annotations=annotations,
                         hooks={"createRuntime": [entry]})
    runc_run(bundle)
    out.unlink()
    runc_run(bundle)
    profile = []
    for line in out.read_text().splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            own, _, name = line[len("import time:"):].split("|")
            profile.append((name.strip(), int(own)))
    return profile


def runc_run(bundle: Path, capture: bool = False) -> str:
    cid = "cdi-bench-" + uuid.uuid4().hex[:12]
    try:
        result = subprocess.run(["runc", "run", "--bundle", str(bundle), cid], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["runc", "delete", "--force", cid], capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"runc run {bundle.name} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout


# ---------------------------------------------------------------------------------------
# 2. podman


def bench_podman(ws: Workspace, runs: int) -> dict:
    store = ws.root / "podman"
    image = f"localhost/cdi-bench-{uuid.uuid4().hex[:8]}"
    podman = ["podman", "--root", str(store / "root"), "--runroot", str(store / "runroot"),
              "--storage-driver", "vfs", "--runtime", "runc", "--cgroup-manager", "cgroupfs",
              "--events-backend", "none"]
    tar = subprocess.Popen(["tar", "-C", str(ws.rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(podman + ["import", "-", image], stdin=tar.stdout, check=True, capture_output=True)
    tar.wait()
    when = {"annotations": {r"^cdi\.k8s\.io/": ".*"}}
    live_hooks = ws.root / "hooks.live"  # as `install --hooks-dir DIR` writes it: one file per stage
    subprocess.run([ws.python, "-I", "-m", "cdi_hook", "install", "--hooks-dir", str(live_hooks), "--mode", "hook", "--no-logrotate"],
                   env=ws.hook_env(), check=True, capture_output=True)
    if len(list(live_hooks.iterdir())) != len(LIVE_HOOK_STAGES):
        raise RuntimeError(f"install --hooks-dir wrote {sorted(p.name for p in live_hooks.iterdir())}")
    precreate_hooks = ws.root / "hooks.precreate"
    precreate_hooks.mkdir()
    (precreate_hooks / "cdi-hook-precreate.json").write_text(json.dumps({
        "version": "1.0.0", "hook": ws.entry(hook_entry_argv(ws.python, "precreate")[2:]), "when": when, "stages": ["precreate"]}))
    empty_hooks = ws.root / "hooks.none"
    empty_hooks.mkdir()
    # Native CDI reads only /etc/cdi and /var/run/cdi: a uniquely named file, removed after.
    native_spec = Path("/var/run/cdi") / f"{ws.vendor}.json"
    native_spec.parent.mkdir(parents=True, exist_ok=True)
    native_spec.write_text(json.dumps(ws.spec))
    run = podman + ["run", "--rm", "--net", "none"] + PODMAN_ULIMITS
    annotation = ["--annotation", f"cdi.k8s.io/bench={ws.device}"]
    ways = {
        "no device": run + ["--hooks-dir", str(empty_hooks), image, "true"],
        "native CDI --device": run + ["--hooks-dir", str(empty_hooks), "--device", ws.device, image, "true"],
        "cdi-hook precreate": run + ["--hooks-dir", str(precreate_hooks)] + annotation + [image, "true"],
        PODMAN_LIVE: run + ["--hooks-dir", str(live_hooks)] + annotation + [image, "true"],
    }
    try:
        for way in ("native CDI --device", "cdi-hook precreate", PODMAN_LIVE):
            check = subprocess.run(ways[way][:-1] + ["sh", "-c", "ls /dev/cdi-bench | wc -l; ls /usr/lib/cdi-bench | wc -l"],
                                   capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if check.stdout.split() != [str(len(HOST_NODES)), str(LIBRARY_COUNT)]:
                raise RuntimeError(f"podman {way} did not inject: {check.stdout!r} {check.stderr.strip()[-1000:]}")
        ws.wait_until_settled()
        for argv in ways.values():
            timed(argv)
        return rounds(ways, runs, timed)
    finally:
        native_spec.unlink(missing_ok=True)
        subprocess.run(podman + ["rmi", "--force", image], capture_output=True)
        subprocess.run(["umount", "-R", str(store)], capture_output=True)
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# 3. registry scale, with and without the watcher; 4. the watcher's latency; 5. memory


def run_hook(ws: Workspace, state: bytes, env: dict[str, str], stage: str) -> tuple[float, int]:
    """(wall ms, ru_maxrss KiB) of one hook process fed an OCI state, as the wrapper saw them.

    Through the small wrapper, not spawned from here: a child's ru_maxrss counts the memory
    it had before exec, and a child of this process would start with this process's.
    """
    results = ws.root / "run_hook.txt"
    results.unlink(missing_ok=True)
    result = subprocess.run(ws.measured(ws.hook_argv + ["--stage", stage], results), input=state, env=env,
                            capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"hook failed at {stage} (exit {result.returncode}): {result.stderr.decode()[-2000:]}")
    elapsed, maxrss = results.read_text().split()
    return float(elapsed), int(maxrss)


class Watcher:
    """`cdi-hook watch` for some spec dirs, started as systemd would (Type=notify): ready when
    it says READY=1 on $NOTIFY_SOCKET."""

    def __init__(self, ws: Workspace, spec_dirs: list[str], cache_dir: str, timeout: float = 300):
        self.socket_path = ws.root / f"notify-{uuid.uuid4().hex[:8]}"
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(self.socket_path))
        env = ws.hook_env(spec_dirs, cache_dir, {"NOTIFY_SOCKET": str(self.socket_path)})
        self.started = time.perf_counter()
        self.process = subprocess.Popen([ws.python, "-I", "-m", "cdi_hook", "watch"], env=env,
                                        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.socket.settimeout(timeout)
        while b"READY=1" not in self.socket.recv(4096):
            pass
        self.ready_s = time.perf_counter() - self.started
        self.dirs = tuple(spec_dirs)
        self.cache_dir = cache_dir

    def generation(self):
        """What a hook start reads: the watcher's generation, None while it does not vouch."""
        from cdi_hook import cache, settings

        return cache.watched_generation(self.dirs, settings=settings.current()._replace(cache_dir=self.cache_dir))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.communicate(timeout=30)
        self.socket.close()
        self.socket_path.unlink(missing_ok=True)


def bench_scale(ws: Workspace, sizes: list[int], runs: int, cold_runs: int) -> dict:
    bundle = ws.root / "scale-bundle"
    bundle.mkdir()
    requested = "vendor0.example.com/gpu=gpu3"
    (bundle / "config.json").write_text(json.dumps({
        "ociVersion": "1.0.2", "root": {"path": "rootfs"}, "process": {"args": ["true"], "cwd": "/"},
        "annotations": {"cdi.k8s.io/bench": requested}}))
    state = json.dumps({"ociVersion": "1.0.2", "id": "cdi-bench-scale", "status": "running", "pid": os.getpid(),
                        "bundle": str(bundle)}).encode()
    dirs = {}
    for size in sizes:
        dirs[size] = ws.root / f"scale-{size}"
        gen_specs.generate(str(dirs[size]), files=size, devices=10)
    ws.wait_until_settled()
    results = {}
    no_cache = str(ws.root / "no-such-dir" / "cache")  # its parent is missing: never read nor written
    for size in sizes:
        spec_dirs = [str(dirs[size])]
        warm_env = ws.hook_env(spec_dirs, str(ws.root / f"cache-{size}"))
        watched_env = ws.hook_env(spec_dirs, str(ws.root / f"cache-watched-{size}"))
        cold_env = ws.hook_env(spec_dirs, no_cache)
        run_hook(ws, state, warm_env, "poststart")  # builds the cache
        watcher = Watcher(ws, spec_dirs, watched_env["CDI_HOOK_CACHE_DIR"])
        try:
            if watcher.generation() is None:
                raise RuntimeError(f"the watcher of {size} spec files is ready but not trusted")
            run_hook(ws, state, watched_env, "poststart")
            measured = rounds({"warm": warm_env, "watched": watched_env}, runs,
                              lambda env: run_hook(ws, state, env, "poststart"))
            watcher_rss = watcher.rss_kib()
        finally:
            watcher.stop()
        cold = [run_hook(ws, state, cold_env, "poststart") for _ in range(cold_runs if size < 10000 else min(cold_runs, 3))]
        results[size] = {"warm": measured["warm"], "watched": measured["watched"], "cold": cold,
                         "watcher_ready_s": watcher.ready_s, "watcher_rss_kib": watcher_rss}
    return results


def bench_watch(ws: Workspace, files: int, edits: int) -> dict:
    """An in-place edit of one spec among `files`: until the watcher has seen it (its
    generation moves), until the cache is trusted again, and whether the next start uses it."""
    from cdi_hook import cache, plan, settings

    spec_dir = ws.root / f"watch-{files}"
    gen_specs.generate(str(spec_dir), files=files, devices=10)
    ws.wait_until_settled()
    cache_dir = str(ws.root / "cache-watch")
    watcher = Watcher(ws, [str(spec_dir)], cache_dir)
    target = spec_dir / "vendor0.json"
    seen, trusted, used = [], [], []
    old_settings = settings.current()
    settings.use(old_settings._replace(cache_dir=cache_dir))  # what the hook's cache.select reads
    try:
        for edit in range(edits):
            before = watcher.generation()
            document = json.loads(target.read_text())
            value = f"GPU_0=edit{edit:04d}"  # the same length each time: an in-place edit of the same size
            document["devices"][0]["containerEdits"]["env"] = [value]
            text = json.dumps(document, indent=2)
            started = time.perf_counter()
            with open(target, "r+") as out:  # in place: the same inode, written and truncated
                out.write(text)
                out.truncate()
            written = time.perf_counter()
            while watcher.generation() == before:
                if time.perf_counter() - written > 10:
                    raise RuntimeError("the watcher did not see an in-place edit within 10 s")
            seen.append((time.perf_counter() - written) * 1000)
            selection = cache.select(["vendor0.example.com/gpu=gpu0"], [str(spec_dir)])
            used.append(plan.build(selection, stat_host=False).env[-1][1] == value)
            while watcher.generation() is None:
                if time.perf_counter() - written > 30:
                    raise RuntimeError("the watcher did not trust the cache again within 30 s")
                time.sleep(0.001)
            trusted.append((time.perf_counter() - started) * 1000)
            selection = cache.select(["vendor0.example.com/gpu=gpu0"], [str(spec_dir)])
            used.append(plan.build(selection, stat_host=False).env[-1][1] == value)
            time.sleep(0.05)
    finally:
        watcher.stop()
        settings.use(old_settings)
    return {"files": files, "seen": seen, "trusted": trusted, "used": used}


def bench_memory(ws: Workspace, runs: int) -> list[int]:
    """ru_maxrss of the hook injecting the GPU-like spec at createRuntime under runc."""
    results = ws.root / "maxrss.txt"
    entry = ws.hook_entry(ws.measured([], results))
    bundle = make_bundle(ws.root / "b-mem", ["true"], rootfs=ws.rootfs,
                         annotations={"cdi.k8s.io/bench": ws.device}, hooks={"createRuntime": [entry]})
    for _ in range(runs):
        runc_run(bundle)
    return [int(line.split()[1]) for line in results.read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    versions = []
    for tool in (["runc", "--version"], ["podman", "--version"]):
        try:
            versions.append(subprocess.run(tool, capture_output=True, text=True).stdout.splitlines()[0])
        except (OSError, IndexError):
            pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def report(args, results: dict) -> str:
    lines = [f"## cdi-hook benchmarks, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Command: `{shlex.join(['bench/run'] + sys.argv[1:])}` (as root)  ",
             f"Machine: {machine()}  ",
             "Times in ms: median (min / max); overheads: median of the paired differences "
             "(first / third quartile)."]
    if results.get("load"):
        lines[-1] += "  "
        lines.append(f"1-minute load average before and after each benchmark: "
                     f"{', '.join(f'{value:.2f}' for value in results['load'])} ({os.cpu_count()} CPUs)")
    lines.append("")
    verdicts = []
    if "runc" in results:
        lines += _report_runc(results["runc"], verdicts)
    if "podman" in results:
        t = results["podman"]
        base = t["no device"]
        lines += [f"### 2. podman run --rm of the same image ({len(base)} rounds, random order in each)", "",
                  "| way | time | over no device |", "|---|---|---|"]
        lines += [f"| {name} | {fmt(values)} | {fmt_paired(paired(values, base))} |" for name, values in t.items()]
        native = t["native CDI --device"]
        for way in (PODMAN_LIVE, "cdi-hook precreate"):
            if way in t:
                low, high = ratio_interval(t[way], native)
                verdicts.append((f"podman: {way} / native --device", statistics.median(t[way]) / statistics.median(native),
                                 f"{low:.2f}–{high:.2f}", TARGETS["podman"]))
        lines.append("")
    if "scale" in results:
        lines += _report_scale(results["scale"], verdicts)
    if "watch" in results:
        w = results["watch"]
        lines += [f"### 4. an in-place edit with `cdi-hook watch` running ({w['files']:,} spec files, "
                  f"{len(w['seen'])} edits)", "",
                  "| from the write to | time |", "|---|---|",
                  f"| the watcher has seen it (its generation moves: every later start checks the files) | "
                  f"{fmt(w['seen'])} |",
                  f"| the rebuilt cache is trusted again (every later start skips the per-file checks) | "
                  f"{fmt(w['trusted'])} |", "",
                  f"A start right after each of these points used the edited spec: {sum(w['used'])} of "
                  f"{len(w['used'])}.", ""]
        verdicts.append(("watch: an in-place edit seen (s, slowest)", max(w["seen"]) / 1000,
                         f"{statistics.median(w['seen']) / 1000:.4f} median", TARGETS["edit_s"]))
        if not all(w["used"]):
            verdicts.append(("watch: every start after the watcher saw the edit used it", 0, "", 1))
    if "memory" in results:
        rss = results["memory"]
        peak = max(rss) / 1024
        lines += ["### 5. peak memory of the hook (ru_maxrss of the hook process and the children it reaped)", "",
                  f"GPU-like injection under runc, {len(rss)} runs: min {min(rss) / 1024:.1f}, "
                  f"median {statistics.median(rss) / 1024:.1f}, max {peak:.1f} MiB", ""]
        verdicts.append(("memory: peak RSS of the hook (MiB)", peak, "", TARGETS["memory_mib"]))
    lines += ["### Targets", "",
              "| measure | value | spread | target | met |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {spread} | <= {target} | {'yes' if value <= target else '**no**'} |"
              if target != float("inf") else f"| {name} | {value:.2f} | {spread} | | |"
              for name, value, spread, target in verdicts]
    return "\n".join(lines) + "\n"


def _report_runc(t: dict, verdicts: list) -> list[str]:
    t = dict(t)
    steps = t.pop("steps", [])
    imports = t.pop("imports", [])
    none = t["no hook"]
    lines = [f"### 1. runc run of a busybox container ({len(none)} rounds, random order in each)", "",
             "| way | time | overhead over no hook |", "|---|---|---|"]
    for name, values in t.items():
        lines.append(f"| {name} | {fmt(values)} | {fmt_paired(paired(values, none))} |")
    noop, noop_all = paired(t[EMPTY_ONE], none), paired(t.get(EMPTY_ALL, t[EMPTY_ONE]), none)
    hook = paired(t[HOOK_ONE], none)
    # inject --mode hook writes createRuntime alone for the bench device (no later work): as
    # installed by inject and createRuntime alone are the same runs, held to both targets
    measures = [("runc: cdi-hook as `inject --mode hook` installs it (createRuntime alone)", hook, "installed"),
                ("runc: cdi-hook createRuntime alone", hook, "runc")]
    if HOOK_ALL in t:
        installed = paired(t[HOOK_ALL], none)
        # one post stage, in the same rounds: half of what the two post entries add to createRuntime
        post = [(a - b) / 2 for a, b in zip(t[HOOK_ALL], t[HOOK_ONE])]
        measures = [("runc: cdi-hook as `install` installs it (hooks.d, 3 stages)", installed, "installed")] + measures + [
            ("runc: one post stage, nothing recorded for it ((3 stages - createRuntime alone) / 2)", post, "post")]
        lines += ["", "Per post stage, paired in each round: (3 stages - createRuntime alone) / 2 "
                  f"{fmt_paired(post)}; the empty hook's own, (three stages - one) / 2 "
                  f"{fmt_paired([(a - b) / 2 for a, b in zip(t.get(EMPTY_ALL, t[EMPTY_ONE]), t[EMPTY_ONE])])}."]
    for name, values, target in measures:
        low, high = ratio_interval(values, noop)
        verdicts.append((f"{name} / ONE empty Python hook's (-c)", statistics.median(values) / statistics.median(noop),
                         f"{low:.2f}–{high:.2f} (90% bootstrap)", TARGETS[target]))
    if HOOK_ALL in t:  # the other yardstick, for reference: the empty hook at the same three stages
        low, high = ratio_interval(installed, noop_all)
        verdicts.append(("runc: cdi-hook at 3 stages / the empty hook at the same three stages (no target)",
                         statistics.median(installed) / statistics.median(noop_all), f"{low:.2f}–{high:.2f}",
                         float("inf")))
    module_way = next((name for name in t if name.startswith("empty Python module (-m)")), None)
    if module_way:
        module = paired(t[module_way], none)
        low, high = ratio_interval(hook, module)
        verdicts.append(("runc: cdi-hook createRuntime alone / empty module's (-m, the older entry form; no target)",
                         statistics.median(hook) / statistics.median(module), f"{low:.2f}–{high:.2f}",
                         float("inf")))
    lines += ["", f"cdi-hook: {len(HOST_NODES)} device nodes, {LIBRARY_COUNT} library mounts, ldconfig (remembered "
              "after the first start). Every Python hook runs the same interpreter (a venv without the dev "
              "install's editable-finder .pth, as in production), by its full path, with -I and the same "
              "explicit environment, as `cdi-hook install` writes hooks.", ""]
    if steps:
        names: dict[str, list[float]] = {}
        for line in steps:
            for name, ms in line.get("steps_ms", {}).items():
                names.setdefault(name, []).append(ms)
        lines += [f"The hook's own log line at debug level ({len(steps)} starts; duration_ms counts from "
                  f"the request being known to the end): duration_ms {fmt([s['duration_ms'] for s in steps])}; "
                  "steps (median ms): " + ", ".join(f"{name} {statistics.median(v):.2f}" for name, v in names.items())
                  + ". Fork to report are the worker's own steps (the \"worker\" step is the hook's wait, fork "
                  "included); the device cgroup runs beside the worker.", ""]
    if imports:
        ours = sum(us for name, us in imports if name.startswith("cdi_hook"))
        total = sum(us for _, us in imports)
        runpy = sum(us for name, us in imports if name in ("runpy", "importlib.util", "contextlib", "importlib.machinery"))
        top = sorted(imports, key=lambda item: -item[1])[:8]
        # install writes `-c` entries: runpy's modules show only for an older `-m` entry.
        entry = (f"; runpy's (an older `-m` entry, not what install writes: runpy, importlib.util, contextlib, "
                 f"importlib.machinery) {runpy / 1000:.1f} ms" if runpy else "")
        lines += [f"Import profile of one start (`-X importtime`, self times): {total / 1000:.1f} ms in all, of "
                  f"which cdi_hook's modules {ours / 1000:.1f} ms{entry}; "
                  "the largest: " + ", ".join(f"{name} {us / 1000:.2f}" for name, us in top) + ".", ""]
    return lines


def _report_scale(t: dict, verdicts: list) -> list[str]:
    lines = ["### 3. hook process fed a state, one device requested (stage poststart: resolve + log)", "",
             "| spec files | warm cache | with `cdi-hook watch` | cold (no cache) | peak RSS warm / cold (MiB) "
             "| watcher ready (s) / its RSS (MiB) |", "|---|---|---|---|---|---|"]
    for size, r in t.items():
        warm, watched = [w for w, _ in r["warm"]], [w for w, _ in r["watched"]]
        cold = [c for c, _ in r["cold"]]
        lines.append(f"| {size:,} | {fmt(warm)} | {fmt(watched)} | {fmt(cold)} | "
                     f"{max(m for _, m in r['warm']) / 1024:.1f} / {max(m for _, m in r['cold']) / 1024:.1f} | "
                     f"{r['watcher_ready_s']:.1f} / {r['watcher_rss_kib'] / 1024:.1f} |")
    sizes = sorted(t)
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        for kind, label in (("watched", "with the watcher"), ("warm", "without the watcher")):
            at_last, at_first = [w for w, _ in t[last][kind]], [w for w, _ in t[first][kind]]
            low, high = ratio_interval(at_last, at_first)
            target = TARGETS["scale"] if kind == "watched" else float("inf")
            verdicts.append((f"scale: hook at {last:,} spec files / at {first:,}, {label}",
                             statistics.median(at_last) / statistics.median(at_first), f"{low:.2f}–{high:.2f}",
                             target))
    lines.append("")
    return lines


def run_benchmarks(ws: Workspace, args: argparse.Namespace, only: set[str], sizes: list[int], results: dict) -> None:
    if "runc" in only:
        results["runc"] = bench_runc(ws, args.runs)
        results["load"].append(os.getloadavg()[0])
    if "podman" in only:
        results["podman"] = bench_podman(ws, args.podman_runs)
        results["load"].append(os.getloadavg()[0])
    if "scale" in only:
        results["scale"] = bench_scale(ws, sizes, max(3, args.runs // 2), args.cold_runs)
        results["load"].append(os.getloadavg()[0])
    if "watch" in only:
        # 1,000 files at most: each edit waits for the rebuilt cache (~1 s at 1,000, ~10 s at 10,000)
        results["watch"] = bench_watch(ws, min(max(sizes), 1000), args.edits)
        results["load"].append(os.getloadavg()[0])
    if "memory" in only:
        results["memory"] = bench_memory(ws, max(3, args.runs // 4))
        results["load"].append(os.getloadavg()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="rounds of the runc benchmark and scale runs (default 40)")
    parser.add_argument("--podman-runs", type=int, default=15, help="rounds of the podman benchmark (default 15)")
    parser.add_argument("--cold-runs", type=int, default=3, help="runs without cache per size (default 3)")
    parser.add_argument("--sizes", default="1,100,1000,10000", help="spec file counts for the scale benchmark")
    parser.add_argument("--edits", type=int, default=10, help="in-place edits timed with the watcher (default 10)")
    parser.add_argument("--only", default="runc,podman,scale,watch,memory", help="comma-separated benchmarks to run")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness increment for the bench and everything it starts (e.g. -10 on a "
                             "machine shared with other work; shown in the report's command line)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (runc, podman, device nodes)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    unknown = only - {"runc", "podman", "scale", "watch", "memory"}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.nice:
        os.nice(args.nice)
    results: dict = {"load": [os.getloadavg()[0]]}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp:
        ws = Workspace(Path(tmp))
        try:
            run_benchmarks(ws, args, only, sizes, results)
        finally:
            subprocess.run(["umount", str(ws.state_dir.parent)], check=True)
    text = report(args, results)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
