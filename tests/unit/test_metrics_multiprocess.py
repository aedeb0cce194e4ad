"""With PROMETHEUS_MULTIPROC_DIR, counters from several worker processes add up at the endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = """
from server.metrics import Metrics
m = Metrics("replica-a")
m.turns.labels(status="complete").inc({count})
m.connections.labels(role="student").inc({count})
"""

COLLECT = """
from server.metrics import Metrics
print(Metrics("replica-a").exposition().decode())
"""


def _python(code: str, directory: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout


def test_workers_add_up(tmp_path: Path) -> None:
    _python(WORKER.format(count=2), tmp_path)
    _python(WORKER.format(count=3), tmp_path)
    text = _python(COLLECT, tmp_path)
    assert 'smartedu_turns_total{status="complete"} 5.0' in text
    assert 'smartedu_ws_connections{role="student"} 5.0' in text
    assert 'smartedu_replica_info{replica="replica-a"' in text
    # Process series are the serving process's own (they cannot be summed across workers).
    assert text.count("\nprocess_start_time_seconds ") == 1


SCRAPED_WORKER = """
from server.metrics import Metrics
m = Metrics("replica-a")
m.watch_pool(lambda: (3, 1))  # (in use, idle)
m.exposition()  # a scrape this worker answered
"""

IDLE_WORKER = """
import asyncio
from server.metrics import Metrics, measure_loop_lag
m = Metrics("replica-a")
m.watch_pool(lambda: (2, 4))

async def main():
    sampler = asyncio.create_task(measure_loop_lag(m, {}))
    await asyncio.sleep(0)  # the sampler's first round, up to its first wait
    sampler.cancel()

asyncio.run(main())
"""


def test_the_database_pool_gauge_adds_up_across_workers(tmp_path: Path) -> None:
    """Each worker's pool: one worker sampled it as it answered a scrape, the other in its background
    sampler without ever being scraped. The scrape sums both."""
    _python(SCRAPED_WORKER, tmp_path)
    _python(IDLE_WORKER, tmp_path)
    text = _python(COLLECT, tmp_path)
    assert 'smartedu_db_pool_connections{state="in_use"} 5.0' in text, text
    assert 'smartedu_db_pool_connections{state="idle"} 5.0' in text, text
