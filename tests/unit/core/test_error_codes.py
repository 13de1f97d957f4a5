"""Every error pinproxy answers carries a stable, non-null ``code`` (and 503s a Retry-After)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from typing import Any

import orjson
import pytest

import proxy
from proxy.core.errors import ProxyError, StoreUnavailable

_SAMPLE_ARGS: dict[Any, Any] = {
    str: "x", "str": "x", int: 3, "int": 3, bool: False, "bool": False,
    "Sequence[str]": ("listen.port",),
}


def _all_error_classes() -> list[type[ProxyError]]:
    for module in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    found: list[type[ProxyError]] = []
    todo: list[type[ProxyError]] = [ProxyError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(set(found), key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _instance(cls: type[ProxyError]) -> ProxyError:
    """``cls`` built from its own signature, with a sample value for each required argument."""
    args: dict[str, Any] = {}
    for name, param in inspect.signature(cls).parameters.items():
        if param.default is not inspect.Parameter.empty or param.kind in (
            param.VAR_POSITIONAL,
            param.VAR_KEYWORD,
        ):
            continue
        annotation = param.annotation
        assert annotation in _SAMPLE_ARGS, f"{cls.__name__}({name}: {annotation}): add a sample"
        args[name] = _SAMPLE_ARGS[annotation]
    return cls(**args)


ERRORS = _all_error_classes()


def test_the_walk_finds_the_errors_of_every_layer() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {"VersionUnavailable", "StoreUnavailable", "UpstreamDropped", "BadRequest"} <= names
    assert {"ControlUnavailable", "BackendUrlRefused", "MethodNeverProxied"} <= names


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_body_has_a_stable_non_null_code(cls: type[ProxyError]) -> None:
    error = _instance(cls)
    body = orjson.loads(error.body())["error"]
    assert set(body) >= {"message", "type", "param", "code"}
    assert isinstance(body["code"], str)
    assert re.fullmatch(r"[a-z][a-z0-9_]*", body["code"]), body["code"]
    assert body["code"] == _instance(cls).code  # stable: the same for the same error


@pytest.mark.parametrize(
    "cls",
    [
        c
        for c in ERRORS
        if c.status == 503
        and "retry_after_s" in inspect.signature(c).parameters
        and inspect.signature(c).parameters["retry_after_s"].default is inspect.Parameter.empty
    ],
    ids=lambda c: c.__name__,
)
def test_every_retry_later_503_carries_retry_after(cls: type[ProxyError]) -> None:
    assert _instance(cls).headers["Retry-After"] == "3"


def test_pin_store_unavailable_carries_retry_after_and_its_code() -> None:
    error = StoreUnavailable("redis is down")
    assert error.status == 503
    assert error.headers["Retry-After"].isdigit()
    assert orjson.loads(error.body())["error"]["code"] == "pin_store_unavailable"


def test_a_narrow_class_without_a_code_gets_its_status_code() -> None:
    # A status other than BadRequest's is a class of its own (no status argument).
    from proxy.core.errors import BadRequest, PayloadTooLarge

    assert (PayloadTooLarge("too big").status, PayloadTooLarge("too big").code) == (
        413, "request_too_large")
    assert BadRequest("bad").code == "invalid_request"
    assert BadRequest("bad", code="invalid_session_id").code == "invalid_session_id"
