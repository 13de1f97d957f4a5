"""What the fleet admin routes share: version bodies and views, version references,
and the data-plane objects they read and steer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from proxy.admin.api import Body, Param
from proxy.admin.app import SERVICES
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
    """The services an admin handler works with."""

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
        services = request.app[SERVICES]
        return cls(
            settings=services.settings,
            clock=services.clock,
            registry=services.registry,
            loads=services.loads,
            store=services.store,
            control=services.control,
            traffic=services.traffic,
            eval_traffic=services.eval_traffic,
        )


# The version alphabet (proxy/core/models.py), checked by the validators below, documented.
_VALUE: Final[dict[str, Any]] = {"pattern": VALUE_PATTERN}


class _VersionBody(Body):
    """A version bundle, as a runtime reports it on ``/version``: ``prompt`` is required."""

    # strict: a number where a version string belongs is a 400, not quietly coerced.
    model_config = ConfigDict(strict=True)

    prompt: str = Field(json_schema_extra=_VALUE)

    @field_validator("*")
    @classmethod
    def _alphabet(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_value("version", value)
        except InvalidVersion as exc:
            raise ValueError(str(exc)) from exc

    def bundle(self) -> VersionBundle:
        return VersionBundle(**{dim: getattr(self, dim) for dim in DIMENSIONS})


# The other dimensions come from proxy/core/models.py, so adding one changes one file.
VersionBody = create_model(
    "VersionBody",
    __base__=_VersionBody,
    __doc__=_VersionBody.__doc__,
    **{
        dim: (str | None, Field(default=None, json_schema_extra=_VALUE))
        for dim in DIMENSIONS if dim != "prompt"
    },  # type: ignore[call-overload]
)


class _BundleView(BaseModel):
    """A version bundle and its key over the configured dimensions."""

    key: str = Field(description="canonical version key over versions.dimensions")
    prompt: str

    @classmethod
    def of(cls, bundle: VersionBundle, registry: Registry) -> _BundleView:
        return cls(key=registry.version_key(bundle), **{
            dim: getattr(bundle, dim) for dim in DIMENSIONS
        })


BundleView = create_model(
    "BundleView",
    __base__=_BundleView,
    __doc__=_BundleView.__doc__,
    **{dim: (str | None, ...) for dim in DIMENSIONS if dim != "prompt"},  # type: ignore[call-overload]
)


def version_ref(text: str, dimensions: tuple[Dimension, ...], *, param: str = "version") -> str:
    """A version reference from a path or a body: a full key (made canonical) or a bare
    prompt; a 400 ``invalid_version`` naming ``param`` otherwise.

    ``prompt=v47,parser=p2`` (any order; percent-encoded or not) becomes the canonical
    key; ``v47`` stays a bare prompt version, which names every key with that prompt.
    A dimension outside ``dimensions`` (``versions.dimensions``) is refused: no version
    key here carries it, so it would name nothing.
    """
    if "=" not in text:
        return _checked("prompt", text, param)
    values: dict[str, str] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name not in DIMENSIONS:
            raise BadRequest(
                f"{param}: {part!r} is not 'dimension=value' with a dimension among "
                f"{', '.join(DIMENSIONS)}",
                code="invalid_version",
                param=param,
            )
        if name in values:
            raise BadRequest(
                f"{param}: {name} given twice", code="invalid_version", param=param
            )
        if name not in dimensions:
            raise BadRequest(
                f"{param}: {name} is not part of version keys here "
                f"(versions.dimensions = {', '.join(dimensions)})",
                code="invalid_version",
                param=param,
            )
        values[name] = _checked(name, value, param)
    if "prompt" not in values:
        raise BadRequest(
            f"{param}: a version key must include prompt=", code="invalid_version", param=param
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


def _checked(dimension: str, value: str, param: str) -> str:
    try:
        return check_value(dimension, value)
    except InvalidVersion as exc:
        raise BadRequest(f"{param}: {exc}", code="invalid_version", param=param) from exc
