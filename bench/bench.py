"""cdi-hook benchmarks: what the hook costs a container start. Run as root: `bench/run`.

    bench/run [--runs 20] [--sizes 1,100,1000,10000] [--only runc,podman,scale,memory] [--out FILE] [--nice N]

1. runc: `runc run` of a busybox container that runs `true`, three ways interleaved run by
   run: no hook; a no-op Python hook (the same interpreter as the hook, reading its stdin;
   both run from a lean venv, see Workspace._lean_python);
   cdi-hook at createRuntime injecting a GPU-like spec (8 device nodes, 24 library mounts,
   ldconfig). Overhead = hook - no hook, and its ratio to the no-op hook's overhead.
2. podman: `podman run --rm` of the same image, native CDI `--device` against cdi-hook
   through `--hooks-dir` (and no device, for context), on a throwaway --root/--runroot.
3. scale: the hook process alone, fed an OCI state (stage poststart: resolve and log, no
   rootfs work) with 1..10,000 spec files (tests/gen_specs.py, 10 devices each), one
   device requested; warm compiled cache, and cold (no usable cache) for contrast.
4. memory: peak RSS (ru_maxrss from wait4: the hook and the children it reaped) of the hook
   injecting the GPU-like spec under runc, and of the scale runs.

Times are wall-clock medians with min and max; all in milliseconds. Prints a markdown
report (date, command, machine) on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import gen_specs  # noqa: E402  (tests/gen_specs.py: the spec dirs of the scale benchmark)
from oci_env import make_bundle, make_rootfs  # noqa: E402

HOST_NODES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/kvm", "/dev/loop0"]
LIB_DIR = "/usr/lib/x86_64-linux-gnu"
LIBRARY_COUNT = 24
NOOP_CODE = "import sys; sys.stdin.read()"
PODMAN_ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
TARGETS = {"runc": 1.5, "podman": 1.25, "scale": 1.2, "memory_mib": 40}


def stats(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def fmt(values: list[float]) -> str:
    low, mid, high = stats(values)
    return f"{mid:.1f} ({low:.1f} / {high:.1f})"


def timed(argv: list[str], **kwargs) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, **kwargs)
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return elapsed


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
        self.log = root / "cdi-hook.log"
        self.python = self._lean_python(root / "venv")
        self.noop_hook = [self.python, "-I", "-c", NOOP_CODE]
        self.hook_argv = [self.python, "-I", "-m", "cdi_hook", "hook"]

    @staticmethod
    def _lean_python(venv: Path) -> str:
        """A venv that sees the repo and the dev venv's packages through a plain .pth path list.

        The dev venv's editable install hook (__editable__ finder) costs every interpreter
        start ~12 ms of imports (pathlib, re, enum...) that a regular install does not: it
        would inflate the no-op hook, the yardstick, and flatter cdi-hook's ratio. Both hooks
        run this interpreter instead, as a production venv would.
        """
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        dev_site = next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (venv / "lib" / version / "site-packages" / "cdi-hook-bench.pth").write_text(f"{REPO}\n{dev_site}\n")
        return str(venv / "bin" / "python")

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

        newest = max(p.stat().st_mtime for p in self.root.rglob("*.json"))
        time.sleep(max(0.0, newest + FRESH_NS / 1e9 + 0.2 - time.time()))

    def hook_env(self, spec_dirs: list[str] | None = None, cache_dir: str | None = None) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "CDI_SPEC_DIRS": ":".join(spec_dirs or [str(self.spec_dir)]),
                "CDI_HOOK_LOG": str(self.log),
                "CDI_HOOK_CACHE_DIR": cache_dir or str(self.cache_dir)}

    def hook_entry(self, argv_prefix: list[str] | None = None) -> dict:
        argv = (argv_prefix or []) + self.hook_argv + ["--stage", "createRuntime"]
        return {"path": argv[0], "args": argv, "env": [f"{k}={v}" for k, v in self.hook_env().items()],
                "timeout": 60}


# ---------------------------------------------------------------------------------------
# 1. runc


def bench_runc(ws: Workspace, runs: int) -> dict:
    annotations = {"cdi.k8s.io/bench": ws.device}
    bundles = {
        "no hook": make_bundle(ws.root / "b-none", ["true"], rootfs=ws.rootfs),
        "no-op Python hook": make_bundle(ws.root / "b-noop", ["true"], rootfs=ws.rootfs, hooks={
            "createRuntime": [{"path": ws.python, "args": ws.noop_hook, "timeout": 60}]}),
        "cdi-hook": make_bundle(ws.root / "b-cdi", ["true"], rootfs=ws.rootfs, annotations=annotations,
                                hooks={"createRuntime": [ws.hook_entry()]}),
    }
    check = make_bundle(ws.root / "b-check", ["sh", "-c", "ls /dev/cdi-bench | wc -l; ls /usr/lib/cdi-bench | wc -l"],
                        rootfs=ws.rootfs, annotations=annotations, hooks={"createRuntime": [ws.hook_entry()]})
    ld_cache = ws.rootfs / "etc" / "ld.so.cache"
    ld_cache.unlink(missing_ok=True)
    out = runc_run(check, capture=True).split()
    if out != [str(len(HOST_NODES)), str(LIBRARY_COUNT)]:
        raise RuntimeError(f"cdi-hook did not inject the bench device: container saw {out}")
    if not ld_cache.exists():
        raise RuntimeError("cdi-hook did not run ldconfig in the bench rootfs")
    ws.wait_until_settled()
    for bundle in bundles.values():  # warm up page cache and the registry cache
        runc_run(bundle)
    times: dict[str, list[float]] = {name: [] for name in bundles}
    log_start = ws.log.stat().st_size
    for _ in range(runs):
        for name, bundle in bundles.items():
            started = time.perf_counter()
            runc_run(bundle)
            times[name].append((time.perf_counter() - started) * 1000)
    with ws.log.open() as log:
        log.seek(log_start)
        times["logged"] = [json.loads(line)["duration_ms"] for line in log if line.strip()]
    return times


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
    hooks_dir = ws.root / "hooks.d"
    hooks_dir.mkdir()
    (hooks_dir / "cdi-hook.json").write_text(json.dumps({
        "version": "1.0.0", "hook": ws.hook_entry(), "when": {"annotations": {r"^cdi\.k8s\.io/": ".*"}},
        "stages": ["createRuntime"]}))
    empty_hooks = ws.root / "hooks.none"
    empty_hooks.mkdir()
    # Native CDI reads only /etc/cdi and /var/run/cdi: a uniquely named file, removed after.
    native_spec = Path("/var/run/cdi") / f"{ws.vendor}.json"
    native_spec.parent.mkdir(parents=True, exist_ok=True)
    native_spec.write_text(json.dumps(ws.spec))
    run = podman + ["run", "--rm", "--net", "none"] + PODMAN_ULIMITS
    ways = {
        "no device": run + ["--hooks-dir", str(empty_hooks), image, "true"],
        "native CDI --device": run + ["--hooks-dir", str(empty_hooks), "--device", ws.device, image, "true"],
        "cdi-hook (--hooks-dir)": run + ["--hooks-dir", str(hooks_dir), "--annotation",
                                         f"cdi.k8s.io/bench={ws.device}", image, "true"],
    }
    try:
        for way in ("native CDI --device", "cdi-hook (--hooks-dir)"):
            check = subprocess.run(ways[way][:-1] + ["sh", "-c", "ls /dev/cdi-bench | wc -l; ls /usr/lib/cdi-bench | wc -l"],
                                   capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if check.stdout.split() != [str(len(HOST_NODES)), str(LIBRARY_COUNT)]:
                raise RuntimeError(f"podman {way} did not inject: {check.stdout!r} {check.stderr.strip()[-1000:]}")
        ws.wait_until_settled()
        for argv in ways.values():
            timed(argv)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(runs):
            for name, argv in ways.items():
                times[name].append(timed(argv))
        return times
    finally:
        native_spec.unlink(missing_ok=True)
        subprocess.run(podman + ["rmi", "--force", image], capture_output=True)
        subprocess.run(["umount", "-R", str(store)], capture_output=True)
        shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# 3. registry scale and 4. memory


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
        warm_env = ws.hook_env([str(dirs[size])], str(ws.root / f"cache-{size}"))
        cold_env = ws.hook_env([str(dirs[size])], no_cache)
        run_hook(ws, state, warm_env, "poststart")  # builds the cache
        warm = [run_hook(ws, state, warm_env, "poststart") for _ in range(runs)]
        cold = [run_hook(ws, state, cold_env, "poststart") for _ in range(cold_runs)]
        results[size] = {"warm": warm, "cold": cold}
    return results


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
             "Times in ms: median (min / max)."]
    if results.get("load"):
        lines[-1] += "  "
        lines.append(f"1-minute load average before and after each benchmark: "
                     f"{', '.join(f'{value:.2f}' for value in results['load'])} ({os.cpu_count()} CPUs)")
    lines.append("")
    verdicts = []
    if "runc" in results:
        t = dict(results["runc"])
        logged = t.pop("logged", [])
        none = t["no hook"]

        def paired(values):  # median of the round-by-round differences: robust to drift and load
            return statistics.median(v - n for v, n in zip(values, none))

        lines += [f"### 1. runc run of a busybox container ({len(none)} runs each, interleaved)", "",
                  "| way | time | overhead (median of paired differences) | overhead (min - min) |",
                  "|---|---|---|---|"]
        for name, values in t.items():
            lines.append(f"| {name} | {fmt(values)} | {paired(values):+.1f} | {min(values) - min(none):+.1f} |")
        noop, hook = t["no-op Python hook"], t["cdi-hook"]
        verdicts.append(("runc: cdi-hook overhead / no-op Python hook overhead", paired(hook) / paired(noop),
                         (min(hook) - min(none)) / (min(noop) - min(none)), TARGETS["runc"]))
        lines += ["", f"cdi-hook: {len(HOST_NODES)} device nodes, {LIBRARY_COUNT} library mounts, ldconfig. Both hooks "
                  "run the same interpreter (a venv without the dev install's editable-finder .pth, as in production)."]
        if logged:
            lines[-1] += (f" Its own log line's duration_ms (from the request known to the end: registry, resolve, "
                          f"worker, nodes, mounts, ldconfig, device cgroup): {fmt(logged)}; the rest of its "
                          "overhead is the interpreter start and imports.")
        lines.append("")
    if "podman" in results:
        t = results["podman"]
        lines += [f"### 2. podman run --rm of the same image ({len(t['no device'])} runs each, interleaved)", "",
                  "| way | time |", "|---|---|"]
        lines += [f"| {name} | {fmt(values)} |" for name, values in t.items()]
        hook, native = t["cdi-hook (--hooks-dir)"], t["native CDI --device"]
        verdicts.append(("podman: cdi-hook / native --device", statistics.median(hook) / statistics.median(native),
                         min(hook) / min(native), TARGETS["podman"]))
        lines.append("")
    if "scale" in results:
        t = results["scale"]
        lines += ["### 3. hook process fed a state, one device requested (stage poststart: resolve + log)", "",
                  "| spec files | warm cache | cold (no cache) | peak RSS warm / cold (MiB) |", "|---|---|---|---|"]
        for size, r in t.items():
            warm_ms, cold_ms = [w for w, _ in r["warm"]], [c for c, _ in r["cold"]]
            lines.append(f"| {size:,} | {fmt(warm_ms)} | {fmt(cold_ms)} | "
                         f"{max(m for _, m in r['warm']) / 1024:.1f} / {max(m for _, m in r['cold']) / 1024:.1f} |")
        sizes = sorted(t)
        if len(sizes) > 1:
            first, last = sizes[0], sizes[-1]
            at_last, at_first = [w for w, _ in t[last]["warm"]], [w for w, _ in t[first]["warm"]]
            verdicts.append((f"scale: warm hook at {last:,} specs / at {first:,}",
                             statistics.median(at_last) / statistics.median(at_first), min(at_last) / min(at_first),
                             TARGETS["scale"]))
        lines.append("")
    if "memory" in results:
        rss = results["memory"]
        peak = max(rss) / 1024
        lines += ["### 4. peak memory of the hook (ru_maxrss of the hook process and the children it reaped)", "",
                  f"GPU-like injection under runc, {len(rss)} runs: min {min(rss) / 1024:.1f}, "
                  f"median {statistics.median(rss) / 1024:.1f}, max {peak:.1f} MiB", ""]
        verdicts.append(("memory: peak RSS of the hook (MiB)", peak, peak, TARGETS["memory_mib"]))
    lines += ["### Targets", "", "Ratios from medians (paired differences for runc), and from minimums (the "
              "least disturbed runs on a shared machine).", "",
              "| measure | by medians | by minimums | target | met (medians) |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {best:.2f} | <= {target} | {'yes' if value <= target else 'no'} |"
              for name, value, best, target in verdicts]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per way (default 20)")
    parser.add_argument("--cold-runs", type=int, default=5, help="runs without cache per size (default 5)")
    parser.add_argument("--sizes", default="1,100,1000,10000", help="spec file counts for the scale benchmark")
    parser.add_argument("--only", default="runc,podman,scale,memory", help="comma-separated benchmarks to run")
    parser.add_argument("--out", help="also write the report to this file")
    parser.add_argument("--nice", type=int, default=0,
                        help="niceness increment for the bench and everything it starts (e.g. -10 on a "
                             "machine shared with other work; shown in the report's command line)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench: run as root (runc, podman, device nodes)", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    unknown = only - {"runc", "podman", "scale", "memory"}
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.nice:
        os.nice(args.nice)
    results: dict = {"load": [os.getloadavg()[0]]}
    with tempfile.TemporaryDirectory(prefix="cdi-bench-") as tmp:
        ws = Workspace(Path(tmp))
        if "runc" in only:
            results["runc"] = bench_runc(ws, args.runs)
            results["load"].append(os.getloadavg()[0])
        if "podman" in only:
            results["podman"] = bench_podman(ws, args.runs)
            results["load"].append(os.getloadavg()[0])
        if "scale" in only:
            sizes = [int(s) for s in args.sizes.split(",") if s]
            results["scale"] = bench_scale(ws, sizes, args.runs, args.cold_runs)
            results["load"].append(os.getloadavg()[0])
        if "memory" in only:
            results["memory"] = bench_memory(ws, max(3, args.runs // 4))
            results["load"].append(os.getloadavg()[0])
    text = report(args, results)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
