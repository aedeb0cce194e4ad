"""Shared state across replicas, in-process: two apps on one PostgreSQL and one Redis prefix."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from server import hub as hub_module
from server.app import drain
from server.embedded import EmbeddedServices
from server.keys import CHAT, DATABASE, REDIS
from tests.conftest import (
    Serve,
    Server,
    answer_text,
    commit_then_lose_the_reply,
    hold_pubsub_reconnects,
    kill_pubsub_of,
    seed_course,
    token,
)

pytestmark = pytest.mark.integration

TEACHER = {"role": "teacher", "courses": ["alg-1"]}


async def _two_replicas(serve: Serve, **overrides: object) -> tuple[Server, Server]:
    first = await serve(replica_id="replica-a", **overrides)
    second = await serve(replica_id="replica-b", **overrides)
    await seed_course(first.settings, "school-a", "alg-1", "Algebra I", "Equations.")
    return first, second


async def _committed(db: asyncpg.Connection, reply_id: int) -> asyncpg.Record:
    async with asyncio.timeout(10):
        while True:
            row = await db.fetchrow("SELECT text, status FROM messages WHERE id = $1", reply_id)
            if row is not None and row["status"] != "streaming":
                return row
            await asyncio.sleep(0.05)


async def test_tabs_on_two_replicas_each_get_every_frame_once(serve: Serve, db: asyncpg.Connection) -> None:
    a, b = await _two_replicas(serve, offline_tokens_per_s=200)
    tab1 = await a.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(courses=["alg-1"]), "conversation_id": conversation})
    await tab1.send(type="message", id="x1", text="What is a variable?")
    frames1 = await tab1.until("done")
    frames2 = await tab2.until("done")
    assert [f["seq"] for f in frames1] == [f["seq"] for f in frames2]
    assert len({f["seq"] for f in frames2}) == len(frames2)
    reply_id = frames1[0]["reply_id"]
    row = await _committed(db, reply_id)
    assert answer_text(frames2, reply_id) == answer_text(frames1, reply_id) == row["text"]


async def test_resume_on_another_replica_mid_answer(serve: Serve, db: asyncpg.Connection) -> None:
    a, b = await _two_replicas(serve, offline_tokens_per_s=80)
    sock = await a.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    await sock.send(type="message", id="r1", text="Explain long division")
    ack = await sock.expect("ack")
    for _ in range(5):
        await sock.expect("token")
    await sock.close()
    last_seq = max(f["seq"] for f in sock.frames if "seq" in f)

    again = await b.connect({"token": token(), "conversation_id": conversation, "resume_from": last_seq})
    assert again.frames[0]["resumed"] is True
    frames = await again.until("done")
    assert all(f["seq"] > last_seq for f in frames)
    text = answer_text(sock.frames + frames, ack["reply_id"])
    row = await _committed(db, ack["reply_id"])
    assert row["status"] == "complete" and text == row["text"] and frames[-1]["length"] == len(text)


async def test_fresh_hello_mid_answer_catches_up_the_text_so_far(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=80)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="f1", text="Tell me about circles")
    ack = await sock.expect("ack")
    for _ in range(4):
        await sock.expect("token")
    late = await server.connect({"token": token()})
    history = late.frames[0]["history"]
    assert history[-1]["id"] == ack["reply_id"] and history[-1]["status"] == "streaming"
    frames = await late.until("done")
    row = await _committed(db, ack["reply_id"])
    assert answer_text(frames, ack["reply_id"]) == row["text"]


async def test_resume_from_a_seq_the_log_no_longer_holds(serve: Serve) -> None:
    server = await serve(stream_maxlen=3, offline_tokens_per_s=1000, frame_interval_ms=5)
    sock = await server.connect({"token": token()})
    conversation = sock.frames[0]["conversation_id"]
    await sock.send(type="message", id="m1", text="hi")
    await sock.until("done")
    again = await server.connect({"token": token(), "conversation_id": conversation, "resume_from": 1})
    welcome = again.frames[0]
    assert welcome["resumed"] is False and len(welcome["history"]) == 2
    assert welcome["history"][1]["status"] == "complete"
    current = await server.connect({"token": token(), "conversation_id": conversation, "resume_from": welcome["seq"]})
    assert current.frames[0]["resumed"] is True


async def test_teacher_on_another_replica_sees_the_answer_live(serve: Serve, db: asyncpg.Connection) -> None:
    a, b = await _two_replicas(serve, offline_tokens_per_s=200)
    teacher = await b.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    await teacher.send(type="watch", course_id="alg-1")
    snapshot = await teacher.expect("snapshot")
    assert snapshot["students"] == []

    student = await a.connect({"token": token("stu-9", name="Sam", courses=["alg-1"]), "course_id": "alg-1"})
    joined = await teacher.expect("event")
    assert joined["kind"] == "joined" and joined["student"]["user_id"] == "stu-9"
    assert joined["student"]["replica"] == "replica-a" and joined["student"]["name"] == "Sam"
    await student.send(type="message", id="q", text="Is zero even?")
    student_frames = await student.until("done")
    events = await teacher.until("event")
    while events[-1]["frame"]["type"] != "done":
        events += await teacher.until("event")
    seen = [e["frame"] for e in events if e["kind"] == "frame"]
    assert seen == student_frames

    await teacher.send(type="unwatch", course_id="alg-1")
    response = await a.client.get(
        "/api/courses/alg-1/live", headers={"Authorization": f"Bearer {token('teach-1', **TEACHER)}"}  # type: ignore[arg-type]
    )
    live = await response.json()
    assert response.status == 200 and [s["user_id"] for s in live["students"]] == ["stu-9"]
    await student.close()
    async with asyncio.timeout(5):
        while (await (await a.client.get(
            "/api/courses/alg-1/live", headers={"Authorization": f"Bearer {token('teach-1', **TEACHER)}"}  # type: ignore[arg-type]
        )).json())["students"]:
            await asyncio.sleep(0.05)


async def test_teacher_permissions(serve: Serve) -> None:
    a, _ = await _two_replicas(serve)
    await seed_course(a.settings, "school-b", "bio-1", "Biology")
    await seed_course(a.settings, "school-a", "geo-1", "Geometry")
    cases = [
        (token("stu", courses=["alg-1"]), "alg-1", "forbidden"),
        (token("t", role="teacher", courses=["alg-1"]), "geo-1", "forbidden"),
        (token("t", role="teacher", courses=["alg-1"]), "bio-1", "forbidden"),
        (token("t", role="teacher"), "alg-1", "forbidden"),
        (token("adm", role="admin"), "bio-1", "not_found"),
        (token("t", role="teacher", courses=["alg-1", "nope"]), "nope", "not_found"),
    ]
    for who, course, code in cases:
        sock = await a.connect({"token": who})
        await sock.send(type="watch", course_id=course)
        error = await sock.expect("error")
        assert error["code"] == code and error["ref"] == course, (who, course)
    admin = await a.connect({"token": token("adm", role="admin")})
    await admin.send(type="watch", course_id="geo-1")
    assert (await admin.expect("snapshot"))["course_id"] == "geo-1"
    response = await a.client.get("/api/courses/alg-1/live", headers={"Authorization": f"Bearer {token('stu')}"})
    assert response.status == 403


async def test_teacher_intervenes_and_pauses_the_ai(serve: Serve, db: asyncpg.Connection) -> None:
    a, b = await _two_replicas(serve)
    student = await a.connect({"token": token(courses=["alg-1"]), "course_id": "alg-1"})
    conversation = student.frames[0]["conversation_id"]
    teacher = await b.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]

    await teacher.send(
        type="intervene", conversation_id=conversation, text="Remember the order of operations!", id="t1"
    )
    note = await student.expect("teacher_message")
    assert note["text"] == "Remember the order of operations!" and note["conversation_id"] == conversation

    await teacher.send(type="ai", conversation_id=conversation, paused=True)
    assert (await student.expect("ai_state"))["paused"] is True
    await student.send(type="message", id="p1", text="What is 2 + 3 * 4?")
    ack = await student.expect("ack")
    assert ack["reply_id"] is None
    await student.send(type="ping")
    await student.expect("pong")  # no answer while paused

    await teacher.send(type="ai", conversation_id=conversation, paused=False)
    assert (await student.expect("ai_state"))["paused"] is False
    frames = await student.until("done")
    reply_id = frames[-1]["reply_id"]
    assert (await _committed(db, reply_id))["status"] == "complete"
    roles = [r["role"] for r in await db.fetch(
        "SELECT role FROM messages WHERE conversation_id = $1 ORDER BY id", conversation
    )]
    assert roles == ["teacher", "user", "assistant"]

    # A student cannot do teacher things, and a teacher cannot reach another course's conversation.
    await student.send(type="intervene", conversation_id=conversation, text="hi")
    assert (await student.expect("error"))["code"] == "forbidden"
    other = await a.connect({"token": token("stu-2")})
    await teacher.send(type="ai", conversation_id=other.frames[0]["conversation_id"], paused=True)
    assert (await teacher.expect("error"))["code"] == "not_found"


async def test_snapshots_say_whether_the_ai_is_paused_now(serve: Serve) -> None:
    a, b = await _two_replicas(serve)
    await seed_course(a.settings, "school-b", "alg-1", "Algebra I (school B)")
    sam = await a.connect({"token": token("stu-1", name="Sam", courses=["alg-1"]), "course_id": "alg-1"})
    ada = await a.connect({"token": token("stu-2", name="Ada", courses=["alg-1"]), "course_id": "alg-1"})
    other = await a.connect({"token": token("stu-1", tenant="school-b", courses=["alg-1"]), "course_id": "alg-1"})
    paused = sam.frames[0]["conversation_id"]
    teacher = await b.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    # Paused after Sam joined: his presence still says what it was then, the snapshot says what it is now.
    await teacher.send(type="ai", conversation_id=paused, paused=True)
    assert (await sam.expect("ai_state"))["paused"] is True
    await teacher.send(type="watch", course_id="alg-1")
    snapshot = await teacher.expect("snapshot")
    by_user = {s["user_id"]: s for s in snapshot["students"]}
    assert {u: (s["conversation_id"], s["ai_paused"]) for u, s in by_user.items()} == {
        "stu-1": (paused, True),
        "stu-2": (ada.frames[0]["conversation_id"], False),
    }
    live = await (await a.client.get(
        "/api/courses/alg-1/live", headers={"Authorization": f"Bearer {token('teach-1', **TEACHER)}"}  # type: ignore[arg-type]
    )).json()
    assert {s["user_id"]: s["ai_paused"] for s in live["students"]} == {"stu-1": True, "stu-2": False}
    # A `joined` event carries it as read at `hello`.
    again = await a.connect({"token": token("stu-1", name="Sam", courses=["alg-1"]), "conversation_id": paused})
    joined = await teacher.expect("event")
    assert joined["kind"] == "joined" and joined["student"]["session_id"] == again.frames[0]["session_id"]
    assert joined["student"]["ai_paused"] is True
    # The other school's course of the same id, with the same user id, is not in it.
    assert other.frames[0]["conversation_id"] not in {s["conversation_id"] for s in snapshot["students"]}


async def test_abandoned_answer_is_taken_over_and_can_be_regenerated(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=50)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="k1", text="A question for a replica that will die")
    ack = await sock.expect("ack")
    await sock.expect("token")
    # Simulate the owner dying: its turn vanishes without committing, and its lease runs out.
    chat = server.client.app[CHAT]
    turn = chat.answers._turns.pop(ack["reply_id"])
    assert turn.stream_task is not None and turn.task is not None
    turn.task.cancel()  # cancelling the bare task would commit; detach it first
    store = server.client.app[REDIS]
    member = orjson.dumps(["school-a", turn.user_id, turn.conversation_id, turn.reply_id, None]).decode()
    turn.finished = True
    await store.client.zadd(store.keys.leases(), {member: int(time.time() * 1000) - 1})
    started = time.monotonic()
    frames = await sock.until("done")
    done = frames[-1]
    assert done["status"] in ("interrupted",) and time.monotonic() - started < 10
    row = await _committed(db, ack["reply_id"])
    assert row["status"] == "interrupted"

    await sock.send(type="regenerate", reply_id=ack["reply_id"])
    again = await sock.expect("ack")
    assert again["regenerated"] is True and again["reply_id"] != ack["reply_id"] and again["id"] == "k1"
    frames = await sock.until("done")
    assert frames[-1]["status"] == "complete"
    await sock.send(type="regenerate", reply_id=again["reply_id"])
    assert (await sock.expect("error"))["code"] == "bad_request"


async def test_drain_tells_clients_to_reconnect_and_refuses_new_sockets(serve: Serve, db: asyncpg.Connection) -> None:
    server = await serve(offline_tokens_per_s=100)
    sock = await server.connect({"token": token()})
    await sock.send(type="message", id="d1", text="Finish me before you go")
    ack = await sock.expect("ack")
    await drain(server.client.app, 5.0)
    frames = sock.frames + await sock.until("done")
    assert any(f["type"] == "reconnect" and 0 < f["after_ms"] <= 3000 for f in frames)
    assert (await _committed(db, ack["reply_id"]))["status"] == "complete"
    response = await server.client.get("/ready")
    assert response.status == 503 and (await response.json())["status"] == "draining"
    response = await server.client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                                                       "Sec-WebSocket-Version": "13"})
    assert response.status == 503
    await sock.send(type="message", id="d2", text="too late")
    assert (await sock.expect("error"))["code"] == "ai_unavailable"


async def test_cancel_reaches_the_replica_that_generates(serve: Serve, db: asyncpg.Connection) -> None:
    a, b = await _two_replicas(serve, offline_tokens_per_s=30)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id="c1", text="Long answer")
    ack = await tab1.expect("ack")
    await tab2.until("token")
    await tab2.send(type="cancel", reply_id=ack["reply_id"])
    frames = await tab2.until("done")
    assert frames[-1]["status"] == "stopped"
    assert (await _committed(db, ack["reply_id"]))["status"] == "stopped"


async def test_pubsub_reconnect_fills_the_gap_from_the_log(
    serve: Serve, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.hub")
    a, b = await _two_replicas(serve, offline_tokens_per_s=100)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab1.send(type="message", id="g1", text="Keep talking while Redis hiccups")
    ack = await tab1.expect("ack")
    await tab2.until("token")
    # Drop both replicas' pub/sub connections: frames published until the listeners are back are not pushed.
    await kill_pubsub_of(a)
    await kill_pubsub_of(b)
    await tab2.until("done")
    frames2 = tab2.frames  # every frame the tab received, the welcome included
    seqs = [f["seq"] for f in frames2[1:] if f.get("conversation_id") == conversation]
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    row = await _committed(db, ack["reply_id"])
    assert answer_text(frames2, ack["reply_id"]) == row["text"]
    assert any(r.getMessage() == "recovered frames after a pub/sub reconnect" for r in caplog.records)


class _Tab:
    """A socket as the hub sees it, keeping what it is sent."""

    def __init__(self, peer_id: str) -> None:
        self.id = peer_id
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> bool:
        self.sent.append(data)
        return True


async def _a_tab_whose_hold_failed(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> tuple[Server, Server, str, _Tab]:
    """Two replicas, a student's conversation on the first, and a tab on the second that stays a member of
    it although its hold failed (a Redis hiccup): the second replica does not hold the conversation."""
    a, b = await _two_replicas(serve)
    hub_b = b.client.app[CHAT].hub
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    store = b.client.app[REDIS]
    hold = store.hold

    async def hold_failing(conversation_ids: Sequence[str], node: str) -> list[int]:
        raise RedisConnectionError("Connection closed by server.")

    monkeypatch.setattr(store, "hold", hold_failing)
    tab2 = _Tab("tab-2")
    with pytest.raises(RedisConnectionError):
        await hub_b.join(conversation, tab2)
    assert hub_b.members(conversation) == 1 and conversation not in hub_b._held
    monkeypatch.setattr(store, "hold", hold)
    return a, b, conversation, tab2


async def test_a_socket_whose_hold_failed_is_held_by_the_next_recovery(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket stays a member of a conversation whose hold failed (Redis hiccup). The recovery after a
    pub/sub reconnect holds every member's conversation again, and from then on this replica takes the
    other replicas' frames of it instead of dropping them as a conversation it does not hold."""
    a, b, conversation, tab2 = await _a_tab_whose_hold_failed(serve, monkeypatch)
    hub_a, hub_b, store = a.client.app[CHAT].hub, b.client.app[CHAT].hub, b.client.app[REDIS]
    await kill_pubsub_of(b)
    nodes = store.keys.conversation_nodes(conversation)
    async with asyncio.timeout(10):
        while hub_b.node.encode() not in await store.client.smembers(nodes):
            await asyncio.sleep(0.02)
    [(seq, _)] = await hub_a.emit(conversation, [b'{"type":"note"}'])
    async with asyncio.timeout(5):
        while not tab2.sent:
            await asyncio.sleep(0.02)
    assert tab2.sent == [b'{"type":"note","seq":%d}' % seq]


async def test_a_frame_published_between_the_recoverys_hold_and_its_log_read_is_delivered_once(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same socket, with another replica's frame landing after the recovery held the conversation and
    before it read the log. Before: the recovery took the log's last seq as already delivered (the socket's
    failed hold had left it none), so it delivered nothing from the log and dropped the published copy as a
    duplicate: the frame never reached the socket (1 run in a few of the test above)."""
    a, b, conversation, tab2 = await _a_tab_whose_hold_failed(serve, monkeypatch)
    hub_a, store = a.client.app[CHAT].hub, b.client.app[REDIS]
    snapshot = store.snapshot
    emitted: list[int] = []

    async def snapshot_after_a_frame(conversation_id: str) -> Any:
        if conversation_id == conversation and not emitted:
            [(seq, _)] = await hub_a.emit(conversation, [b'{"type":"note"}'])
            emitted.append(seq)
        return await snapshot(conversation_id)

    monkeypatch.setattr(store, "snapshot", snapshot_after_a_frame)
    await kill_pubsub_of(b)
    async with asyncio.timeout(10):
        while not tab2.sent:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)  # the published copy, had it been delivered too, would be here by now
    assert tab2.sent == [b'{"type":"note","seq":%d}' % emitted[0]]


async def test_a_recovery_that_fails_after_a_pubsub_reconnect_is_tried_again(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis answers the resubscription but not yet the recovery's commands (still loading after a restart,
    a stale pooled connection): the listener reconnects and recovers again, so the tab still gets every
    frame published while it was not listening."""
    caplog.set_level(logging.INFO, logger="server.hub")
    a, b = await _two_replicas(serve, offline_tokens_per_s=100)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    store = b.client.app[REDIS]
    hold = store.hold
    failures = []

    async def hold_failing_once(conversation_ids: Sequence[str], node: str) -> list[int]:
        if not failures:
            failures.append(node)
            raise RedisConnectionError("LOADING Redis is loading the dataset in memory")
        return await hold(conversation_ids, node)

    await tab1.send(type="message", id="g2", text="Keep talking while Redis restarts")
    ack = await tab1.expect("ack")
    await tab2.until("token")
    monkeypatch.setattr(store, "hold", hold_failing_once)
    await kill_pubsub_of(b)
    await tab2.until("done")
    assert failures
    seqs = [f["seq"] for f in tab2.frames[1:] if f.get("conversation_id") == conversation]
    assert len(seqs) == len(set(seqs)) and seqs == sorted(seqs)
    row = await _committed(db, ack["reply_id"])
    assert answer_text(tab2.frames, ack["reply_id"]) == row["text"]
    assert any(r.getMessage() == "recovered frames after a pub/sub reconnect" for r in caplog.records)


async def test_teachers_resync_after_a_pubsub_reconnect(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Course events published while a replica's pub/sub connection is down are lost for its watching
    teachers (pub/sub keeps nothing); once it is back, each gets `resync` for the course, and reading the
    course again (watch, the transcript over HTTP) shows what happened meanwhile."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=500)
    teacher_token = token("teach-1", **TEACHER)  # type: ignore[arg-type]
    teacher = await b.connect({"token": teacher_token})
    await teacher.send(type="watch", course_id="alg-1")
    assert (await teacher.expect("snapshot"))["students"] == []
    student = await a.connect({"token": token("stu-9", courses=["alg-1"]), "course_id": "alg-1"})
    assert (await teacher.expect("event"))["kind"] == "joined"
    conversation = student.frames[0]["conversation_id"]

    reconnecting, let_go = hold_pubsub_reconnects(b, monkeypatch)
    await kill_pubsub_of(b)
    async with asyncio.timeout(5):
        await reconnecting.wait()
    # Meanwhile on replica a: another student arrives, the first asks and is answered.
    late = await a.connect({"token": token("stu-8", courses=["alg-1"]), "course_id": "alg-1"})
    await student.send(type="message", id="q1", text="What is a prime?")
    ack = await student.expect("ack")
    await student.until("done")
    await _committed(db, ack["reply_id"])
    let_go.set()

    frames = await teacher.until("resync")
    assert frames == [{"type": "resync", "course_id": "alg-1"}]  # nothing of the gap came through
    await teacher.send(type="watch", course_id="alg-1")
    snapshot = await teacher.expect("snapshot")
    assert {s["user_id"] for s in snapshot["students"]} == {"stu-9", "stu-8"}
    response = await b.client.get(
        f"/api/teacher/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {teacher_token}"}
    )
    assert response.status == 200
    messages = (await response.json())["messages"]
    assert [(m["id"], m["status"]) for m in messages] == [
        (ack["message_id"], "complete"), (ack["reply_id"], "complete")
    ]
    # Live again: what happens from now on arrives as events, once.
    await late.close()
    left = await teacher.expect("event")
    assert left["kind"] == "left" and left["student"]["user_id"] == "stu-8"


async def test_a_watch_whose_subscription_is_confirmed_late_is_followed_by_a_resync(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch waits a while for Redis to confirm the course channel, then sends its snapshot anyway: a
    student who joins on another replica before the subscription is in place is missed, so when the
    confirmation comes the teacher is told to read the course again."""
    monkeypatch.setattr(hub_module, "SUBSCRIBE_CONFIRM_S", 0.2)
    a, b = await _two_replicas(serve)
    pubsub = b.client.app[CHAT].hub._pubsub
    assert pubsub is not None
    subscribe, pending = pubsub.subscribe, []

    async def slow_subscribe(*channels: str) -> None:  # Redis is slow to take the course's channel
        async def later() -> None:
            await arrived.wait()
            await subscribe(*channels)

        pending.append(asyncio.create_task(later()))

    arrived = asyncio.Event()
    monkeypatch.setattr(pubsub, "subscribe", slow_subscribe)
    teacher = await b.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    await teacher.send(type="watch", course_id="alg-1")
    assert (await teacher.expect("snapshot"))["students"] == []  # sent once the wait for confirmation ran out
    await a.connect({"token": token("stu-9", courses=["alg-1"]), "course_id": "alg-1"})  # missed by b
    arrived.set()
    assert await teacher.until("resync") == [{"type": "resync", "course_id": "alg-1"}]
    await teacher.send(type="watch", course_id="alg-1")
    assert [s["user_id"] for s in (await teacher.expect("snapshot"))["students"]] == ["stu-9"]
    await asyncio.gather(*pending)


async def test_a_tab_whose_pubsub_gap_the_log_no_longer_holds_is_told_to_resume(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More frames were published while the replica's pub/sub connection was down than the capped log
    keeps: instead of a gap, the tab gets `reconnect`, and its resume's welcome has the whole answer."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=1000, frame_interval_ms=5, stream_maxlen=3)
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    reconnecting, let_go = hold_pubsub_reconnects(b, monkeypatch)
    await kill_pubsub_of(b)
    async with asyncio.timeout(5):
        await reconnecting.wait()
    await tab1.send(type="message", id="m1", text="Tell me a long story")
    ack = await tab1.expect("ack")
    assert len(await tab1.until("done")) > 3
    row = await _committed(db, ack["reply_id"])
    let_go.set()

    assert await tab2.until("reconnect") == [{"type": "reconnect", "after_ms": 0}]
    again = await b.connect({"token": token(), "conversation_id": conversation, "resume_from": tab2.frames[0]["seq"]})
    welcome = again.frames[0]
    assert welcome["resumed"] is False
    assert [(m["id"], m["text"]) for m in welcome["history"]][-1] == (ack["reply_id"], row["text"])


async def test_frames_are_published_only_to_the_other_replicas_holding_the_conversation(serve: Serve) -> None:
    a, b = await _two_replicas(serve, offline_tokens_per_s=0, offline_ttft_ms=0)
    store = a.client.app[REDIS]
    hub_a, hub_b = a.client.app[CHAT].hub, b.client.app[CHAT].hub
    listener = store.client.pubsub()
    await listener.subscribe(store.keys.node_channel(hub_a.node), store.keys.node_channel(hub_b.node))

    async def published() -> list[tuple[str, bytes]]:
        """Everything published on the two node channels until they have been quiet for 0.3 s."""
        out = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.3:
            message = await listener.get_message(timeout=0.1)
            if message is not None and message["type"] == "message":
                out.append((message["channel"].decode(), message["data"]))
                quiet_since = time.monotonic()
        return out

    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    nodes = store.keys.conversation_nodes(conversation)
    assert await store.client.smembers(nodes) == {hub_a.node.encode()}
    await tab1.send(type="message", id="n1", text="Only replica A holds this")
    await tab1.until("done")
    assert await published() == []  # the emitter delivers to its own sockets; nothing goes back to it

    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    assert await store.client.smembers(nodes) == {hub_a.node.encode(), hub_b.node.encode()}
    await tab1.send(type="message", id="n2", text="Now B holds it too")
    frames = await tab1.until("done")
    await tab2.until("done")
    messages = await published()
    assert {channel for channel, _ in messages} == {store.keys.node_channel(hub_b.node)}
    assert [int(data.split(b" ", 2)[1]) for _, data in messages] == [f["seq"] for f in frames]
    assert all(data.startswith(conversation.encode() + b" ") for _, data in messages)

    await tab2.close()
    async with asyncio.timeout(5):
        while hub_b.members(conversation):
            await asyncio.sleep(0.02)
    await hub_b.prune()
    assert await store.client.smembers(nodes) == {hub_a.node.encode()}
    await listener.aclose()


async def test_after_redis_lost_a_counter_each_replica_numbers_above_what_its_sockets_saw(serve: Serve) -> None:
    """Redis restarts and loses a conversation's counter. The first replica to emit again knows only an
    older seq (its floor); another, whose tab saw later frames, must not number its next frames below
    those: its floor counts too, not just the first one's."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=0, offline_ttft_ms=0)
    hub_a, hub_b = a.client.app[CHAT].hub, b.client.app[CHAT].hub
    tab = await a.connect({"token": token()})
    conversation = tab.frames[0]["conversation_id"]
    await tab.send(type="message", id="f1", text="First")
    await tab.until("done")
    known_to_b = max(f["seq"] for f in tab.frames if "seq" in f)
    await tab.send(type="message", id="f2", text="Second")
    await tab.until("done")
    seen_by_tab = max(f["seq"] for f in tab.frames if "seq" in f)
    assert hub_a.last_seq(conversation) == seen_by_tab > known_to_b
    store = a.client.app[REDIS]
    await store.client.delete(store.keys.conversation_seq(conversation))  # what a Redis restart does
    note = b'{"type":"note","conversation_id":"%b"}' % conversation.encode()
    await hub_b.emit(conversation, [note], floor=known_to_b)  # B has no socket here: it knows no more
    [(then, _)] = await hub_a.emit(conversation, [note])
    assert then > seen_by_tab
    [(after, _)] = await hub_b.emit(conversation, [note], floor=known_to_b)
    assert after == then + 1


async def test_a_replica_that_shuts_down_leaves_the_nodes_sets(serve: Serve) -> None:
    """Stopping a replica (a rolling restart) takes its node id out of the conversations it held, so the
    others stop publishing each frame to a channel nobody listens to."""
    a, b = await _two_replicas(serve)
    store = a.client.app[REDIS]
    hub_a, hub_b = a.client.app[CHAT].hub, b.client.app[CHAT].hub
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    await b.connect({"token": token(), "conversation_id": conversation})
    nodes = store.keys.conversation_nodes(conversation)
    assert await store.client.smembers(nodes) == {hub_a.node.encode(), hub_b.node.encode()}
    await b.client.close()
    assert await store.client.smembers(nodes) == {hub_a.node.encode()}


async def test_frames_of_a_released_conversation_leave_no_state_behind(serve: Serve) -> None:
    """A frame published just before the release (SREM) reaches the node after `prune` forgot the
    conversation: it must not bring back per-conversation entries that nothing would ever remove again."""
    a, b = await _two_replicas(serve)
    hub_b = b.client.app[CHAT].hub
    tab1 = await a.connect({"token": token()})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await b.connect({"token": token(), "conversation_id": conversation})
    await tab2.close()
    async with asyncio.timeout(5):
        while hub_b.members(conversation):
            await asyncio.sleep(0.02)
    await hub_b.prune()
    assert conversation not in hub_b._remote_seq and conversation not in hub_b._seen
    store = b.client.app[REDIS]
    late = orjson.dumps({"type": "token", "reply_id": 1, "conversation_id": conversation, "text": "x", "seq": 999})
    await store.client.publish(store.keys.node_channel(hub_b.node), b"%b 999 %b" % (conversation.encode(), late))
    markers: list[dict[str, object]] = []
    hub_b.on_control = markers.append
    await store.publish_control({"marker": 1})  # the same connection delivers it after the frame
    async with asyncio.timeout(5):
        while not markers:
            await asyncio.sleep(0.02)
    assert conversation not in hub_b._remote_seq and conversation not in hub_b._seen


async def test_a_crowd_leaving_at_once_is_seen_by_the_teacher(serve: Serve) -> None:
    a, b = await _two_replicas(serve)
    teacher = await b.connect({"token": token("teach-1", **TEACHER)})  # type: ignore[arg-type]
    await teacher.send(type="watch", course_id="alg-1")
    await teacher.expect("snapshot")
    students = [
        await a.connect({"token": token(f"stu-{i}", courses=["alg-1"]), "course_id": "alg-1"}) for i in range(12)
    ]
    for _ in students:
        assert (await teacher.expect("event"))["kind"] == "joined"
    await asyncio.gather(*(s.close() for s in students))  # their departures share round trips
    left = {(await teacher.expect("event"))["student"]["user_id"] for _ in students}
    assert left == {f"stu-{i}" for i in range(12)}
    response = await a.client.get(
        "/api/courses/alg-1/live", headers={"Authorization": f"Bearer {token('teach-1', **TEACHER)}"}  # type: ignore[arg-type]
    )
    assert (await response.json())["students"] == []


async def test_answers_committed_but_never_started_end_interrupted(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two questions committed together whose reply was lost are each retried alone, find their client id
    taken and come back as resends: nothing starts their answers, which hold no lease. The sweep gives them
    an expired one, and the takeover ends them (`done`, interrupted: the student can regenerate); an answer
    being generated on another replica, under its lease, is left alone."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=40)
    students = [await a.connect({"token": token(f"stu-{n}")}) for n in (1, 2)]
    busy = await b.connect({"token": token("stu-3")})
    await busy.send(type="message", id="b1", text="Explain long division")
    await busy.expect("ack")
    database = a.client.app[DATABASE]
    monkeypatch.setattr(database, "_insert_questions", commit_then_lose_the_reply(database._insert_questions))
    saved = await asyncio.gather(*(
        database.save_question("school-a", s.frames[0]["conversation_id"], "q1", "Why?", s.frames[0]["user"]["id"])
        for s in students
    ))
    assert all(not s.created and s.reply is not None and s.reply.status == "streaming" for s in saved)

    await a.client.app[CHAT].answers.end_unstarted(older_than_s=0)
    for student, question in zip(students, saved, strict=True):
        done = (await student.until("done"))[-1]
        assert question.reply is not None and (done["reply_id"], done["status"]) == (question.reply.id, "interrupted")
    assert (await busy.until("done"))[-1]["status"] == "complete"


async def test_a_takeover_that_fails_is_retried_and_spares_the_other_answers(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The takeover claims a batch of expired leases at once: PostgreSQL failing for the first one must not
    drop the rest (their leases are gone, so no replica would end them), and the failed one is tried again."""
    server = await serve()
    students = [await server.connect({"token": token(f"stu-{n}")}) for n in (1, 2)]
    database = server.client.app[DATABASE]
    monkeypatch.setattr(database, "_insert_questions", commit_then_lose_the_reply(database._insert_questions))
    saved = await asyncio.gather(*(
        database.save_question("school-a", s.frames[0]["conversation_id"], "q1", "Why?", s.frames[0]["user"]["id"])
        for s in students
    ))
    finish_reply = database.finish_reply
    failures: list[int] = []

    async def failing_once(*args: Any, **kwargs: Any) -> bool:
        if not failures:
            failures.append(args[3])
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return await finish_reply(*args, **kwargs)

    monkeypatch.setattr(database, "finish_reply", failing_once)
    await server.client.app[CHAT].answers.end_unstarted(older_than_s=0)
    for student, question in zip(students, saved, strict=True):
        async with asyncio.timeout(10):
            done = (await student.until("done"))[-1]
        assert question.reply is not None and (done["reply_id"], done["status"]) == (question.reply.id, "interrupted")
    assert len(failures) == 1


async def test_a_slow_replica_whose_answer_was_taken_over_stops_generating_it(
    serve: Serve, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A stalls past its lease, so B ends A's answer as interrupted; when A comes back it must stop
    generating that answer (no tokens after the `done`, no tokens spent on it), not stream it to the end."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=20)
    answers_a = a.client.app[CHAT].answers

    async def stalled() -> None:
        return None

    monkeypatch.setattr(answers_a, "renew_leases", stalled)
    monkeypatch.setattr(answers_a, "take_over_expired", stalled)
    sock = await a.connect({"token": token()})
    await sock.send(type="message", id="s1", text="Explain long division step by step")
    ack = await sock.expect("ack")
    await sock.expect("token")
    turn = answers_a._turns[ack["reply_id"]]
    store = a.client.app[REDIS]
    member = orjson.dumps(["school-a", turn.user_id, turn.conversation_id, turn.reply_id, None]).decode()
    await store.client.zadd(store.keys.leases(), {member: int(time.time() * 1000) - 1})  # A missed its renewals
    await b.client.app[CHAT].answers.take_over_expired()  # (or B's maintenance loop, within a second)
    frames = await sock.until("done")
    assert frames[-1]["status"] == "interrupted"
    assert turn.task is not None
    async with asyncio.timeout(30):
        await asyncio.wait([turn.task])
    assert turn.stop_reason is not None  # stopped, not generated to its end
    row = await _committed(db, ack["reply_id"])
    assert row["status"] == "interrupted" and answer_text(sock.frames, ack["reply_id"]).startswith(row["text"])
    assert await store.client.zscore(store.keys.leases(), member) is None


async def test_the_first_message_after_a_redis_restart_is_answered(serve: Serve) -> None:
    """Redis restarts while no answer streams. The replica's own admit and emit connections (outside the
    pool, whose checkouts notice a closed connection) were closed by the old server: the next message
    must still be admitted, acknowledged and answered, not fail on the dead connections."""
    redis = EmbeddedServices(Path(tempfile.mkdtemp(prefix="w2c-")))
    redis.start(postgres=False, redis=True)
    try:
        server = await serve(redis_url=redis.redis_url)
        sock = await server.connect({"token": token()})
        await sock.send(type="message", id="b1", text="Before the restart")
        assert (await sock.until("done"))[-1]["status"] == "complete"
        redis.stop()
        redis.start(postgres=False, redis=True)
        await sock.send(type="message", id="a1", text="After the restart")
        frames = await sock.until("done")
        assert [f for f in frames if f["type"] == "error"] == [] and frames[-1]["status"] == "complete"
    finally:
        redis.stop()
        shutil.rmtree(redis.data_dir, ignore_errors=True)


async def test_a_long_takeover_batch_does_not_let_the_replicas_own_leases_expire(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B takes over many answers of a dead replica while PostgreSQL is slow: the batch lasts longer than a
    lease. B's own answer, streaming all the while, must keep its lease, else A ends it as interrupted."""
    a, b = await _two_replicas(serve, offline_tokens_per_s=5)
    answers_a, answers_b = a.client.app[CHAT].answers, b.client.app[CHAT].answers
    take_over_a = answers_a.take_over_expired

    async def idle() -> None:
        return None

    monkeypatch.setattr(answers_a, "take_over_expired", idle)  # until B has claimed the dead replica's
    sock = await b.connect({"token": token()})
    await sock.send(type="message", id="l1", text="Explain long division")
    await sock.expect("ack")
    store = b.client.app[REDIS]
    dead = {orjson.dumps(["school-a", "u-dead", str(uuid.uuid4()), 10_000 + n, None]).decode(): 1 for n in range(16)}
    database = b.client.app[DATABASE]
    finish_reply = database.finish_reply

    async def slow_finish_reply(*args: Any, **kwargs: Any) -> bool:
        if args[1] == "u-dead":
            await asyncio.sleep(0.5)
        return await finish_reply(*args, **kwargs)

    monkeypatch.setattr(database, "finish_reply", slow_finish_reply)
    await store.client.zadd(store.keys.leases(), dead)
    async with asyncio.timeout(10):
        while await store.client.zscore(store.keys.leases(), next(iter(dead))) is not None:
            await asyncio.sleep(0.05)
    monkeypatch.setattr(answers_a, "take_over_expired", take_over_a)
    assert answers_b.active == 1
    frames = await sock.until("done", timeout=40)
    assert frames[-1]["status"] == "complete"
