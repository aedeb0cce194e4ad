"""Real processes: three replicas behind NGINX over one PostgreSQL and one Redis.

What only a cluster can show: sticky routing, cross-replica fan-out to tabs and teachers, resume on
another replica, a crashed replica's answer taken over through its lease, and a rolling restart under
load that loses nothing a client was told is saved.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import WSMsgType

from tests.conftest import answer_text

from .harness import COURSE, WATCHED_COURSE, Cluster, ClusterSocket, client_address

pytestmark = pytest.mark.cluster

Frame = dict[str, Any]
FINAL = {"complete", "stopped", "interrupted", "failed"}
CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
LEASE_TAKEOVER_S = 10.0
# Reconnecting through NGINX and replaying take a moment on top of the lease's 10 s.
TAKEOVER_SLACK_S = 2.0


# -- helpers ----------------------------------------------------------------------------------------


async def read_until(sock: ClusterSocket, stop: Callable[[Frame], bool], timeout: float = 15.0) -> list[Frame]:
    """Every frame up to and including the first one `stop` accepts."""
    seen: list[Frame] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await sock.recv(timeout)
            seen.append(frame)
            if stop(frame):
                return seen


def done_of(reply_id: int) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == "done" and f.get("reply_id") == reply_id


async def wait_closed(sock: ClusterSocket, timeout: float = 10.0) -> None:
    """Read (and keep) frames until the connection ends."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await sock.ws.receive()
            if msg.type in CLOSED:
                return
            if msg.type == WSMsgType.TEXT:
                sock.frames.append(orjson.loads(msg.data))


def stream(frames: list[Frame], conversation_id: str) -> list[Frame]:
    """The numbered conversation frames (ack, token, done) among `frames`."""
    return [
        f for f in frames
        if f["type"] in ("ack", "token", "done") and f.get("conversation_id") == conversation_id and "seq" in f
    ]


def assert_in_order(frames: list[Frame]) -> None:
    seqs = [f["seq"] for f in frames]
    assert seqs == sorted(set(seqs)), f"seqs repeat or go backwards: {seqs}"


def ack_of(frames: list[Frame], client_id: str) -> Frame:
    acks = [f for f in frames if f["type"] == "ack" and f.get("id") == client_id]
    assert acks, f"no ack for {client_id}: {frames}"
    return acks[0]


async def send_and_ack(sock: ClusterSocket, client_id: str, text: str) -> Frame:
    await sock.send(type="message", id=client_id, text=text)
    frames = await read_until(sock, lambda f: f["type"] == "ack" and f.get("id") == client_id)
    return frames[-1]


async def read_tokens(sock: ClusterSocket, reply_id: int, count: int) -> None:
    """Read until `count` words of the answer have arrived (or the answer ended).

    Words, not frames: the server coalesces the tokens of each frame interval into one frame, so the
    number of frames an answer takes depends on its pace, while the offline tutor's word count does not.
    """
    def enough(frame: Frame) -> bool:
        if done_of(reply_id)(frame):
            return True
        text = "".join(f["text"] for f in sock.frames if f["type"] == "token" and f.get("reply_id") == reply_id)
        return len(text.split()) >= count

    await read_until(sock, enough)


# -- 1. routing ---------------------------------------------------------------------------------------


async def test_nginx_ip_hash_keeps_a_client_address_on_one_replica(cluster: Cluster) -> None:
    same = [await cluster.replica_behind_nginx(client_address(0)) for _ in range(6)]
    assert len(set(same)) == 1, same
    others = {await cluster.replica_behind_nginx(client_address(i)) for i in range(1, 25)}
    assert len(others | set(same)) >= 2, f"24 client addresses all went to {others}"
    assert others <= {r.replica_id for r in cluster.replicas}


async def test_a_page_on_nginx_at_another_host_and_port_opens_a_socket(cluster: Cluster) -> None:
    """Same-origin through NGINX on a non-default port: the app compares Origin with the forwarded Host.

    The origin is not in SMARTEDU_ALLOWED_ORIGINS (the cluster allows only http://127.0.0.1:PORT), so
    only the same-origin rule lets it in, as for a stack opened by its LAN address or on another port.
    """
    own = f"localhost:{cluster.nginx.port}"
    headers = {"Host": own, "Origin": f"http://{own}"}
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(cluster.nginx_url + "/ws", headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5.0))
        as ws,
    ):
        await ws.send_str(orjson.dumps({"type": "hello", "token": cluster.student_token("lan-student")}).decode())
        frame = orjson.loads(await ws.receive_str(timeout=10))
        assert frame["type"] == "welcome", (frame, ws.close_code)


# -- 2. teacher watch across replicas -----------------------------------------------------------------


async def test_teacher_on_another_replica_sees_every_frame_of_a_student_answer(cluster: Cluster) -> None:
    teacher_token = cluster.teacher_token("teacher-watch", [WATCHED_COURSE])
    teacher = await cluster.connect_direct(2, {"token": teacher_token, "course_id": WATCHED_COURSE})
    await teacher.send(type="watch", course_id=WATCHED_COURSE)
    snapshot = (await read_until(teacher, lambda f: f["type"] == "snapshot"))[-1]
    assert snapshot["course_id"] == WATCHED_COURSE and isinstance(snapshot["students"], list)

    student_token = cluster.student_token("stu-watched", name="Watched Student")
    student = await cluster.connect_direct(1, {"token": student_token, "course_id": WATCHED_COURSE})
    welcome = student.frames[0]
    conversation = welcome["conversation_id"]
    ack = await send_and_ack(student, "w-1", "How do I find the area of a triangle?")
    reply_id = ack["reply_id"]
    await read_until(student, done_of(reply_id))

    def teacher_saw_done(event: Frame) -> bool:
        return event["type"] == "event" and event.get("kind") == "frame" and done_of(reply_id)(event["frame"])

    await read_until(teacher, teacher_saw_done)
    events = [f for f in teacher.frames if f["type"] == "event"]
    watched = [
        e for e in events if e.get("kind") == "frame" and e["frame"].get("conversation_id") == conversation
    ]
    seen_by_teacher = [e["frame"] for e in watched]
    # The very frames the student got (ack, every token, done), with the same seqs, in order.
    assert seen_by_teacher == stream(student.frames, conversation)
    assert_in_order(seen_by_teacher)
    text = answer_text(seen_by_teacher, reply_id)
    committed = await cluster.committed_message(student_token, conversation, reply_id)
    assert committed["status"] == "complete" and committed["text"] == text and text
    unlabelled = [e for e in watched if e["course_id"] != WATCHED_COURSE or e.get("conversation_id") != conversation]
    assert not unlabelled, f"events need course_id and conversation_id at the top: {unlabelled[:2]}"

    joined = [
        e for e in events if e.get("kind") == "joined" and e["student"].get("session_id") == welcome["session_id"]
    ]
    assert joined, f"no 'joined' event for the student: {events[:5]}"
    assert joined[0]["student"]["replica"] == "replica-1"
    assert joined[0]["student"]["conversation_id"] == conversation

    # A teacher arriving later on a third replica finds the student in its snapshot.
    late = await cluster.connect_direct(3, {"token": teacher_token, "course_id": WATCHED_COURSE})
    await late.send(type="watch", course_id=WATCHED_COURSE)
    later = (await read_until(late, lambda f: f["type"] == "snapshot"))[-1]
    present = [s for s in later["students"] if s.get("session_id") == welcome["session_id"]]
    assert present, later
    assert present[0]["replica"] == "replica-1" and present[0]["conversation_id"] == conversation
    assert {"user_id", "name"} <= present[0].keys()

    await student.close()

    def left(event: Frame) -> bool:
        return (
            event["type"] == "event"
            and event.get("kind") == "left"
            and event["student"].get("session_id") == welcome["session_id"]
        )

    await read_until(teacher, left, timeout=10)


# -- 3. two tabs on two replicas ----------------------------------------------------------------------


async def test_two_tabs_on_different_replicas_each_get_the_answer_exactly_once(cluster: Cluster) -> None:
    student_token = cluster.student_token("stu-tabs")
    tab1 = await cluster.connect_direct(1, {"token": student_token, "course_id": COURSE})
    conversation = tab1.frames[0]["conversation_id"]
    tab2 = await cluster.connect_direct(2, {"token": student_token, "conversation_id": conversation})
    assert tab2.frames[0]["conversation_id"] == conversation

    ack = await send_and_ack(tab1, "tabs-1", "What is a linear equation?")
    reply_id = ack["reply_id"]
    await read_until(tab1, done_of(reply_id))
    await read_until(tab2, done_of(reply_id))
    # Nothing more is on its way to either tab.
    for tab in (tab1, tab2):
        with pytest.raises(TimeoutError):
            await tab.recv(timeout=0.5)

    first, second = stream(tab1.frames, conversation), stream(tab2.frames, conversation)
    assert_in_order(first)
    assert first == second
    text = answer_text(first, reply_id)
    done = first[-1]
    assert done["type"] == "done" and done["status"] == "complete" and done["length"] == len(text)
    committed = await cluster.committed_message(student_token, conversation, reply_id)
    assert committed["text"] == text


# -- 4. resume on another replica --------------------------------------------------------------------


async def test_resume_on_another_replica_mid_answer_has_no_gap_and_no_duplicate(cluster: Cluster) -> None:
    seed = int(os.environ.get("CLUSTER_SEED") or time.time_ns() % 100_000)
    rng = random.Random(seed)
    student_token = cluster.student_token("stu-resume")
    first = await cluster.connect_direct(1, {"token": student_token, "course_id": COURSE})
    conversation = first.frames[0]["conversation_id"]
    await first.close()

    # Cut right after the ack, then at random tokens; reconnect directly to another replica or via NGINX.
    for round_no, cut in enumerate([0, rng.randint(1, 12), rng.randint(5, 30)]):
        origin = 1 + round_no % 3
        sock = await cluster.connect_direct(origin, {"token": student_token, "conversation_id": conversation})
        ack = await send_and_ack(sock, f"resume-{round_no}", f"Question {round_no}: how do I solve 2x + 3 = 7?")
        reply_id = ack["reply_id"]
        if cut:
            await read_tokens(sock, reply_id, cut)
        before = stream(sock.frames, conversation)
        assert not any(done_of(reply_id)(f) for f in before), f"seed {seed}: the answer ended before cut {cut}"
        last_seq = before[-1]["seq"]
        await sock.close()

        hello = {"token": student_token, "conversation_id": conversation, "resume_from": last_seq}
        if round_no == 2:
            again = await cluster.connect_nginx(hello, source=client_address(30 + round_no))
        else:
            again = await cluster.connect_direct(1 + (origin % 3), hello)
        welcome = again.frames[0]
        assert welcome["resumed"] is True, (seed, welcome)
        await read_until(again, done_of(reply_id))
        after = stream(again.frames, conversation)
        assert all(f["seq"] > last_seq for f in after), (seed, last_seq, after)
        combined = before + after
        assert_in_order(combined)
        text = answer_text(combined, reply_id)
        assert after[-1]["status"] == "complete" and after[-1]["length"] == len(text), (seed, after[-1])
        committed = await cluster.committed_message(student_token, conversation, reply_id)
        assert committed["text"] == text, f"seed {seed}, cut {cut}"


# -- 5. a replica dies mid-answer ---------------------------------------------------------------------


async def test_kill_9_mid_answer_is_taken_over_and_can_be_regenerated(cluster: Cluster) -> None:
    victim = 3
    student_token = cluster.student_token("stu-crash")
    try:
        sock = await cluster.connect_direct(victim, {"token": student_token, "course_id": COURSE})
        conversation = sock.frames[0]["conversation_id"]
        other_tab = await cluster.connect_direct(1, {"token": student_token, "conversation_id": conversation})
        ack = await send_and_ack(sock, "crash-1", "Explain the slope-intercept form, please.")
        reply_id = ack["reply_id"]
        await read_tokens(sock, reply_id, 3)

        killed_at = time.monotonic()
        cluster.replica(victim).kill9()
        await wait_closed(sock)
        last_seq = stream(sock.frames, conversation)[-1]["seq"]
        assert not any(done_of(reply_id)(f) for f in sock.frames)

        hello = {"token": student_token, "conversation_id": conversation, "resume_from": last_seq}
        again = await cluster.connect_nginx(hello, source=client_address(40))
        assert again.frames[0]["resumed"] is True
        done = (await read_until(again, done_of(reply_id), timeout=LEASE_TAKEOVER_S + 5))[-1]
        took = time.monotonic() - killed_at
        assert done["status"] == "interrupted", done
        assert took <= LEASE_TAKEOVER_S + TAKEOVER_SLACK_S, f"interrupted only after {took:.1f} s"
        # The tab on a surviving replica learns it live, without reconnecting.
        tab_done = (await read_until(other_tab, done_of(reply_id), timeout=5))[-1]
        assert tab_done["status"] == "interrupted" and tab_done["seq"] == done["seq"]

        committed = await cluster.committed_message(student_token, conversation, reply_id)
        assert committed["status"] == "interrupted"
        async with cluster.database() as db:
            question = await db.fetchrow(
                "SELECT id, client_id FROM messages WHERE id = $1 AND tenant_id = $2", ack["message_id"], cluster.tenant
            )
        assert question is not None and question["client_id"] == "crash-1"

        await again.send(type="regenerate", reply_id=reply_id)
        regenerated = (await read_until(again, lambda f: f["type"] == "ack" and f.get("regenerated") is True))[-1]
        new_reply = regenerated["reply_id"]
        assert new_reply != reply_id
        await read_until(again, done_of(new_reply))
        answer = [f for f in stream(again.frames, conversation) if f.get("reply_id") == new_reply]
        assert answer[-1]["status"] == "complete"
        text = answer_text(answer, new_reply)
        assert (await cluster.committed_message(student_token, conversation, new_reply))["text"] == text
    finally:
        await cluster.replica(victim).ensure_running()


# -- 6. rolling restart under load --------------------------------------------------------------------

STUDENTS = 50
CLIENT_ADDRESSES = 25
MIN_MESSAGES = 2
MAX_MESSAGES = 8
RETRYABLE = {"ai_unavailable", "internal", "rate_limited"}


@dataclass
class SimulatedStudent:
    """Chats through NGINX, follows `reconnect` and 1012, resumes, and resends unacked messages by id."""

    cluster: Cluster
    index: int
    stop_sending: asyncio.Event
    rng: random.Random
    conversation_id: str | None = None
    last_seq: int = 0
    sent: dict[str, str] = field(default_factory=dict)
    acks: dict[str, Frame] = field(default_factory=dict)
    replies: dict[int, str | None] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    connects: int = 0
    drain_notices: int = 0

    @property
    def user(self) -> str:
        return f"load-{self.index}"

    @property
    def unacked(self) -> list[str]:
        return [cid for cid in self.sent if cid not in self.acks]

    @property
    def open_replies(self) -> list[int]:
        return [r for r, status in self.replies.items() if status is None]

    @property
    def finished(self) -> bool:
        return (
            self.stop_sending.is_set()
            and len(self.sent) >= MIN_MESSAGES
            and not self.unacked
            and not self.open_replies
        )

    async def run(self, deadline: float) -> None:
        token = self.cluster.student_token(self.user)
        source = client_address(100 + self.index % CLIENT_ADDRESSES)
        while not self.finished:
            if time.monotonic() > deadline:
                self.problems.append(f"gave up: {len(self.unacked)} unacked, {len(self.open_replies)} open")
                return
            hello: Frame = {"token": token}
            if self.conversation_id is None:
                hello["course_id"] = COURSE
            else:
                hello.update(conversation_id=self.conversation_id, resume_from=self.last_seq)
            try:
                sock = await self.cluster.connect_nginx(hello, source=source, welcome=False, timeout=10)
            except (aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.sleep(self.rng.uniform(0.2, 0.6))
                continue
            self.connects += 1
            try:
                await self._converse(sock, resuming="resume_from" in hello)
            except (aiohttp.ClientError, OSError, TimeoutError, ConnectionError):
                await asyncio.sleep(self.rng.uniform(0.1, 0.4))
            finally:
                await sock.close()

    async def _converse(self, sock: ClusterSocket, resuming: bool) -> None:
        welcome = await sock.recv(10)
        if welcome["type"] != "welcome":
            await asyncio.sleep(0.5)  # e.g. a replica shutting down under us: try again
            return
        self.conversation_id = welcome["conversation_id"]
        if resuming and welcome.get("resumed") is not True:
            self.problems.append(f"resume from {self.last_seq} refused: {welcome.get('resumed')!r}")
            self._take_history(welcome)
        elif not resuming:
            self.last_seq = welcome["seq"]
        for client_id in self.unacked:
            await sock.send(type="message", id=client_id, text=self.sent[client_id])
        while True:
            if not self.unacked and not self.open_replies:
                if self.finished or len(self.sent) >= MAX_MESSAGES:
                    return
                await asyncio.sleep(self.rng.uniform(0.2, 0.8))
                client_id = f"{self.user}-m{len(self.sent)}"
                self.sent[client_id] = f"Question {len(self.sent)} from {self.user}: what is a variable?"
                await sock.send(type="message", id=client_id, text=self.sent[client_id])
            msg = await sock.ws.receive(timeout=15)
            if msg.type in CLOSED:
                if sock.ws.close_code == 1012:
                    self.drain_notices += 1
                return
            if msg.type != WSMsgType.TEXT:
                continue
            frame: Frame = orjson.loads(msg.data)
            if frame["type"] == "reconnect":
                self.drain_notices += 1
                await asyncio.sleep(min(float(frame.get("after_ms", 0)), 3000.0) / 1000 * self.rng.uniform(0.5, 1.0))
                return
            await self._on_frame(sock, frame)

    async def _on_frame(self, sock: ClusterSocket, frame: Frame) -> None:
        kind = frame["type"]
        if kind == "ack":
            client_id = frame["id"]
            if client_id in self.acks:
                if self.acks[client_id]["message_id"] != frame["message_id"]:
                    self.problems.append(f"{client_id} acked twice with different ids")
                return
            if client_id not in self.sent:
                self.problems.append(f"ack for a message never sent: {client_id}")
                return
            self._advance(frame)
            self.acks[client_id] = frame
            self.replies.setdefault(frame["reply_id"], None)
            self.texts.setdefault(frame["reply_id"], "")
        elif kind == "token":
            self._advance(frame)
            reply_id = frame["reply_id"]
            text = self.texts.get(reply_id)
            if text is None:
                self.problems.append(f"token of reply {reply_id} before its ack")
            elif frame["offset"] != len(text):
                self.problems.append(f"reply {reply_id}: offset {frame['offset']} after {len(text)} code points")
            else:
                self.texts[reply_id] = text + frame["text"]
        elif kind == "done":
            self._advance(frame)
            reply_id = frame["reply_id"]
            self.replies[reply_id] = frame["status"]
            if frame.get("length") != len(self.texts.get(reply_id, "")):
                self.problems.append(f"reply {reply_id}: done.length {frame.get('length')} != streamed text")
        elif kind == "error":
            ref = frame.get("ref")
            if frame.get("code") in RETRYABLE and ref in self.sent and ref not in self.acks:
                await asyncio.sleep(min(float(frame.get("retry_after") or 0.5), 2.0))
                await sock.send(type="message", id=ref, text=self.sent[ref])
            elif frame.get("code") not in RETRYABLE:
                self.problems.append(f"error {frame.get('code')}: {frame.get('message')}")

    def _advance(self, frame: Frame) -> None:
        seq = frame["seq"]
        if seq <= self.last_seq:
            self.problems.append(f"{frame['type']} seq {seq} after {self.last_seq} (duplicate or out of order)")
        self.last_seq = max(self.last_seq, seq)

    def _take_history(self, welcome: Frame) -> None:
        """A refused resume: the welcome's history is the truth for answers it holds."""
        statuses = {m["id"]: m["status"] for m in welcome["history"]}
        for reply_id in self.open_replies:
            if statuses.get(reply_id) in FINAL:
                self.replies[reply_id] = statuses[reply_id]
        self.last_seq = welcome["seq"]


@pytest.mark.timeout(170)
async def test_rolling_restart_under_load_loses_no_acknowledged_message(cluster: Cluster) -> None:
    seed = int(os.environ.get("CLUSTER_SEED") or time.time_ns() % 100_000)
    stop_sending = asyncio.Event()
    students = [
        SimulatedStudent(cluster, i, stop_sending, random.Random(seed * 1000 + i)) for i in range(STUDENTS)
    ]
    deadline = time.monotonic() + 120
    tasks = [asyncio.create_task(s.run(deadline), name=s.user) for s in students]
    exit_codes: dict[str, int | None] = {}
    try:
        await asyncio.sleep(2.0)  # everyone is mid-conversation
        for replica in cluster.replicas:
            exit_codes[replica.replica_id] = await replica.terminate()
            await replica.restart()
        stop_sending.set()
        async with asyncio.timeout(max(5.0, deadline - time.monotonic() + 5)):
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in cluster.replicas:
            await replica.ensure_running()

    statuses = Counter(status for s in students for status in s.replies.values())
    print(
        f"rolling restart (seed {seed}): {sum(len(s.sent) for s in students)} messages, "
        f"{sum(s.connects for s in students)} connections, {sum(s.drain_notices for s in students)} drain "
        f"notices, answers {dict(statuses)}, exit codes {exit_codes}"
    )
    crashed = [(s.user, r) for s, r in zip(students, results, strict=True) if isinstance(r, BaseException)]
    assert not crashed, crashed
    assert exit_codes == {r.replica_id: 0 for r in cluster.replicas}, "SIGTERM must drain and exit 0"
    problems = {s.user: s.problems for s in students if s.problems}
    assert not problems, f"seed {seed}: {problems}"
    assert sum(s.drain_notices for s in students) > 0, "no student was asked to reconnect"

    acked_ids = [a["message_id"] for s in students for a in s.acks.values()]
    conversations = [s.conversation_id for s in students if s.conversation_id]
    async with cluster.database() as db:
        rows = await db.fetch(
            "SELECT id, conversation_id::text AS conversation_id, role, client_id, status, text FROM messages"
            " WHERE tenant_id = $1 AND conversation_id = ANY($2::uuid[])",
            cluster.tenant,
            conversations,
        )
    by_id = {r["id"]: r for r in rows}
    assert not set(acked_ids) - by_id.keys(), "acknowledged messages are missing from PostgreSQL"
    assert not [r["id"] for r in rows if r["status"] == "streaming"], "answers left without a final status"
    for s in students:
        questions = [r["client_id"] for r in rows if r["conversation_id"] == s.conversation_id and r["role"] == "user"]
        assert sorted(questions) == sorted(s.sent), f"{s.user}: rows {questions} for sent {list(s.sent)}"
        for reply_id, status in s.replies.items():
            row = by_id[reply_id]
            assert row["status"] == status, (s.user, reply_id, row["status"], status)
            if status == "complete":
                assert row["text"] == s.texts[reply_id], (s.user, reply_id)
    assert len({(r["conversation_id"], r["client_id"]) for r in rows if r["role"] == "user"}) == sum(
        len(s.sent) for s in students
    )
    # Drain lets answers finish, so most of them complete even though every replica restarted.
    assert statuses["complete"] >= statuses.total() // 2, statuses
