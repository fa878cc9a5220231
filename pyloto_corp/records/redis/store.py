"""Redis records: one string per record, read with one command, changed by one script.

The read of a session is ``GETEX key EX lifetime``: it returns the record and slides the idle
timeout in one command, so a request that only reads the session costs one round trip
(Flask-Session rewrites the whole session after every request: GET then SET). A write is one
script call that applies only the keys the caller changed or deleted to the record as it is now,
atomically, so concurrent writers of one record that change different keys all land; it refuses
a record that no longer exists (a logout is final) or a merged record over the size limit, and
never overwrites an id when creating. Records an earlier release stored (a msgpack map) are
still read, and rewritten in this layout on their next change. A keyed-state entry is loaded by
``GETEX`` too and changed by the entry scripts (merge, lease, fenced save); lease times come
from the caller's clock (Cloud Run's are synchronised), which keeps the ACL free of ``TIME``.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from redis.sentinel import SentinelConnectionPool

from ...config.settings import REDIS
from ...errors import SessionStoreNotAnswering, SessionStoreUnavailable
from ..base import (
    RETIRED_LINGER,
    Changes,
    Done,
    Entry,
    Held,
    Lease,
    Record,
    RecordStore,
    Retired,
    UserSession,
    handle_of,
    mark_lifetime,
    new_token,
)
from .client import REDIS_PY_ERRORS, Client, ClientErrors, describe_error
from .scripts import (
    ACQUIRE_SCRIPT,
    ENTRY_MARKER,
    EXISTS_SCRIPT,
    INDEX_SCRIPT,
    LIST_SCRIPT,
    MARK_SCRIPT,
    MERGE_SCRIPT,
    PAGE,
    POP_SCRIPT,
    PTTL_SCRIPT,
    RECORD_MARKER,
    RETIRE_SCRIPT,
    RETIRED_MARKER,
    RETIRED_SUFFIX,
    SAVE_SCRIPT,
    SCRIPTS,
    WRITE_SCRIPT,
)

logger = logging.getLogger("pyloto_corp.session_store")

_LENGTH = struct.Struct(">I")


class RedisRecords(RecordStore):
    """Records through a client built per process by ``client_factory`` (or the app's own);
    ``errors`` are its library's exceptions (redis-py's or valkey-py's)."""

    backend_name = REDIS

    def __init__(
        self,
        client_factory: Callable[[], Client],
        *,
        display_url: str,
        errors: ClientErrors = REDIS_PY_ERRORS,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.errors = errors
        self._client_factory = client_factory
        #: REDIS_URL without its password, for log lines.
        self.display_url = display_url
        #: Each script's SHA1, for EVALSHA.
        self.shas = {source: _sha1(source) for source in SCRIPTS}

    @property
    def client(self) -> Client:
        """Built on first use in each process (a RedisCluster reads the slot map then)."""
        try:
            return self.process_client(self._client_factory)
        except self.errors.store as exc:
            raise self._unavailable(exc) from None

    def server_address(self) -> str | None:
        """The host of REDIS_URL (its first seed for a cluster or Sentinel)."""
        if not self.display_url.startswith(("redis", "valkey")):
            return None  # the app's own client: its address is its own business
        netloc = self.display_url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
        host = netloc.split(",", 1)[0]
        return host.rsplit(":", 1)[0].strip("[]") or None

    def has_client(self) -> bool:
        return self._client is not None

    def _unavailable(self, exc: Exception) -> SessionStoreUnavailable:
        silent = isinstance(exc, self.errors.not_answering)
        kind = SessionStoreNotAnswering if silent else SessionStoreUnavailable
        return kind(f"Redis session store at {self.display_url} failed: {describe_error(exc)}")

    def _call(self, command: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One call into the client library: whatever it raises (its own errors, or a caller's
        credential provider failing) is the store failing, SessionStoreUnavailable."""
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _script(self, source: str, keys: str | tuple[str, ...], *args: Any) -> Any:
        """EVALSHA, loading the script once when the server does not know it yet (a restart,
        a new cluster node). execute_command skips redis-py's Script wrapper (a few µs)."""
        names = (keys,) if isinstance(keys, str) else keys
        command = ("EVALSHA", self.shas[source], len(names), *names, *args)
        try:
            client: Any = self.client
            try:
                return client.execute_command(*command)
            except self.errors.no_script:
                client.script_load(source)
                return client.execute_command(*command)
        except SessionStoreUnavailable:
            raise
        except Exception as exc:
            raise self._unavailable(exc) from None

    # -- session records ---------------------------------------------------------------------------

    def read(
        self, store_id: str, lifetime: timedelta, user: str | None = None
    ) -> Record | Retired | None:
        """``GETEX``; with ``user``, pipelined with a ``GET`` of that user's revocation mark:
        two commands in one round trip (on a cluster, one to each node, sent before either
        reply is read)."""
        # execute_command skips redis-py's keyword parsing for GETEX (a few µs on every
        # request); the command sent is the same.
        client: Any = self.client
        if user is None:
            data = self._call(client.execute_command, "GETEX", store_id, "EX", _seconds(lifetime))
            mark = None
        else:
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("GETEX", store_id, "EX", _seconds(lifetime))
            pipe.execute_command("GET", self.mark_key(user))
            data, raw_mark = self._call(pipe.execute)
            mark = _time(raw_mark)
        if data is None:
            # No session: a retired id's marker, if any (a second round trip, only for an id
            # with no session: expired, retired or never issued).
            marker = self._call(client.execute_command, "GET", retired_key(store_id))
            if isinstance(marker, bytes) and marker[:2] == RETIRED_MARKER:
                return _retired(marker) if len(marker) >= _RETIRED_HEAD else None
            return None
        if data[:2] != RECORD_MARKER:
            # Stored whole by an earlier release.
            return Record(None, blob=data, mark_user=user, mark=mark)
        try:
            return Record(parse_record(data), mark_user=user, mark=mark)
        except ValueError:
            # Undecodable: decode() discards it with a warning.
            return Record(None, blob=data, mark_user=user, mark=mark)

    def create(self, store_id: str, fields: Mapping[str, bytes], lifetime: timedelta) -> bool:
        return self._apply(store_id, "create", fields, (), lifetime) == b"ok"

    def update(self, store_id: str, changes: Changes, lifetime: timedelta, stored: Record) -> bool:
        mode = "whole" if changes.whole else "merge"
        reply = self._apply(store_id, mode, changes.set, changes.delete, lifetime)
        if reply == b"format":
            # An instance of the previous release rewrote the record in its own layout while
            # this request ran (a rolling deploy): write this request's session whole.
            stored_fields = dict(stored.fields or {})
            stored_fields.update(changes.set)
            for name in changes.delete:
                stored_fields.pop(name, None)
            reply = self._apply(store_id, "whole", stored_fields, (), lifetime)
        return reply == b"ok"

    def _apply(
        self,
        store_id: str,
        mode: str,
        fields: Mapping[str, bytes],
        deleted: tuple[str, ...],
        lifetime: timedelta,
    ) -> bytes:
        milliseconds = max(1000, int(lifetime.total_seconds() * 1000))
        args: list[Any] = [milliseconds, self.max_bytes, mode, len(fields)]
        for name, raw in fields.items():
            args += (name.encode("utf-8", "surrogatepass"), raw)
        args += (name.encode("utf-8", "surrogatepass") for name in deleted)
        reply = self._script(WRITE_SCRIPT, store_id, *args)
        if isinstance(reply, int):
            self.check_size(reply)
        assert isinstance(reply, bytes)
        return reply

    def delete(self, store_id: str) -> bool:
        return bool(self._call(self.client.unlink, store_id))

    def retire(self, store_id: str, marker: Retired) -> bool:
        successor = (marker.successor or "").encode()
        data = RETIRED_MARKER + _UNTIL.pack(marker.until) + successor
        linger = int(RETIRED_LINGER.total_seconds() * 1000)
        keys = (store_id, retired_key(store_id))
        return bool(self._script(RETIRE_SCRIPT, keys, data, linger, successor))

    # -- the user index --------------------------------------------------------------------------

    def index_key(self, user: str) -> str:
        """One sorted set per user; the hash tag keeps it in one slot of a cluster."""
        digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.key_prefix}user:{{{digest}}}"

    def mark_key(self, user: str) -> str:
        """The user's revocation mark, in the slot of their index."""
        return self.index_key(user) + ":revoked"

    def revoked_at(self, user: str) -> float | None:
        return _time(self._call(self.client.get, self.mark_key(user)))

    def mark_revoked(self, user: str, at: float) -> None:
        milliseconds = int(mark_lifetime(self.absolute_lifetime) * 1000)
        self._script(MARK_SCRIPT, self.mark_key(user), repr(at), milliseconds)

    def index(self, store_id: str, user: str) -> None:
        now = time.time()
        absolute = self.absolute_lifetime.total_seconds()
        popped = self._script(
            INDEX_SCRIPT,
            self.index_key(user),
            store_id,
            repr(now),
            repr(now - absolute),
            int(absolute) + 60,
            self.max_per_user,
        )
        if popped:  # beyond SESSION_MAX_PER_USER: the user's oldest sessions end
            self._unlink(popped)

    def unindex(self, store_id: str, user: str) -> None:
        self._call(self.client.zrem, self.index_key(user), store_id)

    def find_user_sessions(self, user: str, lifetime: timedelta) -> dict[str, UserSession]:
        """The index a page at a time: each entry's ``PTTL`` (never the session's data) says
        whether it is live and when it was last used, its score when it began; entries whose
        session is gone are dropped from the index on the way."""
        client: Any = self.client
        index = self.index_key(user)
        found: dict[str, UserSession] = {}
        start = 0
        while True:
            flat = self._script(LIST_SCRIPT, index, start, start + PAGE - 1)
            members, scores = flat[0::2], flat[1::2]
            if not members:
                return found
            lefts = self._pttls(members)
            gone = []
            now, idle = time.time(), lifetime.total_seconds()
            for member, score, left in zip(members, scores, lefts, strict=True):
                if isinstance(left, int) and left > 0:
                    store_id, since = member.decode(), float(score)
                    last_seen = max(since, now - max(0.0, idle - left / 1000))
                    found[store_id] = UserSession(
                        handle_of(store_id),
                        datetime.fromtimestamp(since, UTC),
                        datetime.fromtimestamp(last_seen, UTC),
                    )
                elif left == -2:  # no such key: expired, or deleted
                    gone.append(member)
            if gone:
                self._call(client.zrem, index, *gone)
            if len(members) < PAGE:
                return found
            start += len(members) - len(gone)

    def revoke(self, user: str, keep: Collection[str], before: float) -> int:
        """Pop the index a page at a time (entries indexed before the revoke, but the kept
        ones) and unlink those sessions; the index is never deleted whole, so a login landing
        meanwhile keeps its entry (and the mark decides whether its session lives)."""
        index = self.index_key(user)
        ended = 0
        while True:
            members = self._script(POP_SCRIPT, index, repr(before), PAGE, *keep)
            if not members:
                return ended
            ended += self._unlink(members)

    def _pttls(self, keys: list[bytes]) -> list[object]:
        """Each key's PTTL: one script call (per node of a cluster)."""
        client: Any = self.client
        if not hasattr(client, "get_primaries"):
            return list(self._run(PTTL_SCRIPT, keys))
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for position, key in enumerate(keys):
            node = self._call(client.get_node_from_key, key)
            by_node.setdefault(node.name, (node, []))[1].append(position)
        lefts: list[object] = [None] * len(keys)
        for node, positions in by_node.values():
            replies = self._run(PTTL_SCRIPT, [keys[i] for i in positions], node)
            for position, left in zip(positions, replies, strict=True):
                lefts[position] = left
        return lefts

    def _run(self, source: str, keys: list[bytes], node: Any = None) -> Any:
        """EVALSHA with many keys as arguments (on ``node`` of a cluster), loading the script
        when the server does not know it yet."""
        client: Any = self.client
        target = {} if node is None else {"target_nodes": node}
        command = ("EVALSHA", self.shas[source], 0, *keys)
        try:
            try:
                return client.execute_command(*command, **target)
            except self.errors.no_script:
                client.execute_command("SCRIPT LOAD", source, **target)
                return client.execute_command(*command, **target)
        except Exception as exc:
            raise self._unavailable(exc) from None

    def _unlink(self, keys: list[bytes]) -> int:
        """UNLINK many session keys: one command on one node; on a cluster one per key in a
        pipeline (redis-py would otherwise send one command per slot, one after another)."""
        client: Any = self.client
        if not hasattr(client, "get_primaries"):
            return int(self._call(client.unlink, *keys))
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.execute_command("UNLINK", key)
        return sum(int(n) for n in self._call(pipe.execute))

    def ping(self) -> dict[str, object]:
        """The topology, proven to answer: every primary of a cluster (and all 16384 slots
        covered), the current primary of a Sentinel service; and the eviction policy (see
        :meth:`_eviction_facts`)."""
        client: Any = self.client
        if hasattr(client, "get_primaries"):  # RedisCluster, ValkeyCluster
            facts = self._ping_cluster(client)
            return facts | self._eviction_facts(
                lambda: client.info("memory", target_nodes=type(client).PRIMARIES)
            )
        self._call(client.ping)
        pool = getattr(client, "connection_pool", None)
        if isinstance(pool, SentinelConnectionPool):
            host, port = self._call(pool.get_master_address)
            facts = {"topology": "sentinel", "primary": f"{host}:{port}"}
        else:
            facts = {"topology": "standalone"}
        return facts | self._eviction_facts(lambda: client.info("memory"))

    _policy_warned = False

    def _eviction_facts(self, info_memory: Callable[[], Any]) -> dict[str, object]:
        """``maxmemory_policy`` as ``INFO memory`` reports it (INFO needs no CONFIG permission,
        which Memorystore and ACL users lack; a server that refuses INFO too says ``unknown``).
        A policy that may evict signed-in users' sessions while anonymous ones remain (any
        LRU, LFU or random one, Memorystore's default ``volatile-lru`` included) adds a
        ``maxmemory_policy_warning`` and is logged once per process: ``volatile-ttl`` evicts
        the shortest-lived keys first, which are the anonymous sessions."""
        try:
            reply = info_memory()
        except self.errors.store as exc:
            if not _is_refusal(exc):
                raise self._unavailable(exc) from None
            return {"maxmemory_policy": "unknown (INFO refused)"}
        except Exception as exc:
            raise self._unavailable(exc) from None
        # A cluster answers per primary ({node: info}); one server answers its info.
        infos = [reply] if "maxmemory_policy" in reply else list(reply.values())
        policies = sorted({str(info.get("maxmemory_policy", "unknown")) for info in infos})
        facts: dict[str, object] = {"maxmemory_policy": ",".join(policies)}
        risky = [policy for policy in policies if policy.endswith(EVICTS_BY_USE)]
        if risky:
            warning = (
                f"maxmemory-policy {','.join(risky)} may evict signed-in users' sessions (logging "
                "them out) while anonymous ones remain when the store is full; set "
                "maxmemory-policy volatile-ttl (anonymous sessions, the shortest-lived, go first)"
            )
            facts["maxmemory_policy_warning"] = warning
            if not self._policy_warned:
                self._policy_warned = True
                logger.warning("Redis session store at %s: %s", self.display_url, warning)
        return facts

    def _ping_cluster(self, client: Any) -> dict[str, object]:
        primaries = self._call(client.get_primaries)
        answering = 0
        for node in primaries:
            try:
                client.ping(target_nodes=node)
                answering += 1
            except self.errors.store:
                continue
        slots = self._call(client.cluster_slots, target_nodes=type(client).RANDOM)
        covered = sum(int(end) - int(start) + 1 for start, end in slots)
        facts: dict[str, object] = {
            "topology": "cluster",
            "primaries": len(primaries),
            "primaries_answering": answering,
            "slots_covered": covered,
        }
        if answering < len(primaries) or covered < 16384:
            raise SessionStoreUnavailable(
                f"Redis session store at {self.display_url}: cluster degraded "
                f"({answering} of {len(primaries)} primaries answer, {covered} of 16384 slots "
                "covered)"
            )
        return facts

    # -- entries (keyed state) ---------------------------------------------------------------------

    @staticmethod
    def _entry(data: object) -> Entry | None:
        """The entry stored; None when absent or holding no key (only a lease)."""
        if not isinstance(data, bytes):
            return None
        try:
            entry = parse_entry(data)
        except ValueError:
            raise _not_ours() from None
        return entry if entry.fields else None

    def _checked(self, reply: object) -> bytes:
        if isinstance(reply, int):
            self.check_size(reply)
        assert isinstance(reply, bytes), reply
        if reply == b"format":
            raise _not_ours()
        return reply

    def load(self, key: str, lifetime: timedelta) -> Entry | None:
        client: Any = self.client
        data = self._call(client.execute_command, "GETEX", key, "PX", _ms(lifetime))
        return self._entry(data)

    def exists(self, key: str) -> bool:
        return bool(self._script(EXISTS_SCRIPT, key))

    def merge(
        self,
        key: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
        *,
        loaded: Mapping[str, bytes] | None = None,
    ) -> None:
        args = [_now_ms(), _ms(lifetime), self.max_bytes, "merge", *_changes(changed, deleted)]
        self._checked(self._script(MERGE_SCRIPT, key, *args))

    def fill(self, key: str, fields: Mapping[str, bytes], lifetime: timedelta) -> None:
        args = [_now_ms(), _ms(lifetime), self.max_bytes, "fill", *_changes(fields, ())]
        self._checked(self._script(MERGE_SCRIPT, key, *args))

    def acquire(
        self, key: str, lease: timedelta, lifetime: timedelta, *, done: str | None = None
    ) -> Lease | Held | Done:
        token = new_token()
        args = (_now_ms(), _ms(lease), _ms(lifetime), token, (done or "").encode())
        status, detail = self._script(ACQUIRE_SCRIPT, key, *args)
        if status == b"held":
            return Held(int(detail) / 1000)
        if status == b"format":
            raise _not_ours()
        entry = self._entry(detail)
        if status == b"done" and entry is not None:
            return Done(entry)
        return Lease(token, entry)

    def save(
        self,
        key: str,
        token: str,
        changed: Mapping[str, bytes],
        deleted: Collection[str],
        lifetime: timedelta,
    ) -> bool:
        args = [_now_ms(), _ms(lifetime), self.max_bytes, token, *_changes(changed, deleted)]
        return self._checked(self._script(SAVE_SCRIPT, key, *args)) == b"ok"


#: Eviction policies that choose by use (or at random), not by expiry: under memory pressure
#: they evict a signed-in user who has been idle a while before a flood of fresh anonymous
#: sessions.
EVICTS_BY_USE: Final = ("-lru", "-lfu", "-random")


def _is_refusal(exc: BaseException) -> bool:
    """The server refused the command (an ACL without it, a managed service that renamed it),
    as opposed to not answering: redis-py's and valkey-py's ResponseError and subclasses."""
    return any(cls.__name__ == "ResponseError" for cls in type(exc).__mro__)


def parse_record(data: bytes) -> dict[str, bytes]:
    """A record in this release's layout: each key's encoded value. ValueError when the
    framing is broken."""
    return parse_fields(data, len(RECORD_MARKER))


def retired_key(store_id: str) -> str:
    """The key of a retired id's marker: in the session key's cluster slot, so one script
    deletes the one and writes the other. A session key hashes whole unless it holds a hash
    tag (a ``{...}`` in ``SESSION_KEY_PREFIX``): then the tag decides both."""
    start = store_id.find("{")
    if start != -1 and store_id.find("}", start + 1) > start + 1:
        return store_id + RETIRED_SUFFIX
    return "{" + store_id + "}" + RETIRED_SUFFIX


_UNTIL = struct.Struct(">d")
_RETIRED_HEAD = len(RETIRED_MARKER) + _UNTIL.size


def _retired(data: bytes) -> Retired:
    (until,) = _UNTIL.unpack_from(data, len(RETIRED_MARKER))
    successor = data[_RETIRED_HEAD:].decode("utf-8", "replace")
    return Retired(successor or None, until)


def _time(raw: object) -> float | None:
    """A stored revocation mark (text of a float); None when absent or not a number."""
    if not isinstance(raw, bytes):
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value else None  # NaN: no mark a session could be before


def _seconds(lifetime: timedelta) -> int:
    return max(1, int(lifetime.total_seconds()))


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


def _ms(duration: timedelta) -> int:
    return max(1, int(duration.total_seconds() * 1000))


def _changes(changed: Mapping[str, bytes], deleted: Collection[str]) -> list[Any]:
    args: list[Any] = [len(changed)]
    for name, raw in changed.items():
        args += (name.encode("utf-8", "surrogatepass"), raw)
    args += (name.encode("utf-8", "surrogatepass") for name in deleted)
    return args


def _not_ours() -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        "Redis record store: a stored record is not in the keyed-state layout (another program "
        "writes under SESSION_KEY_PREFIX?); remove it with `flask session-store state delete`"
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
