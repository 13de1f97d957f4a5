"""Version reports, fuzzed: a ``/version`` document, a stamp value, a version key.

Whatever a backend sends, the proxy either gets a bundle whose every value is in the
safe alphabet (values end up in header values, Redis keys and metric labels) or an
``InvalidVersion``; nothing else may escape the parser.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.core.models import DIMENSIONS, InvalidVersion, VersionBundle, check_value, prompt_of
from proxy.fleet.discovery import parse_version_report

SAFE = re.compile(r"[A-Za-z0-9._:/@+~-]{1,128}")
VALUES = st.one_of(
    st.text(max_size=140),
    st.text(alphabet="abcXYZ019._:/@+~-", min_size=1, max_size=130),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=140))
@example(value="v1\n")  # "$" matches before a final newline; fullmatch must not
@example(value="a" * 129)
@example(value="prompt=v1,parser=p")  # the key's own separators
def test_check_value_accepts_exactly_the_safe_alphabet(value: str) -> None:
    if SAFE.fullmatch(value) is None:
        with pytest.raises(InvalidVersion) as info:
            check_value("prompt", value)
        assert repr(value[:40]) in str(info.value)  # shown escaped: no control bytes in logs
        return
    assert check_value("prompt", value) == value


@settings(max_examples=300, deadline=None)
@given(document=st.dictionaries(st.sampled_from([*DIMENSIONS, "extra"]), VALUES, max_size=5))
@example(document={"prompt": -5})
@example(document={"prompt": True})
@example(document={"prompt": 2**70})  # orjson reads it as a float: not a version
def test_a_version_document_gives_a_safe_bundle_or_invalid_version(
    document: dict[str, object],
) -> None:
    raw = json.dumps(document).encode()  # NaN and big integers too, as a backend might
    try:
        bundle = parse_version_report(raw)
    except InvalidVersion:
        return
    assert isinstance(bundle, VersionBundle)
    for dim, value in bundle.as_dict().items():
        assert SAFE.fullmatch(value), (dim, value)
        assert value == str(document[dim])
    # The key is canonical and its prompt reads back.
    assert prompt_of(bundle.key()) == bundle.prompt
    assert bundle.key() == ",".join(f"{d}={v}" for d, v in bundle.as_dict().items())


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
@example(raw=b"[]")
@example(raw=b"null")
@example(raw=b'{"prompt": "v1"} trailing')
@example(raw=b'\xef\xbb\xbf{"prompt": "v1"}')
def test_any_bytes_give_a_bundle_or_invalid_version(raw: bytes) -> None:
    with contextlib.suppress(InvalidVersion):
        assert isinstance(parse_version_report(raw), VersionBundle)
