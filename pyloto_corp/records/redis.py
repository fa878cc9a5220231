"""Records on Redis (standalone, Cluster, Sentinel, Valkey, Memorystore): one string per
record, loaded with one ``GETEX`` (which slides its expiry), changed by one script.

A record is :data:`ENTRY_MARKER`, its lease (the fencing token behind its length, then the
time the lease runs out, ms since the epoch, a big-endian double; 0 when released), then each
key's name and encoded value behind their lengths (4 bytes, big-endian): the framing of a
session record, simple enough for a Lua script to take apart and merge. Every script touches
one key, so it runs unchanged on a cluster, and uses only commands the app never sends itself
(see tests/redis_commands.py), so each call counts as one round trip. Lease times come from the
caller's clock (Cloud Run's are synchronised), which keeps the store's ACL free of ``TIME``.

The client, and what its errors mean, belong to the caller (the session backend builds it from
REDIS_URL, or is given one): this module only sends commands.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Collection, Mapping
from datetime import timedelta
from typing import Any, Final

from ..config.settings import REDIS
from ..errors import SessionStoreUnavailable
from .base import Entry, Held, Lease, RecordStore, new_token
from .memory import too_large

#: The first bytes of a keyed-state record (0xc1 is a byte msgpack never uses; 0x02 starts a
#: session record, 0x03 a retired id's marker).
ENTRY_MARKER: Final = b"\xc1\x04"

_LENGTH = struct.Struct(">I")
_UNTIL = struct.Struct(">d")

#: Lua shared by the scripts: parse a record, apply ARGV's changes from a position (a count of
#: keys set, the keys and values, then the keys deleted), pack it back with its size and count.
_LUA_RECORD = """
local marker = '\\193\\004'
local function parse(stored)
  local values, order = {}, {}
  if stored == false then return values, order, '', 0 end
  if string.sub(stored, 1, 2) ~= marker then return nil end
  local fence_length, at = struct.unpack('>I4', stored, 3)
  local fence = string.sub(stored, at, at + fence_length - 1)
  local until_ms
  until_ms, at = struct.unpack('>d', stored, at + fence_length)
  while at <= #stored do
    local size, name_at = struct.unpack('>I4', stored, at)
    local name = string.sub(stored, name_at, name_at + size - 1)
    local length, value_at = struct.unpack('>I4', stored, name_at + size)
    values[name] = string.sub(stored, value_at, value_at + length - 1)
    order[#order + 1] = name
    at = value_at + length
  end
  return values, order, fence, until_ms
end
local function apply(values, order, first)
  local first_deleted = first + 1 + 2 * tonumber(ARGV[first])
  for i = first + 1, first_deleted - 1, 2 do
    if values[ARGV[i]] == nil then order[#order + 1] = ARGV[i] end
    values[ARGV[i]] = ARGV[i + 1]
  end
  for i = first_deleted, #ARGV do values[ARGV[i]] = nil end
end
local function pack(values, order, fence, until_ms)
  local parts = {marker, struct.pack('>I4', #fence) .. fence .. struct.pack('>d', until_ms)}
  local total, count = 14 + #fence, 0
  for _, name in ipairs(order) do
    local value = values[name]
    if value then
      parts[#parts + 1] = struct.pack('>I4', #name) .. name .. struct.pack('>I4', #value) .. value
      total, count = total + 8 + #name + #value, count + 1
    end
  end
  return table.concat(parts), total, count
end
local function stored(key)
  if redis.call('EXISTS', key) == 0 then return false end
  return redis.call('GETRANGE', key, 0, -1)
end
"""

#: KEYS[1] the record; ARGV: now (ms), lifetime (ms), max bytes, then the changes (see
#: _LUA_RECORD's apply). Creates the record if absent; deletes it when no key and no running
#: lease remain. Returns 'ok', 'format' (not a keyed-state record) or the size refused.
MERGE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local values, order, fence, until_ms = parse(stored(KEYS[1]))
if values == nil then return 'format' end
apply(values, order, 4)
local data, total, count = pack(values, order, fence, until_ms)
if total > tonumber(ARGV[3]) then return total end
if count == 0 and until_ms <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
else
  redis.call('PSETEX', KEYS[1], ARGV[2], data)
end
return 'ok'
"""
)

#: KEYS[1] the record; ARGV: now (ms), lease (ms), lifetime (ms), the new fencing token.
#: Returns {'held', ms left} while another lease runs; else takes the lease and returns
#: {'ok', the record as it was (false when absent)}.
ACQUIRE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local before = stored(KEYS[1])
local values, order, fence, until_ms = parse(before)
if values == nil then return {'format', 0} end
local now = tonumber(ARGV[1])
if until_ms > now then return {'held', math.ceil(until_ms - now)} end
local data = pack(values, order, ARGV[4], now + tonumber(ARGV[2]))
redis.call('PSETEX', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(ARGV[3])), data)
return {'ok', before}
"""
)

#: KEYS[1] the record; ARGV: now (ms), lifetime (ms), max bytes, the holder's fencing token,
#: then the changes. Only while the token is the record's: applies them, releases the lease;
#: returns 'ok', 'lost' (nothing written) or the size refused.
SAVE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local values, order, fence, until_ms = parse(stored(KEYS[1]))
if values == nil or fence ~= ARGV[4] then return 'lost' end
apply(values, order, 5)
local data, total, count = pack(values, order, fence, 0)
if total > tonumber(ARGV[3]) then return total end
if count == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('PSETEX', KEYS[1], ARGV[2], data)
end
return 'ok'
"""
)

#: KEYS[1] the record: 1 if it exists. A script so that the app itself never sends EXISTS.
EXISTS_SCRIPT = """#!lua flags=no-writes
return redis.call('EXISTS', KEYS[1])
"""

SCRIPTS: Final = (MERGE_SCRIPT, ACQUIRE_SCRIPT, SAVE_SCRIPT, EXISTS_SCRIPT)


def parse_fields(data: bytes, at: int) -> dict[str, bytes]:
    """Each key's encoded value, framed from ``at`` to the end; ValueError when broken."""
    fields: dict[str, bytes] = {}
    unpack, end = _LENGTH.unpack_from, len(data)
    try:
        while at < end:
            (size,) = unpack(data, at)
            name = data[at + 4 : at + 4 + size].decode("utf-8", "surrogatepass")
            (length,) = unpack(data, at + 4 + size)
            at += 8 + size + length
            if at > end:
                raise ValueError("truncated record")
            fields[name] = data[at - length : at]
    except (struct.error, UnicodeDecodeError):
        raise ValueError("malformed record") from None
    return fields


def parse_entry(data: bytes) -> Entry:
    """A keyed-state record; ValueError when it is not one, or broken."""
    if data[:2] != ENTRY_MARKER:
        raise ValueError("not a keyed-state record")
    try:
        (fence_length,) = _LENGTH.unpack_from(data, 2)
        fence = data[6 : 6 + fence_length].decode("ascii")
        (until_ms,) = _UNTIL.unpack_from(data, 6 + fence_length)
    except (struct.error, UnicodeDecodeError):
        raise ValueError("malformed record") from None
    fields = parse_fields(data, 14 + fence_length)
    return Entry(fields, fence, until_ms / 1000)


def sha1(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def _ms(duration: timedelta) -> int:
    return max(1, int(duration.total_seconds() * 1000))


def _changes(changed: Mapping[str, bytes], deleted: Collection[str]) -> list[Any]:
    args: list[Any] = [len(changed)]
    for name, raw in changed.items():
        args += (name.encode("utf-8", "surrogatepass"), raw)
    args += (name.encode("utf-8", "surrogatepass") for name in deleted)
    return args


class RedisRecords(RecordStore):
    """Records through a client the caller holds: ``client()`` returns it (built per process),
    ``unavailable`` turns whatever the client library raised into the store's error, and
    ``no_script`` is that library's NOSCRIPT error (redis-py's or valkey-py's)."""

    backend_name = REDIS

    def __init__(
        self,
        client: Callable[[], Any],
        *,
        max_bytes: int,
        unavailable: Callable[[Exception], SessionStoreUnavailable],
        no_script: type[Exception],
        scripts: Collection[str] = (),
    ) -> None:
        self._client = client
        self.max_bytes = max_bytes
        self._unavailable = unavailable
        self._no_script = no_script
        #: Each script's SHA1, for EVALSHA.
        self.shas = {source: sha1(source) for source in (*SCRIPTS, *scripts)}

    def call(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call into the client library: whatever it raises (its own errors, or a caller's
        credential provider failing) is the store failing, SessionStoreUnavailable."""
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def script(self, source: str, keys: str | tuple[str, ...], *args: Any) -> Any:
        """EVALSHA, loading the script once when the server does not know it yet (a restart,
        a new cluster node). execute_command skips redis-py's Script wrapper (a few µs)."""
        names = (keys,) if isinstance(keys, str) else keys
        command = ("EVALSHA", self.shas[source], len(names), *names, *args)
        try:
            client = self._client()
            try:
                return client.execute_command(*command)
            except self._no_script:
                client.script_load(source)
                return client.execute_command(*command)
        except SessionStoreUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None

    @staticmethod
    def _entry(data: object) -> Entry | None:
        if not isinstance(data, bytes):
            return None
        try:
            return parse_entry(data)
        except ValueError:
            raise _not_ours() from None

    def _checked(self, reply: object) -> bytes:
        if isinstance(reply, int):
            raise too_large(reply, self.max_bytes)
        assert isinstance(reply, bytes), reply
        if reply == b"format":
            raise _not_ours()
        return reply

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        client = self._client()
        data = self.call(client.execute_command, "GETEX", key, "PX", _ms(lifetime))
        return self._entry(data)

    def exists(self, key: str) -> bool:
        return bool(self.script(EXISTS_SCRIPT, key))

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        fresh: bool = False,
    ) -> None:
        args = [_now_ms(), _ms(lifetime), self.max_bytes, *_changes(changed, deleted)]
        self._checked(self.script(MERGE_SCRIPT, key, *args))

    def delete(self, key: str) -> bool:
        client = self._client()
        return bool(self.call(client.unlink, key))

    def acquire(self, key: str, lease: timedelta, lifetime: timedelta) -> Lease | Held:
        token = new_token()
        args = (_now_ms(), _ms(lease), _ms(lifetime), token)
        status, detail = self.script(ACQUIRE_SCRIPT, key, *args)
        if status == b"held":
            return Held(int(detail) / 1000)
        if status == b"format":
            raise _not_ours()
        return Lease(token, self._entry(detail))

    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        args = [_now_ms(), _ms(lifetime), self.max_bytes, token, *_changes(changed, deleted)]
        return self._checked(self.script(SAVE_SCRIPT, key, *args)) == b"ok"

    def ping(self) -> dict[str, object]:
        client = self._client()
        self.call(client.ping)
        return {}


def _not_ours() -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        "Redis record store: a stored record is not in the keyed-state layout (another program "
        "writes under SESSION_KEY_PREFIX?); remove it with `flask session-store state delete`"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
