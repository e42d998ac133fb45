"""PostgreSQL column types by name (accepted spellings, DDL names) and identifier quoting."""

from __future__ import annotations

from ingestd.db import quote_ident

__all__ = ["SQL_TYPE", "TYPE_ALIASES", "canonical_type", "quote_ident"]

# Accepted spellings -> canonical name (the one used in configs and docs).
TYPE_ALIASES: dict[str, str] = {
    "double precision": "double precision",
    "float8": "double precision",
    "double": "double precision",
    "float": "double precision",
    "real": "real",
    "float4": "real",
    "bigint": "bigint",
    "int8": "bigint",
    "integer": "integer",
    "int": "integer",
    "int4": "integer",
    "smallint": "smallint",
    "int2": "smallint",
    "numeric": "numeric",
    "decimal": "numeric",
    "text": "text",
    "boolean": "boolean",
    "bool": "boolean",
    "timestamptz": "timestamptz",
    "timestamp with time zone": "timestamptz",
    "jsonb": "jsonb",
    "bytea": "bytea",
}

# Canonical name -> the name PostgreSQL's format_type() reports (and we use in DDL).
SQL_TYPE: dict[str, str] = {
    "double precision": "double precision",
    "real": "real",
    "bigint": "bigint",
    "integer": "integer",
    "smallint": "smallint",
    "numeric": "numeric",
    "text": "text",
    "boolean": "boolean",
    "timestamptz": "timestamp with time zone",
    "jsonb": "jsonb",
    "bytea": "bytea",
}


def canonical_type(name: str) -> str | None:
    """The canonical name of a column type, or None when unknown."""
    return TYPE_ALIASES.get(" ".join(name.lower().split()))
