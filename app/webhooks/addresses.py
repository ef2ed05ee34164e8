"""The SSRF guard: which URLs an endpoint may have, and the one address a delivery then connects to.

A URL is http(s) with a host; every address that host resolves to must be global (not loopback,
private, link-local, shared, multicast, unspecified, reserved, or any of those written as IPv6:
IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo). The host is resolved once, on the event loop's
resolver (never blocking it), and the request goes to the address that was checked, so a DNS answer
that changes between the check and the connection (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SHARED = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
RESOLVE_TIMEOUT_SECONDS = 5.0
MAX_URL_LENGTH = 2000


class AddressRefused(Exception):
    """A URL an endpoint may not have, or a host that resolves to an address it may not reach."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Target:
    """Where one delivery goes: the URL as subscribed, and the checked address it connects to."""

    url: httpx.URL
    # Every address the host resolved to, all checked: tried in order until one accepts the connection.
    addresses: tuple[IPAddress, ...]

    def connect_url(self, address: IPAddress) -> httpx.URL:
        return self.url.copy_with(host=str(address))

    @property
    def host_header(self) -> str:
        host = self.url.raw_host.decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        return host if self.url.port is None else f"{host}:{self.url.port}"

    @property
    def server_name(self) -> str:
        return self.url.raw_host.decode("ascii")


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
    """Why a delivery may not reach `ip`, as a phrase ("a loopback address"); None: it may."""
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


def parse_url(url: str) -> httpx.URL:
    """The URL, if it is one an endpoint may have (http or https, a host, a valid port)."""
    if len(url) > MAX_URL_LENGTH:
        raise AddressRefused(f"url: at most {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except Exception:  # noqa: BLE001 - httpx and idna raise several kinds for a malformed URL
        raise AddressRefused("url: not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise AddressRefused("url: must be http or https")
    if not host or "%" in host:
        raise AddressRefused("url: must name a host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise AddressRefused("url: the port must be between 1 and 65535")
    if parsed.fragment:
        raise AddressRefused("url: may not have a #fragment")
    return parsed


async def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_SECONDS):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        raise AddressRefused(f"url: the host {host} does not resolve") from None
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise AddressRefused(f"url: the host {host} does not resolve")
    return found


async def resolve(url: str, *, allow_private: bool) -> Target:
    """Check `url` and resolve its host once: the address to connect to (AddressRefused if none may be)."""
    parsed = parse_url(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    found = await _addresses(host, port)
    if not allow_private:
        for ip in found:
            reason = why_not_global(ip)
            if reason is not None:
                raise AddressRefused(f"url: the host {host} resolves to {ip}, {reason}")
    return Target(url=parsed, addresses=tuple(found))
