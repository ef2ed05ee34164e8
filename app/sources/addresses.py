"""Which database hosts a SQL source may reach: the rule of app.core.addresses, applied to a host and port.

SOURCE_ALLOW_PRIVATE=true lifts it. The connection goes to the address checked.
"""

from __future__ import annotations

from app.core.addresses import IPAddress, Unresolved, host_addresses, why_not_global
from app.core.errors import InvalidInput


async def checked_address(host: str, port: int, *, allow_private: bool) -> IPAddress:
    """The one address to connect to, once every address of `host` passed the rule (422 otherwise)."""
    try:
        found = await host_addresses(host, port)
    except Unresolved:
        raise InvalidInput(f"url: the host {host} does not resolve") from None
    if not allow_private:
        for ip in found:
            why = why_not_global(ip)
            if why is not None:
                raise InvalidInput(
                    f"url: the host {host} resolves to {ip}, {why}; a source may only reach global addresses "
                    "(SOURCE_ALLOW_PRIVATE=true lifts this)"
                )
    return found[0]
