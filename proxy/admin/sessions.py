"""Admin routes for one session: its pin and audit trail; repin and unpin it.

A repin or unpin goes through the pin store, which is what makes it reach every
replica: the Redis store writes and PUBLISHes the invalidation in one transaction,
and every process evicts its cached copy (see proxy/store/redis.py). The change is
also written into the session's audit trail, so the trail shows why the next request
went to another version (invariant 1: a change of version is explicit, counted,
audited).

Session ids arrive percent-encoded in the path and are held to the data plane's rules
(proxy/policy/sessions.py): valid UTF-8, at most ``sessions.max_id_bytes`` bytes, no control
character; anything else is a 400 before anything is read or changed.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy.admin.api import Body, Param, Route, int_query, integer_param, read_body, reply
from proxy.admin.app import SERVICES
from proxy.admin.fleet_common import version_ref, version_ref_schema
from proxy.core.errors import BadRequest, Conflict, NotFound
from proxy.core.headers import ensure_traceparent, new_request_id, valid_request_id
from proxy.core.models import DIMENSIONS, Forward, Pin, RequestFacts, Snapshot, prompt_of
from proxy.policy.routing import choose
from proxy.telemetry.audit import AuditRecord

if TYPE_CHECKING:
    from aiohttp import web

logger = logging.getLogger(__name__)

# The data plane's rule (proxy/policy/sessions.py): C0, DEL and C1 never appear in an id.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_LIMIT: Final = 10_000
_SESSION_SEGMENT: Final = 3  # raw_parts of "/admin/sessions/{id}...": "/", admin, sessions, id
# JSON Schema counts characters, the rule counts UTF-8 bytes: the document can only
# bound the length in characters, and says bytes in words.
SESSION_ID: Final = Param(
    "session_id",
    "the session id, percent-encoded; valid UTF-8, at most sessions.max_id_bytes bytes "
    "of it, no control character (U+0000-001F, U+007F-009F)",
    lambda settings: {"type": "string", "minLength": 1,
                      "maxLength": settings.sessions.max_id_bytes,
                      "pattern": r"^[^\x00-\x1f\x7f-\x9f]+$"},
)


class PinView(BaseModel):
    """A session's pin: the version key it is held to, and where and when it was pinned."""

    version_key: str
    prompt_version: str
    backend_id: str
    region: str
    pinned_at: float = Field(description="wall-clock seconds since the epoch")

    @classmethod
    def of(cls, pin: Pin) -> PinView:
        return cls(version_key=pin.version_key, prompt_version=prompt_of(pin.version_key),
                   backend_id=pin.backend_id, region=pin.region, pinned_at=pin.pinned_at)


class AuditRecordView(BaseModel):
    """One request of the session (or an admin repin/unpin, which has no backend)."""

    at: float = Field(description="wall-clock seconds since the epoch when it arrived")
    request_id: str
    trace_id: str
    method: str
    path: str
    status: int
    backend_id: str | None
    region: str | None
    version_key: str | None = Field(description="the version that served it")
    latency_ms: float
    ttfb_ms: float | None
    version_changed: str | None = Field(description="'old -> new' when the pin changed")
    error_type: str | None

    @classmethod
    def of(cls, record: AuditRecord) -> AuditRecordView:
        return cls(at=record.at, request_id=record.request_id, trace_id=record.trace_id,
                   method=record.method, path=record.path, status=record.status,
                   backend_id=record.backend_id, region=record.region,
                   version_key=record.version_key, latency_ms=record.latency_ms,
                   ttfb_ms=record.ttfb_ms, version_changed=record.version_changed,
                   error_type=record.error_type)


class SessionView(BaseModel):
    session_id: str
    pin: PinView | None = Field(description="null when the session is not pinned now")
    trail: list[AuditRecordView] = Field(description="the last requests, oldest first")
    records_per_session: int = Field(description="how many records the trail keeps at most")


def _repin_schema(schema: dict[str, Any]) -> None:
    """The body as the validator below has it: exactly one of a string ``version`` and
    ``fresh: true``; no nulls (pydantic would document ``str | None`` as nullable)."""
    properties = schema["properties"]
    # The pattern is over every dimension (this model is built once, not per config):
    # one outside versions.dimensions is refused by the handler, 400 invalid_version.
    properties["version"] = {"type": "string", "minLength": 1, "maxLength": 1024,
                             "pattern": version_ref_schema(DIMENSIONS)["pattern"],
                             "description": "a version key, or a bare prompt version naming "
                                            "exactly one serving key"}
    properties["fresh"] = {"const": True, "description": "what a new session would get now"}
    schema["oneOf"] = [{"required": ["version"]}, {"required": ["fresh"]}]


class RepinBody(Body):
    """Exactly one of: ``version`` (a version key, or a bare prompt version that names
    one serving key), or ``fresh: true`` (the choice a new session would get now)."""

    # strict: "fresh": "yes" or "version": 5 is a 400, not quietly coerced.
    model_config = ConfigDict(strict=True, json_schema_extra=_repin_schema)

    version: str | None = Field(default=None, min_length=1, max_length=1024)
    fresh: bool | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        for name in ("version", "fresh"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"'{name}' must not be null (leave it out instead)")
        if (self.version is None) == (self.fresh is None):
            raise ValueError("give exactly one of 'version' or 'fresh'")
        if self.fresh is False:
            raise ValueError("'fresh' must be true when given")
        return self


class RepinResult(BaseModel):
    session_id: str
    previous: PinView | None = Field(description="the pin before (null if it expired meanwhile)")
    pin: PinView
    changed: bool = Field(description="whether the version key changed")


class UnpinResult(BaseModel):
    session_id: str
    previous: PinView


async def _get_session(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    session_id = _session_id(request, services.settings.sessions.max_id_bytes)
    audit = services.audit
    limit = int_query(request, "limit", audit.records_per_session, lo=0, hi=_MAX_LIMIT)
    # Note: reading the pin slides its TTL like any request of the session would.
    pin = await services.store.get(session_id)
    records = await audit.trail(session_id, max(limit, 1))
    if pin is None and not records:
        raise NotFound("no pin and no audit trail for this session (unknown or expired)",
                       code="unknown_session", param="session_id")
    trail = records[len(records) - limit:] if limit else []
    return reply(SessionView(
        session_id=session_id,
        pin=None if pin is None else PinView.of(pin),
        trail=[AuditRecordView.of(r) for r in trail],
        records_per_session=audit.records_per_session,
    ))


async def _repin(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    started = services.clock.monotonic()
    session_id = _session_id(request, services.settings.sessions.max_id_bytes)
    body = await read_body(request, RepinBody)
    store = services.store
    current = await store.get(session_id)
    if current is None:
        raise NotFound("this session has no pin to change (never pinned, expired or unpinned)",
                       code="session_not_pinned", param="session_id")
    chosen = _choose(request, session_id, body)
    pin = Pin(chosen.version_key, chosen.backend.id, chosen.backend.region, services.clock.time())
    # A pin that expired since the read above is simply written anew.
    previous = await store.repin(session_id, pin)
    changed = previous is None or previous.version_key != pin.version_key
    if previous is not None and changed:
        services.metrics.version_switches.labels(
            "admin_repin", previous.version_key, pin.version_key
        ).inc()
    before = "(none)" if previous is None else previous.version_key
    logger.info("admin: session repinned %s -> %s", before, pin.version_key)
    _audit(request, session_id, pin.version_key, f"{before} -> {pin.version_key}", started)
    return reply(RepinResult(
        session_id=session_id,
        previous=None if previous is None else PinView.of(previous),
        pin=PinView.of(pin),
        changed=changed,
    ))


async def _unpin(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES]
    started = services.clock.monotonic()
    session_id = _session_id(request, services.settings.sessions.max_id_bytes)
    previous = await services.store.unpin(session_id)
    if previous is None:
        raise NotFound("this session has no pin (never pinned, expired or already unpinned)",
                       code="session_not_pinned", param="session_id")
    logger.info("admin: session unpinned from %s", previous.version_key)
    _audit(request, session_id, None, f"{previous.version_key} -> (unpinned)", started)
    return reply(UnpinResult(session_id=session_id, previous=PinView.of(previous)))


def _choose(request: web.Request, session_id: str, body: RepinBody) -> Forward:
    """Where the session goes: a backend of the named version, or a new-session choice."""
    services = request.app[SERVICES]
    snapshot = services.registry.snapshot
    policy = services.dataplane.routing_policy  # the running policy: a reload may change it
    facts = RequestFacts(session_id=session_id)
    target: Pin | None = None
    if body.version is not None:
        # Canonical, and over versions.dimensions only (400 invalid_version otherwise).
        wanted = version_ref(body.version, services.registry.dimensions)
        key = resolve_version(snapshot, wanted)
        # Routing among the named version's backends, exactly as a pinned request would.
        target = Pin(key, "", "", 0.0)
    decision = choose(
        facts, target, snapshot, policy, services.loads, services.rng, services.clock.time()
    )
    if not isinstance(decision, Forward) or decision.repin_from is not None:
        raise Conflict("no backend may take new sessions right now (none healthy with an "
                       "admitted version)", code="no_backends")
    return decision


def resolve_version(snapshot: Snapshot, wanted: str) -> str:
    """The serving version key ``wanted`` names: itself, or the one key with that prompt.

    Raises ``Conflict`` unless exactly one version key with a routable backend matches.
    """
    serving = {s.version_key for s in snapshot.backends if s.routable and s.version_key}
    if wanted in serving:
        return wanted
    matches = sorted(key for key in serving if prompt_of(key) == wanted)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise Conflict(f"prompt version {wanted!r} is served under several version keys "
                       f"({', '.join(matches)}); name one",
                       code="ambiguous_version", param="version")
    raise Conflict(f"no routable backend serves version {wanted!r} now",
                   code="version_not_serving", param="version")


def _audit(request: web.Request, session_id: str, version_key: str | None, change: str,
           started: float) -> None:
    services = request.app[SERVICES]
    rng, clock = services.rng, services.clock
    incoming = request.headers.get("X-Request-ID")
    traceparent = ensure_traceparent(request.headers.get("traceparent"), rng)
    services.audit.offer(session_id, AuditRecord(
        at=clock.time(),
        request_id=incoming if incoming and valid_request_id(incoming) else new_request_id(rng),
        trace_id=traceparent.split("-")[1],
        method=request.method,
        path="/admin/sessions/{session_id}/pin",  # the id is the trail's own key
        status=200,
        backend_id=None,
        region=None,
        version_key=version_key,
        latency_ms=round((clock.monotonic() - started) * 1000.0, 3),
        version_changed=change,
    ))


def _session_id(request: web.Request, max_bytes: int) -> str:
    """The path's session id, decoded strictly and held to the data plane's rules."""
    raw = request.rel_url.raw_parts[_SESSION_SEGMENT]
    try:
        value = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("session id is not valid UTF-8 once percent-decoded",
                         code="invalid_session_id", param="session_id") from exc
    # The id itself is never echoed in an error: it may be long, binary or a secret.
    if len(value.encode("utf-8")) > max_bytes:
        raise BadRequest(f"session id is longer than {max_bytes} bytes",
                         code="invalid_session_id", param="session_id")
    bad = _CONTROL.search(value)
    if bad is not None:
        raise BadRequest(f"session id contains a control character (U+{ord(bad.group()):04X} at "
                         f"position {bad.start()})", code="invalid_session_id", param="session_id")
    return value


_TAGS = ("sessions",)
_P = (SESSION_ID,)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/admin/sessions/{session_id}", _get_session,
          "A session's pin (version, when, where) and its audit trail, oldest first.",
          response=SessionView, tags=_TAGS, path_params=_P,
          query=(integer_param("limit", "trail records to return (default and most: "
                                        "audit.records_per_session)", lo=0, hi=_MAX_LIMIT),)),
    Route("PUT", "/admin/sessions/{session_id}/pin", _repin,
          "Repin the session to a named version (which must have a routable backend) or "
          "to a fresh new-session choice; reaches every replica sharing the store.",
          response=RepinResult, request=RepinBody, tags=_TAGS, path_params=_P),
    Route("DELETE", "/admin/sessions/{session_id}/pin", _unpin,
          "Unpin the session: its next request is routed like a new session's.",
          response=UnpinResult, tags=_TAGS, path_params=_P),
)
