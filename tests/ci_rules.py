"""The rules both test suites (tests/ and vm-tests/) share; their conftests import them.

A test that needs root, real namespaces or a runtime calls `require(...)`: outside CI a
missing prerequisite skips it (a developer's laptop); under CI=true it fails, and any skip
is turned into a failure, so a CI machine that lost runc can never turn the end-to-end
suites into silent skips. The registry cache and the hook's log go to a session temp dir.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: CI must prove what it claims to test."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI (not allowed): {reason}"


@pytest.fixture(scope="session", autouse=True)
def private_cache_and_log(tmp_path_factory):
    """cdi-hook's cache and log go to a session temp dir, never /run/cdi-hook or /var/log."""
    import oci_env

    with oci_env.private_cache_and_log(tmp_path_factory.mktemp("cdi-hook-state")) as top:
        yield top
