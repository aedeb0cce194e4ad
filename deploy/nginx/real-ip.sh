#!/bin/sh
# Trusted proxies for the compose NGINX container, from its environment.
#
# docker-compose mounts this file into /docker-entrypoint.d/, which the official nginx image runs before
# NGINX starts. It writes the realip directives that `render.py --trusted-proxy` would render, for the
# comma- or space-separated addresses/CIDRs in SMARTEDU_TRUSTED_PROXIES, to the file that the compose
# nginx.conf includes (rendered with --real-ip-include), and the geo block that sets $smartedu_trusted_peer
# (1 for a connection from one of them: only then is an incoming X-Forwarded-Proto passed on). Unset, the
# file holds only that block with no address in it and NGINX keys everything on the connecting peer. A
# malformed entry stops the container (nginx -t catches the rest: a well-formed but invalid CIDR).
set -eu
set -f  # no globbing of the entries

out="${SMARTEDU_REAL_IP_CONF:-/etc/nginx/smartedu/real-ip.conf}"
proxies=$(printf '%s' "${SMARTEDU_TRUSTED_PROXIES:-}" | tr ',' ' ')

mkdir -p "$(dirname "$out")"
trap 'rm -f "$out.tmp"' EXIT
{
    echo "# Written by real-ip.sh from SMARTEDU_TRUSTED_PROXIES when the container started."
    count=0
    for proxy in $proxies; do
        case "$proxy" in
            *[!0-9A-Fa-f.:/]*)
                echo "real-ip.sh: SMARTEDU_TRUSTED_PROXIES: not an IP address or CIDR: $proxy" >&2
                exit 1
                ;;
        esac
        echo "set_real_ip_from $proxy;"
        count=$((count + 1))
    done
    if [ "$count" -gt 0 ]; then
        echo "real_ip_header X-Forwarded-For;"
        echo "real_ip_recursive on;"
    fi
    echo 'geo $realip_remote_addr $smartedu_trusted_peer {'
    echo "    default 0;"
    for proxy in $proxies; do
        echo "    $proxy 1;"
    done
    echo "}"
} >"$out.tmp"
mv "$out.tmp" "$out"
