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

# A slower machine (the TCG-emulated QEMU guest of vm-tests/qemu) stretches time bounds.
TIME_FACTOR = float(os.environ.get("CDI_TEST_TIME_FACTOR", "1") or 1)

# The QEMU guest boots cgroup v2 only, on purpose: it declares so, and the cgroup v1 tests
# skip there even under CI=true. Nowhere else is a skip allowed under CI.
CGROUP2_ONLY_DECLARED = os.environ.get("CDI_TEST_CGROUP2_ONLY") == "1"
_DECLARED_SKIP = "declared cgroup v2-only host (CDI_TEST_CGROUP2_ONLY=1)"
# The same guest has neither debootstrap nor a cache of chroots, and boots fresh each run:
# tests/test_deb.py, which builds and tries the package in Debian 12 and 13 chroots from
# the host, declares so there and skips, as the cgroup v1 tests do.
DEB_ON_HOST_DECLARED = os.environ.get("CDI_TEST_DEB_ON_HOST") == "1"
_DECLARED_DEB_SKIP = "declared: the Debian package is tested from the host (CDI_TEST_DEB_ON_HOST=1)"


def pytest_configure(config):
    """Test rootfs trees hold device nodes, so their temp dirs must be on a filesystem that
    allows them. Debian 13 mounts /tmp as a `nosuid,nodev` tmpfs (Debian 12 does not): there
    pytest's temp dirs (and the tests' own tempfile dirs) go under /var/tmp. pytest clears
    its --basetemp at the start of the next run, as it rotates its default ones."""
    if config.option.basetemp or not _is_nodev("/tmp") or _is_nodev("/var/tmp"):
        return
    import tempfile

    config.option.basetemp = "/var/tmp/cdi-hook-pytest"
    tempfile.tempdir = "/var/tmp"


def _is_nodev(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_NODEV)
    except OSError:
        return False


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {why}")
    pytest.skip(why)


def skip_if_deb_on_host_declared() -> None:
    if DEB_ON_HOST_DECLARED:
        pytest.skip(_DECLARED_DEB_SKIP)


def require_cgroup_v1() -> None:
    """The host's cgroup v1 devices controller (runc's v1 mode)."""
    if os.path.isdir("/sys/fs/cgroup/devices"):
        return
    if CGROUP2_ONLY_DECLARED:
        pytest.skip(f"{_DECLARED_SKIP}: a cgroup v1 test")
    require(False, "needs the cgroup v1 devices controller (/sys/fs/cgroup/devices)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: CI must prove what it claims to test."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        if _DECLARED_SKIP in str(reason) or _DECLARED_DEB_SKIP in str(reason):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped under CI (not allowed): {reason}"


@pytest.fixture(autouse=True)
def fresh_settings():
    """cdi-hook reads its settings once per process (cdi_hook.settings.current()): each test
    starts and ends with them unread, so what it sets in os.environ (monkeypatch.setenv of
    CDI_*) takes effect. A test that changes them again after cdi-hook has read them calls
    settings.use(None) itself. Hooks run as subprocesses read their own environment anyway."""
    from cdi_hook import settings

    settings.use(None)
    yield
    settings.use(None)


@pytest.fixture(scope="session", autouse=True)
def private_cache_and_log(tmp_path_factory):
    """cdi-hook's cache and log go to a session temp dir, never /run/cdi-hook or /var/log,
    and install writes no logrotate file."""
    import oci_env

    from cdi_hook.commands import install

    with oci_env.private_cache_and_log(tmp_path_factory.mktemp("cdi-hook-state")) as top:
        # in-process `cdi-hook install` calls write no logrotate file into the host's
        # /etc/logrotate.d (a folder that does not exist: none is written)
        saved, install.LOGROTATE_DIR = install.LOGROTATE_DIR, str(top / "no-logrotate.d")
        try:
            yield top
        finally:
            install.LOGROTATE_DIR = saved
