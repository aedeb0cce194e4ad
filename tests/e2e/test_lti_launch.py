"""The LTI launch page's last step (static/lti-launch.js) in real headless Chromium: it goes only to a
path on its own origin, judged by the URL the browser makes of the target (browsers drop tabs and newlines,
so a target that starts '/<tab>/' leads to another host)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.helpers import Problems, browser, host_site, new_page

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

LAUNCH_JS = (Path(__file__).resolve().parents[2] / "static" / "lti-launch.js").read_text(encoding="utf-8")
REFUSED = "The launch could not be completed. Open the tutor again from your course."


def _page(target: str) -> str:
    return (
        '<!doctype html><html><head><script src="/lti-launch.js" defer></script></head><body>'
        f'<main data-lti-launch data-lti-target="{html.escape(target)}" data-lti-window="same">'
        "<p data-lti-status>Opening the tutor…</p><a data-lti-continue hidden>continue</a></main></body></html>"
    )


@pytest.mark.parametrize(
    "target",
    [
        pytest.param("/\t/elsewhere.example/chat", id="tab"),
        pytest.param("/\n/elsewhere.example/chat", id="newline"),
        pytest.param("/\\elsewhere.example/chat", id="backslash"),
        pytest.param("//elsewhere.example/chat", id="scheme-relative"),
        pytest.param("javascript:alert(1)", id="javascript"),
    ],
)
async def test_a_target_on_another_origin_is_refused(browser: Browser, target: str) -> None:
    problems = Problems()
    page = await new_page(browser, problems)
    pages: dict[str, str | tuple[str, str]] = {
        "/launch": _page(target),
        "/lti-launch.js": (LAUNCH_JS, "text/javascript"),
    }
    async with host_site(pages) as origin:
        await page.goto(f"{origin}/launch")
        status = page.locator("[data-lti-status]")
        await status.filter(has_text=REFUSED).wait_for(timeout=5000)
        assert page.url == f"{origin}/launch"
    assert problems == []


async def test_a_path_on_its_own_origin_is_opened(browser: Browser) -> None:
    problems = Problems()
    page = await new_page(browser, problems)
    pages: dict[str, str | tuple[str, str]] = {
        "/launch": _page("/landing#token=abc"),
        "/lti-launch.js": (LAUNCH_JS, "text/javascript"),
        "/landing": "<!doctype html><html><body><p id=landed>here</p></body></html>",
    }
    async with host_site(pages) as origin:
        await page.goto(f"{origin}/launch")
        await page.locator("#landed").wait_for(timeout=5000)
        assert page.url == f"{origin}/landing#token=abc"
    assert problems == []
