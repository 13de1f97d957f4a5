"""The one HTTP client to the backends, and the boundary where its errors are translated.

The session never follows redirects, never decompresses (bodies pass byte for byte),
never keeps cookies (a proxy must not mix users' cookies) and never adds headers of
its own. Streams have no total deadline: a connect timeout bounds reaching the
backend and an idle-read timeout bounds each silence, head included.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from typing import TYPE_CHECKING

import aiohttp
from yarl import URL

from proxy.errors import UpstreamError, UpstreamTimeout

if TYPE_CHECKING:
    from multidict import CIMultiDict

    from proxy.config import UpstreamConfig

Body = bytes | AsyncIterable[bytes] | None


class UpstreamConnectError(UpstreamError):
    """No response head came back because the connection failed or was dropped.

    Nothing reached the client, so the request may go to another backend of the
    same version (invariant 5).
    """


def make_client_session(config: UpstreamConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.pool_size,
        limit_per_host=config.pool_size_per_host,
        ttl_dns_cache=10,
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
    )


def upstream_url(base_url: str, raw_path_qs: str) -> URL:
    """Backend base URL + the request's own path and query, kept exactly as received.

    Built from the request's origin-form path only: an absolute-form target or the
    Host header never decides where a request goes.
    """
    if not raw_path_qs.startswith("/"):
        raw_path_qs = "/" + raw_path_qs
    return URL(base_url + raw_path_qs, encoded=True)


class Upstream:
    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def send(
        self, method: str, url: URL, headers: Mapping[str, str] | CIMultiDict[str], body: Body
    ) -> aiohttp.ClientResponse:
        """Send the request; return once the response head is in. The caller releases it.

        An empty body is sent as no body: aiohttp then adds no ``Content-Length: 0`` to a
        GET, HEAD or OPTIONS that had none (RFC 9110 §8.6), and keeps ``0`` for methods
        that anticipate content (POST, PUT, PATCH, DELETE), as the client's own would.
        """
        try:
            return await self._http.request(
                method, url, headers=headers, data=body if body != b"" else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            raise UpstreamConnectError(
                f"could not reach the backend: {type(exc).__name__}"
            ) from exc
        except aiohttp.ClientOSError as exc:
            raise UpstreamConnectError(f"connection to the backend failed: {exc.strerror}") from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the backend did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"the backend sent an invalid response: {type(exc).__name__}"
            ) from exc

    def __repr__(self) -> str:
        return f"Upstream(closed={self._http.closed})"
