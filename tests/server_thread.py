"""Run a real ingestd App on uvloop in a background thread, on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import uvloop

from ingestd.app import App
from ingestd.config import Config

T = TypeVar("T")


class ServerThread:
    def __init__(self, config: Config, database: bool = False) -> None:
        self.config = config
        self.database = database
        self.loop = uvloop.new_event_loop()
        self.app: App | None = None
        self._thread = threading.Thread(target=self._run, name="ingestd-test-server", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.app = App(self.config, database=self.database)
            self.loop.run_until_complete(self.app.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        # App.run freezes everything alive at start-up out of the garbage collector (right
        # for a server process). Here that is every earlier test's leftovers too (paho
        # clients and their sockets in reference cycles): never freed, they piled up past
        # 1024 descriptors, where paho's select() fails and late tests could not connect.
        gc.unfreeze()
        return self

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port("mqtt")

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """Run ``fn`` on the server's loop thread (to inspect broker state safely)."""

        async def _wrap() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(_wrap(), self.loop).result(timeout)

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.app is not None and self.loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop).result(30)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        if not self.loop.is_running():
            self.loop.close()


def start_with_http(config: Config, database: bool = True) -> ServerThread:
    """A server with MQTT and HTTP on ephemeral loopback ports (the API open there)."""
    config.server.listen = ["127.0.0.1:0"]
    config.server.http_listen = "127.0.0.1:0"
    return ServerThread(config, database=database).start()
