"""A TCP proxy between the server under test and PostgreSQL that can restart the database as seen from the
server: every connection dropped, new ones refused for a while, then back (the shared server is untouched)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


class PostgresProxy:
    """Forwards 127.0.0.1:`port` to the real server; `restart` plays a database restart or fail-over."""

    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        query = parse_qsl(parts.query)
        socket_dir = next((value for name, value in query if name == "host" and value.startswith("/")), None)
        # The proxy's URL names the proxy alone: no `host` in the query (it would win over the netloc).
        self._url = parts._replace(query=urlencode([(name, value) for name, value in query if name != "host"]))
        # The embedded PostgreSQL (what `make test` runs on a machine without one) listens on a Unix socket.
        self._socket = f"{socket_dir}/.s.PGSQL.{parts.port or 5432}" if socket_dir else None
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.hold_new = False  # accept new connections but never answer them (an unreachable host)
        self.linger_s = 0.0  # how long a connection PostgreSQL closed stays open on the server's side
        # The next reply from PostgreSQL holding these bytes is not delivered: its connection is cut instead
        # (a statement committed, its reply lost to a restart).
        self.lose_reply_with: bytes | None = None
        self.lose_request_with: bytes | None = None  # the same for the next statement sent with these bytes

    @property
    def url(self) -> str:
        netloc = self._url.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(self._url._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links.add(writer)
        try:
            if self.hold_new:
                await reader.read()  # until the client gives up (or `drop`)
                return
            if self._socket is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(self._socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            self._links.add(up_writer)
            await asyncio.gather(
                _pipe(reader, up_writer, 0.0, self._lost_request), _pipe(up_reader, writer, self.linger_s, self._lost)
            )
        except OSError:
            pass
        finally:
            for link in (writer, locals().get("up_writer")):
                if isinstance(link, asyncio.StreamWriter):
                    self._links.discard(link)
                    link.transport.abort()

    def _lost(self, data: bytes) -> bool:
        if self.lose_reply_with is None or self.lose_reply_with not in data:
            return False
        self.lose_reply_with = None
        return True

    def _lost_request(self, data: bytes) -> bool:
        if self.lose_request_with is None or self.lose_request_with not in data:
            return False
        self.lose_request_with = None
        return True

    def drop(self) -> None:
        """Cut every open connection at once, as a database restart does."""
        for link in list(self._links):
            link.transport.abort()
        self._links.clear()

    async def down(self) -> None:
        """Drop every connection and refuse new ones (nothing listens on the port)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop()
        await asyncio.sleep(0)

    async def up(self) -> None:
        """Listen again on the same port."""
        self.hold_new = False
        if self._server is None:
            await self.start()

    async def restart(self, outage_s: float) -> None:
        """Down for `outage_s`, then up again."""
        await self.down()
        await asyncio.sleep(outage_s)
        await self.up()

    async def close(self) -> None:
        await self.down()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    linger_s: float = 0.0,
    lost: Callable[[bytes], bool] | None = None,
) -> None:
    try:
        while data := await reader.read(65536):
            if lost is not None and lost(data):
                return
            writer.write(data)
            await writer.drain()
        # The other side closed: what it sent last (PostgreSQL's FATAL) is delivered, the close only later.
        await asyncio.sleep(linger_s)
    except OSError:
        pass
    finally:
        writer.transport.abort()
