"""``python -m pyloto_corp check|info|ping|cleanup`` where ``FLASK_APP`` is not set up."""

from __future__ import annotations

from .cli import session_store_cli

session_store_cli(prog_name="python -m pyloto_corp")
