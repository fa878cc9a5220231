"""Session bytes: msgpack with a few extension types, exact where plain msgpack was lossy.

The previous release stored ``msgpack(dict(session))``: a tuple came back as a list (so Flask's
flashed ``(category, message)`` pairs changed type), a naive datetime as a string, a ``set`` as
a list, an enum as its value, an int beyond 64 bits or a ``Markup`` (a flashed safe message) or
a custom object failed inside the encoder. This format keeps everything Flask's own cookie
session (:class:`flask.json.tag.TaggedJSONSerializer` and its JSON provider) keeps, and more
exactly where Flask is lossy: datetimes keep their microseconds, their naivety and their UTC
offset, ints of any size survive, and a ``Decimal``, a ``date`` or a ``time`` comes back as
itself (Flask gives a str, or refuses a time).

What Flask turns into a base type becomes that base type here too, with its contents kept
exactly: a dict subclass (``OrderedDict``, an OAuth ``OAuth2Token``) or a dataclass instance
becomes a dict, a list subclass a list, a namedtuple a tuple, a str, int or float subclass
(a ``StrEnum`` or ``IntEnum`` member: its value) the plain type; subclasses of ``bytes``,
``UUID``, ``datetime``, ``date``, ``time`` and ``Decimal`` come back as the base type. No class
name is ever stored, so reading never imports or builds an application class.

Layout: :data:`MARKER` followed by one msgpack map. Types msgpack lacks are extension types
(:data:`EXT_TUPLE` ... :data:`EXT_TIME`); a tuple's items are packed recursively inside its
extension. Records without the marker are read as the previous release's plain msgpack, so
sessions written before an upgrade keep working. Nothing here ever unpickles.

What Flask's cookie session refuses (a ``set``, a custom object, an enum that is not a str,
int or float) is refused too, as is a non-str key (Flask would silently turn ``1`` into
``"1"``): :func:`dumps` raises :class:`~pyloto_corp.errors.UnstorableValue`, naming the session
key and the type, never the value.

An aware datetime or time comes back with a fixed-offset :class:`datetime.timezone` (same
instant, same UTC offset), not its original ``tzinfo``: a ``ZoneInfo`` name is not stored, so
call ``.astimezone(ZoneInfo(...))`` after reading when the zone's rules matter. A ``time`` whose
tzinfo has no fixed offset (a ``ZoneInfo``) is refused: it would come back naive.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from typing import Any, Final

import msgspec
from markupsafe import Markup

from ..errors import UnstorableValue

__all__ = ["MARKER", "MAX_DEPTH", "dumps", "loads", "pack_value", "unpack_value"]

#: Prefix of every record in this format. 0xc1 is the one byte msgpack never uses, so no record
#: of the previous release (a bare msgpack map) starts with it; the second byte is a version.
MARKER: Final = b"\xc1\x01"

#: Deepest nesting accepted; deeper (or self-containing) values are refused, not a RecursionError.
MAX_DEPTH: Final = 64

# Extension codes and their payloads. Fixed forever: stored records depend on them.
EXT_TUPLE: Final = 1  # msgpack array of the items, themselves in this format
EXT_MARKUP: Final = 2  # the text, UTF-8
EXT_UUID: Final = 3  # msgpack bin of the 16 bytes
EXT_DATETIME: Final = 4  # msgpack array: _DateTimeFields
EXT_BIG_INT: Final = 5  # big-endian two's complement, for ints outside msgpack's 64 bits
EXT_DECIMAL: Final = 6  # str(value), ASCII: Decimal(str(d)) keeps every digit and the exponent
EXT_DATE: Final = 7  # msgpack array: year, month, day
EXT_TIME: Final = 8  # msgpack array: _TimeFields

_INT_MIN: Final = -(2**63)
_UINT_MAX: Final = 2**64 - 1
_MARKER_LEN: Final = len(MARKER)
_SUPPORTED: Final = (
    "str, int, float, bool, None, bytes, list, tuple, dict with str keys, Markup, UUID, datetime,"
    " date, time, Decimal, dataclass instances"
)
#: Base types named in a refusal of a subclass ("a Name (a str subclass)"), for keys (which must
#: be exactly str) and for the values still refused (a set subclass); datetime before date.
_SUBCLASSABLE: Final = (
    str,
    int,
    float,
    bytes,
    list,
    dict,
    tuple,
    set,
    frozenset,
    bytearray,
    datetime,
    date,
    uuid.UUID,
)
_KEY_RULE: Final = "session keys (and keys of nested dicts) must be str."

_Path = tuple[str | int, ...]
# (year, month, day, hour, minute, second, microsecond, fold, UTC offset in µs or None if naive)
_DateTimeFields = tuple[int, int, int, int, int, int, int, int, int | None]
# (hour, minute, second, microsecond, fold, UTC offset in µs or None if naive)
_TimeFields = tuple[int, int, int, int, int, int | None]

_encoder: Final = msgspec.msgpack.Encoder()


# --- writing ---------------------------------------------------------------------------------


def dumps(data: Mapping[Any, Any]) -> bytes:
    """The session as a record; raises UnstorableValue, before anything is stored, for any value
    that would come back neither as itself nor as what Flask's cookie session gives back."""
    converted: dict[str, Any] = {}
    for key, value in data.items():
        _check_key(key, ())
        converted[key] = _convert(value, (key,))
    return MARKER + _encoder.encode(converted)


def pack_value(key: str, value: Any) -> bytes:
    """One top-level session value alone, under the same rules as :func:`dumps` (for stores that
    keep each key separately); ``key`` only names the value in a refusal."""
    _check_key(key, ())
    return MARKER + _encoder.encode(_convert(value, (key,)))


def _convert(value: Any, path: _Path) -> Any:
    """``value`` as something msgpack encodes exactly: extension types for what it lacks.

    Exact types are checked first, with ``is``: a subclass (an enum, an OrderedDict) would be
    encoded by msgpack as something that does not come back as itself, so :func:`_convert_other`
    first turns it into its base type, as Flask does.
    """
    if len(path) > MAX_DEPTH:
        raise UnstorableValue(
            f"{_format_path(path[:3])}... nests more than {MAX_DEPTH} levels deep (or contains"
            " itself), which the session cannot store; store a flatter structure."
        )
    kind = type(value)
    if kind is str:
        if not value.isascii():  # O(1); only non-ASCII text can hold a lone surrogate
            _check_utf8(value, path)
        return value
    if kind is bool or value is None or kind is float or kind is bytes:
        return value
    if kind is int:
        if _INT_MIN <= value <= _UINT_MAX:
            return value
        size = value.bit_length() // 8 + 1  # room for the sign bit
        return msgspec.msgpack.Ext(EXT_BIG_INT, value.to_bytes(size, "big", signed=True))
    if kind is list:
        return [_convert(item, (*path, index)) for index, item in enumerate(value)]
    if kind is dict:
        return _convert_dict(value, path)
    if kind is tuple:
        return _tuple_ext(value, path)
    if kind is uuid.UUID:  # as msgpack bin: msgspec rebuilds a UUID from it in C
        return msgspec.msgpack.Ext(EXT_UUID, _encoder.encode(value.bytes))
    if kind is datetime:
        return msgspec.msgpack.Ext(EXT_DATETIME, _encoder.encode(_datetime_fields(value)))
    if kind is Markup:
        return _markup_ext(str(value), path)
    if kind is date:
        return _date_ext(value)
    if kind is Decimal:
        return _decimal_ext(value)
    if kind is time:
        return _time_ext(value, path)
    return _convert_other(value, kind, path)


def _convert_other(value: Any, kind: type, path: _Path) -> Any:
    """A value of no exact supported type, stored as what Flask's cookie session reads back,
    checked in Flask's order (its tags, then its JSON encoder, then its JSON provider), or
    exactly where Flask is lossy. Never a class name: the base type comes back."""
    if isinstance(value, dict):  # OrderedDict, defaultdict, OAuth2Token: a dict, as in Flask
        return _convert_dict(value, path)
    if isinstance(value, tuple):  # a namedtuple: a tuple
        return _tuple_ext(value, path)
    if isinstance(value, list):
        return [_convert(item, (*path, index)) for index, item in enumerate(value)]
    if isinstance(value, bytes):
        return bytes.__bytes__(value)
    html = getattr(value, "__html__", None)
    if callable(html):  # as Flask's TagMarkup: anything that renders itself as HTML
        return _markup_ext(str(html()), path)
    if isinstance(value, uuid.UUID):
        return _convert(uuid.UUID(int=value.int), path)
    if isinstance(value, datetime):
        return msgspec.msgpack.Ext(EXT_DATETIME, _encoder.encode(_datetime_fields(value)))
    # What Flask's JSON encoder writes as its base type: a StrEnum or IntEnum member's value.
    if isinstance(value, str):
        return _convert(str.__str__(value), path)
    if isinstance(value, int):
        return _convert(int.__int__(value), path)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, date):
        return _date_ext(value)
    if isinstance(value, Decimal):
        return _decimal_ext(value)
    if isinstance(value, time):
        return _time_ext(value, path)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _convert_dict(_dataclass_fields(value, kind, path), path)
    raise UnstorableValue(
        f"{_format_path(path)} is {_describe(kind)}, which the session cannot store exactly;"
        f" {_advice(value)} (supported: {_SUPPORTED})."
    )


def _convert_dict(value: Mapping[Any, Any], path: _Path) -> dict[str, Any]:
    converted: dict[str, Any] = {}
    for key, item in value.items():
        _check_key(key, path)
        converted[key] = _convert(item, (*path, key))
    return converted


def _tuple_ext(value: tuple[Any, ...], path: _Path) -> msgspec.msgpack.Ext:
    items = [_convert(item, (*path, index)) for index, item in enumerate(value)]
    return msgspec.msgpack.Ext(EXT_TUPLE, _encoder.encode(items))


def _date_ext(value: date) -> msgspec.msgpack.Ext:
    return msgspec.msgpack.Ext(EXT_DATE, _encoder.encode((value.year, value.month, value.day)))


def _decimal_ext(value: Decimal) -> msgspec.msgpack.Ext:
    # Decimal.__str__, not str(): a subclass may render itself differently.
    return msgspec.msgpack.Ext(EXT_DECIMAL, Decimal.__str__(value).encode("ascii"))


def _time_ext(value: time, path: _Path) -> msgspec.msgpack.Ext:
    """Fields plus the UTC offset, as for a datetime; a tzinfo without a fixed offset (a
    ``ZoneInfo``: a time has no date to resolve it) would come back naive, so it is refused."""
    offset = value.utcoffset()
    if offset is None and value.tzinfo is not None:
        raise UnstorableValue(
            f"{_format_path(path)} is a time whose tzinfo has no fixed UTC offset (such as a"
            " ZoneInfo), which the session cannot store exactly; store a datetime, or a time"
            " with a datetime.timezone."
        )
    fields: _TimeFields = (
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        value.fold,
        None if offset is None else offset // timedelta(microseconds=1),
    )
    return msgspec.msgpack.Ext(EXT_TIME, _encoder.encode(fields))


def _dataclass_fields(value: Any, kind: type, path: _Path) -> dict[str, Any]:
    """A dataclass instance's fields by name, as :func:`dataclasses.asdict` (Flask's choice)
    gives them but without copying: the values themselves are converted as any other."""
    try:
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    except AttributeError:  # a field(init=False) never assigned
        raise UnstorableValue(
            f"{_format_path(path)} is {_describe(kind)} (a dataclass) with a field that has no"
            " value, which the session cannot store; assign every field."
        ) from None


def _datetime_fields(value: datetime) -> _DateTimeFields:
    """Wall-clock fields plus the UTC offset: the same instant and offset come back, and a naive
    datetime stays naive (``None``)."""
    offset = value.utcoffset()
    return (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        value.fold,
        None if offset is None else offset // timedelta(microseconds=1),
    )


def _markup_ext(text: str, path: _Path) -> msgspec.msgpack.Ext:
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableValue(_surrogate_message(path)) from None
    return msgspec.msgpack.Ext(EXT_MARKUP, encoded)


def _check_utf8(text: str, path: _Path) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnstorableValue(_surrogate_message(path)) from None


def _check_key(key: Any, path: _Path) -> None:
    """Keys must be exactly str: msgpack would turn an enum key into its value, an int key would
    not survive the str-keyed top level, and a tuple key would come back as something else."""
    if type(key) is str:
        if not key.isascii():
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                where = "a session key" if not path else f"a key of {_format_path(path)}"
                raise UnstorableValue(
                    f"{where} is a str with a lone surrogate (not valid UTF-8), which the session"
                    " cannot store; keys must be valid text."
                ) from None
        return
    kind = type(key)
    # The offending key is shown only when it is a number, None or an enum member (names chosen
    # in code); any other key (bytes, a custom object) might be data, so only its type is named.
    shown = isinstance(key, (int, float, Enum)) or key is None
    if not path:
        subject = f"session key {key!r}" if shown else "a session key"
        raise UnstorableValue(f"{subject} is {_describe(kind)}; {_KEY_RULE}")
    has = f"key {key!r}, {_describe(kind)}" if shown else f"a key of type {kind.__qualname__}"
    raise UnstorableValue(f"{_format_path(path)} has {has}; {_KEY_RULE}")


def _surrogate_message(path: _Path) -> str:
    return (
        f"{_format_path(path)} is a str with a lone surrogate (not valid UTF-8), which the session"
        " cannot store; store valid text (or bytes)."
    )


def _format_path(path: _Path) -> str:
    return "session" + "".join(f"[{segment!r}]" for segment in path)


def _describe(kind: type) -> str:
    """``an int``, ``a Color enum member``, ``a MyList (a list subclass)``: never the value."""
    name = kind.__qualname__
    text = f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"
    if issubclass(kind, Enum):
        return f"{text} enum member"
    for base in _SUBCLASSABLE:
        if issubclass(kind, base) and kind is not base:
            return f"{text} (a {base.__name__} subclass)"
    return text


def _advice(value: Any) -> str:
    """What to store instead, for the refusals people actually hit."""
    if isinstance(value, Enum):
        return "store its .value (or .name)"
    if isinstance(value, set | frozenset):
        return "store a list"
    if isinstance(value, bytearray | memoryview):
        return "store bytes"
    if isinstance(value, Mapping):
        return "store a dict"
    if isinstance(value, timedelta):
        return "store its total_seconds()"
    return "convert it to one of the supported types"


# --- reading ---------------------------------------------------------------------------------


def loads(raw: bytes) -> dict[str, Any]:
    """The session in a record of this format or of the previous release (plain msgpack).

    Raises ValueError for anything else (corrupt bytes, a pickle, a foreign record); the message
    carries no data. Decoding is one C call (plus a small hook per extension value): every type
    check happened in :func:`dumps`, so the per-request read stays as fast as plain msgpack.
    """
    try:
        if raw[:_MARKER_LEN] == MARKER:
            # Slicing copies, yet measured cheaper than a memoryview for session-sized records.
            return _session_decoder.decode(raw[_MARKER_LEN:])
        return _legacy_decoder.decode(raw)
    except (ValueError, ArithmeticError, RecursionError) as exc:  # msgspec.DecodeError included
        raise ValueError("not a valid session record") from exc


def unpack_value(raw: bytes) -> Any:
    """A value written by :func:`pack_value`; ValueError for anything else."""
    if raw[:_MARKER_LEN] != MARKER:
        raise ValueError("not a valid session value record")
    try:
        return _value_decoder.decode(raw[_MARKER_LEN:])
    except (ValueError, ArithmeticError, RecursionError) as exc:
        raise ValueError("not a valid session value record") from exc


def _ext_hook(code: int, data: memoryview) -> Any:
    """Rebuild an extension type; anything unexpected is a ValueError (a corrupt record)."""
    if code == EXT_TUPLE:
        return tuple(_items_decoder.decode(data))
    if code == EXT_MARKUP:
        # Safe: written only from a Markup (or an __html__ result), which vouched for it then.
        # str.__new__ skips Markup.__new__'s __html__ probe, half the cost, same (slotless) object.
        return str.__new__(Markup, str(data, "utf-8"))
    if code == EXT_UUID:
        return _uuid_decoder.decode(data)  # in C: a few times faster than uuid.UUID(bytes=...)
    if code == EXT_DATETIME:
        year, month, day, hour, minute, second, micro, fold, offset = _datetime_decoder.decode(data)
        tz = None if offset is None else _fixed_offset(offset)
        return datetime(year, month, day, hour, minute, second, micro, tz, fold=fold)
    if code == EXT_BIG_INT:
        return int.from_bytes(data, "big", signed=True)
    if code == EXT_DECIMAL:
        text = str(data, "ascii")
        # Checked first: under a decimal context that does not trap InvalidOperation, Decimal()
        # would read garbage as NaN instead of raising.
        if _DECIMAL_TEXT.fullmatch(text) is None:
            raise ValueError("not a decimal")
        return Decimal(text)
    if code == EXT_DATE:
        return date(*_date_decoder.decode(data))
    if code == EXT_TIME:
        hour, minute, second, micro, fold, offset = _time_decoder.decode(data)
        tz = None if offset is None else _fixed_offset(offset)
        return time(hour, minute, second, micro, tz, fold=fold)
    raise ValueError(f"unknown extension type {code}")


def _fixed_offset(microseconds: int) -> timezone:
    """A timezone for this UTC offset, cached: building one costs more than the datetime itself.
    The cache is bounded so that crafted records cannot grow it."""
    tz = _timezones.get(microseconds)
    if tz is None:
        tz = timezone(timedelta(microseconds=microseconds))
        if len(_timezones) < _MAX_CACHED_TIMEZONES:
            _timezones[microseconds] = tz
    return tz


def _reject_ext(code: int, data: memoryview) -> Any:
    """The previous release never wrote extension types (msgspec decodes its datetime timestamps
    itself); one in an unmarked record means a foreign record, refused now rather than as an
    unstorable ``msgspec.msgpack.Ext`` at the next write."""
    raise ValueError(f"unexpected extension type {code}")


_session_decoder: Final = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_ext_hook)
_value_decoder: Final = msgspec.msgpack.Decoder(ext_hook=_ext_hook)
_items_decoder: Final = msgspec.msgpack.Decoder(list[Any], ext_hook=_ext_hook)
_datetime_decoder: Final = msgspec.msgpack.Decoder(_DateTimeFields)
_date_decoder: Final = msgspec.msgpack.Decoder(tuple[int, int, int])
_time_decoder: Final = msgspec.msgpack.Decoder(_TimeFields)
#: What str(Decimal) writes (either exponent case: the context's ``capitals`` decides).
_DECIMAL_TEXT: Final = re.compile(
    r"-?(?:\d+(?:\.\d+)?(?:[Ee][-+]\d+)?|Infinity|s?NaN\d*)", re.ASCII
)
_uuid_decoder: Final = msgspec.msgpack.Decoder(uuid.UUID)
_timezones: Final[dict[int, timezone]] = {0: UTC}
_MAX_CACHED_TIMEZONES: Final = 256
_legacy_decoder: Final = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_reject_ext)
