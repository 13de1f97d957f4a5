"""Version bundles and their canonical key, prompt extraction, and snapshot indexes."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from proxy.core.models import (
    DIMENSIONS,
    Backend,
    BackendState,
    InvalidVersion,
    Snapshot,
    VersionBundle,
    check_value,
    prompt_of,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/@+~-"
VALUE = st.text(alphabet=ALPHABET, min_size=1, max_size=128)
ALLOWED = re.compile(r"[A-Za-z0-9._:/@+~-]{1,128}")


@st.composite
def reports(draw: st.DrawFn) -> dict[str, str]:
    """A version report: prompt plus any subset of the other dimensions, in any order."""
    others = draw(st.lists(st.sampled_from(DIMENSIONS[1:]), unique=True))
    dims = draw(st.permutations(["prompt", *others]))
    return {dim: draw(VALUE) for dim in dims}


def canonical(report: dict[str, str], dims: tuple[str, ...] = DIMENSIONS) -> str:
    """The key as the spec states it: configured, present dimensions in DIMENSIONS order."""
    return ",".join(f"{d}={report[d]}" for d in DIMENSIONS if d in dims and d in report)


# -- canonical key ---------------------------------------------------------------


@given(report=reports(), order=st.permutations(range(len(DIMENSIONS))))
@example(report={"model": "m1", "tools": "t1", "parser": "p1", "prompt": "v1"}, order=[0, 1, 2, 3])
@example(report={"prompt": "v1", "model": "m1"}, order=[3, 2, 1, 0])
def test_key_is_independent_of_report_order(report: dict[str, str], order: list[int]) -> None:
    shuffled = dict(sorted(report.items(), key=lambda kv: order[DIMENSIONS.index(kv[0])]))
    a = VersionBundle.from_mapping(report)
    b = VersionBundle.from_mapping(shuffled)
    assert a == b
    assert a.key() == b.key() == canonical(report)


@given(
    report=reports(),
    dims=st.lists(st.sampled_from(DIMENSIONS[1:]), unique=True).map(lambda rest: ("prompt", *rest)),
)
@example(report={"prompt": "v1", "model": "m1"}, dims=("prompt", "parser"))
@example(report={"prompt": "v1", "parser": "p1"}, dims=("prompt",))
def test_key_includes_only_configured_dimensions_that_are_present(
    report: dict[str, str], dims: tuple[str, ...]
) -> None:
    bundle = VersionBundle.from_mapping(report)
    assert bundle.key(dims) == canonical(report, dims)  # type: ignore[arg-type]


def test_key_examples() -> None:
    bundle = VersionBundle(prompt="v47", parser="p3", model="llama-3.1")
    assert bundle.key() == "prompt=v47,parser=p3,model=llama-3.1"
    assert bundle.key(("model", "prompt")) == "prompt=v47,model=llama-3.1"
    assert bundle.key(("prompt", "tools")) == "prompt=v47"
    assert VersionBundle(prompt="v1").key() == "prompt=v1"


def test_configured_order_does_not_change_key() -> None:
    bundle = VersionBundle(prompt="v1", parser="p", tools="t", model="m")
    assert bundle.key(("model", "tools", "parser", "prompt")) == bundle.key(DIMENSIONS)


# -- from_mapping ------------------------------------------------------------------


@pytest.mark.parametrize("report", [{}, {"parser": "p1"}, {"prompt": None, "model": "m"}])
def test_prompt_is_required(report: dict[str, object]) -> None:
    with pytest.raises(InvalidVersion, match="prompt"):
        VersionBundle.from_mapping(report)


def test_ints_are_accepted_as_strings() -> None:
    bundle = VersionBundle.from_mapping({"prompt": 47, "parser": 3, "tools": "t1"})
    assert bundle == VersionBundle(prompt="47", parser="3", tools="t1")
    assert bundle.key() == "prompt=47,parser=3,tools=t1"


def test_unknown_keys_are_ignored() -> None:
    bundle = VersionBundle.from_mapping(
        {"prompt": "v1", "build": {"sha": "abc"}, "uptime": 12.5, "Model": "x"}
    )
    assert bundle == VersionBundle(prompt="v1")


def test_null_dimensions_are_absent() -> None:
    bundle = VersionBundle.from_mapping({"prompt": "v1", "parser": None})
    assert bundle.parser is None
    assert bundle.key() == "prompt=v1"


@pytest.mark.parametrize("raw", [1.5, ["v1"], {"v": 1}, b"v1"])
def test_non_string_values_are_rejected(raw: object) -> None:
    with pytest.raises(InvalidVersion, match="parser version must be a string"):
        VersionBundle.from_mapping({"prompt": "v1", "parser": raw})


def test_booleans_are_rejected() -> None:
    with pytest.raises(InvalidVersion):
        VersionBundle.from_mapping({"prompt": True})


# -- value validation ----------------------------------------------------------------


@given(
    value=st.text(max_size=140).filter(lambda v: not ALLOWED.fullmatch(v)),
    dim=st.sampled_from(DIMENSIONS),
)
@example(value="", dim="prompt")
@example(value="v1,parser=p2", dim="prompt")
@example(value="a,b", dim="parser")
@example(value="a=b", dim="tools")
@example(value="v 1", dim="model")
@example(value=" v1", dim="prompt")
@example(value="v1\n", dim="prompt")
@example(value="v1\r\nX-Evil: 1", dim="prompt")
@example(value="v\x001", dim="prompt")
@example(value="v\t1", dim="parser")
@example(value="v\x7f", dim="parser")
@example(value="v\u00e9", dim="prompt")
@example(value="a" * 129, dim="prompt")
@example(value="a" * 129, dim="model")
def test_bad_values_are_rejected(value: str, dim: str) -> None:
    with pytest.raises(InvalidVersion):
        check_value(dim, value)
    with pytest.raises(InvalidVersion):
        VersionBundle.from_mapping({"prompt": "v1", dim: value})
    with pytest.raises(InvalidVersion):
        VersionBundle(**{"prompt": "v1", dim: value})


@given(value=VALUE)
@example(value="a" * 128)
@example(value="a")
@example(value="v1.2.3+build:7/x@y~z_w-q")
def test_good_values_are_accepted(value: str) -> None:
    assert check_value("prompt", value) == value
    assert VersionBundle(prompt=value, model=value).key() == f"prompt={value},model={value}"


def test_rejection_message_names_dimension() -> None:
    with pytest.raises(InvalidVersion, match=r"^tools version 'a,b' must be 1-128 characters"):
        VersionBundle(prompt="v1", tools="a,b")


def test_bundle_is_frozen() -> None:
    bundle = VersionBundle(prompt="v1")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.prompt = "v2"  # type: ignore[misc]


# -- overlay ---------------------------------------------------------------------------


def test_overlay_replaces_only_stamped_dimensions() -> None:
    known = VersionBundle(prompt="v1", parser="p1", tools="t1", model="m1")
    assert known.overlay({"prompt": "v2"}) == VersionBundle(
        prompt="v2", parser="p1", tools="t1", model="m1"
    )
    assert known.overlay({"model": "m9", "parser": "p9"}) == VersionBundle(
        prompt="v1", parser="p9", tools="t1", model="m9"
    )
    assert known.overlay({}) == known
    assert known == VersionBundle(prompt="v1", parser="p1", tools="t1", model="m1")


def test_overlay_adds_a_dimension_that_was_unknown() -> None:
    assert VersionBundle(prompt="v1").overlay({"tools": "t2"}) == VersionBundle(
        prompt="v1", tools="t2"
    )


@given(
    base=reports(),
    stamp=st.dictionaries(st.sampled_from(DIMENSIONS), VALUE),
)
def test_overlay_matches_dict_update(base: dict[str, str], stamp: dict[str, str]) -> None:
    result = VersionBundle.from_mapping(base).overlay(stamp)  # type: ignore[arg-type]
    assert result.as_dict() == {d: v for d in DIMENSIONS if (v := {**base, **stamp}.get(d))}


def test_overlay_validates_stamped_values() -> None:
    with pytest.raises(InvalidVersion):
        VersionBundle(prompt="v1").overlay({"prompt": "v,2"})


def test_as_dict_lists_present_dimensions_in_order() -> None:
    bundle = VersionBundle(prompt="v1", model="m1")
    assert list(bundle.as_dict().items()) == [("prompt", "v1"), ("model", "m1")]


# -- prompt_of ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "prompt"),
    [
        ("prompt=v47", "v47"),
        ("prompt=v47,parser=p3,tools=t1,model=m", "v47"),
        ("parser=p3,prompt=v47", "v47"),
        ("prompt=a:b/c@d", "a:b/c@d"),
        ("v47", "v47"),  # a bare prompt version passes through
    ],
)
def test_prompt_of(key: str, prompt: str) -> None:
    assert prompt_of(key) == prompt


@given(report=reports())
def test_prompt_of_round_trips_the_key(report: dict[str, str]) -> None:
    assert prompt_of(VersionBundle.from_mapping(report).key()) == report["prompt"]


# -- snapshot ------------------------------------------------------------------------------


def _state(
    bid: str, key: str | None, *, healthy: bool = True, draining: bool = False
) -> BackendState:
    version = VersionBundle(prompt=prompt_of(key)) if key else None
    return BackendState(
        backend=Backend(bid, f"r-{bid}", f"http://{bid}:8000"),
        version=version,
        version_key=key,
        healthy=healthy,
        draining=draining,
    )


def test_snapshot_indexes() -> None:
    a = _state("a", "prompt=v1")
    b = _state("b", "prompt=v2")
    c = _state("c", "prompt=v1", healthy=False)
    d = _state("d", None)
    snap = Snapshot(backends=(a, b, c, d), generation=3, started_at=100.0)
    assert snap.by_id == {"a": a, "b": b, "c": c, "d": d}
    assert snap.by_key == {"prompt=v1": (a, c), "prompt=v2": (b,)}
    assert snap.serving_keys() == frozenset({"prompt=v1", "prompt=v2"})


def test_serving_keys_needs_a_healthy_backend_with_a_version() -> None:
    snap = Snapshot(
        backends=(
            _state("a", "prompt=v1", healthy=False),
            _state("b", None, healthy=True),
            _state("c", "prompt=v3"),
        )
    )
    assert snap.serving_keys() == frozenset({"prompt=v3"})
    assert not snap.by_id["b"].routable
    assert not snap.by_id["a"].routable
    assert snap.by_id["c"].routable


def test_empty_snapshot() -> None:
    snap = Snapshot()
    assert snap.by_id == {}
    assert snap.by_key == {}
    assert snap.serving_keys() == frozenset()
    assert snap.generation == 0


def test_last_seen_defaults_to_started_at() -> None:
    snap = Snapshot(started_at=500.0, version_last_seen={"prompt=v1": 750.0})
    assert snap.last_seen("prompt=v1") == 750.0
    assert snap.last_seen("prompt=v2") == 500.0


def test_backend_state_proxies_backend_fields() -> None:
    state = _state("a", "prompt=v1")
    assert (state.id, state.region) == ("a", "r-a")


def test_snapshot_is_frozen() -> None:
    snap = Snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.generation = 9  # type: ignore[misc]


def test_the_version_dimensions_are_defined_once_and_everything_follows_them() -> None:
    # Adding a dimension means adding it to Dimension and VersionBundle (proxy/core/models.py);
    # the places below derive from DIMENSIONS, so they cannot fall out of step.
    from dataclasses import fields

    from proxy.admin.fleet_common import BundleView, VersionBody
    from proxy.config.settings import Settings
    from proxy.core.models import DIMENSIONS, STAMP_HEADERS, VersionBundle

    assert DIMENSIONS[0] == "prompt"
    assert tuple(f.name for f in fields(VersionBundle)) == DIMENSIONS
    assert tuple(STAMP_HEADERS) == DIMENSIONS
    assert STAMP_HEADERS["prompt"] == "X-Prompt-Version"
    assert Settings().versions.dimensions == DIMENSIONS
    assert tuple(VersionBody.model_fields) == DIMENSIONS
    assert tuple(BundleView.model_fields) == ("key", *DIMENSIONS)
    bundle = VersionBundle(prompt="v47", parser="p2")
    assert VersionBody.model_validate(bundle.as_dict()).bundle() == bundle
