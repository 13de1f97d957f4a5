"""What the fleet admin routes share: version bodies and views, version references,
and the data-plane objects they read and steer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.admin.api import Body, Param
from proxy.admin.app import DATA_APP
from proxy.app.build import (
    CLOCK,
    CONTROL,
    EVAL_TRAFFIC,
    LOADS,
    REGISTRY,
    SETTINGS,
    STORE,
    TRAFFIC,
)
from proxy.core.errors import BadRequest
from proxy.core.models import (
    DIMENSIONS,
    VALUE_PATTERN,
    InvalidVersion,
    VersionBundle,
    check_value,
    prompt_of,
)

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.config.settings import Settings
    from proxy.core.clock import Clock
    from proxy.core.ewma import LoadTracker
    from proxy.core.models import Dimension
    from proxy.fleet.control import ControlPlane
    from proxy.fleet.registry import Registry
    from proxy.store import PinStore
    from proxy.telemetry.traffic import TrafficCounter


@dataclass(frozen=True, slots=True)
class Fleet:
    """The data app's objects an admin handler works with."""

    settings: Settings
    clock: Clock
    registry: Registry
    loads: LoadTracker
    store: PinStore
    control: ControlPlane
    traffic: TrafficCounter  # production requests
    eval_traffic: TrafficCounter  # requests marked as eval traffic (evals.header)

    @classmethod
    def of(cls, request: web.Request) -> Fleet:
        data = request.app[DATA_APP]
        return cls(
            settings=data[SETTINGS],
            clock=data[CLOCK],
            registry=data[REGISTRY],
            loads=data[LOADS],
            store=data[STORE],
            control=data[CONTROL],
            traffic=data[TRAFFIC],
            eval_traffic=data[EVAL_TRAFFIC],
        )


# The version alphabet (proxy/core/models.py), checked by the validators below, documented.
_VALUE: Final[dict[str, Any]] = {"pattern": VALUE_PATTERN}


class VersionBody(Body):
    """A version bundle, as a runtime reports it on ``/version``: ``prompt`` is required."""

    # strict: a number where a version string belongs is a 400, not quietly coerced.
    model_config = ConfigDict(strict=True)

    prompt: str = Field(json_schema_extra=_VALUE)
    parser: str | None = Field(default=None, json_schema_extra=_VALUE)
    tools: str | None = Field(default=None, json_schema_extra=_VALUE)
    model: str | None = Field(default=None, json_schema_extra=_VALUE)

    @field_validator("prompt", "parser", "tools", "model")
    @classmethod
    def _alphabet(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_value("version", value)
        except InvalidVersion as exc:
            raise ValueError(str(exc)) from exc

    def bundle(self) -> VersionBundle:
        return VersionBundle(
            prompt=self.prompt, parser=self.parser, tools=self.tools, model=self.model
        )


class BundleView(BaseModel):
    """A version bundle and its key over the configured dimensions."""

    key: str = Field(description="canonical version key over versions.dimensions")
    prompt: str
    parser: str | None
    tools: str | None
    model: str | None

    @classmethod
    def of(cls, bundle: VersionBundle, registry: Registry) -> BundleView:
        return cls(
            key=registry.version_key(bundle),
            prompt=bundle.prompt,
            parser=bundle.parser,
            tools=bundle.tools,
            model=bundle.model,
        )


def version_ref(text: str, dimensions: tuple[Dimension, ...]) -> str:
    """A version reference from a path: a full key (made canonical) or a bare prompt.

    ``prompt=v47,parser=p2`` (any order; percent-encoded or not) becomes the canonical
    key; ``v47`` stays a bare prompt version, which names every key with that prompt.
    """
    if "=" not in text:
        return _checked("prompt", text)
    values: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in DIMENSIONS:
            raise BadRequest(
                f"version: {part!r} is not 'dimension=value' with a dimension among "
                f"{', '.join(DIMENSIONS)}",
                code="invalid_version",
                param="version",
            )
        if name in values:
            raise BadRequest(
                f"version: {name} given twice", code="invalid_version", param="version"
            )
        if name not in dimensions:
            raise BadRequest(
                f"version: {name} is not part of version keys here "
                f"(versions.dimensions = {', '.join(dimensions)})",
                code="invalid_version",
                param="version",
            )
        values[name] = _checked(name, value)
    if "prompt" not in values:
        raise BadRequest(
            "version: a version key must include prompt=", code="invalid_version", param="version"
        )
    return ",".join(f"{dim}={values[dim]}" for dim in DIMENSIONS if dim in values)


def version_ref_schema(dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """The JSON Schema of exactly what ``version_ref`` accepts under ``dimensions``.

    A bare prompt, or ``dimension=value`` pairs joined by ``,``: each dimension of
    ``dimensions`` at most once, in any order, ``prompt`` among them. The orders are
    spelled out as a tree of alternatives (JSON Schema has no "each at most once").
    """
    value = VALUE_PATTERN.removeprefix("^").removesuffix("$")

    def pairs(left: tuple[Dimension, ...], prompt_seen: bool) -> str:
        """``dim=value`` for each dimension left, each followed by what may follow it."""
        branches = []
        for dim in left:
            rest = tuple(d for d in left if d != dim)
            seen = prompt_seen or dim == "prompt"
            more = f"(?:,{pairs(rest, seen)})" + ("?" if seen else "") if rest else ""
            branches.append(f"{dim}={value}{more}")
        return f"(?:{'|'.join(branches)})"

    return {"type": "string", "pattern": f"^(?:{value}|{pairs(dimensions, False)})$"}


VERSION: Final = Param(
    "version",
    "a version key (prompt=v47,parser=p2: the configured dimensions, each at most once, in "
    "any order, prompt required) or a bare prompt version (v47) naming every key with it",
    lambda settings: version_ref_schema(settings.versions.dimensions),
)


def matches(ref: str, version_key: str) -> bool:
    """Whether ``version_key`` is what ``ref`` (full key or bare prompt) names."""
    return version_key == ref or ("=" not in ref and prompt_of(version_key) == ref)


def _checked(dimension: str, value: str) -> str:
    try:
        return check_value(dimension, value)
    except InvalidVersion as exc:
        raise BadRequest(
            f"version: {exc}", code="invalid_version", param="version"
        ) from exc
