"""The benchmark script must keep working: a tiny run of all four benchmarks, and the report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import require, require_program

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import bench  # noqa: E402


def test_report_names_every_benchmark_and_target():
    runc = {"no hook": [10.0, 12.0, 11.0], bench.EMPTY_ONE: [20.0, 22.0, 21.0],
            bench.EMPTY_ALL: [40.0, 42.0, 41.0], "empty Python module (-m), createRuntime": [25.0, 27.0, 26.0],
            bench.HOOK_ONE: [30.0, 32.0, 31.0], bench.HOOK_ALL: [38.0, 40.0, 39.0],
            "same devices by inject --mode edits": [11.0, 13.0, 12.0],
            "steps": [{"duration_ms": 9.0, "steps_ms": {"resolve": 1.0, "worker": 5.0}}],
            "imports": [("cdi_hook.oci", 800), ("cdi_hook", 300), ("_socket", 200), ("json", 0)]}
    podman = {"no device": [100.0], "native CDI --device": [110.0], "cdi-hook precreate": [115.0],
              bench.PODMAN_LIVE: [120.0]}
    scale = {1: {"warm": [(40.0, 15000)], "watched": [(40.0, 15000)], "cold": [(45.0, 15000)],
                 "watcher_ready_s": 0.1, "watcher_rss_kib": 12000},
             10000: {"warm": [(80.0, 16000)], "watched": [(46.0, 16000)], "cold": [(3000.0, 260000)],
                     "watcher_ready_s": 4.0, "watcher_rss_kib": 13000}}
    watch = {"files": 10000, "seen": [0.5, 0.7], "trusted": [90.0, 110.0], "used": [True] * 4}
    text = bench.report(None, {"runc": runc, "podman": podman, "scale": scale, "watch": watch,
                               "memory": [15000, 16384]})
    assert f"| {bench.HOOK_ONE} | 31.0 (30.0 / 32.0) | +20.0 (+20.0 / +20.0) |" in text
    assert "| runc: cdi-hook createRuntime alone / ONE empty Python hook's (-c) | 2.00 |" in text
    assert "<= 2.0 | yes |" in text
    assert "| runc: cdi-hook as `install` installs it (hooks.d, 3 stages) / ONE empty Python hook's (-c) | 2.80 |" in text
    assert "<= 2.5 | **no** |" in text
    assert ("| runc: cdi-hook as `inject --mode hook` installs it (createRuntime alone) / ONE empty Python hook's "
            "(-c) | 2.00 |") in text
    assert ("| runc: one post stage, nothing recorded for it ((3 stages - createRuntime alone) / 2) / ONE "
            "empty Python hook's (-c) | 0.40 |") in text
    assert "| runc: cdi-hook at 3 stages / the empty hook at the same three stages (no target) | 0.93 |" in text
    assert f"| podman: {bench.PODMAN_LIVE} / native --device | 1.09 |" in text
    assert "| 10,000 | 80.0 (80.0 / 80.0) | 46.0 (46.0 / 46.0) | 3000.0 (3000.0 / 3000.0) | 15.6 / 253.9 | 4.0 / 12.7 |" in text
    assert "| scale: hook at 10,000 spec files / at 1, with the watcher | 1.15 |" in text
    assert "| watch: an in-place edit seen (s, slowest) | 0.00 |" in text
    assert "| memory: peak RSS of the hook (MiB) | 16.00 |" in text
    assert "served" not in text  # the resident server's way was removed (docs/development/performance.md)
    assert "steps (median ms): resolve 1.00, worker 5.00" in text
    assert "1.3 ms in all, of which cdi_hook's modules 1.1 ms; the largest: cdi_hook.oci 0.80, cdi_hook 0.30" in text
    assert "runpy" not in text  # the -c entry install writes imports none of it
    runc["imports"].append(("runpy", 1000))  # an older `-m` entry: its runpy cost is named
    text = bench.report(None, {"runc": runc})
    assert "of which cdi_hook's modules 1.1 ms; runpy's (an older `-m` entry, not what install writes" in text


def test_bench_run_end_to_end_with_tiny_counts(runc):
    require_program("podman")
    require(Path("/dev/kvm").exists() and Path("/dev/loop0").exists(), "needs /dev/kvm and /dev/loop0 for the bench spec")
    result = subprocess.run([str(REPO / "bench" / "run"), "--runs", "1", "--podman-runs", "1", "--cold-runs", "1",
                             "--sizes", "1,20", "--edits", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ("### 1. runc", "### 2. podman", "### 3. hook process", "### 4. an in-place edit",
                    "### 5. peak memory", "### Targets"):
        assert heading in out, out
    assert "| 20 |" in out and "Command: `bench/run --runs 1" in out
