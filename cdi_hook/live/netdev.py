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
to the runtime's namespace under its host name. It comes back down, without addresses and
without alternative names: whatever the container configured on it is not trusted on the
host, the host's owner configures it again. Where the namespace is already gone, the kernel
has done the rest (network_namespaces(7)): physical interfaces were moved back to the
initial namespace under their container-side names, virtual ones (veth, macvlan, ...) were
destroyed with it.

The container owns its namespace in between, and with CAP_NET_ADMIN it can rename the
interface it got and make its own under the expected name. So poststop never looks an
interface up by name: createRuntime records, per container, what each moved interface is
inside (see _identity), and poststop sends home only an interface that still matches its
record. A record lives in a private folder beside the exclusive-device holds
($CDI_HOOK_STATE_DIR/../netdev, by default /run/cdi-hook/netdev: gone at reboot like the
containers), one checksummed file per container id (state.write_record), removed at poststop.

pyroute2 is imported inside the functions: only specs with network devices pay for it.
"""

from __future__ import annotations

import errno
import os
from collections import namedtuple

from cdi_hook.errors import HookError
from cdi_hook.spec.model import NetDevice
from cdi_hook.spec.rules import interface_name_problem, is_interface_name_template
from cdi_hook.state import file_name, open_private_dir, read_record, remove_at, write_record

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the hook's path
if TYPE_CHECKING:
    from typing import Any

    from pyroute2 import IPRoute  # no type information: Any

    from cdi_hook.oci import Config, State

    _Link = Any  # a pyroute2 link message (ifinfmsg)

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


def _find_link(ipr: IPRoute, name: str) -> _Link | None:
    """The link message for `name` in the socket's namespace, or None."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as error:
        if _is_errno(error, errno.ENODEV):
            return None
        raise


def _addresses_to_keep(ipr: IPRoute, index: int) -> tuple[Address, ...]:
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


def _link_state(ipr: IPRoute, link: _Link) -> LinkState:
    index = link["index"]
    return LinkState(
        index=index,
        name=link.get_attr("IFLA_IFNAME"),
        mtu=link.get_attr("IFLA_MTU"),
        up=bool(link["flags"] & IFF_UP),
        addresses=_addresses_to_keep(ipr, index),
    )


def _add_address(ipr: IPRoute, index: int, address: Address) -> None:
    request = {"index": index, "family": address.family, "prefixlen": address.prefixlen}
    if address.peer:
        request.update(local=address.local, address=address.peer)
    else:
        request.update(address=address.local)
    if address.broadcast:
        request["broadcast"] = address.broadcast
    ipr.addr("add", **request)


def _configure(ipr: IPRoute, index: int, state: LinkState, *, up: bool) -> None:
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


def _inside(netns_fd: int) -> IPRoute:
    """An IPRoute whose socket a forked helper made inside the namespace netns_fd."""
    from pyroute2 import IPRoute

    try:
        return IPRoute(netns=netns_fd, flags=0)
    except TypeError as error:
        # pyroute2 before 0.8 (Debian 12's python3-pyroute2 0.7.2) takes no netns= there:
        # its NetNS forks the same helper, and proxies the same calls to it.
        if "netns" not in str(error):
            raise
        from pyroute2 import NetNS

        return NetNS(netns_fd, flags=0)


def move_into_container(container_pid: int, items: list[tuple[str, NetDevice]], container_id: str) -> None:
    """Move each (origin, NetDevice) from this namespace into the container's; all or none.

    What moved is recorded under container_id, for return_to_host; no record, no move.
    """
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
    host_fd = None
    try:
        if _same_namespace(netns_fd, "/proc/self/ns/net"):
            raise HookError(STEP, first_origin,
                            "the container shares the runtime's network namespace; moving an interface "
                            "there would change nothing (give the container its own 'network' namespace)")
        # Opened before the helper forks: an undo sends interfaces home by this fd through the
        # helper, and pyroute2 0.7's helper runs every call itself, with the fds of its fork.
        host_fd = _open_namespace("/proc/self/ns/net")
        try:
            with IPRoute() as host, _inside(netns_fd) as inner:
                plan = _check_all(host, inner, items)
                _move_all(host, inner, netns_fd, host_fd, plan, container_id)
        except NetlinkError as error:  # a refusal outside a single device's steps
            raise HookError(STEP, first_origin, f"netlink: {_why(error)}") from None
    finally:
        os.close(netns_fd)
        if host_fd is not None:
            os.close(host_fd)


def _check_all(host: IPRoute, inner: IPRoute,
               items: list[tuple[str, NetDevice]]) -> list[tuple[str, NetDevice, LinkState]]:
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


def _move_all(host: IPRoute, inner: IPRoute, netns_fd: int, host_fd: int,
              plan: list[tuple[str, NetDevice, LinkState]], container_id: str) -> None:
    moved: list[_Moved] = []
    try:
        for origin, device, state in plan:
            _move_one(host, inner, netns_fd, origin, device, state, moved)
        try:
            _save_record(container_id, netns_fd, inner, moved)
        except Exception as error:  # without the record poststop could not send them home
            origins = ", ".join(item.origin for item in moved)
            # a write that failed names the file; a folder refused names itself in the error
            where = _record_path(container_id) if isinstance(error, OSError) else record_dir()
            raise HookError(STEP, origins, f"recording the moved interfaces in {where}: {_why(error)}") from None
    except HookError as error:
        undone = _move_back(host, inner, host_fd, moved)
        if undone:
            raise HookError(error.step, error.device, f"{_message(error)}; undoing: {undone}") from None
        raise


def _move_one(host: IPRoute, inner: IPRoute, netns_fd: int, origin: str, device: NetDevice, state: LinkState,
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


def _moved_index(inner: IPRoute, cname: str, before: set[int]) -> int:
    if not is_interface_name_template(cname):
        return inner.link("get", ifname=cname)[0]["index"]
    new = [link["index"] for link in inner.link("dump") if link["index"] not in before]
    if len(new) != 1:
        raise LookupError(f"the kernel's name for template '{cname}' is ambiguous")
    return new[0]


def _move_back(host: IPRoute, inner: IPRoute, host_fd: int, moved: list[_Moved]) -> str:
    """Undo a partial move: each interface home under its name, as it was. '' if all went well."""
    problems = []
    for item in reversed(moved):
        try:
            inner.link("set", index=item.inner_index, net_ns_fd=host_fd, ifname=item.host.name)
            link = host.link("get", ifname=item.host.name)[0]
            _configure(host, link["index"], item.host, up=item.host.up)
        except Exception as error:
            problems.append(f"'{item.host.name}' ({item.origin}): {_why(error)}")
    return "; ".join(problems)


# --- poststop --------------------------------------------------------------------------


def container_netns(state: State | dict[str, Any], config: Config | dict[str, Any]) -> tuple[int | None, str]:
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
    path: Any = network.get("path")
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


def return_to_host(state: State | dict[str, Any], config: Config | dict[str, Any],
                   items: list[tuple[str, NetDevice]]) -> list[str]:
    """Bring the interfaces moved in at createRuntime back under their host names.

    `state` and `config` are the OCI state and config.json, as dicts or as cdi_hook.oci's
    State and Config. Only an interface that matches this container's record is moved (the
    record goes either way). Returns one note per interface (for the hook's debug log).
    Tries every interface, then raises one HookError naming those that were not returned;
    at poststop the caller reports it as a warning, since the container is already gone.
    """
    if not items:
        return []
    container_id = state.get("id") if isinstance(state, dict) else getattr(state, "id", None)
    notes: list[str] = []
    failures: list[str] = []
    try:
        record = _take_record(container_id, failures)
    except Exception as error:
        record = None
        failures.append(f"reading the record of the moved interfaces in {record_dir()}: {_why(error)}")
    netns_fd, where = container_netns(state, config)
    if netns_fd is None and record and record.get("devices"):
        # interfaces were moved in and cannot be sent home by name: the operator should know
        # (a physical one is back under its container-side name, a virtual one is gone)
        failures.append(f"network namespace not found: {where}; {GONE_NOTE}")
    elif netns_fd is None:
        notes.append(f"network namespace not found: {where}; {GONE_NOTE}")
    else:
        try:
            _return_all(record, netns_fd, items, notes, failures)
        except Exception as error:
            failures.append(f"cannot reach {where}: {_why(error)}")
        finally:
            os.close(netns_fd)
    if failures:
        raise HookError(STEP, "", "at poststop: " + "; ".join(failures))
    return notes


def _return_all(record: dict | None, netns_fd: int, items: list[tuple[str, NetDevice]], notes: list[str],
                failures: list[str]) -> None:
    from pyroute2 import IPRoute

    # A record made for another namespace (the same container id, started again) says nothing here.
    moved = record.get("devices") if record and record.get("netns") == list(_namespace_id(netns_fd)) else None
    if not isinstance(moved, dict):
        moved = {}
    host_fd = _open_namespace("/proc/self/ns/net")
    try:
        with IPRoute() as host, _inside(netns_fd) as inner:
            for origin, device in items:
                hname = device.host_interface_name
                try:
                    ok, note = _return_one(host, inner, host_fd, netns_fd, device, moved.get(hname))
                except Exception as error:
                    ok, note = False, f"'{hname}' is not returned: {_why(error)}"
                (notes if ok else failures).append(f"{origin}: {note}")
    finally:
        os.close(host_fd)


def _return_one(host: IPRoute, inner: IPRoute, host_fd: int, netns_fd: int, device: NetDevice,
                moved: Any) -> tuple[bool, str]:
    """Send home the interface `moved` (its record) describes, if it is still that one."""
    hname = device.host_interface_name
    if not isinstance(moved, dict) or not isinstance(moved.get("identity"), dict):
        cname = container_name(device)
        if not is_interface_name_template(cname) and _find_link(inner, cname) is not None:
            return False, (f"'{hname}' is not returned: there is no record of moving it into this namespace, so "
                           f"'{cname}' there may be the container's own; it stays")
        return True, f"no record of moving '{hname}' into this namespace; nothing to return"
    recorded, index = moved["identity"], moved["identity"].get("index")
    what = f"the interface moved in as '{moved.get('name')}' (MAC {recorded.get('address')})"
    link = _link_at(inner, index) if isinstance(index, int) else None
    if link is None:
        return False, f"'{hname}' is not returned: {what} is gone from the container's namespace (index {index})"
    if _identity(link) != recorded:
        return False, (f"'{hname}' is not returned: index {index} in the container's namespace is no longer "
                       f"{what}: the container made it, or changed it; it stays")
    name = link.get_attr("IFLA_IFNAME")
    try:
        if _find_link(host, hname) is not None:
            return False, f"'{name}' cannot return: the host already has an interface named '{hname}'"
        _drop_altnames(inner, link)
        inner.link("set", index=index, state="down")
        inner.link("set", index=index, net_ns_fd=host_fd, ifname=hname)
    except Exception as error:
        stranded = _strand_back(host, inner, netns_fd, index, recorded, name)
        if _is_errno(error, errno.EEXIST):
            return False, f"'{name}' cannot return: the host already has an interface named '{hname}'{stranded}"
        return False, f"'{name}' cannot return as '{hname}': {_why(error)}{stranded}"
    return True, f"'{name}' returned to the host as '{hname}' (down, without addresses)"


def _drop_altnames(inner: IPRoute, link: _Link) -> None:
    """Alternative names travel with an interface across namespaces: the container could
    name a host interface's name (and so keep this one from coming home), or one the host
    uses later."""
    properties = link.get_attr("IFLA_PROP_LIST")
    altnames = properties.get_attrs("IFLA_ALT_IFNAME") if properties else []
    if altnames:
        inner.link("property_del", index=link["index"], altname=altnames)


def _strand_back(host: IPRoute, inner: IPRoute, netns_fd: int, index: int, recorded: dict, name: str) -> str:
    """A move whose rename failed leaves the interface on the host under its container-side
    name: send it back to the container's namespace rather than leave a stray name on the
    host. Had that name been taken on the host, the kernel would not have moved it."""
    link = _link_at(inner, index)
    if link is not None and _identity(link) == recorded:
        return ""  # still inside
    link = _find_link(host, name)
    if link is None:
        return ""
    try:
        host.link("set", index=link["index"], net_ns_fd=netns_fd)
    except Exception as error:
        return f" (it is on the host as '{name}' now: {_why(error)})"
    return ""


# --- the record: what each moved interface is inside the container ---------------------


def _identity(link: _Link) -> dict:
    """What identifies an interface cdi-hook moved in, as the container's namespace shows it.

    The index and MAC say which one it is. The container can give an interface it makes any
    free index and MAC, so once the real one is gone (a veth deleted) it could copy both;
    what it cannot copy: a physical interface's permanent address, and the peer or lower
    interface in the runtime's namespace (IFLA_LINK with IFLA_LINK_NETNSID) of a veth or
    macvlan moved in: an interface made inside has its peer inside.
    """
    info = link.get_attr("IFLA_LINKINFO")
    return {
        "index": link["index"],
        "address": link.get_attr("IFLA_ADDRESS"),
        "perm_address": link.get_attr("IFLA_PERM_ADDRESS"),
        "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
        "link": link.get_attr("IFLA_LINK"),
        "link_netnsid": link.get_attr("IFLA_LINK_NETNSID"),
    }


def _link_at(ipr: IPRoute, index: int) -> _Link | None:
    """The link message for `index` in the socket's namespace, or None."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        return ipr.link("get", index=index)[0]
    except NetlinkError as error:
        if _is_errno(error, errno.ENODEV):
            return None
        raise


def _namespace_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def record_dir() -> str:
    """$CDI_HOOK_STATE_DIR/../netdev: beside the exclusive-device holds (default /run/cdi-hook/netdev)."""
    from cdi_hook import settings

    return os.path.join(settings.current().state_root, "netdev")


def _record_name(container_id: object) -> str:
    if not isinstance(container_id, str) or not container_id:
        raise ValueError("the OCI state has no container id")
    return file_name(container_id) + ".json"  # the name records had before state.py too


def _save_record(container_id: str, netns_fd: int, inner: IPRoute, moved: list[_Moved]) -> None:
    devices = {}
    for item in moved:
        link = inner.link("get", index=item.inner_index)[0]
        devices[item.host.name] = {"name": link.get_attr("IFLA_IFNAME"), "identity": _identity(link)}
    name = _record_name(container_id)
    dir_fd = open_private_dir(record_dir(), create=True)
    assert dir_fd is not None  # create=True: made, or StateError
    try:
        write_record(dir_fd, name, {"netns": list(_namespace_id(netns_fd)), "devices": devices})
    finally:
        os.close(dir_fd)


def _record_path(container_id: object) -> str:
    try:
        return os.path.join(record_dir(), _record_name(container_id))
    except ValueError:
        return record_dir()


def _take_record(container_id: object, failures: list[str]) -> dict | None:
    """This container's record, removed from the dir; None when there is none. A record
    that cannot be removed (a read-only folder) is still used: the interfaces go home, and
    failures names the file left behind."""
    name = _record_name(container_id)
    directory = record_dir()
    dir_fd = open_private_dir(directory)
    if dir_fd is None:
        return None
    try:
        # plain_json: a container started by the cdi-hook before state.py has a record with
        # no checksum line; its interface must still come home after an upgrade.
        record = read_record(dir_fd, name, os.path.join(directory, name), plain_json=True)
        try:
            remove_at(dir_fd, name)
        except OSError as error:
            failures.append(f"cannot remove {os.path.join(directory, name)}: {_why(error)}")
    finally:
        os.close(dir_fd)
    return record if isinstance(record, dict) else None
