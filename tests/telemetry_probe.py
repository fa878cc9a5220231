"""One process with the OpenTelemetry SDK configured (in-memory span exporter, in-memory metric
reader): an app from the environment serves a read, a write, a login, a logout, a 409 and a
503, and the process prints what was recorded as JSON. A process of its own: an SDK provider
is set once per process, and the rest of the suite runs without one.

``python -m tests.telemetry_probe``; the app's variables come from the environment, and
PROBE_DEAD_* the variables of an app whose store does not answer (for the 503).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(tracer_provider)
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

from pyloto_corp.app import create_app  # noqa: E402 - after the providers, as an app would
from pyloto_corp.config.settings import Settings  # noqa: E402
from pyloto_corp.idempotency import claim, idempotent  # noqa: E402
from pyloto_corp.logs import SPAN_FIELD, TRACE_FIELD, CloudTraceFilter  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
CLOUD_TRACE_ID = "105445aa7843bc8bf206b12000100000"
USER = "ana.probe@example.com"


def main() -> None:
    app = create_app()

    @app.post("/orders")
    @idempotent()
    def orders() -> dict[str, bool]:
        return {"ok": True}

    logged: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record)

    keep = Keep()
    keep.addFilter(CloudTraceFilter(project="probe-project"))
    logging.getLogger("probe").addHandler(keep)

    @app.get("/log")
    def log_line() -> dict[str, bool]:
        logging.getLogger("probe").warning("a line of this request")
        return {"ok": True}

    client = app.test_client(use_cookies=False)
    steps: dict[str, Any] = {}

    def call(step: str, method: str, path: str, cookie: str | None = None, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if cookie:
            headers["Cookie"] = cookie
        before = len(exporter.get_finished_spans())
        response = client.open(path, method=method, headers=headers, **kw)
        steps[step] = {
            "status": response.status_code,
            "spans": [span.name for span in exporter.get_finished_spans()[before:]],
        }
        return response

    def cookie_of(response: Any) -> str:
        return str(response.headers["Set-Cookie"]).split(";", 1)[0]

    write = call("write", "POST", "/session/counter", headers={"traceparent": TRACEPARENT})
    cookie = cookie_of(write)
    steps["sid"] = cookie.split("=", 1)[1]
    call(
        "read",
        "GET",
        "/session/counter",
        cookie,
        headers={"X-Cloud-Trace-Context": f"{CLOUD_TRACE_ID}/1234567;o=1"},
    )
    login = call("login", "POST", "/session/login", cookie, json={"user": USER})
    cookie = cookie_of(login)
    steps["login_sid"] = cookie.split("=", 1)[1]
    call("logout", "DELETE", "/session", cookie)
    with app.app_context(), claim("orders", "key-1"):
        call("conflict", "POST", "/orders", headers={"Idempotency-Key": "key-1"})
    call("replay-free", "POST", "/orders", headers={"Idempotency-Key": "key-2"})
    call("log", "GET", "/log", headers={"traceparent": TRACEPARENT})
    steps["log"]["fields"] = {
        name: getattr(logged[-1], name, None) for name in (TRACE_FIELD, SPAN_FIELD)
    }
    dead = {
        key.removeprefix("PROBE_DEAD_"): value
        for key, value in os.environ.items()
        if key.startswith("PROBE_DEAD_")
    }
    if dead:
        # Process-wide variables too (FIRESTORE_EMULATOR_HOST): the live app's client is built.
        os.environ.update(dead)
        dead_app = create_app(Settings.from_env(dict(os.environ)))
        response = dead_app.test_client().post(
            "/session/counter", headers={"Accept": "application/json"}
        )
        steps["unavailable"] = {"status": response.status_code}
    spans = [
        {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": f"{span.context.trace_id:032x}",
            "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
            "attributes": dict(span.attributes or {}),
            "status": span.status.status_code.name,
            "duration_ms": ((span.end_time or 0) - (span.start_time or 0)) / 1e6,
        }
        for span in exporter.get_finished_spans()
    ]
    points = []
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else []:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "value", None)
                    count = getattr(point, "count", None)
                    points.append(
                        {
                            "name": metric.name,
                            "unit": metric.unit,
                            "attributes": dict(point.attributes or {}),
                            "value": value if value is not None else count,
                        }
                    )
    json.dump({"steps": steps, "spans": spans, "points": points}, sys.stdout, default=str)


if __name__ == "__main__":
    main()
