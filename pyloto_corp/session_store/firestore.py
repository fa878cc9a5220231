"""Firestore store: not available yet (tracked by the Firestore issue)."""

from __future__ import annotations

from typing import Any

from flask import Flask

from ..config.settings import Settings, Var
from ..errors import ConfigurationError


def create_interface(app: Flask, settings: Settings, client: Any = None) -> Any:
    raise ConfigurationError(
        settings.environment,
        [f"{Var.SESSION_STORE_BACKEND}=firestore is not available yet; use redis for now."],
    )
