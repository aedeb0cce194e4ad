"""Where the load may go: loopback only unless allowed, checked where connections are made, no redirects."""

from __future__ import annotations

import ipaddress
import socket
from types import SimpleNamespace

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult


class RedirectRefused(aiohttp.ClientError):
    """The upgrade was answered with a redirect: it is not followed (the tokens would go with it)."""


class RemoteRefused(OSError):
    """A name resolved to an address outside loopback while remote targets are not allowed."""


def is_loopback(host: str) -> bool:
    """Whether a URL's host is loopback without asking DNS: `localhost`, 127.0.0.0/8 or ::1.

    Only the bare name `localhost`: `localhost.` and `*.localhost` go to the DNS resolver, which may
    answer anything (the connector refuses such answers too, see LoopbackResolver).
    """
    name = host.strip("[]").lower()
    return name == "localhost" or is_loopback_address(name)


def is_loopback_address(text: str) -> bool:
    """Whether an IP address (not a name) is in 127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False  # names are not resolved here: a DNS answer could point anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class LoopbackResolver(AbstractResolver):
    """Resolves names like the default resolver, and refuses any answer outside loopback."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else aiohttp.DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not is_loopback_address(result["host"]):
                raise RemoteRefused(
                    f"{host} resolves to {result['host']}, outside loopback: refused without --allow-remote"
                )
        return results

    async def close(self) -> None:
        await self._inner.close()


async def _refuse_redirect(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: aiohttp.TraceRequestRedirectParams
) -> None:
    location = params.response.headers.get("Location", "")
    raise RedirectRefused(f"the server redirected the upgrade ({params.response.status}) to {location!r}")


def refuse_redirects() -> aiohttp.TraceConfig:
    """A trace that stops a request at its first redirect (ws_connect has no allow_redirects)."""
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return trace
