"""Which database hosts a SQL source may reach: the webhook rule, applied to a host and port.

Every address the host resolves to must be global: not loopback, private, link-local, shared
(100.64.0.0/10), multicast, unspecified or reserved, nor one of those written as IPv6 (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo). SOURCE_ALLOW_PRIVATE=true lifts the rule. The host is resolved
on the event loop's resolver, never blocking it, and the connection goes to the address checked, so
a DNS answer that changes between the check and the connection cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from app.core.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SHARED_V4 = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
V4_COMPATIBLE = ipaddress.ip_network("::/96")
RESOLVE_TIMEOUT_SECONDS = 5.0


def _as_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 spelling stands for, if it is one."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64 or (ip in V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why a source may not connect to `ip` ("a loopback address"), or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _as_ipv4(ip)
        if inner is not None:
            why = refusal(inner)
            return None if why is None else f"{why} written as IPv6"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_V4:
        return "a shared (carrier-grade NAT) address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    return None if ip.is_global else "not a global address"


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` stands for (an address literal: itself); 422 when it does not resolve."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise InvalidInput(f"url: the host {host} does not resolve") from None
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise InvalidInput(f"url: the host {host} does not resolve")
    return found


async def checked_address(host: str, port: int, *, allow_private: bool) -> IPAddress:
    """The one address to connect to, once every address of `host` passed the rule (422 otherwise)."""
    found = await resolve(host, port)
    if not allow_private:
        for ip in found:
            why = refusal(ip)
            if why is not None:
                raise InvalidInput(
                    f"url: the host {host} resolves to {ip}, {why}; a source may only reach global addresses "
                    "(SOURCE_ALLOW_PRIVATE=true lifts this)"
                )
    return found[0]
