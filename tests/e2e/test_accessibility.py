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
    await _tab_to(page, r"^button\.st-student Ada")
    await page.keyboard.press("Enter")
    await page.wait_for_function("() => document.activeElement.id === 'st-convo-title'")
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
