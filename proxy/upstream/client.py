"""The HTTP clients to the backends, and the boundary where their errors are translated.

Requests whose body is held in memory (nearly all of an LLM API's) go through the lean
keep-alive pool in http1.py; streamed bodies and HEAD go through aiohttp's client.
Either way the caller gets an ``UpstreamResponse`` and only pinproxy's own errors.

Neither client follows redirects, decompresses (bodies pass byte for byte), keeps
cookies (a proxy must not mix users' cookies) or adds headers of its own. Streams have
no total deadline: a connect timeout bounds reaching the backend and an idle-read
timeout bounds each silence, head included.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, Mapping
from typing import TYPE_CHECKING, Final, Protocol

import aiohttp
from yarl import URL

from proxy.core.errors import (
    ProxyError,
    UpstreamBodyError,
    UpstreamConnectError,
    UpstreamDropped,
    UpstreamError,
    UpstreamHeadTooLarge,
    UpstreamTimeout,
)
from proxy.upstream.http1 import DEFAULT_HEAD_LIMITS, HeadLimits, Target, response_head_size

if TYPE_CHECKING:
    import ssl

    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.config.settings import UpstreamConfig
    from proxy.upstream.pool import Http1Pool

Body = bytes | AsyncIterable[bytes] | None

# What aiohttp's parser says of a head over max_line_size / max_field_size / max_headers.
_HEAD_OVER_LIMITS: Final = re.compile(r"Got more than \d+ bytes|Too many headers", re.IGNORECASE)

__all__ = ["Body", "Upstream", "UpstreamConnectError", "UpstreamResponse", "upstream_url"]


class UpstreamResponse(Protocol):
    """A backend's response whose head is in. Finish it with ``release`` or ``close``."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content_type(self) -> str: ...

    async def read_chunk(self) -> bytes:
        """What has arrived of the body; ``b""`` at its end. Raises ``UpstreamBodyError``."""
        ...

    def whole_body(self) -> bytes | None:
        """The whole body when all of it has already arrived (then read), else None."""
        ...

    def release(self) -> None: ...
    def close(self) -> None: ...


def make_client_session(
    config: UpstreamConfig, tls: ssl.SSLContext | None = None
) -> aiohttp.ClientSession:
    """aiohttp's client for streamed bodies, HEAD and /version polls; ``tls`` verifies
    https backends (aiohttp's default, the system's CAs, when None)."""
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size_per_host,
        ttl_dns_cache=10,
        ssl=tls if tls is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        # aiohttp would otherwise add Accept: */* and Accept-Encoding: gzip, deflate (and a
        # User-Agent, and a Content-Type guessed from the body) that the client never sent.
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=config.connect_timeout_s,
            sock_read=config.read_idle_timeout_s,
        ),
        trust_env=False,
        # Response heads: no single line beyond the whole head's cap, no more headers
        # than allowed; the whole head's size is checked once it is in (Upstream).
        max_line_size=config.max_response_head_bytes,
        max_field_size=config.max_response_head_bytes,
        max_headers=config.max_response_headers,
    )


def upstream_url(base_url: str, raw_path_qs: str) -> URL:
    """Backend base URL + the request's own path and query, kept exactly as received.

    Built from the request's origin-form path only: an absolute-form target or the
    Host header never decides where a request goes.
    """
    if not raw_path_qs.startswith("/"):
        raw_path_qs = "/" + raw_path_qs
    return URL(base_url + raw_path_qs, encoded=True)


class _AiohttpResponse:
    """aiohttp's response behind ``UpstreamResponse``, its body errors translated."""

    __slots__ = ("_response", "content_type", "headers", "reason", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.content_type = response.content_type

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamBodyError(
                f"the backend failed mid-response: {type(exc).__name__}"
            ) from exc

    def whole_body(self) -> None:
        return None  # aiohttp's reader does not say; its responses stream

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()

    def __repr__(self) -> str:
        return f"_AiohttpResponse({self.status})"


class Upstream:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        pool: Http1Pool,
        limits: HeadLimits = DEFAULT_HEAD_LIMITS,
    ) -> None:
        """``limits``: the response heads aiohttp's client may pass on (the pool has its own)."""
        self._http = http
        self._pool = pool
        self._limits = limits
        self._targets: dict[str, Target] = {}

    async def send(
        self,
        method: str,
        base_url: str,
        path_qs: str,
        headers: Mapping[str, str] | CIMultiDict[str],
        body: Body,
        *,
        replayable: bool = False,
    ) -> UpstreamResponse:
        """Send the request; return once the response head is in. The caller finishes it.

        Failures are told apart by what the backend may have seen: nothing
        (``UpstreamConnectError``), the request but no head (``UpstreamDropped``), a
        broken or late head (``UpstreamError``, ``UpstreamTimeout``). ``replayable``
        lets a pooled connection found closed be retried once on a fresh one.

        ``path_qs`` is the request's own path and query, kept exactly as received. An
        empty body is sent as no body: no ``Content-Length: 0`` is added to a GET, HEAD
        or OPTIONS that had none (RFC 9110 §8.6), while methods that anticipate content
        (POST, PUT, PATCH, DELETE) keep ``0``, as the client's own would.
        """
        if not path_qs.startswith("/"):
            path_qs = "/" + path_qs
        # HEAD answers carry a length but no body, which only aiohttp's parser is told.
        if isinstance(body, bytes) and method != "HEAD":
            target = self._targets.get(base_url)
            if target is None:
                target = self._targets[base_url] = Target(base_url)
            return await self._pool.request(
                target, method, path_qs, headers, body, replayable=replayable
            )
        return await self._send_aiohttp(method, upstream_url(base_url, path_qs), headers, body)

    async def _send_aiohttp(
        self, method: str, url: URL, headers: Mapping[str, str] | CIMultiDict[str], body: Body
    ) -> UpstreamResponse:
        try:
            response = await self._http.request(
                method, url, headers=headers, data=body if body != b"" else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamConnectError(
                f"could not reach the backend: {type(exc).__name__}"
            ) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise UpstreamDropped("the backend closed the connection before answering") from exc
        except aiohttp.ClientOSError as exc:
            raise UpstreamDropped(f"connection to the backend failed: {exc.strerror}") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the backend did not answer in time") from exc
        except aiohttp.ClientResponseError as exc:
            if _HEAD_OVER_LIMITS.search(exc.message):
                raise UpstreamHeadTooLarge(
                    "the backend's response head is over upstream.max_response_head_bytes"
                    " or upstream.max_response_headers"
                ) from exc
            raise UpstreamError(
                f"the backend sent an invalid response: {type(exc).__name__}"
            ) from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, ProxyError):
                # The client's body failed while it streamed up (refused by the edge:
                # too large, broken framing); aiohttp aborted the upstream request.
                raise exc.__cause__ from None
            raise UpstreamError(
                f"the backend sent an invalid response: {type(exc).__name__}"
            ) from exc
        raw = response.raw_headers
        size = response_head_size(len(response.reason or ""), raw)
        problem = self._limits.exceeded(size, len(raw))
        if problem is not None:
            response.close()  # never relayed, and the connection is not reused
            raise UpstreamHeadTooLarge(problem)
        return _AiohttpResponse(response)

    def __repr__(self) -> str:
        return f"Upstream(closed={self._http.closed}, pool={self._pool!r})"
