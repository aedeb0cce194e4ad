"""The token batcher paces frames: the first at once, then at most one per interval; flush does not wait."""

from __future__ import annotations

import asyncio

from server.turns import FRAME_INTERVAL_S, TokenBatcher


class Recorder:
    def __init__(self) -> None:
        self.frames: list[tuple[float, str, int]] = []

    async def emit(self, text: str, offset: int) -> None:
        self.frames.append((asyncio.get_running_loop().time(), text, offset))


async def test_token_by_token_stream_is_paced_and_loses_nothing() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    batcher = TokenBatcher(recorder.emit, min_interval=0.05)
    started = loop.time()
    words = [f"w{i} " for i in range(40)]
    for word in words:  # 40 tokens, 5 ms apart: 200 ms of streaming
        batcher.push(word)
        await asyncio.sleep(0.005)
    await batcher.flush()

    assert "".join(text for _, text, _ in recorder.frames) == "".join(words)
    offsets = [offset for _, _, offset in recorder.frames]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert recorder.frames[0][1] == "w0 "  # the first token is not held back
    assert recorder.frames[0][0] - started < 0.02
    gaps = [b[0] - a[0] for a, b in zip(recorder.frames, recorder.frames[1:], strict=False)]
    assert all(gap >= 0.045 for gap in gaps[:-1])  # the last frame comes from flush
    assert len(recorder.frames) <= 7  # instead of 40


async def test_flush_sends_the_rest_without_waiting_for_the_interval() -> None:
    loop = asyncio.get_running_loop()
    recorder = Recorder()
    batcher = TokenBatcher(recorder.emit, min_interval=10.0)
    batcher.push("a ")
    await asyncio.sleep(0.01)
    batcher.push("b ")
    batcher.push("c ")
    await asyncio.sleep(0.01)  # b and c now wait for an interval that flush must cut short
    started = loop.time()
    await batcher.flush()
    assert loop.time() - started < 0.5
    assert [(text, offset) for _, text, offset in recorder.frames] == [("a ", 0), ("b c ", 2)]
    assert batcher.offset == 6


async def test_slow_provider_still_gets_a_frame_per_chunk() -> None:
    recorder = Recorder()
    batcher = TokenBatcher(recorder.emit, min_interval=0.02)
    for word in ["one ", "two ", "three "]:
        batcher.push(word)
        await asyncio.sleep(0.05)  # chunks further apart than the interval
    await batcher.flush()
    assert [text for _, text, _ in recorder.frames] == ["one ", "two ", "three "]


async def test_default_interval_is_short() -> None:
    assert 0 < FRAME_INTERVAL_S <= 0.1
