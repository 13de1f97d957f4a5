"""A fake OpenAI backend cheap enough to pace tens of thousands of SSE events a second.

``python -m bench.sse_backend --port N --tokens-per-second 50 --completion-tokens 200``

The simulated POP (``proxy.sim``, on aiohttp) costs tens of microseconds per event and a
task with a sleep per stream; at 1,000 streams of 50 tokens/s it, not the proxy, would
be what a benchmark measured. This one is a bare ``asyncio.Protocol`` on uvloop: the
request is parsed only as far as its end (head, Content-Length), every answer is built
from pre-encoded bytes, and one ticker per process (every ``tick`` seconds) writes the
token events that fell due since the last tick, on every stream at once. Each stream's
events are spaced exactly ``1 / tokens_per_second`` apart from its own start, so the
gaps a client sees directly are the pacing plus what the path adds.

It answers ``GET /version`` (as a POP does, for pinproxy's discovery), any other ``GET``
with ``{"status":"ok"}`` (a router's health check), and any ``POST``:
``"stream": true`` in the body gets a chunked ``text/event-stream`` of OpenAI chat
chunks, one token per event, then a usage chunk and ``[DONE]``; anything else gets a
small chat completion. Responses carry ``X-Prompt-Version`` and ``X-Backend-ID``.
A stream's length and pace are the request's ``max_tokens`` and
``bench_tokens_per_second`` when present, else the command line's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import itertools
import re
import time
from typing import cast

import orjson

_HEAD_END = b"\r\n\r\n"
# The pace a request asks for (bench/sse.py sends both; proxies forward the body as is).
_MAX_TOKENS = re.compile(rb'"max_tokens":\s*(\d+)')
_RATE = re.compile(rb'"bench_tokens_per_second":\s*([0-9.]+)')


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Answers:
    """Every byte string a response is made of, encoded once."""

    def __init__(self, backend_id: str, prompt: str, completion_tokens: int) -> None:
        self._ends: dict[int, bytes] = {}
        stamp = f"X-Prompt-Version: {prompt}\r\nX-Backend-ID: {backend_id}\r\n".encode()
        self.tokens = completion_tokens
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n" + stamp + b"\r\n"
        )
        base = {"id": "chatcmpl-sse", "object": "chat.completion.chunk", "created": 0,
                "model": "sim-model"}
        first = base | {"choices": [{"index": 0, "delta": {"role": "assistant",
                                                            "content": f"[{backend_id}]"},
                                      "finish_reason": None}]}
        token = base | {"choices": [{"index": 0, "delta": {"content": " token"},
                                     "finish_reason": None}]}
        self._base = base
        self.first_event = _chunk(b"data: " + orjson.dumps(first) + b"\n\n")
        self.token_event = _chunk(b"data: " + orjson.dumps(token) + b"\n\n")
        version = orjson.dumps({"prompt": prompt, "backend_id": backend_id, "region": "bench"})
        completion = orjson.dumps(
            base | {"object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": f"[{backend_id}] token"},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}}
        )
        self.version = self._whole(version, stamp)
        self.completion = self._whole(completion, stamp)
        self.ok = self._whole(b'{"status":"ok"}', stamp)
        self.not_found = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    def end(self, tokens: int) -> bytes:
        """The last event (finish reason and usage), ``[DONE]`` and the last chunk."""
        done = self._ends.get(tokens)
        if done is None:
            last = self._base | {
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 9, "completion_tokens": tokens,
                          "total_tokens": 9 + tokens},
            }
            done = _chunk(b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n") + b"0\r\n\r\n"
            self._ends[tokens] = done
        return done

    @staticmethod
    def _whole(body: bytes, stamp: bytes) -> bytes:
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            % len(body)
            + stamp + b"\r\n" + body
        )


class Pacer:
    """The one ticker: a heap of (due time, sequence, stream) and a timer per tick."""

    def __init__(self, tokens_per_second: float, tick_s: float) -> None:
        self.rate = tokens_per_second
        self.tick_s = tick_s
        self._heap: list[tuple[float, int, SseServer]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, due: float, conn: SseServer) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), conn))
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due - time.monotonic()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = time.monotonic()
        heap = self._heap
        # A stream's next event is due `interval` after its last *due* time, not after
        # when this tick ran: a late tick does not shift the rest of the stream.
        while heap and heap[0][0] <= now:
            due, _, conn = heapq.heappop(heap)
            if conn.send_next():
                heapq.heappush(heap, (due + conn.interval, next(self._seq), conn))
        if heap:
            wait = max(self.tick_s, heap[0][0] - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(wait, self._tick)


class SseServer(asyncio.Protocol):
    """One client connection; keep-alive, one request at a time."""

    def __init__(self, answers: Answers, pacer: Pacer) -> None:
        self._answers = answers
        self._pacer = pacer
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._left = 0  # token events still to send on the current stream
        self._tokens = 0
        self.interval = 1.0 / pacer.rate
        self._streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while not self._streaming:
            end = self._buf.find(_HEAD_END)
            if end < 0:
                return
            head = self._buf[:end].lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                line_end = head.find(b"\r\n", at + 2)
                length = int(head[at + 17 : line_end if line_end > 0 else None])
            total = end + 4 + length
            if len(self._buf) < total:
                return
            body, self._buf = self._buf[end + 4 : total], self._buf[total:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self._transport is not None
        answers = self._answers
        if head.startswith(b"get /version"):
            self._transport.write(answers.version)
        elif head.startswith(b"get "):
            # /health, /v1/models...: a router checks its workers before it serves.
            self._transport.write(answers.ok)
        elif not head.startswith(b"post "):
            self._transport.write(answers.not_found)
        elif b'"stream":true' in body.replace(b" ", b""):
            tokens = _MAX_TOKENS.search(body)
            rate = _RATE.search(body)
            self._tokens = max(1, int(tokens.group(1))) if tokens else answers.tokens
            self.interval = 1.0 / (float(rate.group(1)) if rate else self._pacer.rate)
            self._streaming = True
            self._transport.write(answers.stream_head + answers.first_event)
            self._left = self._tokens - 1
            self._pacer.add(time.monotonic() + self.interval, self)
        else:
            self._transport.write(answers.completion)

    def send_next(self) -> bool:
        """Write the next event; False when the stream is over (or the client left)."""
        transport = self._transport
        if transport is None:
            return False
        if self._left > 0:
            self._left -= 1
            transport.write(self._answers.token_event)
            return True
        transport.write(self._answers.end(self._tokens))
        self._streaming = False
        if self._buf:  # a pipelined request arrived while streaming
            self.data_received(b"")
        return False


async def serve(port: int, answers: Answers, pacer: Pacer) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SseServer(answers, pacer), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_backend", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--id", default="pop-1")
    parser.add_argument("--prompt", default="v47")
    parser.add_argument("--tokens-per-second", type=float, default=50.0)
    parser.add_argument("--completion-tokens", type=int, default=200)
    parser.add_argument("--tick", type=float, default=0.002, help="seconds between ticks")
    args = parser.parse_args()
    # Thousands of live protocols: a full collection would stall every stream at once.
    gc.freeze()
    gc.set_threshold(2000, 10, 1000)
    answers = Answers(args.id, args.prompt, max(1, args.completion_tokens))
    pacer = Pacer(args.tokens_per_second, args.tick)
    import uvloop

    uvloop.run(serve(args.port, answers, pacer))


if __name__ == "__main__":
    main()
