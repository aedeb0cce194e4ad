"""The HTML pages served from static/, with every /static/ file they load named by a fingerprint of its content.

No build step fingerprints the scripts, and their plain URLs are cached (`expires 1h` at NGINX, heuristically
by browsers when a replica serves them). A page of one release with a script of another breaks: the previous
release's common.js lacks what this release's chat.js and teacher.js call (`common.Pacer`), so a student who
had it cached, or whose request reached a replica not yet upgraded, got a dead chat page. With `?v=<digest>`
a page asks for the exact files it was written with, and a copy cached under another release's URL is not
used.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

# src="/static/NAME" and href="/static/NAME" in the pages (never a URL that already has a query).
_STATIC_REF = re.compile(r'\b(?P<attr>src|href)="/static/(?P<name>[A-Za-z0-9_\-][A-Za-z0-9_\-./]*)"')


def read_page(static_dir: Path, name: str) -> str:
    """The page's HTML, each /static/ file it names given `?v=` and its fingerprint."""
    text = (static_dir / name).read_text(encoding="utf-8")

    def versioned(match: re.Match[str]) -> str:
        digest = fingerprint(static_dir / match["name"])
        if digest is None:
            return match[0]
        return f'{match["attr"]}="/static/{match["name"]}?v={digest}"'

    return _STATIC_REF.sub(versioned, text)


def static_cache_control(path: Path, version: str | None) -> str:
    """How long a file under /static/ may be cached: for good when asked for by its fingerprint; otherwise
    revalidated on each use. A page of another release (a rolling upgrade) may ask a replica for a version
    it does not have: what it gets then must not be kept under that URL."""
    if version is not None and version == fingerprint(path):
        return "public, max-age=31536000, immutable"
    return "no-cache"


def fingerprint(path: Path) -> str | None:
    """A short digest of the file's content (None if it is missing), read again only when it changes."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _digest(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _digest(path: str, mtime_ns: int, size: int) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None
