"""The plan: what a list of requested devices does to a container, as pure data.

The single meeting point of the project: the live hook and the config.json editors both
take a Plan, so they can never disagree about what a device means.

A plan is an ordered list of parts. For each requested device in request order: its
spec's spec-level edits once (the first time that spec is met), then the device's own
edits. Each part keeps its origin (the qualified device name, or "vendor/class (spec)"
for spec-level edits) and its spec file, so every error can name the device.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterator

from cdi_hook.spec.model import ContainerEdits

# origin: "vendor.com/class=name" or "vendor.com/class (spec-level)"; edits: ContainerEdits.
# Records are namedtuples, as in spec/model.py (no dataclasses import on the hot path).
PlanPart = namedtuple("PlanPart", ["origin", "spec_path", "edits"])


class Plan(namedtuple("Plan", ["devices", "parts"])):
    """devices: the qualified names requested, in request order, no repeats; parts: PlanParts."""

    __slots__ = ()

    def each(self, edit_field: str) -> Iterator[tuple[str, object]]:
        """(origin, item) for every item of one ContainerEdits field, in plan order.

        edit_field is an attribute name of ContainerEdits: "device_nodes", "mounts", ...
        """
        for part in self.parts:
            for item in getattr(part.edits, edit_field):
                yield part.origin, item

    def merged(self) -> ContainerEdits:
        """All parts' edits concatenated in plan order (intelRdt: the last one wins)."""
        rdt = None
        for part in self.parts:
            if part.edits.intel_rdt is not None:
                rdt = part.edits.intel_rdt
        return ContainerEdits(
            env=tuple(e for _, e in self.each("env")),
            device_nodes=tuple(n for _, n in self.each("device_nodes")),
            mounts=tuple(m for _, m in self.each("mounts")),
            hooks=tuple(h for _, h in self.each("hooks")),
            additional_gids=tuple(g for _, g in self.each("additional_gids")),
            intel_rdt=rdt,
            net_devices=tuple(d for _, d in self.each("net_devices")),
        )
