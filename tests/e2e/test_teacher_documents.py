"""A course's documents in the teacher dashboard (/teacher), in real headless Chromium against a running app.

The documents panel lists, adds (a file or pasted text), shows, replaces and deletes a course's documents over
the HTTP API; what the page shows is checked against what the API then holds. Every refusal the server can
give is shown in plain words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import Serve, Server, seed_course, token
from tests.e2e.helpers import Problems, browser, new_page

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser, Locator, Page, Request, Route

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

TENANT = "school-a"
COURSE = "algebra-1"
TEACHER = token("tea-1", role="teacher", tenant=TENANT, courses=[COURSE], name="Ms Rivera")
DOCUMENTS = f"/api/courses/{COURSE}/documents"
# Three passages; characters counted as code points (the emoji is one, two in UTF-16, four in UTF-8).
NOTES = (
    "# Slopes\n\n"
    + "\n\n".join(f"Example {n}: the line through (0, 0) and (1, {n}) has slope {n}." for n in range(1, 41))
    + "\n\nIn French: la pente \U0001f4c8."
)


async def _server(serve: Serve, **overrides: Any) -> Server:
    server = await serve(**overrides)
    await seed_course(server.settings, TENANT, COURSE, "Algebra I")
    return server


async def _api(server: Server, method: str, path: str, **kwargs: Any) -> Any:
    response = await server.client.request(method, path, headers={"Authorization": f"Bearer {TEACHER}"}, **kwargs)
    assert response.status in (200, 201), await response.text()
    return await response.json()


async def _stored(server: Server) -> dict[str, str]:
    """The course's documents as the API holds them: name -> body."""
    listed = (await _api(server, "GET", DOCUMENTS))["documents"]
    return {d["name"]: (await _api(server, "GET", f"{DOCUMENTS}/{d['id']}"))["body"] for d in listed}


async def _dashboard(server: Server, browser: Browser, problems: Problems, jwt: str = TEACHER) -> Page:
    page = await new_page(browser, problems, "teacher")
    await page.goto(str(server.client.make_url("/teacher")) + f"#token={jwt}")
    await page.wait_for_selector('.st-status[data-state="online"]')
    return page


async def _documents(page: Page, course_title: str = "Algebra I") -> Locator:
    """Open the course's documents panel and wait for its list; the panel."""
    await page.get_by_role("button", name=f"Documents of {course_title}").click()
    await page.wait_for_function("() => document.activeElement.id === 'st-docs-title'")
    panel = page.locator(".st-docs")
    await panel.locator(".st-docs__state:has-text('No documents yet'), .st-docs__table:visible").first.wait_for()
    return panel


def _row(panel: Locator, name: str) -> Locator:
    return panel.locator(".st-docs__table tbody tr", has=panel.page.get_by_role("button", name=f"Read {name}"))


async def _listed(panel: Locator) -> list[tuple[str, str]]:
    """The list's rows: (name, length)."""
    rows = panel.locator(".st-docs__table tbody tr")
    cells = [await rows.nth(i).locator("th, td").all_text_contents() for i in range(await rows.count())]
    return [(name, length) for name, length, *_ in cells]


async def _message(box: Locator, text: str) -> str:
    """Wait for `box` to say `text`; what it says."""
    await box.locator(".st-docs__msg-text", has_text=text).wait_for()
    return (await box.locator(".st-docs__msg-text").text_content()) or ""


async def _announced(page: Page, text: str) -> None:
    await page.wait_for_function("t => document.querySelector('.st-announcer').textContent.includes(t)", arg=text)


async def test_a_teacher_lists_uploads_and_reads_course_documents(serve: Serve, browser: Browser) -> None:
    server = await _server(serve)
    await _api(server, "POST", DOCUMENTS, json={"name": "Syllabus", "body": "Week 1: lines. Week 2: slopes."})
    problems = Problems()
    page = await _dashboard(server, browser, problems)
    requests: list[Request] = []
    page.on("request", lambda request: requests.append(request) if "/documents" in request.url else None)
    panel = await _documents(page)
    assert await page.locator("#st-docs-title").text_content() == "Documents of Algebra I"
    assert await page.locator(".st-convo").is_hidden()
    assert await _listed(panel) == [("Syllabus", "30 characters, 1 passage")]

    # A Markdown file: it fills in the name and the text, which the teacher checks and uploads.
    await panel.get_by_label("Text file (.txt or .md)").set_input_files(
        files=[{"name": "Slopes.md", "mimeType": "text/markdown", "buffer": NOTES.encode()}]
    )
    form_msg = panel.locator(".st-docs__form-msg")
    await _message(form_msg, "Read \u201cSlopes.md\u201d: 2,525 characters.")
    assert await panel.get_by_label("Name").input_value() == "Slopes"
    assert await panel.get_by_label("Text", exact=True).input_value() == NOTES
    await panel.get_by_role("button", name="Upload").click()
    said = await _message(form_msg, "Added \u201cSlopes\u201d")
    assert said == "Added \u201cSlopes\u201d: 2,525 characters in 3 passages."
    await _announced(page, said)
    await _row(panel, "Slopes").wait_for()
    assert await panel.get_by_label("Name").input_value() == ""  # the form is ready for the next one

    # Pasted text.
    await panel.get_by_label("Name").fill("Glossary")
    await panel.get_by_label("Text", exact=True).fill("Gradient: another word for slope.")
    await panel.get_by_label("Text", exact=True).press("Tab")
    await panel.get_by_role("button", name="Upload").click()
    await _row(panel, "Glossary").wait_for()
    assert await _listed(panel) == [
        ("Syllabus", "30 characters, 1 passage"),
        ("Slopes", "2,525 characters, 3 passages"),
        ("Glossary", "33 characters, 1 passage"),
    ]
    assert await _stored(server) == {
        "Syllabus": "Week 1: lines. Week 2: slopes.",
        "Slopes": NOTES,
        "Glossary": "Gradient: another word for slope.",
    }

    # Reading one: its whole text, as stored.
    await panel.get_by_role("button", name="Read Slopes").click()
    await page.wait_for_function("() => document.activeElement.id === 'st-docs-viewer-title'")
    viewer = panel.locator(".st-docs__viewer")
    assert await viewer.locator("h3").text_content() == "Slopes"
    assert await viewer.locator(".st-docs__meta").text_content() == "2,525 characters in 3 passages"
    assert await viewer.get_by_label("Text of Slopes", exact=True).text_content() == NOTES

    # Every request carried the dashboard's token and no cookie (so it needs no CSRF token).
    assert {r.method for r in requests} == {"GET", "POST"}
    for request in requests:
        headers = await request.all_headers()
        assert headers["authorization"] == f"Bearer {TEACHER}" and "cookie" not in headers
    # Closing goes back to the list, the focus on the button that opened the panel.
    await panel.get_by_role("button", name="Close documents").click()
    assert await panel.is_hidden() and await page.locator(".st-convo").is_visible()
    assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "Documents of Algebra I"
    assert problems == []


async def test_a_document_is_replaced_and_a_name_taken_offers_to_replace_it(serve: Serve, browser: Browser) -> None:
    server = await _server(serve)
    first = await _api(server, "POST", DOCUMENTS, json={"name": "Notes", "body": "Slope is rise over run."})
    glossary = await _api(server, "POST", DOCUMENTS, json={"name": "Glossary", "body": "Gradient: slope."})
    problems = Problems()
    page = await _dashboard(server, browser, problems)
    panel = await _documents(page)

    # Replacing the text of the one being read: the form holds it, saved over the same document.
    await panel.get_by_role("button", name="Read Notes").click()
    viewer = panel.locator(".st-docs__viewer")
    await viewer.get_by_role("button", name="Replace the text of Notes").click()
    assert await panel.locator("#st-docs-form-title").text_content() == "Replace \u201cNotes\u201d"
    assert await panel.get_by_label("Text", exact=True).input_value() == "Slope is rise over run."
    await panel.get_by_label("Text", exact=True).fill("Slope is rise over run; a vertical line has none.")
    await panel.get_by_role("button", name="Save").click()
    form_msg = panel.locator(".st-docs__form-msg")
    await _message(form_msg, "Saved \u201cNotes\u201d: 49 characters in 1 passage.")
    await viewer.get_by_text("a vertical line has none").wait_for()  # the viewer shows the new text
    assert await _stored(server) == {
        "Notes": "Slope is rise over run; a vertical line has none.",
        "Glossary": "Gradient: slope.",
    }

    # Renaming it to the other's name is refused by the server, and said so.
    await viewer.get_by_role("button", name="Replace the text of Notes").click()
    await panel.get_by_label("Name").fill("Glossary")
    await panel.get_by_role("button", name="Save").click()
    said = await _message(form_msg, "could not be saved")
    assert said == (
        "The document could not be saved: another document of this course is already named "
        "\u201cGlossary\u201d; choose another name."
    )
    await panel.get_by_role("button", name="Cancel").click()
    assert await panel.locator("#st-docs-form-title").text_content() == "Add a document"

    # Uploading another text under a name already used (409 conflict): the teacher is asked, and may replace it.
    await panel.get_by_label("Name").fill("Notes")
    await panel.get_by_label("Text", exact=True).fill("Slope: how steep a line is.")
    await panel.get_by_role("button", name="Upload").click()
    said = await _message(form_msg, "already has a document named")
    assert said == (
        "This course already has a document named \u201cNotes\u201d. Replace its text with this one, or "
        "change the name to add it as another document."
    )
    await _announced(page, said)
    assert (await _stored(server))["Notes"] == "Slope is rise over run; a vertical line has none."  # nothing yet
    await form_msg.get_by_role("button", name="Replace \u201cNotes\u201d").click()
    await _message(form_msg, "Replaced the text of \u201cNotes\u201d: 27 characters in 1 passage.")
    listed = (await _api(server, "GET", DOCUMENTS))["documents"]
    assert [(d["id"], d["name"]) for d in listed] == [(first["id"], "Notes"), (glossary["id"], "Glossary")]
    assert (await _stored(server))["Notes"] == "Slope: how steep a line is."

    # The same name and text again (the same file uploaded twice): nothing changes, and it says so.
    await panel.get_by_label("Name").fill("Glossary")
    await panel.get_by_label("Text", exact=True).fill("Gradient: slope.")
    await panel.get_by_role("button", name="Upload").click()
    await _message(form_msg, "\u201cGlossary\u201d is already there with this text: nothing changed.")

    # Or keep it, and give the new one another name.
    await panel.get_by_label("Name").fill("Glossary")
    await panel.get_by_label("Text", exact=True).fill("Intercept: where a line meets the y axis.")
    await panel.get_by_role("button", name="Upload").click()
    await form_msg.get_by_role("button", name="Change the name").click()
    assert await form_msg.is_hidden()
    assert await page.evaluate("document.activeElement.id") == "st-docs-name"
    await panel.get_by_label("Name").fill("Intercepts")
    await panel.get_by_role("button", name="Upload").click()
    await _row(panel, "Intercepts").wait_for()
    assert await _stored(server) == {
        "Notes": "Slope: how steep a line is.",
        "Glossary": "Gradient: slope.",
        "Intercepts": "Intercept: where a line meets the y axis.",
    }
    assert problems == []


async def test_deleting_a_document_asks_first(serve: Serve, browser: Browser) -> None:
    server = await _server(serve)
    for name in ("Notes", "Glossary"):
        await _api(server, "POST", DOCUMENTS, json={"name": name, "body": f"{name} of the course."})
    problems = Problems()
    page = await _dashboard(server, browser, problems)
    panel = await _documents(page)
    confirm = panel.locator(".st-docs__confirm")

    # From the list: the question, with the focus on Cancel; cancelling deletes nothing.
    await _row(panel, "Notes").get_by_role("button", name="Delete Notes").click()
    assert await _message(confirm, "Delete") == (
        "Delete \u201cNotes\u201d? The tutor stops using it at once. This cannot be undone."
    )
    assert await page.evaluate("document.activeElement.textContent") == "Cancel"
    await page.keyboard.press("Enter")
    assert await confirm.is_hidden()
    assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == "Delete Notes"
    assert set(await _stored(server)) == {"Notes", "Glossary"}

    await page.keyboard.press("Enter")
    await confirm.get_by_role("button", name="Delete Notes for good").click()
    await _message(panel.locator(".st-docs__list-msg"), "Deleted \u201cNotes\u201d.")
    await _row(panel, "Notes").wait_for(state="detached")
    assert set(await _stored(server)) == {"Glossary"}

    # From the document being read: deleting it closes it.
    await panel.get_by_role("button", name="Read Glossary").click()
    await panel.locator(".st-docs__viewer").get_by_role("button", name="Delete Glossary").click()
    await confirm.get_by_role("button", name="Delete Glossary for good").click()
    await panel.get_by_text("No documents yet. Add one below.").wait_for()
    assert await panel.locator(".st-docs__viewer").is_hidden()
    assert await _stored(server) == {}
    assert problems == []


async def test_every_error_is_shown_in_plain_words(serve: Serve, browser: Browser) -> None:
    server = await _server(serve)
    await _api(server, "POST", DOCUMENTS, json={"name": "Notes", "body": "Slope is rise over run."})
    problems = Problems()
    page = await _dashboard(server, browser, problems)

    # The list cannot be read (the network fails): said so, with Try again.
    async def fail(route: Route) -> None:
        await route.abort()

    await page.route(f"**{DOCUMENTS}", fail)
    await page.get_by_role("button", name="Documents of Algebra I").click()
    panel = page.locator(".st-docs")
    list_msg = panel.locator(".st-docs__list-msg")
    said = await _message(list_msg, "could not be loaded")
    assert said == (
        "The documents could not be loaded: the server could not be reached; check the connection and try again."
    )
    await _announced(page, said)
    await page.unroute(f"**{DOCUMENTS}", fail)
    await list_msg.get_by_role("button", name="Try again").click()
    await _row(panel, "Notes").wait_for()
    assert await list_msg.is_hidden()

    # What the server refuses, in its words: text that is only spaces, a document too long.
    form_msg = panel.locator(".st-docs__form-msg")
    await panel.get_by_label("Name").fill("Blank")
    await panel.get_by_label("Text", exact=True).fill("   ")
    await panel.get_by_role("button", name="Upload").click()
    assert await _message(form_msg, "could not be uploaded") == (
        "The document could not be uploaded: 'body' must be non-empty text."
    )
    await panel.get_by_label("Text", exact=True).fill("x" * 200_001)
    await panel.get_by_role("button", name="Upload").click()
    assert await _message(form_msg, "limited to") == (
        "The document could not be uploaded: documents are limited to 200000 characters."
    )
    # A file that is not text is not read.
    await panel.get_by_label("Text file (.txt or .md)").set_input_files(
        files=[{"name": "photo.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n"}]
    )
    await _message(form_msg, "\u201cphoto.png\u201d is not a text file: choose a .txt or .md file.")

    # A document deleted meanwhile (another tab, another teacher): said so, and the list is read again.
    notes = (await _api(server, "GET", DOCUMENTS))["documents"][0]
    await _api(server, "DELETE", f"{DOCUMENTS}/{notes['id']}")
    await panel.get_by_role("button", name="Read Notes").click()
    said = await _message(list_msg, "could not be opened")
    assert said == "\u201cNotes\u201d could not be opened: document not found."
    await panel.get_by_text("No documents yet. Add one below.").wait_for()
    assert problems == []


async def test_a_refusal_is_a_message_and_only_managers_get_the_panel(serve: Serve, browser: Browser) -> None:
    """The server refuses the documents (the sign-in no longer teaches the course): the panel says so instead of
    offering a list and a form that cannot work. Courses outside the sign-in's own have no Documents at all;
    an administrator has them for every course, and one that does not exist is said not to."""
    server = await _server(serve)
    problems = Problems()
    # A teacher whose sign-in names no courses, and whose course list is unavailable, may try watching a
    # course by its id; its documents are not theirs to manage.
    stranger = await new_page(browser, problems, "stranger")
    await stranger.route("**/api/teacher/courses", lambda route: route.fulfill(status=503, body="unavailable"))
    await stranger.goto(str(server.client.make_url("/teacher")) + f"#token={token('tea-3', role='teacher')}")
    await stranger.get_by_label("Watch a course by its id").fill(COURSE)
    await stranger.get_by_role("button", name="Watch").click()
    await stranger.locator(f'.st-course[data-course-id="{COURSE}"]').get_by_text("Cannot watch").wait_for()
    assert await stranger.locator(".st-course__docs").count() == 0

    # The server's own 403 for a teacher of the course: the request goes out with another teacher's token.
    page = await new_page(browser, problems, "teacher")
    await page.route("**/api/teacher/courses", lambda route: route.fulfill(status=503, body="unavailable"))
    await page.goto(str(server.client.make_url("/teacher")) + f"#token={TEACHER}")
    other = token("tea-2", role="teacher", tenant=TENANT, courses=["geometry"])

    async def as_other(route: Route) -> None:
        await route.continue_(headers={**route.request.headers, "authorization": f"Bearer {other}"})

    await page.route(f"**{DOCUMENTS}", as_other)
    await page.get_by_role("button", name=f"Documents of {COURSE}").click()
    panel = page.locator(".st-docs")
    assert await _message(panel.locator(".st-docs__list-msg"), "could not be loaded") == (
        "The documents could not be loaded: you may not manage the documents of this course "
        "(you may not watch this course)."
    )
    assert await panel.locator(".st-docs__table").is_hidden() and await panel.locator(".st-docs__form").is_hidden()
    assert await panel.locator(".st-docs__state").is_hidden()

    admin = token("adm-1", role="admin", tenant=TENANT, name="Admin")
    admin_page = await _dashboard(server, browser, problems, admin)
    await admin_page.get_by_label("Watch a course by its id").fill("no-such-course")
    await admin_page.get_by_role("button", name="Watch").click()
    await admin_page.get_by_role("button", name="Documents of no-such-course").click()
    assert await _message(admin_page.locator(".st-docs__list-msg"), "could not be loaded") == (
        "The documents could not be loaded: course not found."
    )
    admin_panel = await _documents(admin_page)  # Algebra I, listed for the administrator
    assert await admin_panel.get_by_text("No documents yet. Add one below.").is_visible()
    assert problems == []
