"""The load tester against an in-test protocol server: counting, percentiles, faults, gates, outputs."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from rich.console import Console

from server.loadtest.cli import amain, check_target, is_loopback, main
from server.loadtest.report import LiveProgress, build_results, render_summary
from server.loadtest.stats import LatencyHistogram, LatencySeries, RunStats
from server.loadtest.student import (
    MAX_RATE,
    LoadConfig,
    LoadTestError,
    QuestionPool,
    RunContext,
    Student,
    Teacher,
    _schedule,
    run_load,
)
from server.loadtest.target import LoopbackResolver, RemoteRefused, is_loopback_address
from server.loadtest.tokens import (
    TokenError,
    TokenSource,
    minter_from_private_key,
    minter_from_secret,
    read_tokens_file,
)
from tests.unit.loadtest_fake_server import Behaviour, FakeServer

SECRET = secrets.token_hex(32)
ROOT = Path(__file__).resolve().parents[2]

StartServer = Callable[[Behaviour], Awaitable[FakeServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    servers: list[FakeServer] = []

    async def start(behaviour: Behaviour) -> FakeServer:
        server = FakeServer(behaviour)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


_runs = itertools.count()


def _base_args(server: FakeServer, *extra: str) -> list[str]:
    return [
        "--url",
        server.url,
        "--jwt-secret",
        SECRET,
        "--students",
        "2",
        "--duration",
        "1",
        "--ramp-rate",
        "100",
        "--think-time",
        "0.01",
        "--think-dist",
        "constant",
        "--drain-timeout",
        "3",
        "--seed",
        "7",
        "--quiet",
        *extra,
    ]


async def _run(server: FakeServer, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    out = tmp_path / f"results-{next(_runs)}.json"
    code = await amain([*_base_args(server, *extra), "--out", str(out)])
    return code, json.loads(out.read_text())


def _all(results: dict[str, Any]) -> dict[str, Any]:
    phase: dict[str, Any] = results["phases"]["all"]
    return phase


# -- counting -----------------------------------------------------------------------------------------


async def test_counts_turns_and_errors_by_code(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(Behaviour(tokens=4, error_every=3, error_code="rate_limited"))
    code, results = await _run(server, tmp_path, "--students", "3")
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    counts = server.counts
    assert counts.messages > 10
    assert counters["turns_attempted"] == counters["turns_sent"] == counts.messages
    assert counters["turns_ok"] == counters["turns_completed"] == counts.answers_done
    assert phase["errors_by_code"] == {"rate_limited": counts.errors_sent}
    assert counters["turns_refused"] == counts.errors_sent and "turns_failed" not in counters  # shed, not lost
    assert counters.get("turns_unfinished", 0) == 0
    assert counters["token_frames"] == 4 * counts.answers_done
    assert counters["output_tokens"] == 4 * counts.answers_done
    assert counters.get("lost_tokens", 0) == 0 and counters.get("duplicate_tokens", 0) == 0
    assert phase["latency_ms"]["done"]["count"] == counts.answers_done
    assert phase["latency_ms"]["connect"]["count"] == counters["connects_ok"] == 3
    expected_rate = counts.errors_sent / (counts.messages + counters["connect_attempts"])
    assert phase["error_rate"] == pytest.approx(expected_rate, abs=1e-6)
    assert phase["done_status"] == {"complete": counts.answers_done}
    # Phases split the run; their counts add up to the whole.
    steady = results["phases"]["steady"]
    # (The ramp-up lasts 30 ms: on a busy machine no question may be asked within it.)
    attempted = [results["phases"][name]["counters"].get("turns_attempted", 0) for name in ("ramp-up", "steady")]
    assert sum(attempted) == counts.messages
    # Rates are over the load window (ramp-up + steady), not diluted by the drain.
    answers = sum(results["phases"][name]["counters"].get("answers", 0) for name in ("ramp-up", "steady"))
    assert phase["rates_per_s"]["turns"] == pytest.approx(answers / steady["window_s"][1], rel=1e-3)


async def test_sockets_close_together_after_the_answers_in_flight(start_server: StartServer, tmp_path: Path) -> None:
    # Answers take 0.8 s and students think 0.5 s on average: at the end some are idle and some wait for
    # an answer. The idle ones keep their sockets until the last answer is done, so closing cannot disturb it.
    server = await start_server(Behaviour(tokens=8, token_delay=0.1))
    code, results = await _run(server, tmp_path, "--students", "8", "--think-time", "0.5", "--think-dist",
                               "exponential", "--duration", "2")
    assert code == 0 and _all(results)["counters"].get("turns_unfinished", 0) == 0
    counts = server.counts
    assert len(counts.closed_at) == 8 and counts.done_at
    assert min(counts.closed_at) >= max(counts.done_at)
    assert max(counts.done_at) - min(counts.done_at[-8:]) > 0.2  # answers really were still ending apart


async def test_percentiles_follow_the_servers_latency(start_server: StartServer, tmp_path: Path) -> None:
    # Every answer's first token waits 20 ms, every 10th waits 250 ms: p50 near 20, p99 past 250.
    server = await start_server(Behaviour(tokens=2, first_token_delay=0.02, slow_every=10, slow_delay=0.25))
    code, results = await _run(server, tmp_path, "--students", "4", "--think-time", "0", "--duration", "1.2")
    assert code == 0
    latency = _all(results)["latency_ms"]
    ttft = latency["ttft"]
    assert ttft["count"] == server.counts.answers_done >= 40
    assert 20.0 <= ttft["p50"] < 60.0
    assert 250.0 <= ttft["p99"] <= ttft["p99.9"] <= ttft["max"] < 500.0
    assert latency["ack"]["p50"] < 20.0  # acks come at once, before the wait
    assert latency["done"]["p50"] >= ttft["p50"]


async def test_timed_out_and_unfinished_turns_count_in_the_latencies(
    start_server: StartServer, tmp_path: Path
) -> None:
    # Every first token takes 1 s and answers time out at 0.3 s: ttft and done are recorded at the
    # time each turn was given up (>= 0.3 s), not left out (which showed no ttft at all).
    server = await start_server(Behaviour(tokens=2, first_token_delay=1.0))
    _, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.8", "--turn-timeout", "0.3", "--drain-timeout", "0.5"
    )
    phase = _all(results)
    counters, latency = phase["counters"], phase["latency_ms"]
    given_up = counters["timeouts"] + counters.get("turns_unfinished", 0)
    assert counters["timeouts"] >= 1 and counters.get("turns_ok", 0) == 0
    assert latency["ttft"]["count"] == latency["done"]["count"] == given_up
    assert latency["ttft"]["p50"] >= 300.0 and latency["done"]["p50"] >= 300.0
    assert latency["ack"]["count"] == given_up and latency["ack"]["p50"] < 100.0  # acks came, at once

    # A question the server never acknowledges, still waiting when the drain ends: all three at ~1 s.
    server = await start_server(Behaviour(tokens=2, stall_once=5.0))
    _, results = await _run(server, tmp_path, "--students", "1", "--duration", "0.5", "--drain-timeout", "0.5")
    phase = _all(results)
    assert phase["counters"]["turns_unfinished"] == 1
    for metric in ("ack", "ttft", "done"):
        assert phase["latency_ms"][metric]["count"] == 1
        assert phase["latency_ms"][metric]["max"] >= 900.0


def test_histogram_percentiles_are_exact_within_precision() -> None:
    hist = LatencyHistogram()
    for ms in range(1, 1001):
        hist.record(ms / 1000.0)
    summary = hist.summary()
    assert summary["count"] == 1000
    assert summary["p50"] == pytest.approx(500.0, rel=0.002)
    assert summary["p90"] == pytest.approx(900.0, rel=0.002)
    assert summary["p99"] == pytest.approx(990.0, rel=0.002)
    assert summary["p99.9"] == pytest.approx(999.0, rel=0.002)
    assert summary["max"] == pytest.approx(1000.0, rel=0.002)
    empty = LatencyHistogram().summary()
    assert empty["count"] == 0 and empty["p99"] is None


def test_phases_are_chosen_by_start_time() -> None:
    stats = RunStats(started=100.0, ramp_end=110.0, end_at=130.0)
    stats.record("ack", started=109.9, seconds=0.5, now=110.4)  # began in ramp-up, ended after it
    stats.record("ack", started=110.0, seconds=0.1, now=110.1)
    stats.record("reconnect", started=131.0, seconds=0.1, now=131.1)
    assert stats.phases["ramp-up"].latency["ack"].count == 1
    assert stats.phases["steady"].latency["ack"].count == 1
    assert stats.phases["drain"].latency["reconnect"].count == 1
    assert stats.combined().latency["ack"].count == 2
    stats.finished = 134.0
    assert stats.window("ramp-up") == (0.0, 10.0)
    assert stats.window("steady") == (10.0, 30.0)
    assert stats.window("drain") == (30.0, 34.0)
    assert stats.window("all") == (0.0, 30.0)  # the load window: rates leave the drain out


async def test_a_second_run_reuses_conversations_without_colliding_ids(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The same students come back to their most recent conversation; their message ids must not
    # look like resends of the first run's (which get an ack but no answer).
    server = await start_server(Behaviour(tokens=2))
    for _ in range(2):
        code, results = await _run(
            server, tmp_path, "--duration", "0.4", "--max-error-rate", "0", "--subject-prefix", "lt-fixed"
        )
        assert code == 0
        assert _all(results)["counters"]["turns_ok"] > 0
    assert len(server.conversations) == 2
    assert server.counts.resends == 0


async def test_concurrent_generators_get_users_of_their_own(start_server: StartServer, tmp_path: Path) -> None:
    # Two load generators with the same options (as docs/loadtest.md shows) must not put their students in
    # each other's conversations: each run mints subjects of its own.
    server = await start_server(Behaviour(tokens=3, token_delay=0.01))
    runs = await asyncio.gather(
        *(_run(server, tmp_path, "--duration", "0.6", "--seed", str(seed), "--max-unexpected-frames", "0")
          for seed in (1, 2))
    )
    users = {user for user, _ in server._by_user_course}
    assert len(server.conversations) == len(users) == 4
    assert len({user.rsplit("-student-", 1)[0] for user in users}) == 2
    for code, results in runs:
        assert code == 0
        assert _all(results)["counters"].get("unexpected_frames", 0) == 0
        assert results["config"]["subject_prefix"].startswith("loadtest-")


async def test_shared_tokens_warn_and_unexpected_frames_gate(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(Behaviour(tokens=3, token_delay=0.01))
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(minter_from_secret(SECRET, tenant="t", courses=["c"], ttl=600).mint("one", "student", "One"))
    code, results = await _run(
        server, tmp_path, "--tokens-file", str(tokens), "--duration", "0.6", "--max-unexpected-frames", "0"
    )
    err = capsys.readouterr().err
    assert "warning: 1 tokens for 2 students" in err
    assert _all(results)["counters"]["unexpected_frames"] > 0
    assert code == 1 and "threshold failed: unexpected frames" in err


# -- refusals and late frames -------------------------------------------------------------------------

_REFUSAL_CASES = {
    # Refused before the ack (a rate limit, a used-up budget, a replica draining or its provider down): an
    # error frame whose ref is the question's id.
    "ai_unavailable-retryable": (Behaviour(error_every=3, error_code="ai_unavailable", error_retryable=True), True),
    "rate_limited": (Behaviour(error_every=3, error_code="rate_limited"), True),
    "quota_exceeded": (Behaviour(error_every=3, error_code="quota_exceeded"), True),
    # A misconfigured provider fails every question the same way until staff fix it, and a bug is a bug.
    "ai_unavailable-not-retryable": (
        Behaviour(error_every=3, error_code="ai_unavailable", error_retryable=False), False
    ),
    "internal": (Behaviour(error_every=3, error_code="internal"), False),
    # The provider down or overloaded once the question was taken: acked, then `done` failed with the retryable
    # error, before any text (then the error frame, whose ref is the reply id).
    "answer-ai_unavailable-retryable": (Behaviour(fail_every=3), True),
    # ... after some text: the student saw a broken answer, a failure.
    "answer-after-text": (Behaviour(fail_every=3, fail_after_tokens=1), False),
    "answer-not-retryable": (Behaviour(fail_every=3, fail_retryable=False), False),
}


@pytest.mark.parametrize("case", list(_REFUSAL_CASES))
async def test_a_retryable_refusal_is_refused_not_failed(start_server: StartServer, tmp_path: Path, case: str) -> None:
    # A question the server sheds (retryable: ask again later) is no lost answer: it is counted as refused, by
    # code and with its latency, and still in errors by code. Before, every one of them was a failed turn.
    behaviour, refused = _REFUSAL_CASES[case]
    behaviour.tokens = 2
    server = await start_server(behaviour)
    code, results = await _run(
        server, tmp_path, "--max-lost", "0", "--max-duplicated", "0", "--max-unexpected-frames", "0"
    )
    assert code == 0
    phase = _all(results)
    counters, latency = phase["counters"], phase["latency_ms"]
    ended = server.counts.errors_sent
    error_code = behaviour.fail_code if behaviour.fail_every else behaviour.error_code
    assert ended >= 2
    assert phase["errors_by_code"] == {error_code: ended}
    if refused:
        assert counters["turns_refused"] == ended and counters.get("turns_failed", 0) == 0
        assert phase["refused_by_code"] == {error_code: ended}
        assert latency["refused"]["count"] == ended and latency["refused"]["max"] < 1000.0
    else:
        assert counters["turns_failed"] == ended and counters.get("turns_refused", 0) == 0
        assert phase["refused_by_code"] == {} and latency["refused"]["count"] == 0
    # Every question ended one way, and refusals count toward the error rate as failures do.
    assert counters["turns_attempted"] == counters["turns_ok"] + ended == server.counts.messages
    assert counters.get("turns_unfinished", 0) == 0
    assert phase["error_rate"] == pytest.approx(
        ended / (counters["turns_attempted"] + counters["connect_attempts"]), abs=1e-6
    )
    # A refused answer is no answer: not in the `done` latencies nor in the answers per second.
    answered = counters["turns_ok"] + (ended if behaviour.fail_every and not refused else 0)
    assert counters["answers"] == latency["done"]["count"] == answered


async def test_refusals_fail_the_error_rate_and_their_own_gate_only(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(Behaviour(tokens=2, error_every=3, error_code="ai_unavailable", error_retryable=True))
    code, results = await _run(
        server, tmp_path, "--max-error-rate", "0", "--max-refused", "0", "--max-lost", "0",
        "--max-unexpected-frames", "0",
    )
    err = capsys.readouterr().err
    refused = _all(results)["counters"]["turns_refused"]
    assert code == 1 and refused == server.counts.errors_sent >= 2
    assert "threshold failed: error rate" in err
    assert f"threshold failed: refused turns {refused} > 0" in err
    assert "lost" not in err and "unexpected" not in err
    code, results = await _run(server, tmp_path, "--max-refused", "100000", "--max-lost", "0")
    assert code == 0 and _all(results)["counters"]["turns_refused"] >= 2
    assert [check["name"] for check in results["thresholds"]] == ["lost tokens", "refused turns"]


@pytest.mark.parametrize(
    "hold_ack, turn_timeout", [(False, "60"), (True, "60"), (True, "0.2")], ids=["answer", "ack", "timed-out"]
)
async def test_frames_after_the_drain_are_late_not_unexpected(
    start_server: StartServer, tmp_path: Path, hold_ack: bool, turn_timeout: str
) -> None:
    # From the second question on the server holds the answers (with hold_ack, their acks too) until the student
    # asks for the history page at the very end, after it gave them up (unfinished when its drain ended, or timed
    # out before); then they arrive, ahead of the page. They are late frames of this student's own answers, not
    # another user's: before, each counted as an unexpected frame and failed --max-unexpected-frames 0.
    server = await start_server(Behaviour(tokens=3, hold_from_message=2, hold_ack=hold_ack))
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.6", "--drain-timeout", "0.2",
        "--turn-timeout", turn_timeout, "--max-unexpected-frames", "0",
    )
    counters = _all(results)["counters"]
    given_up = server.counts.messages - 1
    assert given_up >= 1 and counters["turns_ok"] == 1 and server.counts.history_requests == 1
    assert counters.get("timeouts", 0) + counters.get("turns_unfinished", 0) == given_up
    assert server.counts.held_frames == given_up * (5 if hold_ack else 4)  # (ack), three tokens, done
    assert counters.get("unexpected_frames", 0) == 0
    assert counters["late_frames"] == server.counts.held_frames
    assert counters["text_checks"] == 1
    assert code == 0


async def test_a_failed_answers_error_counts_in_the_phase_of_its_question() -> None:
    # The error frame follows the failed answer's `done` with the reply id as `ref`: asked in the load and refused
    # in the drain, it is counted with its question (steady), not by its arrival (drain).
    now = time.monotonic()
    stats = RunStats(now - 10.0, now - 10.0, now - 1.0)
    async with aiohttp.ClientSession() as session:
        student = Student(RunContext(_config(), session, stats), 0)
        turn = student.new_turn(now - 2.0)
        turn.acked, turn.reply_id = True, 42
        student.by_reply[42] = turn
        for frame in (
            {"type": "done", "reply_id": 42, "status": "failed", "error": "ai_unavailable", "retryable": True,
             "length": 0},
            {"type": "error", "code": "ai_unavailable", "ref": "42", "retryable": True},
        ):
            student._on_frame(json.dumps(frame))
    steady, drain = stats.phases["steady"], stats.phases["drain"]
    assert steady.refused == {"ai_unavailable": 1} and steady.errors == {"ai_unavailable": 1}
    assert steady.counters["turns_refused"] == 1 and "turns_failed" not in steady.counters
    assert drain.errors == {} and drain.counters["frames"] == 2


def test_the_tables_and_the_live_view_show_refusals_and_late_frames() -> None:
    stats = RunStats(started=100.0, ramp_end=100.0, end_at=110.0)
    stats.count("turns_attempted", 101.0, 3)
    stats.count("turns_ok", 101.0)
    stats.count("turns_failed", 101.0)
    stats.refusal("ai_unavailable", 102.0)
    stats.error("ai_unavailable", 102.0)
    stats.record("refused", 102.0, 0.004, 102.004)
    stats.count("late_frames", 111.0, 4)
    stats.finished = 112.0
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(LiveProgress(console, 10.0, 3, enabled=True)._render(stats, 105.0))
    assert "turns 1 ok, 1 failed, 1 refused" in " ".join(console.export_text().split())
    render_summary(console, build_results(stats, {}, "", ""))
    summary = console.export_text()
    rows = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in summary.splitlines()]
    assert ["steady", "refused", "1", "4.0", "4.0", "4.0", "4.0", "4.0"] in rows  # its latency
    assert ["turns_refused", "1", "0", "1"] in rows and ["late_frames", "0", "4", "4"] in rows  # steady, drain, all
    assert "refused by code: ai_unavailable: 1" in summary


# -- faults -------------------------------------------------------------------------------------------


async def test_detects_lost_and_duplicated_tokens(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Answer 2 misses a middle token (a gap in offsets), answer 4 misses its last one (short of
    # done.length), answer 3 repeats a token (an offset seen twice). Each piece is "wordN " (6 chars).
    server = await start_server(
        Behaviour(tokens=6, lose_token_in_turn=2, lose_last_token_in_turn=4, duplicate_token_in_turn=3)
    )
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.6", "--max-lost", "0", "--max-duplicated", "0"
    )
    counters = _all(results)["counters"]
    assert server.counts.answers_done >= 4
    assert counters["lost_tokens"] == 2
    assert counters["lost_chars"] == 12
    assert counters["duplicate_tokens"] == 1
    assert counters["duplicate_chars"] == 6
    assert code == 1
    assert results["passed"] is False
    err = capsys.readouterr().err
    assert "threshold failed: lost tokens 2 > 0" in err
    assert "threshold failed: duplicated tokens 1 > 0" in err


async def test_answers_are_checked_against_the_committed_text(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Answer 2 streams intact (offsets and length agree) but is committed with other text: only the
    # comparison with the committed text (history frame, at the end) can see it.
    server = await start_server(Behaviour(tokens=4, commit_other_text_in_turn=2))
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.5", "--think-time", "0.15",
        "--max-lost", "0", "--max-duplicated", "0", "--max-text-mismatches", "0",
    )
    counters = _all(results)["counters"]
    assert 2 <= counters["turns_ok"] <= 5  # all of them fit in what a student keeps
    assert counters["text_checks"] == counters["turns_ok"]
    assert counters["text_mismatches"] == 1
    assert counters.get("lost_tokens", 0) == 0 and counters.get("duplicate_tokens", 0) == 0
    assert server.counts.history_requests == 1
    assert code == 1 and "threshold failed: text mismatches 1 > 0" in capsys.readouterr().err


@pytest.mark.parametrize("history, check", [(True, "0"), (False, "1")])
async def test_text_check_off_or_unsupported(
    start_server: StartServer, tmp_path: Path, history: bool, check: str
) -> None:
    server = await start_server(Behaviour(tokens=2, history=history))
    code, results = await _run(server, tmp_path, "--students", "1", "--duration", "0.4", "--check-text", check)
    counters = _all(results)["counters"]
    assert code == 0 and server.counts.history_requests == 0
    assert counters.get("text_checks", 0) == counters.get("text_mismatches", 0) == 0
    # Kept answers that could not be compared are reported as such.
    assert counters.get("text_unchecked", 0) == (0 if check == "0" else min(counters["turns_ok"], 5))


async def test_open_loop_latency_counts_from_intended_send_time(start_server: StartServer, tmp_path: Path) -> None:
    # The server stalls 1 s on the first question. Questions are due every 100 ms meanwhile: an open
    # loop keeps sending them on schedule and charges them the wait; a closed loop would have sent
    # none of them and shown a single slow answer out of ~25 (p90 would stay small).
    server = await start_server(Behaviour(tokens=2, stall_once=1.0))
    code, results = await _run(server, tmp_path, "--students", "1", "--rate", "10", "--duration", "2.5")
    assert code == 0
    phase = _all(results)
    assert 22 <= phase["counters"]["turns_attempted"] <= 26
    assert phase["counters"]["turns_ok"] == phase["counters"]["turns_attempted"]
    done = phase["latency_ms"]["done"]
    assert done["max"] >= 950.0
    assert done["p90"] >= 500.0
    assert done["p50"] < 100.0
    assert phase["latency_ms"]["ack"]["p90"] >= 500.0
    # The client sent on time all along: the latency belongs to the server.
    assert phase["latency_ms"]["send_lag"]["p99"] < 200.0
    assert results["config"]["mode"] == "open"


async def test_resume_after_drop_checks_offsets_across_the_reconnect(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(Behaviour(tokens=6, token_delay=0.005))
    code, results = await _run(server, tmp_path, "--drop-probability", "1", "--max-lost", "0", "--max-duplicated", "0")
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    assert counters["drops"] >= 3
    assert counters["resumes_ok"] == counters["drops"] == server.counts.resumed
    assert counters["turns_ok"] == counters["drops"]
    assert counters.get("lost_tokens", 0) == 0 and counters.get("duplicate_tokens", 0) == 0
    assert counters.get("disconnects", 0) == 0
    assert phase["latency_ms"]["reconnect"]["count"] == counters["drops"]
    # Each question was acknowledged before its drop: the resume replays its answer, nothing is sent again.
    assert counters.get("resent", 0) == 0 and server.counts.resends == 0
    assert server.counts.messages == counters["turns_sent"]


async def test_resume_miss_is_counted_but_not_an_error(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(Behaviour(tokens=6, token_delay=0.005, resume=False))
    code, results = await _run(server, tmp_path, "--drop-probability", "1", "--max-error-rate", "0")
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    assert counters["resume_misses"] >= 3
    assert counters["turns_abandoned"] == counters["resume_misses"]
    assert counters.get("resumes_ok", 0) == 0
    assert phase["errors_by_code"] == {}
    assert phase["error_rate"] == 0.0
    assert counters.get("unexpected_frames", 0) == 0  # the abandoned answers' late frames are expected


async def test_a_reconnect_frame_moves_the_student_after_the_delay(start_server: StartServer, tmp_path: Path) -> None:
    # A draining replica sends `reconnect {after_ms}` (docs/protocol.md): the student closes, waits that
    # long, and comes back with resume_from; the answer in flight is resumed and checked as one.
    server = await start_server(Behaviour(tokens=6, token_delay=0.05, reconnect_in_turn=1, reconnect_after_ms=400))
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "1.5", "--max-lost", "0", "--max-duplicated", "0",
        "--max-unexpected-frames", "0", "--max-disconnects", "0",
    )
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    assert server.counts.reconnects_sent == 1
    assert counters["reconnect_requests"] == 1
    assert server.counts.hellos == 2 and server.counts.resumed == 1
    assert counters["resumes_ok"] == 1
    assert counters.get("drops", 0) == 0 and counters.get("unexpected_frames", 0) == 0
    reconnect = phase["latency_ms"]["reconnect"]
    assert reconnect["count"] == 1 and 400.0 <= reconnect["max"] < 1000.0
    # (Every answer counted; how many fit in 1.5 s depends on how busy the machine is: at least the first.)
    assert counters["turns_ok"] == server.counts.answers_done >= 1
    # The first answer waited for the move: the delay is the server's, so it stays in `done`.
    assert phase["latency_ms"]["done"]["max"] >= 400.0


async def test_a_student_told_to_reconnect_while_a_question_is_due_reconnects(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A question falls due while the student closes its socket after `reconnect`, waiting for the server's
    # close reply (held 0.2 s, while each student's questions fall due every 0.1 s). The failed send must give
    # the event loop back: retrying it at once, forever, froze every student of the process (and the close it
    # waited for) until the end of the run. The load is light (answers without pauses between tokens), so
    # that every answer ends within the drain even on a busy machine: the checks below need a finished run.
    server = await start_server(Behaviour(tokens=4, reconnect_every=5, reconnect_after_ms=0, close_reply_delay=0.2))
    code, results = await _run(server, tmp_path, "--students", "4", "--rate", "40", "--duration", "2",
                               "--max-unexpected-frames", "0", "--max-lost", "0", "--max-duplicated", "0")
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    assert counters["reconnect_requests"] >= 4, counters  # (one sent to a socket already closing is not read)
    assert counters["resumes_ok"] == counters["reconnect_requests"], counters
    assert phase["latency_ms"]["reconnect"]["max"] < 1000, phase["latency_ms"]["reconnect"]
    assert counters.get("turns_unfinished", 0) == 0 and counters.get("turns_failed", 0) == 0, counters
    assert counters["turns_ok"] == counters["turns_attempted"] == server.counts.answers_done, counters


async def test_a_question_refused_by_a_draining_replica_is_sent_again_after_the_resume(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The replica starts draining as the first question arrives: `reconnect`, then the refusal, which the
    # student's closing socket never reads. After the resumed welcome the question goes again, same id and
    # same text, is answered once, and counts once: not unfinished, not failed, not lost.
    server = await start_server(Behaviour(tokens=4, drain_on_message=1, reconnect_after_ms=50))
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.5", "--max-error-rate", "0", "--max-lost", "0",
        "--max-duplicated", "0", "--max-unexpected-frames", "0", "--max-disconnects", "0",
    )
    assert code == 0
    phase = _all(results)
    counters = phase["counters"]
    assert server.counts.reconnects_sent == 1 and server.counts.errors_sent == 1
    assert counters["reconnect_requests"] == 1 and counters["resumes_ok"] == 1 and server.counts.resumed == 1
    assert counters["resent"] == 1
    refused, resent = server.counts.received[:2]
    assert refused == resent
    assert counters.get("turns_unfinished", 0) == 0 and counters.get("turns_failed", 0) == 0, counters
    assert counters["turns_ok"] == counters["turns_sent"] == counters["turns_attempted"] == server.counts.answers_done
    assert phase["errors_by_code"] == {} and phase["error_rate"] == 0.0


async def test_a_question_acknowledged_unseen_before_a_move_counts_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The replica acknowledges the first question just after telling the socket to move: the student never
    # reads that ack, so it sends the question again after the resumed welcome. The server deduplicates it
    # (the first ack again, no second answer), and the replayed ack and the resend's ack make one turn.
    server = await start_server(Behaviour(tokens=4, drain_on_message=1, drain_acks=True, reconnect_after_ms=50))
    code, results = await _run(
        server, tmp_path, "--students", "1", "--duration", "0.5", "--max-error-rate", "0", "--max-lost", "0",
        "--max-duplicated", "0", "--max-unexpected-frames", "0", "--max-disconnects", "0",
    )
    assert code == 0
    counters = _all(results)["counters"]
    assert counters["resumes_ok"] == 1 and server.counts.resends == 1 == counters["resent"]
    assert counters.get("turns_unfinished", 0) == 0 and counters.get("turns_failed", 0) == 0, counters
    assert counters["turns_ok"] == counters["turns_sent"] == counters["turns_attempted"] == server.counts.answers_done
    assert counters.get("unexpected_frames", 0) == 0 and counters.get("late_frames", 0) == 0


@pytest.mark.parametrize("watch_events", [True, False])
async def test_teachers_watching(start_server: StartServer, tmp_path: Path, watch_events: bool) -> None:
    server = await start_server(Behaviour(tokens=2, watch_events=watch_events))
    code, results = await _run(server, tmp_path, "--teachers", "2", "--duration", "0.5")
    assert code == 0
    phase = _all(results)
    assert server.counts.watches == 2
    if watch_events:
        assert phase["counters"]["teacher_events"] >= 2
        assert phase["watch_errors"] == {}
    else:
        assert phase["watch_errors"] == {"bad_request": 2}
        assert phase["counters"].get("teacher_events", 0) == 0


async def test_conversations_rotate_through_courses(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(Behaviour(tokens=2))
    code, results = await _run(
        server,
        tmp_path,
        *("--course", "algebra-1", "--course", "biology-2"),
        *("--conversations", "2", "--turns-per-conversation", "2"),
    )
    assert code == 0
    counters = _all(results)["counters"]
    assert counters["conversation_switches"] >= 4
    courses = {conv.course_id for conv in server.conversations.values()}
    assert courses == {"algebra-1", "biology-2"}
    assert len(server.conversations) == 4  # two students, one conversation per course each


# -- gates and limits ---------------------------------------------------------------------------------


async def test_thresholds_gate_the_exit_status(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(Behaviour(tokens=2, first_token_delay=0.01))
    args = [*_base_args(server, "--duration", "0.5"), "--max-error-rate", "0.5", "--max-lost", "0"]
    # main() runs its own (uvloop) event loop, so it gets a thread; the server keeps serving here.
    assert await asyncio.to_thread(main, [*args, "--max-p99-ttft-ms", "5000"]) == 0
    assert await asyncio.to_thread(main, [*args, "--max-p99-ttft-ms", "1", "--min-turns-per-s", "100000"]) == 1
    err = capsys.readouterr().err
    assert "threshold failed: p99 ttft" in err and "> 1 ms" in err
    assert "threshold failed: turns per second" in err
    assert "error rate" not in err


async def test_a_gate_with_nothing_measured_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on this port: every connect fails, and a latency gate must not pass vacuously.
    code = await amain(
        [
            *("--url", "ws://127.0.0.1:9/ws", "--jwt-secret", SECRET, "--students", "1"),
            *("--duration", "0.3", "--quiet", "--max-p99-ttft-ms", "1000", "--connect-timeout", "0.5"),
        ]
    )
    assert code == 1
    assert "p99 ttft: nothing measured" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    [
        "ws://10.0.0.5/ws",
        "ws://example.com/ws",
        "wss://192.168.1.2:8443/ws",
        "ws://[2001:db8::1]/ws",
        "ws://8.8.8.8/ws",
        "ws://localhost./ws",
        "ws://evil.localhost/ws",
        "ws://localhost.example.com/ws",
        "ws://127.0.0.1.nip.io/ws",
    ],
)
def test_refuses_non_loopback_targets(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", url, "--jwt-secret", SECRET, "--duration", "1"]) == 2
    assert "only loopback targets" in capsys.readouterr().err
    check_target(url, allow_remote=True)  # allowed explicitly (nothing is connected here)


@pytest.fixture
async def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """A tripwire on the test's event loop: a connect to anything outside loopback fails, and is recorded."""
    loop = asyncio.get_running_loop()
    real_connect = loop.sock_connect
    refused: list[object] = []

    async def sock_connect(sock: socket.socket, address: Any) -> None:
        if not is_loopback_address(str(address[0])):
            refused.append(address)
            raise OSError(f"test tripwire: no traffic to {address[0]}")
        await real_connect(sock, address)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    return refused


@pytest.mark.parametrize("allow_remote", [False, True])
async def test_a_redirect_is_not_followed(
    start_server: StartServer, tmp_path: Path, allow_remote: bool, loopback_only: list[object]
) -> None:
    # The tokens go in the hello after the upgrade: following a redirect would hand them to its target.
    # Here the target is another loopback server, which must see no hello at all. (aiohttp follows
    # http:// locations only, which upgrade just as well.)
    other = await start_server(Behaviour(tokens=2))
    server = await start_server(Behaviour(redirect_to=other.url.replace("ws://", "http://")))
    extra = ["--allow-remote"] if allow_remote else []
    code, results = await _run(server, tmp_path, "--duration", "0.5", "--max-error-rate", "0", *extra)
    assert code == 1
    assert server.counts.redirects >= 2
    assert other.counts.hellos == 0
    phase = _all(results)
    assert set(phase["connect_failures"]) == {"redirect_refused"}
    assert phase["connect_failures"]["redirect_refused"] == phase["counters"]["connect_attempts"]


async def test_a_redirect_outside_loopback_sends_nothing_there(
    start_server: StartServer, tmp_path: Path, loopback_only: list[object]
) -> None:
    server = await start_server(Behaviour(redirect_to="http://192.0.2.10:8080/ws"))  # TEST-NET-1
    _, results = await _run(server, tmp_path, "--duration", "0.5", "--connect-timeout", "0.5")
    assert loopback_only == []
    assert server.counts.redirects >= 2
    assert set(_all(results)["connect_failures"]) == {"redirect_refused"}


class _FixedResolver(AbstractResolver):
    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [{"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


async def test_names_must_resolve_to_loopback() -> None:
    assert (await LoopbackResolver(_FixedResolver("127.0.0.1")).resolve("localhost", 80))[0]["host"] == "127.0.0.1"
    assert (await LoopbackResolver(_FixedResolver("::1")).resolve("localhost", 80))[0]["host"] == "::1"
    for address in ("192.0.2.7", "10.1.2.3", "::ffff:192.0.2.7", "2001:db8::1"):
        with pytest.raises(RemoteRefused, match="outside loopback"):
            await LoopbackResolver(_FixedResolver(address)).resolve("loadtest.example", 80)


async def test_a_name_resolving_outside_loopback_is_refused_at_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[object]
) -> None:
    # As if localhost's DNS answer pointed elsewhere: the run's resolver refuses it before any connect.
    async def resolve(self: Any, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": "192.0.2.7", "port": port, "family": family, "proto": 0, "flags": 0}]

    monkeypatch.setattr(aiohttp.DefaultResolver, "resolve", resolve)
    out = tmp_path / "results.json"
    argv = ["--url", "ws://localhost:9/ws", "--jwt-secret", SECRET, "--duration", "0.3", "--quiet"]
    assert await amain([*argv, "--out", str(out)]) == 0
    assert loopback_only == []
    assert set(json.loads(out.read_text())["phases"]["all"]["connect_failures"]) == {"remote_refused"}


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]", "::ffff:127.0.0.1"]
)
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert is_loopback(host)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTEDU_JWT_SECRET", raising=False)
    assert main(["--url", "http://127.0.0.1/ws", "--jwt-secret", SECRET]) == 2
    assert main(["--url", "ws://127.0.0.1/ws"]) == 2  # no token source
    assert main(["--url", "ws://127.0.0.1/ws", "--jwt-secret", SECRET, "--students", "20000"]) == 2
    assert main(["--url", "ws://127.0.0.1/ws", "--jwt-secret", SECRET, "--duration", "100", "--ttl", "50"]) == 2
    err = capsys.readouterr().err
    assert "ws:// or wss://" in err and "no tokens" in err and "capped" in err and "expire" in err


def test_ttl_beyond_the_servers_token_lifetime_cap_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server refuses tokens living longer than SMARTEDU_MAX_TOKEN_LIFETIME_S: every student would fail.
    monkeypatch.delenv("SMARTEDU_MAX_TOKEN_LIFETIME_S", raising=False)
    assert main(["--url", "ws://127.0.0.1/ws", "--jwt-secret", SECRET, "--ttl", "90000"]) == 2
    assert "--ttl 90000 exceeds SMARTEDU_MAX_TOKEN_LIFETIME_S (86400 s)" in capsys.readouterr().err
    monkeypatch.setenv("SMARTEDU_MAX_TOKEN_LIFETIME_S", "600")
    assert main(["--url", "ws://127.0.0.1/ws", "--jwt-secret", SECRET, "--duration", "10", "--ttl", "900"]) == 2
    assert "(600 s)" in capsys.readouterr().err


# -- outputs ------------------------------------------------------------------------------------------


async def test_writes_json_results_and_png_plot(start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server(Behaviour(tokens=3))
    out, plot = tmp_path / "results.json", tmp_path / "latency.png"
    args = [*_base_args(server, "--duration", "0.8"), "--out", str(out), "--plot", str(plot), "--max-lost", "0"]
    assert await amain(args) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.stat().st_size > 10_000
    results = json.loads(out.read_text())
    assert results["tool"] == "smartedu-loadtest" and results["passed"] is True
    assert set(results["phases"]) == {"ramp-up", "steady", "drain", "all"}
    ack = results["phases"]["all"]["latency_ms"]["ack"]
    assert {"count", "p50", "p90", "p99", "p99.9", "max", "hdr"} <= set(ack)
    assert results["timeseries"]["done"], "latency over time is recorded"
    assert results["thresholds"] == [
        {
            "name": "lost tokens",
            "phase": "all",
            "limit": 0.0,
            "kind": "max",
            "value": 0.0,
            "unit": "",
            "passed": True,
        }
    ]
    assert SECRET not in out.read_text()  # neither the secret nor tokens go into results


@pytest.mark.parametrize("option", ["--out", "--plot"])
async def test_an_output_path_that_cannot_be_written_is_refused_before_the_run(
    start_server: StartServer, tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    server = await start_server(Behaviour(tokens=2))
    for path, message in ((tmp_path, "is a directory"), (tmp_path / "missing" / "x", "does not exist")):
        assert await amain([*_base_args(server), option, str(path)]) == 2
        assert message in capsys.readouterr().err
    assert server.counts.hellos == 0  # refused before the run, not after it


async def test_a_failed_write_keeps_the_summary_and_has_its_own_exit_status(
    start_server: StartServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # /dev/full accepts the open and fails the write (ENOSPC): the run's summary must come first, the
    # other file is still written, and the status tells a failed write from a failed threshold.
    server = await start_server(Behaviour(tokens=2))
    argv = [arg for arg in _base_args(server, "--duration", "0.4") if arg != "--quiet"]
    plot = tmp_path / "latency.png"
    code = await amain([*argv, "--out", "/dev/full", "--plot", str(plot), "--max-lost", "0"])
    captured = capsys.readouterr()
    assert code == 3
    assert "Latency (ms)" in captured.out and "PASS" in captured.out
    assert "cannot write --out /dev/full" in captured.err
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- tokens -------------------------------------------------------------------------------------------


def test_minted_tokens_carry_the_claims(tmp_path: Path) -> None:
    minter = minter_from_secret(SECRET, tenant="school-1", courses=["algebra-1"], ttl=600)
    claims = jwt.decode(minter.mint("loadtest-student-17", "student", "Load Student 17"), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "loadtest-student-17"
    assert claims["tid"] == "school-1" and claims["role"] == "student" and claims["courses"] == ["algebra-1"]
    assert claims["name"] == "Load Student 17"
    assert 590 <= claims["exp"] - claims["iat"] <= 600

    for key, algorithm in (
        (rsa.generate_private_key(65537, 2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ):
        pem = tmp_path / f"{algorithm}.pem"
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        signed = minter_from_private_key(pem, tenant="t", courses=["c"], ttl=60, audience="chat")
        assert signed.algorithm == algorithm
        token = signed.mint("s", "teacher", "T")
        decoded = jwt.decode(token, key.public_key(), algorithms=[algorithm], audience="chat")
        assert decoded["role"] == "teacher"

    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# students\n" + minter.mint("a", "student", "A") + "\n\n")
    assert len(read_tokens_file(tokens)) == 1
    tokens.write_text("not-a-jwt\n")
    with pytest.raises(TokenError):
        read_tokens_file(tokens)


# -- the floor server ---------------------------------------------------------------------------------


def _load_floor_module() -> Any:
    spec = importlib.util.spec_from_file_location("floor_server", ROOT / "benchmarks" / "floor_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_floor_server_answers_a_turn() -> None:
    floor = _load_floor_module()
    runner = web.AppRunner(floor.create_app(tokens=3))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send_json({"type": "hello", "token": "x", "course_id": "c"})
            welcome = await ws.receive_json(timeout=5)
            assert welcome["type"] == "welcome" and welcome["seq"] == 0
            await ws.send_json({"type": "message", "id": "m1", "text": "hi"})
            frames = [await ws.receive_json(timeout=5) for _ in range(5)]
        assert [f["type"] for f in frames] == ["ack", "token", "token", "token", "done"]
        ack, *tokens, done = frames
        assert ack["id"] == "m1" and ack["reply_id"] == done["reply_id"]
        offset = 0
        for token in tokens:
            assert token["offset"] == offset and token["reply_id"] == ack["reply_id"]
            offset += len(token["text"])
        assert done["length"] == offset and done["status"] == "complete"
        seqs = [f["seq"] for f in frames]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5
    finally:
        await runner.cleanup()


# -- limits on numbers and rates ----------------------------------------------------------------------


def _config(url: str = "ws://127.0.0.1:9/ws", **overrides: Any) -> LoadConfig:
    minter = minter_from_secret(SECRET, tenant="t", courses=["c"], ttl=3600)
    fields: dict[str, Any] = {
        "url": url,
        "students": 1,
        "duration": 1.0,
        "ramp_rate": 100.0,
        "courses": ("c",),
        "questions": QuestionPool(["q?"]),
        "student_tokens": TokenSource("student", "loadtest-student", minter=minter),
        **overrides,
    }
    return LoadConfig(**fields)


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("rate", ["inf", "nan", "-inf", "1e9", str(MAX_RATE * 2)])
def test_rate_must_be_finite_and_capped(rate: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--url", "ws://127.0.0.1:9/ws", "--jwt-secret", SECRET, "--duration", "0.2", f"--rate={rate}"]
    err = _usage_error(argv, capsys)
    assert "--rate" in err and ("finite" in err or "at most" in err or "positive" in err)
    with pytest.raises(LoadTestError):
        _config(rate=float(rate)).validate()


async def test_open_loop_schedule_behind_yields_and_stops() -> None:
    # The schedule is a minute behind at the highest rate: 600,000 questions are due at once. It queues
    # them in batches and yields in between, so another task runs and its stop is obeyed at once.
    config = _config(rate=MAX_RATE, duration=120.0)
    stats = RunStats(time.monotonic() - 60.0, 0.0, time.monotonic() + 60.0)
    async with aiohttp.ClientSession() as session:
        ctx = RunContext(config, session, stats)
        students = [Student(ctx, 0)]
        ran = asyncio.get_running_loop().create_future()

        async def stop_soon() -> None:
            while not students[0].outbox:
                await asyncio.sleep(0)
            ran.set_result(len(students[0].outbox))
            ctx.stop_event.set()

        started = time.monotonic()
        schedule = asyncio.create_task(_schedule(ctx, students))
        await asyncio.wait_for(stop_soon(), timeout=5.0)
        await asyncio.wait_for(schedule, timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert ran.result() < 10_000
    assert len(students[0].outbox) < 10_000


@pytest.mark.parametrize(
    "option",
    [
        "--connect-timeout=nan",
        "--turn-timeout=nan",
        "--interval=nan",
        "--duration=nan",
        "--drain-timeout=nan",
        "--ttl=inf",
        "--think-time=inf",
        "--ramp-rate=inf",
        "--max-error-rate=nan",
        "--max-p99-ack-ms=inf",
        "--turn-timeout=1e308",
    ],
)
def test_numbers_must_be_finite(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(["--url", "ws://127.0.0.1:9/ws", "--jwt-secret", SECRET, "--duration", "0.2", option], capsys)
    assert f"argument {option.split('=')[0]}" in err
    assert "finite" in err or "at most" in err


async def test_a_crashing_student_or_teacher_fails_the_run(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bug in the load tester must not look like a clean run: before, crashed tasks were only logged,
    # and a run in which every student crashed passed --max-error-rate 0 with exit status 0.
    async def crash(self: object, *args: object) -> bool:
        raise RuntimeError("injected")

    monkeypatch.setattr(Student, "_connect", crash)
    monkeypatch.setattr(Teacher, "_watch", crash)
    server = await start_server(Behaviour(tokens=2))
    code, results = await _run(
        server, tmp_path, "--duration", "0.3", "--teachers", "1", "--max-error-rate", "0", "--max-lost", "0"
    )
    assert code == 4
    phase = _all(results)
    assert phase["counters"]["student_crashes"] == 2
    assert phase["counters"]["task_crashes"] == 1
    assert phase["error_rate"] == 1.0
    assert results["passed"] is False
    assert "crashed" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--questions", "--tokens-file", "--jwt-secret-file", "--teacher-tokens-file"])
def test_a_file_that_is_not_utf8_is_a_usage_error(
    option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ?\n".encode("latin-1"))
    secret = [] if option == "--jwt-secret-file" else ["--jwt-secret", SECRET]
    assert main(["--url", "ws://127.0.0.1:9/ws", *secret, "--duration", "0.2", option, str(bad)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["ws://[::1/ws", "ws://[127.0.0.1]/ws", "ws://127.0.0.1:99999/ws"])
def test_a_malformed_url_is_a_usage_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", url, "--jwt-secret", SECRET, "--duration", "0.2"]) == 2
    assert "--url" in capsys.readouterr().err


@pytest.mark.parametrize("stop_after, early", [(1.0, False), (0.2, True)])
async def test_a_stop_during_the_drain_cuts_it_short(
    start_server: StartServer, stop_after: float, early: bool
) -> None:
    # Answers take 3 s; the load lasts 0.5 s with a 10 s drain. A stop in the drain (at 1 s) must end
    # the run at once, and is not "stopped early": the load ran its full length. A stop during the load
    # ends the load early and the drain still waits for the answer in flight.
    server = await start_server(Behaviour(tokens=10, token_delay=0.3))
    config = _config(server.url, duration=0.5 if not early else 5.0, drain_timeout=10.0)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(stop_after, stop.set)
    started = time.monotonic()
    stats = await run_load(config, stop=stop)
    elapsed = time.monotonic() - started
    results = build_results(stats, {}, "", "")
    assert results["stopped_early"] is early
    assert results["drain_stopped"] is not early
    counters = stats.combined().counters
    if early:
        assert counters["turns_ok"] == 1 and 3.0 <= elapsed < 5.0
    else:
        assert counters["turns_unfinished"] == 1 and elapsed < 2.0


def test_series_percentiles_use_the_summarys_rank() -> None:
    # 60 answers of 1..60 ms: HdrHistogram's p99 is the 59th value (rank rounded half up); the series
    # took the 60th (ceil), so the live view and the plot disagreed with the tables.
    hist, series = LatencyHistogram(), LatencySeries(interval=1.0)
    for ms in range(1, 61):
        hist.record(ms / 1000.0)
        series.record("done", 0.5, ms / 1000.0)
    series.flush()
    _, count, p50, p99, top = series.points["done"][0]
    summary = hist.summary()
    assert count == 60 and top == 60.0
    assert p50 == pytest.approx(summary["p50"], rel=0.002) and p50 == 30.0
    assert p99 == pytest.approx(summary["p99"], rel=0.002) and p99 == 59.0


def test_help_shows_defaults_and_limits(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "answer counts as failed (default 60)" in text and "welcome timeout in seconds (default 10)" in text
    assert "130 when aborted" in text and "3 when --out or --plot could not be written" in text
    err = _usage_error(["--url", "ws://127.0.0.1:9/ws", "--jwt-secret", SECRET, "--max-error-rate", "1.5"], capsys)
    assert "between 0 and 1" in err
