"""How an answer the provider did not end normally is told, stored and used: a safety filter's block, and an
answer the model ended early (Gemini's OTHER or RECITATION, an OpenAI-compatible `tool_calls`). Through the
real google-genai SDK and the OpenAI-compatible provider against the local fakes, over the socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from server.answers import SAFETY_MESSAGE
from server.keys import CHAT, METRICS
from tests.conftest import Serve, Server, Socket, answer_text, seed_course, token
from tests.fakes.fake_gemini import FakeGemini, start_fake_gemini
from tests.fakes.fake_openai import FakeOpenAI, start_fake_openai

pytestmark = pytest.mark.integration

HELLO = {"token": token(courses=["alg-1"]), "course_id": "alg-1"}
CHUNKS = ["Primes ", "have ", "two ", "divisors."]

Fake = FakeGemini | FakeOpenAI


@pytest.fixture(params=["gemini", "openai"])
async def model(request: pytest.FixtureRequest) -> AsyncIterator[Fake]:
    start = start_fake_gemini if request.param == "gemini" else start_fake_openai
    async with start(chunks=list(CHUNKS)) as fake:
        yield fake


async def _serve(serve: Serve, fake: Fake) -> Server:
    if isinstance(fake, FakeGemini):
        env = {"GEMINI_API_KEY": "test-key-not-secret", "GEMINI_BASE_URL": fake.base_url}
        server = await serve(ai_provider="gemini", env={**env, "SMARTEDU_AI_MAX_RETRIES": "0"})
    else:
        env = {"OPENAI_BASE_URL": fake.base_url, "OPENAI_MODEL": "tutor-7b"}
        server = await serve(ai_provider="openai", env={**env, "SMARTEDU_AI_MAX_RETRIES": "0"})
    await seed_course(server.settings, "school-a", "alg-1", "Algebra I")
    return server


def _normal(fake: Fake) -> None:
    fake.chunks = list(CHUNKS)
    if isinstance(fake, FakeGemini):
        fake.finish_reason, fake.block_reason = "STOP", None
    else:
        fake.finish_reason, fake.filter_prompt = "stop", False


def _turns_sent(fake: Fake) -> list[tuple[str, str]]:
    """The history and question of the last request the fake received, as (role, text) turns."""
    body = fake.last_body
    if isinstance(fake, FakeGemini):
        return [(c["role"], " ".join(p["text"] for p in c["parts"])) for c in body["contents"]]
    return [(m["role"], m["content"]) for m in body["messages"] if m["role"] != "system"]


async def _ask(sock: Socket, client_id: str, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await sock.send(type="message", id=client_id, text=text)
    ack = await sock.expect("ack")
    return ack, await sock.until("done")


async def _reloaded(server: Server, conversation_id: str, reply_id: int) -> dict[str, Any]:
    """The answer as a reload shows it: the welcome's history and the HTTP API agree on it."""
    welcome = (await server.connect(HELLO)).frames[0]
    [item] = [m for m in welcome["history"] if m["id"] == reply_id]
    response = await server.client.get(
        f"/api/conversations/{conversation_id}/messages", headers={"Authorization": f"Bearer {HELLO['token']}"}
    )
    assert response.status == 200
    assert [m for m in (await response.json())["messages"] if m["id"] == reply_id] == [item]
    return item


# How each provider's filter stops an answer: after some text, or before any (the prompt itself).
BLOCKS = {
    "answer": {"gemini": {"finish_reason": "SAFETY"}, "openai": {"finish_reason": "content_filter"}},
    "prompt": {"gemini": {"block_reason": "SAFETY"}, "openai": {"filter_prompt": True}},
}


@pytest.mark.parametrize("blocked", ["answer", "prompt"])
async def test_a_blocked_answer_is_marked_kept_from_the_model_and_not_regenerated(
    serve: Serve, model: Fake, db: asyncpg.Connection, blocked: str
) -> None:
    fake = model
    server = await _serve(serve, fake)
    sock = await server.connect(HELLO)
    conversation = sock.frames[0]["conversation_id"]
    _normal(fake)
    await _ask(sock, "q1", "What is a prime number?")

    for key, value in BLOCKS[blocked]["gemini" if isinstance(fake, FakeGemini) else "openai"].items():
        setattr(fake, key, value)
    ack, frames = await _ask(sock, "q2", "something unsafe")
    done = frames[-1]
    shown = answer_text(frames, ack["reply_id"])
    assert shown == ("".join(CHUNKS) + "\n\n" if blocked == "answer" else "") + SAFETY_MESSAGE
    assert (done["status"], done["blocked"], done["truncated"], done["length"]) == ("complete", True, False, len(shown))
    assert "error" not in done and any(f["type"] == "flag" for f in frames)

    # A reload shows what the live frames showed, and says the answer was blocked.
    item = await _reloaded(server, conversation, ack["reply_id"])
    assert (item["text"], item["status"], item["blocked"]) == (shown, "complete", True) and "error" not in item

    # The next question's context has neither the blocked answer nor the question that led to it.
    _normal(fake)
    _, frames = await _ask(sock, "q3", "And what is a composite number?")
    assert frames[-1]["blocked"] is False
    assert _turns_sent(fake) == [
        ("user", "What is a prime number?"),
        ("model" if isinstance(fake, FakeGemini) else "assistant", "".join(CHUNKS)),
        ("user", "And what is a composite number?"),
    ]

    # Regenerating it would only be blocked again: refused with the code of a declined question.
    calls = fake.calls
    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    error = await sock.expect("error")
    assert (error["code"], error["retryable"], error["ref"]) == ("ai_declined", False, str(ack["reply_id"]))
    assert fake.calls == calls
    assert await db.fetchval("SELECT count(*) FROM messages WHERE reply_to = $1", ack["message_id"]) == 1


# Finish reasons after some text that mean the answer is not whole: (error code, retryable) the student is told.
UNFINISHED = {
    "gemini-OTHER": ("OTHER", "ai_unavailable", True),
    "gemini-MALFORMED_FUNCTION_CALL": ("MALFORMED_FUNCTION_CALL", "ai_unavailable", True),
    "gemini-RECITATION": ("RECITATION", "ai_declined", False),
    "gemini-LANGUAGE": ("LANGUAGE", "ai_declined", False),
    "gemini-IMAGE_RECITATION": ("IMAGE_RECITATION", "ai_declined", False),
    # The API key's account restricted: staff must act (regenerating is allowed: it works once they have).
    "gemini-PUP_LIMITED_DISABLED": ("PUP_LIMITED_DISABLED", "ai_unavailable", False),
    "gemini-MISSING_THOUGHT_SIGNATURE": ("MISSING_THOUGHT_SIGNATURE", "ai_rejected", False),
    "openai-tool_calls": ("tool_calls", "ai_unavailable", True),
    "openai-function_call": ("function_call", "ai_unavailable", True),
}


@pytest.mark.parametrize("case", list(UNFINISHED))
async def test_an_answer_the_model_ended_early_is_failed_with_its_text(
    serve: Serve, db: asyncpg.Connection, case: str
) -> None:
    finish, code, retryable = UNFINISHED[case]
    start = start_fake_gemini if case.startswith("gemini") else start_fake_openai
    async with start(chunks=list(CHUNKS), finish_reason=finish) as fake:
        server = await _serve(serve, fake)
        sock = await server.connect(HELLO)
        ack, frames = await _ask(sock, "q1", "What is a prime number?")
        done = frames[-1]
        shown = answer_text(frames, ack["reply_id"])
        assert shown == "".join(CHUNKS)
        assert (done["status"], done["error"], done["retryable"]) == ("failed", code, retryable)
        assert (done["length"], done["truncated"], done["blocked"]) == (len(shown), False, False)
        # The provider's own usage, not an estimate: the stream reached it.
        assert done["usage"] == {"prompt_tokens": 42, "output_tokens": len(CHUNKS)}
        error = await sock.expect("error")
        assert (error["code"], error["retryable"], error["ref"]) == (code, retryable, str(ack["reply_id"]))
        assert fake.calls == 1  # text had been shown: never sent again

        item = await _reloaded(server, sock.frames[0]["conversation_id"], ack["reply_id"])
        assert (item["text"], item["status"], item["error"], item["retryable"]) == (shown, "failed", code, retryable)
        row = await db.fetchrow("SELECT prompt_tokens, output_tokens FROM messages WHERE id = $1", ack["reply_id"])
        assert row is not None and (row["prompt_tokens"], row["output_tokens"]) == (42, len(CHUNKS))

        # Regenerate where asking again can help; refused, without a call, where it would end the same way.
        fake.finish_reason = "STOP" if isinstance(fake, FakeGemini) else "stop"
        await sock.send(type="regenerate", reply_id=ack["reply_id"])
        if code == "ai_unavailable":
            again = await sock.expect("ack")
            assert again["regenerated"] is True
            assert (await sock.until("done"))[-1]["status"] == "complete" and fake.calls == 2
        else:
            error = await sock.expect("error")
            assert (error["code"], error["retryable"], error["ref"]) == (code, False, str(ack["reply_id"]))
            assert fake.calls == 1


def _block(fake: Fake) -> None:
    for key, value in BLOCKS["answer"]["gemini" if isinstance(fake, FakeGemini) else "openai"].items():
        setattr(fake, key, value)


def _cancels_heard(server: Server) -> asyncio.Event:
    """Set once the replica has handled a student's `cancel` (the socket answers none)."""
    answers = server.client.app[CHAT].answers
    stop, heard = answers.stop, asyncio.Event()

    def spy(*args: Any) -> bool:
        stopped = stop(*args)
        heard.set()
        return bool(stopped)

    answers.stop = spy
    return heard


async def test_a_cancel_after_the_block_was_received_leaves_the_answer_blocked(
    serve: Serve, model: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider had blocked the answer when the cancel came (the core was still flagging it): the answer
    ends blocked, as it would have without the cancel, not stopped with the safety note in its text."""
    fake = model
    server = await _serve(serve, fake)
    sock = await server.connect(HELLO)
    _block(fake)
    database = server.client.app[CHAT].answers.db
    add_flag, flagging, let_go = database.add_flag, asyncio.Event(), asyncio.Event()

    async def held_flag(*args: Any) -> int:
        flagging.set()
        await let_go.wait()
        return int(await add_flag(*args))

    monkeypatch.setattr(database, "add_flag", held_flag)
    heard = _cancels_heard(server)
    await sock.send(type="message", id="q1", text="something unsafe")
    ack = await sock.expect("ack")
    await asyncio.wait_for(flagging.wait(), 5)
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    await asyncio.wait_for(heard.wait(), 5)
    let_go.set()
    frames = await sock.until("done")
    done, shown = frames[-1], answer_text(frames, ack["reply_id"])
    assert shown == "".join(CHUNKS) + "\n\n" + SAFETY_MESSAGE
    assert (done["status"], done["blocked"], done["length"]) == ("complete", True, len(shown))
    assert any(f["type"] == "flag" for f in frames)
    item = await _reloaded(server, sock.frames[0]["conversation_id"], ack["reply_id"])
    assert (item["text"], item["status"], item["blocked"]) == (shown, "complete", True)


async def test_a_cancel_before_the_block_arrived_stops_the_answer(serve: Serve, model: Fake) -> None:
    """The cancel was handled while the provider had not yet sent its block: the answer is stopped with the
    text shown so far, and nothing is flagged."""
    fake = model
    server = await _serve(serve, fake)
    sock = await server.connect(HELLO)
    _block(fake)
    fake.hold_before_event = len(CHUNKS)  # the event with the filter's finish reason
    heard = _cancels_heard(server)
    await sock.send(type="message", id="q1", text="something unsafe")
    ack = await sock.expect("ack")
    await asyncio.wait_for(fake.holding.wait(), 5)
    await sock.send(type="cancel", reply_id=ack["reply_id"])
    await asyncio.wait_for(heard.wait(), 5)
    fake.resume.set()
    frames = await sock.until("done")
    done, shown = frames[-1], answer_text(frames, ack["reply_id"])
    assert SAFETY_MESSAGE not in shown and "".join(CHUNKS).startswith(shown)
    assert (done["status"], done["blocked"], done["length"]) == ("stopped", False, len(shown))
    assert not any(f["type"] == "flag" for f in frames)


async def test_an_unknown_openai_finish_reason_after_text_is_a_complete_answer(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    """A server's own name for an answer's end (here a proxy's `end_turn`): the answer is complete, as its
    text came and ended as usual; staff find the reason in the log and its count in the metrics."""
    async with start_fake_openai(chunks=list(CHUNKS), finish_reason="end_turn") as fake:
        server = await _serve(serve, fake)
        sock = await server.connect(HELLO)
        ack, frames = await _ask(sock, "q1", "What is a prime number?")
        done = frames[-1]
        assert answer_text(frames, ack["reply_id"]) == "".join(CHUNKS)
        assert (done["status"], done["truncated"], done["blocked"]) == ("complete", False, False)
        assert "error" not in done
        registry = server.client.app[METRICS].registry
        assert registry.get_sample_value("smartedu_ai_unknown_finish_reasons_total") == 1
        assert "ai_unknown_finish_reason" in caplog.messages
