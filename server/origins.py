"""Origin checking for WebSocket upgrades (CORS does not protect WebSockets)."""

from __future__ import annotations

from urllib.parse import urlsplit


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """True for non-browser clients (no Origin), the server's own origin, and configured origins."""
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if "*" in allowed or origin in allowed:
        return True
    if host is None or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


def is_web_origin(origin: str | None) -> bool:
    """An http(s) origin that a tenant might allow (checked against the tenant once the token is known)."""
    if not origin:
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.path.strip("/")
