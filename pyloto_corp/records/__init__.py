"""The record layer: encoded values by key, with expiry, an atomic merge and a fenced lease,
under every user of stored state (cookie sessions, keyed state). A backend is one module here;
it knows no cookie, no request and no Flask app. See ``base.RecordStore``."""

from __future__ import annotations

from .base import Entry, Held, Lease, RecordStore

__all__ = ["Entry", "Held", "Lease", "RecordStore"]
