"""OpenTelemetry: off by default; with OTEL_EXPORTER_OTLP_ENDPOINT the turn's spans reach a collector."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from server.keys import CHAT
from server.tracing import create_tracer
from tests.conftest import Serve, token

pytestmark = pytest.mark.integration


@pytest.fixture
async def collector() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", received
    finally:
        await server.close()


def test_tracing_is_off_and_free_by_default() -> None:
    tracer = create_tracer({}, "r1")
    assert not tracer.enabled
    assert tracer.span("turn") is tracer.span("ai")  # one shared null context, nothing allocated


async def test_a_turn_is_traced(serve: Serve, collector: tuple[str, list[ExportTraceServiceRequest]]) -> None:
    endpoint, received = collector
    server = await serve(env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_SERVICE_NAME": "tutor-test"})
    assert server.client.app[CHAT].tracer.enabled
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="t1", text="trace me")
    await sock.until("done")
    await server.client.close()  # shutdown flushes the spans
    spans = [
        span
        for request in received
        for resource_spans in request.resource_spans
        for scope in resource_spans.scope_spans
        for span in scope.spans
    ]
    names = {span.name for span in spans}
    assert {"hello", "persist", "turn", "history", "ai", "done"} <= names
    by_name = {span.name: span for span in spans}
    assert by_name["ai"].parent_span_id == by_name["turn"].span_id
    attributes = {a.key: a.value.string_value for a in received[0].resource_spans[0].resource.attributes}
    assert attributes["service.name"] == "tutor-test"
