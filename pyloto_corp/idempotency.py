"""Exactly-once webhooks and tasks: idempotency keys on the app's record store.

A WhatsApp webhook, a Cloud Tasks task, a client's retried POST: each may arrive twice, on two
instances at once. An idempotency record is a keyed-state entry (``pyloto_corp.records``) that
is either *in progress* (a lease with a fencing token: its holder runs the work) or *completed*
(the work's result, kept for ``lifetime``):

- :func:`claim` for workers: ``with claim("wa-message", message_id) as job:`` runs the block
  only where no other caller holds or completed the id; ``job.complete(result)`` marks it done
  once the work committed. Leaving the block by an exception, or without ``complete()``,
  releases the claim, so a retry runs the work again (a crash never reads as "done").
- :func:`idempotent` for Flask views (the IETF draft "The Idempotency-Key HTTP Header Field"):
  the first request with a key runs the view and stores its response; a repeat gets that
  response again (``Idempotent-Replayed: true``) without running the view; a repeat while the
  first runs gets 409, another payload under the same key 422, no key 400.

A claim is one round trip (the lease taken with the load, or the completed record returned
without taking it), a completion one more. A claim whose holder died is taken over when its
lease runs out, by the store's conditional write: two takers cannot both run. A slow holder
whose lease ran out while nobody took over still completes; one that was taken over has its
completion dropped (the other holder's stands). A store that is down raises
``SessionStoreUnavailable`` (a view answers 503 with ``Retry-After``): never "not seen", which
would run the work twice. A view whose response cannot be stored (the store failed after the
view ran) still answers what it answered. Keys are HMACs of the namespace and the key under
SECRET_KEY (see ``pyloto_corp.state``); a payload fingerprint is a hash, never the body.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar, cast

from flask import Response, current_app, jsonify, make_response, request

from .errors import LeaseLost, SessionStoreUnavailable, SessionTooLarge, StateBusy
from .records import codec
from .records.base import Done, Entry, Held, Lease
from .state import _Bound, _duration, bind
from .telemetry import count_answer

logger = logging.getLogger("pyloto_corp.idempotency")

F = TypeVar("F", bound=Callable[..., Any])

#: The record key holding a completed claim's result; its presence means "completed".
RESULT = "result"
#: The record key holding the fingerprint of the request that claimed a view's key.
FINGERPRINT = "fingerprint"
#: The header a client sends its key in (IETF draft), and the one a replay carries.
KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
#: Set on a replay whose body was over the storage cap when it was first sent (not kept).
OMITTED_HEADER = "Idempotent-Body-Omitted"
#: The longest key accepted (IETF draft's examples are UUIDs; 255 leaves room for any scheme).
MAX_KEY_LENGTH = 255
#: Response headers kept with the response and replayed; never Set-Cookie (a session's).
REPLAYED_HEADERS = frozenset(
    {
        "content-type",
        "content-language",
        "content-location",
        "location",
        "etag",
        "last-modified",
        "link",
        "cache-control",
    }
)
#: Room left in a record for everything but a stored response's body.
RECORD_ROOM = 4096


@dataclass
class Job:
    """A claimed id: ``completed`` (and its ``result``) when the work was done before; else the
    caller holds the claim and calls :meth:`complete` once its work committed."""

    completed: bool
    result: Any = None
    _bound: _Bound | None = field(default=None, repr=False)
    _token: str = field(default="", repr=False)
    _lifetime: timedelta = field(default=timedelta(hours=24), repr=False)
    _done: bool = field(default=False, repr=False)

    def complete(self, result: Any = None) -> None:
        """The work committed: store ``result`` (any value a session may hold) as completed and
        release the claim, in one round trip. Raises LeaseLost when the claim ran out and
        another caller took it over (this completion is dropped; theirs stands)."""
        if self.completed or self._bound is None:
            raise RuntimeError("complete() on a job that was completed before: nothing to do")
        if self._done:
            raise RuntimeError("complete() was already called for this job")
        bound = self._bound
        raw = codec.pack_value(RESULT, result)
        with bound.interface.breaker.guard(admit=False):
            saved = bound.store.save(bound.keys[0], self._token, {RESULT: raw}, (), self._lifetime)
        self._done = True
        if not saved:
            raise LeaseLost(
                "the claim ran out and another caller took it over: this completion was "
                "dropped; use a longer lease= for work this long"
            )


def _check_key(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise ValueError(f"{name} must be a non-empty str of at most 1024 characters")
    return value


def _check_lease(lease: timedelta, lifetime: timedelta) -> None:
    if lease > lifetime:
        raise ValueError(
            "lease must not be longer than lifetime: the record would expire under its holder"
        )


def _take(bound: _Bound, lease: timedelta, lifetime: timedelta) -> Lease | Held | Done:
    """The claim on the current key; a completed record under a key of SECRET_KEY_FALLBACKS
    (written before a key rotation) counts too."""
    with bound.interface.breaker.guard():
        taken = bound.store.acquire(bound.keys[0], lease, lifetime, done=RESULT)
        if not isinstance(taken, Lease) or taken.entry is not None or len(bound.keys) == 1:
            return taken
        for key in bound.keys[1:]:
            old = bound.store.load(key, lifetime)
            if old is not None and RESULT in old.fields:
                bound.store.release(bound.keys[0], taken.token, lifetime)
                return Done(old)
    return taken


@contextmanager
def claim(
    namespace: str,
    key: str,
    *,
    lease: timedelta = timedelta(minutes=2),
    lifetime: timedelta = timedelta(hours=24),
) -> Iterator[Job]:
    """Claim ``key`` in ``namespace`` (``claim("wa-message", message_id)``) for the block.

    The job is ``completed`` (with its ``result``) when the work was done before: skip it. Else
    this caller holds the claim for ``lease``: do the work, commit it, then ``job.complete()``.
    Held by another caller: :class:`~pyloto_corp.errors.StateBusy` at once (retry the task
    later). Leaving the block by an exception, or without ``complete()``, releases the claim.
    """
    lease = _duration("lease", lease)
    lifetime = _duration("lifetime", lifetime)
    _check_lease(lease, lifetime)
    _check_key(namespace, "namespace")
    bound = bind(f"claim({namespace!r})", namespace, key, kind="idem")
    taken = _take(bound, lease, lifetime)
    if isinstance(taken, Held):
        raise StateBusy(
            f"another caller holds the claim of this key in {namespace!r} (for "
            f"{taken.remaining:.1f} s more at most); retry later",
            retry_after=max(1, math.ceil(taken.remaining)),
        )
    if isinstance(taken, Done):
        yield Job(True, _result(taken.entry, namespace))
        return
    job = Job(False, None, bound, taken.token, lifetime)
    try:
        yield job
    finally:
        if not job._done:
            # An exception, or no complete(): the work is not done; a retry runs it again.
            _release(bound, taken.token, lifetime)


def _release(bound: _Bound, token: str, lifetime: timedelta) -> None:
    try:
        with bound.interface.breaker.guard(admit=False):
            bound.store.release(bound.keys[0], token, lifetime)
    except SessionStoreUnavailable:
        logger.warning("Could not release a claim (the store failed); its lease will run out")


def _result(entry: Entry, namespace: str) -> Any:
    try:
        return codec.unpack_value(entry.fields[RESULT])
    except ValueError:
        raise ValueError(
            f"the stored result of a completed claim in {namespace!r} cannot be decoded"
        ) from None


# -- views --------------------------------------------------------------------------------------


class _Refusal(Exception):
    """An answer to the client instead of running the view (400, 409, 422)."""

    def __init__(self, status: int, error: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.error, self.message, self.retry_after = (
            status,
            error,
            message,
            retry_after,
        )

    def response(self) -> Response:
        if self.status == 409:
            count_answer(409, self.error)
        response = jsonify(error=self.error, message=self.message)
        response.status_code = self.status
        response.headers["Cache-Control"] = "no-store"
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


def _header_key() -> str | None:
    return request.headers.get(KEY_HEADER)


def _valid_key(value: str) -> str:
    """The IETF draft's key: a non-empty string of visible ASCII; ours at most 255 long."""
    if not value:
        raise _Refusal(400, "idempotency_key_invalid", f"{KEY_HEADER} is empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise _Refusal(
            400,
            "idempotency_key_invalid",
            f"{KEY_HEADER} is longer than {MAX_KEY_LENGTH} characters.",
        )
    if not all("!" <= char <= "~" for char in value):
        raise _Refusal(
            400,
            "idempotency_key_invalid",
            f"{KEY_HEADER} must be visible ASCII characters only (no spaces or control "
            "characters).",
        )
    return value


def _fingerprint() -> str:
    """What makes a request "the same" one: its method, path, query and body, hashed."""
    digest = hashlib.sha256()
    for part in (request.method, request.path, request.query_string.decode("latin-1")):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\x00")
    digest.update(request.get_data(cache=True))
    return digest.hexdigest()


def _stored_response(response: Response, fingerprint: str, limit: int) -> dict[str, bytes]:
    """The fields a completed view's record holds: its response (status, kept headers, body
    unless over the cap) and the fingerprint of the request."""
    headers = [
        [name, value]
        for name, value in response.headers.items()
        if name.lower() in REPLAYED_HEADERS
    ]
    body: bytes | None = None
    if not response.is_streamed and not response.direct_passthrough:
        data = response.get_data()
        if len(data) <= limit - RECORD_ROOM:
            body = data
    stored = {"status": response.status_code, "headers": headers, "body": body}
    return {
        RESULT: codec.pack_value(RESULT, stored),
        FINGERPRINT: codec.pack_value(FINGERPRINT, fingerprint),
    }


def _replay(entry: Entry) -> Response:
    stored = codec.unpack_value(entry.fields[RESULT])
    body = stored.get("body")
    response = make_response(b"" if body is None else body, stored["status"])
    response.headers.clear()
    for name, value in stored.get("headers", []):
        response.headers.add(name, value)
    response.headers[REPLAYED_HEADER] = "true"
    if body is None:
        response.headers[OMITTED_HEADER] = "true"
    return response


def idempotent(
    key: Callable[[], str | None] | None = None,
    *,
    lifetime: timedelta = timedelta(hours=24),
    lease: timedelta = timedelta(seconds=60),
    required: bool = True,
    namespace: str | None = None,
) -> Callable[[F], F]:
    """Run a view once per idempotency key; repeats get the stored response.

    ``key`` returns this request's key (default: the ``Idempotency-Key`` header); ``required``:
    a request without one gets 400 (else the view just runs). ``namespace`` separates keys of
    different views (default: the view's endpoint). A 2xx, 3xx or 4xx response is stored for
    ``lifetime``; an exception or a 5xx releases the key, so a retry runs the view again.
    """
    lifetime = _duration("lifetime", lifetime)
    lease = _duration("lease", lease)
    _check_lease(lease, lifetime)
    get_key = key or _header_key

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return _run_once(view, args, kwargs)
            except _Refusal as refusal:
                return refusal.response()

        def _run_once(view: F, args: Any, kwargs: Any) -> Any:
            value = get_key()
            if value is None:
                if required:
                    raise _Refusal(
                        400,
                        "idempotency_key_missing",
                        f"This request needs an {KEY_HEADER} header.",
                    )
                return current_app.ensure_sync(view)(*args, **kwargs)
            name = namespace or request.endpoint or view.__name__
            bound = bind(f"idempotent({name!r})", name, _valid_key(value), kind="idem")
            fingerprint = _fingerprint()
            taken = _take(bound, lease, lifetime)
            if isinstance(taken, Held):
                raise _Refusal(
                    409,
                    "idempotency_key_in_progress",
                    "A request with this key is still being processed; retry later.",
                    retry_after=max(1, math.ceil(taken.remaining)),
                )
            if isinstance(taken, Done):
                return _replay_or_refuse(taken.entry, fingerprint)
            return _first(view, args, kwargs, bound, taken.token, fingerprint)

        def _first(
            view: F, args: Any, kwargs: Any, bound: _Bound, token: str, fingerprint: str
        ) -> Response:
            try:
                response = make_response(current_app.ensure_sync(view)(*args, **kwargs))
            except BaseException:
                _release(bound, token, lifetime)
                raise
            if response.status_code >= 500:
                _release(bound, token, lifetime)
                return response
            try:
                saved = _complete(bound, token, response, fingerprint, lifetime)
            except SessionStoreUnavailable:
                # The view ran: answer what it answered. A 503 would have the sender retry, and
                # the retry would run the view again once the lease ran out.
                logger.warning(
                    "An idempotent request's response could not be stored (the store failed): "
                    "answered anyway; a repeat after its lease runs the view again"
                )
                return response
            if not saved:
                logger.warning(
                    "An idempotent request outlived its lease and another took the key over: "
                    "its response was not stored (theirs stands)"
                )
            return response

        return cast(F, wrapper)

    return decorator


def _complete(
    bound: _Bound, token: str, response: Response, fingerprint: str, lifetime: timedelta
) -> bool:
    """Store a view's response as completed; False when another request took the key over."""
    fields = _stored_response(response, fingerprint, bound.store.max_bytes)
    try:
        with bound.interface.breaker.guard(admit=False):
            return bound.store.save(bound.keys[0], token, fields, (), lifetime)
    except SessionTooLarge:
        # The kept headers alone are over the cap: keep the status only.
        fields = _stored_response(make_response(b"", response.status_code), fingerprint, 0)
        with bound.interface.breaker.guard(admit=False):
            return bound.store.save(bound.keys[0], token, fields, (), lifetime)


def _replay_or_refuse(entry: Entry, fingerprint: str) -> Response:
    stored = entry.fields.get(FINGERPRINT)
    if stored is not None and codec.unpack_value(stored) != fingerprint:
        raise _Refusal(
            422,
            "idempotency_key_reused",
            f"This {KEY_HEADER} was used for another request (another method, path or body).",
        )
    return _replay(entry)
