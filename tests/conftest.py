"""Shared fixtures.

Tests that need root, real namespaces or a runtime call `require(...)`: outside CI a
missing prerequisite skips the test (a developer's laptop); under CI=true it fails, so a
CI machine that lost runc can never turn the end-to-end suite into silent skips.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_program(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"needs {name} on PATH")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache_and_log(tmp_path_factory):
    """cdi-hook's cache and log go to a session temp dir, never /run/cdi-hook or /var/log."""
    import oci_env

    with oci_env.private_cache_and_log(tmp_path_factory.mktemp("cdi-hook-state")) as top:
        yield top


@pytest.fixture
def root_only():
    require_root()


@pytest.fixture
def runc(root_only):
    require_program("runc")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")
    return shutil.which("runc")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: CI must prove what it claims to test."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI (not allowed): {reason}"
