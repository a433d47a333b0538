"""End-to-end suite fixtures: the same skip-locally / fail-in-CI rule as tests/conftest.py.

vm-tests/ needs root and real runtimes. A missing prerequisite skips on a developer's
machine but fails under CI=true, so CI can never turn the proof into silent skips.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # oci_env: rootfs, bundles, runc runs

from ci_rules import (IN_CI, fresh_settings, private_cache_and_log, pytest_configure, pytest_runtest_makereport,  # noqa: E402,F401
                      require)


def require_programs(*names: str) -> None:
    require(os.geteuid() == 0, "needs root")
    for name in names:
        require(shutil.which(name) is not None, f"needs {name} on PATH")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")


_FINDINGS_KEY = pytest.StashKey[list]()


@pytest.fixture
def findings(request) -> list:
    """Allowed differences a test met, as (scenario, way, key, reference, got, reason); printed at the end."""
    return request.config.stash.setdefault(_FINDINGS_KEY, [])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    found = config.stash.get(_FINDINGS_KEY, [])
    if not found:
        return
    terminalreporter.section("allowed differences met (reference -> got: ways)")
    by_reason: dict[str, dict[tuple, list[str]]] = {}
    for scenario, way, key, reference, got, reason in found:
        by_reason.setdefault(reason, {}).setdefault((scenario, key, reference, got), []).append(way)
    for reason, seen in by_reason.items():
        terminalreporter.write_line(f"* {reason}")
        for (scenario, key, reference, got), ways in seen.items():
            terminalreporter.write_line(f"    {scenario} {key}: {reference!r} -> {got!r}: {', '.join(ways)}")
