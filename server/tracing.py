"""Optional OpenTelemetry tracing of the turn (hello, persist, history load, AI call, done).

Off unless OTEL_EXPORTER_OTLP_ENDPOINT is set; then spans go to that OTLP/HTTP collector. When off,
`span()` returns a shared null context: no objects, no clock reads, nothing imported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from .errors import ConfigError

_NULL: AbstractContextManager[None] = contextlib.nullcontext()


class Tracer:
    """Spans around the steps of a turn; a no-op unless tracing is configured."""

    def __init__(self, tracer: Any = None, provider: Any = None):
        self._tracer = tracer
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, **attributes: str | int) -> AbstractContextManager[Any]:
        if self._tracer is None:
            return _NULL
        manager: AbstractContextManager[Any] = self._tracer.start_as_current_span(name, attributes=attributes)
        return manager

    async def close(self) -> None:
        """Flush what is buffered (in a thread: the exporter blocks) and stop."""
        if self._provider is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._provider.shutdown)
            self._provider = None


def create_tracer(env: Mapping[str, str], replica: str) -> Tracer:
    """A tracer exporting to OTEL_EXPORTER_OTLP_ENDPOINT, or the no-op one when it is unset."""
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        return Tracer()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but tracing is not installed: "
            "pip install 'smartedu-tutor-chat[otel]'"
        ) from None
    resource = Resource.create(
        {"service.name": env.get("OTEL_SERVICE_NAME") or "smartedu-tutor-chat", "service.instance.id": replica}
    )
    provider = TracerProvider(resource=resource)
    exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracer(provider.get_tracer("smartedu"), provider)
