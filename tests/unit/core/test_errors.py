"""An error's HTTP status is its class's: no argument turns a 400 into a 404."""

from __future__ import annotations

import inspect

import pytest

from proxy.core import errors
from proxy.core.errors import (
    BadRequest,
    ExpectationFailed,
    HeadersTooLarge,
    InternalError,
    MethodNotAllowed,
    PathNotServed,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    refusal_for_status,
)


def _all_subclasses(cls: type[ProxyError]) -> list[type[ProxyError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def test_no_error_takes_a_status_argument() -> None:
    classes: list[type[ProxyError]] = [ProxyError, *_all_subclasses(ProxyError)]
    for cls in classes:
        assert "status" not in inspect.signature(cls).parameters, cls


@pytest.mark.parametrize(("status", "cls"), [
    (400, BadRequest), (404, PathNotServed), (405, MethodNotAllowed), (408, RequestTimeout),
    (413, PayloadTooLarge), (417, ExpectationFailed), (431, HeadersTooLarge),
])
def test_a_library_refusal_is_the_narrow_class_of_its_status(
    status: int, cls: type[BadRequest]
) -> None:
    error = refusal_for_status(status, "no", code="c", headers={"Allow": "GET"})
    assert type(error) is cls
    assert (error.status, error.error_type, error.code) == (
        status, "invalid_request_error", "c")
    assert error.headers == {"Allow": "GET"}


def test_an_unclassed_status_is_a_400_or_a_500_keeping_its_code() -> None:
    odd = refusal_for_status(418, "teapot", code="418")
    assert (type(odd), odd.status, odd.code) == (BadRequest, 400, "418")
    server = refusal_for_status(503, "busy", code="503")
    assert (server.status, server.error_type, server.code) == (500, "internal_error", "503")


def test_an_internal_error_says_nothing_of_its_cause() -> None:
    error = InternalError("the admin API")
    assert (error.status, error.error_type, error.code) == (500, "internal_error",
                                                            "internal_error")
    assert error.message == "internal error in the admin API"
    assert errors.InternalError().message == "internal error in pinproxy"
