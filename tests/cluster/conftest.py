"""Fixtures for the cluster tests: one running cluster per module, client sockets closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from server.cluster import find_nginx
from tests.conftest import Services, require_tool

from .harness import Cluster, running_cluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Three replicas behind NGINX over the suite's PostgreSQL and Redis."""
    nginx = require_tool(find_nginx(), "nginx")
    # Asked for only now, so a machine without nginx skips without starting the embedded servers.
    services: Services = request.getfixturevalue("services")
    with running_cluster(services, nginx) as running:
        yield running


@pytest.fixture(autouse=True)
async def _close_cluster_clients(cluster: Cluster) -> AsyncIterator[None]:
    yield
    await cluster.close_clients()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed cluster test shows the tail of every replica's log and NGINX's error log."""
    report = yield
    harness = getattr(item, "funcargs", {}).get("cluster")
    if report.when == "call" and report.failed and isinstance(harness, Cluster):
        report.sections.append(("cluster logs", harness.log_tails()))
    return report
