"""The chat page in real headless Chromium against a running app (the `serve` fixture's live server).

Chromium comes from the system (SMARTEDU_CHROMIUM, else `chromium` on PATH); Playwright never downloads
a browser here. Without one the tests skip, or fail when CI=true.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from server.answers import SAFETY_MESSAGE
from tests.conftest import Serve, Server, seed_course, token
from tests.e2e.helpers import ANSWER_WAIT_MS, Problems, Send, new_page, scripted_server, streamed_markdown
from tests.e2e.test_accessibility import _audit, _context
from tests.fakes.fake_gemini import start_fake_gemini

pytestmark = pytest.mark.e2e

with contextlib.suppress(ImportError):  # without playwright, the `browser` fixture skips (or fails in CI)
    from playwright.async_api import Browser, Page, WebSocketRoute

TENANT = "school-a"
COURSE = "algebra-1"
RENDERED_TEXT = (
    "t => { const d = document.createElement('div'); d.appendChild(SmartEdu.renderMarkdown(t)); return d.textContent }"
)


async def _open_page(browser: Browser) -> tuple[Page, list[str]]:
    page = await browser.new_page(viewport={"width": 900, "height": 700})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("dialog", lambda dialog: problems.append(f"dialog: {dialog.message}"))
    return page, problems


async def _live(serve: Serve, **overrides: Any) -> tuple[Server, str]:
    server = await serve(**overrides)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I", "Linear equations and **graphs**.")
    jwt = token("stu-e2e", tenant=TENANT, name="Ada")
    url = str(server.client.make_url("/chat")) + f"#course={COURSE}&token={jwt}"
    return server, url


async def _committed(server: Server, page: Page) -> list[dict[str, Any]]:
    conversation = await page.evaluate("SmartEdu.client.conversationId")
    jwt = token("stu-e2e", tenant=TENANT, name="Ada")
    response = await server.client.get(
        f"/api/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {jwt}"}
    )
    assert response.status == 200
    body = await response.json()
    messages: list[dict[str, Any]] = body["messages"]
    return messages


async def _open_scripted(page: Page, url: str, script: Callable[[WebSocketRoute], None]) -> None:
    """Open the chat page with `script` (a `scripted_server`) playing the server, until it is online."""
    await page.route_web_socket(re.compile(r"/ws$"), script)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')


async def _announced(page: Page, prefix: str) -> str:
    """The live region's text once it starts with `prefix`: it is emptied, then filled 60 ms later (so that
    a repeated text is announced again), and reading it at once can catch it empty."""
    announcer = '[aria-live="polite"][aria-atomic="true"]'
    await page.wait_for_function(
        "([sel, prefix]) => document.querySelector(sel).textContent.startsWith(prefix)", arg=[announcer, prefix]
    )
    return await page.locator(announcer).text_content() or ""


async def _ask(page: Page, text: str) -> None:
    await page.fill(".se-input", text)
    await page.press(".se-input", "Enter")


async def _shown_as_committed(page: Page, reply_id: int, committed: str) -> None:
    """The answer's bubble shows exactly what rendering the committed text shows."""
    shown = await page.locator(f'.se-msg--assistant[data-id="{reply_id}"] .se-bubble__body').text_content()
    expected = await page.evaluate(RENDERED_TEXT, committed)
    assert shown == expected
    streamed = await page.evaluate(f"SmartEdu.client.byServerId.get({reply_id}).text")
    assert streamed == committed


async def test_question_streams_the_committed_answer_and_survives_a_reload(serve: Serve, browser: Browser) -> None:
    server, url = await _live(serve, offline_ttft_ms=50, offline_tokens_per_s=200)
    page, problems = await _open_page(browser)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')
    assert "token=" not in page.url  # taken out of the address bar

    await _ask(page, "What is a prime number?")
    reply = page.locator(".se-msg--assistant").last
    await reply.wait_for()
    await page.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)
    messages = await _committed(server, page)
    question, answer = messages[-2], messages[-1]
    assert question["role"] == "user" and question["text"] == "What is a prime number?"
    assert answer["role"] == "assistant" and answer["status"] == "complete" and answer["text"]
    await _shown_as_committed(page, answer["id"], answer["text"])
    # The live region announces the finished answer once, not token by token.
    assert (await _announced(page, "The tutor answered:")).startswith("The tutor answered:")

    await page.goto("about:blank")
    await page.goto(url)  # a reload needs the sign-in link again: the token is kept in memory only
    await page.wait_for_selector(f'.se-msg--assistant[data-id="{answer["id"]}"][data-status="complete"]')
    assert await page.locator(".se-msg--user .se-bubble__body").last.text_content() == "What is a prime number?"
    await _shown_as_committed(page, answer["id"], answer["text"])
    assert problems == []


async def test_markup_in_a_question_is_shown_as_text_and_never_run(serve: Serve, browser: Browser) -> None:
    server, url = await _live(serve, offline_ttft_ms=0, offline_tokens_per_s=0)
    page, problems = await _open_page(browser)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')
    hostile = (
        '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2; alert(1)">'
        "[link](javascript:alert(3)) **bold**"
    )
    await _ask(page, hostile)
    await page.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)
    await page.wait_for_timeout(200)  # an onerror handler would have run by now

    assert await page.locator(".se-msg--user .se-bubble__body").last.text_content() == hostile
    log = page.locator(".se-log")
    assert await log.locator("script, img, iframe").count() == 0
    assert await log.locator('a[href^="javascript:"]').count() == 0
    assert await page.evaluate("typeof window.__pwned") == "undefined"
    answer = (await _committed(server, page))[-1]
    assert "<script>" in answer["text"]  # the offline tutor quotes the question back
    await _shown_as_committed(page, answer["id"], answer["text"])
    assert problems == []


async def test_stop_ends_the_answer_and_keeps_the_partial_text(serve: Serve, browser: Browser) -> None:
    server, url = await _live(serve, offline_ttft_ms=50, offline_tokens_per_s=15)
    page, problems = await _open_page(browser)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')
    await _ask(page, "Explain slope slowly")
    await page.wait_for_selector('.se-msg--assistant[data-status="streaming"]', timeout=ANSWER_WAIT_MS)
    await page.wait_for_timeout(300)
    stop = page.get_by_role("button", name="Stop the answer")
    await stop.focus()
    await page.keyboard.press("Enter")  # keyboard only
    await page.wait_for_selector('.se-msg--assistant[data-status="stopped"]', timeout=ANSWER_WAIT_MS)
    assert await stop.is_hidden()

    answer = (await _committed(server, page))[-1]
    assert answer["status"] == "stopped"
    assert 0 < len(answer["text"]) < 200  # the whole offline answer is far longer
    await _shown_as_committed(page, answer["id"], answer["text"])
    assert problems == []


async def test_reconnects_resumes_and_dedupes_on_a_scripted_socket(serve: Serve, browser: Browser) -> None:
    """Frames a real server only sends under failure: a dropped socket, a resume with duplicates,
    a teacher's message, a drain (`reconnect`) and a rate limit with a resend under the same id."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    hellos: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []
    sockets: list[WebSocketRoute] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            hellos.append(frame)
            base = {"type": "welcome", "conversation_id": "c1", "course_id": COURSE, "user": {"name": "Ada"}}
            if number == 1:
                send(**base, seq=10, history=[])
            elif number == 2:
                send(**base, seq=13, resumed=True, history=[])
                send(type="token", conversation_id="c1", reply_id=5, offset=6, text="wörld", seq=13)
                send(type="token", conversation_id="c1", reply_id=5, offset=11, text=", again 😀", seq=14)
                send(type="done", conversation_id="c1", reply_id=5, status="complete", length=20, seq=15)
                send(type="teacher_message", conversation_id="c1", message_id=6, name="Mr Lee", text="Good!",
                     seq=16)
                send(type="frame_from_the_future", seq=17)
                send(type="reconnect", after_ms=200)
            else:
                send(**base, seq=16, resumed=True, history=[])
        elif frame["type"] == "message":
            sent.append(frame)
            if number == 1:
                send(type="ack", id=frame["id"], message_id=4, reply_id=5, conversation_id="c1",
                     text=frame["text"], seq=11)
                send(type="token", conversation_id="c1", reply_id=5, offset=0, text="Hello ", seq=12)
                send(type="token", conversation_id="c1", reply_id=5, offset=0, text="Hello ", seq=12)
                send(type="token", conversation_id="c1", reply_id=5, offset=6, text="wörld", seq=13)
            elif len(sent) == 2:
                send(type="error", code="rate_limited", message="slow down", ref=frame["id"], retry_after=1)
            elif len(sent) == 3:
                send(type="ack", id=frame["id"], message_id=7, reply_id=8, conversation_id="c1",
                     text=frame["text"], seq=18)
                send(type="done", conversation_id="c1", reply_id=8, status="failed", length=0, seq=19)
            else:
                send(type="ack", id=frame["id"], message_id=9, reply_id=10, conversation_id="c1",
                     text=frame["text"], seq=20)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await _ask(page, "Hi")
    await page.wait_for_function("() => SmartEdu.client.byServerId.get(5)?.text === 'Hello wörld'")
    await sockets[0].close(code=4000, reason="network blip")

    await page.wait_for_selector('.se-msg--assistant[data-id="5"][data-status="complete"]')
    body = page.locator('.se-msg--assistant[data-id="5"] .se-bubble__body')
    assert await body.text_content() == "Hello wörld, again 😀"
    assert await page.locator(".se-msg--teacher .se-badge").text_content() == "Teacher · Mr Lee"
    await page.wait_for_function("() => document.querySelector('.se-status').dataset.state === 'online'")
    await page.wait_for_function("() => SmartEdu.client.ready")
    assert [(h.get("conversation_id"), h.get("resume_from")) for h in hellos[1:3]] == [("c1", 13), ("c1", 17)]

    await _ask(page, "Again")
    notice = page.locator('.se-notice[data-code="rate"]')
    await notice.wait_for()
    assert "sent in" in (await notice.text_content() or "")
    await page.wait_for_selector('.se-msg--assistant[data-id="8"][data-status="failed"]', timeout=5000)
    assert [f["text"] for f in sent] == ["Hi", "Again", "Again"]
    assert sent[1]["id"] == sent[2]["id"]  # resent under the same client id after the countdown
    await page.get_by_role("button", name="Retry this question").click()
    await page.wait_for_function(
        "() => SmartEdu.client.outbox.length === 0 && document.querySelectorAll('.se-msg--user').length === 3"
    )
    assert sent[3]["text"] == "Again" and sent[3]["id"] != sent[1]["id"]  # a retry is a new message id
    assert problems == []


def _history(first: int, count: int) -> list[dict[str, Any]]:
    """`count` committed messages from id `first`, questions and answers in turn."""
    return [
        {"id": i, "role": "user" if i % 2 == 0 else "assistant", "text": f"message {i}", "status": "complete",
         "created_at": "2024-05-01T10:00:00Z"}
        for i in range(first, first + count)
    ]


async def test_a_busy_server_is_shown_and_the_page_reconnects_by_itself(
    serve: Serve, browser: Browser, db: asyncpg.Connection
) -> None:
    """Class start on a saturated database: the hello is told `busy` (then 1013); the page says so, backs
    off, and is online once the database answers again."""
    _, url = await _live(serve, hello_deadline=0.3, db_pool_min=1, db_pool_max=1)
    page, problems = await _open_page(browser)
    lock = db.transaction()
    await lock.start()
    await db.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
    try:
        await page.goto(url)
        notice = page.locator('.se-notice[data-code="busy"]')
        await notice.wait_for(timeout=5000)
        assert "Many students are connecting" in (await notice.text_content() or "")
        await page.wait_for_selector('.se-status[data-state="reconnecting"]', timeout=5000)
    finally:
        await lock.rollback()
    await page.wait_for_selector('.se-status[data-state="online"]', timeout=15000)
    assert await notice.count() == 0  # the welcome clears it
    await _ask(page, "What is a slope?")
    await page.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)
    assert problems == []


async def test_load_older_recovers_from_an_error_and_from_a_dropped_socket(serve: Serve, browser: Browser) -> None:
    """A history request answered by an error, or lost with its socket, gives the button back (it used to
    stay on "Loading…" until the page was reloaded)."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    requests: list[tuple[int, dict[str, Any]]] = []
    sockets: list[WebSocketRoute] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        base = {"type": "welcome", "conversation_id": "c1", "course_id": COURSE, "has_more": True}
        if frame["type"] == "hello" and number == 1:
            send(**base, seq=3, history=_history(100, 20))
        elif frame["type"] == "hello":
            send(**base, seq=3, resumed=True, history=_history(100, 20))
        elif frame["type"] == "history":
            requests.append((number, frame))
            if len(requests) == 1:
                send(type="error", code="internal", message="a backing service is unavailable", log_ref="3f9a0c")
            elif len(requests) == 3:  # the second one is lost with its socket
                send(type="history", conversation_id="c1", messages=_history(90, 10), has_more=False)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await page.wait_for_selector('.se-msg[data-id="119"]')
    older = page.locator(".se-older")

    ready = "() => (b => !b.disabled && b.textContent === 'Load older messages')(document.querySelector('.se-older'))"

    async def load_older(requested: int) -> None:
        await page.wait_for_function(ready, timeout=5000)
        await older.dispatch_event("click")  # a real click scrolls to the top, which asks too
        while len(requests) < requested:
            await page.wait_for_timeout(20)

    await load_older(1)
    notice = page.locator('.se-notice[data-code="internal"]')
    await notice.wait_for()
    assert "(reference 3f9a0c)" in (await notice.text_content() or "")  # the server's log_ref, for support

    await load_older(2)
    assert await older.text_content() == "Loading\u2026" and await older.is_disabled()  # no answer yet
    await sockets[0].close(code=4000, reason="network blip")  # before the page arrives
    await page.wait_for_function("() => SmartEdu.client.ready && SmartEdu.client.transport.connections === 2")
    await load_older(3)
    await page.wait_for_selector('.se-msg[data-id="90"]')
    assert await older.is_hidden()
    assert [(number, frame["before"]) for number, frame in requests] == [(1, 100), (1, 100), (2, 100)]
    assert problems == []


async def test_retry_while_the_teacher_has_paused_the_tutor_says_so_and_keeps_the_button(
    serve: Serve, browser: Browser
) -> None:
    """Retry on an interrupted answer while the tutor is paused: not sent when the page knows of the pause;
    refused by the server (forbidden, ref = the reply's id) when it did not yet. Either way the page says
    the teacher paused the tutor (not "no access to this course") and Retry stays."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    regenerates: list[dict[str, Any]] = []
    sockets: list[WebSocketRoute] = []
    history = [
        {"id": 7, "role": "user", "text": "Why?", "status": "complete", "created_at": "2024-05-01T10:00:00Z"},
        {"id": 8, "role": "assistant", "text": "Because", "status": "interrupted",
         "created_at": "2024-05-01T10:00:01Z"},
    ]

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            send(type="welcome", conversation_id="c1", course_id=COURSE, seq=4, history=history, ai_paused=False,
                 features=["regenerate"])
        elif frame["type"] == "regenerate":
            regenerates.append(frame)
            send(type="error", code="forbidden", message="your teacher has paused the tutor for this conversation",
                 ref=str(frame["reply_id"]))
            send(type="ai_state", conversation_id="c1", paused=True, seq=5)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    retry = page.locator('.se-msg[data-id="8"] [data-action="retry"]')
    notice = page.locator('.se-notice[data-code="ai-paused-retry"]')

    await retry.click()  # the pause has not reached this page yet: the server refuses
    await notice.wait_for()
    assert "paused" in (await notice.text_content() or "")
    assert await page.locator('.se-notice[data-code="forbidden"]').count() == 0
    await retry.wait_for()  # given back
    assert [frame["reply_id"] for frame in regenerates] == [8]

    await page.wait_for_function("() => SmartEdu.client.aiPaused")
    await page.evaluate("() => SmartEdu.client.view.clearNotice('ai-paused-retry')")
    await retry.click()  # now the page knows: nothing is sent
    await notice.wait_for()
    await page.wait_for_timeout(200)
    assert len(regenerates) == 1 and await retry.is_visible()
    assert problems == []


async def test_a_socket_lost_during_a_resume_replay_resumes_from_the_last_frame_received(
    serve: Serve, browser: Browser
) -> None:
    """The scripted server keeps a frame log and replays it as a real one does (`seq > resume_from`, after a
    `resumed` welcome whose seq is the log's end). The second socket is lost after one replayed frame: the
    third hello must resume from that frame, not from the welcome's seq, or the answer's end is never seen."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    hellos: list[dict[str, Any]] = []
    sockets: list[WebSocketRoute] = []
    log: list[dict[str, Any]] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        base = {"type": "welcome", "conversation_id": "c1", "course_id": COURSE}
        if frame["type"] == "hello":
            hellos.append(frame)
            if number == 1:
                send(**base, seq=10, history=[])
                return
            # Meanwhile (on another replica) the answer went on and ended.
            log[2:] = [
                {"type": "token", "conversation_id": "c1", "reply_id": 5, "offset": 6, "text": "wörld", "seq": 13},
                {"type": "token", "conversation_id": "c1", "reply_id": 5, "offset": 11, "text": "!", "seq": 14},
                {"type": "done", "conversation_id": "c1", "reply_id": 5, "status": "complete", "length": 12,
                 "seq": 15},
            ]
            send(**base, seq=log[-1]["seq"], resumed=True, history=[])
            replay = [f for f in log if f["seq"] > frame["resume_from"]]
            for replayed in replay[:1] if number == 2 else replay:  # the second socket dies mid-replay
                send(**replayed)
        elif frame["type"] == "message":
            log[:] = [
                {"type": "ack", "id": frame["id"], "message_id": 4, "reply_id": 5, "conversation_id": "c1",
                 "text": frame["text"], "seq": 11},
                {"type": "token", "conversation_id": "c1", "reply_id": 5, "offset": 0, "text": "Hello ", "seq": 12},
            ]
            for logged in log:
                send(**logged)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await _ask(page, "Hi")
    await page.wait_for_function("() => SmartEdu.client.byServerId.get(5)?.text === 'Hello '")
    await sockets[0].close(code=4000, reason="network blip")
    await page.wait_for_function("() => SmartEdu.client.byServerId.get(5)?.text === 'Hello wörld'")
    await sockets[1].close(code=4000, reason="lost during the replay")

    await page.wait_for_selector('.se-msg--assistant[data-id="5"][data-status="complete"]', timeout=5000)
    assert await page.locator('.se-msg--assistant[data-id="5"] .se-bubble__body').text_content() == "Hello wörld!"
    assert [h.get("resume_from") for h in hellos] == [None, 12, 13]
    assert problems == []


async def test_ai_failures_offer_retry_only_when_it_can_help_and_a_cut_answer_says_so(
    serve: Serve, browser: Browser
) -> None:
    """An outage offers Retry; a declined question and a misconfigured tutor say why and offer none; an
    answer the length limit cut is marked as cut."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    sockets: list[WebSocketRoute] = []
    questions: list[str] = []
    failures: list[dict[str, Any]] = [
        {"code": "ai_unavailable", "message": "the tutor is unavailable right now; please try again",
         "retryable": True, "retry_after": 2},
        {"code": "ai_declined", "message": "the tutor can't answer that question", "retryable": False},
        {"code": "ai_unavailable", "message": "the tutor is unavailable; the school's staff have been told",
         "retryable": False},
    ]

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            send(type="welcome", conversation_id="c1", course_id=COURSE, seq=1, history=[])
        elif frame["type"] == "message":
            questions.append(frame["text"])
            n = len(questions)
            reply, seq = 10 * n, 10 * n
            send(type="ack", id=frame["id"], message_id=reply - 1, reply_id=reply, conversation_id="c1",
                 text=frame["text"], seq=seq)
            send(type="token", conversation_id="c1", reply_id=reply, offset=0, text="Partly", seq=seq + 1)
            if n <= len(failures):
                failure = failures[n - 1]
                send(type="done", conversation_id="c1", reply_id=reply, status="failed", length=6,
                     truncated=False, retryable=failure["retryable"], seq=seq + 2)
                send(type="error", ref=str(reply), **failure)
            else:
                send(type="done", conversation_id="c1", reply_id=reply, status="complete", length=6, truncated=True,
                     seq=seq + 2)

    await _open_scripted(page, url, scripted_server(sockets, answer))

    await _ask(page, "Outage?")
    await page.wait_for_selector('.se-msg--assistant[data-id="10"][data-status="failed"]')
    await page.locator('.se-msg[data-id="10"] [data-action="retry"]').wait_for()
    notice = page.locator('.se-notice[data-code="ai_unavailable"]')
    assert "Try again" in (await notice.text_content() or "")

    await _ask(page, "Recite the textbook?")
    declined = page.locator('.se-notice[data-code="ai_declined"]')
    await declined.wait_for()
    assert "can\u2019t answer that question" in (await declined.text_content() or "")
    assert await page.locator('.se-msg[data-id="20"][data-status="failed"] [data-action="retry"]').count() == 0

    await _ask(page, "Misconfigured?")
    await page.wait_for_function(
        "() => /staff/.test(document.querySelector('.se-notice[data-code=\"ai_unavailable\"]')?.textContent)"
    )
    assert "try again" not in (await notice.text_content() or "").lower()
    await page.wait_for_selector('.se-msg--assistant[data-id="30"][data-status="failed"]')
    assert await page.locator('.se-msg[data-id="30"] [data-action="retry"]').count() == 0
    # The announcer is emptied, then filled a tick later (so that a repeated text is announced again).
    announcer = '[aria-live="polite"][aria-atomic="true"]'
    await page.wait_for_function(
        f"() => /could not be completed/.test(document.querySelector('{announcer}').textContent)"
    )
    announced = await page.locator(announcer).text_content()
    assert announced and "Retry" not in announced
    assert await page.locator('.se-msg[data-id="10"] [data-action="retry"]').count() == 1  # the outage's stays

    await _ask(page, "Everything?")
    await page.wait_for_selector('.se-msg--assistant[data-id="40"][data-status="complete"]')
    status = page.locator('.se-msg[data-id="40"] .se-meta__status')
    assert "length limit" in (await status.text_content() or "")
    assert await page.locator('.se-msg[data-id="40"] [data-action="retry"]').count() == 0
    assert problems == []


async def test_an_offline_answer_cut_by_the_output_limit_is_marked_as_cut(serve: Serve, browser: Browser) -> None:
    server, url = await _live(serve, offline_ttft_ms=0, offline_tokens_per_s=0, max_output_tokens=6)
    page, problems = await _open_page(browser)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')
    await _ask(page, "What is a prime number?")
    await page.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)
    answer = (await _committed(server, page))[-1]
    assert len(answer["text"].split()) == 6
    await _shown_as_committed(page, answer["id"], answer["text"])
    status = page.locator(f'.se-msg[data-id="{answer["id"]}"] .se-meta__status')
    assert await status.text_content() == "Cut short: the answer reached its length limit"
    assert (await _announced(page, "The tutor answered (cut short")).startswith("The tutor answered (cut short")
    assert problems == []
    # Opened again, it shows the same: the note comes from the history, not from the live `done`.
    again, again_problems = await _open_page(browser)
    await again.goto(url)
    await again.wait_for_selector('.se-status[data-state="online"]')
    status = again.locator(f'.se-msg[data-id="{answer["id"]}"] .se-meta__status')
    assert await status.text_content() == "Cut short: the answer reached its length limit"
    assert problems == again_problems == []


BLOCKED_NOTE = "This answer was stopped by the safety filter."


async def test_an_answer_the_safety_filter_stopped_says_so_live_and_after_a_reload(
    serve: Serve, browser: Browser
) -> None:
    """Gemini (the local fake, through the real SDK) stops an answer for safety after some text: the bubble
    keeps that text and the server's safety note and says, in the bubble, that the safety filter stopped it;
    the live region says so too; a reload shows the same note from the history. It used to look like any
    other answer. An answer that ended normally has no note."""
    async with start_fake_gemini(chunks=["Primes ", "have ", "two ", "divisors."]) as fake:
        env = {"GEMINI_API_KEY": "test-key-not-secret", "GEMINI_BASE_URL": fake.base_url,
               "SMARTEDU_AI_MAX_RETRIES": "0"}
        server, url = await _live(serve, ai_provider="gemini", env=env)
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(url)
        await page.wait_for_selector('.se-status[data-state="online"]')
        await _ask(page, "What is a prime number?")
        await page.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)
        fake.finish_reason = "SAFETY"
        await _ask(page, "something unsafe")
        complete = '.se-msg--assistant[data-status="complete"]'
        await page.wait_for_function(
            "sel => document.querySelectorAll(sel).length === 2", arg=complete, timeout=ANSWER_WAIT_MS
        )
        normal, blocked = (await _committed(server, page))[1::2]
        assert blocked["blocked"] is True and blocked["text"].endswith(SAFETY_MESSAGE)
        await _shown_as_committed(page, blocked["id"], blocked["text"])

        async def notes(where: Page) -> dict[int, list[str]]:
            found: dict[int, list[str]] = await where.evaluate(
                """() => Object.fromEntries([...document.querySelectorAll('.se-msg--assistant')].map(li =>
                  [li.dataset.id, [...li.querySelectorAll('[role="note"]')].map(n => n.textContent)]))"""
            )
            return {int(reply): texts for reply, texts in found.items()}

        assert await notes(page) == {normal["id"]: [], blocked["id"]: [BLOCKED_NOTE]}
        note = page.locator(f'.se-msg[data-id="{blocked["id"]}"] [role="note"]')
        assert await note.is_visible()
        announced = await _announced(page, "The safety filter stopped the tutor\u2019s answer:")
        assert announced.endswith(SAFETY_MESSAGE)

        assert problems == []

        # Opened again, in both colour schemes (axe-core finds nothing serious, the note's contrast included).
        for scheme in ("light", "dark"):
            context = await _context(browser, scheme)  # bypasses the CSP, so that axe-core can be injected
            try:
                again = await new_page(context, problems, scheme)
                await again.goto(url)
                await again.wait_for_selector(f'.se-msg--assistant[data-id="{blocked["id"]}"][data-status="complete"]')
                assert await notes(again) == {normal["id"]: [], blocked["id"]: [BLOCKED_NOTE]}
                assert await _audit(again, f"/chat {scheme}") == []
            finally:
                await context.close()
        assert problems == []


async def test_a_reloaded_history_says_how_each_answer_ended(serve: Serve, browser: Browser) -> None:
    """Failed answers from the history offer Retry only when asking again can help, and say why when not."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    sockets: list[WebSocketRoute] = []
    created = "2026-01-05T10:00:00+00:00"

    def answer_of(reply: int, status: str, **outcome: Any) -> list[dict[str, Any]]:
        question = {"id": reply - 1, "role": "user", "text": f"question {reply}", "status": "complete",
                    "created_at": created}
        return [question, {"id": reply, "role": "assistant", "text": "Partly", "status": status,
                           "created_at": created, **outcome}]

    history = [
        *answer_of(10, "failed", error="ai_unavailable", retryable=True),
        *answer_of(20, "failed", error="ai_declined", retryable=False),
        *answer_of(30, "failed", error="ai_unavailable", retryable=False),
        *answer_of(40, "complete", truncated=True),
        *answer_of(50, "failed"),  # ended before its outcome was recorded: as before, Retry
        *answer_of(60, "failed", error="ai_rejected", retryable=False),
    ]

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            send(type="welcome", conversation_id="c1", course_id=COURSE, seq=70, history=history, has_more=False)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await page.wait_for_selector('.se-msg--assistant[data-id="60"]')

    async def shown(reply: int) -> tuple[str, bool]:
        status = await page.locator(f'.se-msg[data-id="{reply}"] .se-meta__status').text_content()
        retry = await page.locator(f'.se-msg[data-id="{reply}"] [data-action="retry"]').count()
        return status or "", retry == 1

    assert await shown(10) == ("The answer could not be completed", True)
    assert await shown(20) == ("The tutor can\u2019t answer that question", False)
    assert await shown(30) == ("The tutor is unavailable; your school\u2019s staff have been told", False)
    assert await shown(40) == ("Cut short: the answer reached its length limit", False)
    assert await shown(50) == ("The answer could not be completed", True)
    assert await shown(60) == ("The tutor could not process this conversation", False)
    assert problems == []


STATES = """sel => {
  window.states = [];
  const box = document.querySelector(sel);
  new MutationObserver(() => window.states.push(box.dataset.state)).observe(box, { attributes: true });
}"""


async def test_a_client_shed_for_falling_behind_resumes_at_once_without_a_reconnecting_state(
    serve: Serve, browser: Browser
) -> None:
    """Close code 1013 (the server's backlog for this client was full) is no failure of the server: the
    page reconnects at once with resume_from, without the "Reconnecting in N s" state or a notice. A second
    1013 right after backs off like any drop (a client that cannot keep up does not hammer the server)."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    hellos: list[dict[str, Any]] = []
    sockets: list[WebSocketRoute] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] != "hello":
            return
        hellos.append(frame)
        base = {"type": "welcome", "conversation_id": "c1", "course_id": COURSE, "user": {"name": "Ada"}}
        if number == 1:
            send(**base, seq=4, history=_history(1, 4))
            send(type="token", conversation_id="c1", reply_id=5, offset=0, text="Half an", seq=5)
        else:
            send(**base, seq=6, resumed=True, history=[])
            send(type="token", conversation_id="c1", reply_id=5, offset=7, text=" answer", seq=6)

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await page.wait_for_function("() => SmartEdu.client.lastSeq === 5")
    await page.evaluate(STATES, ".se-status")
    await sockets[0].close(code=1013, reason="too slow")

    await page.wait_for_function("() => SmartEdu.client.byServerId.get(5)?.text === 'Half an answer'")
    await page.wait_for_function("() => SmartEdu.client.ready")
    assert [(h.get("conversation_id"), h.get("resume_from")) for h in hellos] == [(None, None), ("c1", 5)]
    assert "reconnecting" not in await page.evaluate("window.states")
    assert await page.locator(".se-notice").count() == 0
    assert await page.locator(".se-status").get_attribute("data-state") == "online"

    await sockets[1].close(code=1013, reason="too slow")  # again within seconds: backs off
    await page.wait_for_selector('.se-status[data-state="reconnecting"]')
    await page.wait_for_function("() => SmartEdu.client.ready")
    assert len(hellos) == 3
    assert problems == []


# Start a page timer whose id is the number the next animation frame will get, then a token and the `done`
# of its answer arrive in one task.
TOKEN_AND_DONE_BESIDE_A_TIMER = """() => {
  window.fired = false;
  let frame = requestAnimationFrame(() => {});
  cancelAnimationFrame(frame);
  let timer = 0;
  do {
    clearTimeout(timer);
    timer = setTimeout(() => { window.fired = true; }, 100);
  } while (timer <= frame + 1);
  while (frame < timer - 1) {
    frame = requestAnimationFrame(() => {});
    cancelAnimationFrame(frame);
  }
  const client = SmartEdu.client;
  client.onFrame({ type: 'token', conversation_id: 'c1', reply_id: 5, offset: 0, text: 'Hi', seq: 1 });
  client.onFrame({ type: 'done', conversation_id: 'c1', reply_id: 5, status: 'complete', length: 2, seq: 2 });
}"""


async def test_an_answer_ending_before_its_render_cancels_no_timer_of_the_page(serve: Serve, browser: Browser) -> None:
    """A token asks for an animation frame to render in; a `done` in the same task renders at once and
    cancels that frame. It used to cancel it with clearTimeout too, and timer and frame ids are separate
    counters: the page's timer with the same number (a heartbeat, a resend, a notice's) silently stopped."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    sockets: list[WebSocketRoute] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            send(type="welcome", conversation_id="c1", course_id=COURSE, seq=0, history=[])

    await _open_scripted(page, url, scripted_server(sockets, answer))
    await page.evaluate(TOKEN_AND_DONE_BESIDE_A_TIMER)
    await page.wait_for_timeout(300)
    assert await page.evaluate("window.fired") is True
    assert await page.locator('.se-msg--assistant[data-id="5"] .se-bubble__body').text_content() == "Hi"
    assert problems == []


async def test_a_sign_in_link_opened_again_in_the_same_tab_signs_in_and_leaves_no_token(
    serve: Serve, browser: Browser
) -> None:
    """A school's site reusing a tab (a named window) already on /chat changes only the fragment: the
    page was not loaded again, so the new token stayed in the address bar and the history, and unread."""
    server, url = await _live(serve)
    page, problems = await _open_page(browser)
    await page.goto(str(server.client.make_url("/chat")) + f"#course={COURSE}")
    await page.wait_for_selector('.se-status[data-state="signed-out"]')
    await page.evaluate("url => window.open(url, '_self')", url)  # same document: only the fragment changes
    await page.wait_for_selector('.se-status[data-state="online"]')
    assert "token=" not in page.url
    assert await page.evaluate("SmartEdu.client.course") == COURSE
    await page.go_back()
    assert "token=" not in page.url
    assert problems == []


async def test_a_hello_that_failed_on_the_database_is_said_again_on_the_same_socket(
    serve: Serve, browser: Browser
) -> None:
    """A hello the server could not serve (the database restarting: `internal` with retry_after, and the
    socket still waits for a hello) is sent again after retry_after, not left until the page's 15 s welcome
    limit drops the socket."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)
    sockets: list[WebSocketRoute] = []
    hellos: list[int] = []

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] != "hello":
            return
        hellos.append(number)
        if len(hellos) == 1:
            send(type="error", code="internal", message="a backing service is unavailable; try again",
                 retry_after=0.3, log_ref="3f9a0c")
        else:
            send(type="welcome", conversation_id="c1", course_id=COURSE, seq=0, history=[], has_more=False)

    await page.route_web_socket(re.compile(r"/ws$"), scripted_server(sockets, answer))
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]', timeout=5000)
    assert hellos == [1, 1]  # both on the first socket
    assert problems == []


OTHER_HOST_SOCKET = """url => new Promise(resolve => {
  document.addEventListener('securitypolicyviolation',
    e => resolve({blocked: e.blockedURI, directive: e.effectiveDirective}), {once: true});
  const ws = new WebSocket(url);
  ws.onopen = () => { ws.close(); resolve({opened: true}); };
  ws.onclose = () => resolve({closed: true});  // refused by the server (its origin check), not the CSP
})"""


async def test_the_page_connects_to_its_own_socket_only(serve: Serve, browser: Browser) -> None:
    """connect-src is 'self' (it allowed `ws: wss:`, any host): the page's own socket gets online, and a
    script opening a socket to another host (the same server under another name) is refused by the CSP."""
    server, url = await _live(serve)
    page, problems = await _open_page(browser)
    await page.goto(url)
    await page.wait_for_selector('.se-status[data-state="online"]')
    assert "127.0.0.1" in url
    elsewhere = str(server.client.make_url("/ws")).replace("http://127.0.0.1", "ws://localhost")
    refused = await page.evaluate(OTHER_HOST_SOCKET, elsewhere)
    assert refused == {"blocked": elsewhere, "directive": "connect-src"}
    assert await page.evaluate("SmartEdu.client.transport.ws.readyState") == 1  # its own socket is untouched
    assert problems == []


STREAM_AN_ANSWER = """([text, chunk]) => {
  const client = SmartEdu.client;
  const parsed = [];
  let seq = 11;
  for (let at = 0; at < text.length; at += chunk) {
    client.onFrame({type: 'token', conversation_id: 'c1', reply_id: 5, offset: at, text: text.slice(at, at + chunk),
                    seq: seq++});
    const before = SmartEdu.markdownStats.parsed;
    client.flushRender();  // a render tick (once an animation frame while the answer streams)
    parsed.push(SmartEdu.markdownStats.parsed - before);
    if (parsed[parsed.length - 1] > 20000) break;  // parsing it all again: would take a minute
  }
  const body = document.querySelector('.se-msg--assistant[data-id="5"] .se-bubble__body');
  const caret = body.querySelectorAll('.se-caret').length;
  client.onFrame({type: 'done', conversation_id: 'c1', reply_id: 5, status: 'complete', length: text.length,
                  seq: seq++});
  const whole = document.createElement('div');
  whole.appendChild(SmartEdu.renderMarkdown(text));
  return {parsed, caret, same: body.innerHTML === whole.innerHTML, busy: body.closest('li').getAttribute('aria-busy')};
}"""


async def test_a_long_streamed_answer_renders_only_its_open_block_each_tick(serve: Serve, browser: Browser) -> None:
    """A 60 KB answer streamed 100 characters a tick: each render parses the answer's open block, not the
    whole answer so far (it did: 18 MB parsed over this stream, and the page janked), and the answer ends
    as exactly the DOM a full render makes, announced once in full."""
    _, url = await _live(serve)
    page, problems = await _open_page(browser)

    def answer(number: int, frame: dict[str, Any], send: Send) -> None:
        if frame["type"] == "hello":
            send(type="welcome", conversation_id="c1", course_id=COURSE, user={"name": "Ada"}, seq=10, history=[])

    await _open_scripted(page, url, scripted_server([], answer))
    text = streamed_markdown(60_000)
    result = await page.evaluate(STREAM_AN_ANSWER, [text, 100])
    assert result["same"] and result["caret"] == 1 and result["busy"] == "false"
    assert len(result["parsed"]) == 600
    assert max(result["parsed"]) < 1000, max(result["parsed"])  # the longest block and a chunk
    announced = await _announced(page, "The tutor answered:")
    assert announced.startswith("The tutor answered: Step 0: solve for x First we note")
    assert problems == []
