"""Edges of an answer changing hands between replicas: a takeover of a long answer, a slow former owner, a
stop deadline during a commit, and a resend that races the first send's ack. Two apps on one PostgreSQL
and one Redis prefix, as in test_scaleout.py; each race is held open at the step it is about."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import orjson
import pytest

from server.keys import CHAT, DATABASE, REDIS
from tests.conftest import Serve, Server, Socket, answer_text, token
from tests.integration.test_lifecycle import _cli

pytestmark = pytest.mark.integration


async def _two_replicas(serve: Serve, **overrides: Any) -> tuple[Server, Server]:
    return await serve(replica_id="replica-a", **overrides), await serve(replica_id="replica-b", **overrides)


async def _idle() -> None:
    return None


def _stall(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica stops renewing its leases and taking over (a stalled event loop, as others see it)."""
    answers = server.client.app[CHAT].answers
    monkeypatch.setattr(answers, "renew_leases", _idle)
    monkeypatch.setattr(answers, "take_over_expired", _idle)


async def _expire_lease(server: Server, reply_id: int) -> None:
    """The answer's lease runs out now (its owner missed its renewals, or stopped)."""
    store = server.client.app[REDIS]
    for raw in await store.client.zrange(store.keys.leases(), 0, -1):
        if orjson.loads(raw)[3] == reply_id:
            await store.client.zadd(store.keys.leases(), {raw: int(time.time() * 1000) - 1})
            return
    pytest.fail(f"answer {reply_id} holds no lease")


async def _until_done_then_quiet(tab: Socket, reply_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The frames up to the answer's `done`; no frame of the answer may follow it."""
    frames = await tab.until("done")
    done = frames[-1]
    assert done["reply_id"] == reply_id, done
    with pytest.raises(TimeoutError):
        late = await tab.recv(timeout=0.5)
        pytest.fail(f"a frame after the done: {late}")
    return frames, done


def _slow_commit(server: Server, monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """The server's answers commit in PostgreSQL, then their reply is slow to come back: the first event is
    set once one is committed, and the reply comes once the second is set."""
    database = server.client.app[DATABASE]
    committed, let_go = asyncio.Event(), asyncio.Event()
    update_replies: Callable[[list[Any]], Awaitable[list[bool]]] = database._update_replies

    async def slow_reply(replies: list[Any]) -> list[bool]:
        result = await update_replies(replies)
        committed.set()
        await let_go.wait()
        return result

    monkeypatch.setattr(database, "_update_replies", slow_reply)
    return committed, let_go


async def _stored(db: asyncpg.Connection, reply_id: int) -> asyncpg.Record:
    row = await db.fetchrow("SELECT text, status, seq FROM messages WHERE id = $1", reply_id)
    assert row is not None
    return row


async def test_a_takeover_of_an_answer_longer_than_the_log_stores_its_whole_text(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversation's log is capped (here at 4 frames): a long answer's first frames are gone from it by
    the time its replica stalls. The takeover must still store (and announce in `done.length`) the text
    the student was sent, not the part the log still holds."""
    a, b = await _two_replicas(serve, stream_maxlen=4, offline_tokens_per_s=200, frame_interval_ms=1)
    _stall(a, monkeypatch)
    answers_a = a.client.app[CHAT].answers
    emit_token: Callable[..., Awaitable[None]] = answers_a._emit_token
    frames_out, stuck, unstuck = 0, asyncio.Event(), asyncio.Event()

    async def stuck_after_eight(turn: Any, text: str, offset: int) -> None:
        nonlocal frames_out
        frames_out += 1
        if frames_out > 8:  # the replica stalls with its answer half sent
            stuck.set()
            await unstuck.wait()
        await emit_token(turn, text, offset)

    monkeypatch.setattr(answers_a, "_emit_token", stuck_after_eight)
    tab = await a.connect({"token": token()})
    try:
        await tab.send(type="message", id="long", text="Explain long division step by step")
        ack = await tab.expect("ack")
        await asyncio.wait_for(stuck.wait(), 5)
        await _expire_lease(a, ack["reply_id"])
        await b.client.app[CHAT].answers.take_over_expired()

        frames = await tab.until("done")
        done, text = frames[-1], answer_text(tab.frames, ack["reply_id"])
        assert len([f for f in tab.frames if f["type"] == "token"]) == 8
        row = await _stored(db, ack["reply_id"])
        assert (done["status"], row["status"]) == ("interrupted", "interrupted")
        assert text and row["text"] == text and done["length"] == len(text)
    finally:
        unstuck.set()


async def test_a_slow_former_owner_cannot_send_tokens_after_the_takeover(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A stalls past its lease; B takes the answer over. A comes back to life between B reading the
    answer's text and B committing it: A's next frame must not reach the log (it would land before a `done`
    whose length leaves it out), and A stops generating without committing anything."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=20)
    _stall(a, monkeypatch)
    answers_a = a.client.app[CHAT].answers
    emit_token: Callable[..., Awaitable[None]] = answers_a._emit_token
    held, let_go, emitted = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def held_after_the_first(turn: Any, text: str, offset: int) -> None:
        if offset == 0:
            await emit_token(turn, text, offset)
            return
        held.set()
        await let_go.wait()
        try:
            await emit_token(turn, text, offset)
        finally:
            emitted.set()

    monkeypatch.setattr(answers_a, "_emit_token", held_after_the_first)
    database_b = b.client.app[DATABASE]
    finish_reply = database_b.finish_reply

    async def owner_wakes_before_the_commit(*args: Any, **kwargs: Any) -> bool:
        let_go.set()
        await emitted.wait()
        return bool(await finish_reply(*args, **kwargs))

    monkeypatch.setattr(database_b, "finish_reply", owner_wakes_before_the_commit)
    tab = await a.connect({"token": token()})
    await tab.send(type="message", id="slow", text="Explain long division step by step")
    ack = await tab.expect("ack")
    try:
        await asyncio.wait_for(held.wait(), 5)
        turn = answers_a._turns[ack["reply_id"]]
        await _expire_lease(a, ack["reply_id"])
        await b.client.app[CHAT].answers.take_over_expired()
    finally:
        let_go.set()

    frames, done = await _until_done_then_quiet(tab, ack["reply_id"])
    text = answer_text(frames, ack["reply_id"])
    row = await _stored(db, ack["reply_id"])
    assert (done["status"], row["status"]) == ("interrupted", "interrupted")
    assert text and row["text"] == text and done["length"] == len(text)
    assert turn.task is not None
    async with asyncio.timeout(10):
        await asyncio.wait([turn.task])
    assert (await _stored(db, ack["reply_id"]))["text"] == text  # A committed nothing over it


async def test_an_answer_whose_commit_the_stop_deadline_cut_gets_its_done_from_the_takeover(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A's answer is committed, but the stop deadline cancels it before its `done` is logged (the
    commit's reply was slow). Its lease runs out; the replica that takes it over finds it already ended
    and must still give the students its `done` (as stored), not leave them waiting for one."""
    a, b = await _two_replicas(serve)
    committed, let_go = _slow_commit(a, monkeypatch)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id="cut", text="Explain how fractions are added")
    ack = await tab1.expect("ack")
    try:
        await asyncio.wait_for(committed.wait(), 5)
        turn = a.client.app[CHAT].answers._turns[ack["reply_id"]]
        assert turn.task is not None
        turn.task.cancel()  # what the stop deadline does to what is still running
        await asyncio.wait([turn.task])
    finally:
        let_go.set()
    _stall(a, monkeypatch)
    await _expire_lease(a, ack["reply_id"])
    await b.client.app[CHAT].answers.take_over_expired()

    frames, done = await _until_done_then_quiet(tab2, ack["reply_id"])
    text = answer_text(frames, ack["reply_id"])
    row = await _stored(db, ack["reply_id"])
    assert done["status"] == row["status"] == "complete"
    assert text and row["text"] == text and done["length"] == len(text)
    assert [f["type"] for f in frames].count("done") == 1


async def test_a_takeover_during_the_owner_s_commit_leaves_one_done(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A commits its answer, slowly; meanwhile its lease runs out and B takes the answer over, finds
    it committed, and sends its `done` (as committed) since none is logged. A's own `done`, coming after,
    is refused: the students get exactly one."""
    a, b = await _two_replicas(serve)
    _stall(a, monkeypatch)
    committed, let_go = _slow_commit(a, monkeypatch)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id="both", text="Explain how fractions are added")
    ack = await tab1.expect("ack")
    try:
        await asyncio.wait_for(committed.wait(), 5)
        turn = a.client.app[CHAT].answers._turns[ack["reply_id"]]
        await _expire_lease(a, ack["reply_id"])
        await b.client.app[CHAT].answers.take_over_expired()
        frames = await tab2.until("done")
    finally:
        let_go.set()
    assert turn.task is not None
    async with asyncio.timeout(10):
        await asyncio.wait([turn.task])
    with pytest.raises(TimeoutError):
        late = await tab2.recv(timeout=0.5)
        pytest.fail(f"a frame after the done: {late}")
    done, text = frames[-1], answer_text(frames, ack["reply_id"])
    row = await _stored(db, ack["reply_id"])
    assert done["status"] == row["status"] == "complete"
    assert text and row["text"] == text and done["length"] == len(text)


@pytest.mark.parametrize("winner", ["resend", "first"])
async def test_a_resend_racing_the_first_ack_starts_the_answer_once(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, winner: str
) -> None:
    """A's commit of a question is followed by its ack and the answer's start; in between, the student's
    socket is cut (here it stays open: it makes no difference), they reconnect to B and resend. B finds the
    question committed and not yet acknowledged: whichever of A and B acknowledges first starts the answer,
    and the other neither starts it nor logs a second ack."""
    a, b = await _two_replicas(serve)
    hub_a, hub_b = a.client.app[CHAT].hub, b.client.app[CHAT].hub

    def hold_acks(hub: Any) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event]:
        """Hold the replica's ack before it is emitted: (held there, let it go, emitted or refused)."""
        at, go, out = asyncio.Event(), asyncio.Event(), asyncio.Event()
        emit = hub.emit

        async def held(conversation_id: str, frames: list[bytes], **kwargs: Any) -> Any:
            if not frames[0].startswith(b'{"type":"ack"') or go.is_set():
                return await emit(conversation_id, frames, **kwargs)
            at.set()
            await go.wait()
            try:
                return await emit(conversation_id, frames, **kwargs)
            finally:
                out.set()

        monkeypatch.setattr(hub, "emit", held)
        return at, go, out

    a_at_ack, a_go, a_out = hold_acks(hub_a)
    b_at_ack, b_go, b_out = hold_acks(hub_b)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    await tab1.send(type="message", id="twice", text="Explain fractions")
    try:
        await asyncio.wait_for(a_at_ack.wait(), 5)  # committed; the ack not yet emitted
        tab2 = await b.connect({"token": token(), "conversation_id": conversation})
        await tab2.send(type="message", id="twice", text="Explain fractions")
        await asyncio.wait_for(b_at_ack.wait(), 5)
        first, first_out = (b_go, b_out) if winner == "resend" else (a_go, a_out)
        first.set()
        await asyncio.wait_for(first_out.wait(), 5)  # its ack logged, its answer under way
    finally:
        a_go.set()
        b_go.set()

    # The tab on B gets the logged ack and, when A's came first, B's copy of it (a resend's reply), in either
    # order with the answer's frames.
    expected_acks = 1 if winner == "resend" else 2
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while _count(frames, "done") < 1 or _count(frames, "ack") < expected_acks:
            frames.append(await tab2.recv())
            assert _count(frames, "done") <= 1, frames
    with pytest.raises(TimeoutError):
        late = await tab2.recv(timeout=0.5)
        pytest.fail(f"a frame after the done and the acks: {late}")
    done = next(f for f in frames if f["type"] == "done")
    assert done["reply_id"] == await _stored_reply(db, conversation)
    acks = [f for f in frames if f["type"] == "ack"]
    assert len(acks) == expected_acks and all(f == acks[0] for f in acks), acks
    text = answer_text(frames, done["reply_id"])
    row = await _stored(db, done["reply_id"])
    assert done["status"] == row["status"] == "complete" and row["text"] == text and done["length"] == len(text)
    snapshot = await b.client.app[REDIS].snapshot(conversation)
    logged = [f for _, f in snapshot.entries if f.startswith(b'{"type":"ack"')]
    assert len(logged) == 1, logged
    assert await db.fetchval("SELECT count(*) FROM messages") == 2


def _count(frames: list[dict[str, Any]], kind: str) -> int:
    return sum(1 for f in frames if f["type"] == kind)


async def _stored_reply(db: asyncpg.Connection, conversation: str) -> int:
    reply_id = await db.fetchval(
        "SELECT id FROM messages WHERE conversation_id = $1 AND role = 'assistant'", conversation
    )
    assert reply_id is not None
    return int(reply_id)


@pytest.mark.parametrize("command", ["delete-user", "purge"])
async def test_the_commands_that_delete_a_conversation_delete_its_answers_takeover_mark(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """B took over the answer of A, which stalled (or died) mid-answer: the answer's owner key says so ("!") for
    an hour, or until A ends the answer, so that A logs none of its frames should it wake up. `delete-user` and
    `purge` delete the conversation, and that mark with it. Should A wake up then, its frames are logged
    again (nothing refuses them any more), and A deletes the conversation's log once its answer ends."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=200, frame_interval_ms=1)
    _stall(a, monkeypatch)
    answers_a = a.client.app[CHAT].answers
    emit_token: Callable[..., Awaitable[None]] = answers_a._emit_token
    stuck, unstuck = asyncio.Event(), asyncio.Event()

    async def stuck_after_two(turn: Any, text: str, offset: int) -> None:
        if offset > 0 and turn.last_seq:
            stuck.set()
            await unstuck.wait()
        await emit_token(turn, text, offset)

    monkeypatch.setattr(answers_a, "_emit_token", stuck_after_two)
    tab = await a.connect({"token": token()})
    conversation = tab.frames[0]["conversation_id"]
    try:
        await tab.send(type="message", id="taken", text="Explain long division step by step")
        reply_id = (await tab.expect("ack"))["reply_id"]
        await asyncio.wait_for(stuck.wait(), 5)
        turn = answers_a._turns[reply_id]
        await _expire_lease(a, reply_id)
        await b.client.app[CHAT].answers.take_over_expired()
        assert (await tab.until("done"))[-1]["status"] == "interrupted"
        store = b.client.app[REDIS]
        owner, text = store.keys.answer_owner(conversation, reply_id), store.keys.answer_text(conversation, reply_id)
        assert await store.client.get(owner) == b"!"

        if command == "delete-user":
            argv: tuple[str, ...] = ("delete-user", "--tenant", "school-a", "--user", "stu-1", "--yes")
        else:  # a retention shorter than an hour: the conversation was last active 10 minutes ago
            await db.execute("UPDATE conversations SET updated_at = now() - interval '10 minutes'")
            await db.execute("UPDATE messages SET created_at = now() - interval '10 minutes'")
            argv = ("purge", "--older-than", "5m")
        assert await _cli(b.settings, *argv) == 0
        assert "deleted" in capsys.readouterr().out
        assert await db.fetchval("SELECT count(*) FROM conversations WHERE id = $1", conversation) == 0
        assert await store.client.exists(owner, text) == 0
    finally:
        unstuck.set()
    assert turn.task is not None
    async with asyncio.timeout(10):
        await asyncio.wait([turn.task])
    assert await store.client.exists(owner, text, store.keys.conversation_log(conversation)) == 0
