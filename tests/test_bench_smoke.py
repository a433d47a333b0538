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
    runc = {"no hook": [10.0, 12.0], "no-op Python hook": [20.0, 22.0], "cdi-hook": [25.0, 27.0]}
    podman = {"no device": [100.0], "native CDI --device": [110.0], "cdi-hook (--hooks-dir)": [120.0]}
    scale = {1: {"warm": [(40.0, 15000)], "cold": [(45.0, 15000)]},
             10000: {"warm": [(46.0, 16000)], "cold": [(3000.0, 260000)]}}
    text = bench.report(None, {"runc": runc, "podman": podman, "scale": scale, "memory": [15000, 16384]})
    assert "| cdi-hook | 26.0 (25.0 / 27.0) | +15.0 | +15.0 |" in text
    assert "| runc: cdi-hook overhead / no-op Python hook overhead | 1.50 | 1.50 | <= 1.5 | yes |" in text
    assert "| podman: cdi-hook / native --device | 1.09 | 1.09 | <= 1.25 | yes |" in text
    assert "| 10,000 | 46.0 (46.0 / 46.0) | 3000.0 (3000.0 / 3000.0) | 15.6 / 253.9 |" in text
    assert "| scale: warm hook at 10,000 specs / at 1 | 1.15 | 1.15 | <= 1.2 | yes |" in text
    assert "| memory: peak RSS of the hook (MiB) | 16.00 | 16.00 | <= 40 | yes |" in text


def test_bench_run_end_to_end_with_tiny_counts(runc):
    require_program("podman")
    require(Path("/dev/kvm").exists() and Path("/dev/loop0").exists(), "needs /dev/kvm and /dev/loop0 for the bench spec")
    result = subprocess.run([str(REPO / "bench" / "run"), "--runs", "1", "--cold-runs", "1", "--sizes", "1,20"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ("### 1. runc", "### 2. podman", "### 3. hook process", "### 4. peak memory", "### Targets"):
        assert heading in out, out
    assert "| 20 |" in out and "Command: `bench/run --runs 1" in out
