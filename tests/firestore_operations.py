"""Counting Firestore document operations while they still go to the real emulator.

Shared by the Firestore tests and the benchmark, which both assert operations per request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from google.cloud.firestore_v1.document import DocumentReference

OPERATIONS = ("get", "create", "update", "delete", "set")


@contextmanager
def counting_document_operations() -> Iterator[Counter[str]]:
    """Counts calls of each DocumentReference operation until the block ends."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(DocumentReference, name) for name in OPERATIONS}

    def spy(name: str) -> Any:
        original = originals[name]

        def counted(self: DocumentReference, *args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in OPERATIONS:
        setattr(DocumentReference, name, spy(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(DocumentReference, name, original)
