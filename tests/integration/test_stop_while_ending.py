"""A replica stopping (after its drain) while an answer is being ended: its last frames on their way, or its
commit. The answer keeps the one `done` it was being given, with the length of the text its tokens carried.

Shutdown used to cancel every answer's task, and a cancel landing there committed the answer a second time
as interrupted with length 0 (a `done` shorter than the tokens sent, which went out after it), or found it
already committed by the first commit and sent no `done` at all (the client never learnt the answer ended,
and the conversation's log stayed behind its committed seq, so resuming failed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from server.keys import CHAT, DATABASE
from tests.conftest import Serve, Server, Socket, answer_text, token

pytestmark = pytest.mark.integration


async def _two_replicas(serve: Serve) -> tuple[Server, Server]:
    """The replica that will stop (it generates the answer) and one a second tab stays on."""
    return await serve(replica_id="replica-a"), await serve(replica_id="replica-b")


async def _ask(a: Server, b: Server, client_id: str) -> tuple[Socket, int]:
    """A question asked on `a`; the tab on `b` that sees the whole answer; the reply id."""
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id=client_id, text="Explain how fractions are added")
    reply_id = int((await tab1.expect("ack"))["reply_id"])
    await tab1.close()  # the answer goes on without it
    return tab2, reply_id


async def _stop_once_closing(a: Server, let_go: asyncio.Event) -> None:
    """Stop replica `a` (sockets closed with 1012, answers interrupted); what was held goes on once its
    answers are being interrupted."""
    answers = a.client.app[CHAT].answers
    stopping = asyncio.create_task(a.client.close())
    async with asyncio.timeout(10):
        while not answers._closing:
            await asyncio.sleep(0.005)
    let_go.set()
    await stopping


async def _answer_then_quiet(tab: Socket, reply_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The answer's frames up to its `done`, checking that none of its frames follow the done."""
    frames = await tab.until("done")
    done = frames[-1]
    assert done["reply_id"] == reply_id
    with pytest.raises(TimeoutError):
        late = await tab.recv(timeout=0.5)
        pytest.fail(f"a frame after the done: {late}")
    return frames, done


async def test_a_stop_while_the_last_tokens_are_on_their_way_keeps_the_done_s_length(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _two_replicas(serve)
    answers = a.client.app[CHAT].answers
    held, let_go = asyncio.Event(), asyncio.Event()
    emit_token: Callable[..., Awaitable[None]] = answers._emit_token

    async def slow_first_frame(turn: Any, text: str, offset: int) -> None:
        if offset == 0:  # Redis slow to log it: the rest of the answer waits in the batcher meanwhile
            held.set()
            await let_go.wait()
        await emit_token(turn, text, offset)

    monkeypatch.setattr(answers, "_emit_token", slow_first_frame)
    tab2, reply_id = await _ask(a, b, "e1")
    await asyncio.wait_for(held.wait(), 5)
    turn = answers._turns[reply_id]
    async with asyncio.timeout(5):  # the whole (instant) stream read: the answer waits for its last frames
        while turn.stream_task is None or not turn.stream_task.done():
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    await _stop_once_closing(a, let_go)

    frames, done = await _answer_then_quiet(tab2, reply_id)
    text = answer_text(frames, reply_id)
    row = await db.fetchrow("SELECT text, status FROM messages WHERE id = $1", reply_id)
    assert row["status"] == done["status"]
    assert text and text == row["text"] and done["length"] == len(text)


async def test_a_stop_while_the_answer_is_being_committed_still_sends_its_done(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _two_replicas(serve)
    database = a.client.app[DATABASE]
    held, let_go = asyncio.Event(), asyncio.Event()
    update_replies: Callable[[list[Any]], Awaitable[list[bool]]] = database._update_replies

    async def slow_commit(replies: list[Any]) -> list[bool]:
        if not held.is_set():  # PostgreSQL slow to commit the answer's final state
            held.set()
            await let_go.wait()
        return await update_replies(replies)

    monkeypatch.setattr(database, "_update_replies", slow_commit)
    tab2, reply_id = await _ask(a, b, "c1")
    await asyncio.wait_for(held.wait(), 5)
    await _stop_once_closing(a, let_go)

    frames, done = await _answer_then_quiet(tab2, reply_id)
    text = answer_text(frames, reply_id)
    row = await db.fetchrow("SELECT text, status, seq FROM messages WHERE id = $1", reply_id)
    assert done["status"] == row["status"] == "complete"
    assert text and text == row["text"] and done["length"] == len(text)
    # The done carries the seq committed with the answer: a tab resuming from it is resumed.
    assert done["seq"] == row["seq"]
    again = await b.connect({"token": token(), "conversation_id": done["conversation_id"], "resume_from": done["seq"]})
    assert again.frames[0]["resumed"] is True
