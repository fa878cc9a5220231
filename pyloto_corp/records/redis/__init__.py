"""The redis backend: Redis, Redis Cluster, Sentinel, Valkey and Memorystore, through redis-py
(or an app's own valkey-py client). ``options`` (its settings), ``client`` (building the
client), ``scripts`` (the Lua, in one place) and ``store`` (the record contract)."""

from __future__ import annotations

from ...config.settings import Settings, redact_url
from ..base import CLIENT_GIVEN, store_options
from .client import check_client, create_client
from .options import Options
from .store import RedisRecords

__all__ = ["Options", "RedisRecords", "create_store"]


def create_store(settings: Settings, client: object | None = None) -> RedisRecords:
    """The app's records: on ``client`` when the app passes one (used as given), else on a
    client of REDIS_URL built on first use in each process."""
    options = settings.store
    assert isinstance(options, Options)
    if client is None:
        if options.client_given:
            raise TypeError("redis.Options(client_given=True) needs the client: pass client=.")
        return RedisRecords(
            lambda: create_client(options),
            display_url=redact_url(options.url) or "",
            **store_options(settings),
        )
    given, errors = check_client(client)
    return RedisRecords(
        lambda: given,
        display_url=f"({CLIENT_GIVEN})",
        errors=errors,
        **store_options(settings),
    )
