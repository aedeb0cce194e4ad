"""The same-origin rule for WebSocket handshakes: the Origin's host and port against the Host header."""

from __future__ import annotations

import pytest

from server.origins import origin_allowed


@pytest.mark.parametrize(
    ("origin", "host", "expected"),
    [
        # A stack opened by LAN address or on another port: NGINX forwards the port in Host.
        ("http://10.0.0.5:8080", "10.0.0.5:8080", True),
        ("http://10.0.0.5:8080", "10.0.0.5", False),
        ("http://10.0.0.5:8080", "10.0.0.5:9090", False),
        ("http://10.0.0.5", "10.0.0.5:8080", False),
        # Default ports, written out on either side or on neither.
        ("http://chat.example", "chat.example:80", True),
        ("http://chat.example:80", "chat.example", True),
        ("https://chat.example", "chat.example:443", True),
        ("https://chat.example:443", "chat.example", True),
        ("https://chat.example", "chat.example", True),
        ("https://chat.example", "chat.example:80", False),
        ("http://chat.example", "chat.example:443", False),
        # Case, IPv6, and what never matches.
        ("https://Chat.Example", "chat.example", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://[::1]:8080", "[::1]", False),
        ("http://chat.example", "evil@chat.example", False),
        ("http://chat.example", "chat.example:http", False),
        ("http://chat.example", "", False),
        ("https://evil.example", "chat.example", False),
    ],
)
def test_same_origin_compares_host_and_port(origin: str, host: str, expected: bool) -> None:
    assert origin_allowed(origin, host, ()) is expected
