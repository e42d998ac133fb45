"""Shared fixtures: a real ingestd server on an ephemeral loopback port."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ingestd.config import Config, MqttConfig, ServerConfig
from mqtt_clients import close_all
from pg_fixtures import *  # noqa: F403
from server_thread import ServerThread


def pytest_configure(config: pytest.Config) -> None:
    """Each run gets its own temporary root (unless --basetemp names one).

    The embedded PostgreSQL runs as a non-root user when the suite runs as root, so
    pgserver opens the directories above a test's data directory to it
    (``chmod o+rx``). pytest's shared ``/tmp/pytest-of-<user>`` is reset to 0700 by
    every other pytest run that starts meanwhile, which took that access away from a
    concurrent run's PostgreSQL (pg_ctl: Permission denied).
    """
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="ingestd-pytest-")
        config._ingestd_basetemp = config.option.basetemp  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    own = getattr(config, "_ingestd_basetemp", None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(autouse=True)
def _close_mqtt_clients() -> Iterator[None]:
    """Whatever paho clients a test left connected are closed after it (and after its
    servers stopped): their threads and sockets must not pile up over the suite."""
    yield
    close_all()


def make_config(tmp_path: Path, **mqtt: object) -> Config:
    return Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        mqtt=MqttConfig(**mqtt),  # type: ignore[arg-type]
    )


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers with MqttConfig overrides; all are stopped at the end of the test."""
    started: list[ServerThread] = []

    def start(config: Config | None = None, **mqtt: object) -> ServerThread:
        st = ServerThread(config or make_config(tmp_path, **mqtt)).start()
        started.append(st)
        return st

    yield start
    for st in started:
        st.stop()


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> ServerThread:
    """A broker with the default configuration."""
    return server_factory()
