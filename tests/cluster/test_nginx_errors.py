"""What clients see of NGINX's own refusals and failures: the API's JSON error, never an HTML page.

Two replicas behind the template's NGINX. Headers and URLs up to NGINX's 32k buffers reach the app, which
answers what is over its own limits; beyond them, and for bodies over 1 MiB, malformed requests and replicas
that cannot be reached, NGINX answers in the same JSON shape.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest

from server.cluster import find_nginx
from tests.conftest import Services, require_tool

from .harness import Cluster, client_address, running_cluster

pytestmark = pytest.mark.cluster

# Past the app's 8190-byte limits but within NGINX's 32k buffers and the app's 32 KiB parser limit.
APP_REFUSES = 20_000
# Past both: NGINX refuses it before any replica sees it.
NGINX_REFUSES = 40_000


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Two replicas behind NGINX (this module stops them all once, so it has its own cluster)."""
    nginx = require_tool(find_nginx(), "nginx")
    services: Services = request.getfixturevalue("services")
    with running_cluster(services, nginx, replicas=2) as running:
        yield running


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    error: dict[str, Any]


async def ask(
    cluster: Cluster,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: io.BytesIO | None = None,
    source: str = client_address(0),
) -> Answer:
    """A request through NGINX whose answer must be the API's JSON error."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.request(
            method, cluster.nginx_url + path, headers=headers, data=data, timeout=aiohttp.ClientTimeout(total=10)
        ) as response,
    ):
        raw = await response.read()
        return Answer(response.status, response.headers, error_of(response.headers.get("Content-Type", ""), raw))


def error_of(content_type: str, raw: bytes) -> dict[str, Any]:
    """The `error` object of a JSON error body, checked for the catalogue's shape."""
    assert content_type.split(";")[0] == "application/json", (content_type, raw[:200])
    body = orjson.loads(raw)
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"], error
    return error


async def test_a_20kb_header_reaches_the_app_and_gets_its_json_431(cluster: Cluster) -> None:
    answer = await ask(cluster, "GET", "/health", headers={"X-Filler": "a" * APP_REFUSES})
    assert answer.status == 431
    assert answer.error["code"] == "too_large"
    # The app's own answer names the header.
    assert "X-Filler" in answer.error["message"], answer.error
    assert answer.headers["X-Request-ID"]


async def test_a_header_over_nginx_buffers_gets_json_431_from_nginx(cluster: Cluster) -> None:
    answer = await ask(cluster, "GET", "/health", headers={"X-Filler": "a" * NGINX_REFUSES})
    assert answer.status == 431
    assert answer.error["code"] == "too_large"
    assert answer.headers["X-Request-ID"]


@pytest.mark.parametrize("length", [APP_REFUSES, NGINX_REFUSES])
async def test_a_too_long_url_gets_json_414(cluster: Cluster, length: int) -> None:
    answer = await ask(cluster, "GET", "/api/conversations?pad=" + "a" * length)
    assert answer.status == 414
    assert answer.error["code"] == "too_large"
    assert "8190 bytes" in answer.error["message"], answer.error


async def test_a_body_over_the_limit_gets_json_413(cluster: Cluster) -> None:
    body = io.BytesIO(orjson.dumps({"token": "x" * (1024 * 1024)}))
    answer = await ask(cluster, "POST", "/api/session", headers={"Content-Type": "application/json"}, data=body)
    assert answer.status == 413
    assert answer.error["code"] == "too_large"


async def test_a_request_without_host_gets_json_400(cluster: Cluster) -> None:
    # HTTP/1.1 requires Host; NGINX refuses the request before choosing a location.
    reader, writer = await asyncio.open_connection(cluster.nginx.host, cluster.nginx.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert status_line.split(" ")[1] == "400", status_line
    assert error_of(headers["Content-Type"], body)["code"] == "bad_request"


async def test_static_files_nginx_does_not_have_get_json_404(cluster: Cluster) -> None:
    answer = await ask(cluster, "GET", "/static/no-such-file.js")
    assert answer.status == 404
    assert answer.error["code"] == "not_found"


async def test_websockets_still_upgrade_through_nginx(cluster: Cluster) -> None:
    sock = await cluster.connect_nginx({"token": cluster.student_token("nginx-errors-ws")})
    assert sock.frames[0]["type"] == "welcome"


async def test_with_every_replica_stopped_nginx_answers_json_502(cluster: Cluster) -> None:
    for replica in cluster.replicas:
        replica.kill9()
    try:
        # Two requests: each counts one failure against each replica, below max_fails (3), so NGINX does
        # not hold them down once they are back.
        for path in ("/api/conversations", "/"):
            answer = await ask(cluster, "GET", path)
            assert answer.status == 502, path
            assert answer.error["code"] == "busy"
            assert answer.error["retry_after"] > 0
    finally:
        for replica in cluster.replicas:
            await replica.ensure_running()
    assert (await ask(cluster, "GET", "/api/conversations")).error["code"] == "unauthorized"


async def sign_in(base_url: str, token: str) -> tuple[int, list[str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(base_url + "/api/session", json={"token": token}) as response,
    ):
        await response.read()
        return response.status, response.headers.getall("Set-Cookie", [])


async def test_a_sign_in_with_a_cookie_near_the_browsers_limit_passes_nginx(cluster: Cluster) -> None:
    # The most courses whose session the app still keeps in a cookie (it refuses one that browsers would not
    # store): with the other headers, more than NGINX's default 4k buffer for a response's headers. Random
    # course ids, since the cookie is compressed.
    kept: tuple[str, list[str]] | None = None
    for count in range(40, 400, 4):
        teacher = cluster.teacher_token("nginx-errors-teacher", [uuid.uuid4().hex[:12] for _ in range(count)])
        status, cookies = await sign_in(cluster.replica(1).url, teacher)
        if status != 200:
            break
        kept = teacher, cookies
    assert kept is not None
    teacher, cookies = kept
    assert sum(map(len, cookies)) > 3900, [len(cookie) for cookie in cookies]
    status, through_nginx = await sign_in(cluster.nginx_url, teacher)
    assert status == 200
    assert sorted(map(len, through_nginx)) == sorted(map(len, cookies))
