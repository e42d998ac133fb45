"""Configuration: msgspec Structs with every default in one place.

A TOML file (``--config``) is decoded into :class:`Config`; environment
variables ``INGESTD_<SECTION>__<KEY>`` override single keys; command-line
options override both. Invalid input raises :class:`ingestd.errors.ConfigError`
naming the file, the key and the reason.

Entry points: :func:`load_config` (file + env + overrides, then structural and
semantic validation; routes are validated by compiling them, in
``ingestd.ingest.routes``) and :func:`dump_config` (the effective configuration as
TOML text, which :func:`load_config` reads back to an equal :class:`Config`).

Modules: :mod:`.model` (the Structs), :mod:`.loader` (file, environment,
overrides), :mod:`.validate` (checks beyond types), :mod:`.dump` (TOML out),
:mod:`.devices` (device schemes: topic templates for commands and RPC).
"""

from __future__ import annotations

from ingestd.config.dump import dump_config
from ingestd.config.loader import load_config, parse_text_value
from ingestd.config.model import (
    ENV_PREFIX,
    HOOK_EVENTS,
    ColumnSpec,
    Config,
    DatabaseConfig,
    DeviceSchemeConfig,
    DevicesConfig,
    HookConfig,
    HttpConfig,
    IndexSpec,
    IngestConfig,
    LookupConfig,
    MqttConfig,
    PersistenceConfig,
    PresenceConfig,
    RouteConfig,
    ServerConfig,
    TokenConfig,
    UpstreamConfig,
)
from ingestd.config.validate import parse_listen, validate_config
from ingestd.errors import ConfigError

__all__ = [
    "ENV_PREFIX",
    "HOOK_EVENTS",
    "ColumnSpec",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "DeviceSchemeConfig",
    "DevicesConfig",
    "HookConfig",
    "HttpConfig",
    "IndexSpec",
    "IngestConfig",
    "LookupConfig",
    "MqttConfig",
    "PersistenceConfig",
    "PresenceConfig",
    "RouteConfig",
    "ServerConfig",
    "TokenConfig",
    "UpstreamConfig",
    "dump_config",
    "load_config",
    "parse_listen",
    "parse_text_value",
    "validate_config",
]
