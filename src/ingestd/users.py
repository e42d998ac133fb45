"""``ingestd user ...``: the users of ``mqtt.credentials_table`` (docs/security.md).

Each command finds the database as ``ingestd db ...`` does (``--config``,
``--dsn``, ``--data-dir``; the embedded PostgreSQL is started for the command
when it is not running) and the table from ``mqtt.credentials_table`` (or
``--table``). Passwords are hashed here (``$pbkdf2-sha256$``, as ``ingestd
passwd``) and only the hash is sent; so are HTTP API tokens (``user token``:
SHA-256). A running broker sees every change at once (the table's trigger
NOTIFYs it): a disabled or deleted user is disconnected, its API token refused.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

if TYPE_CHECKING:
    from ingestd.config import Config

T = TypeVar("T")


@click.group()
def user() -> None:
    """Users of mqtt.credentials_table: add, list, disable, enable, passwd, token, delete."""


def db_options(f: Any) -> Any:
    """--config, --dsn and --data-dir: which database a command means (as `serve`)."""
    f = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Data directory whose embedded PostgreSQL to use (default: the configuration's).",
    )(f)
    f = click.option("--dsn", help="PostgreSQL DSN (default: the configuration's, else embedded).")(
        f
    )
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file."
    )(f)


def _options(f: Any) -> Any:
    """db_options and --table."""
    return db_options(
        click.option(
            "--table",
            help="The credentials table (default: the configuration's mqtt.credentials_table).",
        )(f)
    )


def _fail(message: str) -> NoReturn:
    click.echo(f"ingestd: {message}", err=True)
    sys.exit(2)


def _run(opts: dict[str, Any], action: Callable[[Any, str], Awaitable[T]]) -> T:
    """Connect as ``ingestd db`` does, make sure the table exists, run ``action(conn, table)``."""
    from ingestd.config import load_config
    from ingestd.errors import ConfigError, DatabaseError

    overrides: dict[str, dict[str, object]] = {"server": {}, "database": {}, "mqtt": {}}
    if opts["dsn"]:
        overrides["database"]["dsn"] = opts["dsn"]
    if opts["data_dir"]:
        overrides["server"]["data_dir"] = opts["data_dir"]
    if opts["table"]:
        overrides["mqtt"]["credentials_table"] = opts["table"]
    try:
        cfg: Config = load_config(opts["config_path"], overrides=overrides)
        table = cfg.mqtt.credentials_table
        if not table:
            raise ConfigError(
                "not set: name the table in the configuration or with --table",
                key="mqtt.credentials_table",
            )
        return asyncio.run(_with_connection(cfg, table, action))
    except (ConfigError, DatabaseError) as exc:
        _fail(str(exc))


async def _with_connection(
    cfg: Config, table: str, action: Callable[[Any, str], Awaitable[T]], *, ensure: bool = True
) -> T:
    import asyncpg

    from ingestd.broker.credentials import ensure_table
    from ingestd.db import Database, redact_dsn
    from ingestd.errors import DatabaseError

    db = await Database.start(cfg, connect=False)
    try:
        try:
            conn = await asyncpg.connect(db.dsn, timeout=cfg.database.connect_timeout)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as e:
            raise DatabaseError(f"cannot connect to {redact_dsn(db.dsn)}: {e}") from e
        try:
            if ensure:
                await ensure_table(conn, table)
            return await action(conn, table)
        except asyncpg.PostgresError as e:
            raise DatabaseError(f"{table}: {e}") from e
        finally:
            await conn.close()
    finally:
        await db.close()


def _username(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ingestd.broker.credentials import username_problem

    why = username_problem(value)
    if why is not None:
        raise click.BadParameter(why)
    return value


def _prefix(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ingestd.broker.credentials import normalize_prefix, prefix_problem

    if value is None:
        return None
    value = normalize_prefix(value)
    why = prefix_problem(value)
    if why is not None:
        raise click.BadParameter(why)
    return value


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        _fail("the password must not be empty")
    return password


_stdin_option = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)


@user.command("add")
@click.argument("username", callback=_username)
@_stdin_option
@click.option("--client-id", help="The only client id this user may connect with.")
@click.option(
    "--prefix",
    callback=_prefix,
    help="Tenant topic prefix: grants readwrite on PREFIX/# (e.g. org_7/devices).",
)
@_options
def add(
    username: str, password_stdin: bool, client_id: str | None, prefix: str | None, **opts: Any
) -> None:
    """Add USERNAME (enabled); the password is prompted for, or read with --password-stdin."""
    from ingestd.broker.credentials import add_user
    from ingestd.broker.passwords import hash_password

    stored = hash_password(_read_password(password_stdin))
    _run(opts, lambda conn, table: add_user(conn, table, username, stored, client_id, prefix))
    click.echo(f"user {username!r} added")


@user.command("list")
@_options
def list_(**opts: Any) -> None:
    """List the users (never their hashes)."""
    from ingestd.broker.credentials import list_users

    rows = _run(opts, list_users)
    for r in rows:
        click.echo(
            f"{r['username']}\t{'enabled' if r['enabled'] else 'disabled'}"
            f"\tclient_id={r['client_id'] or '-'}\tprefix={r['topic_prefix'] or '-'}"
            f"\tapi_token={'yes' if r['has_token'] else 'no'}"
            f"\tupdated={r['updated_at'].isoformat(timespec='seconds')}"
        )
    click.echo(f"{len(rows)} users", err=True)


def _setter(name: str, column: str, value: Any, done: str, doc: str) -> None:
    def command(username: str, **opts: Any) -> None:
        from ingestd.broker.credentials import update_user

        _run(opts, lambda conn, table: update_user(conn, table, username, column, value))
        click.echo(f"user {username!r} {done}")

    command.__doc__ = doc
    user.command(name)(_options(click.argument("username", callback=_username)(command)))


_setter(
    "disable",
    "enabled",
    False,
    "disabled",
    "Disable USERNAME: refused from now on; a running broker disconnects it.",
)
_setter("enable", "enabled", True, "enabled", "Enable USERNAME again.")


@user.command("passwd")
@click.argument("username", callback=_username)
@_stdin_option
@_options
def passwd(username: str, password_stdin: bool, **opts: Any) -> None:
    """Set USERNAME's password (its live connections are closed: they used the old one)."""
    from ingestd.broker.credentials import update_user
    from ingestd.broker.passwords import hash_password

    stored = hash_password(_read_password(password_stdin))
    _run(opts, lambda conn, table: update_user(conn, table, username, "password_hash", stored))
    click.echo(f"password of {username!r} changed")


@user.command("token")
@click.argument("username", callback=_username)
@click.option("--revoke", is_flag=True, help="Remove USERNAME's API token instead.")
@_options
def token(username: str, revoke: bool, **opts: Any) -> None:
    """Give USERNAME a new HTTP API token (printed once; it replaces any old one), or
    --revoke it. The token acts as USERNAME with its ACL rights (docs/api.md)."""
    from ingestd.broker.credentials import api_token_hash, new_api_token, update_user

    secret = None if revoke else new_api_token()
    stored = None if secret is None else api_token_hash(secret)
    _run(opts, lambda conn, table: update_user(conn, table, username, "api_token_hash", stored))
    if secret is None:
        click.echo(f"API token of {username!r} revoked", err=True)
    else:
        # Only its hash is stored: this is the one time it can be seen.
        click.echo(f"API token of {username!r} (shown once; only its hash is stored):", err=True)
        click.echo(secret)


@user.command("delete")
@click.argument("username", callback=_username)
@_options
def delete(username: str, **opts: Any) -> None:
    """Delete USERNAME; a running broker disconnects it."""
    from ingestd.broker.credentials import delete_user

    _run(opts, lambda conn, table: delete_user(conn, table, username))
    click.echo(f"user {username!r} deleted")


async def init_credentials(cfg: Config) -> list[str]:
    """``ingestd db init``: create the credentials table (when configured) where missing."""
    from ingestd.broker.credentials import ensure_table

    table = cfg.mqtt.credentials_table
    if not table:
        return []
    return await _with_connection(cfg, table, ensure_table, ensure=False)
