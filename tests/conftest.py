"""Shared fixtures; the CI rules (require, skips fail under CI, private cache and log) are
in ci_rules.py, shared with vm-tests/."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from ci_rules import (IN_CI, fresh_settings, private_cache_and_log, pytest_configure, pytest_runtest_makereport,  # noqa: E402,F401
                      require)


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
