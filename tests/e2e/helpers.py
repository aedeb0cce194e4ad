"""Shared pieces of the browser tests: the system Chromium, pages that record their errors, a second
web origin (a tiny host-page server), and the committed messages of a conversation.

Chromium comes from the system (SMARTEDU_CHROMIUM, else `chromium` on PATH); Playwright never downloads
a browser here. Without one the tests skip, or fail when CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import Server, require_tool

try:
    from playwright.async_api import Browser, BrowserContext, Frame, Page, WebSocketRoute, async_playwright
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None  # type: ignore[assignment]

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ANSWER_WAIT_MS = 20_000


def chromium() -> str:
    found = os.environ.get("SMARTEDU_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    return require_tool(found if async_playwright is not None else None, "Chromium with Python playwright")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Problems(list[str]):
    """Page errors, dialogs and CSP violations a page reported; a test ends by asserting there are none."""

    def watch(self, page: Page, label: str = "") -> Page:
        prefix = f"{label}: " if label else ""
        page.on("pageerror", lambda error: self.append(f"{prefix}page error: {error}"))
        page.on("dialog", lambda dialog: self.append(f"{prefix}dialog: {dialog.message}"))
        page.on(
            "console",
            lambda msg: (
                self.append(f"{prefix}console: {msg.text}")
                if msg.type == "error" and "Content Security Policy" in msg.text
                else None
            ),
        )
        return page


async def new_page(owner: Browser | BrowserContext, problems: Problems, label: str = "", **options: Any) -> Page:
    """A page with a desktop viewport (unless given) whose errors land in `problems`."""
    if isinstance(owner, BrowserContext):
        page = await owner.new_page()
        if "viewport" in options:
            await page.set_viewport_size(options["viewport"])
    else:
        options.setdefault("viewport", {"width": 1100, "height": 760})
        page = await owner.new_page(**options)
    return problems.watch(page, label)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


HostHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Pages = Mapping[str, str | tuple[str, str] | HostHandler]


@asynccontextmanager
async def host_site(pages: Pages, host: str = "localhost", port: int | None = None) -> AsyncIterator[str]:
    """A school's own web site on another origin: serves the given pages (HTML, `(body, content type)`, or
    an aiohttp handler for a page with its own status or headers); yields its origin."""
    app = web.Application()
    for path, page in pages.items():
        if callable(page):
            app.router.add_get(path, page)
            continue
        body, content_type = page if isinstance(page, tuple) else (page, "text/html")

        async def handler(_: web.Request, body: str = body, content_type: str = content_type) -> web.Response:
            return web.Response(text=body, content_type=content_type)

        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        chosen = port or free_port()
        site = web.TCPSite(runner, "127.0.0.1", chosen)
        await site.start()
        yield f"http://{host}:{chosen}"
    finally:
        await runner.cleanup()


async def committed(server: Server, path: str, jwt: str) -> list[dict[str, Any]]:
    """The messages the server committed, from a REST path such as /api/conversations/{id}/messages."""
    response = await server.client.get(path, headers={"Authorization": f"Bearer {jwt}"})
    assert response.status == 200, await response.text()
    body = await response.json()
    messages: list[dict[str, Any]] = body["messages"]
    return messages


RENDERED_TEXT = (
    "t => { const d = document.createElement('div'); d.appendChild(SmartEdu.renderMarkdown(t)); return d.textContent }"
)


async def rendered(where: Page | Frame, markdown: str) -> str:
    """What the page's (or frame's) Markdown renderer shows for `markdown`, as text."""
    text: str = await where.evaluate(RENDERED_TEXT, markdown)
    return text


Send = Callable[..., None]


def scripted_server(
    sockets: list[WebSocketRoute], answer: Callable[[int, dict[str, Any], Send], None]
) -> Callable[[WebSocketRoute], None]:
    """A `page.route_web_socket` handler that plays the server: each socket the page opens is appended to
    `sockets`, and every frame the page sends on its `number`th one (from 1) goes to
    `answer(number, frame, send)`, where `send(**frame)` writes a JSON frame back on that socket."""

    def script(ws: WebSocketRoute) -> None:
        sockets.append(ws)
        number = len(sockets)

        def send(**frame: Any) -> None:
            ws.send(json.dumps(frame))

        ws.on_message(lambda raw: answer(number, json.loads(raw), send))

    return script


# Blocks that end, or do not, only at a later line: lists that go on after a blank line, code fences and
# display math with blank lines inside, a paragraph that a table's separator row turns into a header,
# quotes, CRLF line ends, a list item whose content is indented on the next line, and lines that start
# like one block and turn out another ("4" becomes "4)", "-|-" a separator until more text follows).
MARKDOWN_BLOCKS = [
    "## Step {n}: *solve* for `x`",
    "First we note that 2x + {n} = 7, so **x** = (7 - {n}) / 2.\nThis holds because _both sides_ balance.",
    "- one item {n}\n- two, with [a link](https://example.com/{n})\n\n- three, after a blank line\n\n"
    "  still the third item, indented\n  - nested {n}\n\n    deeper text",
    "1. first\n2. second {n}\n\n3) another list\n\n4) and its next item",
    "\nIntro {n}\nCost | per\n-|- is not a table's separator row after all",
    "```python\ndef f(x):\n\n    return x * {n}\n\n- not a list\n```",
    "~~~\nunclosed until later {n}\n\n~~~~",
    "$$\nx^2 + {n}\n\n= y\n$$",
    "> quoted {n}\n> - a list in a quote\n\n> another quote",
    "a | b\n--|--\n{n} | two\nthree | four",
    "A paragraph\nthen a row | cell\n|-|-|\n| {n} | x |",
    "---",
    "Line one\r\nline two {n}\r\n\r\n- crlf item\r\n",
    "-\n  item on the next line {n}",
    "Text with \\(a^{n}\\) and $b$ and http://example.org/{n} and ~~old~~.",
]


def streamed_markdown(size: int) -> str:
    """A Markdown answer of about `size` characters (ASCII, so code points are characters) made of blocks
    that a renderer working block by block could get wrong, joined by one, two or three line breaks."""
    parts: list[str] = []
    length = n = 0
    while length < size:
        block = MARKDOWN_BLOCKS[n % len(MARKDOWN_BLOCKS)].format(n=n)
        part = block + "\n" * (1 + n % 3 if n % 5 else 2)
        parts.append(part)
        length += len(part)
        n += 1
    return "".join(parts)[:size]
