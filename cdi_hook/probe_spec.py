"""The throwaway spec of `cdi-hook doctor --probe`, and who may see it.

While the probe runs, its spec (kind PROBE_KIND, /dev/null as a device) sits in the first
spec dir the installed hook reads, where every container start and the device plugin look.
It carries the identity of the doctor that wrote it (WRITER_ANNOTATION: the boot id, its
pid and the pid's start time, which a reused pid does not share), so that

- the hook resolves a probe device only while that doctor lives (the probe's own
  containers need it, nobody else does: a spec a killed doctor left is refused),
- the device plugin never advertises the kind (a probe is no unit a pod can be given),
- the next `cdi-hook doctor` removes a probe spec, and a probe's temp dir (WRITER_FILE in
  it holds the same identity), whose writer is gone: a doctor killed with SIGKILL. SIGINT
  and SIGTERM make doctor remove both itself.

A spec of the kind without a readable writer counts as a dead writer's (an older doctor's).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from cdi_hook.spec.model import Spec

PROBE_KIND = "cdi-hook.doctor/probe"
WRITER_ANNOTATION = "cdi-hook.doctor/writer"
SPEC_PREFIX = "cdi-hook-doctor-probe-"  # the spec file's name: SPEC_PREFIX + token + ".json"
TEMP_PREFIX = "cdi-hook-doctor-"  # the probe's temp dir, in tempfile.gettempdir()
WRITER_FILE = "writer"  # in the temp dir: the writer's identity
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def _boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def writer_identity(pid: int | None = None) -> str:
    """"boot=<boot id> pid=<pid> start=<start time in clock ticks>" of a live process (this
    one by default)."""
    from cdi_hook.containers import process_start_time

    pid = os.getpid() if pid is None else pid
    start = process_start_time(pid)
    if start is None:
        raise ProcessLookupError(pid)
    return f"boot={_boot_id()} pid={pid} start={start}"


def writer_alive(identity: str | None) -> bool:
    """Whether the process an identity names still runs (same boot, same pid, same start)."""
    from cdi_hook.containers import process_start_time

    fields = dict(part.partition("=")[::2] for part in (identity or "").split())
    try:
        pid, start = int(fields["pid"]), int(fields["start"])
    except (KeyError, ValueError):
        return False
    return pid > 0 and fields.get("boot") == _boot_id() and process_start_time(pid) == start


def writer_of(spec: Spec) -> str | None:
    return dict(spec.annotations).get(WRITER_ANNOTATION)


def stale(spec: Spec) -> bool:
    """A probe spec whose doctor is gone (never true for another kind)."""
    return spec.kind == PROBE_KIND and not writer_alive(writer_of(spec))
