"""What a replica writes to stderr is one JSON object a line, even for a crash nothing anticipated."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]

# What `smartedu serve` does first (server/__main__.py), then a failure no `except` there names.
CRASH = """
from server.logs import configure_logging
configure_logging("INFO", "replica-a")
def start():
    raise RuntimeError("cannot start:\\nsecond line")
start()
"""


def test_an_uncaught_exception_is_one_json_line_with_its_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CRASH], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    entry = orjson.loads(lines[0])
    assert (entry["level"], entry["event"], entry["replica"]) == ("critical", "uncaught exception", "replica-a")
    assert "Traceback" in entry["exc"] and "in start" in entry["exc"] and "second line" in entry["exc"]
