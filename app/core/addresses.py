"""The one rule for which network addresses the service may reach on its own (webhooks, SQL sources).

Every address a host resolves to must be global: not loopback, private, link-local, shared
(100.64.0.0/10), multicast, unspecified or reserved, nor one of those written as IPv6 (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo). The host is resolved on the event loop's resolver, never
blocking it; callers connect to an address that was checked, so a DNS answer that changes between
the check and the connection (DNS rebinding) cannot redirect them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SHARED = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
RESOLVE_TIMEOUT_SECONDS = 5.0


class Unresolved(Exception):
    """A host that does not resolve (in time)."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, when it is one of the IPv6 spellings of IPv4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def why_not_global(ip: IPAddress) -> str | None:
    """Why the service may not reach `ip`, as a phrase ("a loopback address"); None: it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = why_not_global(embedded)
            return f"{reason} written as IPv6" if reason else None
    checks = (
        ("an unspecified address", ip.is_unspecified),
        ("a loopback address", ip.is_loopback),
        ("a link-local address", ip.is_link_local),
        ("a multicast address", ip.is_multicast),
        ("a shared (carrier-grade NAT) address", isinstance(ip, ipaddress.IPv4Address) and ip in SHARED),
        ("a private address", ip.is_private),
        ("a reserved address", ip.is_reserved),
    )
    for what, applies in checks:
        if applies:
            return what
    return None if ip.is_global else "not a global address"


async def host_addresses(host: str, port: int) -> list[IPAddress]:
    """Every address `host` stands for, in the resolver's order (an address literal: itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise Unresolved(host) from None
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise Unresolved(host)
    return found
