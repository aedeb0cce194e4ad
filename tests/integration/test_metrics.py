"""Prometheus metrics on their own port: the product's series move when students chat."""

from __future__ import annotations

import re
import time

import aiohttp
import pytest

from server.keys import STATE
from tests.conftest import Serve, token

pytestmark = pytest.mark.integration


def _value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{series} not in metrics"
    return float(match.group(1))


async def test_metrics_port_serves_the_product_series(serve: Serve) -> None:
    server = await serve(metrics_port=0, metrics_host="127.0.0.1", messages_per_minute=1)
    port = server.client.app[STATE].metrics_port
    assert port
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="m1", text="hello")
    await sock.until("done")
    await sock.send(type="message", id="m2", text="again")
    assert (await sock.expect("error"))["code"] == "rate_limited"
    bad = await server.connect()
    await bad.send(type="hello", token="nope")
    await bad.expect("error")

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert _value(text, 'smartedu_ws_connections{role="student"}') == 1
    assert _value(text, 'smartedu_hellos_total{outcome="ok"}') == 1
    assert _value(text, 'smartedu_hellos_total{outcome="unauthorized"}') == 1
    assert _value(text, "smartedu_messages_received_total") == 2
    assert _value(text, 'smartedu_turns_total{status="complete"}') == 1
    assert _value(text, 'smartedu_refusals_total{reason="rate_limited"}') == 1
    assert _value(text, "smartedu_ack_latency_seconds_count") == 1  # the refused message got no ack
    assert _value(text, 'smartedu_ai_ttft_seconds_count{model="offline-tutor",provider="offline"}') == 1
    assert _value(text, "smartedu_tokens_streamed_total") > 10
    assert _value(text, 'smartedu_db_op_seconds_count{op="save_question"}') == 1
    assert _value(text, 'smartedu_redis_op_seconds_count{op="admit"}') == 2
    assert 'smartedu_replica_info{replica="test"' in text
    assert 'smartedu_db_pool_connections{state="idle"}' in text
    # The process collector (SmartEduReplicaRestarting counts changes of the start time) and python_info.
    assert 0 < time.time() - _value(text, "process_start_time_seconds") < 24 * 3600
    assert _value(text, "process_resident_memory_bytes") > 0
    assert "python_info{" in text
    # /metrics is not on the public port.
    response = await server.client.get("/metrics")
    assert response.status == 404
