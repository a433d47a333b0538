"""Addressing a running container: `runc:ID`, `podman:NAME-OR-ID`, `pid:N`.

Each is resolved through the runtime's own state (`runc --root DIR state ID`, `podman
inspect`), which gives the init process's pid and the bundle (config.json). The process is
then pinned with a pidfd (oci.check_container_process: its root holds config.json's rootfs,
it is in a mount namespace of its own), and the runtime's state is read again: the same pid,
still running. From then on every step reaches the container through the pidfd, never
through the number, which a new process could take over. A stopped, paused or unknown
container is refused with one line.
"""

from __future__ import annotations

import os
from collections import namedtuple

from cdi_hook import jsonio, oci
from cdi_hook.errors import CdiError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

DEFAULT_RUNC_ROOT = "/run/runc"
RUNTIME_TIMEOUT_S = 30

# name: as the user wrote it; id: the runtime's container id (the record's key); pidfd: the
# pinned init process (the caller closes it); start_time: its start in clock ticks after boot
Target = namedtuple("Target", ["name", "id", "pid", "pidfd", "start_time", "config"])


def parse_address(address: str) -> tuple[str, str]:
    kind, sep, value = address.partition(":")
    if not sep or kind not in ("runc", "podman", "pid") or not value:
        raise CdiError(f"container {address!r}: write runc:ID, podman:NAME-OR-ID or pid:N")
    if kind == "pid" and not (value.isdigit() and int(value) > 0):
        raise CdiError(f"container {address!r}: pid:N takes a process id")
    return kind, value


def resolve(address: str, *, runc_root: str = DEFAULT_RUNC_ROOT, bundle: str | None = None) -> Target:
    """The running container at address, pinned; CdiError (one line) otherwise."""
    kind, value = parse_address(address)
    if kind == "runc":
        state = _runc_state(value, runc_root)
        config_path = os.path.join(state["bundle"], "config.json")
        container_id = value
    elif kind == "podman":
        state = _podman_state(value)
        config_path = state["config"]
        container_id = state["id"]
    else:
        if not bundle:
            raise CdiError(f"container {address}: give --bundle DIR: a process shows no bundle, and the "
                           "config.json there says which devices it was given and where its rootfs is")
        state = {"pid": int(value), "status": "running"}
        config_path = os.path.join(bundle, "config.json")
        container_id = None
    if bundle and kind != "pid":
        config_path = os.path.join(bundle, "config.json")
    _running(address, state)
    _, doc = oci.read_config_file(config_path)
    config = oci.parse_config(doc, os.path.dirname(config_path), config_path)
    pid = state["pid"]
    pidfd = oci.check_container_process(pid, config.rootfs)
    try:
        start_time = process_start_time(pid)
        # Read again after pinning: the pidfd holds the process the runtime still names.
        again = _runc_state(value, runc_root) if kind == "runc" else _podman_state(value) if kind == "podman" \
            else {"pid": pid, "status": "running"}
        _running(address, again)
        if again["pid"] != pid or start_time is None or has_exited(pidfd):
            raise CdiError(f"container {address}: its process changed while cdi-hook looked at it; try again")
        if container_id is None:
            container_id = f"pid-{pid}-{start_time}"
        return Target(address, container_id, pid, pidfd, start_time, config)
    except BaseException:
        os.close(pidfd)
        raise


def _running(address: str, state: dict) -> None:
    status = state.get("status")
    if status != "running":
        raise CdiError(f"container {address}: it is {status or 'not running'}, not running; "
                       "devices are attached to, detached from and verified in running containers only")
    pid = state.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise CdiError(f"container {address}: the runtime gives no process id")


def _run(argv: list[str], what: str) -> bytes:
    import subprocess

    try:
        done = subprocess.run(argv, capture_output=True, timeout=RUNTIME_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise CdiError(f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CdiError(f"{what}: {argv[0]} did not answer in {RUNTIME_TIMEOUT_S} s") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.decode(errors="replace").split())[-300:]
        raise CdiError(f"{what}: {message or f'{argv[0]} failed with status {done.returncode}'}")
    return done.stdout


def _runc_state(container_id: str, runc_root: str) -> dict:
    what = f"container runc:{container_id}"
    try:
        state = jsonio.loads(_run(["runc", "--root", runc_root, "state", container_id], what))
    except ValueError:
        raise CdiError(f"{what}: runc state printed no JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("bundle"), str):
        raise CdiError(f"{what}: runc state gives no bundle")
    return {"pid": state.get("pid"), "status": state.get("status"), "bundle": state["bundle"]}


def _podman_state(name: str) -> dict:
    what = f"container podman:{name}"
    try:
        found = jsonio.loads(_run(["podman", "inspect", "--type", "container", name], what))
    except ValueError:
        raise CdiError(f"{what}: podman inspect printed no JSON") from None
    if not isinstance(found, list) or len(found) != 1 or not isinstance(found[0], dict):
        raise CdiError(f"{what}: podman inspect names no single container")
    doc: Any = found[0]
    state = doc.get("State") if isinstance(doc.get("State"), dict) else {}
    status = state.get("Status")
    if state.get("Paused"):
        status = "paused"
    # Podman's copy of the OCI config it gave the runtime; older versions only have it in
    # the container's userdata dir (StaticDir).
    config = doc.get("OCIConfigPath") or (os.path.join(doc["StaticDir"], "config.json")
                                          if isinstance(doc.get("StaticDir"), str) else None)
    if not isinstance(config, str) or not isinstance(doc.get("Id"), str):
        raise CdiError(f"{what}: podman inspect gives no OCIConfigPath or StaticDir; give --bundle DIR")
    return {"pid": state.get("Pid"), "status": status, "config": config, "id": doc["Id"]}


def has_exited(pidfd: int) -> bool:
    import select

    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # a pidfd polls readable once its process has exited
    return bool(poller.poll(0))


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot); None when there is no such process
    or it has ended (a zombie: a container's init killed by `runc delete --force` stays one
    until reaped, and its record or hold must not pass for a live container's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # the name (field 2) may hold ")" and spaces
    if fields[0] in (b"Z", b"X"):
        return None  # a zombie: the process has ended, only its exit status waits to be reaped
    return int(fields[19])
