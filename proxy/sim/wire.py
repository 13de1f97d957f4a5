"""HTTP plumbing shared by the sim's handlers: stamps, header copies, JSON answers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from proxy.core.models import DIMENSIONS, STAMP_HEADERS
from proxy.sim import openai

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from proxy.sim.state import PopState


def stamp_headers(state: PopState) -> dict[str, str]:
    if not state.stamp:
        return {}
    headers = {
        STAMP_HEADERS[dim]: value
        for dim in DIMENSIONS
        if (value := getattr(state.version, dim)) is not None
    }
    headers["X-Backend-ID"] = state.backend_id
    return headers


def flatten_headers(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    # Repeated headers are combined the way RFC 9110 allows, so none is lost.
    flat: dict[str, str] = {}
    lower: dict[str, str] = {}
    for name, value in headers.items():
        # Names may be multidict's istr, a str subclass orjson refuses as a key.
        first = lower.setdefault(name.lower(), str(name))
        flat[first] = f"{flat[first]}, {value}" if first in flat else value
    return flat


def json_response(state: PopState, payload: object, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=stamp_headers(state),
    )


def error_response(
    state: PopState, status: int, message: str, error_type: str | None = None
) -> web.Response:
    return web.Response(
        body=openai.error_body(message, error_type or openai.error_type_for(status)),
        status=status,
        content_type="application/json",
        headers=stamp_headers(state),
    )
