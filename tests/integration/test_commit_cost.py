"""benchmarks/commit_cost.py, the group commit's storage-level benchmark, on a small load."""

from __future__ import annotations

import pytest

from benchmarks.commit_cost import main
from tests.conftest import Services

pytestmark = pytest.mark.integration


def test_reports_a_row_per_level_and_drops_its_database(services: Services, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--database-url", services.database_url, "--in-flight", "1,3", "--turns", "6"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [1, 3]
    assert all(float(cell) >= 0 for row in rows for cell in row[1:]) and all(float(row[3]) > 0 for row in rows)


def test_refuses_a_database_on_another_machine() -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--database-url", "postgresql://postgres@db.example.com/school"])
    assert exited.value.code == 2
