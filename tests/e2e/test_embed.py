"""The /embed iframe page on a school's own site, in real headless Chromium.

The school's page is served by a second local server, so it has another origin than the tutor. A page
on an allowed origin frames the chat, hands it the token by postMessage and gets a streamed answer; a
page on any other origin is refused by the browser (`frame-ancestors`). widget.js with data-tenant loads
on a school allowed only by its tenant, and refreshes its token by the token's lifetime. An expired
token ends in "open the tutor again" when no new one comes (an LTI launch's LMS never sends one). Last,
the server is killed (SIGKILL) while an answer streams and started again on the same port: the framed
chat reconnects and ends with exactly the text the server committed.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import pytest

from server.settings import Settings
from tests.conftest import TEST_SECRET, Serve, Server, interrupt, seed_course, token
from tests.e2e.helpers import ANSWER_WAIT_MS, Problems, browser, free_port, host_site, new_page, rendered

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser, FrameLocator, Page

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

TENANT = "school-a"
COURSE = "algebra-1"
STUDENT = token("stu-embed", tenant=TENANT, name="Ada")


def school_page(tutor: str, jwt: str) -> str:
    """A school's page that frames the tutor and answers its token request (what widget.js does)."""
    src = f"{tutor}/embed?course={COURSE}&tenant={TENANT}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Springfield High — Algebra I</title>
<style>
  body {{ font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #eef2f7; color: #1a1f2b; }}
  header {{ background: #0f3d75; color: #fff; padding: 14px 24px; font-weight: 700; }}
  main {{ display: grid; grid-template-columns: 1fr 400px; gap: 24px; padding: 24px; }}
  iframe {{ width: 400px; height: 560px; border: 0; border-radius: 14px; box-shadow: 0 8px 30px rgba(0,0,0,.18); }}
</style></head>
<body><header>Springfield High · Algebra I</header>
<main><article><h1>Week 3: prime numbers</h1><p>Read section 3.2, then ask the tutor about anything that
is unclear. Your teacher can see your conversation.</p></article>
<iframe id="tutor" title="Tutor chat" src="{src}"></iframe></main>
<script>
  window.events = [];
  const tutor = {json.dumps(tutor)};
  const frame = document.getElementById("tutor");
  addEventListener("message", (event) => {{
    if (event.origin !== tutor || event.source !== frame.contentWindow) return;
    window.events.push(event.data.type);
    if (event.data.type === "smartedu:ready-for-token" || event.data.type === "smartedu:token-expired") {{
      frame.contentWindow.postMessage({{ type: "smartedu:token", token: {json.dumps(jwt)} }}, tutor);
      frame.contentWindow.postMessage({{ type: "smartedu:visible", open: true }}, tutor);
    }}
  }});
</script></body></html>"""


async def _allow(database_url: str, origin: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE tenants SET allowed_origins = ARRAY[$1] WHERE id = $2", origin, TENANT)
    finally:
        await conn.close()


async def _tutor_for_a_school(serve: Serve, **overrides: Any) -> tuple[Server, str, int]:
    """A running tutor with the course, and a free port whose localhost origin only the tenant's
    allowed_origins allows: the server, the tutor's origin and the school's port."""
    server = await serve(**overrides)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    port = free_port()
    assert server.settings.database_url
    await _allow(server.settings.database_url, f"http://localhost:{port}")
    return server, str(server.client.make_url("")).rstrip("/"), port


async def _committed(tutor: str, conversation: str) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{tutor}/api/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {STUDENT}"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        body = await response.json()
    messages: list[dict[str, Any]] = body["messages"]
    return messages


async def _ask(chat: FrameLocator, text: str) -> None:
    await chat.locator(".se-input").fill(text)
    await chat.locator(".se-input").press("Enter")


async def _shown(page: Page, chat: FrameLocator, reply: dict[str, Any]) -> None:
    """The framed chat shows exactly the committed answer."""
    body = chat.locator(f'.se-msg--assistant[data-id="{reply["id"]}"] .se-bubble__body')
    frame = next(f for f in page.frames if "/embed" in f.url)
    assert await body.text_content() == await rendered(frame, reply["text"])
    assert await frame.evaluate(f"SmartEdu.client.byServerId.get({reply['id']}).text") == reply["text"]


async def test_an_allowed_school_frames_the_chat_and_gets_a_streamed_answer(
    serve: Serve, browser: Browser, tmp_path: Path
) -> None:
    _, tutor, port = await _tutor_for_a_school(serve, offline_ttft_ms=50, offline_tokens_per_s=200)
    async with host_site({"/": school_page(tutor, STUDENT)}, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems, viewport={"width": 1000, "height": 680})
        embed_headers: list[dict[str, str]] = []
        page.on("response", lambda r: embed_headers.append(r.headers) if "/embed?" in r.url else None)
        await page.goto(f"{school}/")
        chat = page.frame_locator("#tutor")
        await chat.locator('.se-status[data-state="online"]').wait_for()
        assert f"frame-ancestors http://localhost:{port}" in embed_headers[0]["content-security-policy"]
        await _ask(chat, "What is a prime number?")
        await chat.locator('.se-msg--assistant[data-status="complete"]').wait_for(timeout=ANSWER_WAIT_MS)
        frame = next(f for f in page.frames if "/embed" in f.url)
        conversation = await frame.evaluate("SmartEdu.client.conversationId")
        messages = await _committed(tutor, conversation)
        assert messages[-2]["text"] == "What is a prime number?"
        await _shown(page, chat, messages[-1])
        events = await page.evaluate("window.events")
        assert events[:2] == ["smartedu:ready-for-token", "smartedu:ready"]
        if os.environ.get("SMARTEDU_SCREENSHOTS"):  # docs/screenshots/embed.png
            await page.screenshot(path=str(Path(os.environ["SMARTEDU_SCREENSHOTS"]) / "embed.png"))
        await page.close()
        assert problems == []


async def test_a_school_that_is_not_allowed_cannot_frame_the_chat(serve: Serve, browser: Browser) -> None:
    server = await serve()
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    tutor = str(server.client.make_url("")).rstrip("/")
    assert server.settings.database_url
    await _allow(server.settings.database_url, f"http://localhost:{free_port()}")  # some other school
    async with host_site({"/": school_page(tutor, STUDENT)}) as intruder:
        page = await browser.new_page()
        console: list[str] = []
        sockets: list[str] = []
        scripts: list[str] = []
        page.on("console", lambda msg: console.append(msg.text))
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.on("request", lambda r: scripts.append(r.url) if r.url.split("?")[0].endswith("/static/chat.js") else None)
        await page.goto(f"{intruder}/", wait_until="load")
        await page.wait_for_timeout(1000)  # time enough for a page that did load to say hello
        frame = next(f for f in page.frames if f != page.main_frame)
        assert not frame.url.startswith(tutor)  # Chromium replaced the refused page by an error page
        assert await page.evaluate("document.getElementById('tutor').contentDocument") is None  # cross-origin
        assert sockets == [] and scripts == []
        assert await page.evaluate("window.events") == []
        assert any("frame-ancestors" in line for line in console), console
        await page.close()


async def test_a_star_in_a_schools_origins_lets_no_other_site_frame_the_chat(serve: Serve, browser: Browser) -> None:
    """`*` in a tenant's allowed_origins (meaningless for its CORS and WebSockets) used to become
    `frame-ancestors *`: any site could frame the chat with that tenant's id and click it for the student."""
    server = await serve()
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    tutor = str(server.client.make_url("")).rstrip("/")
    assert server.settings.database_url
    await _allow(server.settings.database_url, "*")
    async with host_site({"/": school_page(tutor, STUDENT)}) as intruder:
        page = await browser.new_page()
        scripts: list[str] = []
        page.on("request", lambda r: scripts.append(r.url) if r.url.split("?")[0].endswith("/static/chat.js") else None)
        await page.goto(f"{intruder}/", wait_until="load")
        await page.wait_for_timeout(1000)  # time enough for a page that did load to ask for its token
        assert scripts == []
        assert await page.evaluate("window.events") == []
        await page.close()


def widget_page(tutor: str, tenant: str) -> str:
    """A school's page with the one-tag widget, opened on load; its token comes from /smartedu/token."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Springfield High</title></head>
<body><h1>Week 3: prime numbers</h1>
<script src="{tutor}/static/widget.js" data-course="{COURSE}" data-tenant="{tenant}"
        data-token-url="/smartedu/token" data-open="true" async></script>
</body></html>"""


async def test_the_widget_loads_on_a_school_allowed_only_by_its_tenant(serve: Serve, browser: Browser) -> None:
    """data-tenant puts the tenant in the iframe's URL, so /embed lets the tenant's allowed_origins frame
    it: without it, a school missing from SMARTEDU_ALLOWED_ORIGINS gets `frame-ancestors 'none'`."""
    server, tutor, port = await _tutor_for_a_school(serve, offline_ttft_ms=50, offline_tokens_per_s=200)
    assert server.settings.allowed_origins == ()  # nothing configured globally: only the tenant's list
    pages: dict[str, str | tuple[str, str]] = {
        "/": widget_page(tutor, TENANT),
        "/smartedu/token": (STUDENT, "text/plain"),
    }
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        embeds: list[tuple[str, dict[str, str]]] = []
        page.on("response", lambda r: embeds.append((r.url, r.headers)) if "/embed?" in r.url else None)
        await page.goto(f"{school}/")
        chat = page.frame_locator("#smartedu-widget iframe")  # in the widget's open shadow root
        await chat.locator('.se-status[data-state="online"]').wait_for()
        url, headers = embeds[0]
        assert f"tenant={TENANT}" in url
        assert f"frame-ancestors http://localhost:{port}" in headers["content-security-policy"]
        await _ask(chat, "What is a prime number?")
        await chat.locator('.se-msg--assistant[data-status="complete"]').wait_for(timeout=ANSWER_WAIT_MS)
        await page.close()
        assert problems == []


EXPIRED = token("stu-embed", tenant=TENANT, name="Ada", ttl_s=-3600)
SIGNED_OUT = '.se-status[data-state="signed-out"]'
EXPIRED_NOTICE = '.se-notice[data-code="unauthorized"]:has-text("Open the tutor again from your course")'


def lms_page(tutor: str, jwt: str) -> str:
    """An LMS page framing the chat as an LTI launch leaves it (token in the fragment); like an LMS, it
    never answers the chat's messages."""
    src = f"{tutor}/embed?course={COURSE}&tenant={TENANT}#token={jwt}&course={COURSE}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Moodle — Algebra I</title></head>
<body><iframe id="tutor" title="Tutor chat" src="{src}"></iframe>
<script>
  window.events = [];
  addEventListener("message", (event) => window.events.push(event.data.type));
</script></body></html>"""


async def _framed_with_expired_token(
    serve: Serve, browser: Browser, school_page: Callable[[str, str], str]
) -> tuple[Page, list[str]]:
    """`school_page(tutor, EXPIRED)`, from an allowed origin, frames the chat, which is refused (4401)."""
    _, tutor, port = await _tutor_for_a_school(serve)
    page = await browser.new_page()
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    async with host_site({"/": school_page(tutor, EXPIRED)}, port=port) as school:
        await page.goto(f"{school}/")
        await page.frame_locator("#tutor").locator(SIGNED_OUT).wait_for()
    return page, sockets


async def test_after_an_lti_launch_an_expired_token_says_to_open_the_tutor_again(
    serve: Serve, browser: Browser
) -> None:
    """The LMS never sends a new token, so the chat must not promise one ("Signing you in again…")."""
    page, sockets = await _framed_with_expired_token(serve, browser, lms_page)
    chat = page.frame_locator("#tutor")
    await chat.locator(EXPIRED_NOTICE).wait_for(timeout=2000)  # at once, not after the wait for a token
    assert "smartedu:token-expired" in await page.evaluate("window.events")  # a parent that can answer, may
    assert len(sockets) == 1
    await page.close()


async def test_an_expired_token_that_the_parent_does_not_replace_says_to_open_the_tutor_again(
    serve: Serve, browser: Browser
) -> None:
    """A parent that answers token-expired with the token just refused (or not at all): after a few
    seconds the chat stops saying "Signing you in again…", and it does not retry the refused token."""
    page, sockets = await _framed_with_expired_token(serve, browser, school_page)
    chat = page.frame_locator("#tutor")
    notice = chat.locator('.se-notice[data-code="unauthorized"] .se-notice__text')
    assert await notice.text_content() == "Signing you in again\u2026"
    await chat.locator(EXPIRED_NOTICE).wait_for(timeout=12_000)
    assert await page.evaluate("window.events.filter(type => type === 'smartedu:token-expired').length") == 1
    assert len(sockets) == 1
    await page.close()


async def _widget_fetches(
    serve: Serve, browser: Browser, jwt: str, ahead_s: float = 0, **overrides: Any
) -> tuple[Page, list[str]]:
    """A school page with the widget, open, whose token endpoint returns `jwt`, on a browser whose clock
    is `ahead_s` ahead of the server's: the page, once the chat is online, and the token requests so far."""
    _, tutor, port = await _tutor_for_a_school(serve, **overrides)
    pages: dict[str, str | tuple[str, str]] = {"/": widget_page(tutor, TENANT), "/smartedu/token": (jwt, "text/plain")}
    page = await browser.new_page()
    fetches: list[str] = []
    page.on("request", lambda r: fetches.append(r.url) if r.url.endswith("/smartedu/token") else None)
    if ahead_s:
        await page.clock.install(time=time.time() + ahead_s)
    async with host_site(pages, port=port) as school:
        await page.goto(f"{school}/")
        await page.frame_locator("#smartedu-widget iframe").locator('.se-status[data-state="online"]').wait_for()
    return page, fetches


async def test_the_widget_does_not_refetch_a_long_lived_token_in_a_loop(serve: Serve, browser: Browser) -> None:
    """A 30-day token: its refresh delay used to overflow setTimeout (over 2^31 - 1 ms), which fires at once."""
    # The server refuses tokens over SMARTEDU_MAX_TOKEN_LIFETIME_S (a day by default): raised for this one.
    long_lived = token("stu-embed", tenant=TENANT, ttl_s=30 * 86400)
    page, fetches = await _widget_fetches(serve, browser, long_lived, max_token_lifetime_s=31 * 86400)
    await page.wait_for_timeout(1500)
    assert len(fetches) == 1
    await page.close()


async def test_the_widget_refreshes_by_the_token_lifetime_not_a_client_clock_ahead(
    serve: Serve, browser: Browser
) -> None:
    """The browser's clock is 20 minutes ahead: a fresh 15-minute token looks expired by it. The refresh
    is counted from the token's own lifetime (exp - iat), so it comes after about 13.5 minutes, not
    every 5 seconds."""
    jwt = token("stu-embed", tenant=TENANT, ttl_s=900)
    page, fetches = await _widget_fetches(serve, browser, jwt, ahead_s=1200)
    for _ in range(3):
        await page.clock.fast_forward(60_000)
        await page.wait_for_timeout(300)
    assert len(fetches) == 1
    await page.clock.fast_forward(11 * 60_000)  # 14 minutes in all
    for _ in range(50):  # the refresh is due: its request goes out in a moment
        if len(fetches) == 2:
            break
        await page.wait_for_timeout(100)
    assert len(fetches) == 2
    await page.close()


# -- kill -9 and restart while an answer streams ------------------------------------------------------


def _start(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


async def _until_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(150):
            if proc.poll() is not None:
                raise AssertionError(f"smartedu serve exited with {proc.returncode}:\n{_tail(log)}")
            try:
                async with session.get(f"{url}/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"smartedu serve did not become ready:\n{_tail(log)}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Server processes a test starts; whatever is still running at the end is stopped and reaped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        interrupt(proc, 20)


async def test_the_framed_chat_survives_a_killed_and_restarted_server(
    settings: Settings, browser: Browser, tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    assert settings.database_url and settings.redis_url
    await seed_course(settings, TENANT, COURSE, "Algebra I")
    port, school_port = free_port(), free_port()
    tutor = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMARTEDU_", "GEMINI_", "OPENAI_"))}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        SMARTEDU_REDIS_PREFIX=settings.redis_prefix,
        SMARTEDU_JWT_SECRET=TEST_SECRET,
        SMARTEDU_DATA_DIR=str(tmp_path / "data"),
        SMARTEDU_AI="offline",
        SMARTEDU_OFFLINE_TTFT_MS="50",
        SMARTEDU_OFFLINE_TOKENS_PER_S="15",
        SMARTEDU_ALLOWED_ORIGINS=f"http://localhost:{school_port}",  # the configured (not per-tenant) list
        SMARTEDU_LOG_LEVEL="WARNING",
    )
    log = tmp_path / "serve.log"
    processes.append(_start(port, env, log))
    await _until_ready(processes[-1], tutor, log)

    async with host_site({"/": school_page(tutor, STUDENT)}, port=school_port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(f"{school}/")
        chat = page.frame_locator("#tutor")
        status = chat.locator(".se-status")
        await chat.locator('.se-status[data-state="online"]').wait_for()
        await _ask(chat, "Tell me about prime numbers")
        reply = chat.locator(".se-msg--assistant").last
        await chat.locator('.se-msg--assistant[data-status="streaming"]').wait_for(timeout=ANSWER_WAIT_MS)
        await page.wait_for_timeout(800)  # some of the answer, not all of it

        processes[-1].kill()  # SIGKILL: no drain, no goodbye; the answer's lease is left to expire
        processes[-1].wait()
        await chat.locator('.se-status[data-state="reconnecting"]').wait_for()
        assert await reply.get_attribute("data-status") == "streaming"
        processes.append(_start(port, env, log))
        await _until_ready(processes[-1], tutor, log)

        # Back online, resumed; the new process takes the abandoned answer over and ends it.
        await chat.locator('.se-status[data-state="online"]').wait_for(timeout=20_000)
        await chat.locator('.se-msg--assistant[data-status="interrupted"]').wait_for(timeout=20_000)
        assert await status.get_attribute("data-state") == "online"
        frame = next(f for f in page.frames if "/embed" in f.url)
        conversation = await frame.evaluate("SmartEdu.client.conversationId")
        messages = await _committed(tutor, conversation)
        assert [m["role"] for m in messages] == ["user", "assistant"]
        answer = messages[-1]
        assert answer["status"] == "interrupted" and answer["text"]
        # A gap in what the page saw is filled from the REST API before the text is final.
        await frame.wait_for_function("id => SmartEdu.client.byServerId.get(id).gap === false", arg=answer["id"])
        await _shown(page, chat, answer)
        await page.close()
        assert problems == []
