"""Which serving version key an operator's repin names (pure, over a fleet snapshot)."""

from __future__ import annotations

import pytest

from proxy.admin.sessions import RepinBody, resolve_version
from proxy.core.errors import Conflict
from proxy.core.models import Backend, BackendState, Snapshot, VersionBundle


def _state(bid: str, prompt: str, parser: str | None = None, *, healthy: bool = True,
           draining: bool = False) -> BackendState:
    bundle = VersionBundle(prompt=prompt, parser=parser)
    return BackendState(Backend(bid, "r", f"http://{bid}"), bundle, bundle.key(),
                        healthy=healthy, draining=draining)


SNAPSHOT = Snapshot(backends=(
    _state("a", "v1"),
    _state("b", "v2", "x"),
    _state("c", "v2", "y"),
    _state("d", "v3", healthy=False),
    _state("e", "v4", draining=True),
))


def test_a_full_key_or_a_prompt_naming_one_key_resolves() -> None:
    assert resolve_version(SNAPSHOT, "prompt=v1") == "prompt=v1"
    assert resolve_version(SNAPSHOT, "v1") == "prompt=v1"
    assert resolve_version(SNAPSHOT, "prompt=v2,parser=y") == "prompt=v2,parser=y"
    # Draining backends still serve pinned sessions, so their version may be named.
    assert resolve_version(SNAPSHOT, "v4") == "prompt=v4"


@pytest.mark.parametrize(("wanted", "code"), [
    ("v2", "ambiguous_version"),
    ("v3", "version_not_serving"),  # only an unhealthy backend has it
    ("v9", "version_not_serving"),
    ("prompt=v2", "version_not_serving"),  # a key is matched exactly
])
def test_anything_else_is_a_conflict_naming_the_problem(wanted: str, code: str) -> None:
    with pytest.raises(Conflict) as info:
        resolve_version(SNAPSHOT, wanted)
    assert info.value.code == code
    assert info.value.param == "version"
    assert wanted in info.value.message


@pytest.mark.parametrize("data", [
    {}, {"version": "v1", "fresh": True}, {"fresh": False}, {"fresh": "yes"}, {"fresh": 1},
    {"version": 5}, {"version": ""}, {"version": "v1", "other": 1},
])
def test_repin_body_needs_exactly_one_well_typed_choice(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        RepinBody.model_validate(data)


def test_repin_body_schema_says_one_of() -> None:
    assert RepinBody(version="v1").version == "v1"
    assert RepinBody(fresh=True).fresh is True
    schema = RepinBody.model_json_schema()
    assert schema["oneOf"] == [{"required": ["version"]}, {"required": ["fresh"]}]
    assert schema["additionalProperties"] is False
