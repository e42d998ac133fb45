"""The ``ingestd`` command line."""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING

import click

from ingestd import __version__
from ingestd.build_info import codec_implementation
from ingestd.users import db_options as _db_options

if TYPE_CHECKING:
    from ingestd.config import Config


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ingestd")
def main() -> None:
    """ingestd: an MQTT 3.1.1/5.0 broker that writes device telemetry into PostgreSQL."""


@main.command()
def version() -> None:
    """Print the version and which codec implementation is in use."""
    from ingestd import _codec, _trie

    click.echo(f"ingestd {__version__}")
    click.echo(f"codec: {codec_implementation()} ({_codec.__file__})")
    click.echo(f"trie: {_trie.__file__}")
    click.echo(f"python: {sys.version.split()[0]}")


@main.command()
@click.option(
    "--listen",
    "listen",
    multiple=True,
    metavar="HOST:PORT",
    help="MQTT over TCP listener; repeatable. Default 0.0.0.0:1883.",
)
@click.option(
    "--no-listen",
    is_flag=True,
    help="No MQTT listener (server.listen = []): a pure consumer of [[upstream]] brokers.",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="Data directory (embedded PostgreSQL, spool).",
)
@click.option(
    "--ws-listen",
    multiple=True,
    metavar="HOST:PORT",
    help="MQTT over WebSocket listener; repeatable.",
)
@click.option(
    "--wss-listen",
    multiple=True,
    metavar="HOST:PORT",
    help="MQTT over secure WebSocket (wss) listener; repeatable. Needs server.tls_certfile/keyfile.",
)
@click.option(
    "--http-listen",
    metavar="HOST:PORT",
    help="HTTP listener (/metrics, /healthz, /readyz); '' disables. Default 127.0.0.1:8080.",
)
@click.option(
    "--dsn", help="PostgreSQL DSN; default: an embedded PostgreSQL in the data directory."
)
@click.option(
    "--no-db", is_flag=True, help="Run the broker alone: no PostgreSQL, ingest routes or presence."
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level."
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="Log lines as text (default) or one JSON object per line.",
)
@click.option(
    "--workers",
    type=int,
    metavar="N",
    help="Worker processes sharing the listeners (server.workers; ingest-only traffic,"
    " docs/scaling.md).",
)
def serve(
    listen: tuple[str, ...],
    no_listen: bool,
    config_path: str | None,
    data_dir: str | None,
    ws_listen: tuple[str, ...],
    wss_listen: tuple[str, ...],
    http_listen: str | None,
    dsn: str | None,
    no_db: bool,
    log_level: str | None,
    log_format: str | None,
    workers: int | None,
) -> None:
    """Run the broker and ingestion engine until SIGTERM or SIGINT."""
    from ingestd.config import load_config
    from ingestd.errors import ConfigError, DatabaseError

    overrides: dict[str, dict[str, object]] = {"server": {}, "database": {}}
    if ws_listen:
        overrides["server"]["ws_listen"] = list(ws_listen)
    if wss_listen:
        overrides["server"]["wss_listen"] = list(wss_listen)
    if http_listen is not None:
        overrides["server"]["http_listen"] = http_listen
    if dsn:
        overrides["database"]["dsn"] = dsn
    if listen and no_listen:
        click.echo("ingestd: --listen and --no-listen exclude each other", err=True)
        sys.exit(2)
    if listen:
        overrides["server"]["listen"] = list(listen)
    if no_listen:
        overrides["server"]["listen"] = []
    if data_dir:
        overrides["server"]["data_dir"] = data_dir
    if log_level:
        overrides["server"]["log_level"] = log_level
    if log_format:
        overrides["server"]["log_format"] = log_format
    if workers is not None:
        overrides["server"]["workers"] = workers
    try:
        cfg: Config = load_config(config_path, overrides=overrides)
        # Routes, lookups and tables are validated by compiling them.
        from ingestd.ingest.routes import compile_config

        compile_config(cfg, config_path)
    except ConfigError as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)
    from ingestd import logs

    logs.configure(cfg.server.log_level, cfg.server.log_format)
    from ingestd.app import App

    try:
        if cfg.server.workers > 1:
            from ingestd.workers import Supervisor

            sys.exit(Supervisor(cfg, database=not no_db).run())
        import uvloop

        uvloop.run(App(cfg, database=not no_db).run())
    except (ConfigError, DatabaseError) as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"ingestd: {exc}", err=True)
        sys.exit(1)


@main.group()
def config() -> None:
    """Validate or print configuration."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
def config_check(path: str) -> None:
    """Validate PATH without starting anything; exit 2 with file, key and reason if invalid."""
    from ingestd.broker.auth import check_files
    from ingestd.config import load_config
    from ingestd.errors import ConfigError
    from ingestd.ingest.routes import compile_config

    try:
        cfg = load_config(path)
        compile_config(cfg, path)
        check_files(cfg.mqtt)  # the password and ACL files, as start-up reads them
    except ConfigError as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{path}: OK")


@config.command("show")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
def config_show(config_path: str | None) -> None:
    """Print the effective configuration (defaults, file and INGESTD_* environment)."""
    from ingestd.config import dump_config, load_config
    from ingestd.errors import ConfigError

    try:
        click.echo(dump_config(load_config(config_path)))
    except ConfigError as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)


@main.group()
def db() -> None:
    """Database tasks: create tables, find and open the database ingestd writes to."""


def _db_config(config_path: str | None, dsn: str | None, data_dir: str | None) -> Config:
    from ingestd.config import load_config

    overrides: dict[str, dict[str, object]] = {"server": {}, "database": {}}
    if dsn:
        overrides["database"]["dsn"] = dsn
    if data_dir:
        overrides["server"]["data_dir"] = data_dir
    return load_config(config_path, overrides=overrides)


def _describe_db(cfg: Config) -> str:
    from ingestd.db import embedded_pgdata, redact_dsn

    if cfg.database.dsn:
        return redact_dsn(cfg.database.dsn)
    return f"embedded PostgreSQL in {embedded_pgdata(cfg.server.data_dir)}"


@db.command("init")
@_db_options
@click.option("--print", "print_only", is_flag=True, help="Print the SQL instead of running it.")
def db_init(
    config_path: str | None, dsn: str | None, data_dir: str | None, print_only: bool
) -> None:
    """Create missing tables and indexes for the configured routes and presence (and
    mqtt.credentials_table with its trigger, when set)."""
    from ingestd.broker.credentials import table_ddl
    from ingestd.errors import ConfigError, DatabaseError
    from ingestd.ingest.routes import compile_config
    from ingestd.ingest.schema import init_database, schema_sql
    from ingestd.users import init_credentials

    try:
        cfg = _db_config(config_path, dsn, data_dir)
        compiled = compile_config(cfg, config_path)
        creds = cfg.mqtt.credentials_table
        if print_only:
            click.echo(schema_sql(cfg, compiled))
            if creds:
                click.echo("".join(s + ";\n\n" for s in table_ddl(creds)))
            return
        click.echo(f"database: {_describe_db(cfg)}")
        for stmt in asyncio.run(init_database(cfg)) + asyncio.run(init_credentials(cfg)):
            click.echo(stmt.strip().splitlines()[0] + " ...")
    except (ConfigError, DatabaseError) as exc:
        click.echo(f"ingestd: {exc}", err=True)
        sys.exit(2)


@db.command("url")
@_db_options
def db_url(config_path: str | None, dsn: str | None, data_dir: str | None) -> None:
    """Print the DSN of the database ingestd writes to (for psql, Grafana, your code).

    The embedded PostgreSQL must be running (``ingestd serve`` runs it); its DSN
    names a Unix socket and the ``postgres`` role.
    """
    from ingestd.db import EmbeddedPostgres, embedded_pgdata
    from ingestd.errors import ConfigError

    try:
        cfg = _db_config(config_path, dsn, data_dir)
    except ConfigError as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)
    if cfg.database.dsn:
        click.echo(cfg.database.dsn)
        return
    pgdata = embedded_pgdata(cfg.server.data_dir)
    uri = EmbeddedPostgres(pgdata).running_uri()
    if uri is None:
        click.echo(
            f"ingestd: the embedded PostgreSQL in {pgdata} is not running; start"
            " `ingestd serve` (or use `ingestd db shell`, which starts it)",
            err=True,
        )
        sys.exit(1)
    click.echo(uri)


@db.command("shell", context_settings={"ignore_unknown_options": True})
@_db_options
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def db_shell(
    config_path: str | None, dsn: str | None, data_dir: str | None, psql_args: tuple[str, ...]
) -> None:
    """Run psql on the database ingestd writes to; PSQL_ARGS go to psql (after --).

    The embedded PostgreSQL is started for the session if it is not running,
    and stopped again when psql exits.
    """
    import subprocess

    from ingestd.db import EmbeddedPostgres, embedded_pgdata, psql_path
    from ingestd.errors import ConfigError, DatabaseError

    try:
        cfg = _db_config(config_path, dsn, data_dir)
    except ConfigError as exc:
        click.echo(f"ingestd: configuration error: {exc}", err=True)
        sys.exit(2)
    psql = psql_path()
    if psql is None:
        click.echo("ingestd: no psql found (pgserver's or on PATH)", err=True)
        sys.exit(1)
    embedded: EmbeddedPostgres | None = None
    target = cfg.database.dsn
    if not target:
        embedded = EmbeddedPostgres(embedded_pgdata(cfg.server.data_dir))
        try:
            target = embedded.start()
        except DatabaseError as exc:
            click.echo(f"ingestd: {exc}", err=True)
            sys.exit(2)
    try:
        rc = subprocess.call([psql, target, *psql_args])
    finally:
        if embedded is not None:
            embedded.stop()  # only if this command started it
    sys.exit(rc)


def _check_username(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ingestd.broker.passwords import valid_username

    if not valid_username(value):
        # The file is "user:hash" per line: a ':' would move the split.
        raise click.BadParameter("must be non-empty and contain no ':' or line break")
    return value


@main.command()
@click.argument("username", callback=_check_username)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
def passwd(username: str, password: str) -> None:
    """Print a password-file line for USERNAME (append it to mqtt.password_file)."""
    from ingestd.broker.passwords import hash_password

    click.echo(f"{username}:{hash_password(password)}")


def _register_plugins() -> None:
    from ingestd.bench.command import bench
    from ingestd.tune import tune
    from ingestd.users import user

    main.add_command(bench)
    main.add_command(tune)
    main.add_command(user)


_register_plugins()

if __name__ == "__main__":
    main()
