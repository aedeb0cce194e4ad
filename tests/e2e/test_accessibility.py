"""Keyboard-only use and an automated accessibility check (axe-core) of /chat, /embed and /teacher.

axe-core is vendored under tests/e2e/vendor/axe-core (MPL-2.0) so the check runs offline. The pages
forbid injected scripts (CSP `script-src 'self'`), so the audited browser contexts bypass the CSP;
the keyboard tests run under the real CSP.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest

from tests.conftest import Serve, Server, seed_course, token
from tests.e2e.helpers import ANSWER_WAIT_MS, Problems, browser, new_page

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser, BrowserContext, Page

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
TENANT = "school-a"
COURSE = "algebra-1"
STUDENT = token("stu-a11y", tenant=TENANT, name="Ada")
TEACHER = token("tea-a11y", role="teacher", tenant=TENANT, courses=[COURSE], name="Ms Rivera")
SERIOUS = ("serious", "critical")
Scheme = Literal["light", "dark"]


async def _focused(page: Page) -> str:
    """A short description of the focused element: tag, class and accessible label."""
    described: str = await page.evaluate(
        "() => { const e = document.activeElement;"
        " return `${e.tagName.toLowerCase()}.${e.className} ${e.getAttribute('aria-label') || e.textContent.trim()}` }"
    )
    return described


async def _tab_to(page: Page, pattern: str, limit: int = 12) -> str:
    """Press Tab until the focused element matches `pattern` (within `limit` presses)."""
    seen = []
    for _ in range(limit):
        await page.keyboard.press("Tab")
        focused = await _focused(page)
        if re.search(pattern, focused):
            return focused
        seen.append(focused)
    raise AssertionError(f"Tab never reached {pattern!r}; focus went {seen}")


async def _focus_reaches(page: Page, element_id: str) -> None:
    await page.wait_for_function("id => document.activeElement.id === id", arg=element_id)


async def _activate(page: Page, pattern: str, focus_goes_to: str, limit: int = 12) -> None:
    """Tab to the control matching `pattern`, press Enter, and wait for the focus to move to `focus_goes_to`."""
    await _tab_to(page, pattern, limit)
    await page.keyboard.press("Enter")
    await _focus_reaches(page, focus_goes_to)


async def _live(serve: Serve, **overrides: Any) -> Server:
    server = await serve(**overrides)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    return server


def _url(server: Server, path: str) -> str:
    return str(server.client.make_url(path))


async def test_chat_works_from_the_keyboard_alone(serve: Serve, browser: Browser) -> None:
    server = await _live(serve, offline_ttft_ms=50, offline_tokens_per_s=15)
    problems = Problems()
    page = await new_page(browser, problems)
    await page.goto(_url(server, "/chat") + f"#course={COURSE}&token={STUDENT}")
    await page.wait_for_selector('.se-status[data-state="online"]')
    await _tab_to(page, r"^textarea\.se-input")
    await page.keyboard.type("Explain slope slowly")
    await page.keyboard.press("Enter")
    await page.wait_for_selector('.se-msg--assistant[data-status="streaming"]', timeout=ANSWER_WAIT_MS)
    assert await page.evaluate("document.activeElement.classList.contains('se-input')")  # still in the composer
    assert "Stop the answer" in await _tab_to(page, r"Stop the answer", limit=1)  # Stop comes right after
    await page.keyboard.press("Space")
    await page.wait_for_selector('.se-msg--assistant[data-status="stopped"]', timeout=ANSWER_WAIT_MS)
    # Stop disappears with the answer; focus goes back to the composer instead of to the page.
    await page.wait_for_function("() => document.activeElement.classList.contains('se-input')")
    assert problems == []


async def test_teacher_dashboard_works_from_the_keyboard_alone(serve: Serve, browser: Browser) -> None:
    server = await _live(serve)
    problems = Problems()
    student = await new_page(browser, problems, "student")
    await student.goto(_url(server, "/chat") + f"#course={COURSE}&token={STUDENT}")
    await student.wait_for_selector('.se-status[data-state="online"]')
    page = await new_page(browser, problems, "teacher")
    await page.goto(_url(server, "/teacher") + f"#token={TEACHER}")
    await page.wait_for_selector(".st-student")
    await _activate(page, r"^button\.st-student Ada", "st-convo-title")
    await _tab_to(page, r"Pause AI tutor for Ada", limit=1)
    await page.keyboard.press("Space")
    await page.wait_for_selector('.st-ai__state[data-paused="true"]')
    await student.wait_for_selector('.se-notice[data-code="ai-paused"]')
    await _tab_to(page, r"^textarea\.se-input", limit=3)
    await page.keyboard.type("I have paused the tutor: let's work on this together.")
    await page.keyboard.press("Enter")
    await student.wait_for_selector('.se-msg--teacher:has-text("let\'s work on this together")')
    assert problems == []


async def _audit(where: Page, what: str) -> list[str]:
    """Serious and critical axe-core violations on the page, one readable line each."""
    await where.add_script_tag(path=str(AXE))
    result = await where.evaluate("() => axe.run(document, { resultTypes: ['violations'] })")
    return [
        f"{what}: {v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:5]}"
        for v in result["violations"]
        if v["impact"] in SERIOUS
    ]


async def _context(browser: Browser, scheme: Scheme, **options: Any) -> BrowserContext:
    return await browser.new_context(
        bypass_csp=True,
        color_scheme=scheme,
        viewport=options.pop("viewport", {"width": 1100, "height": 760}),
        **options,
    )


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_pages_have_no_serious_accessibility_violations(serve: Serve, browser: Browser, scheme: Scheme) -> None:
    """Every page in a busy state: an answer, a teacher's message, the AI paused, a conversation open."""
    server = await _live(serve, offline_ttft_ms=0, offline_tokens_per_s=0)
    problems = Problems()
    context = await _context(browser, scheme)
    try:
        chat = await new_page(context, problems, "chat")
        await chat.goto(_url(server, "/chat") + f"#course={COURSE}&token={STUDENT}")
        await chat.wait_for_selector('.se-status[data-state="online"]')
        await chat.fill(".se-input", "What is a **prime** number? `code` too")
        await chat.press(".se-input", "Enter")
        await chat.wait_for_selector('.se-msg--assistant[data-status="complete"]', timeout=ANSWER_WAIT_MS)

        teacher = await new_page(context, problems, "teacher")
        await teacher.goto(_url(server, "/teacher") + f"#token={TEACHER}")
        await teacher.get_by_role("button", name=re.compile(r"^Ada")).click()
        await teacher.wait_for_selector('.st-messages .se-msg--assistant[data-status="complete"]')
        await teacher.fill("#st-input", "Well done, **Ada**. Try [the next exercise](https://example.org/ex/4).")
        await teacher.press("#st-input", "Enter")
        await teacher.get_by_role("button", name="Pause AI tutor for Ada").click()
        await teacher.wait_for_selector('.st-ai__state[data-paused="true"]')
        await chat.wait_for_selector(".se-msg--teacher")
        await chat.wait_for_selector('.se-notice[data-code="ai-paused"]')
        await teacher.wait_for_selector(".st-messages .se-msg--teacher[data-id]")

        embed = await new_page(context, problems, "embed")
        await embed.goto(_url(server, "/embed") + f"?course={COURSE}&tenant={TENANT}#token={STUDENT}")
        await embed.wait_for_selector('.se-status[data-state="online"]')
        await embed.wait_for_selector(".se-msg--teacher")

        phone = await new_page(context, problems, "teacher-phone", viewport={"width": 360, "height": 720})
        await phone.goto(_url(server, "/teacher") + f"#token={TEACHER}")
        await phone.get_by_role("button", name=re.compile(r"^Ada")).click()
        await phone.wait_for_selector(".st-messages .se-msg--teacher[data-id]")

        # The list of the student's conversations open, with the current one marked.
        await chat.get_by_role("button", name="Earlier conversations").click()
        await chat.wait_for_selector('.se-conversation[aria-current="true"]')

        violations = (
            await _audit(chat, f"/chat {scheme}")
            + await _audit(embed, f"/embed {scheme}")
            + await _audit(teacher, f"/teacher {scheme}")
            + await _audit(phone, f"/teacher 360px {scheme}")
        )
        assert violations == []
        assert problems == []
    finally:
        await context.close()


async def _with_notes(serve: Serve) -> Server:
    """A live server whose course has one document, "Notes"."""
    server = await _live(serve)
    response = await server.client.post(
        f"/api/courses/{COURSE}/documents",
        json={"name": "Notes", "body": "Slope is rise over run."},
        headers={"Authorization": f"Bearer {TEACHER}"},
    )
    assert response.status == 201, await response.text()
    return server


async def test_course_documents_work_from_the_keyboard_alone(serve: Serve, browser: Browser) -> None:
    server = await _with_notes(serve)
    problems = Problems()
    page = await new_page(browser, problems, "teacher")
    await page.goto(_url(server, "/teacher") + f"#token={TEACHER}")
    await page.wait_for_selector(".st-course__docs")
    await _activate(page, r"Documents of Algebra I", "st-docs-title")
    await page.get_by_role("button", name="Read Notes").wait_for()  # the list, read over HTTP
    await _activate(page, r"Read Notes", "st-docs-viewer-title", limit=3)
    await _activate(page, r"Replace the text of Notes", "st-docs-form-title", limit=1)
    await _tab_to(page, r"^textarea\.st-field", limit=4)
    await page.keyboard.press("End")
    await page.keyboard.type(" A flat line has slope 0.")
    await _tab_to(page, r"^button\.se-button.* Save", limit=1)
    await page.keyboard.press("Enter")
    await page.locator(".st-docs__form-msg").get_by_text("Saved \u201cNotes\u201d").wait_for()
    # Saving shows the document again, its heading focused: delete it from there, confirming by keyboard.
    await _focus_reaches(page, "st-docs-viewer-title")
    assert "A flat line has slope 0." in (await page.locator(".st-docs__text").text_content() or "")
    await _tab_to(page, r"Delete Notes", limit=2)
    await page.keyboard.press("Enter")
    assert "Cancel" in await _focused(page)  # a stray Enter deletes nothing
    await page.keyboard.press("Shift+Tab")
    assert "Delete Notes for good" in await _focused(page)
    await page.keyboard.press("Enter")
    await page.get_by_text("No documents yet. Add one below.").wait_for()
    await _focus_reaches(page, "st-docs-title")
    await page.keyboard.press("Escape")  # back to the list, where the panel was opened from
    await page.locator(".st-docs").wait_for(state="hidden")
    assert "Documents of Algebra I" in await _focused(page)
    assert problems == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
async def test_the_documents_panel_has_no_serious_accessibility_violations(
    serve: Serve, browser: Browser, scheme: Scheme
) -> None:
    """The panel with a document open, a delete to confirm and an upload refused for a name already used."""
    server = await _with_notes(serve)
    problems = Problems()
    context = await _context(browser, scheme)
    try:
        page = await new_page(context, problems, "teacher")
        await page.goto(_url(server, "/teacher") + f"#token={TEACHER}")
        await page.get_by_role("button", name="Documents of Algebra I").click()
        await page.get_by_role("button", name="Read Notes").click()
        await page.locator(".st-docs__viewer h3").get_by_text("Notes").wait_for()
        await page.get_by_label("Name").fill("Notes")
        await page.get_by_label("Text", exact=True).fill("Another text.")
        await page.get_by_role("button", name="Upload").click()
        await page.locator(".st-docs__form-msg").get_by_role("button", name="Replace \u201cNotes\u201d").wait_for()
        await page.locator(".st-docs__viewer").get_by_role("button", name="Delete Notes").click()
        await page.get_by_role("button", name="Delete Notes for good").wait_for()
        phone = await new_page(context, problems, "teacher-phone", viewport={"width": 360, "height": 720})
        await phone.goto(_url(server, "/teacher") + f"#token={TEACHER}")
        await phone.get_by_role("button", name="Documents of Algebra I").click()
        await phone.get_by_role("button", name="Read Notes").click()
        await phone.locator(".st-docs__viewer h3").get_by_text("Notes").wait_for()
        assert await phone.locator(".st-side").is_hidden()  # the panel takes the screen

        violations = await _audit(page, f"/teacher documents {scheme}") + await _audit(
            phone, f"/teacher documents 360px {scheme}"
        )
        assert violations == []
        assert problems == []
    finally:
        await context.close()
