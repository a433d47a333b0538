"""Addressing a running container: `runc:ID`, `podman:NAME-OR-ID`, `crio:ID`, `pid:N`.

Each is resolved through the runtime's own state (`runc --root DIR state ID`, `podman
inspect`), which gives the init process's pid and the bundle (config.json). `crio:ID` (a
full id or a unique prefix) asks CRI-O over its socket (plain HTTP, the inspect server of
its internal/... `GetInfoMux`): GET /containers/ID knows the id and gives the pid and the
runtime handler (crio_annotations); CRI-O serves no state or bundle there, so GET /config
(its configuration, TOML) names that handler's runtime and its root, and the runtime's own
`state` gives the status and bundle, whose pid must be CRI-O's. The inspect server takes
only full ids: a prefix is matched against the container dirs of CRI-O's storage run root
(`runroot`/`<storage_driver>-containers/`), each candidate confirmed by CRI-O. The process is
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
DEFAULT_CRIO_SOCKET = "/var/run/crio/crio.sock"
KINDS = ("runc", "podman", "crio", "pid")
RUNTIME_TIMEOUT_S = 30

# name: as the user wrote it; id: the runtime's container id (the record's key); pidfd: the
# pinned init process (the caller closes it); start_time: its start in clock ticks after boot
Target = namedtuple("Target", ["name", "id", "pid", "pidfd", "start_time", "config"])


def parse_address(address: str) -> tuple[str, str]:
    kind, sep, value = address.partition(":")
    if not sep or kind not in KINDS or not value:
        raise CdiError(f"container {address!r}: write runc:ID, podman:NAME-OR-ID, crio:ID or pid:N")
    if kind == "pid" and not (value.isdigit() and int(value) > 0):
        raise CdiError(f"container {address!r}: pid:N takes a process id")
    return kind, value


def resolve(address: str, *, runc_root: str = DEFAULT_RUNC_ROOT, bundle: str | None = None,
            crio_socket: str = DEFAULT_CRIO_SOCKET) -> Target:
    """The running container at address, pinned; CdiError (one line) otherwise."""
    kind, value = parse_address(address)
    if kind == "runc":
        state = _runc_state(value, runc_root)
        config_path = os.path.join(state["bundle"], "config.json")
        container_id = value
    elif kind == "crio":
        state = _crio_state(value, crio_socket)
        config_path = os.path.join(state["bundle"], "config.json")
        container_id = value = state["id"]
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
            else _crio_state(value, crio_socket) if kind == "crio" else {"pid": pid, "status": "running"}
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


def config_path(address: str, *, runc_root: str = DEFAULT_RUNC_ROOT, crio_socket: str = DEFAULT_CRIO_SOCKET) -> str:
    """The config.json of the container at address, as its runtime names it (not pinned:
    for `explain`, which only reads it)."""
    kind, value = parse_address(address)
    if kind == "pid":
        raise CdiError(f"container {address}: a process shows no bundle; give --bundle DIR")
    if kind == "podman":
        return _podman_state(value)["config"]
    state = _runc_state(value, runc_root) if kind == "runc" else _crio_state(value, crio_socket)
    return os.path.join(state["bundle"], "config.json")


def _runc_state(container_id: str, runc_root: str, runtime: str = "runc", what: str = "") -> dict:
    what = what or f"container runc:{container_id}"
    try:
        state = jsonio.loads(_run([runtime, "--root", runc_root, "state", container_id], what))
    except ValueError:
        raise CdiError(f"{what}: {runtime} state printed no JSON") from None
    if not isinstance(state, dict) or not isinstance(state.get("bundle"), str):
        raise CdiError(f"{what}: {runtime} state gives no bundle")
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


def _crio_get(socket_path: str, path: str, what: str) -> tuple[int, bytes]:
    """(HTTP status, body) of GET path on CRI-O's socket."""
    import http.client
    import socket

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(RUNTIME_TIMEOUT_S)
            self.sock.connect(socket_path)

    connection = Connection("crio", timeout=RUNTIME_TIMEOUT_S)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read(1 << 22)
    except OSError as error:
        raise CdiError(f"{what}: cannot ask CRI-O at {socket_path} (--crio-socket): "
                       f"{error.strerror or error}") from None
    except http.client.HTTPException as error:
        raise CdiError(f"{what}: CRI-O at {socket_path} gave no HTTP answer: {error!r}") from None
    finally:
        connection.close()


def _crio_config(socket_path: str, what: str) -> dict:
    import tomllib

    status, body = _crio_get(socket_path, "/config", what)
    try:
        config = tomllib.loads(body.decode()) if status == 200 else None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        config = None
    if not isinstance(config, dict) or not isinstance(config.get("crio"), dict):
        raise CdiError(f"{what}: CRI-O's GET /config gave no configuration (HTTP {status})")
    return config["crio"]


def _crio_info(socket_path: str, container_id: str, what: str) -> dict | None:
    """CRI-O's inspect answer for a full id; None when CRI-O does not know it."""
    import urllib.parse

    status, body = _crio_get(socket_path, "/containers/" + urllib.parse.quote(container_id, safe=""), what)
    if status == 404:
        return None
    try:
        info = jsonio.loads(body) if status == 200 else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        message = " ".join(body.decode(errors="replace").split())[:200]
        raise CdiError(f"{what}: CRI-O answered HTTP {status}: {message}")
    return info


def _crio_state(name: str, socket_path: str) -> dict:
    what = f"container crio:{name}"
    if "/" in name or name in (".", ".."):
        raise CdiError(f"{what}: a CRI-O container id is hex digits")
    config: dict | None = None
    info = _crio_info(socket_path, name, what)
    container_id = name
    if info is None:
        # The inspect server takes full ids only: a prefix is looked up among the container
        # dirs of CRI-O's storage (runroot/<driver>-containers), each confirmed by CRI-O.
        config = _crio_config(socket_path, what)
        runroot, driver = config.get("runroot"), config.get("storage_driver")
        candidates: list[str] = []
        if isinstance(runroot, str) and isinstance(driver, str) and driver:
            try:
                candidates = sorted(n for n in os.listdir(os.path.join(runroot, f"{driver}-containers"))
                                    if n.startswith(name))
            except OSError:
                pass
        known = [(c, i) for c in candidates if c != name for i in [_crio_info(socket_path, c, what)] if i is not None]
        if not known:
            raise CdiError(f"{what}: CRI-O at {socket_path} knows no container with that id or id prefix")
        if len(known) > 1:
            raise CdiError(f"{what}: the prefix matches {len(known)} CRI-O containers; give more of the id")
        container_id, info = known[0]
    assert info is not None
    crio_annotations: Any = info.get("crio_annotations") if isinstance(info.get("crio_annotations"), dict) else {}
    if config is None:
        config = _crio_config(socket_path, what)
    runtime_config: Any = config.get("runtime") if isinstance(config.get("runtime"), dict) else {}
    handler = crio_annotations.get("io.kubernetes.cri-o.RuntimeHandler") or runtime_config.get("default_runtime")
    runtimes: Any = runtime_config.get("runtimes") if isinstance(runtime_config.get("runtimes"), dict) else {}
    runtime = runtimes.get(handler) if isinstance(handler, str) else None
    if not isinstance(runtime, dict) or runtime.get("runtime_type", "oci") not in ("", "oci") \
            or not isinstance(runtime.get("runtime_root"), str) or not runtime.get("runtime_path"):
        raise CdiError(f"{what}: its CRI-O runtime handler {handler!r} is not an OCI runtime with a root "
                       "(runtime_path, runtime_root) in CRI-O's configuration; give --bundle DIR with pid:N")
    state = _runc_state(container_id, runtime["runtime_root"], runtime["runtime_path"], what)
    if state.get("pid") != info.get("pid") and state.get("status") == "running":
        raise CdiError(f"{what}: CRI-O and {runtime['runtime_path']} name different processes; try again")
    return {**state, "id": container_id}


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
