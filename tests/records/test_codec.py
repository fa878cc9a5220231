"""The session codec: exact round-trips (checked against Flask's own cookie serializer), what
Flask turns into a base type (subclasses, enum members, dataclasses) as that base type, refusals
that name the key and the type but never the value, records of the previous release, and
ValueError for anything else."""

from __future__ import annotations

import math
import pickle
import uuid
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation, localcontext
from enum import Enum, Flag, IntEnum
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from flask.json.tag import TaggedJSONSerializer
from flask.sessions import SecureCookieSession
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markupsafe import Markup

from pyloto_corp.errors import UnstorableValue
from pyloto_corp.records import codec
from pyloto_corp.records.codec import (
    MARKER,
    MAX_DEPTH,
    dumps,
    loads,
    pack_value,
    unpack_value,
)
from tests.flask_values import CASES, REFUSED, as_flask_allows, typed

SECRET = "hunter2-do-not-log"

# The autouse environment fixture is function-scoped but harmless to share between examples.
HYPOTHESIS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_same(actual: Any, expected: Any, path: str = "session") -> None:
    """Equal value AND identical type at every level (``==`` alone would accept a list for a
    tuple, a str for a Markup, an aware datetime for a naive one, 0.0 for -0.0)."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), path
        else:
            assert actual == expected, path
            assert math.copysign(1, actual) == math.copysign(1, expected), f"{path}: sign of 0"
    elif isinstance(expected, Decimal):
        # 1.1 == 1.10, and == on a signaling NaN raises: compare sign, digits and exponent.
        assert actual.as_tuple() == expected.as_tuple(), path
    elif isinstance(expected, datetime | time):
        # Field by field: == between different tzinfo objects is False at ambiguous wall times.
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None), path
        assert (actual.tzinfo is None) == (expected.tzinfo is None), f"{path}: naivety"
        assert actual.utcoffset() == expected.utcoffset(), f"{path}: UTC offset"
        assert actual.fold == expected.fold, f"{path}: fold"
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            assert_same(got, want, f"{path}[{index}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected), f"{path}: keys (and their order)"
        for key, want in expected.items():
            assert type(next(k for k in actual if k == key)) is type(key), f"{path}: key type"
            assert_same(actual[key], want, f"{path}[{key!r}]")
    else:
        assert actual == expected, path


def roundtrip(value: Any) -> Any:
    return loads(dumps({"v": value}))["v"]


class Html:
    """Not a Markup, but renders itself as HTML: stored as Markup, as Flask's TagMarkup does."""

    def __html__(self) -> str:
        return "<em>rendered</em>"


class MarkupSubclass(Markup):
    pass


PARIS = ZoneInfo("Europe/Paris")
IST = timezone(timedelta(hours=5, minutes=30))

# (value, what comes back); None: the value itself.
ROUND_TRIPS: dict[str, tuple[Any, Any]] = {
    "str": ("hello", None),
    "empty str": ("", None),
    "unicode str": ("héllo ✓ 𝄞 日本", None),
    "zero": (0, None),
    "negative int": (-1, None),
    "int64 min": (-(2**63), None),
    "int64 max": (2**63 - 1, None),
    "uint64 max": (2**64 - 1, None),
    "2**64": (2**64, None),
    "-2**64": (-(2**64), None),
    "just below int64": (-(2**63) - 1, None),
    "2**200": (2**200, None),
    "-2**200": (-(2**200), None),
    "float": (1.5, None),
    "negative zero": (-0.0, None),
    "inf": (math.inf, None),
    "-inf": (-math.inf, None),
    "nan": (math.nan, None),
    "true": (True, None),
    "false": (False, None),
    "none": (None, None),
    "bytes": (b"\x00\xffbinary", None),
    "empty bytes": (b"", None),
    "list": ([1, "two", 3.0, None], None),
    "empty list": ([], None),
    "dict": ({"a": 1, "b": {"c": [1, 2]}}, None),
    "empty dict": ({}, None),
    "tuple": ((1, "two", None), None),
    "empty tuple": ((), None),
    "one-tuple": ((1,), None),
    "nested tuples": (((1, (2, (3,))), [4, (5, {"six": (6,)})]), None),
    "tuple of special types": (
        (
            Markup("<b>x</b>"),
            uuid.UUID(int=7),
            datetime(2024, 1, 2),
            2**100,
            Decimal("0.1"),
            date(2024, 1, 2),
            time(1),
        ),
        None,
    ),
    "Markup": (Markup("<b>bold</b> &amp; safe"), None),
    "Markup subclass": (MarkupSubclass("<i>x</i>"), Markup("<i>x</i>")),
    "__html__ object": (Html(), Markup("<em>rendered</em>")),
    "UUID": (uuid.UUID("12345678-1234-5678-1234-567812345678"), None),
    "naive datetime": (datetime(2025, 11, 24, 16, 0, 0, 123456), None),
    "naive datetime, fold=1": (datetime(2025, 10, 26, 2, 30, fold=1), None),
    "datetime.min": (datetime.min, None),
    "datetime.max": (datetime.max, None),
    "UTC datetime": (datetime(2025, 11, 24, 16, 0, 0, 1, tzinfo=UTC), None),
    "+05:30 datetime": (datetime(2025, 11, 24, 21, 30, 0, 999999, tzinfo=IST), None),
    "-03:30 datetime": (
        datetime(2025, 1, 1, tzinfo=timezone(-timedelta(hours=3, minutes=30))),
        None,
    ),
    "sub-minute offset": (
        datetime(1900, 1, 1, tzinfo=timezone(timedelta(minutes=9, seconds=21, microseconds=5))),
        None,
    ),
    "ZoneInfo datetime": (
        datetime(2025, 7, 14, 12, 0, 0, 42, tzinfo=PARIS),
        datetime(2025, 7, 14, 12, 0, 0, 42, tzinfo=timezone(timedelta(hours=2))),
    ),
    "flashes": (
        [("message", "Saved"), ("error", Markup("<b>Could not</b> save")), ("info", "x")],
        None,
    ),
    "Decimal": (Decimal("1.10"), None),
    "Decimal integral": (Decimal("42"), None),
    "Decimal -0.00": (Decimal("-0.00"), None),
    "Decimal tiny": (Decimal("1E-7"), None),
    "Decimal huge exponent": (Decimal("1.5E+999999999999999999"), None),
    "Decimal 50 digits": (Decimal("3.1415926535897932384626433832795028841971693993751"), None),
    "Decimal NaN": (Decimal("NaN"), None),
    "Decimal -sNaN with payload": (Decimal("-sNaN42"), None),
    "Decimal -Infinity": (Decimal("-Infinity"), None),
    "date": (date(2024, 1, 2), None),
    "date.min": (date.min, None),
    "date.max": (date.max, None),
    "time": (time(12, 30, 5, 123456), None),
    "time.min": (time.min, None),
    "time.max": (time.max, None),
    "time, fold=1": (time(2, 30, fold=1), None),
    "UTC time": (time(23, 59, tzinfo=UTC), None),
    "+05:30 time": (time(1, 2, 3, 4, tzinfo=IST), None),
    "-00:00:01 time": (time(0, tzinfo=timezone(-timedelta(seconds=1))), None),
}


def _expected(value: Any, expected: Any) -> Any:
    return value if expected is None else expected


@pytest.mark.parametrize(("value", "expected"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip_keeps_value_and_type(value: Any, expected: Any) -> None:
    assert_same(roundtrip(value), _expected(value, expected))
    nested = {"outer": [{"inner": (value,)}]}
    assert_same(roundtrip(nested), {"outer": [{"inner": (_expected(value, expected),)}]})


@pytest.mark.parametrize(("value", "expected"), ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_pack_value_round_trips_one_value(value: Any, expected: Any) -> None:
    packed = pack_value("key", value)
    assert packed.startswith(MARKER)
    assert_same(unpack_value(packed), _expected(value, expected))


def test_a_whole_session_round_trips_in_order() -> None:
    session = {
        "_permanent": True,
        "_created_at": 1764000000,
        "_flashes": [("message", Markup("<b>Welcome</b> back")), ("error", "Bad input")],
        "user_id": uuid.uuid4(),
        "last_seen": datetime.now(UTC),
        "cart": [{"sku": "A-1", "qty": 2, "price": 9.99}],
        "csrf": b"\x01\x02",
    }
    record = dumps(session)
    assert record.startswith(MARKER)
    assert_same(loads(record), session)


def test_zoneinfo_datetime_comes_back_as_the_same_instant_with_a_fixed_offset() -> None:
    original = datetime(2025, 10, 26, 2, 30, fold=1, tzinfo=PARIS)  # the second 02:30 (CET)
    back = roundtrip(original)
    assert back.tzinfo == timezone(timedelta(hours=1))
    assert back.utcoffset() == original.utcoffset()
    assert back.astimezone(UTC) == original.astimezone(UTC)
    assert back.astimezone(PARIS).replace(tzinfo=None) == original.replace(tzinfo=None)


def test_many_distinct_offsets_come_back_right_and_do_not_grow_the_cache() -> None:
    for minutes in range(-1000, 1000, 5):
        at = datetime(2025, 1, 1, tzinfo=timezone(timedelta(minutes=minutes)))
        assert_same(roundtrip(at), at)
    assert len(codec._timezones) <= codec._MAX_CACHED_TIMEZONES


def test_top_level_may_be_any_mapping_such_as_flasks_session_class() -> None:
    # Only the session object itself may be a dict subclass (it always is); values may not.
    assert_same(loads(dumps(SecureCookieSession({"a": (1,)}))), {"a": (1,)})
    assert_same(loads(dumps(MappingProxyType({"b": [2]}))), {"b": [2]})


def test_nesting_up_to_the_limit_is_stored() -> None:
    value: Any = "leaf"
    for _ in range(MAX_DEPTH - 1):  # the leaf sits MAX_DEPTH levels below the session
        value = [value]
    assert_same(roundtrip(value), value)


# --- against Flask's own cookie serializer -------------------------------------------------

FLASK_SUPPORTED: dict[str, Any] = {
    "str": "héllo",
    "int": 42,
    "big int": 2**200,
    "negative big int": -(2**70),
    "float": 0.25,
    "bool": True,
    "none": None,
    "list": [1, [2, "three"]],
    "dict": {"a": {"b": 1}},
    "tuple": (1, ("two", 3)),
    "bytes": b"\x00\xff",
    "Markup": Markup("<b>safe</b>"),
    "UUID": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "flashes": [("message", "Saved"), ("error", Markup("<i>Oops</i>"))],
    "mixed": {"t": (b"x", Markup("<p>"), uuid.UUID(int=1)), "l": [(), {}]},
}


@pytest.mark.parametrize("value", FLASK_SUPPORTED.values(), ids=FLASK_SUPPORTED.keys())
def test_same_result_as_flasks_tagged_json_serializer(value: Any) -> None:
    # TaggedJSONSerializer needs no app context for these types (it falls back to json).
    flask = TaggedJSONSerializer()
    from_flask = flask.loads(flask.dumps({"v": value}))["v"]
    assert_same(roundtrip(value), from_flask)
    assert_same(from_flask, value)


def test_html_objects_are_stored_as_markup_like_flask_does() -> None:
    flask = TaggedJSONSerializer()
    from_flask = flask.loads(flask.dumps({"v": Html()}))["v"]
    assert_same(from_flask, Markup("<em>rendered</em>"))
    assert_same(roundtrip(Html()), from_flask)


def test_decimals_and_dates_are_read_back_as_themselves_not_as_str() -> None:
    session = {"price": Decimal("1.10"), "day": date(2024, 1, 2), "at": time(9, 30)}
    loaded = loads(dumps(session))
    assert_same(loaded, session)
    assert loaded["price"] + Decimal("0.05") == Decimal("1.15")  # arithmetic still works
    assert str(loaded["price"]) == "1.10"  # trailing zero kept
    assert loaded["day"].isoformat() == "2024-01-02"


def test_reading_a_decimal_does_not_depend_on_the_decimal_context() -> None:
    record = dumps({"price": Decimal("1.10"), "big": Decimal("1.23456789E+40")})
    with localcontext() as context:
        context.prec = 2
        context.traps[InvalidOperation] = False
        context.capitals = 0
        assert_same(loads(record), {"price": Decimal("1.10"), "big": Decimal("1.23456789E+40")})
        written = dumps({"big": Decimal("1.23456789E+40")})  # with a lowercase exponent
        with pytest.raises(ValueError, match=r"^not a valid session record$"):
            loads(_new({"d": _Ext(6, b"garbage")}))  # not silently NaN
    assert_same(loads(written), {"big": Decimal("1.23456789E+40")})


@pytest.mark.parametrize(
    "value",
    [
        datetime(2025, 11, 24, 16, 0, 0, 123456),
        datetime(2025, 11, 24, 21, 30, 0, 999999, tzinfo=IST),
    ],
    ids=["naive", "aware +05:30"],
)
def test_datetimes_are_exact_where_flask_is_lossy(value: datetime) -> None:
    flask = TaggedJSONSerializer()
    from_flask = flask.loads(flask.dumps({"v": value}))["v"]
    # Flask stores an HTTP date: no microseconds, and always aware UTC.
    assert from_flask.microsecond == 0
    assert from_flask.tzinfo is not None
    assert from_flask.utcoffset() == timedelta(0)
    assert from_flask.replace(tzinfo=None) != value.replace(tzinfo=None)
    assert_same(roundtrip(value), value)


# --- what Flask turns into a base type -----------------------------------------------------


def _ours(value: Any) -> Any:
    try:
        return roundtrip(value)
    except UnstorableValue:
        return REFUSED


def _flasks(value: Any) -> Any:
    flask = TaggedJSONSerializer()
    try:
        return flask.loads(flask.dumps({"v": value}))["v"]
    except TypeError:
        return REFUSED


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_what_flask_keeps_comes_back_as_flask_gives_it_or_exactly(case: Any) -> None:
    ours = _ours(case.value)
    if case.ours is REFUSED:
        assert ours is REFUSED
    else:
        assert_same(ours, case.ours)
        assert_same(unpack_value(pack_value("v", case.value)), case.ours)
        assert_same(roundtrip({"in": [(case.value,)]}), {"in": [(case.ours,)]})
    from_flask = _flasks(case.value)
    assert typed(from_flask) == typed(case.flask), (
        f"Flask's cookie session now gives {from_flask!r}"
    )
    assert as_flask_allows(ours, from_flask, case.value) is None


@dataclass
class Node:
    name: str
    children: list[Node] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)
    count: int = field(init=False, default=0)


def test_a_dataclass_becomes_a_dict_of_its_fields_nested_ones_too() -> None:
    tree = Node("root", [Node("leaf", cache={"k": (1, b"x")})])
    tree.count = 2
    assert_same(
        roundtrip(tree),
        {
            "name": "root",
            "children": [{"name": "leaf", "children": [], "cache": {"k": (1, b"x")}, "count": 0}],
            "cache": {},
            "count": 2,
        },
    )


@dataclass
class Unset:
    ready: bool = field(init=False)


def test_a_dataclass_field_is_held_to_the_same_rules_and_named_by_path() -> None:
    with pytest.raises(UnstorableValue) as refused:
        dumps({"tree": Node("root", [Node("leaf", cache={"k": {SECRET}})])})
    assert str(refused.value).startswith(
        "session['tree']['children'][0]['cache']['k'] is a set, which the session cannot store"
    )
    loop = Node("loop")
    loop.children.append(loop)
    with pytest.raises(UnstorableValue, match="contains itself"):
        dumps({"loop": loop})
    with pytest.raises(UnstorableValue, match=r"^session\['u'\] is an Unset \(a dataclass\) with"):
        dumps({"u": Unset()})
    with pytest.raises(UnstorableValue, match=r"^session\['cls'\] is a type,"):
        dumps({"cls": Node})  # the class itself is not an instance


def test_a_dict_subclass_keeps_its_items_not_its_overrides() -> None:
    class Token(dict[str, Any]):
        def __getitem__(self, key: str) -> Any:
            return "overridden"

    stored = roundtrip(Token(access_token="t", expires_in=3600))
    assert_same(stored, {"access_token": "t", "expires_in": 3600})


def test_a_subclass_of_a_base_type_is_stored_as_its_content_not_its_str() -> None:
    class Shouty(str):
        def __str__(self) -> str:
            return self.upper()

    class Odd(int):
        def __int__(self) -> int:
            return 0

    class Fancy(Decimal):
        def __str__(self) -> str:
            return "fancy"

    assert_same(roundtrip([Shouty("quiet"), Odd(7), Fancy("1.10")]), ["quiet", 7, Decimal("1.10")])


def test_a_str_subclass_with_a_lone_surrogate_is_refused_like_a_str() -> None:
    with pytest.raises(UnstorableValue, match=r"^session\['n'\] is a str with a lone surrogate"):
        dumps({"n": Name("x\ud800")})


# --- refusals ------------------------------------------------------------------------------


class Level(IntEnum):
    HIGH = 3


class Plain(Enum):
    ONE = SECRET


class Name(str):
    pass


class Opaque:
    def __repr__(self) -> str:
        return SECRET


Point = namedtuple("Point", "x y")


class Perms(Flag):
    READ = 1


class Tags(set[str]):
    pass


# (session, where the message must point, type named in it)
UNSTORABLE: dict[str, tuple[dict[Any, Any], str, str]] = {
    "set": ({"cart": ["a", "b", {SECRET}]}, "session['cart'][2] is a set", "store a list"),
    "frozenset": ({"f": frozenset({SECRET})}, "session['f'] is a frozenset", "store a list"),
    "set subclass": ({"t": Tags({SECRET})}, "session['t'] is a Tags (a set subclass)", "list"),
    "Enum": ({"one": Plain.ONE}, "session['one'] is a Plain enum member", ".value"),
    "Flag": ({"p": Perms.READ}, "session['p'] is a Perms enum member", ".value"),
    "bytearray": ({"b": bytearray(SECRET, "ascii")}, "session['b'] is a bytearray", "bytes"),
    "memoryview": ({"m": memoryview(SECRET.encode())}, "session['m'] is a memoryview", "bytes"),
    "mappingproxy": (
        {"m": MappingProxyType({"k": SECRET})},
        "session['m'] is a mappingproxy",
        "store a dict",
    ),
    "timedelta": ({"td": timedelta(1)}, "session['td'] is a timedelta", "total_seconds()"),
    "ZoneInfo time": (
        {"t": time(12, tzinfo=PARIS)},
        "session['t'] is a time whose tzinfo has no fixed UTC offset",
        "datetime.timezone",
    ),
    "complex": ({"z": 1j}, "session['z'] is a complex", "supported types"),
    "custom object": ({"obj": Opaque()}, "session['obj'] is an Opaque", "supported types"),
    "in a tuple": ({"t": (1, {SECRET})}, "session['t'][1] is a set", "list"),
    "in a namedtuple": ({"p": Point(1, {SECRET})}, "session['p'][1] is a set", "list"),
    "in a dict subclass": ({"d": OrderedDict(k={SECRET})}, "session['d']['k'] is a set", "list"),
    "deep in dicts": ({"a": {"b": [0, {"c": {SECRET}}]}}, "session['a']['b'][1]['c']", "set"),
    "in a flash": ({"_flashes": [("message", Opaque())]}, "session['_flashes'][0][1]", "Opaque"),
    "lone surrogate": ({"s": "x\ud800"}, "session['s'] is a str with a lone surrogate", "UTF"),
}


@pytest.mark.parametrize(("session", "where", "hint"), UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_values_are_refused_naming_path_and_type_not_value(
    session: dict[Any, Any], where: str, hint: str
) -> None:
    with pytest.raises(UnstorableValue) as refused:
        dumps(session)
    message = str(refused.value)
    assert where in message
    assert hint in message
    assert SECRET not in message
    assert isinstance(refused.value, TypeError)
    assert "(supported: str, int, float, bool, None, bytes, list, tuple" in message or (
        "surrogate" in message or "tzinfo" in message
    )


def test_the_documented_message_for_a_set() -> None:
    with pytest.raises(UnstorableValue) as refused:
        dumps({"cart": ["a", "b", {SECRET}]})
    assert str(refused.value) == (
        "session['cart'][2] is a set, which the session cannot store exactly; store a list"
        " (supported: str, int, float, bool, None, bytes, list, tuple, dict with str keys,"
        " Markup, UUID, datetime, date, time, Decimal, dataclass instances)."
    )


BAD_KEYS: dict[str, tuple[dict[Any, Any], str]] = {
    "int key": (
        {42: "x"},
        "session key 42 is an int; session keys (and keys of nested dicts) must be str.",
    ),
    "None key": ({None: "x"}, "session key None is a NoneType;"),
    "enum key": ({Level.HIGH: "x"}, "session key <Level.HIGH: 3> is a Level enum member;"),
    "nested int key": (
        {"prefs": {1: "x"}},
        "session['prefs'] has key 1, an int; session keys (and keys of nested dicts) must be str.",
    ),
    "nested bytes key": ({"p": {SECRET.encode(): 1}}, "session['p'] has a key of type bytes;"),
    "nested tuple key": ({"p": [{(SECRET,): 1}]}, "session['p'][0] has a key of type tuple;"),
    "str subclass key": ({Name(SECRET): 1}, "a session key is a Name (a str subclass);"),
    "int key in a dict subclass": (
        {"o": OrderedDict({1: SECRET})},
        "session['o'] has key 1, an int; session keys (and keys of nested dicts) must be str.",
    ),
    "enum key in a dict subclass": (
        {"o": OrderedDict({Level.HIGH: SECRET})},
        "session['o'] has key <Level.HIGH: 3>, a Level enum member;",
    ),
    "str subclass key in a dict": ({"d": {Name(SECRET): 1}}, "session['d'] has a key of type Name"),
    "surrogate key": ({"ok": {"\udcff": 1}}, "a key of session['ok'] is a str with a lone"),
}


@pytest.mark.parametrize(("session", "expected"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_keys_must_be_exactly_str(session: dict[Any, Any], expected: str) -> None:
    with pytest.raises(UnstorableValue) as refused:
        dumps(session)
    message = str(refused.value)
    assert expected in message
    assert SECRET not in message


def test_pack_value_applies_the_same_rules() -> None:
    with pytest.raises(UnstorableValue, match=r"^session\['cart'\]\[0\] is a set"):
        pack_value("cart", [{SECRET}])
    with pytest.raises(UnstorableValue, match="session key 7 is an int"):
        pack_value(7, "x")  # type: ignore[arg-type]


def _nest_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_DEPTH, 1000, 100_000])
def test_pathological_nesting_is_refused_not_a_recursion_error(depth: int) -> None:
    with pytest.raises(UnstorableValue, match=r"^session\['deep'\]\[0\]\[0\]\.\.\. nests more"):
        dumps({"deep": _nest_lists(depth)})


def test_self_referencing_containers_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    for session in ({"loop": loop}, {"cycle": cycle}, {"t": (loop,)}):
        with pytest.raises(UnstorableValue, match="contains itself"):
            dumps(session)


# --- records of the previous release -------------------------------------------------------


def test_previous_release_records_load_unchanged() -> None:
    stored = {"counter": 2, "_permanent": True, "_created_at": 1764000000}
    stored["_flashes"] = [["message", "hi"]]
    record = msgspec.msgpack.encode(stored)
    assert not record.startswith(MARKER)
    loaded = loads(record)
    assert_same(loaded, stored)  # lists stay lists: the old format had no tuples
    assert_same(loads(dumps(loaded)), stored)  # and they are rewritten in the new format


def test_previous_release_aware_datetimes_still_load() -> None:
    # The old encoder wrote aware datetimes as msgpack timestamps; msgspec reads them as UTC.
    at = datetime(2025, 11, 24, 16, 0, 0, 5, tzinfo=UTC)
    assert_same(loads(msgspec.msgpack.encode({"at": at})), {"at": at})


def test_no_previous_release_record_starts_with_the_marker() -> None:
    with pytest.raises(msgspec.DecodeError):
        msgspec.msgpack.decode(MARKER[:1])


# --- not a record --------------------------------------------------------------------------

_enc = msgspec.msgpack.encode
_Ext = msgspec.msgpack.Ext


def _new(payload: Any) -> bytes:
    return MARKER + _enc(payload)


def _nested_tuple_exts(depth: int) -> bytes:
    inner = _enc([])
    for _ in range(depth):
        inner = _enc([_Ext(1, inner)])
    return MARKER + _enc({"t": _Ext(1, inner)})


NOT_RECORDS: dict[str, bytes] = {
    "empty": b"",
    "garbage": b"\xff\xfe garbage " + SECRET.encode(),
    "pickle": pickle.dumps({"a": 1}),
    "msgpack list": b"\x92\x01\x02",
    "msgpack str": _enc(SECRET),
    "map with int keys": _enc({1: 2}),
    "truncated map": _enc({"a": SECRET})[:-3],
    "trailing bytes": _enc({"a": 1}) + b"\x00",
    "old record with an ext": _enc({"a": _Ext(1, b"")}),
    "old record, invalid utf-8": b"\x81\xa1a\xa2\xff\xfe",
    "marker only": MARKER,
    "marker + garbage": MARKER + b"garbage " + SECRET.encode(),
    "marker + list": _new([SECRET]),
    "marker + pickle": MARKER + pickle.dumps({"a": 1}),
    "marker + trailing bytes": dumps({"a": 1}) + b"\x00",
    "marker + unknown ext": _new({"a": _Ext(99, SECRET.encode())}),
    "marker + negative ext": _new({"a": _Ext(-5, b"x")}),
    "marker + invalid utf-8 key": MARKER + b"\x81\xa2\xff\xfe\x01",
    "bad Markup ext": _new({"m": _Ext(2, b"\xff" + SECRET.encode())}),
    "bad UUID ext": _new({"u": _Ext(3, b"short")}),
    "tuple ext not a list": _new({"t": _Ext(1, _enc({"a": 1}))}),
    "tuple ext garbage": _new({"t": _Ext(1, b"\xc1")}),
    "datetime ext garbage": _new({"d": _Ext(4, b"\x00")}),
    "datetime ext, month 13": _new({"d": _Ext(4, _enc([2025, 13, 1, 0, 0, 0, 0, 0, None]))}),
    "datetime ext, fold 2": _new({"d": _Ext(4, _enc([2025, 1, 1, 0, 0, 0, 0, 2, None]))}),
    "datetime ext, offset 24h": _new(
        {"d": _Ext(4, _enc([2025, 1, 1, 0, 0, 0, 0, 0, 86_400_000_000]))}
    ),
    "datetime ext, huge offset": _new({"d": _Ext(4, _enc([2025, 1, 1, 0, 0, 0, 0, 0, 2**63]))}),
    "datetime ext, year overflow": _new({"d": _Ext(4, _enc([2**62, 1, 1, 0, 0, 0, 0, 0, None]))}),
    "Decimal ext garbage": _new({"d": _Ext(6, b"1.1x")}),
    "Decimal ext with spaces": _new({"d": _Ext(6, b" 1.10")}),
    "Decimal ext, non-ASCII digits": _new({"d": _Ext(6, "\u0661".encode())}),
    "Decimal ext, underscores": _new({"d": _Ext(6, b"1_000")}),
    "Decimal ext, exponent too large": _new({"d": _Ext(6, b"1E+9999999999999999999")}),
    "Decimal ext, empty": _new({"d": _Ext(6, b"")}),
    "date ext, month 13": _new({"d": _Ext(7, _enc([2025, 13, 1]))}),
    "date ext, year 0": _new({"d": _Ext(7, _enc([0, 1, 1]))}),
    "date ext, two fields": _new({"d": _Ext(7, _enc([2025, 1]))}),
    "date ext, str fields": _new({"d": _Ext(7, _enc(["2025", 1, 1]))}),
    "date ext, year overflow": _new({"d": _Ext(7, _enc([2**62, 1, 1]))}),
    "time ext, hour 24": _new({"t": _Ext(8, _enc([24, 0, 0, 0, 0, None]))}),
    "time ext, fold 2": _new({"t": _Ext(8, _enc([1, 0, 0, 0, 2, None]))}),
    "time ext, offset 24h": _new({"t": _Ext(8, _enc([1, 0, 0, 0, 0, 86_400_000_000]))}),
    "time ext garbage": _new({"t": _Ext(8, b"\x00")}),
    "deeply nested arrays": MARKER + b"\x81\xa1a" + b"\x91" * 100_000 + b"\x01",
    "deeply nested tuple exts": _nested_tuple_exts(5_000),
}


@pytest.mark.parametrize("raw", NOT_RECORDS.values(), ids=NOT_RECORDS.keys())
def test_anything_else_is_a_value_error_without_data(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not a valid session record$"):
        loads(raw)


@pytest.mark.parametrize(
    "raw",
    [b"", _enc("x"), dumps({"a": 1})[2:], MARKER + b"\xc1", _new(_Ext(99, b""))],
    ids=["empty", "no marker", "old format", "garbage", "unknown ext"],
)
def test_unpack_value_rejects_anything_else(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not a valid session value record$"):
        unpack_value(raw)


# --- properties ----------------------------------------------------------------------------

offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
    max_value=timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
)
fixed_offsets = st.none() | st.builds(timezone, offsets)
tzinfos = fixed_offsets | st.timezones()
scalars = (
    st.text()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.none()
    | st.binary()
    | st.uuids()
    | st.datetimes(timezones=tzinfos)
    | st.text().map(Markup)
    | st.decimals()
    | st.dates()
    | st.times(timezones=fixed_offsets)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.lists(children, max_size=5).map(tuple)
        | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=15,
)
sessions = st.dictionaries(st.text(), values, max_size=6)


def _as_stored(value: Any) -> Any:
    """What an exact round-trip returns: the same, except that a zone becomes a fixed offset."""
    if isinstance(value, datetime | time) and (offset := value.utcoffset()) is not None:
        return value.replace(tzinfo=timezone(offset))
    if isinstance(value, list):
        return [_as_stored(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_as_stored(item) for item in value)
    if isinstance(value, dict):
        return {key: _as_stored(item) for key, item in value.items()}
    return value


@HYPOTHESIS
@given(session=sessions)
def test_any_supported_session_round_trips_exactly(session: dict[str, Any]) -> None:
    loaded = loads(dumps(session))
    assert_same(loaded, session)
    assert_same(loaded, _as_stored(session))
    assert dumps(loaded) == dumps(session)


@HYPOTHESIS
@given(key=st.text(), value=values)
def test_any_supported_value_round_trips_alone(key: str, value: Any) -> None:
    assert_same(unpack_value(pack_value(key, value)), value)


def _loads_or_value_error(raw: bytes) -> None:
    message = None
    try:
        result = loads(raw)
    except ValueError as exc:  # the only error allowed, and it carries no data
        message = str(exc)
    else:
        assert type(result) is dict
        assert all(type(key) is str for key in result)
    assert message in (None, "not a valid session record")


@HYPOTHESIS
@given(raw=st.binary(max_size=200), marked=st.booleans())
def test_arbitrary_bytes_load_or_raise_value_error(raw: bytes, marked: bool) -> None:
    _loads_or_value_error(MARKER + raw if marked else raw)


@HYPOTHESIS
@given(session=sessions, data=st.data())
def test_corrupted_records_load_or_raise_value_error(
    session: dict[str, Any], data: st.DataObject
) -> None:
    record = bytearray(dumps(session))
    index = data.draw(st.integers(min_value=0, max_value=len(record) - 1))
    record[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(record)))
    _loads_or_value_error(bytes(record[:cut]))
