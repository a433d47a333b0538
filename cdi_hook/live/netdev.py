"""Move a spec's network devices into the container's network namespace, and back.

What the OCI runtime spec (config-linux.md, "Network Devices") asks of a runtime, done
from a hook:

- the interface named `hostInterfaceName` leaves the runtime's network namespace for the
  container's and is renamed to `name` in the same netlink request, so the kernel moves and
  renames it atomically and refuses a name that already exists there (EEXIST), unless the
  name is a kernel template containing `%d`;
- the kernel keeps the MTU across the move but drops every address, so the permanent
  (IFA_F_PERMANENT) global-scope addresses of any family are captured before the move and
  added again inside; link-local and temporary addresses are the kernel's own business;
- the interface is set up inside, as the spec says it MUST be.

All container-side netlink work uses a socket created inside the container's namespace by
a forked helper (pyroute2's `netns=` argument), so this process never changes namespace.
The namespace is held open by a file descriptor for the whole operation, so the container
dying half-way cannot make a reused pid point us at somebody else's namespace.

At poststop (`return_to_host`) an interface still in the container's namespace goes back
to the runtime's namespace under its host name. It comes back down and without addresses:
whatever the container configured on it is not trusted on the host, the host's owner
configures it again. Where the namespace is already gone, the kernel has done the rest
(network_namespaces(7)): physical interfaces were moved back to the initial namespace under
their container-side names, virtual ones (veth, macvlan, ...) were destroyed with it.

pyroute2 is imported inside the functions: only specs with network devices pay for it.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple

from cdi_hook.errors import HookError
from cdi_hook.spec.model import NetDevice
from cdi_hook.spec.rules import interface_name_problem, is_interface_name_template

STEP = "network device"

IFA_F_PERMANENT = 0x80  # linux/if_addr.h
RT_SCOPE_UNIVERSE = 0  # linux/rtnetlink.h: global scope
IFF_UP = 0x1  # linux/if.h


# Records are namedtuples, as in spec/model.py: no dataclasses import (~9 ms) for a start.
# local: the interface's own address (IFA_LOCAL, or IFA_ADDRESS when alone); peer: the other
# end of a point-to-point link (IFA_ADDRESS).
Address = namedtuple("Address", ["family", "local", "prefixlen", "peer", "broadcast"], defaults=(None, None))

# What the kernel forgets (addresses) or we must check (MTU, up) across a move. Its `index`
# field hides tuple.index, which nothing here uses.
LinkState = namedtuple("LinkState", ["index", "name", "mtu", "up", "addresses"])


def container_name(device: NetDevice) -> str:
    """The spec's `name`; the runtime spec falls back to the host name when it is empty."""
    return device.name or device.host_interface_name


# --- netlink helpers -------------------------------------------------------------------


def _why(error: Exception) -> str:
    """One line for a netlink or OS error."""
    code = getattr(error, "code", None) or getattr(error, "errno", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    return str(error) or error.__class__.__name__


def _is_errno(error: Exception, number: int) -> bool:
    return getattr(error, "code", None) == number or getattr(error, "errno", None) == number


def _find_link(ipr, name: str):
    """The link message for `name` in the socket's namespace, or None."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as error:
        if _is_errno(error, errno.ENODEV):
            return None
        raise


def _addresses_to_keep(ipr, index: int) -> tuple[Address, ...]:
    kept = []
    for msg in ipr.addr("dump", index=index):
        flags = msg.get_attr("IFA_FLAGS")
        if flags is None:
            flags = msg["flags"]
        if msg["scope"] != RT_SCOPE_UNIVERSE or not flags & IFA_F_PERMANENT:
            continue
        address = msg.get_attr("IFA_ADDRESS")
        local = msg.get_attr("IFA_LOCAL") or address
        kept.append(Address(
            family=msg["family"],
            local=local,
            prefixlen=msg["prefixlen"],
            peer=address if address and address != local else None,
            broadcast=msg.get_attr("IFA_BROADCAST"),
        ))
    return tuple(kept)


def _link_state(ipr, link) -> LinkState:
    index = link["index"]
    return LinkState(
        index=index,
        name=link.get_attr("IFLA_IFNAME"),
        mtu=link.get_attr("IFLA_MTU"),
        up=bool(link["flags"] & IFF_UP),
        addresses=_addresses_to_keep(ipr, index),
    )


def _add_address(ipr, index: int, address: Address) -> None:
    request = {"index": index, "family": address.family, "prefixlen": address.prefixlen}
    if address.peer:
        request.update(local=address.local, address=address.peer)
    else:
        request.update(address=address.local)
    if address.broadcast:
        request["broadcast"] = address.broadcast
    ipr.addr("add", **request)


def _configure(ipr, index: int, state: LinkState, *, up: bool) -> None:
    """Give the link at `index` the captured MTU and addresses, then set it up or down."""
    link = ipr.link("get", index=index)[0]
    if state.mtu and link.get_attr("IFLA_MTU") != state.mtu:
        ipr.link("set", index=index, mtu=state.mtu)
    for address in state.addresses:
        _add_address(ipr, index, address)
    ipr.link("set", index=index, state="up" if up else "down")


def _same_namespace(fd: int, other_path: str) -> bool:
    mine, other = os.fstat(fd), os.stat(other_path)
    return (mine.st_dev, mine.st_ino) == (other.st_dev, other.st_ino)


def _open_namespace(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


# --- createRuntime / prestart ----------------------------------------------------------


class _Moved:
    def __init__(self, origin: str, host: LinkState, inner_index: int):
        self.origin = origin
        self.host = host
        self.inner_index = inner_index


def move_into_container(container_pid: int, items: list[tuple[str, NetDevice]]) -> None:
    """Move each (origin, NetDevice) from this namespace into the container's; all or none."""
    if not items:
        return
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    first_origin = items[0][0]
    try:
        netns_fd = _open_namespace(f"/proc/{container_pid}/ns/net")
    except OSError as error:
        raise HookError(STEP, first_origin,
                        f"cannot open the network namespace of container process {container_pid}: "
                        f"{_why(error)}") from None
    try:
        if _same_namespace(netns_fd, "/proc/self/ns/net"):
            raise HookError(STEP, first_origin,
                            "the container shares the runtime's network namespace; moving an interface "
                            "there would change nothing (give the container its own 'network' namespace)")
        try:
            with IPRoute() as host, IPRoute(netns=netns_fd, flags=0) as inner:
                plan = _check_all(host, inner, items)
                _move_all(host, inner, netns_fd, plan)
        except NetlinkError as error:  # a refusal outside a single device's steps
            raise HookError(STEP, first_origin, f"netlink: {_why(error)}") from None
    finally:
        os.close(netns_fd)


def _check_all(host, inner, items) -> list[tuple[str, NetDevice, LinkState]]:
    """Every refusal that can be known before anything moves."""
    plan = []
    for origin, device in items:
        hname, cname = device.host_interface_name, container_name(device)
        # The same rules validation applied; the plan already refused two devices asking
        # for one host interface or one container-side name.
        problem = interface_name_problem(hname, template_allowed=False) or interface_name_problem(cname)
        if problem:
            raise HookError(STEP, origin, problem)
        link = _find_link(host, hname)
        if link is None:
            raise HookError(STEP, origin, f"host interface '{hname}' does not exist in the runtime's network namespace")
        if not is_interface_name_template(cname) and _find_link(inner, cname) is not None:
            raise HookError(STEP, origin, f"an interface named '{cname}' already exists in the container")
        plan.append((origin, device, _link_state(host, link)))
    return plan


def _move_all(host, inner, netns_fd: int, plan) -> None:
    moved: list[_Moved] = []
    try:
        for origin, device, state in plan:
            _move_one(host, inner, netns_fd, origin, device, state, moved)
    except HookError as error:
        undone = _move_back(host, inner, moved)
        if undone:
            raise HookError(error.step, error.device, f"{_message(error)}; undoing: {undone}") from None
        raise


def _move_one(host, inner, netns_fd: int, origin: str, device: NetDevice, state: LinkState,
              moved: list[_Moved]) -> None:
    cname = container_name(device)
    try:
        before = {link["index"] for link in inner.link("dump")}
        host.link("set", index=state.index, net_ns_fd=netns_fd, ifname=cname)
    except Exception as error:
        # The kernel moves first and renames second: a failed rename leaves the interface
        # in the container under its host name. Then it counts as moved, so it is undone.
        if _find_link(host, state.name) is None:
            stranded = _find_link(inner, state.name)
            if stranded is not None:
                moved.append(_Moved(origin, state, stranded["index"]))
        if _is_errno(error, errno.EEXIST):
            raise HookError(STEP, origin, f"an interface named '{cname}' already exists in the container") from None
        raise HookError(STEP, origin, f"moving '{state.name}' into the container as '{cname}': {_why(error)}") from None
    try:
        inner_index = _moved_index(inner, cname, before)
    except Exception as error:
        raise HookError(STEP, origin, f"finding '{cname}' in the container after the move: {_why(error)}") from None
    moved.append(_Moved(origin, state, inner_index))
    try:
        _configure(inner, inner_index, state, up=True)
    except Exception as error:
        raise HookError(STEP, origin, f"configuring '{cname}' inside the container: {_why(error)}") from None


def _message(error: HookError) -> str:
    """The message part of a HookError, without its 'step for device: ' prefix."""
    prefix = f"{error.step} for {error.device}: " if error.device else f"{error.step}: "
    text = str(error)
    return text[len(prefix):] if text.startswith(prefix) else text


def _moved_index(inner, cname: str, before: set[int]) -> int:
    if not is_interface_name_template(cname):
        return inner.link("get", ifname=cname)[0]["index"]
    new = [link["index"] for link in inner.link("dump") if link["index"] not in before]
    if len(new) != 1:
        raise LookupError(f"the kernel's name for template '{cname}' is ambiguous")
    return new[0]


def _move_back(host, inner, moved: list[_Moved]) -> str:
    """Undo a partial move: each interface home under its name, as it was. '' if all went well."""
    problems = []
    host_fd = _open_namespace("/proc/self/ns/net")
    try:
        for item in reversed(moved):
            try:
                inner.link("set", index=item.inner_index, net_ns_fd=host_fd, ifname=item.host.name)
                link = host.link("get", ifname=item.host.name)[0]
                _configure(host, link["index"], item.host, up=item.host.up)
            except Exception as error:
                problems.append(f"'{item.host.name}' ({item.origin}): {_why(error)}")
    finally:
        os.close(host_fd)
    return "; ".join(problems)


# --- poststop --------------------------------------------------------------------------


def container_netns(state, config) -> tuple[int | None, str]:
    """An open fd on the container's network namespace, or None and why there is none.

    A namespace outlives the container's processes only when something pins it: a
    bind-mounted path named in config.json (`ip netns`, Podman, CNI) or a process still
    running (the container's init while it has not stopped). A pid of a stopped container
    is never used: it may already belong to an unrelated process.
    """
    # Either the raw JSON documents or cdi_hook.oci's State / Config objects.
    if not isinstance(state, dict):
        state = {"pid": getattr(state, "pid", None), "status": getattr(state, "status", "")}
    if not isinstance(config, dict):
        config = getattr(config, "raw", None) or {}
    namespaces = ((config or {}).get("linux") or {}).get("namespaces") or []
    network = next((ns for ns in namespaces if isinstance(ns, dict) and ns.get("type") == "network"), None)
    if network is None:
        return None, "the container used the runtime's network namespace"
    path = network.get("path")
    where = path
    if not path:
        pid = (state or {}).get("pid")
        if (state or {}).get("status") == "stopped" or not isinstance(pid, int) or pid <= 0:
            return None, "the container's own network namespace ended with its processes"
        path, where = f"/proc/{pid}/ns/net", f"the namespace of container process {pid}"
    try:
        fd = _open_namespace(path)
    except OSError as error:
        return None, f"{where} is gone ({_why(error)})"
    if _same_namespace(fd, "/proc/self/ns/net"):
        os.close(fd)
        return None, f"{where} is the runtime's own network namespace"
    return fd, where


GONE_NOTE = ("the kernel already moved physical interfaces back to the initial network namespace "
             "(under their container-side names) and destroyed virtual ones (veth, macvlan, ...)")


def return_to_host(state, config, items: list[tuple[str, NetDevice]]) -> list[str]:
    """Bring interfaces still in the container's namespace back under their host names.

    `state` and `config` are the OCI state and config.json, as dicts or as cdi_hook.oci's
    State and Config. Returns one note per interface (for the hook's debug log). Tries every interface, then raises one
    HookError naming those that could not be returned; at poststop the caller reports it as
    a warning, since the container is already gone.
    """
    if not items:
        return []
    netns_fd, where = container_netns(state, config)
    if netns_fd is None:
        return [f"network namespace not found: {where}; {GONE_NOTE}"]
    from pyroute2 import IPRoute

    notes, failures = [], []
    host_fd = _open_namespace("/proc/self/ns/net")
    try:
        with IPRoute() as host, IPRoute(netns=netns_fd, flags=0) as inner:
            for origin, device in items:
                ok, note = _return_one(host, inner, host_fd, netns_fd, device)
                (notes if ok else failures).append(f"{origin}: {note}")
    except Exception as error:
        failures.append(f"cannot reach {where}: {_why(error)}")
    finally:
        os.close(host_fd)
        os.close(netns_fd)
    if failures:
        raise HookError(STEP, "", "at poststop: " + "; ".join(failures))
    return notes


def _return_one(host, inner, host_fd: int, netns_fd: int, device: NetDevice) -> tuple[bool, str]:
    hname, cname = device.host_interface_name, container_name(device)
    if is_interface_name_template(cname):
        return False, (f"'{hname}' was named by the kernel from the template '{cname}' and cannot be "
                       "found again; it stays in the container's namespace")
    try:
        link = _find_link(inner, cname)
        if link is None:
            return True, f"'{cname}' is no longer in the container's namespace; nothing to return"
        if _find_link(host, hname) is not None:
            return False, f"'{cname}' cannot return: the host already has an interface named '{hname}'"
        inner.link("set", index=link["index"], state="down")
        inner.link("set", index=link["index"], net_ns_fd=host_fd, ifname=hname)
    except Exception as error:
        stranded = _strand_back(host, inner, netns_fd, cname)
        if _is_errno(error, errno.EEXIST):
            return False, f"'{cname}' cannot return: the host already has an interface named '{hname}'{stranded}"
        return False, f"'{cname}' cannot return as '{hname}': {_why(error)}{stranded}"
    return True, f"'{cname}' returned to the host as '{hname}' (down, without addresses)"


def _strand_back(host, inner, netns_fd: int, cname: str) -> str:
    """A move whose rename failed leaves the interface on the host under its container name:
    send it back to the container's namespace rather than leave a stray name on the host."""
    if _find_link(inner, cname) is not None:
        return ""
    link = _find_link(host, cname)
    if link is None:
        return ""
    try:
        host.link("set", index=link["index"], net_ns_fd=netns_fd)
    except Exception as error:
        return f" (it is on the host as '{cname}' now: {_why(error)})"
    return ""
