"""widget.js on a school's own pages, in real headless Chromium: a host page with a strict CSP of its
own, two widget tags (two courses) and the tag added, removed and added again as an SPA does, a token
URL that fails, answers slowly or hands out expired tokens, and host styles (`button { all: unset }`,
a huge root font size, a sticky header with a high z-index, `dir=rtl`, a phone viewport).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web

from server.keys import SOCKETS
from tests.conftest import Serve, seed_course, token
from tests.e2e.helpers import HostHandler, Pages, Problems, browser, host_site, new_page
from tests.e2e.test_embed import COURSE, STUDENT, TENANT, _tutor_for_a_school

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

OTHER_COURSE = "geometry-1"
ONLINE = '.se-status[data-state="online"]'


def tag(tutor: str, course: str = COURSE, **data: str) -> str:
    attrs = "".join(f' data-{name}="{value}"' for name, value in data.items())
    return (
        f'<script src="{tutor}/static/widget.js" data-course="{course}" data-tenant="{TENANT}"'
        f' data-token-url="/smartedu/token"{attrs} async></script>'
    )


def page_with(body: str, head: str = "", dir: str = "ltr") -> str:
    return (
        f'<!doctype html>\n<html lang="en" dir="{dir}"><head><meta charset="utf-8"><title>Springfield High</title>'
        f"{head}</head>\n<body><h1>Week 3: prime numbers</h1>\n{body}\n</body></html>"
    )


def html(body: str, **headers: str) -> HostHandler:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=body, content_type="text/html", headers=headers)

    return handler


def tokens(answers: list[tuple[int, str]], requests: list[str]) -> HostHandler:
    """A token endpoint answering `(status, body)` in turn (the last one from then on); status 0 means
    it hangs (5 s, then 503: the browser's clock is faked, so the widget gives up long before)."""

    async def handler(request: web.Request) -> web.Response:
        status, body = answers[min(len(requests), len(answers) - 1)]
        requests.append(request.path)
        if status == 0:
            await asyncio.sleep(5)
            status = 503
        return web.Response(status=status, text=body, content_type="text/plain")

    return handler


async def launchers(page: Page) -> list[dict[str, Any]]:
    """Every widget launcher on the page, with its box and the element on top at its centre."""
    found: list[dict[str, Any]] = await page.evaluate(
        """() => [...document.querySelectorAll('body > div')].filter(h => h.shadowRoot).flatMap(h =>
          [...h.shadowRoot.querySelectorAll('.launcher')].map(b => {
            const r = b.getBoundingClientRect();
            const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return { course: h.dataset.course || null, x: r.x, y: r.y, width: r.width, height: r.height,
                     onTop: top === h && h.shadowRoot.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2)
                       .closest('.launcher') === b,
                     frames: h.shadowRoot.querySelectorAll('iframe').length };
          }))"""
    )
    return found


async def test_the_widget_works_under_the_host_pages_strict_csp(serve: Serve, browser: Browser) -> None:
    """The host allows scripts from the tutor only and styles from itself only (no 'unsafe-inline',
    no 'unsafe-eval'): the launcher is styled and the chat gets online, with no CSP violation reported."""
    _, tutor, port = await _tutor_for_a_school(serve)
    csp = (
        f"default-src 'none'; script-src {tutor}; style-src 'self'; connect-src 'self'; frame-src {tutor};"
        " img-src 'self'"
    )
    page_csp = {"Content-Security-Policy": csp}
    pages: Pages = {
        "/": html(page_with(tag(tutor, open="true")), **page_csp),
        "/smartedu/token": (STUDENT, "text/plain"),
    }
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(f"{school}/")
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        [launcher] = await launchers(page)
        assert (launcher["width"], launcher["height"]) == (56, 56) and launcher["onTop"]
        assert problems == []
        await page.close()


async def test_two_courses_and_a_repeated_tag_give_one_launcher_per_course(serve: Serve, browser: Browser) -> None:
    """Two tags for two courses, and the first tag included twice: each course gets its own launcher
    (they used to be dropped after the first), not on top of each other, each opening its own course;
    opening one closes the other."""
    server, tutor, port = await _tutor_for_a_school(serve)
    await seed_course(server.settings, TENANT, OTHER_COURSE, "Geometry")
    body = tag(tutor) + tag(tutor, OTHER_COURSE, label="Ask the geometry tutor") + tag(tutor)
    async with host_site({"/": page_with(body), "/smartedu/token": (STUDENT, "text/plain")}, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(f"{school}/")
        await page.wait_for_function("document.querySelectorAll('body > div').length >= 1")
        await page.wait_for_timeout(300)  # every tag has run
        shown = await launchers(page)
        assert sorted(item["course"] for item in shown) == [COURSE, OTHER_COURSE]
        first, second = shown
        assert first["x"] >= second["x"] + second["width"] or second["x"] >= first["x"] + first["width"]
        assert first["onTop"] and second["onTop"]
        geometry = page.locator(f'[data-course="{OTHER_COURSE}"] .launcher')
        await geometry.click()
        frame = page.frame_locator(f'[data-course="{OTHER_COURSE}"] iframe')
        await frame.locator(ONLINE).wait_for()
        src = await page.locator(f'[data-course="{OTHER_COURSE}"] iframe').get_attribute("src")
        assert src and f"course={OTHER_COURSE}" in src
        await page.locator(f'[data-course="{COURSE}"] .launcher').click()
        await page.frame_locator(f'[data-course="{COURSE}"] iframe').locator(ONLINE).wait_for()
        assert await geometry.get_attribute("aria-expanded") == "false"
        assert await page.locator(f'[data-course="{OTHER_COURSE}"] .panel').is_hidden()
        assert [item["frames"] for item in await launchers(page)] == [1, 1]
        assert problems == []
        await page.close()


ADD_TAG = """([src, course]) => { const s = document.createElement('script'); s.src = src; s.async = true;
  s.dataset.course = course; s.dataset.tenant = 'school-a'; s.dataset.tokenUrl = '/smartedu/token';
  document.body.appendChild(s); }"""
# What an SPA's navigation does: the page's content (the widget and its tag among it) is replaced.
NAVIGATE = (
    "() => { document.body.replaceChildren(Object.assign(document.createElement('h1'), {textContent: 'Week 4'})) }"
)


async def test_a_tag_added_after_load_removed_and_added_again_by_an_spa(serve: Serve, browser: Browser) -> None:
    """The tag is added after load, the SPA navigates (replacing the body, widget and open chat with it)
    and adds the tag again: one launcher again (there was none: the second run saw the first one's
    global and stopped), its chat online again, and no socket or token refresh left over from before."""
    server, tutor, port = await _tutor_for_a_school(serve)
    fetches: list[str] = []
    pages: Pages = {"/": page_with(""), "/smartedu/token": tokens([(200, STUDENT)], fetches)}
    open_sockets = server.client.app[SOCKETS]
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(f"{school}/")
        src = f"{tutor}/static/widget.js"
        await page.evaluate(ADD_TAG, [src, COURSE])
        await page.locator("#smartedu-widget .launcher").click()
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        for _ in range(2):
            await page.evaluate(NAVIGATE)
            await page.wait_for_function("() => !document.getElementById('smartedu-widget')")
            await page.evaluate(ADD_TAG, [src, COURSE])
            await page.locator("#smartedu-widget .launcher").wait_for()
            await page.evaluate(ADD_TAG, [src, COURSE])  # added twice by a careless template
            await page.wait_for_timeout(300)
            assert len(await launchers(page)) == 1
            await page.locator("#smartedu-widget .launcher").click()
            await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
            for _ in range(50):  # the removed chat's socket is closed (the server sees it go)
                if len(open_sockets) == 1:
                    break
                await asyncio.sleep(0.1)
            assert len(open_sockets) == 1
        assert len(await launchers(page)) == 1
        assert len(fetches) == 3  # one per chat opened
        assert problems == []
        await page.close()


SAYS = "#smartedu-widget .notice"


async def test_a_failing_token_url_is_explained_and_retried(serve: Serve, browser: Browser) -> None:
    """401 (not signed in on the school's site), 500, a network error and an endpoint that never answers:
    the panel says what is wrong instead of staying on "Connecting" for good, retries by itself, offers
    Try again, and the chat gets online once a token comes."""
    _, tutor, port = await _tutor_for_a_school(serve)
    fetches: list[str] = []
    answers = [(401, "sign in"), (500, "oops"), (0, ""), (200, STUDENT)]
    pages: Pages = {"/": page_with(tag(tutor, open="true")), "/smartedu/token": tokens(answers, fetches)}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.clock.install()
        await page.goto(f"{school}/")
        notice = page.locator(SAYS)
        await notice.filter(has_text="Sign in to your school").wait_for()
        await page.locator(f"{SAYS} button").click()  # Try again
        await notice.filter(has_text="could not sign you in").wait_for()
        assert len(fetches) == 2
        await page.clock.fast_forward(11_000)  # the automatic retry (after 10 s): this request hangs
        await notice.filter(has_text="Signing you in").wait_for()
        assert len(fetches) == 3
        await page.clock.fast_forward(16_000)  # given up on after 15 s
        await notice.filter(has_text="could not sign you in").wait_for()
        await page.clock.fast_forward(21_000)
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        await notice.wait_for(state="hidden")
        assert len(fetches) == 4
        await page.close()
        assert problems == []


async def test_a_network_error_at_the_token_url_is_explained(serve: Serve, browser: Browser) -> None:
    _, tutor, port = await _tutor_for_a_school(serve)
    pages: Pages = {"/": page_with(tag(tutor, open="true")), "/smartedu/token": (STUDENT, "text/plain")}
    async with host_site(pages, port=port) as school:
        page = await browser.new_page()
        await page.route("**/smartedu/token", lambda route: route.abort("connectionreset"))
        await page.goto(f"{school}/")
        await page.locator(SAYS).filter(has_text="could not sign you in").wait_for()
        await page.unroute("**/smartedu/token")
        await page.locator(f"{SAYS} button").click()
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        await page.close()


async def test_expired_tokens_are_replaced_again_and_again(serve: Serve, browser: Browser) -> None:
    """Each 4401 makes the chat ask for a new token (smartedu:token-expired), and the widget fetches one:
    two expired tokens in a row, then a valid one."""
    _, tutor, port = await _tutor_for_a_school(serve)
    expired = [token("stu-embed", tenant=TENANT, name=name, ttl_s=-3600) for name in ("Ada", "Ada L.")]
    fetches: list[str] = []
    answers = [(200, expired[0]), (200, expired[1]), (200, STUDENT)]
    pages: Pages = {"/": page_with(tag(tutor, open="true")), "/smartedu/token": tokens(answers, fetches)}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems)
        await page.goto(f"{school}/")
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        assert len(fetches) == 3
        assert problems == []
        await page.close()


HOSTILE_STYLES = """<style>
  * { box-sizing: content-box !important; }
  html { font-size: 48px; }
  button { all: unset; }
  div { padding: 30px; transform: none; }
  .sticky { position: fixed; bottom: 0; left: 0; right: 0; height: 120px; z-index: 2147483647;
            background: #0f3d75; }
</style>"""


@pytest.mark.parametrize(
    ("direction", "viewport", "zoom"),
    [
        ("ltr", {"width": 1100, "height": 760}, "1"),
        ("rtl", {"width": 360, "height": 640}, "1"),
        ("ltr", {"width": 1100, "height": 760}, "1.5"),
    ],
)
async def test_host_styles_do_not_hide_or_break_the_launcher(
    serve: Serve, browser: Browser, direction: str, viewport: dict[str, int], zoom: str
) -> None:
    """Host CSS that resets buttons, boxes and fonts, a full-width sticky footer at the top z-index,
    `dir=rtl`, a phone viewport and a CSS zoom on the page: the launcher keeps its size, stays on screen
    and on top, is reached with Tab and opened with Enter, and the open panel fits in the viewport (with
    `html { zoom: 1.5 }` its top was 330 px above the screen)."""
    _, tutor, port = await _tutor_for_a_school(serve)
    body = '<p><a href="#a">A link</a></p><div class="sticky">Sticky footer</div>' + tag(tutor)
    head = HOSTILE_STYLES + f"<style>html {{ zoom: {zoom} }}</style>"
    head += '<meta name="viewport" content="width=device-width, initial-scale=1">'
    pages: Pages = {"/": page_with(body, head, direction), "/smartedu/token": (STUDENT, "text/plain")}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems, viewport=viewport)
        await page.goto(f"{school}/")
        await page.locator("#smartedu-widget .launcher").wait_for()
        [launcher] = await launchers(page)
        assert (launcher["width"], launcher["height"]) == (56, 56) and launcher["onTop"]
        assert launcher["x"] >= 0 and launcher["x"] + 56 <= viewport["width"]
        assert launcher["y"] >= 0 and launcher["y"] + 56 <= viewport["height"]
        await page.keyboard.press("Tab")
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.shadowRoot?.activeElement?.className ?? null")
        assert focused == "launcher"
        await page.keyboard.press("Enter")
        await page.frame_locator("#smartedu-widget iframe").locator(ONLINE).wait_for()
        box = await page.locator("#smartedu-widget .panel").bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["width"] <= viewport["width"] and box["y"] + box["height"] <= viewport["height"]
        assert problems == []
        await page.close()


ARABIC_QUESTION = "\u0645\u0627 \u0647\u0648 \u0627\u0644\u0639\u062f\u062f \u0627\u0644\u0623\u0648\u0644\u064a\u061f"


async def test_a_right_to_left_page_gets_the_launcher_bottom_left_and_a_mirrored_chat(
    serve: Serve, browser: Browser
) -> None:
    """On `<html dir="rtl" lang="ar">` the launcher and its panel sit bottom-left (they stayed bottom-right),
    unless the tag says data-position; the chat is laid out right to left and its composer and messages
    carry the page's language, each message in its own text's direction."""
    server, tutor, port = await _tutor_for_a_school(serve)
    await seed_course(server.settings, TENANT, OTHER_COURSE, "Geometry")
    body = tag(tutor) + tag(tutor, OTHER_COURSE, position="right")
    rtl = page_with(body, dir="rtl").replace('lang="en"', 'lang="ar"')
    pages: Pages = {"/": rtl, "/ltr": page_with(tag(tutor)), "/smartedu/token": (STUDENT, "text/plain")}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems, viewport={"width": 1100, "height": 760})
        await page.goto(f"{school}/")
        await page.locator(f'[data-course="{OTHER_COURSE}"] .launcher').wait_for()
        placed = {item["course"]: item["x"] for item in await launchers(page)}
        assert placed == {COURSE: 20, OTHER_COURSE: 1100 - 20 - 56}
        await page.locator(f'[data-course="{COURSE}"] .launcher').click()
        frame = page.frame_locator(f'[data-course="{COURSE}"] iframe')
        await frame.locator(ONLINE).wait_for()
        box = await page.locator(f'[data-course="{COURSE}"] .panel').bounding_box()
        assert box is not None and box["x"] == 20
        src = await page.locator(f'[data-course="{COURSE}"] iframe').get_attribute("src") or ""
        assert "dir=rtl" in src and "lang=ar" in src
        assert await frame.locator("html").get_attribute("dir") == "rtl"
        composer = frame.locator(".se-input")
        assert (await composer.get_attribute("lang"), await composer.get_attribute("dir")) == ("ar", "auto")
        send, field = await frame.locator(".se-button--send").bounding_box(), await composer.bounding_box()
        assert send is not None and field is not None and send["x"] < field["x"]  # mirrored: Send on the left
        await composer.fill(ARABIC_QUESTION)
        await composer.press("Enter")
        question = frame.locator(".se-msg--user .se-bubble__body").last
        await question.wait_for()
        assert (await question.get_attribute("lang"), await question.get_attribute("dir")) == ("ar", "auto")

        await page.goto(f"{school}/ltr")  # and a left-to-right page keeps it bottom-right
        await page.locator("#smartedu-widget .launcher").wait_for()
        [launcher] = await launchers(page)
        assert launcher["x"] == 1100 - 20 - 56
        assert problems == []
        await page.close()


MORE_COURSES = ("geometry-1", "biology-1", "history-1")


def placed(width: int, *right: str) -> dict[str, int]:
    """Where the launchers stand: those in the bottom-right corner from it in this order, 68 px apart, and
    the one course with data-position="left" on its own in the other corner."""
    return {course: width - 20 - 56 - 68 * slot for slot, course in enumerate(right)} | {MORE_COURSES[0]: 20}


async def _four_courses(serve: Serve, geometry_at: str) -> tuple[str, int, str]:
    """A tutor with four courses, and the tags of a school's page for them, geometry's pinned to the
    corner `geometry_at`: the tutor's origin, the school's port and the tags."""
    server, tutor, port = await _tutor_for_a_school(serve)
    for course in MORE_COURSES:
        await seed_course(server.settings, TENANT, course, course.title())
    geometry, biology, history = MORE_COURSES
    body = tag(tutor) + tag(tutor, geometry, position=geometry_at) + tag(tutor, biology) + tag(tutor, history)
    return tutor, port, body


async def _four_launchers(page: Page) -> None:
    for course in (COURSE, *MORE_COURSES):
        await page.locator(f'[data-course="{course}"] .launcher').wait_for()


REMOVE_HOST = "course => document.querySelector(`body > div[data-course='${course}']`).remove()"


FOCUSED_LAUNCHER = (
    "document.activeElement.shadowRoot?.activeElement?.className === 'launcher'"
    " ? document.activeElement.dataset.course : null"
)


async def _tab_order(page: Page) -> list[str]:
    """The courses whose launchers Tab reaches, in order, from the top of the page."""
    await page.locator("h1").click()  # focus starts at the top of the page
    reached: list[str] = []
    for _ in range(8):
        await page.keyboard.press("Tab")
        course = await page.evaluate(FOCUSED_LAUNCHER)
        if course and course not in reached:
            reached.append(course)
    return reached


async def test_four_launchers_stand_in_rows_from_their_corners_and_are_all_reachable(
    serve: Serve, browser: Browser
) -> None:
    """Four courses, one of them on the left: each corner's launchers stand 68 px apart from the corner in
    the order of their (async) tags in the page (a widget on the other side used to count, leaving a hole,
    and the left ones ignored their slot and overlapped); a removed widget's slot is closed up, and added
    again (its tag is still in the page) it takes its place back (it used to land on another launcher);
    every launcher is on top, reached with Tab and opened with Enter, and all four fit on a phone."""
    tutor, port, body = await _four_courses(serve, "left")
    geometry, biology, history = MORE_COURSES
    body += tag(tutor, geometry, position="left")  # repeated: adds nothing
    pages: Pages = {"/": page_with("<p><a href='#a'>A link</a></p>" + body), "/smartedu/token": (STUDENT, "text/plain")}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems, viewport={"width": 1100, "height": 760})
        await page.goto(f"{school}/")
        await _four_launchers(page)
        shown = await launchers(page)
        assert {item["course"]: item["x"] for item in shown} == placed(1100, COURSE, biology, history)
        assert all(item["onTop"] and item["y"] == 760 - 20 - 56 for item in shown)

        await page.evaluate(REMOVE_HOST, biology)
        await page.wait_for_function(
            "x => document.querySelector(\"div[data-course='history-1']\").shadowRoot.querySelector('.launcher')"
            ".getBoundingClientRect().x === x",
            arg=placed(1100, COURSE, history)[history],
        )
        await page.evaluate(ADD_TAG, [f"{tutor}/static/widget.js", biology])
        await page.locator(f'[data-course="{biology}"] .launcher').wait_for()
        assert {item["course"]: item["x"] for item in await launchers(page)} == placed(1100, COURSE, biology, history)

        # Left to right, as they stand: the one on the left, then the right row towards its corner.
        assert await _tab_order(page) == [geometry, history, biology, COURSE]
        await page.locator(f'[data-course="{history}"] .launcher').focus()
        await page.keyboard.press("Enter")
        await page.frame_locator(f'[data-course="{history}"] iframe').locator(ONLINE).wait_for()
        # On a phone the open panel takes the screen, every launcher behind it; closed, all four fit.
        await page.set_viewport_size({"width": 360, "height": 640})
        assert [item["width"] for item in await launchers(page)] == [0, 0, 0, 0]
        await page.keyboard.press("Escape")
        await page.locator(f'[data-course="{history}"] .panel').wait_for(state="hidden")
        assert {item["course"]: item["x"] for item in await launchers(page)} == placed(360, COURSE, biology, history)
        assert problems == []
        await page.close()


@pytest.mark.parametrize("direction", ["ltr", "rtl"])
async def test_tab_moves_along_the_launchers_as_a_reader_sees_them(
    serve: Serve, browser: Browser, direction: str
) -> None:
    """Launchers in both corners: Tab reaches them in the page's reading direction along the bottom of the
    screen (left to right, or right to left on a right-to-left page), also after a widget is removed and
    added again and after the page switches its direction, whatever order the async tags loaded in. Tab
    followed the order the widgets were added: the launcher by a corner first, then away from it (against
    the reading direction), the corners mixed, and a widget added again last. A launcher whose chat is
    open moves in the tab order without its chat being reloaded."""
    # The default corner is the end of the page's lines; geometry is pinned to the other one.
    tutor, port, body = await _four_courses(serve, "left" if direction == "ltr" else "right")
    geometry, biology, history = MORE_COURSES
    pages: Pages = {"/": page_with(body, dir=direction), "/smartedu/token": (STUDENT, "text/plain")}
    async with host_site(pages, port=port) as school:
        problems = Problems()
        page = await new_page(browser, problems, viewport={"width": 1100, "height": 760})
        await page.goto(f"{school}/")
        await _four_launchers(page)
        # geometry alone at the start of the line, then the row from the far end to its corner.
        assert await _tab_order(page) == [geometry, history, biology, COURSE]

        await page.evaluate(REMOVE_HOST, COURSE)
        await page.evaluate(ADD_TAG, [f"{tutor}/static/widget.js", COURSE])
        await page.locator(f'[data-course="{COURSE}"] .launcher').wait_for()
        assert await _tab_order(page) == [geometry, history, biology, COURSE]

        # Open history's chat, mark its document, close it; the page switches direction and a launcher is
        # opened (the widgets are placed again): the rows change corners and the order follows.
        await page.locator(f'[data-course="{history}"] .launcher').click()
        await page.frame_locator(f'[data-course="{history}"] iframe').locator(ONLINE).wait_for()
        chat = next(frame for frame in page.frames if f"course={history}" in frame.url)
        await chat.evaluate("window.notReloaded = true")
        await page.evaluate("course => SmartEduWidget.close(course)", history)
        flipped = "rtl" if direction == "ltr" else "ltr"
        await page.evaluate("dir => { document.documentElement.dir = dir }", flipped)
        await page.evaluate("course => { SmartEduWidget.open(course); SmartEduWidget.close(course) }", biology)
        # All four in one corner now (geometry's is the new end of the line), from the far end to it.
        assert await _tab_order(page) == [history, biology, geometry, COURSE]
        assert await chat.evaluate("window.notReloaded") is True
        assert problems == []
        await page.close()
