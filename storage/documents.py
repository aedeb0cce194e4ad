"""Course documents: stored whole, split into passages, searched with PostgreSQL full-text search."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from asyncpg.pool import PoolConnectionProxy

from .errors import DuplicateNameError, LimitReachedError, NotFoundError
from .postgres import Database

PASSAGE_CHARS = 900
# Words left out of searches: they are in nearly every English passage, so a question holding one matched (and
# had ranked) every passage of the course, and they say nothing about which passage is relevant (ts_rank
# weighs every word alike). PostgreSQL's English stop words of three letters or more.
# fmt: off
STOP_WORDS = frozenset((
    "about", "above", "after", "again", "against", "all", "and", "any", "are", "because", "been", "before", "being",
    "below", "between", "both", "but", "can", "did", "does", "doing", "don", "down", "during", "each", "few", "for",
    "from", "further", "had", "has", "have", "having", "her", "here", "hers", "herself", "him", "himself", "his",
    "how", "into", "its", "itself", "just", "more", "most", "myself", "nor", "not", "now", "off", "once", "only",
    "other", "our", "ours", "ourselves", "out", "over", "own", "same", "she", "should", "some", "such", "than",
    "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those",
    "through", "too", "under", "until", "very", "was", "were", "what", "when", "where", "which", "while", "who",
    "whom", "why", "will", "with", "you", "your", "yours", "yourself", "yourselves"
))
# fmt: on
_PARAGRAPHS = re.compile(r"\n\s*\n")
# A document's passage count, in a statement over `course_documents d` whose $1 and $2 are tenant and course.
_PASSAGES = (
    "(SELECT count(*) FROM document_passages p"
    " WHERE p.tenant_id = $1 AND p.course_id = $2 AND p.document_id = d.id) AS passages"
)


@dataclass(frozen=True, slots=True)
class Document:
    id: int
    course_id: str
    name: str
    chars: int
    passages: int


@dataclass(frozen=True, slots=True)
class DocumentText:
    document: Document
    body: str


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

    # Document names go into every answer's instructions; they change rarely, so each replica keeps them
    # rather than read them for every answer. A change is announced to the other replicas (`on_change`), which
    # forget theirs; one whose announcement is lost (Redis unavailable) is read again within this time.
    NAMES_TTL_S = 30.0

    def __init__(
        self,
        db: Database,
        max_per_course: int = 1000,
        on_change: Callable[[str, str], Awaitable[None]] | None = None,
    ):
        self.pool = db.pool
        self.max_per_course = max_per_course
        self.on_change = on_change
        self._names: dict[tuple[str, str], tuple[float, list[str]]] = {}
        # Counts what was forgotten: names read before a change and returned after it are not kept.
        self._forgotten = 0

    async def add(
        self, tenant_id: str, course_id: str, name: str, body: str, replace: bool = False
    ) -> tuple[Document, bool]:
        """Store a document and its passages in one transaction: `(document, True)`. A document of that name
        and body already there is returned as it is (`(document, False)`); one of that name with another
        body is `DuplicateNameError`, unless `replace`, which replaces its body. `LimitReachedError` if the
        course already has `max_per_course` documents."""
        passages = split_passages(body)
        async with self._writing(tenant_id, course_id) as conn:
            named = await conn.fetch(
                "SELECT id, body = $4 AS same FROM course_documents"
                " WHERE tenant_id = $1 AND course_id = $2 AND name = $3 ORDER BY id",
                tenant_id,
                course_id,
                name,
                body,
            )
            same = next((int(r["id"]) for r in named if r["same"]), None)
            if same is not None:
                return Document(same, course_id, name, len(body), len(passages)), False
            if named and (not replace or len(named) > 1):
                raise _duplicate(name, int(named[0]["id"]), "replace it with PUT, or POST with ?replace=true")
            if named:
                document_id = int(named[0]["id"])
                await self._rewrite(conn, tenant_id, course_id, document_id, name, body, passages)
            else:
                count = await conn.fetchval(
                    "SELECT count(*) FROM course_documents WHERE tenant_id = $1 AND course_id = $2",
                    tenant_id,
                    course_id,
                )
                if count >= self.max_per_course:
                    raise LimitReachedError(f"a course holds at most {self.max_per_course} documents")
                document_id = await conn.fetchval(
                    "INSERT INTO course_documents (tenant_id, course_id, name, body) VALUES ($1, $2, $3, $4)"
                    " RETURNING id",
                    tenant_id,
                    course_id,
                    name,
                    body,
                )
                await self._insert_passages(conn, tenant_id, course_id, document_id, passages)
        await self._changed(tenant_id, course_id)
        return Document(int(document_id), course_id, name, len(body), len(passages)), not named

    async def list_documents(self, tenant_id: str, course_id: str) -> list[Document]:
        """The course's documents, oldest first."""
        rows = await self.pool.fetch(
            f"SELECT d.id, d.course_id, d.name, length(d.body) AS chars, {_PASSAGES} FROM course_documents d"
            " WHERE d.tenant_id = $1 AND d.course_id = $2 ORDER BY d.id",
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
        forgotten = self._forgotten
        rows = await self.pool.fetch(
            "SELECT name FROM course_documents WHERE tenant_id = $1 AND course_id = $2 ORDER BY id LIMIT $3",
            tenant_id,
            course_id,
            limit,
        )
        names = [r["name"] for r in rows]
        if forgotten != self._forgotten:
            return names  # a change was announced meanwhile: these may be from before it
        if len(self._names) > 10_000:
            self._names.clear()
        self._names[(tenant_id, course_id)] = (now + self.NAMES_TTL_S, names)
        return names

    def forget(self, tenant_id: str, course_id: str) -> None:
        """Drop the course's cached document names: they changed (here, or on another replica)."""
        self._names.pop((tenant_id, course_id), None)
        self._forgotten += 1

    def forget_all(self) -> None:
        """Drop every cached document name: changes may have been announced without being heard."""
        self._names.clear()
        self._forgotten += 1

    async def _changed(self, tenant_id: str, course_id: str) -> None:
        self.forget(tenant_id, course_id)
        if self.on_change is not None:
            await self.on_change(tenant_id, course_id)

    async def search(self, tenant_id: str, course_id: str, query: str, limit: int = 4) -> list[Passage]:
        """The passages most relevant to `query`, best first (any word but the most common ones may match)."""
        words = [w for w in re.findall(r"\w{3,}", query.lower()) if w not in STOP_WORDS][:30]
        if not words:
            return []
        tsquery = " | ".join(dict.fromkeys(words))
        # Ranked first, named after: only the best `limit` passages are joined to their documents.
        rows = await self.pool.fetch(
            "SELECT p.id, d.name, p.body, p.rank FROM"
            " (SELECT id, document_id, body, ts_rank(search, q) AS rank"
            "  FROM document_passages, to_tsquery('simple', $3) q"
            "  WHERE tenant_id = $1 AND course_id = $2 AND search @@ q"
            "  ORDER BY rank DESC, id LIMIT $4) p"
            " JOIN course_documents d ON d.tenant_id = $1 AND d.course_id = $2 AND d.id = p.document_id"
            " ORDER BY p.rank DESC, p.id",
            tenant_id,
            course_id,
            tsquery,
            limit,
        )
        return [Passage(r["id"], r["name"], r["body"], float(r["rank"])) for r in rows]

    async def get(self, tenant_id: str, course_id: str, document_id: int) -> DocumentText | None:
        """One document of the course with its body; None when the course has no such document."""
        row = await self.pool.fetchrow(
            f"SELECT d.id, d.name, d.body, {_PASSAGES} FROM course_documents d"
            " WHERE d.tenant_id = $1 AND d.course_id = $2 AND d.id = $3",
            tenant_id,
            course_id,
            document_id,
        )
        if row is None:
            return None
        document = Document(row["id"], course_id, row["name"], len(row["body"]), row["passages"])
        return DocumentText(document, row["body"])

    async def replace(
        self, tenant_id: str, course_id: str, document_id: int, name: str | None, body: str | None
    ) -> Document:
        """Give a document a new name and/or body; a new body's passages replace the old ones in the same
        transaction, so a search sees either all old or all new ones. `NotFoundError` when the course has no
        such document, `DuplicateNameError` when another document of the course has the new name."""
        passages = split_passages(body) if body is not None else None
        async with self._writing(tenant_id, course_id) as conn:
            row = await conn.fetchrow(
                "SELECT name, length(body) AS chars FROM course_documents"
                " WHERE tenant_id = $1 AND course_id = $2 AND id = $3 FOR UPDATE",
                tenant_id,
                course_id,
                document_id,
            )
            if row is None:
                raise NotFoundError("document")
            name = row["name"] if name is None else name
            if name != row["name"]:
                taken = await conn.fetchval(
                    "SELECT min(id) FROM course_documents WHERE tenant_id = $1 AND course_id = $2 AND name = $3",
                    tenant_id,
                    course_id,
                    name,
                )
                if taken is not None:
                    raise _duplicate(name, int(taken), "delete or rename that one first")
            if body is not None and passages is not None:
                await self._rewrite(conn, tenant_id, course_id, document_id, name, body, passages)
                count = len(passages)
            else:
                await conn.execute(
                    "UPDATE course_documents SET name = $4 WHERE tenant_id = $1 AND course_id = $2 AND id = $3",
                    tenant_id,
                    course_id,
                    document_id,
                    name,
                )
                count = await conn.fetchval(
                    "SELECT count(*) FROM document_passages WHERE tenant_id = $1 AND course_id = $2"
                    " AND document_id = $3",
                    tenant_id,
                    course_id,
                    document_id,
                )
        await self._changed(tenant_id, course_id)
        return Document(document_id, course_id, name, len(body) if body is not None else row["chars"], count)

    async def delete(self, tenant_id: str, course_id: str, document_id: int) -> bool:
        """Delete a document and its passages in one transaction; False when the course has no such document."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._delete_passages(conn, tenant_id, course_id, document_id)
            deleted = await conn.fetchval(
                "DELETE FROM course_documents WHERE tenant_id = $1 AND course_id = $2 AND id = $3 RETURNING id",
                tenant_id,
                course_id,
                document_id,
            )
        if deleted is not None:
            await self._changed(tenant_id, course_id)
        return deleted is not None

    @asynccontextmanager
    async def _writing(self, tenant_id: str, course_id: str) -> AsyncIterator[PoolConnectionProxy]:
        """A transaction holding the course row's lock, so writes to its documents (counting them, checking
        their names) happen one after another."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT 1 FROM courses WHERE tenant_id = $1 AND id = $2 FOR NO KEY UPDATE", tenant_id, course_id
            )
            yield conn

    async def _rewrite(
        self,
        conn: PoolConnectionProxy,
        tenant_id: str,
        course_id: str,
        document_id: int,
        name: str,
        body: str,
        passages: list[str],
    ) -> None:
        await conn.execute(
            "UPDATE course_documents SET name = $4, body = $5 WHERE tenant_id = $1 AND course_id = $2 AND id = $3",
            tenant_id,
            course_id,
            document_id,
            name,
            body,
        )
        await self._delete_passages(conn, tenant_id, course_id, document_id)
        await self._insert_passages(conn, tenant_id, course_id, document_id, passages)

    @staticmethod
    async def _delete_passages(conn: PoolConnectionProxy, tenant_id: str, course_id: str, document_id: int) -> None:
        await conn.execute(
            "DELETE FROM document_passages WHERE tenant_id = $1 AND course_id = $2 AND document_id = $3",
            tenant_id,
            course_id,
            document_id,
        )

    @staticmethod
    async def _insert_passages(
        conn: PoolConnectionProxy, tenant_id: str, course_id: str, document_id: int, passages: list[str]
    ) -> None:
        await conn.executemany(
            "INSERT INTO document_passages (tenant_id, course_id, document_id, ordinal, body)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(tenant_id, course_id, document_id, i, text) for i, text in enumerate(passages)],
        )


def _duplicate(name: str, document_id: int, advice: str) -> DuplicateNameError:
    message = f"the course already has a document named {name!r} (id {document_id}): {advice}"
    return DuplicateNameError(message, document_id)
