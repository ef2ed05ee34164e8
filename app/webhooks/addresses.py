"""The SSRF guard: which URLs an endpoint may have, and the one address a delivery then connects to.

A URL is http(s) with a host; every address that host resolves to must pass app.core.addresses'
rule (global only). The host is resolved once and the request goes to the address that was checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from app.core.addresses import IPAddress, Unresolved, host_addresses, why_not_global

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


async def resolve(url: str, *, allow_private: bool) -> Target:
    """Check `url` and resolve its host once: the address to connect to (AddressRefused if none may be)."""
    parsed = parse_url(url)
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        found = await host_addresses(host, port)
    except Unresolved:
        raise AddressRefused(f"url: the host {host} does not resolve") from None
    if not allow_private:
        for ip in found:
            reason = why_not_global(ip)
            if reason is not None:
                raise AddressRefused(f"url: the host {host} resolves to {ip}, {reason}")
    return Target(url=parsed, addresses=tuple(found))
