"""The upstream HTTP/1.1 client (`providers/http1.py`) against real sockets: small asyncio
servers in the test that answer in each of the ways an upstream may, hostile ones
included."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from modelyard.providers import http1
from modelyard.providers.http1 import DeadlineExceeded, HTTPError, Pool, ResponseTooLarge

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def _run(handler: Handler, body: Callable[[Pool, list[int]], Awaitable[None]],
         **pool_options: float) -> None:
    """Serve `handler` on a free port, then run `body(pool, connections)`, where
    `connections` counts the connections the server accepted."""
    async def main() -> None:
        accepted: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}/v1", connect_timeout=1, max_idle=4,
                    headers={"Authorization": "Bearer k"}, **pool_options)  # type: ignore[arg-type]
        try:
            await body(pool, accepted)
        finally:
            pool.close()
            server.close()
    asyncio.run(main())


async def _keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        request = await _request(reader)
        assert request.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"Authorization: Bearer k" in request
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n"
                     b"8\r\ndata: a\n\r\n8\r\ndata: b\n\r\n0\r\n\r\n")
        await writer.drain()


def test_chunked_bodies_on_one_kept_alive_connection() -> None:
    async def body(pool: Pool, accepted: list[int]) -> None:
        for _ in range(3):
            response = await pool.post("chat/completions", b"{}", read_timeout=2)
            assert response.status == 200 and response.content_type == "text/event-stream"
            assert await response.read() == b"data: a\ndata: b\n"
            response.release()
        assert len(accepted) == 1
    _run(_keep_alive, body)


def test_a_response_left_unread_closes_its_connection() -> None:
    async def body(pool: Pool, accepted: list[int]) -> None:
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        response.close()
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        assert await response.read() == b"data: a\ndata: b\n"
        assert len(accepted) == 2
    _run(_keep_alive, body)


def test_a_kept_alive_connection_the_server_dropped_is_replaced() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)  # then close the idle connection: a server's timeout

    async def body(pool: Pool, accepted: list[int]) -> None:
        for _ in range(2):
            response = await pool.post("chat/completions", b"{}", read_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.2)
        assert len(accepted) == 2
    _run(once, body)


def test_a_connection_dropped_mid_body_is_an_error() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: a\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async def body(pool: Pool, accepted: list[int]) -> None:
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        assert await response.read_chunk() == b"data: a\n"
        with pytest.raises(HTTPError, match="closed the connection"):
            await response.read_chunk()
    _run(drop, body)


def test_a_body_delimited_by_the_connection_end() -> None:
    async def eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async def body(pool: Pool, accepted: list[int]) -> None:
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        assert await response.read() == b"all of it"
    _run(eof, body)


def test_silence_past_the_read_timeout_and_a_broken_response() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        await asyncio.sleep(1)

    async def body(pool: Pool, accepted: list[int]) -> None:
        with pytest.raises(TimeoutError):
            await pool.post("chat/completions", b"{}", read_timeout=0.1)
    _run(silent, body)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)

    async def broken(pool: Pool, accepted: list[int]) -> None:
        with pytest.raises(HTTPError, match="broke HTTP"):
            await pool.post("chat/completions", b"{}", read_timeout=1)
    _run(garbage, broken)


def test_nobody_listening() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout=1, max_idle=1, headers={})
        with pytest.raises(HTTPError, match="cannot connect"):
            await pool.post("x", b"{}", read_timeout=1)
    asyncio.run(main())


def test_tls_with_the_servers_certificate_verified(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A hosted provider's https:// URL: the default context verifies the certificate and
    the host name; here the test's own CA is the trusted one (SSL_CERT_FILE)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate can be made for the test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))

    async def main() -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        server = await asyncio.start_server(_keep_alive, "127.0.0.1", 0, ssl=context)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"https://localhost:{port}/v1", connect_timeout=2, max_idle=1,
                    headers={"Authorization": "Bearer k"})
        try:
            for _ in range(2):
                response = await pool.post("chat/completions", b"{}", read_timeout=2)
                assert await response.read() == b"data: a\ndata: b\n"
                response.release()
            other = Pool(f"https://127.0.0.1:{port}/v1", connect_timeout=2, max_idle=1,
                         headers={})
            with pytest.raises(HTTPError, match="cannot connect"):  # not the cert's name
                await other.post("chat/completions", b"{}", read_timeout=2)
        finally:
            pool.close()
            server.close()
    asyncio.run(main())


def test_a_written_request_is_never_sent_again() -> None:
    """An upstream that reads a request and closes the connection without a byte of
    answer may have started generating: the request is not replayed (a kept-alive
    connection used to be retried on a new one, so the upstream ran it twice)."""
    received: list[bytes] = []

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await _request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        received.append(await _request(reader))  # then hang up without answering

    async def body(pool: Pool, accepted: list[int]) -> None:
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        assert await response.read() == b"ok"
        response.release()  # kept alive, reused for the next request
        with pytest.raises(HTTPError, match="without answering") as failed:
            await pool.post("chat/completions", b"{}", read_timeout=2)
        assert failed.value.sent
        await asyncio.sleep(0.1)
        assert len(received) == 2 and len(accepted) == 1
    _run(answer_once, body)


def test_an_idle_connection_too_old_or_sent_bytes_is_not_reused() -> None:
    async def keep_alive_then_junk(reader: asyncio.StreamReader,
                                   writer: asyncio.StreamWriter) -> None:
        request = await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        if b"junk" in request:
            await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nno")  # unasked for
        await writer.drain()
        await asyncio.sleep(1)

    async def body(pool: Pool, accepted: list[int]) -> None:
        for payload in (b"{}", b"junk", b"{}"):
            response = await pool.post("chat/completions", payload, read_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.15)  # past the pool's idle time-to-live of 0.1 s
        assert len(accepted) == 3
    _run(keep_alive_then_junk, body, idle_ttl=0.1)

    async def fresh(pool: Pool, accepted: list[int]) -> None:
        for payload in (b"junk", b"{}"):
            response = await pool.post("chat/completions", payload, read_timeout=2)
            assert await response.read() == b"ok"
            response.release()
            await asyncio.sleep(0.15)  # the junk arrives while the connection is idle
        assert len(accepted) == 2
    _run(keep_alive_then_junk, fresh)


def test_informational_responses_are_skipped() -> None:
    async def hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)  # the final head in a read of its own
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: 2\r\n\r\n{}")
            await writer.drain()

    async def body(pool: Pool, accepted: list[int]) -> None:
        for _ in range(2):
            response = await pool.post("chat/completions", b"{}", read_timeout=2)
            assert response.status == 200 and response.content_type == "application/json"
            assert "link" not in response.headers
            assert await response.read() == b"{}"
            response.release()
        assert len(accepted) == 1  # and the connection is still good for the next one
    _run(hints, body)


def test_bodies_and_heads_over_their_caps_are_refused() -> None:
    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _request(reader)
        if b"declared" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5000\r\n\r\n")
        elif b"chunked" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"3e8\r\n" + b"x" * 1000 + b"\r\n" + b"3e8\r\n" + b"x" * 1000
                         + b"\r\n0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(2000):  # 100 kB of headers, without end
                writer.write(b"x-filler: " + b"y" * 40 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def body(pool: Pool, accepted: list[int]) -> None:
        for payload in (b"declared", b"chunked"):
            response = await pool.post("chat/completions", payload, read_timeout=2)
            with pytest.raises(ResponseTooLarge):
                await response.read()
            response.close()
        response = await pool.post("chat/completions", b"chunked", read_timeout=2)
        assert len(await response.read(limit=2000)) == 2000  # a limit of its own
        with pytest.raises(ResponseTooLarge, match="head"):
            await pool.post("chat/completions", b"endless head", read_timeout=2)
    _run(large, body, max_body=1500)


def test_reading_pauses_at_the_high_water_mark_until_the_reader_drains() -> None:
    size = 8 * 1024 * 1024
    blocked: list[int] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        piece = b"z" * 65536
        for _ in range(size // len(piece)):
            writer.write(piece)
        await asyncio.sleep(0.3)
        blocked.append(writer.transport.get_write_buffer_size())
        await writer.drain()
        await asyncio.sleep(1)

    async def body(pool: Pool, accepted: list[int]) -> None:
        response = await pool.post("chat/completions", b"{}", read_timeout=2)
        await asyncio.sleep(0.3)  # read nothing for a while
        buffered = response._connection.buffered
        # at most the high-water mark and one socket read past it, not the 8 MiB
        assert buffered <= http1.HIGH_WATER_BYTES + 256 * 1024, buffered
        total = 0
        while chunk := await response.read_chunk():
            total += len(chunk)
        assert total == size
        assert blocked and blocked[0] > 0  # the rest waited on the upstream's side
        response.release()
    _run(flood, body)


def test_the_total_deadline_holds_while_bytes_keep_coming() -> None:
    """An upstream that sends an SSE comment every 10 ms never trips the read timeout;
    the request's deadline still ends it."""
    async def pings(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"8\r\n: ping\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async def endless_hints(reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        while True:
            writer.write(b"HTTP/1.1 103 Early Hints\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async def body(pool: Pool, accepted: list[int]) -> None:
        started = time.monotonic()
        response = await pool.post("chat/completions", b"{}", read_timeout=5,
                                   deadline=started + 0.3)
        with pytest.raises(DeadlineExceeded):
            while await response.read_chunk():
                pass
        assert 0.3 <= time.monotonic() - started < 1.5
        response.close()
    _run(pings, body)

    async def head(pool: Pool, accepted: list[int]) -> None:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await pool.post("chat/completions", b"{}", read_timeout=5, deadline=started + 0.3)
        assert time.monotonic() - started < 1.5
    _run(endless_hints, head)
