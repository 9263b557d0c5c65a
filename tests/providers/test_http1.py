"""The upstream HTTP/1.1 client (`providers/http1.py`) against real sockets: small asyncio
servers in the test that answer in each of the ways an upstream may."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from modelyard.providers.http1 import HTTPError, Pool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


def _run(handler: Handler, body: Callable[[Pool, list[int]], Awaitable[None]]) -> None:
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
                    headers={"Authorization": "Bearer k"})
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
