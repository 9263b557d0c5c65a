"""Several started requests as one stream: a text completion with several prompts runs
one request per prompt, and its answer numbers their choices one after the other."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator

from modelyard.providers.base import ChatDelta, ChatStream
from modelyard.usage import Usage

_END = None


class MergedStream:
    """Choice `i` of stream `k` becomes choice `k * choices + i`; each delta carries the
    sum of every stream's latest usage. The streams run side by side (their deltas
    interleave as they come); a failure of one ends the whole with its error, and closing
    it closes them all."""

    def __init__(self, streams: list[ChatStream], choices: int) -> None:
        self._streams = streams
        self._choices = choices
        self._latest = [Usage() for _ in streams]
        self._pumps: list[asyncio.Task[None]] = []

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self._merged()

    async def _merged(self) -> AsyncGenerator[ChatDelta, None]:
        queue: asyncio.Queue[tuple[int, ChatDelta | BaseException | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._pumps = [loop.create_task(self._pump(k, stream, queue))
                       for k, stream in enumerate(self._streams)]
        running = len(self._streams)
        try:
            while running:
                k, item = await queue.get()
                if item is _END:
                    running -= 1
                    continue
                if isinstance(item, BaseException):
                    raise item
                self._latest[k] = item.usage
                yield dataclasses.replace(item, index=k * self._choices + item.index,
                                          usage=self.usage)
        finally:
            await self._stop_pumps()

    @property
    def usage(self) -> Usage:
        total = Usage()
        for usage in self._latest:
            total += usage
        return total

    @staticmethod
    async def _pump(k: int, stream: ChatStream,
                    queue: asyncio.Queue[tuple[int, ChatDelta | BaseException | None]]) -> None:
        try:
            async for delta in stream:
                await queue.put((k, delta))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((k, exc))
            return
        await queue.put((k, _END))

    async def _stop_pumps(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def aclose(self) -> None:
        await self._stop_pumps()
        for stream in self._streams:
            await stream.aclose()

    async def drain_usage(self, seconds: float) -> Usage | None:
        await self._stop_pumps()
        drained = await asyncio.gather(*(s.drain_usage(seconds) for s in self._streams))
        if all(usage is None for usage in drained):
            return None
        self._latest = [usage if usage is not None else latest
                        for usage, latest in zip(drained, self._latest, strict=True)]
        return self.usage
