"""The on_lost_pin policy, decided in pure code."""

from __future__ import annotations

import math

import pytest

from proxy.config.settings import SessionsConfig
from proxy.core.models import Pin
from proxy.dataplane.lost_pin import lost_pin_action
from proxy.store import Lookup

PIN = Pin("prompt=v1", "b1", "r1", 1.0)


def test_a_found_pin_or_a_first_turn_is_never_a_lost_pin() -> None:
    config = SessionsConfig()
    assert lost_pin_action(config, Lookup(PIN, lost_data_s_ago=0.0), True) == "new"
    assert lost_pin_action(config, Lookup(None, lost_data_s_ago=0.0), False) == "new"


def test_the_default_refuses_while_the_store_recently_lost_data_and_marks_after() -> None:
    config = SessionsConfig()
    assert (config.on_lost_pin, config.lost_pin_refuse_s) == ("refuse", 30.0)
    assert lost_pin_action(config, Lookup(None, lost_data_s_ago=1.0), True) == "refuse"
    assert lost_pin_action(config, Lookup(None, lost_data_s_ago=31.0), True) == "mark"
    # The pin expired after pin_ttl_s idle: nothing will bring it back.
    assert lost_pin_action(config, Lookup(None), True) == "mark"


def test_refuse_without_a_window_always_refuses() -> None:
    config = SessionsConfig(lost_pin_refuse_s=None)
    assert lost_pin_action(config, Lookup(None, lost_data_s_ago=math.inf), True) == "refuse"


def test_mark_never_refuses() -> None:
    config = SessionsConfig(on_lost_pin="mark")
    assert lost_pin_action(config, Lookup(None, lost_data_s_ago=0.0), True) == "mark"


def test_the_policy_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="on_lost_pin"):
        SessionsConfig(on_lost_pin="guess")
    with pytest.raises(ValueError, match="lost_pin_refuse_s"):
        SessionsConfig(lost_pin_refuse_s=0)
