"""The Lua scripts, in one place, and the layouts they read and write.

A session record is one string: :data:`RECORD_MARKER`, then for each top-level key its name and
its encoded value, each behind its length (4 bytes, big-endian), a framing simple enough for a
Lua script to take apart. A keyed-state entry has the same framing behind
:data:`ENTRY_MARKER` and its lease. Every script touches one key (or keys of one slot), so it
runs unchanged on a Redis Cluster, and uses only commands the app never sends itself (see
tests/redis_commands.py), so each call counts as one round trip.
"""

from __future__ import annotations

from typing import Final

#: The first bytes of a record in this layout (0xc1 is a byte msgpack never uses, so no record
#: of an earlier release, a msgpack map, starts with it).
RECORD_MARKER: Final = b"\xc1\x02"
#: The marker a login or a logout leaves for a retired id (``base.Retired``) is a key of its own,
#: in the session key's cluster slot (:func:`retired_key`): these bytes, the time it stops
#: counting (8 bytes, a big-endian double), then the store id the session moved to (empty after
#: a logout). The session key itself is deleted, so every release's write script, this one's
#: and the previous one's, finds the session gone.
RETIRED_MARKER: Final = b"\xc1\x03"
RETIRED_SUFFIX: Final = "~retired"

#: KEYS[1] the session; ARGV: lifetime (ms), max bytes, mode, number of keys set, then the keys
#: and values set, then the keys deleted. Modes: 'create' (only if absent), 'whole' (replace an
#: existing record), 'merge' (apply to an existing record in this layout). Returns 'ok', 'gone',
#: 'taken', 'format' (merge, but the record is an earlier release's: write it whole) or the
#: merged size when it exceeds the limit (nothing written then). The size counts the framing
#: (what the record takes stored), and a stored record already over the limit (planted: no write
#: makes one) is refused by its length before it is read or parsed, so no record costs Redis more
#: than the limit's worth of work. Declared with a shebang (Redis 7+), so an out-of-memory server
#: refuses it before it starts, never half-way. It uses only commands the app never sends itself
#: (STRLEN, GETRANGE, PSETEX), so each call counts as one round trip.
WRITE_SCRIPT = """#!lua
local key, ttl, limit, mode = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local count = tonumber(ARGV[4])
local marker = '\\193\\002'
local exists = redis.call('EXISTS', key) == 1
if mode == 'create' then
  if exists then return 'taken' end
elseif not exists then
  return 'gone'
end
local values, order = {}, {}
if mode == 'merge' then
  local length = redis.call('STRLEN', key)
  if length > limit then return length end
  local stored = redis.call('GETRANGE', key, 0, -1)
  if string.sub(stored, 1, 2) ~= marker then return 'format' end
  local at = 3
  while at <= #stored do
    local size, name_at = struct.unpack('>I4', stored, at)
    local name = string.sub(stored, name_at, name_at + size - 1)
    local length, value_at = struct.unpack('>I4', stored, name_at + size)
    values[name] = string.sub(stored, value_at, value_at + length - 1)
    order[#order + 1] = name
    at = value_at + length
  end
end
local first_deleted = 5 + 2 * count
for i = 5, first_deleted - 1, 2 do
  if values[ARGV[i]] == nil then order[#order + 1] = ARGV[i] end
  values[ARGV[i]] = ARGV[i + 1]
end
for i = first_deleted, #ARGV do
  values[ARGV[i]] = nil
end
local parts, total = {marker}, #marker
for _, name in ipairs(order) do
  local value = values[name]
  if value then
    parts[#parts + 1] = struct.pack('>I4', #name) .. name .. struct.pack('>I4', #value) .. value
    total = total + 8 + #name + #value
  end
end
if total > limit then return total end
redis.call('PSETEX', key, ttl, table.concat(parts))
return 'ok'
"""

#: KEYS[1] the session, KEYS[2] its marker key; ARGV: the marker, its lifetime (ms), the
#: successor's store id. Deletes a live record (in any release's layout) and writes the marker:
#: 1. The id absent: 0, unless the marker already names this successor (this very call, retried
#: after a dropped connection): 1. Runs DEL, never sent by the app, to count as one round trip.
RETIRE_SCRIPT = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[3] ~= '' and redis.call('GETRANGE', KEYS[2], 10, -1) == ARGV[3] then return 1 end
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('PSETEX', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

#: KEYS[1] a user's index (a sorted set of store ids scored by login time); ARGV: the store id,
#: now, the oldest login time that can still be live (now - absolute lifetime), the index's own
#: lifetime, and the cap on entries (0: none). Entries past the absolute lifetime are dropped
#: here, and the oldest beyond the cap popped and returned (the caller ends those sessions), so
#: the index stays bounded. The index only lists: a revoke is final through the user's mark.
INDEX_SCRIPT = """#!lua
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local cap = tonumber(ARGV[5])
if cap > 0 then
  local over = redis.call('ZCARD', KEYS[1]) - cap
  if over > 0 then
    local popped, members = redis.call('ZPOPMIN', KEYS[1], over), {}
    for i = 1, #popped, 2 do members[#members + 1] = popped[i] end
    return members
  end
end
return {}
"""

#: KEYS[1] a user's revocation mark; ARGV: the revoke's time, the mark's lifetime (ms). A script
#: only so that the store's ACL user needs no SET (its scripts already PSETEX).
MARK_SCRIPT = """#!lua
redis.call('PSETEX', KEYS[1], ARGV[2], ARGV[1])
return 1
"""

#: KEYS[1] a user's index; ARGV: the revoke's time, a page size, then the store ids to keep.
#: Removes and returns up to a page of entries indexed before the revoke (never the kept ones):
#: the caller unlinks those sessions, then asks for the next page, so neither the index nor the
#: reply is ever handled whole, and an entry added meanwhile (a login after the revoke) stays.
POP_SCRIPT = """#!lua
local page, keep = tonumber(ARGV[2]), {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local limit = page + #ARGV - 2
local members = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, limit)
local out = {}
for _, member in ipairs(members) do
  if not keep[member] and #out < page then out[#out + 1] = member end
end
if #out > 0 then redis.call('ZREM', KEYS[1], unpack(out)) end
return out
"""

#: ARGV: session keys (all on the node it runs on, on a cluster); each one's PTTL, in order.
#: One command per page of a listing, however many keys, and a reply hiredis parses in C
#: (per-key commands cost redis-py ~20-60 µs each in Python). The keys are arguments, not
#: declared keys: a cluster refuses declared keys of several slots, and allows a script with
#: allow-cross-slot-keys to read keys of any slot its node serves.
PTTL_SCRIPT = """#!lua flags=no-writes,allow-cross-slot-keys
local out = {}
for i, key in ipairs(ARGV) do out[i] = redis.call('PTTL', key) end
return out
"""

#: KEYS[1] a user's index; ARGV: first and last rank. A page of entries and their scores, as one
#: flat reply (redis-py pairs a ZRANGE WITHSCORES reply in Python, ~2.5 µs an entry).
LIST_SCRIPT = """#!lua flags=no-writes
return redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2], 'WITHSCORES')
"""

#: Index entries handled per round trip when listing or revoking (bounds time and memory per
#: step whatever the index holds).
PAGE = 5000


#: The first bytes of a keyed-state record (0xc1 is a byte msgpack never uses; 0x02 starts a
#: session record, 0x03 a retired id's marker).
ENTRY_MARKER: Final = b"\xc1\x04"

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
local function apply(values, order, first, fill)
  local first_deleted = first + 1 + 2 * tonumber(ARGV[first])
  for i = first + 1, first_deleted - 1, 2 do
    if values[ARGV[i]] == nil then
      order[#order + 1] = ARGV[i]
      values[ARGV[i]] = ARGV[i + 1]
    elseif not fill then
      values[ARGV[i]] = ARGV[i + 1]
    end
  end
  for i = first_deleted, #ARGV do values[ARGV[i]] = nil end
  return tonumber(ARGV[first]) > 0
end
local function pack(values, order, fence, until_ms)
  local parts = {marker, struct.pack('>I4', #fence) .. fence .. struct.pack('>d', until_ms)}
  local total, count = 2 + 4 + 32 + 8, 0
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

#: KEYS[1] the record; ARGV: now (ms), lifetime (ms), max bytes, 'merge' or 'fill' (set only
#: the keys the entry does not hold), then the changes (see _LUA_RECORD's apply). Creates the
#: record if absent; deletes it when no key and no running lease remain. The size is checked
#: when keys are set (the lease counts as a full token, held or not: a save or a release never
#: finds a size an earlier write accepted too large). Returns 'ok', 'format' (not a keyed-state
#: record) or the size refused.
MERGE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local values, order, fence, until_ms = parse(stored(KEYS[1]))
if values == nil then return 'format' end
local sets = apply(values, order, 5, ARGV[4] == 'fill')
local data, total, count = pack(values, order, fence, until_ms)
if sets and total > tonumber(ARGV[3]) then return total end
if count == 0 and until_ms <= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
else
  redis.call('PSETEX', KEYS[1], ARGV[2], data)
end
return 'ok'
"""
)

#: KEYS[1] the record; ARGV: now (ms), lease (ms), lifetime (ms), the new fencing token, the
#: ``done`` key (or ''). Returns {'done', the record} when it holds that key (nothing written);
#: {'held', ms left} while another lease runs; else takes the lease and returns {'ok', the
#: record as it was (false when absent)}. An entry with no key yet is kept for the lifetime
#: too (a slow holder nobody took over still saves); loads read it as no entry.
ACQUIRE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local before = stored(KEYS[1])
local values, order, fence, until_ms = parse(before)
if values == nil then return {'format', 0} end
if ARGV[5] ~= '' and values[ARGV[5]] ~= nil then return {'done', before} end
local now = tonumber(ARGV[1])
if until_ms > now then return {'held', math.ceil(until_ms - now)} end
local data = pack(values, order, ARGV[4], now + tonumber(ARGV[2]))
redis.call('PSETEX', KEYS[1], math.max(tonumber(ARGV[2]), tonumber(ARGV[3])), data)
return {'ok', before}
"""
)

#: KEYS[1] the record; ARGV: now (ms), lifetime (ms), max bytes, the holder's fencing token,
#: then the changes. Only while the token is the record's: applies them, releases the lease;
#: returns 'ok', 'lost' (nothing written) or the size refused (only when keys are set).
SAVE_SCRIPT = (
    "#!lua\n"
    + _LUA_RECORD
    + """
local values, order, fence, until_ms = parse(stored(KEYS[1]))
if values == nil or fence ~= ARGV[4] then return 'lost' end
local sets = apply(values, order, 5, false)
local data, total, count = pack(values, order, fence, 0)
if sets and total > tonumber(ARGV[3]) then return total end
if count == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('PSETEX', KEYS[1], ARGV[2], data)
end
return 'ok'
"""
)

#: KEYS[1] the record: 1 if it holds a key. A script so that the app never sends EXISTS itself.
EXISTS_SCRIPT = (
    "#!lua flags=no-writes\n"
    + _LUA_RECORD
    + """
local values = parse(stored(KEYS[1]))
if values == nil or next(values) == nil then return 0 end
return 1
"""
)

#: Every script this backend runs (their SHA1s are computed once per store).
SCRIPTS: Final = (
    WRITE_SCRIPT,
    RETIRE_SCRIPT,
    INDEX_SCRIPT,
    MARK_SCRIPT,
    POP_SCRIPT,
    PTTL_SCRIPT,
    LIST_SCRIPT,
    MERGE_SCRIPT,
    ACQUIRE_SCRIPT,
    SAVE_SCRIPT,
    EXISTS_SCRIPT,
)
