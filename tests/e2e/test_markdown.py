"""markdown.js in real headless Chromium, on a blank page (no server): TeX delimiters and autolinks that
never close render in linear time, and what does close still renders as before.

The time budget is generous (hostile 128k-character answers took seconds before, and take milliseconds
now) and scaled by the time plain text of the same length takes on this machine.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.e2e.helpers import MARKDOWN_BLOCKS, Problems, browser, new_page, streamed_markdown

if TYPE_CHECKING:  # playwright may be missing: then the browser fixture skips (or fails in CI)
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.e2e
__all__ = ["browser"]  # the fixture, imported for the tests below

MARKDOWN_JS = Path(__file__).resolve().parents[2] / "static" / "markdown.js"
LENGTH = 128_000
TIMED = """t => {
  const started = performance.now();
  document.createElement('div').appendChild(SmartEdu.renderMarkdown(t));
  return performance.now() - started;
}"""
HTML = "t => { const d = document.createElement('div'); d.appendChild(SmartEdu.renderMarkdown(t)); return d.innerHTML }"


async def _renderer(browser: Browser, problems: Problems) -> Page:
    page = await new_page(browser, problems)
    await page.set_content("<!doctype html><html><body></body></html>")
    await page.add_script_tag(path=str(MARKDOWN_JS))
    return page


async def _ms(page: Page, unit: str) -> float:
    text = unit * (LENGTH // len(unit))
    best = min([await page.evaluate(TIMED, text) for _ in range(3)])  # the best of three: a stall is not the parser
    return float(best)


@pytest.mark.parametrize(
    "unit",
    [
        pytest.param("\\(a ", id="inline-tex-parens"),
        pytest.param("x \\[a ", id="mid-line-tex-brackets"),
        pytest.param("http://[", id="autolink-not-a-url"),
        pytest.param("*a **b _c ~~d `e $f ", id="emphasis-never-closed"),
        pytest.param("*a*_b_", id="emphasis-closed"),
        pytest.param("[a](", id="link-never-closed"),
        pytest.param('![a](http://x "', id="image-title-never-closed"),
        pytest.param("- a\n  ", id="nested-lists"),
        pytest.param("> - ", id="quoted-lists"),
        pytest.param("|a|b|\n|-|-|\n", id="tables"),
        pytest.param("$$\n", id="display-math-never-closed"),
    ],
)
async def test_unclosed_delimiters_render_in_linear_time(browser: Browser, unit: str) -> None:
    problems = Problems()
    page = await _renderer(browser, problems)
    plain = await _ms(page, "plain text ")
    hostile = await _ms(page, unit)
    assert hostile < 250 + 10 * plain, (hostile, plain)
    assert problems == []


async def test_closed_delimiters_still_render(browser: Browser) -> None:
    problems = Problems()
    page = await _renderer(browser, problems)
    html = await page.evaluate(HTML, "\\(x^2\\) and \\( alone, then \\[y\\] and \\[ alone")
    assert html == (
        '<p><code class="se-math">x^2</code> and ( alone, then <code class="se-math se-math--display">y</code>'
        " and [ alone</p>"  # an unclosed one is an escaped bracket
    )
    links = await page.evaluate(
        "t => [...SmartEdu.renderMarkdown(t).querySelectorAll('a')].map(a => a.href)",
        "see http://[oops, https://example.com/a. and http://x.org",
    )
    assert links == ["https://example.com/a", "http://x.org/"]
    assert problems == []


HOSTILE_LINKS = [
    "[a](javascript:alert(1))",
    "[b](JaVaScRiPt:alert(1))",
    "[c]( javascript:alert(1))",
    "[d](&#106;avascript:alert(1))",
    "[e](java\tscript:alert(1))",
    "[f](data:text/html,<script>alert(1)</script>)",
    "[g](vbscript:msgbox(1))",
    "[h](https:javascript:alert(1))",
    "[i](//evil.example/x)",
    "<javascript:alert(1)>",
    "![j](http://img.example/pixel.png)",
    '[k](http://ok.example "t" onmouseover="alert(1)")',
    '<img src=x onerror=alert(1)><a href="javascript:alert(1)">l</a>',
]
ELEMENTS = """t => { const d = document.createElement('div'); d.appendChild(SmartEdu.renderMarkdown(t));
  return [...d.querySelectorAll('*')].map(e => [e.tagName, ...[...e.attributes].map(a => a.name + '=' + a.value)]) }"""


@pytest.mark.parametrize("markdown", HOSTILE_LINKS)
async def test_hostile_links_and_markup_make_only_safe_links(browser: Browser, markdown: str) -> None:
    """Only absolute http(s) links are made, never with a title or an event attribute, always in a new
    tab without a referrer; images become links (never loaded) and HTML is text."""
    problems = Problems()
    page = await _renderer(browser, problems)
    for element in await page.evaluate(ELEMENTS, markdown):
        tag, attributes = element[0], sorted(element[1:])
        assert tag in ("P", "A"), (markdown, element)
        if tag == "A":
            href = attributes[0]
            assert href.startswith(("href=http://", "href=https://")), (markdown, element)
            assert attributes[1:] == ["rel=noopener noreferrer nofollow", "target=_blank"], (markdown, element)
    assert problems == []


STREAM = """([text, cuts]) => {
  const shown = document.createElement('div');
  const stream = new SmartEdu.MarkdownStream(shown);
  const whole = document.createElement('div');
  const parsed = [];
  const differ = [];
  for (const cut of cuts) {
    const before = SmartEdu.markdownStats.parsed;
    stream.render(text.slice(0, cut));
    parsed.push(SmartEdu.markdownStats.parsed - before);
    whole.replaceChildren(SmartEdu.renderMarkdown(text.slice(0, cut)));
    if (whole.innerHTML !== shown.innerHTML) differ.push(cut);
  }
  return { parsed, differ };
}"""


async def test_a_streamed_answer_is_parsed_once_and_renders_as_a_whole(browser: Browser) -> None:
    """A growing answer is rendered block by block: after every chunk (1 to 120 characters) the DOM is
    exactly what rendering the whole text so far makes, and each render parses only the open block at the
    end (the whole answer was parsed again on every render: O(n^2) over a stream)."""
    problems = Problems()
    page = await _renderer(browser, problems)
    text = streamed_markdown(20_000)
    chosen = random.Random(7)
    cuts = list(range(1, 1000))  # every block kind, one character at a time
    at = cuts[-1]
    while at < len(text):
        at = min(len(text), at + chosen.choice([1, 2, 3, 7, 20, 60, 120]))
        cuts.append(at)
    result = await page.evaluate(STREAM, [text, cuts])
    assert result["differ"] == []
    # The largest block of the text and one chunk: never the answer so far.
    assert max(result["parsed"]) < 600, max(result["parsed"])
    # Text that is not a continuation (an answer repaired from the server) is rendered anew.
    replaced = await page.evaluate(
        """t => { const d = document.createElement('div'); const s = new SmartEdu.MarkdownStream(d);
          s.render(t + 'x'); s.render('# new\\n\\n' + t); return d.firstChild.outerHTML }""",
        text[:3000],
    )
    assert replaced == '<h3 class="se-h">new</h3>'
    assert problems == []


# Lines of code that look like a fence's closing line and are not: too short, another fence character, four
# spaces in, text after the backticks; CRLF and lone CR line ends; blank lines.
_CODE_LINES = [
    "def step_{n}(x):\r\n",
    "    return x * {n}  # ``` in a comment\n",
    "\n",
    "``\n",
    "~~~\n",
    "    ```\n",
    "```` not the end {n}\n",
    "```python\n",
    "\r\n",
    "print('{n}')\r",
    "- not a list item {n}\n",
]


def _code(size: int) -> str:
    """About `size` characters of code lines, none of which closes a ``` fence."""
    lines: list[str] = []
    length = n = 0
    while length < size:
        line = _CODE_LINES[n % len(_CODE_LINES)].format(n=n)
        lines.append(line)
        length += len(line)
        n += 1
    return "".join(lines)


def _cuts(length: int, seed: int) -> list[int]:
    """Where a stream is cut: every character for the first 600, then chunks of 1 to 120 characters."""
    chosen = random.Random(seed)
    cuts = list(range(1, 600))
    at = cuts[-1]
    while at < length:
        at = min(length, at + chosen.choice([1, 2, 3, 7, 20, 60, 120]))
        cuts.append(at)
    return cuts


async def test_a_huge_code_block_streams_in_linear_time_and_renders_as_a_whole(browser: Browser) -> None:
    """Two 25 KB fenced code blocks, right after a paragraph and followed by text with no blank line, the
    second one never closed: after every chunk the DOM is exactly what rendering the whole text makes, and
    each render parses the chunk and a line or two, not the code block so far (it parsed the whole open
    block on every render: O(n^2) over one block). The closing fence arriving a character at a time
    (`` then ``` then ```` ) is shown as it would be in a full render each time."""
    problems = Problems()
    page = await _renderer(browser, problems)
    text = (
        "Here is the program:\n```python\r\n" + _code(25_000) + "``"
        "`\nSo `step` scales x.\n~~~~\n" + _code(25_000) + "~~~ not yet\n"
    )
    cuts = _cuts(len(text), 11)
    closing = text.index("``\x60\nSo")
    cuts = sorted(set(cuts) | set(range(closing - 2, closing + 8)))
    result = await page.evaluate(STREAM, [text, cuts])
    assert result["differ"] == []
    assert max(result["parsed"]) < 400, max(result["parsed"])
    assert sum(result["parsed"]) < 2 * len(text), (sum(result["parsed"]), len(text))
    assert problems == []


# Lines of one paragraph that a line after them could turn into something else, or that start like a block
# and are not one: a pipe (a table's header if a separator row follows), "-|-" that is a separator row
# until more text follows, "2." (a list only at the start of a block), hard breaks, indentation, CRLF.
_PARAGRAPH_LINES = [
    "Line {n} of a *long* answer, with `code` and **bold**  ",
    "and a | pipe {n}\\",
    "then 2. not a list {n}",
    "-|- not a separator row {n}",
    "  indented {n}\r",
    "a lone CR {n}\rends this line",
    "Cost | per {n}",
]


async def test_a_huge_paragraph_streams_in_linear_time_and_renders_as_a_whole(browser: Browser) -> None:
    """A paragraph of 800 lines (about 20 KB), then a table right after it and a paragraph, streamed
    one character, then 1 to 120, at a time: after every chunk the DOM is exactly what rendering the whole
    text makes, and each render reads its last three lines and the chunk, not the paragraph so far (it parsed
    the whole open paragraph on every render: O(n^2) over one block)."""
    problems = Problems()
    page = await _renderer(browser, problems)
    lines = "".join(_PARAGRAPH_LINES[n % len(_PARAGRAPH_LINES)].format(n=n) + "\n" for n in range(800))
    text = "Intro\n\n" + lines + "a | b\n|-|-|\n| 1 | 2 |\n\nEnd\nmore " + lines[:2000]
    result = await page.evaluate(STREAM, [text, _cuts(len(text), 5)])
    assert result["differ"] == []
    assert max(result["parsed"]) < 600, max(result["parsed"])
    assert sum(result["parsed"]) < 8 * len(text), (sum(result["parsed"]), len(text))
    assert problems == []


async def test_blocks_that_run_into_each_other_stream_as_a_whole(browser: Browser) -> None:
    """Random answers of the lines above (blocks, code and paragraph lines, fences, table rows), joined by
    no line break, one, two, CRLF or a lone CR, so that code blocks and paragraphs end, or do not, at any
    kind of line: after every cut, at random and every few characters, the DOM is what a full render makes."""
    problems = Problems()
    page = await _renderer(browser, problems)
    pool = [*MARKDOWN_BLOCKS, *_CODE_LINES, *_PARAGRAPH_LINES, "```", "~~~~", "| x | y |", "|--|--|", "1. one", ""]
    for seed in range(12):
        chosen = random.Random(seed)
        parts: list[str] = []
        while sum(map(len, parts)) < 3000:
            ending = chosen.choice(["\n", "\n", "\n", "\r\n", "\r", "\n\n", ""])
            parts.append(chosen.choice(pool).format(n=len(parts)) + ending)
        text = "".join(parts)
        cuts = {chosen.randint(1, len(text)) for _ in range(300)} | set(range(1, len(text), chosen.choice([1, 3, 17])))
        result = await page.evaluate(STREAM, [text, sorted(cuts | {len(text)})])
        assert result["differ"] == [], (seed, text[: result["differ"][0]][-200:])
    assert problems == []
