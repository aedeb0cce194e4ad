"""Course documents: stored whole, split into passages, searched with PostgreSQL full-text search."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .errors import LimitReachedError
from .postgres import Database

PASSAGE_CHARS = 900
_PARAGRAPHS = re.compile(r"\n\s*\n")


@dataclass(frozen=True, slots=True)
class Document:
    id: int
    course_id: str
    name: str
    chars: int
    passages: int


@dataclass(frozen=True, slots=True)
class Passage:
    id: int
    document_name: str
    body: str
    rank: float


def split_passages(body: str, size: int = PASSAGE_CHARS) -> list[str]:
    """Paragraph-aligned chunks of at most about `size` characters (long paragraphs are cut)."""
    passages: list[str] = []
    current = ""
    for paragraph in (p.strip() for p in _PARAGRAPHS.split(body)):
        if not paragraph:
            continue
        while len(paragraph) > size:
            cut = paragraph.rfind(" ", 0, size)
            cut = cut if cut > size // 2 else size
            pieces, paragraph = paragraph[:cut].strip(), paragraph[cut:].strip()
            if current:
                passages.append(current)
                current = ""
            passages.append(pieces)
        if current and len(current) + len(paragraph) + 2 > size:
            passages.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        passages.append(current)
    return passages


class Documents:
    """Course material for grounding; every query is scoped by tenant and course."""

    # Document names go into every answer's instructions; they change rarely, so each replica keeps
    # them for half a minute (a document added on another replica shows up within that time).
    NAMES_TTL_S = 30.0

    def __init__(self, db: Database, max_per_course: int = 1000):
        self.pool = db.pool
        self.max_per_course = max_per_course
        self._names: dict[tuple[str, str], tuple[float, list[str]]] = {}

    async def add(self, tenant_id: str, course_id: str, name: str, body: str) -> Document:
        """Store a document and its passages in one transaction; `LimitReachedError` if the course already
        has `max_per_course` documents."""
        passages = split_passages(body)
        async with self.pool.acquire() as conn, conn.transaction():
            # The course row's lock makes concurrent additions count one after another.
            await conn.execute(
                "SELECT 1 FROM courses WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE", tenant_id, course_id
            )
            count = await conn.fetchval(
                "SELECT count(*) FROM course_documents WHERE tenant_id = $1 AND course_id = $2", tenant_id, course_id
            )
            if count >= self.max_per_course:
                raise LimitReachedError(f"a course holds at most {self.max_per_course} documents")
            document_id = await conn.fetchval(
                "INSERT INTO course_documents (tenant_id, course_id, name, body) VALUES ($1, $2, $3, $4) RETURNING id",
                tenant_id,
                course_id,
                name,
                body,
            )
            await conn.executemany(
                "INSERT INTO document_passages (tenant_id, course_id, document_id, ordinal, body)"
                " VALUES ($1, $2, $3, $4, $5)",
                [(tenant_id, course_id, document_id, i, text) for i, text in enumerate(passages)],
            )
        self._names.pop((tenant_id, course_id), None)
        return Document(int(document_id), course_id, name, len(body), len(passages))

    async def list_documents(self, tenant_id: str, course_id: str) -> list[Document]:
        """The course's documents, oldest first."""
        rows = await self.pool.fetch(
            "SELECT d.id, d.course_id, d.name, length(d.body) AS chars,"
            " (SELECT count(*) FROM document_passages p WHERE p.document_id = d.id) AS passages"
            " FROM course_documents d WHERE d.tenant_id = $1 AND d.course_id = $2 ORDER BY d.id",
            tenant_id,
            course_id,
        )
        return [Document(r["id"], r["course_id"], r["name"], r["chars"], r["passages"]) for r in rows]

    async def names(self, tenant_id: str, course_id: str, limit: int = 50) -> list[str]:
        """Document names for the system instruction (cached briefly)."""
        now = time.monotonic()
        cached = self._names.get((tenant_id, course_id))
        if cached is not None and cached[0] > now:
            return cached[1]
        rows = await self.pool.fetch(
            "SELECT name FROM course_documents WHERE tenant_id = $1 AND course_id = $2 ORDER BY id LIMIT $3",
            tenant_id,
            course_id,
            limit,
        )
        names = [r["name"] for r in rows]
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[(tenant_id, course_id)] = (now + self.NAMES_TTL_S, names)
        return names

    async def search(self, tenant_id: str, course_id: str, query: str, limit: int = 4) -> list[Passage]:
        """The passages most relevant to `query`, best first (any word may match)."""
        words = re.findall(r"\w{3,}", query.lower())[:30]
        if not words:
            return []
        tsquery = " | ".join(dict.fromkeys(words))
        rows = await self.pool.fetch(
            "SELECT p.id, d.name, p.body, ts_rank(p.search, q) AS rank"
            " FROM document_passages p JOIN course_documents d ON d.id = p.document_id,"
            " to_tsquery('simple', $3) q"
            " WHERE p.tenant_id = $1 AND p.course_id = $2 AND p.search @@ q"
            " ORDER BY rank DESC, p.id LIMIT $4",
            tenant_id,
            course_id,
            tsquery,
            limit,
        )
        return [Passage(r["id"], r["name"], r["body"], float(r["rank"])) for r in rows]
