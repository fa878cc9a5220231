"""Values Flask's own cookie session stores, beyond the exact types: what Flask gives back for
each (measured with Flask 3.1's TaggedJSONSerializer) and what ours gives back.

The rule both test modules check: where Flask's cookie session returns a value, ours returns the
same, or the original exactly (as its base type: no class name is stored); what Flask refuses
ours may refuse too.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, fields, is_dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum, Flag, IntEnum, IntFlag, StrEnum
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from markupsafe import Markup
from oauthlib.oauth2.rfc6749.tokens import OAuth2Token

#: Stands for "refused": a 500 from Flask, UnstorableValue (a 500 session_unstorable) from ours.
REFUSED: Any = type("Refused", (), {"__repr__": lambda self: "REFUSED"})()

HTTP_DATE = "Tue, 02 Jan 2024 00:00:00 GMT"  # what Flask makes of date(2024, 1, 2)
IST = timezone(timedelta(hours=5, minutes=30))


class Size(StrEnum):
    SMALL = "s"


class Level(IntEnum):
    HIGH = 3


class Perm(IntFlag):
    READ = 1
    WRITE = 2


class Mode(str, Enum):  # noqa: UP042 (the pre-3.11 spelling, still common)
    DARK = "dark"


class Ratio(float, Enum):
    HALF = 0.5


class Plain(Enum):
    ONE = 1


class Color(Flag):
    RED = 1


class Name(str):
    pass


class Items(list[Any]):
    pass


class Blob(bytes):
    pass


class Id(uuid.UUID):
    pass


class LocalDateTime(datetime):
    pass


class Day(date):
    pass


class Clock(time):
    pass


class Money(Decimal):
    pass


class Count(int):
    pass


class Share(float):
    pass


Point = namedtuple("Point", "x y")


class Pair(NamedTuple):
    left: Any
    right: Any


@dataclass
class LineItem:
    sku: str
    qty: int
    price: Decimal
    tags: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Cart:
    items: list[LineItem]
    updated: date


class Widget:
    """A custom object: neither session can keep it."""


class Case(NamedTuple):
    value: Any
    ours: Any  # what our session gives back (exact type at every level), or REFUSED
    flask: Any  # what Flask's cookie session gives back, or REFUSED


TOKEN = {"access_token": "gho_16C7e42F292c6912E7710c8", "token_type": "bearer", "scope": ["user"]}

CASES: dict[str, Case] = {
    # Exact types Flask loses or refuses.
    "Decimal": Case(Decimal("1.10"), Decimal("1.10"), "1.10"),
    "Decimal -0.00": Case(Decimal("-0.00"), Decimal("-0.00"), "-0.00"),
    "Decimal 1E+30": Case(Decimal("1E+30"), Decimal("1E+30"), "1E+30"),
    "Decimal NaN": Case(Decimal("NaN"), Decimal("NaN"), "NaN"),
    "date": Case(date(2024, 1, 2), date(2024, 1, 2), HTTP_DATE),
    "time": Case(time(12, 30, 5, 123456), time(12, 30, 5, 123456), REFUSED),
    "aware time": Case(time(23, 59, tzinfo=IST), time(23, 59, tzinfo=IST), REFUSED),
    # Enum members: their value, as Flask's JSON gives it.
    "StrEnum": Case(Size.SMALL, "s", "s"),
    "IntEnum": Case(Level.HIGH, 3, 3),
    "IntFlag": Case(Perm.READ | Perm.WRITE, 3, 3),
    "str mixin enum": Case(Mode.DARK, "dark", "dark"),
    "float mixin enum": Case(Ratio.HALF, 0.5, 0.5),
    # Subclasses: their base type.
    "OrderedDict": Case(
        OrderedDict([("b", 1), ("a", (2,))]), {"b": 1, "a": (2,)}, {"a": (2,), "b": 1}
    ),
    "defaultdict": Case(defaultdict(list, k=[1]), {"k": [1]}, {"k": [1]}),
    "OAuth2Token": Case(OAuth2Token(TOKEN), TOKEN, TOKEN),
    "list subclass": Case(Items([1, (2,)]), [1, (2,)], [1, (2,)]),
    "str subclass": Case(Name("ana"), "ana", "ana"),
    "int subclass": Case(Count(2**70), 2**70, 2**70),
    "float subclass": Case(Share(0.25), 0.25, 0.25),
    "bytes subclass": Case(Blob(b"\x00\xff"), b"\x00\xff", b"\x00\xff"),
    "namedtuple": Case(Point(1, "y"), (1, "y"), (1, "y")),
    "typing.NamedTuple": Case(Pair(Name("l"), Level.HIGH), ("l", 3), ("l", 3)),
    "UUID subclass": Case(Id(int=5), uuid.UUID(int=5), uuid.UUID(int=5)),
    "datetime subclass": Case(
        LocalDateTime(2024, 1, 2, 3, 4, 5, 6),
        datetime(2024, 1, 2, 3, 4, 5, 6),
        datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
    ),
    "date subclass": Case(Day(2024, 1, 2), date(2024, 1, 2), HTTP_DATE),
    "time subclass": Case(Clock(1, 2), time(1, 2), REFUSED),
    "Decimal subclass": Case(Money("3.30"), Decimal("3.30"), "3.30"),
    # Dataclass instances: a dict of their fields (Flask: dataclasses.asdict, then JSON).
    "dataclass": Case(
        Cart([LineItem("A-1", 2, Decimal("9.99"), ("gift",))], date(2024, 1, 2)),
        {
            "items": [{"sku": "A-1", "qty": 2, "price": Decimal("9.99"), "tags": ("gift",)}],
            "updated": date(2024, 1, 2),
        },
        {
            "items": [{"price": "9.99", "qty": 2, "sku": "A-1", "tags": ["gift"]}],
            "updated": HTTP_DATE,
        },
    ),
    "nested": Case(
        {"cart": OrderedDict(total=Money("1.10"), day=Day(2024, 1, 2), at=Point(Size.SMALL, 1))},
        {"cart": {"total": Decimal("1.10"), "day": date(2024, 1, 2), "at": ("s", 1)}},
        {"cart": {"at": ("s", 1), "day": HTTP_DATE, "total": "1.10"}},
    ),
    # Refused by both.
    "set": Case({1, 2}, REFUSED, REFUSED),
    "custom object": Case(Widget(), REFUSED, REFUSED),
    "plain Enum": Case(Plain.ONE, REFUSED, REFUSED),
    "Flag": Case(Color.RED, REFUSED, REFUSED),
    "timedelta": Case(timedelta(seconds=5), REFUSED, REFUSED),
    "ZoneInfo time": Case(time(12, tzinfo=ZoneInfo("Europe/Paris")), REFUSED, REFUSED),
}

#: Checked in this order: a subclass is compared as the first base it has here.
_BASES = (bool, Markup, Decimal, datetime, date, time, uuid.UUID, int, float, str, bytes)


def typed(value: Any) -> Any:
    """``value`` with the (base) type of every node, so that equal values of different types
    (1.10 and "1.10", 1 and True, a list and a tuple, Decimal 1.1 and 1.10) differ; dicts
    compare without regard to order (Flask's cookie sorts keys), subclasses as their base type,
    a dataclass as its fields."""
    if value is REFUSED or value is None:
        return value
    if is_dataclass(value) and not isinstance(value, type):
        return typed({field.name: getattr(value, field.name) for field in fields(value)})
    if isinstance(value, dict):
        return (dict, sorted((key, typed(item)) for key, item in value.items()))
    if isinstance(value, tuple | list):
        return (tuple if isinstance(value, tuple) else list, [typed(item) for item in value])
    for base in _BASES:
        if isinstance(value, base):
            if base is Decimal:
                return (Decimal, str(value))  # 1.1 == 1.10, but the digits differ
            if base in (datetime, time):
                return (base, value.replace(tzinfo=None), value.utcoffset(), value.fold)
            if base is float:
                return (float, float(value))  # a float enum member compares as its value
            return (base, value)
    return (type(value), value)


def as_flask_allows(ours: Any, from_flask: Any, original: Any) -> str | None:
    """Why ``ours`` breaks the rule, or None: where Flask returns a value, ours is the same or
    the original exactly (as base types)."""
    if from_flask is REFUSED:
        return None  # anything goes where Flask refuses: exact, or refused too
    if ours is REFUSED:
        return f"refused what Flask's cookie session keeps as {from_flask!r}"
    if typed(ours) in (typed(from_flask), typed(original)):
        return None
    return f"gave back {ours!r}: neither Flask's {from_flask!r} nor the original {original!r}"
