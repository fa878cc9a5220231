"""The README's WhatsApp webhook recipe, as written there, on Redis and the Firestore emulator:
every message is answered exactly once, however often the webhook and the queue deliver it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import flask
import pytest
from flask import Flask

from pyloto_corp.idempotency import claim
from pyloto_corp.state import KeyedState
from tests.conftest import MakeApp

conversations = KeyedState("conversations", lifetime=timedelta(hours=2))
SENDER = "5511987654321"


def _body(*messages: tuple[str, str], statuses: bool = False) -> dict[str, Any]:
    """A WhatsApp Cloud API webhook body (its documented shape)."""
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001111", "phone_number_id": "1234"},
    }
    if messages:
        value["contacts"] = [{"profile": {"name": "Ana"}, "wa_id": SENDER}]
        value["messages"] = [
            {
                "from": SENDER,
                "id": message_id,
                "timestamp": "1733100000",
                "type": "text",
                "text": {"body": text},
            }
            for message_id, text in messages
        ]
    if statuses:
        value["statuses"] = [
            {
                "id": "wamid.sent-1",
                "status": "delivered",
                "timestamp": "1733100001",
                "recipient_id": SENDER,
            }
        ]
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}],
    }


@pytest.fixture(params=["redis", "firestore"])
def app(request: pytest.FixtureRequest, make_app: MakeApp) -> Flask:
    app = make_app(**request.getfixturevalue(f"{request.param}_env"))
    queue: list[dict[str, Any]] = []
    sent: list[tuple[str, str]] = []
    app.config.update(queue=queue, sent=sent)

    def enqueue(message: dict[str, Any]) -> None:
        queue.append(message)

    def call_the_llm(history: list[str]) -> str:
        return f"answer to {history[-1]}"

    def send_whatsapp(to: str, text: str) -> None:
        sent.append((to, text))

    # -- the recipe, as the README shows it ---------------------------------------------------
    @app.post("/webhook/whatsapp")
    def whatsapp() -> tuple[str, int]:
        body = flask.request.get_json(silent=True) or {}
        for entry in body.get("entry", []):
            for change in entry.get("changes", []):
                for message in change.get("value", {}).get("messages", []):
                    with claim("wa-enqueued", message["id"]) as job:
                        if not job.completed:
                            enqueue(message)
                            job.complete()
        return "", 200

    def handle(message: dict[str, Any]) -> None:
        with claim("wa-message", message["id"], lease=timedelta(minutes=2)) as job:
            if job.completed:
                return
            with conversations.turn(message["from"]) as state:
                history = [*state.get("history", []), message["text"]["body"]]
                reply = call_the_llm(history)
                state["history"] = [*history, reply]
            send_whatsapp(message["from"], reply)
            job.complete()

    # ------------------------------------------------------------------------------------------
    app.config["handle"] = handle
    return app


def test_every_message_is_answered_exactly_once(app: Flask) -> None:
    client = app.test_client()
    first = _body(("wamid.1", "oi"), ("wamid.2", "quero pagar"), ("wamid.3", "obrigada"))
    assert client.post("/webhook/whatsapp", json=first).status_code == 200
    # Meta retries the whole body (no 200 reached it), and a later body repeats one message.
    assert client.post("/webhook/whatsapp", json=first).status_code == 200
    assert (
        client.post("/webhook/whatsapp", json=_body(("wamid.2", "quero pagar"))).status_code == 200
    )
    # Delivery receipts only: acknowledged, nothing to answer.
    assert client.post("/webhook/whatsapp", json=_body(statuses=True)).status_code == 200
    queue = app.config["queue"]
    assert [message["id"] for message in queue] == ["wamid.1", "wamid.2", "wamid.3"]
    # The queue delivers at least once too: every task twice.
    with app.app_context():
        for message in queue + queue:
            app.config["handle"](message)
        assert conversations.get(SENDER) == {
            "history": [
                "oi",
                "answer to oi",
                "quero pagar",
                "answer to quero pagar",
                "obrigada",
                "answer to obrigada",
            ]
        }
    assert app.config["sent"] == [
        (SENDER, "answer to oi"),
        (SENDER, "answer to quero pagar"),
        (SENDER, "answer to obrigada"),
    ]


def test_a_worker_that_fails_before_sending_is_retried_and_answers_once(app: Flask) -> None:
    client = app.test_client()
    client.post("/webhook/whatsapp", json=_body(("wamid.9", "oi")))
    (message,) = app.config["queue"]
    with app.app_context():
        with pytest.raises(RuntimeError), claim("wa-message", message["id"]):
            raise RuntimeError("the LLM timed out")  # the task fails: its claim is released
        app.config["handle"](message)  # the retry
        app.config["handle"](message)  # and a duplicate delivery of it
    assert app.config["sent"] == [(SENDER, "answer to oi")]
