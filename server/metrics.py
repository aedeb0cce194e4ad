"""Prometheus metrics: one registry per app, served on a separate internal port.

With PROMETHEUS_MULTIPROC_DIR set (several worker processes), values go to the shared directory and the
endpoint aggregates every process's files. Nothing here runs per token: token counts are added once per
answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
AI_LATENCY = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class Metrics:
    """Every metric the product exports."""

    def __init__(self, replica: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge(
            "smartedu_ws_connections", "Open WebSocket sessions by role", ["role"], registry=r,
            multiprocess_mode="livesum",
        )
        self.hellos = Counter("smartedu_hellos", "hello frames by outcome", ["outcome"], registry=r)
        self.messages = Counter("smartedu_messages_received", "Student messages received", registry=r)
        self.turns = Counter("smartedu_turns", "Answers by final status", ["status"], registry=r)
        self.ack_latency = Histogram(
            "smartedu_ack_latency_seconds", "From a message frame to its ack", buckets=LATENCY, registry=r
        )
        self.ttft = Histogram(
            "smartedu_ai_ttft_seconds", "Time to the first token", ["provider", "model"], buckets=AI_LATENCY,
            registry=r,
        )
        self.duration = Histogram(
            "smartedu_ai_duration_seconds", "Answer duration", ["provider", "model"], buckets=AI_LATENCY, registry=r
        )
        self.tokens = Counter("smartedu_tokens_streamed", "Output tokens streamed to students", registry=r)
        self.ai_errors = Counter("smartedu_ai_errors", "AI provider failures by kind", ["kind"], registry=r)
        self.ai_retries = Counter("smartedu_ai_retries", "AI calls retried before the first token", registry=r)
        self.ai_unknown_finishes = Counter(
            "smartedu_ai_unknown_finish_reasons", "AI answers ended with a finish reason the client does not know",
            registry=r,
        )
        self.commit_retries = Counter(
            "smartedu_answer_commit_retries", "Answer commits tried again while PostgreSQL was unavailable", registry=r
        )
        self.circuit_open = Gauge(
            "smartedu_ai_circuit_open", "1 while the AI circuit breaker is open", registry=r, multiprocess_mode="max"
        )
        self.refusals = Counter("smartedu_refusals", "Messages refused by rate limit or quota", ["reason"], registry=r)
        self.resumes = Counter("smartedu_resumes", "hello with resume_from, by outcome", ["outcome"], registry=r)
        self.replayed = Counter("smartedu_replayed_frames", "Frames replayed to resuming clients", registry=r)
        self.slow_sockets = Counter(
            "smartedu_slow_sockets_closed", "Sockets closed with 1013 for falling too far behind", registry=r
        )
        self.db_ops = Histogram(
            "smartedu_db_op_seconds", "PostgreSQL operation latency", ["op"], buckets=LATENCY, registry=r
        )
        self.redis_ops = Histogram(
            "smartedu_redis_op_seconds", "Redis operation latency", ["op"], buckets=LATENCY, registry=r
        )
        self.loop_lag = Gauge(
            "smartedu_event_loop_lag_seconds", "Event loop lag, sampled twice a second", registry=r,
            multiprocess_mode="max",
        )
        self.dependency_up = Gauge(
            "smartedu_dependency_up", "1 when the dependency answers", ["dependency"], registry=r,
            multiprocess_mode="min",
        )
        info = Gauge(
            "smartedu_replica_info", "This replica", ["replica", "version"], registry=r, multiprocess_mode="max"
        )
        info.labels(replica=replica, version=__version__).set(1)
        # A gauge, not a collector asked at scrape time: with PROMETHEUS_MULTIPROC_DIR only what is written to
        # the shared files is exported, and each process's pool is its own, so the processes' values add up.
        self.pool_connections = Gauge(
            "smartedu_db_pool_connections", "PostgreSQL pool connections", ["state"], registry=r,
            multiprocess_mode="livesum",
        )
        self._pool_size: Callable[[], tuple[int, int]] | None = None
        _register_process_collectors(r)
        # The labelled children counted with every answer, looked up once: `labels()` (a lock, a tuple, a dict)
        # cost 8-16 us a call, three calls an answer (docs/benchmarks.md, tenth round).
        self._turn_children: dict[str, Counter] = {}
        self._timing_children: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}

    def turn_ended(self, status: str) -> None:
        """Count an answer by its final status."""
        child = self._turn_children.get(status)
        if child is None:
            child = self._turn_children[status] = self.turns.labels(status=status)
        child.inc()

    def answer_timed(self, provider: str, model: str, ttft_s: float | None, duration_s: float) -> None:
        """An answer's time to first token (None: it had none) and duration, by provider and model."""
        children = self._timing_children.get((provider, model))
        if children is None:
            children = self._timing_children[(provider, model)] = (
                self.ttft.labels(provider=provider, model=model),
                self.duration.labels(provider=provider, model=model),
            )
        if ttft_s is not None:
            children[0].observe(ttft_s)
        children[1].observe(duration_s)

    def watch_pool(self, sizes: Callable[[], tuple[int, int]]) -> None:
        """Report (in use, idle) PostgreSQL connections: sampled at each scrape and twice a second."""
        self._pool_size = sizes

    def sample_pool(self) -> None:
        """Set the pool gauge from the watched pool's sizes now."""
        sizes = self._pool_size
        if sizes is not None:
            in_use, idle = sizes()
            self.pool_connections.labels(state="in_use").set(in_use)
            self.pool_connections.labels(state="idle").set(idle)

    def timed(self, histogram: Histogram, op: str, call: F) -> F:
        """Wrap a coroutine function so each call is observed in `histogram` under `op`."""
        child = histogram.labels(op=op)

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await call(*args, **kwargs)
            finally:
                child.observe(time.perf_counter() - started)

        return wrapper  # type: ignore[return-value]

    def instrument(self, obj: object, histogram: Histogram, names: Iterable[str]) -> None:
        """Time the named coroutine methods of one object (the storage stays free of metrics)."""
        for name in names:
            setattr(obj, name, self.timed(histogram, name, getattr(obj, name)))

    def exposition(self) -> bytes:
        self.sample_pool()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            # Process series cannot be summed across workers: these are the serving process's own.
            _register_process_collectors(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _register_process_collectors(registry: CollectorRegistry) -> None:
    """process_* (start time, CPU, memory, open files; the restart alert uses process_start_time_seconds) and
    python_info: what prometheus_client puts on its default registry, which this custom registry lacks."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


async def measure_loop_lag(metrics: Metrics, checks: Mapping[str, Callable[[], Awaitable[None]]]) -> None:
    """Sample event-loop lag and the pool's size twice a second, dependency health every five seconds."""
    loop = asyncio.get_running_loop()
    tick = 0
    while True:
        # Under PROMETHEUS_MULTIPROC_DIR a scrape reaches one process: the others' pool sizes are these.
        metrics.sample_pool()
        expected = loop.time() + 0.5
        await asyncio.sleep(0.5)
        metrics.loop_lag.set(max(0.0, loop.time() - expected))
        tick += 1
        if tick % 10 == 1:
            for name, check in checks.items():
                try:
                    # Not wait_for, which can drop the cancellation that stops this task (server/tasks.py).
                    async with asyncio.timeout(2.0):
                        await check()
                    metrics.dependency_up.labels(dependency=name).set(1)
                except Exception:
                    metrics.dependency_up.labels(dependency=name).set(0)


def metrics_app(metrics: Metrics) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app


@contextlib.asynccontextmanager
async def serve_metrics(metrics: Metrics, host: str, port: int) -> AsyncIterator[int]:
    """Serve /metrics on its own port (never through the public site); yields the bound port."""
    runner = web.AppRunner(metrics_app(metrics), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        yield int(sockets[0].getsockname()[1]) if sockets else port
    finally:
        await runner.cleanup()
