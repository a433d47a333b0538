"""The runtimes this machine runs, read once, and what their versions imply for the tests.

Tests that depend on what a runtime version does (which cdiVersion Podman's native CDI reads,
whether it fills a node's fileMode from the host) ask here: by the version found, never by
the distribution's name. Debian 12 has Podman 4.3.1 and runc 1.1.5, Debian 13 Podman 5.4
and runc 1.1.15; a machine with neither gets None and the tests that need one say so.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess


def parse_version(text: str) -> tuple[int, ...] | None:
    """(1, 1, 5) from "1.1.5+ds1", "runc version 1.1.15", "v0.8.0"; None when there is none."""
    match = re.search(r"(\d+(?:\.\d+)+)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def _output(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


@functools.cache
def podman() -> tuple[int, ...] | None:
    """Podman's client version from `podman version --format json`; None without Podman."""
    out = _output(["podman", "version", "--format", "json"])
    if out is None:
        return None
    try:
        return parse_version(json.loads(out)["Client"]["Version"])
    except (ValueError, KeyError, TypeError):
        return None


@functools.cache
def runc() -> tuple[int, ...] | None:
    """runc's version from the first line of `runc --version` ("runc version 1.1.5+ds1")."""
    out = _output(["runc", "--version"])
    return parse_version(out.splitlines()[0]) if out else None


# The CDI library (tags.cncf.io/container-device-interface) each Podman release vendors, from
# Podman's go.mod at each vX.Y.0 tag: (first Podman release, CDI library release). Debian builds
# Podman against its own packaged copy of the library, which matched these where checked
# (Debian 12: Podman 4.3.1 with 0.5.2).
PODMAN_CDI_LIBRARY = (
    ((4, 1), (0, 4, 0)),
    ((4, 3), (0, 5, 2)),
    ((4, 4), (0, 5, 3)),
    ((4, 5), (0, 5, 4)),
    ((4, 7), (0, 6, 1)),
    ((4, 8), (0, 6, 2)),
    ((5, 1), (0, 7, 2)),
    ((5, 2), (0, 8, 0)),
    ((5, 5), (1, 0, 1)),
)


def podman_cdi_library(version: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The CDI library release Podman `version` (default: this machine's) vendors."""
    version = podman() if version is None else version
    if version is None:
        return None
    found = None
    for first, library in PODMAN_CDI_LIBRARY:
        if version[:2] >= first:
            found = library
    return found


def cdi_reads(library: tuple[int, ...] | None) -> tuple[int, int, int] | None:
    """The newest cdiVersion a CDI library release reads (its CurrentVersion): 0.5.x reads
    up to 0.5.0 (no additionalGids or intelRdt: 0.7.0), 0.8.x up to 0.8.0, 1.1.x up to 1.1.0."""
    return None if library is None else (library[0], library[1], 0)


def cdi_fills_file_mode(library: tuple[int, ...] | None) -> bool:
    """Whether the library's fillMissingInfo copies the host node's permission bits into a
    node without fileMode (cncf-tags/container-device-interface 457489d, first released in
    v1.1.0, 2025-12). Before it the OCI spec carries no mode and runc makes the node 0666."""
    return library is not None and library >= (1, 1, 0)


def version_text(version: tuple[int, ...] | None) -> str:
    return ".".join(map(str, version)) if version else "none"
