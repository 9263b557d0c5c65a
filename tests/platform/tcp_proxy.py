"""A TCP proxy the tests control, to take a backing service away and bring it back.

Put it between a gateway and PostgreSQL or Redis (`proxy.url(service_url)` is the service's
URL pointed at the proxy), then:

- `stop()`: the proxy stops listening and resets every open connection, as a crashed or
  unreachable service does (new connections are refused);
- `blackhole()`: connections are accepted and kept but nothing moves either way, as in a
  network partition (the client waits for its own timeouts); once `start()` heals it, what
  was sent arrives, as TCP's retransmissions would deliver it;
- `start()`: forward again, on the same port.

It runs its own event loop on a daemon thread, so it works beside a test's own code and
real server processes alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import make_url

from tests.e2e.server import free_port

T = TypeVar("T")
Mode = Literal["forward", "blackhole", "stopped"]
CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.mode: Mode = "stopped"
        self.connections = 0
        """Connections accepted since the proxy was made."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"tcp-proxy-{self.port}")
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        """Set while forwarding; a partition (blackhole) clears it."""

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy (not yet started) in front of the service a database/Redis URL names."""
        parsed = make_url(url)
        default = 6379 if parsed.get_backend_name() == "redis" else 5432
        return cls(parsed.host or "127.0.0.1", parsed.port or default)

    def url(self, service_url: str) -> str:
        """`service_url` with its host and port replaced by the proxy's."""
        return make_url(service_url).set(host="127.0.0.1", port=self.port) \
            .render_as_string(hide_password=False)

    # -- control, from any thread ---------------------------------------------------------

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def blackhole(self) -> None:
        self._call(self._blackhole())

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def down(self, how: Literal["stop", "blackhole"] = "stop") -> Iterator[None]:
        """The service unreachable for the block, then back."""
        self.stop() if how == "stop" else self.blackhole()
        try:
            yield
        finally:
            self.start()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # -- on the proxy's loop --------------------------------------------------------------

    async def _start(self) -> None:
        self.mode = "forward"
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                      reuse_address=True, backlog=512)

    async def _stop(self) -> None:
        self.mode = "stopped"
        self._flowing.clear()
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.transport.abort()  # an RST, not an orderly close
        self._open.clear()

    async def _blackhole(self) -> None:
        await self._start()
        self.mode = "blackhole"
        self._flowing.clear()  # every pump waits: bytes stay in the sockets' buffers

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._open.add(client_writer)
        await self._flowing.wait()  # a connection made during a partition waits too
        if self.mode != "forward":
            self._open.discard(client_writer)
            client_writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._open.discard(client_writer)
            client_writer.transport.abort()
            return
        self._open.add(upstream_writer)
        await asyncio.gather(self._pump(client_reader, upstream_writer),
                             self._pump(upstream_reader, client_writer),
                             return_exceptions=True)
        for writer in (client_writer, upstream_writer):
            self._open.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()  # during a partition nothing moves, nothing is lost
                data = await reader.read(CHUNK)
                if not data:
                    break
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()  # one side failed: so does the other
