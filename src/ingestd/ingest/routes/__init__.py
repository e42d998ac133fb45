"""Routes: how an MQTT message becomes a row of a table.

A route maps a topic template such as
``company/{company_id}/machine/{machine_id}/telemetry`` to a table. Compiling
it yields the MQTT subscription filter (``company/+/machine/+/telemetry``),
the level positions of each placeholder, and one *getter* per column: a small
closure ``getter(message, levels, payload_obj) -> value`` that reads the
column's source and converts it to the column's PostgreSQL type (the Python
value asyncpg's binary COPY codec expects for that type).

Payload paths are decoded with one ``msgspec.json.Decoder`` per route whose
target type is a Struct generated from the route's paths: fields nobody asked
for are skipped without building Python objects, numbers/booleans are checked
and coerced by msgspec in C, and ``jsonb`` columns receive the raw JSON bytes
(``msgspec.Raw``) instead of a decoded-and-re-encoded value.

Conversion errors raise :class:`RowError`; the engine turns the message into a
dead letter. Everything here is synchronous and cheap; the engine runs it per
batch at flush time.

The modules, one job each:

* :mod:`.errors`     RowError, LookupMiss, SkipRow
* :mod:`.values`     value converters per PostgreSQL type
* :mod:`.templates`  topic templates and MQTT filter validation
* :mod:`.sources`    column sources: each kind's getter, inline expression and RowBuilder op
* :mod:`.codegen`    the generated per-message converter and the RowBuilder operations
* :mod:`.model`      Column, IndexDef, TableSpec, Route, CompiledConfig
* :mod:`.compile`    compile_config, compile_route

Type names and identifier quoting are in :mod:`ingestd.ingest.pgtypes`,
:class:`LookupCache` in :mod:`ingestd.ingest.lookups`.
"""

from __future__ import annotations

from ingestd.ingest.lookups import LookupCache
from ingestd.ingest.pgtypes import SQL_TYPE, TYPE_ALIASES, canonical_type, quote_ident
from ingestd.ingest.routes.compile import compile_config, compile_route
from ingestd.ingest.routes.errors import LookupMiss, RowError, SkipRow
from ingestd.ingest.routes.model import Column, CompiledConfig, IndexDef, Route, TableSpec
from ingestd.ingest.routes.sources import parse_payload_path
from ingestd.ingest.routes.templates import Template, parse_template, validate_filter
from ingestd.ingest.routes.values import string_converter, value_converter

__all__ = [
    "SQL_TYPE",
    "TYPE_ALIASES",
    "Column",
    "CompiledConfig",
    "IndexDef",
    "LookupCache",
    "LookupMiss",
    "Route",
    "RowError",
    "SkipRow",
    "TableSpec",
    "Template",
    "canonical_type",
    "compile_config",
    "compile_route",
    "parse_payload_path",
    "parse_template",
    "quote_ident",
    "string_converter",
    "validate_filter",
    "value_converter",
]
