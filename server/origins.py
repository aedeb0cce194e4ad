"""Origin checking for WebSocket upgrades (CORS does not protect WebSockets), and the origins that may frame
the pages."""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import chain
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
# One http(s) origin as a CSP source: a host name or bracketed IPv6 address, an optional port, nothing else.
_PLAIN_ORIGIN = re.compile(r"https?://(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """True for non-browser clients (no Origin), the server's own origin, and configured origins: those
    whose requests may carry the cookie session. `*` does not count: it lets any origin in with a token."""
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    if host is None or origin == "null":
        return False
    return _same_origin(origin, host)


def _same_origin(origin: str, host: str) -> bool:
    """True when `origin` names the host and port of the request's Host header.

    Browsers leave the default port out of an Origin, and some clients write it into Host, so a missing
    port on either side is the origin scheme's default (80 for http, 443 for https).
    """
    parts = urlsplit(origin)
    own = _host_and_port(host, parts.scheme)
    return own is not None and own == _host_and_port(parts.netloc, parts.scheme)


def _host_and_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    if not netloc or "@" in netloc:
        return None
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, _DEFAULT_PORTS.get(scheme) if port is None else port


def is_web_origin(origin: str | None) -> bool:
    """An http(s) origin that a tenant might allow (checked against the tenant once the token is known)."""
    if not origin:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.path.strip("/")


def is_plain_origin(value: str) -> bool:
    """True for `scheme://host[:port]` (http or https) and nothing more: safe to put in a CSP header."""
    return _PLAIN_ORIGIN.fullmatch(value) is not None


def canonical_origin(text: str) -> str:
    """`text` as browsers send it in an Origin header: `scheme://host[:port]`, scheme and host lowercase,
    the scheme's default port left out, no trailing `/`. That is what a tenant's allowed origins are
    compared with, exactly. Raises ValueError saying what `text` is instead (a path, a user name, ...)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # an unclosed IPv6 bracket, a port that is not a number or not 0-65535
        raise ValueError("is not an origin like https://lms.example.edu") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or port == 0:
        raise ValueError("is not an origin like https://lms.example.edu (http:// or https://, a host, a port)")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold a user name or password")
    if parts.path.strip("/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("must not have a path, ?query or #fragment: an origin is scheme://host[:port]")
    host = parts.hostname  # lowercase
    if not host.isascii():
        raise ValueError("has a host that is not ASCII: give it as browsers send it, in punycode (xn--...)")
    netloc = f"[{host}]" if ":" in host else host
    origin = f"{scheme}://{netloc}" + ("" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}")
    if not is_plain_origin(origin):
        raise ValueError("is not an origin like https://lms.example.edu")
    return origin


def framing_origins(*lists: Iterable[str]) -> tuple[str, ...]:
    """The origins of these lists that may frame a page (CSP `frame-ancestors`), each once, in order.

    Only well-formed http(s) origins are kept: a school's list is not checked where it is written, and
    one bad entry must not let every site frame the page (`*`) nor add CSP directives of its own (a
    space or a `;`)."""
    kept: list[str] = []
    for origin in chain.from_iterable(lists):
        origin = origin.rstrip("/")
        if is_plain_origin(origin) and origin not in kept:
            kept.append(origin)
    return tuple(kept)


def socket_origin(url: str | None) -> str | None:
    """The WebSocket origin (`wss://host[:port]` for https, `ws://` for http) of a page URL, or None when
    the URL's origin is not a plain one (safe to put in a CSP header)."""
    if not url:
        return None
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    if not is_plain_origin(origin):
        return None
    return ("wss" if parts.scheme == "https" else "ws") + origin[len(parts.scheme) :]
