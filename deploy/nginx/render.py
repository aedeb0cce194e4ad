#!/usr/bin/env python3
"""Render nginx.conf.template for N app replicas (standard library only).

docker-compose uses the defaults with app1..3; deploy/nginx/nginx.conf is exactly

    python deploy/nginx/render.py --upstream app1:8080 --upstream app2:8080 --upstream app3:8080 \
        --real-ip-include /etc/nginx/smartedu/real-ip.conf --output deploy/nginx/nginx.conf

Tests and benchmarks render for loopback replicas with private paths, then run
`nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`:

    python deploy/nginx/render.py --listen 127.0.0.1:8088 --upstream 127.0.0.1:9001 \
        --upstream 127.0.0.1:9002 --static-root "$PWD/static" --pid "$DIR/nginx.pid" \
        --error-log "$DIR/error.log" --access-log "$DIR/access.log" --temp-dir "$DIR/tmp" \
        --user "$(id -un)" --output "$DIR/nginx.conf"

Behind a load balancer, `--trusted-proxy CIDR` (repeat it) makes NGINX take the client address from
X-Forwarded-For when the connection comes from such an address, so ip_hash, the per-address limits and
the access log see clients instead of the balancer; an incoming X-Forwarded-Proto is passed on only from
such an address. docker-compose renders with
`--real-ip-include /etc/nginx/smartedu/real-ip.conf` instead: real-ip.sh writes that file from the
container's SMARTEDU_TRUSTED_PROXIES when NGINX starts.

The temp dir must exist; NGINX creates its sub-directories. The module can also be imported:
`render(NginxOptions(upstreams=(...), ...))` returns the configuration text.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("nginx.conf.template")
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")
# Anything that could end a directive or open a block would let a value inject configuration.
_SAFE_TOKEN = re.compile(r"^[^\s;{}'\"#$\\]+$")
_UPSTREAM = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
_LISTEN = re.compile(r"^((\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?[0-9]{1,5}$")


class RenderError(ValueError):
    """An option that cannot go into the configuration as given."""


@dataclass(frozen=True)
class NginxOptions:
    """Values for the template's placeholders; the defaults are the docker-compose ones."""

    upstreams: tuple[str, ...]
    listen: str = "80"
    static_root: str = "/srv/static"
    pid: str = "/var/run/nginx.pid"
    error_log: str = "stderr"
    access_log: str = "/dev/stdout"
    temp_dir: str = "/var/cache/nginx"
    user: str | None = None
    ws_conn_per_ip: int = 200
    ws_rate_per_second: int = 10
    ws_burst: int = 200
    trusted_proxies: tuple[str, ...] = ()
    real_ip_include: str | None = None


def _token(name: str, value: str) -> str:
    if not _SAFE_TOKEN.match(value):
        raise RenderError(f"{name} must be a single token without spaces, quotes, ';', '{{', '}}', '#' or '$'")
    return value


def _absolute(name: str, value: str) -> str:
    _token(name, value)
    if not value.startswith("/"):
        raise RenderError(f"{name} must be an absolute path, got {value!r}")
    return value.rstrip("/") or "/"


def _log_target(name: str, value: str) -> str:
    if value == "stderr":
        return value
    return _absolute(name, value)


def _positive(name: str, value: int) -> str:
    if value < 1:
        raise RenderError(f"{name} must be at least 1, got {value}")
    return str(value)


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value)
    except ValueError:
        raise RenderError(f"trusted proxy must be an IP address or CIDR without host bits, got {value!r}") from None
    return value


def real_ip_directives(trusted_proxies: Sequence[str]) -> list[str]:
    """The realip directives that trust X-Forwarded-For from `trusted_proxies` (none for no proxy), and
    `$smartedu_trusted_peer`: 1 when the connecting peer is one of them (0 for every peer without any)."""
    networks = [_network(proxy) for proxy in trusted_proxies]
    # Only a trusted proxy may say which scheme the client used (X-Forwarded-Proto); the template maps it.
    peer = [
        "geo $realip_remote_addr $smartedu_trusted_peer {", "    default 0;", *(f"    {n} 1;" for n in networks), "}"
    ]
    if not networks:
        return peer
    # Recursive: the client address is the last one in X-Forwarded-For that no trusted proxy added, so a
    # client cannot choose its own address by sending the header itself.
    lines = [f"set_real_ip_from {network};" for network in networks]
    return [*lines, "real_ip_header X-Forwarded-For;", "real_ip_recursive on;", *peer]


def _real_ip(options: NginxOptions) -> str:
    if options.trusted_proxies and options.real_ip_include:
        raise RenderError("trusted_proxies and real_ip_include are alternatives; give one")
    if options.real_ip_include:
        return f"    include {_absolute('real_ip_include', options.real_ip_include)};"
    lines = real_ip_directives(options.trusted_proxies)
    if not options.trusted_proxies:
        lines.insert(0, "# No trusted proxy (render.py --trusted-proxy): $remote_addr is the connecting peer.")
    return "\n".join(f"    {line}" for line in lines)


def placeholder_values(options: NginxOptions) -> dict[str, str]:
    """Map each placeholder name to its text, validating every value."""
    if not options.upstreams:
        raise RenderError("at least one upstream (host:port) is required")
    servers = []
    for upstream in options.upstreams:
        if not _UPSTREAM.match(upstream):
            raise RenderError(f"upstream must be host:port, got {upstream!r}")
        servers.append(f"        server {upstream} max_fails=3 fail_timeout=10s;")
    if not _LISTEN.match(options.listen):
        raise RenderError(f"listen must be PORT or HOST:PORT, got {options.listen!r}")
    user = (
        f"user {_token('user', options.user)};"
        if options.user
        else "# Worker user: the binary's compiled-in default (render.py --user to choose)."
    )
    return {
        "USER_DIRECTIVE": user,
        "PID": _absolute("pid", options.pid),
        "ERROR_LOG": _log_target("error_log", options.error_log),
        "ACCESS_LOG": _log_target("access_log", options.access_log),
        "TEMP_DIR": _absolute("temp_dir", options.temp_dir),
        "STATIC_ROOT": _absolute("static_root", options.static_root),
        "LISTEN": options.listen,
        "UPSTREAM_SERVERS": "\n".join(servers),
        "WS_CONN_PER_IP": _positive("ws_conn_per_ip", options.ws_conn_per_ip),
        "WS_RATE": _positive("ws_rate_per_second", options.ws_rate_per_second),
        "WS_BURST": _positive("ws_burst", options.ws_burst),
        "REAL_IP": _real_ip(options),
    }


def render(options: NginxOptions, template: str | None = None) -> str:
    """Return the configuration text for `options`; every placeholder must be known and used."""
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    values = placeholder_values(options)
    used = set(PLACEHOLDER.findall(text))
    unknown = used - values.keys()
    if unknown:
        raise RenderError(f"template has unknown placeholders: {', '.join(sorted(unknown))}")
    unused = values.keys() - used
    if unused:
        raise RenderError(f"template lacks placeholders: {', '.join(sorted(unused))}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def _parse(argv: Sequence[str] | None) -> tuple[NginxOptions, str | None]:
    defaults = NginxOptions(upstreams=())
    parser = argparse.ArgumentParser(description="Render the SmartEdu NGINX configuration.")
    parser.add_argument(
        "--upstream",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="an app replica; repeat once per replica",
    )
    parser.add_argument("--listen", default=defaults.listen, help="PORT or HOST:PORT (default %(default)s)")
    parser.add_argument(
        "--static-root", default=defaults.static_root, help="directory served at /static/ (default %(default)s)"
    )
    parser.add_argument("--pid", default=defaults.pid, help="pid file (default %(default)s)")
    parser.add_argument(
        "--error-log", default=defaults.error_log, help="error log file or 'stderr' (default %(default)s)"
    )
    parser.add_argument("--access-log", default=defaults.access_log, help="access log file (default %(default)s)")
    parser.add_argument(
        "--temp-dir",
        default=defaults.temp_dir,
        help="existing directory for NGINX temp sub-directories (default %(default)s)",
    )
    parser.add_argument("--user", default=None, help="worker user when the master runs as root (default: compiled-in)")
    parser.add_argument(
        "--ws-conn-per-ip",
        type=int,
        default=defaults.ws_conn_per_ip,
        help="open /ws connections per client address (default %(default)s)",
    )
    parser.add_argument(
        "--ws-rate",
        type=int,
        default=defaults.ws_rate_per_second,
        help="/ws handshakes per second per client address (default %(default)s)",
    )
    parser.add_argument(
        "--ws-burst",
        type=int,
        default=defaults.ws_burst,
        help="/ws handshakes allowed above the rate at once (default %(default)s)",
    )
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="a load balancer's address or network whose X-Forwarded-For is believed; repeat for several",
    )
    parser.add_argument(
        "--real-ip-include",
        default=None,
        metavar="PATH",
        help="include this file for the realip directives instead (docker-compose: written by real-ip.sh)",
    )
    parser.add_argument("--output", "-o", default=None, help="write here instead of standard output")
    args = parser.parse_args(argv)
    options = NginxOptions(
        upstreams=tuple(args.upstream),
        listen=args.listen,
        static_root=args.static_root,
        pid=args.pid,
        error_log=args.error_log,
        access_log=args.access_log,
        temp_dir=args.temp_dir,
        user=args.user,
        ws_conn_per_ip=args.ws_conn_per_ip,
        ws_rate_per_second=args.ws_rate,
        ws_burst=args.ws_burst,
        trusted_proxies=tuple(args.trusted_proxy),
        real_ip_include=args.real_ip_include,
    )
    return options, args.output


def main(argv: Sequence[str] | None = None) -> int:
    options, output = _parse(argv)
    try:
        text = render(options)
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
