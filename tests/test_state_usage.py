"""KeyedState's refusals: bad input and a missing app or store, each before any IO, with a
message that says what to do (and never the id)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from flask import Flask

from pyloto_corp.state import KeyedState

PHONE = "5511987654321"


@pytest.mark.parametrize(
    ("namespace", "lifetime", "message"),
    [
        ("", timedelta(hours=1), "namespace must be a non-empty str"),
        (7, timedelta(hours=1), "namespace must be a non-empty str"),
        ("a\nb", timedelta(hours=1), "printable"),
        ("x" * 101, timedelta(hours=1), "at most 100"),
        ("c", 7200, "lifetime must be a datetime.timedelta"),
        ("c", timedelta(0), "lifetime must be a datetime.timedelta of more than 0"),
        ("c", timedelta(days=401), "at most 400 days"),
    ],
)
def test_bad_namespace_or_lifetime(namespace: Any, lifetime: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KeyedState(namespace, lifetime=lifetime)


@pytest.mark.parametrize("bad_id", ["", 5511987654321, None, b"55", "x" * 1025])
def test_bad_id_is_refused_without_repeating_it(app: Flask, bad_id: Any) -> None:
    state = KeyedState("conversations")
    with app.app_context():
        for call in (state.get, state.exists, state.delete):
            with pytest.raises(ValueError, match="id must be a non-empty str") as refused:
                call(bad_id)
            assert "5511987654321" not in str(refused.value)
        with pytest.raises(ValueError, match="id must be"):
            state.open(bad_id).__enter__()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lease": timedelta(0)}, "lease must be"),
        ({"lease": 60}, "lease must be"),
        ({"wait": timedelta(seconds=-1)}, "wait must be a datetime.timedelta of 0 or more"),
        ({"lease": timedelta(days=500)}, "at most 400 days"),
    ],
)
def test_bad_lease_or_wait(app: Flask, options: dict[str, Any], message: str) -> None:
    with app.app_context(), pytest.raises(ValueError, match=message):
        KeyedState("conversations").turn(PHONE, **options).__enter__()


def test_outside_an_app_context_says_where_to_use_it() -> None:
    with pytest.raises(RuntimeError, match=r"app\.app_context"):
        KeyedState("conversations").get(PHONE)


def test_an_app_without_session_store_says_to_register_it() -> None:
    with Flask(__name__).app_context(), pytest.raises(RuntimeError, match="SessionStore"):
        KeyedState("conversations").get(PHONE)


def test_repr_shows_no_value_and_no_id(app: Flask) -> None:
    state = KeyedState("conversations", lifetime=timedelta(hours=2))
    assert repr(state) == "KeyedState('conversations', lifetime=datetime.timedelta(seconds=7200))"
    with app.app_context(), state.open(PHONE) as entry:
        entry["cpf"] = "123.456.789-00"
        assert "123.456" not in repr(entry)
        assert PHONE not in repr(entry)
        assert "cpf" in repr(entry)
