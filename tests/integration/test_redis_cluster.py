"""The cross-replica behaviour again, on a real 3-master Redis Cluster started on loopback ports."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.embedded import _redis_binary
from server.settings import Settings
from tests.conftest import Services, clean_settings, require_tool

# The same tests as on a single Redis: every key they touch must live in one hash slot per script.
from tests.integration.test_scaleout import (  # noqa: F401
    test_abandoned_answer_is_taken_over_and_can_be_regenerated,
    test_cancel_reaches_the_replica_that_generates,
    test_fresh_hello_mid_answer_catches_up_the_text_so_far,
    test_resume_on_another_replica_mid_answer,
    test_tabs_on_two_replicas_each_get_every_frame_once,
    test_teacher_intervenes_and_pauses_the_ai,
    test_teacher_on_another_replica_sees_the_answer_live,
)
from tests.integration.test_turn import (  # noqa: F401
    test_full_turn_commits_before_ack_and_done,
    test_rate_limit_refuses_with_retry_after_and_commits_nothing,
)

pytestmark = pytest.mark.integration


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster-bus port (port + 10000) is free and valid too."""
    ports: list[int] = []
    candidates = random.sample(range(20000, 40000), 400)
    for port in candidates:
        if _bindable(port) and _bindable(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise AssertionError("no free ports for a redis cluster")


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[str]:
    server_binary = _redis_binary()
    cli = shutil.which("redis-cli") or str(Path(server_binary).with_name("redis-cli"))
    require_tool(cli if Path(cli).exists() else None, "redis-cli")
    workdir = Path(tempfile.mkdtemp(prefix="smartedu-cluster-"))
    ports = _free_ports(3)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            node = workdir / str(port)
            node.mkdir()
            processes.append(subprocess.Popen(
                [server_binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node), "--save", "",
                 "--appendonly", "no", "--cluster-node-timeout", "2000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
        for port in ports:
            _wait_for_port(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        _wait_cluster_ok(cli, ports[0])
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"redis node on {port} did not start")


def _wait_cluster_ok(cli: str, port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = subprocess.run([cli, "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout
        if "cluster_state:ok" in info:
            return
        time.sleep(0.1)
    raise AssertionError("the redis cluster did not reach cluster_state:ok")


@pytest.fixture
async def settings(services: Services, redis_cluster: str) -> Settings:
    return await clean_settings(services, redis_cluster)


def test_cluster_urls_select_the_cluster_client() -> None:
    settings = Settings.from_env({"REDIS_CLUSTER_URLS": "redis://10.0.0.1:7000, 10.0.0.2:7001"})
    assert settings.redis_url == "redis+cluster://10.0.0.1:7000,10.0.0.2:7001"
