"""The simulated POP: an aiohttp app that plays one regional LLM backend, and its runner."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Self

import orjson
from aiohttp import web

from proxy.core.clock import Clock, SystemClock
from proxy.sim import openai
from proxy.sim.state import ControlError, PopState, RequestRecord, SimCounters
from proxy.sim.wire import error_response, flatten_headers, json_response, stamp_headers

if TYPE_CHECKING:
    from types import TracebackType

    from proxy.core.models import VersionBundle

_log = logging.getLogger(__name__)

_Endpoint = Callable[[web.Request, PopState, Mapping[str, Any]], Awaitable[web.StreamResponse]]
_MAX_BODY = 64 * 1024 * 1024


class SimPop:
    """One simulated POP serving the OpenAI API over HTTP on a real socket.

    ``state`` may be mutated at any time; ``requests`` and ``counters`` show what the POP
    received. Use ``await start()``/``await stop()`` or ``async with``.
    """

    def __init__(
        self,
        state: PopState,
        *,
        clock: Clock | None = None,
        max_records: int = 10_000,
        shutdown_timeout: float = 1.0,
        access_log: bool = False,
    ) -> None:
        self.state = state
        self.counters = SimCounters()
        self._clock = clock or SystemClock()
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._shutdown_timeout = shutdown_timeout
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._seq = 0
        self._json_answers = 0  # JSON-mode answers, for state.json_invalid_every
        self._idle = asyncio.Event()
        self._idle.set()
        self._endpoints: dict[tuple[str, str], _Endpoint] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/responses"): self._responses,
        }

    @property
    def requests(self) -> list[RequestRecord]:
        """API requests received, oldest first (the most recent ``max_records``)."""
        return list(self._records)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the POP is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:18101``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._host, self._host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def flip(self, version: VersionBundle) -> None:
        """Switch what this POP serves, as an atomic runtime cutover would."""
        self.state.version = version

    async def wait_idle(self) -> None:
        """Return once no API request is in flight (e.g. after a client hung up)."""
        await self._idle.wait()

    def reset(self) -> None:
        """Forget recorded requests and zero the counters."""
        self._records.clear()
        self.counters.reset()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_get("/version", self._version)
        app.router.add_get("/_sim/state", self._sim_state)
        app.router.add_post("/_sim/control", self._sim_control)
        app.router.add_get("/_sim/requests", self._sim_requests)
        app.router.add_post("/_sim/reset", self._sim_reset)
        app.router.add_route("*", "/_sim/{tail:.*}", self._sim_unknown)
        # Registered last: the resolver falls through to it for anything above that
        # does not match by method too (e.g. POST /version).
        app.router.add_route("*", "/{tail:.*}", self._api)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 picks a free port; read it from ``port``/``url``)."""
        if self._runner is not None:
            raise RuntimeError(f"{self!r} is already started")
        runner = web.AppRunner(
            self.make_app(),
            handle_signals=False,
            access_log=_log if self._access_log else None,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; in-flight requests get ``shutdown_timeout`` seconds to finish."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        url = self.url if self._port is not None else None
        return (
            f"SimPop(id={self.state.backend_id!r}, region={self.state.region!r}, "
            f"version={self.state.version_key!r}, url={url!r})"
        )

    async def _version(self, request: web.Request) -> web.Response:
        state = self.state
        self.counters.version_requests += 1
        if not state.version_endpoint_ok:
            return error_response(state, 503, f"{state.backend_id}: /version is unavailable")
        return json_response(
            state,
            state.version.as_dict() | {"backend_id": state.backend_id, "region": state.region},
        )

    async def _sim_state(self, request: web.Request) -> web.Response:
        return json_response(
            self.state, self.state.as_dict() | {"counters": self.counters.as_dict()}
        )

    async def _sim_control(self, request: web.Request) -> web.Response:
        try:
            updates = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error_response(self.state, 400, "body must be a JSON object")
        if not isinstance(updates, dict):
            return error_response(self.state, 400, "body must be a JSON object")
        try:
            self.state.apply(updates)
        except ControlError as exc:
            return error_response(self.state, 400, str(exc))
        return await self._sim_state(request)

    async def _sim_requests(self, request: web.Request) -> web.Response:
        records = list(self._records)
        if (session := request.query.get("session_id")) is not None:
            records = [r for r in records if r.session_id == session]
        if (limit := request.query.get("limit")) is not None:
            if not limit.isdigit():
                return error_response(self.state, 400, "limit must be a non-negative integer")
            records = records[len(records) - int(limit) :] if int(limit) else []
        payload = {"count": len(records), "requests": [r.as_dict() for r in records]}
        return json_response(self.state, payload)

    async def _sim_reset(self, request: web.Request) -> web.Response:
        cleared = len(self._records)
        self.reset()
        return json_response(self.state, {"cleared": cleared})

    async def _sim_unknown(self, request: web.Request) -> web.Response:
        return error_response(
            self.state, 404, f"no sim control endpoint {request.method} {request.path}"
        )

    async def _api(self, request: web.Request) -> web.StreamResponse:
        # The request is served by the state as it was on arrival, like a real runtime
        # that finishes in-flight work on the version it started with.
        state = copy.copy(self.state)
        self.counters.in_flight += 1
        self._idle.clear()
        try:
            resp = await self._serve(request, state)
            if not resp.prepared:  # streams count themselves when they start
                self.counters.count_response(resp.status)
            return resp
        finally:
            self.counters.in_flight -= 1
            if self.counters.in_flight == 0:
                self._idle.set()

    async def _serve(self, request: web.Request, state: PopState) -> web.StreamResponse:
        endpoint = self._endpoints.get((request.method, request.path))
        digest = ""
        try:
            if endpoint is None:
                body_len, digest = await self._drain_body(request)
                body = b""
            else:
                body = await request.read()
                body_len = len(body)
        except web.HTTPRequestEntityTooLarge:
            return error_response(state, 413, f"request body larger than {_MAX_BODY} bytes")
        self._record(request, state, body_len)
        if state.ttfb_ms > 0:
            await asyncio.sleep(state.ttfb_ms / 1000)
        if state.fail_status is not None:
            message = f"simulated failure on {state.backend_id} (fail_status={state.fail_status})"
            return error_response(state, state.fail_status, message)
        pinned = request.headers.get("X-Pinned-Version")
        if state.strict and pinned is not None and pinned != state.strict_key:
            message = (
                f"request pinned to {pinned!r} but {state.backend_id} serves {state.strict_key!r}"
            )
            return error_response(state, 409, message, "version_mismatch")
        if endpoint is None:
            return self._echo(request, state, body_len, digest)
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error_response(state, 400, "request body is not valid JSON")
        if not isinstance(payload, dict):
            return error_response(state, 400, "request body must be a JSON object")
        return await endpoint(request, state, payload)

    async def _drain_body(self, request: web.Request) -> tuple[int, str]:
        # Chunk by chunk: an echo must cope with bodies of any size and with chunked
        # uploads that carry no Content-Length.
        sha = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            sha.update(chunk)
            size += len(chunk)
        return size, sha.hexdigest()

    def _record(self, request: web.Request, state: PopState, body_len: int) -> None:
        self.counters.requests += 1
        path, _, query = request.raw_path.partition("?")
        self._records.append(
            RequestRecord(
                at=self._clock.time(),
                method=request.method,
                path=path,
                session_id=request.headers.get("X-Session-ID"),
                pinned_version=request.headers.get("X-Pinned-Version"),
                headers=flatten_headers(request.headers),
                body_len=body_len,
                query_string=query,
                version_key=state.version_key,
            )
        )

    def _echo(
        self, request: web.Request, state: PopState, body_len: int, digest: str
    ) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        return json_response(
            state,
            {
                "method": request.method,
                "path": path,
                "query_string": query,
                "headers": flatten_headers(request.headers),
                "header_items": [[str(k), v] for k, v in request.headers.items()],
                "body_sha256": digest,
                "body_len": body_len,
                "backend_id": state.backend_id,
            },
        )

    def _reply(self, state: PopState, payload: Mapping[str, Any], prefix: str) -> openai.Reply:
        self._seq += 1
        options = payload.get("stream_options")
        json_mode = openai.wants_json(payload)
        valid = state.json_valid
        if json_mode and state.json_invalid_every:
            self._json_answers += 1
            valid = valid and self._json_answers % state.json_invalid_every != 0
        return openai.Reply(
            id=f"{prefix}-{state.backend_id}-{self._seq}",
            created=int(self._clock.time()),
            model=state.version.model or "sim-model",
            pieces=openai.content_pieces(
                state.backend_id,
                state.version.prompt,
                state.completion_tokens,
                json_mode=json_mode,
                json_valid=valid,
            ),
            prompt_tokens=max(1, len(orjson.dumps(payload.get("messages", payload))) // 4),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    async def _chat(
        self, request: web.Request, state: PopState, payload: Mapping[str, Any]
    ) -> web.StreamResponse:
        reply = self._reply(state, payload, "chatcmpl")
        if payload.get("stream") is True:
            return await self._stream(request, state, openai.chat_stream(reply))
        return json_response(state, openai.chat_completion(reply))

    async def _completions(
        self, request: web.Request, state: PopState, payload: Mapping[str, Any]
    ) -> web.StreamResponse:
        reply = self._reply(state, payload, "cmpl")
        if payload.get("stream") is True:
            return await self._stream(request, state, openai.text_stream(reply))
        return json_response(state, openai.text_completion(reply))

    async def _responses(
        self, request: web.Request, state: PopState, payload: Mapping[str, Any]
    ) -> web.StreamResponse:
        reply = self._reply(state, payload, "sim")
        if payload.get("stream") is True:
            return await self._stream(request, state, openai.response_stream(reply))
        return json_response(state, openai.response_object(reply))

    async def _embeddings(
        self, request: web.Request, state: PopState, payload: Mapping[str, Any]
    ) -> web.StreamResponse:
        try:
            return json_response(
                state, openai.embeddings(payload, state.version.model or "sim-model")
            )
        except ValueError as exc:
            return error_response(state, 400, str(exc))

    async def _stream(
        self, request: web.Request, state: PopState, plan: openai.StreamPlan
    ) -> web.StreamResponse:
        headers = stamp_headers(state) | {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        resp = web.StreamResponse(status=200, headers=headers)
        interval = 1 / state.tokens_per_second if state.tokens_per_second > 0 else 0.0
        loop = asyncio.get_running_loop()
        self.counters.streams_started += 1
        self.counters.count_response(200)
        try:
            # The head goes out before any token exists, as from a real model server.
            await resp.prepare(request)
            for frame in plan.head:
                await resp.write(frame)
            started = loop.time()
            for i, frame in enumerate(plan.tokens):
                if i and interval:
                    # Keeps the average rate on schedule, but never bursts after a stall:
                    # each token still trails the previous one by half an interval.
                    due = started + i * interval - loop.time()
                    await asyncio.sleep(max(due, interval / 2))
                await resp.write(frame)
                self.counters.chunks_sent += 1
            for frame in plan.tail:
                await resp.write(frame)
            await resp.write_eof()
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError included
            self.counters.streams_aborted += 1
            return resp
        except asyncio.CancelledError:
            self.counters.streams_aborted += 1
            raise
        self.counters.streams_completed += 1
        return resp
