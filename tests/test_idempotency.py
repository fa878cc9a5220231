"""claim() and @idempotent over every backend's real service: each id's work runs once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import flask
import pytest
from flask import Flask, Response, session

from pyloto_corp.errors import LeaseLost, StateBusy
from pyloto_corp.idempotency import claim, idempotent
from tests.conftest import MakeApp
from tests.elsewhere import elsewhere
from tests.records.conftest import BACKENDS
from tests.session_store.conftest import HARNESSES

MESSAGE = "wamid.HBgNNTUxMTk4NzY1NDMyMRUCABIYFDNBMjQ"


@pytest.fixture(params=BACKENDS)
def app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    app = HARNESSES[request.param](make_app, request).make()
    app.config["runs"] = []

    @app.post("/orders")
    @idempotent()
    def orders() -> tuple[dict[str, Any], int]:
        app.config["runs"].append(flask.request.get_json())
        session["visited"] = True  # a Set-Cookie that must never be replayed
        return {"order": len(app.config["runs"])}, 201

    @app.post("/slow")
    @idempotent()
    def slow() -> dict[str, int]:
        app.config["runs"].append("slow")
        time.sleep(float(flask.request.args.get("sleep", "0.5")))
        return {"ok": 1}

    @app.post("/fails")
    @idempotent()
    def fails() -> Any:
        app.config["runs"].append("fails")
        if len(app.config["runs"]) == 1:
            raise RuntimeError("boom")
        if len(app.config["runs"]) == 2:
            return {"error": "upstream"}, 502
        return {"ok": True}

    @app.post("/rejects")
    @idempotent()
    def rejects() -> tuple[dict[str, str], int]:
        app.config["runs"].append("rejects")
        return {"error": "no such product"}, 404

    @app.post("/big")
    @idempotent()
    def big() -> Response:
        app.config["runs"].append("big")
        return Response("x" * (app.config["big"]), mimetype="text/plain")

    @app.post("/optional")
    @idempotent(required=False)
    def optional() -> dict[str, int]:
        app.config["runs"].append("optional")
        return {"ok": 1}

    return app


def _post(app: Flask, path: str, key: str | None, json: Any = None) -> Any:
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return app.test_client().post(path, json=json or {"item": 1}, headers=headers)


# -- claim() ------------------------------------------------------------------------------------


def test_a_claim_runs_once_and_a_repeat_sees_its_result(app: Flask) -> None:
    with app.app_context():
        with claim("wa-message", MESSAGE) as job:
            assert not job.completed
            job.complete({"answered": "oi"})
        with claim("wa-message", MESSAGE) as job:
            assert job.completed
            assert job.result == {"answered": "oi"}
        with claim("other-namespace", MESSAGE) as job:
            assert not job.completed  # namespaces are separate
            job.complete()


def _fail_inside() -> None:
    with claim("wa-message", MESSAGE):
        raise KeyError("the work failed")


def test_an_exception_or_no_complete_releases_the_claim(app: Flask) -> None:
    with app.app_context():
        with pytest.raises(KeyError):
            _fail_inside()
        with claim("wa-message", MESSAGE) as job:
            assert not job.completed  # not done: a retry runs the work again
        with claim("wa-message", MESSAGE) as job:
            assert not job.completed  # left without complete(): released too
            job.complete(1)
        with claim("wa-message", MESSAGE) as job:
            assert job.completed


def _claim_again() -> None:
    with claim("wa-message", MESSAGE):
        pass


def test_a_claim_held_elsewhere_is_busy_at_once(app: Flask) -> None:
    with app.app_context(), claim("wa-message", MESSAGE) as job:
        started = time.monotonic()
        busy = elsewhere(app, _claim_again)
        assert time.monotonic() - started < 1
        job.complete()
    assert isinstance(busy, StateBusy)
    assert MESSAGE not in str(busy)


def _take_over() -> None:
    with claim("wa-message", MESSAGE) as job:
        assert not job.completed
        job.complete("theirs")


def _outlive(app: Flask) -> None:
    with claim("wa-message", MESSAGE, lease=timedelta(milliseconds=300)) as job:
        time.sleep(0.5)
        assert elsewhere(app, _take_over) is None
        job.complete("mine")


def test_a_claim_taken_over_after_its_lease_drops_its_completion(app: Flask) -> None:
    with app.app_context():
        with pytest.raises(LeaseLost):
            _outlive(app)
        with claim("wa-message", MESSAGE) as job:
            assert job.result == "theirs"


def test_a_slow_holder_nobody_took_over_still_completes(app: Flask) -> None:
    with app.app_context():
        with claim("wa-message", MESSAGE, lease=timedelta(milliseconds=200)) as job:
            time.sleep(0.4)
            job.complete("slow but done")
        with claim("wa-message", MESSAGE) as job:
            assert job.result == "slow but done"


# -- @idempotent ----------------------------------------------------------------------------------


def test_a_repeat_gets_the_stored_response_without_running_the_view(app: Flask) -> None:
    first = _post(app, "/orders", "key-1")
    assert first.status_code == 201
    assert first.json == {"order": 1}
    assert "Set-Cookie" in first.headers
    again = _post(app, "/orders", "key-1")
    assert again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Set-Cookie" not in again.headers
    assert app.config["runs"] == [{"item": 1}]
    assert _post(app, "/orders", "key-2").json == {"order": 2}  # another key runs


def test_the_same_key_with_another_payload_is_422(app: Flask) -> None:
    _post(app, "/orders", "key-1", {"item": 1})
    response = _post(app, "/orders", "key-1", {"item": 2})
    assert response.status_code == 422
    assert response.json is not None
    assert response.json["error"] == "idempotency_key_reused"
    assert app.config["runs"] == [{"item": 1}]


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (None, "needs an Idempotency-Key"),
        ("", "is empty"),
        ("k" * 256, "longer than 255"),
        ("has space", "visible ASCII"),
        ("tab\there", "visible ASCII"),
    ],
)
def test_a_missing_or_bad_key_is_400_and_says_why(app: Flask, key: str | None, why: str) -> None:
    response = _post(app, "/orders", key)
    assert response.status_code == 400
    assert response.json is not None
    assert why in response.json["message"]
    assert app.config["runs"] == []


def test_without_required_a_request_without_a_key_just_runs(app: Flask) -> None:
    assert _post(app, "/optional", None).json == {"ok": 1}
    assert _post(app, "/optional", None).json == {"ok": 1}
    assert app.config["runs"] == ["optional", "optional"]


def test_an_exception_or_a_5xx_releases_the_key_and_a_4xx_is_stored(app: Flask) -> None:
    app.testing = False  # the exception becomes a 500, as in production
    assert _post(app, "/fails", "key").status_code == 500
    assert _post(app, "/fails", "key").status_code == 502
    ok = _post(app, "/fails", "key")
    assert ok.json == {"ok": True}
    assert "Idempotent-Replayed" not in ok.headers
    assert _post(app, "/fails", "key").headers["Idempotent-Replayed"] == "true"
    assert app.config["runs"] == ["fails", "fails", "fails"]
    assert _post(app, "/rejects", "key").status_code == 404
    assert _post(app, "/rejects", "key").status_code == 404
    assert app.config["runs"].count("rejects") == 1


def test_a_repeat_while_the_first_runs_is_409(app: Flask) -> None:
    answers: list[Any] = []
    first = threading.Thread(target=lambda: answers.append(_post(app, "/slow?sleep=1", "key")))
    first.start()
    time.sleep(0.4)
    busy = _post(app, "/slow?sleep=1", "key")
    first.join()
    assert busy.status_code == 409
    assert 1 <= int(busy.headers["Retry-After"]) <= 60
    assert answers[0].status_code == 200
    assert app.config["runs"] == ["slow"]


def test_a_response_over_the_cap_is_completed_and_replayed_without_its_body(app: Flask) -> None:
    from pyloto_corp.session_store import SessionStore

    app.config["big"] = SessionStore.state(app).interface.records.max_bytes
    first = _post(app, "/big", "key")
    assert first.status_code == 200
    assert len(first.get_data()) == app.config["big"]
    again = _post(app, "/big", "key")
    assert again.status_code == 200
    assert again.get_data() == b""
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Idempotent-Body-Omitted"] == "true"
    assert app.config["runs"] == ["big"]  # never run twice
