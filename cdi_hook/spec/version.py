"""CDI spec versions this project understands, and which version each newer field needs.

The registry refuses a spec whose cdiVersion is unknown, and a spec that uses a field
newer than the version it declares (the reference library does the same): a vendor that
writes "0.5.0" promises consumers of 0.5.0 can read the file.
"""

from __future__ import annotations

VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
LATEST = VERSIONS[-1]

# What needs which version; validate.py names the feature in its error message.
MOUNT_TYPE = "0.4.0"
NODE_HOST_PATH = "0.5.0"
DEVICE_NAME_STARTS_WITH_DIGIT = "0.5.0"
ANNOTATIONS = "0.6.0"
DOT_IN_CLASS = "0.6.0"
INTEL_RDT = "0.7.0"
ADDITIONAL_GIDS = "0.7.0"
NET_DEVICES = "1.1.0"
RDT_SCHEMATA = "1.1.0"
RDT_ENABLE_MONITORING = "1.1.0"

_ORDER = {v: i for i, v in enumerate(VERSIONS)}


def normalize(version: str) -> str | None:
    """The version without its optional leading "v", or None if it is not a known version."""
    if not isinstance(version, str):
        return None
    bare = version[1:] if version.startswith("v") else version
    return bare if bare in _ORDER else None


def at_least(version: str, needed: str) -> bool:
    """version (normalized) is needed or newer."""
    return _ORDER[version] >= _ORDER[needed]
