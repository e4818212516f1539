"""Switches (Linux bridges) and tap membership, over netlink with pyroute2; never `ip`."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class BridgeError(RuntimeError):
    pass


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def ensure_bridge(name: str, *, up: bool = True) -> int:
    """Create bridge ``name`` if missing; refuse a non-bridge of that name. Returns its index."""
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            try:
                ipr.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                raise BridgeError(f"cannot create bridge {name}: {exc}") from exc
            idx = _index(ipr, name)
            if idx is None:
                raise BridgeError(f"bridge {name} vanished after creation")
        else:
            link = ipr.get_links(idx)[0]
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            if kind != "bridge":
                raise BridgeError(f"{name} exists and is not a bridge ({kind})")
        if up:
            ipr.link("set", index=idx, state="up")
        return idx


def attach(ifname: str, bridge: str, *, up: bool = True) -> None:
    """Enslave ``ifname`` to ``bridge`` and set it up (the tap carries traffic only when up)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        br = _index(ipr, bridge)
        if idx is None or br is None:
            raise BridgeError(f"attach {ifname} to {bridge}: no such link")
        ipr.link("set", index=idx, master=br)
        ipr.link("set", index=idx, state="up" if up else "down")


def set_up(ifname: str, up: bool = True) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            raise BridgeError(f"no such link {ifname}")
        ipr.link("set", index=idx, state="up" if up else "down")


def delete_link(name: str) -> None:
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is not None:
            ipr.link("del", index=idx)
