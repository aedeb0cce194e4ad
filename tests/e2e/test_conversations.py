"""The widget's conversations in real headless Chromium against a running app: New conversation, the list
of earlier ones, and going back, with the right messages shown each time."""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg
import pytest

from tests.conftest import Serve, Server, seed_course, token
from tests.e2e.helpers import ANSWER_WAIT_MS, Problems, new_page

pytestmark = pytest.mark.e2e

with contextlib.suppress(ImportError):  # without playwright, the `browser` fixture skips (or fails in CI)
    from playwright.async_api import Browser, Page

TENANT = "school-a"
COURSE = "algebra-1"
STUDENT = token("stu-conv", tenant=TENANT, name="Ada")


async def _ask(page: Page, text: str) -> None:
    await page.fill(".se-input", text)
    await page.press(".se-input", "Enter")
    await page.wait_for_function(
        "n => document.querySelectorAll('.se-msg--assistant[data-status=\"complete\"]').length === n",
        arg=await page.locator(".se-msg--user").count(),
        timeout=ANSWER_WAIT_MS,
    )


async def _questions(page: Page) -> list[str]:
    return await page.locator(".se-msg--user .se-bubble__body").all_text_contents()


async def _switched(page: Page, before: str | None) -> str:
    """Wait for the welcome of another conversation than `before`; its id."""
    await page.wait_for_function(
        "before => SmartEdu.client.ready && SmartEdu.client.conversationId !== before", arg=before
    )
    conversation: str = await page.evaluate("SmartEdu.client.conversationId")
    stored = await page.evaluate(f"sessionStorage.getItem('smartedu.conversation.{COURSE}')")
    assert stored == conversation
    return conversation


async def _listed(server: Server, conversation: str) -> list[dict[str, Any]]:
    response = await server.client.get(
        f"/api/conversations/{conversation}/messages", headers={"Authorization": f"Bearer {STUDENT}"}
    )
    assert response.status == 200
    messages: list[dict[str, Any]] = (await response.json())["messages"]
    return messages


async def _open_chat(serve: Serve, browser: Browser, problems: Problems, tokens_per_s: int) -> tuple[Server, Page]:
    server = await serve(offline_ttft_ms=0, offline_tokens_per_s=tokens_per_s)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    page = await new_page(browser, problems)
    await page.goto(str(server.client.make_url("/chat")) + f"#course={COURSE}&token={STUDENT}")
    await page.wait_for_selector('.se-status[data-state="online"]')
    return server, page


async def test_new_conversation_then_back_to_the_earlier_one(serve: Serve, browser: Browser) -> None:
    problems = Problems()
    server, page = await _open_chat(serve, browser, problems, 400)
    first = await page.evaluate("SmartEdu.client.conversationId")
    await _ask(page, "What is a prime number?")

    new_button = page.get_by_role("button", name="New conversation")
    await new_button.click()
    second = await _switched(page, first)
    assert await _questions(page) == [] and await page.locator(".se-empty").is_visible()
    await _ask(page, "How do I factor x^2 - 1?")
    assert await _questions(page) == ["How do I factor x^2 - 1?"]
    # The tutor's answer in the new conversation recalls nothing of the old one.
    answer = await page.locator(".se-msg--assistant .se-bubble__body").last.text_content()
    assert answer and "prime" not in answer

    # Back to the first one from the keyboard: Tab to the list's toggle, open it, pick the conversation.
    toggle = page.get_by_role("button", name="Earlier conversations")
    await toggle.focus()
    await page.keyboard.press("Enter")
    assert await toggle.get_attribute("aria-expanded") == "true"
    items = page.locator(".se-conversation")
    await items.nth(1).wait_for()
    titles = await page.locator(".se-conversation__title").all_text_contents()
    assert titles == ["How do I factor x^2 - 1?", "What is a prime number?"]
    assert await items.nth(0).get_attribute("aria-current") == "true"
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")  # past the current conversation, to the earlier one
    focused: str = await page.evaluate("document.activeElement.textContent")
    assert focused.startswith("What is a prime number?"), focused
    await page.keyboard.press("Enter")
    assert await _switched(page, second) == first
    assert await _questions(page) == ["What is a prime number?"]
    old = await _listed(server, first)
    shown = await page.locator(".se-msg[data-id]").evaluate_all("els => els.map(e => Number(e.dataset.id))")
    assert shown == [m["id"] for m in old]
    assert await toggle.get_attribute("aria-expanded") == "false"
    assert await page.evaluate("document.activeElement.classList.contains('se-input')")

    # Escape closes the list (and only the list). Both conversations have messages, so New conversation
    # makes a third; pressing it again before asking anything reuses that empty one.
    await toggle.click()
    await items.first.wait_for()
    await page.keyboard.press("Escape")
    assert await toggle.get_attribute("aria-expanded") == "false"
    assert await page.locator(".se-conversations").is_hidden()
    await new_button.click()
    third = await _switched(page, first)
    assert third not in (first, second)
    await new_button.click()
    await page.wait_for_function("() => SmartEdu.client.ready")
    assert await page.evaluate("SmartEdu.client.conversationId") == third
    assert problems == []


async def test_switching_waits_while_an_answer_streams(serve: Serve, browser: Browser) -> None:
    problems = Problems()
    _, page = await _open_chat(serve, browser, problems, 8)
    new_button = page.get_by_role("button", name="New conversation")
    assert await new_button.is_enabled()
    await page.fill(".se-input", "Explain slope slowly")
    await page.press(".se-input", "Enter")
    await page.wait_for_selector('.se-msg--assistant[data-status="streaming"]', timeout=ANSWER_WAIT_MS)
    assert await new_button.is_disabled()
    assert await page.get_by_role("button", name="Earlier conversations").is_disabled()
    await page.get_by_role("button", name="Stop the answer").click()
    await page.wait_for_selector('.se-msg--assistant[data-status="stopped"]', timeout=ANSWER_WAIT_MS)
    assert await new_button.is_enabled()
    assert problems == []


async def test_the_list_without_a_course_is_asked_of_the_server(serve: Serve, browser: Browser) -> None:
    """A chat opened without a course lists the student's conversations without a course, even when
    more than a page of newer ones are in other courses (a page that took the newest 20 of all of them
    and filtered them itself showed "No conversations yet")."""
    problems = Problems()
    server = await serve(offline_ttft_ms=0, offline_tokens_per_s=400)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    page = await new_page(browser, problems)
    await page.goto(str(server.client.make_url("/chat")) + f"#token={STUDENT}")
    await page.wait_for_selector('.se-status[data-state="online"]')
    assert await page.evaluate("SmartEdu.client.courseId") is None
    await _ask(page, "A question without a course")
    assert server.settings.database_url
    conn = await asyncpg.connect(server.settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO conversations (tenant_id, user_id, course_id, title, updated_at)"
            " SELECT $1, id, $2, 'Algebra ' || n, now() + n * interval '1 second'"
            " FROM users, generate_series(1, 25) AS n WHERE tenant_id = $1 AND external_id = $3",
            TENANT,
            COURSE,
            "stu-conv",
        )
    finally:
        await conn.close()

    await page.get_by_role("button", name="Earlier conversations").click()
    await page.wait_for_function(
        "() => !document.querySelector('.se-conversations__note').textContent.startsWith('Loading')"
    )
    titles = await page.locator(".se-conversation__title").all_text_contents()
    assert titles == ["A question without a course"]
    assert await page.locator(".se-conversation").first.get_attribute("aria-current") == "true"
    assert problems == []
