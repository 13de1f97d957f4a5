"""The admin OpenAPI document states exactly the rules the handlers enforce (pure).

Each parameter or body schema is compared with the code that checks it: what the
schema accepts the code accepts, and what it refuses the code refuses with a 400.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from proxy.admin.fleet_common import VersionBody, version_ref, version_ref_schema
from proxy.admin.openapi import openapi, path_params
from proxy.admin.routes import all_routes
from proxy.admin.sessions import RepinBody
from proxy.config.settings import Settings, settings_from_mapping
from proxy.core.errors import BadRequest

TOKEN = "unit-test-token-0123456789abcdefgh"
ALL_DIMENSIONS = ("prompt", "parser", "tools", "model")


def _settings(**sections: Any) -> Settings:
    return settings_from_mapping({"backends": [], **sections})


def _document(**sections: Any) -> dict[str, Any]:
    return openapi(all_routes(), title="t", version="1", settings=_settings(**sections))


def _parameter(document: dict[str, Any], path: str, method: str, name: str) -> dict[str, Any]:
    for param in document["paths"][path][method]["parameters"]:
        if param["name"] == name:
            schema: dict[str, Any] = param["schema"]
            return schema
    raise AssertionError(f"{method} {path} has no parameter {name}")


def test_every_path_and_query_parameter_of_every_route_has_a_schema() -> None:
    document = _document(admin={"token": TOKEN})
    for route in all_routes():
        assert [p.name for p in route.path_params] == path_params(route.path), route.path
    for path, ops in document["paths"].items():
        for method, op in ops.items():
            assert all(p["schema"] for p in op["parameters"]), (method, path)
            placeholders = re.findall(r"\{(\w+)\}", path)
            assert [p["name"] for p in op["parameters"] if p["in"] == "path"] == placeholders


def test_every_error_answer_is_the_openai_shape_with_a_non_null_code() -> None:
    document = _document(admin={"token": TOKEN})
    error = document["components"]["schemas"]["Error"]["properties"]["error"]
    assert error["required"] == ["message", "type", "param", "code"]
    assert error["properties"]["code"] == {**error["properties"]["code"], "type": "string"}
    public = []
    for path, ops in document["paths"].items():
        for op in ops.values():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}
            if op.get("security") == []:
                assert "401" not in op["responses"]
                public.append(path)
            else:
                assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    assert public == ["/admin/ui"]  # the page holds no data; everything else wants the token


def test_a_public_path_is_documented_without_the_token() -> None:
    document = _document(admin={"token": TOKEN, "public_paths": ["/metrics"]})
    metrics = document["paths"]["/metrics"]["get"]
    assert metrics["security"] == []
    assert "401" not in metrics["responses"]
    assert "security" not in document["paths"]["/admin/versions"]["get"]
    assert document["security"] == [{"bearer": []}]
    assert "security" not in _document()  # no token, no security scheme


def test_the_session_id_schema_follows_the_configured_limit() -> None:
    schema = _parameter(_document(sessions={"max_id_bytes": 16}),
                        "/admin/sessions/{session_id}", "get", "session_id")
    assert schema["maxLength"] == 16
    assert re.fullmatch(schema["pattern"], "team/alice ünï")
    for control in ("a\x00", "\x1f", "x\x7fy", "\x85", "\x9f"):
        assert not re.fullmatch(schema["pattern"], control)


VALUE = st.from_regex(r"[A-Za-z0-9._:/@+~-]{1,4}", fullmatch=True)
REF = st.one_of(
    VALUE,
    st.lists(st.tuples(st.sampled_from([*ALL_DIMENSIONS, "colour"]), VALUE), max_size=5)
    .map(lambda pairs: ",".join(f"{d}={v}" for d, v in pairs)),
    st.text(alphabet="prompt=,v1 %", max_size=12),
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(ref=REF, dimensions=st.sampled_from([ALL_DIMENSIONS, ("prompt",), ("model", "prompt")]))
@example(ref="model=m,prompt=v1", dimensions=("prompt", "model"))
@example(ref="prompt=v1,prompt=v2", dimensions=ALL_DIMENSIONS)
@example(ref="parser=p", dimensions=ALL_DIMENSIONS)
def test_the_version_schema_accepts_exactly_what_version_ref_accepts(
    ref: str, dimensions: tuple[Any, ...]
) -> None:
    documented = re.fullmatch(version_ref_schema(dimensions)["pattern"], ref) is not None
    refused: str | None = None
    try:
        version_ref(ref, dimensions)
    except BadRequest as exc:
        refused = exc.message
    assert documented == (refused is None), (ref, refused)


def _accepted(model: type[BaseModel], body: Any) -> bool:
    try:
        model.model_validate(body)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("model", "body"), [
    *((RepinBody, body) for body in (
        {"version": "v1"}, {"fresh": True}, {}, {"fresh": None}, {"version": None},
        {"version": None, "fresh": True}, {"version": "v1", "fresh": True}, {"fresh": False},
        {"version": ""}, {"version": 5}, {"fresh": "yes"}, {"version": "v1", "colour": "red"},
    )),
    *((VersionBody, body) for body in (
        {"prompt": "v1"}, {"prompt": "v1", "parser": None}, {"prompt": "v 1"}, {"prompt": ""},
        {"prompt": "x" * 129}, {"prompt": None}, {"parser": "p"}, {"prompt": "v1", "model": "é"},
    )),
])
def test_a_body_schema_accepts_exactly_what_its_model_accepts(
    model: type[BaseModel], body: Any
) -> None:
    validator = jsonschema.Draft202012Validator(model.model_json_schema())
    assert validator.is_valid(body) == _accepted(model, body), body
