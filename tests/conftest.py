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


@pytest.fixture
def root_only():
    require_root()


@pytest.fixture
def runc(root_only):
    require_program("runc")
    require(os.path.exists("/bin/busybox"), "needs busybox-static (/bin/busybox)")
    return shutil.which("runc")
