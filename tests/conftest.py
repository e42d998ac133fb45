"""Shared fixtures: a real ingestd server on an ephemeral loopback port."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ingestd.config import Config, MqttConfig, ServerConfig
from pg_fixtures import *  # noqa: F403
from server_thread import ServerThread


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
