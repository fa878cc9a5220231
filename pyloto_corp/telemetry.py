"""Spans and metrics around record-store calls, for an operator on Cloud Run.

Every operation of the app's record store (a session read, write, create, delete, retire; the
user index and revocation; keyed-state loads, merges and leases; idempotency claims) becomes a
span with the OpenTelemetry database conventions (``db.system.name``, ``db.operation.name``,
``server.address`` without credentials, ``error.type``) and ``pyloto.store.backend`` /
``pyloto.store.outcome`` (hit, miss, written, refused, gone, busy, unavailable), and one point
of the ``db.client.operation.duration`` histogram (seconds). Answers the app gives because of
the store (503, 409) and breaker openings are counted too. No attribute ever holds a session
id, a store key, a user id, a conversation id or a value: only these names.

It costs next to nothing until an SDK is configured, and imports nothing before: each call first
looks whether ``opentelemetry`` was imported at all (an app that configures an SDK has done so;
``opentelemetry-api`` is the ``[otel]`` extra, and google-api-core requires it), then whether a
tracer or meter provider was set, and does nothing more when not. The instruments are made on
the first call that finds one.
Redis command spans come from ``opentelemetry-instrumentation-redis`` when the app installs it;
Firestore has no Python instrumentation: these spans are the only ones there.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from flask import current_app, has_app_context, has_request_context, request

from .errors import SessionStoreUnavailable, SessionTooLarge, UnstorableValue
from .records.base import Done, Held, Lease, Record, RecordStore, Retired

#: The instrumentation scope's name (what a backend shows as the library).
SCOPE: Final = "pyloto_corp"
#: ``db.system.name`` per backend: Redis has a well-known value; Firestore and the in-process
#: store have none, so they carry their own names.
DB_SYSTEM: Final = {"redis": "redis", "firestore": "gcp.firestore", "memory": "pyloto.memory"}
#: The record-store operations traced (what ``db.operation.name`` says).
OPERATIONS: Final = (
    "read",
    "create",
    "update",
    "delete",
    "retire",
    "touch",
    "revoked_at",
    "mark_revoked",
    "find_user_sessions",
    "index",
    "unindex",
    "revoke",
    "load",
    "exists",
    "merge",
    "fill",
    "delete_entry",
    "acquire",
    "save",
    "ping",
)


#: Operations the contract lets a backend leave as no-ops (Redis slides expiry in its read).
NO_OPS: Final = frozenset({"touch", "index", "unindex"})
#: Operations whose None means "nothing there" (the others return None when they wrote).
LOOKUPS: Final = frozenset({"read", "load", "revoked_at"})


def _outcome(name: str, result: object) -> str:
    """What a call's result says, in one word (never the result itself)."""
    if isinstance(result, Lease):
        return "hit" if result.entry is not None else "miss"
    if isinstance(result, Record | Done):
        return "hit"
    if isinstance(result, Held):
        return "busy"
    if isinstance(result, Retired):
        return "miss"
    if result is None:
        return "miss" if name in LOOKUPS else "ok"
    if result is False:
        return "gone"
    return "written" if result is True else "ok"


def _error_outcome(exc: BaseException) -> str:
    if isinstance(exc, SessionStoreUnavailable):
        return "unavailable"
    if isinstance(exc, SessionTooLarge | UnstorableValue):
        return "refused"
    return "error"


#: Cloud Run's own trace header: ``TRACE_ID/SPAN_ID;o=OPTIONS`` (span id in decimal).
CLOUD_TRACE_HEADER: Final = "X-Cloud-Trace-Context"


#: A provider named by the environment (OTEL_PYTHON_*_PROVIDER) is loaded on first use by the
#: API; then the globals below say nothing until that happens.
_PROVIDERS_FROM_ENV: Final = any(
    name in os.environ for name in ("OTEL_PYTHON_TRACER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER")
)
_UNKNOWN: Final = object()


def _api() -> tuple[Any, Any] | None:
    """The ``opentelemetry.trace`` and ``.metrics`` modules when a provider of either was set
    (an SDK configured); None otherwise, without importing them (~40 ms at cold start). The
    common answer, "none set", reads the API's two globals (~0.1 µs; its getters look at the
    environment each time, ~1 µs each)."""
    trace = sys.modules.get("opentelemetry.trace")
    metrics = sys.modules.get("opentelemetry.metrics")
    if trace is None or metrics is None:
        return None
    internal = sys.modules.get("opentelemetry.metrics._internal")
    tracer_set = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
    meter_set = getattr(internal, "_METER_PROVIDER", _UNKNOWN)
    if tracer_set is None and meter_set is None and not _PROVIDERS_FROM_ENV:
        return None
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider) and (
        type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider"
    ):
        return None
    return trace, metrics


def request_parent() -> Any:
    """The incoming trace of the current request, when no span is current (an app without
    Flask instrumentation): ``traceparent`` (W3C), else ``X-Cloud-Trace-Context``; None
    otherwise (the span then joins the current one, or starts its own trace)."""
    from opentelemetry import propagate, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    if not has_request_context() or trace.get_current_span().get_span_context().is_valid:
        return None
    if "traceparent" in request.headers:
        return propagate.extract(request.headers)
    header = request.headers.get(CLOUD_TRACE_HEADER, "")
    trace_part, _, rest = header.partition("/")
    span_part, _, options = rest.partition(";")
    try:
        trace_id, span_id = int(trace_part, 16), int(span_part or "0")
    except ValueError:
        return None
    if not (0 < trace_id < 2**128 and 0 < span_id < 2**64):
        return None
    flags = TraceFlags(TraceFlags.SAMPLED if options.strip() == "o=1" else TraceFlags.DEFAULT)
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=flags)
    return trace.set_span_in_context(NonRecordingSpan(remote))


def current_ids() -> tuple[str, str] | None:
    """The trace and span ids (hex) a log line should carry, when an SDK is configured: the
    current span's, else the request's incoming ones (the parent of its store spans)."""
    api = _api()
    if api is None:
        return None
    trace = api[0]
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        parent = request_parent()
        if parent is None:
            return None
        context = trace.get_current_span(parent).get_span_context()
        if not context.is_valid:
            return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class _Instruments:
    """The tracer and the meters' instruments, made once an SDK is found."""

    def __init__(self, trace: Any, metrics: Any) -> None:
        self.tracer = trace.get_tracer(SCOPE)
        meter = metrics.get_meter(SCOPE)
        self.duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of session-store (record-store) operations.",
        )
        self.answers = meter.create_counter(
            "pyloto.session_store.answers",
            unit="{response}",
            description="Responses the app gave because of the store: 503 (unavailable, "
            "busy) and 409 (a session ended, a lease lost, an idempotency key in progress).",
        )
        self.openings = meter.create_counter(
            "pyloto.session_store.breaker.openings",
            unit="{opening}",
            description="Times the breaker opened (the store did not answer in time).",
        )


class Telemetry:
    """One app's spans and metrics: nothing made at init (no IO, no import), the instruments
    made on the first call that finds an SDK configured."""

    def __init__(self, backend: str, server_address: str | None) -> None:
        self.attributes: dict[str, str] = {
            "db.system.name": DB_SYSTEM.get(backend, backend),
            "pyloto.store.backend": backend,
        }
        if server_address:
            self.attributes["server.address"] = server_address
        self._instruments: _Instruments | None = None
        self._lock = threading.Lock()

    def _live(self) -> _Instruments | None:
        api = _api()
        if api is None:
            return None
        if self._instruments is None:
            with self._lock:
                if self._instruments is None:
                    self._instruments = _Instruments(*api)
        return self._instruments

    def traced(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        """``call`` with a span and a duration point, when an SDK is configured."""

        @functools.wraps(call)
        def operation(*args: Any, **kwargs: Any) -> Any:
            live = self._live()
            if live is None:
                return call(*args, **kwargs)
            return self._observe(live, name, call, args, kwargs)

        return operation

    def _observe(
        self,
        live: _Instruments,
        name: str,
        call: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        from opentelemetry.trace import SpanKind, StatusCode

        attributes = {**self.attributes, "db.operation.name": name}
        started = time.perf_counter()
        outcome = "error"
        with live.tracer.start_as_current_span(
            f"{name} {attributes['db.system.name']}",
            context=request_parent(),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = call(*args, **kwargs)
            except BaseException as exc:
                outcome = _error_outcome(exc)
                error = type(exc).__qualname__
                span.set_attributes({"pyloto.store.outcome": outcome, "error.type": error})
                span.set_status(StatusCode.ERROR, error)  # the class, never the message
                attributes["error.type"] = error
                raise
            else:
                outcome = _outcome(name, result)
                span.set_attribute("pyloto.store.outcome", outcome)
                return result
            finally:
                attributes["pyloto.store.outcome"] = outcome
                live.duration.record(time.perf_counter() - started, attributes)

    def answered(self, status: int, reason: str) -> None:
        """A 503 or 409 the app answered because of the store."""
        live = self._live()
        if live is not None:
            attributes: dict[str, str | int] = {**self.attributes, "pyloto.reason": reason}
            attributes["http.response.status_code"] = status
            live.answers.add(1, attributes)

    def opened(self) -> None:
        live = self._live()
        if live is not None:
            live.openings.add(1, self.attributes)


def instrument(records: RecordStore, server_address: str | None) -> Telemetry:
    """Wrap ``records``' operations (on this instance) with spans and metrics."""
    telemetry = Telemetry(records.backend_name, server_address)
    for name in OPERATIONS:
        if getattr(type(records), name) is getattr(RecordStore, name, None) and name in NO_OPS:
            continue  # the contract's default does nothing here: no span for nothing
        setattr(records, name, telemetry.traced(name, getattr(records, name)))
    return telemetry


def count_answer(status: int, reason: str) -> None:
    """Count a 503 or 409 the current app answered because of its store."""
    if not has_app_context():
        return
    telemetry = getattr(current_app.session_interface, "telemetry", None)
    if isinstance(telemetry, Telemetry):
        telemetry.answered(status, reason)
