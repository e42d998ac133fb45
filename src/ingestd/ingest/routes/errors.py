"""The errors of turning a message into a row."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingestd.ingest.lookups import LookupCache


class RowError(Exception):
    """A message cannot become a row (bad payload, wrong type, missing value)."""


class LookupMiss(Exception):
    """A lookup key is not (yet) in the lookup cache; the engine may reload and retry."""

    def __init__(self, lookup: LookupCache) -> None:
        super().__init__(lookup.name)
        self.lookup = lookup


class SkipRow(Exception):
    """The row is dropped on purpose (lookup miss with ``on_miss = "skip"``)."""
