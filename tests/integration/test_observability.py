"""What an operator relies on, checked against a running server: every metric and label the alerts and the
Grafana dashboard query is one a replica's /metrics really serves after some chatting."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, get_args

import aiohttp
import asyncpg
import orjson
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from server.errors import ErrorCode
from server.keys import DATABASE, STATE
from server.logs import JsonFormatter
from storage.models import MessageStatus
from tests.conftest import Serve, Server, token

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "smartedu.json"

# Labels Prometheus adds to every series of a target (deploy/prometheus/prometheus.yml, docs/deploy.md).
TARGET_LABELS = frozenset({"replica", "job", "instance"})
# Series Prometheus makes itself.
PROMETHEUS_SERIES = frozenset({"up"})
# Every value a bounded label can take, besides those the scrapes show (a turn is not interrupted here).
CATALOGUES: dict[str, frozenset[str]] = {
    "status": frozenset(get_args(MessageStatus)),
    "outcome": frozenset({"ok", "timeout", *(code.value for code in ErrorCode)}),
    "kind": frozenset(re.findall(r'AIError\(\s*"(\w+)"', "".join(p.read_text() for p in (ROOT / "ai").glob("*.py")))),
}
# Labels whose values are free-form or per-user: never on a series (cardinality, personal data).
FORBIDDEN_LABELS = frozenset(
    {
        "tenant",
        "tenant_id",
        "user",
        "user_id",
        "conversation",
        "conversation_id",
        "course",
        "course_id",
        "reply_id",
        "session_id",
        "message",
        "text",
        "error",
        "reason_text",
        "token",
    }
)

_FUNCTIONS_AND_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
)


class Scrape:
    """Series of one or more /metrics texts: names, and per name the labels and the values seen."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.labels: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def value(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, tuple(sorted(labels.items()))))

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
                self.types[sample.name] = family.type
                seen = self.labels[sample.name]
                for key, value in sample.labels.items():
                    seen[key].add(value)


async def scrape(server: Server) -> str:
    port = server.client.app[STATE].metrics_port
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        return await response.text()


def queries() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, labels the result must carry) of every alert and dashboard query."""
    found: list[tuple[str, str, set[str]]] = []
    for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]:
        for rule in group["rules"]:
            texts = " ".join(rule["annotations"].values())
            found.append((f"alert {rule['alert']}", rule["expr"], set(re.findall(r"\$labels\.(\w+)", texts))))
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for panel in data["panels"] for p in (panel, *panel.get("panels", []))]
    for panel in panels:
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat") or ""))
            found.append((f"panel {panel['title']!r}", target["expr"], legend))
    for variable in data["templating"]["list"]:
        name, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"]).groups()  # type: ignore[union-attr]
        found.append((f"variable {variable['name']}", f'{name}{{{label}!=""}}', set()))
    return found


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(metric, [(label, operator, value)]) of each series selector in a PromQL expression."""
    text = re.sub(r"\[[^\]]*\]", " ", expr)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    found = []
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?", text):
        name, braces = match.group(1), match.group(2) or ""
        rest = text[match.end() :].lstrip()
        if (not braces and rest.startswith("(")) or name.lower() in _FUNCTIONS_AND_KEYWORDS | {"inf", "nan"}:
            continue
        matchers = re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', braces)
        found.append((name, matchers))
    return found


def grouping_labels(expr: str) -> set[str]:
    return {
        label.strip()
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr)
        for label in group.split(",")
        if label.strip()
    }


def literal_values(operator: str, value: str) -> Iterable[str]:
    """The values an equality matcher or a regex of plain alternatives names (others are not checked)."""
    if operator in ("=", "!="):
        return [value]
    if operator in ("=~", "!~") and re.fullmatch(r"\w+(\|\w+)*", value):
        return value.split("|")
    return []


def problems(scrape: Scrape) -> list[str]:
    found = []
    for where, expr, result_labels in queries():
        names = []
        for name, matchers in selectors(expr):
            if name in PROMETHEUS_SERIES:
                continue
            names.append(name)
            if name not in scrape.labels:
                found.append(f"{where}: no series {name} on /metrics")
                continue
            seen = scrape.labels[name]
            for label, operator, value in matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in seen:
                    found.append(f"{where}: {name} has no label {label!r} (it has {sorted(seen)})")
                    continue
                known = seen[label] | CATALOGUES.get(label, frozenset())
                for literal in literal_values(operator, value):
                    if literal not in known:
                        found.append(
                            f"{where}: {name}{{{label}={literal!r}}} is never exported (known: {sorted(known)})"
                        )
        available = set(TARGET_LABELS)
        for name in names:
            available |= set(scrape.labels.get(name, {}))
        for label in (grouping_labels(expr) | result_labels) - available:
            found.append(f"{where}: label {label!r} is on none of {names}")
    return found


async def refusing_provider(aiohttp_server: Any) -> str:
    """An OpenAI-compatible endpoint that refuses the deployment's key, as a misconfigured one does."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}, status=401
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    fake = await aiohttp_server(app)
    return f"http://127.0.0.1:{fake.port}/v1"


async def test_alerts_and_dashboard_query_series_a_running_server_exports(serve: Serve, aiohttp_server: Any) -> None:
    metrics = {"metrics_port": 0, "metrics_host": "127.0.0.1"}
    server = await serve(**metrics, messages_per_minute=2)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="m1", text="What is a prime number?")
    await sock.until("done")
    await sock.send(type="message", id="m2", text="And an even one?")
    await sock.until("done")
    await sock.send(type="message", id="m3", text="One more")
    assert (await sock.expect("error"))["code"] == "rate_limited"
    conversation = next(f for f in sock.frames if f["type"] == "welcome")["conversation_id"]
    await server.connect({"token": token(), "conversation_id": conversation, "resume_from": 1})
    bad = await server.connect()
    await bad.send(type="hello", token="nope")
    await bad.expect("error")

    failing = await serve(
        **metrics,
        ai_provider="openai",
        env={
            "OPENAI_BASE_URL": await refusing_provider(aiohttp_server),
            "OPENAI_MODEL": "tutor-7b",
            "OPENAI_API_KEY": "test-key-not-secret",
        },
    )
    other = await failing.connect({"token": token("stu-2")})
    await other.send(type="message", id="f1", text="Will this work?")
    assert (await other.until("done"))[-1]["status"] == "failed"

    await asyncio.sleep(1.0)  # the dependency checks run half a second after the start
    live = Scrape()
    for each in (server, failing):
        live.add(await scrape(each))
    assert not problems(live), "\n".join(problems(live))


async def test_series_carry_no_per_user_or_free_text_labels(serve: Serve) -> None:
    server = await serve(metrics_port=0, metrics_host="127.0.0.1")
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="m1", text="What is a prime number?")
    await sock.until("done")
    live = Scrape()
    live.add(await scrape(server))
    for name, labels in live.labels.items():
        assert not set(labels) & FORBIDDEN_LABELS, f"{name} has per-user or free-text labels {set(labels)}"
        for label, values in labels.items():
            for value in values:
                assert "school-a" not in value and "stu-1" not in value and "prime" not in value, (name, label, value)


@contextlib.contextmanager
def replica_log() -> Iterator[io.StringIO]:
    """The lines a replica writes to stderr (server/logs.py's formatter, formatted as they are emitted)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_a_failed_answer_is_logged_with_its_tenant_and_conversation_but_not_its_text(
    serve: Serve, aiohttp_server: Any
) -> None:
    """With SMARTEDU_LOG_LEVEL=WARNING (exam week: less noise) the `hello` line naming the socket's tenant and
    conversation is not written: the warning itself has to say whose answer failed."""
    server = await serve(
        ai_provider="openai",
        env={"OPENAI_BASE_URL": await refusing_provider(aiohttp_server), "OPENAI_MODEL": "tutor-7b"},
    )
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    with replica_log() as out:
        await sock.send(type="message", id="q1", text="Is zebra-4711 a prime number?")
        ack = await sock.expect("ack")
        assert (await sock.until("done"))[-1]["status"] == "failed"
    entries = [orjson.loads(line) for line in out.getvalue().splitlines()]  # one JSON object a line
    assert "zebra-4711" not in out.getvalue()
    failed = [e for e in entries if e["event"] == "ai provider failed"]
    assert failed and all(e["level"] == "warning" for e in failed)
    for entry in failed:
        context = {key: entry.get(key) for key in ("tenant", "conversation_id", "reply_id")}
        assert context == {"tenant": "school-a", "conversation_id": conversation, "reply_id": ack["reply_id"]}
        assert entry["request_id"]
    for entry in entries:
        if entry["level"] in ("warning", "error", "critical"):
            assert entry.get("request_id") or entry.get("tenant"), entry


async def test_a_pool_busy_with_a_class_start_is_no_outage(serve: Serve, db: asyncpg.Connection) -> None:
    """Hellos of a class that starts at once can hold every pooled connection for seconds (they are told
    `busy` past SMARTEDU_HELLO_DEADLINE). PostgreSQL answers all along: /ready must stay 200 (else every
    replica leaves the Service at once, and new sockets get the ingress' 503) and dependency_up 1 (else
    SmartEduPostgresDown pages someone for an outage there is not)."""
    server = await serve(db_pool_min=1, db_pool_max=1, hello_deadline=6.0, metrics_port=0, metrics_host="127.0.0.1")
    await asyncio.sleep(0.7)  # the first dependency check
    lock = db.transaction()
    await lock.start()
    # Another session holds `users`: the hello's first statement waits on it with the pool's only connection.
    await db.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        waiting = await server.connect({"token": token()}, welcome=False)
        await asyncio.sleep(0.2)
        assert server.client.app[DATABASE].pool.get_idle_size() == 0
        response = await server.client.get("/ready")
        assert response.status == 200, await response.json()
        await asyncio.sleep(5.5)  # a dependency check meets the busy pool
        live = Scrape()
        live.add(await scrape(server))
        assert live.value("smartedu_dependency_up", dependency="postgres") == 1
    finally:
        await lock.rollback()
    await waiting.expect("welcome")
