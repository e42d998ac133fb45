"""Event hooks ([[hooks]]): paho clients make events, a tiny aiohttp receiver gets them.

The receiver runs on its own thread and event loop; the broker on another
(tests/server_thread.py). Every wait is a condition with a generous deadline
(mqtt_clients.WAIT): nothing here depends on how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from ingestd.config import (
    HOOK_EVENTS,
    Config,
    ConfigError,
    HookConfig,
    ServerConfig,
    load_config,
)
from mqtt_clients import WAIT, Client
from server_thread import ServerThread


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every POSTed body.

    ``statuses``: the answers to give, in order (then 200); ``hang``: never answer
    until :meth:`release`.
    """

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.hang = hang
        self.requests: list[tuple[int, dict[str, str], list[dict[str, Any]]]] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 200
            self.requests.append((status, dict(request.headers), body))
        if self.hang:
            assert self._release is not None
            await self._release.wait()
        return web.Response(status=status, text="x")

    def start(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(WAIT)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def release(self) -> None:
        assert self._release is not None
        self.loop.call_soon_threadsafe(self._release.set)

    def delivered(self) -> list[dict[str, Any]]:
        """Events of the requests answered 2xx, in arrival order."""
        with self.lock:
            return [e for status, _, body in self.requests if status < 300 for e in body]

    def wait_for(self, cond: Callable[[list[dict[str, Any]]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if cond(self.delivered()):
                return
            time.sleep(0.01)
        raise AssertionError(f"receiver never got {what}; got {self.delivered()}")

    def stop(self) -> None:
        self.release()
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT)


@pytest.fixture
def receivers() -> Any:
    started: list[Receiver] = []

    def start(**kw: Any) -> Receiver:
        r = Receiver(**kw).start()
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


def serve(tmp_path: Path, *hooks: HookConfig) -> ServerThread:
    cfg = Config(
        server=ServerConfig(listen=["127.0.0.1:0"], http_listen=None, data_dir=str(tmp_path)),
        hooks=list(hooks),
    )
    return ServerThread(cfg).start()


def hook_counts(srv: ServerThread, name: str) -> dict[str, int]:
    assert srv.app is not None
    collector = srv.app.collector

    def read() -> dict[str, int]:
        (h,) = [h for h in collector.hooks if h.name == name]
        return {
            k: getattr(h, k) for k in ("queued", "sent", "failed", "dropped", "retries", "depth")
        }

    return srv.call(read)


def wait_counts(srv: ServerThread, name: str, cond: Callable[[dict[str, int]], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if cond(hook_counts(srv, name)):
            return
        time.sleep(0.01)
    raise AssertionError(f"hook {name}: {hook_counts(srv, name)}")


def test_lifecycle_and_message_events_reach_the_receiver(tmp_path: Path, receivers: Any) -> None:
    rx = receivers()
    hook = HookConfig(
        name="nas-sync",
        url=rx.url,
        events=list(HOOK_EVENTS),
        filter=["dev/+/up", "dev/#"],  # overlapping: still one event per message
        headers={"Authorization": "Bearer hook-secret"},
    )
    srv = serve(tmp_path, hook)
    try:
        router = Client(
            srv.port,
            client_id="router-7",
            username="nas",
            will=("dev/router-7/status", b"gone", 1, False),
        )
        router.subscribe("cmd/router-7", qos=1)
        router.unsubscribe("cmd/router-7")
        router.publish("dev/router-7/up", b"\x00\xffbinary", qos=1)
        router.publish("other/topic", b"not matched", qos=1)
        router.drop()  # no DISCONNECT: the will goes out
        v3 = Client(srv.port, client_id="sensor-3", version=4)
        v3.publish("dev/sensor-3/up", '{"t": 21.5}', qos=0)
        v3.disconnect()

        def done(events: list[dict[str, Any]]) -> bool:
            return any(
                e["event"] == "client.disconnected" and e["client_id"] == "sensor-3" for e in events
            ) and any(
                e["event"] == "client.disconnected" and e["client_id"] == "router-7" for e in events
            )

        rx.wait_for(done, "both disconnects")
    finally:
        srv.stop()
    events = rx.delivered()
    mine = [e for e in events if e["client_id"] == "router-7"]
    # The barrier subscription of the test client is an event too; the rest in order.
    kinds = [
        (e["event"], e.get("filter") or e.get("topic"))
        for e in mine
        if not str(e.get("filter", "")).startswith("barrier/")
    ]
    assert kinds == [
        ("client.connected", None),
        ("session.subscribed", "cmd/router-7"),
        ("session.unsubscribed", "cmd/router-7"),
        ("message.published", "dev/router-7/up"),
        ("message.published", "dev/router-7/status"),  # the will, as a message
        ("will.published", "dev/router-7/status"),
        ("client.disconnected", None),
    ], kinds
    conn = mine[0]
    assert conn["username"] == "nas" and conn["protocol"] == "5.0"
    assert conn["peer"].startswith("127.0.0.1:") and conn["transport"] == "tcp"
    assert isinstance(conn["ts"], float) and conn["clean_start"] is True
    sub = next(
        e for e in mine if e["event"] == "session.subscribed" and e["filter"] == "cmd/router-7"
    )
    assert sub["qos"] == 1
    msg = next(e for e in mine if e["event"] == "message.published")
    assert msg["payload_encoding"] == "base64" and msg["qos"] == 1 and msg["retain"] is False
    assert msg["payload"] == "AP9iaW5hcnk="  # base64 of b"\x00\xffbinary"
    will = next(e for e in mine if e["event"] == "will.published")
    assert (will["payload"], will["payload_encoding"], will["qos"]) == ("gone", "plain", 1)
    gone = mine[-1]
    assert gone["reason"] == "connection_lost" and gone["will_published"] is True
    sensor = [e for e in events if e["client_id"] == "sensor-3"]
    assert [e["event"] for e in sensor if e["event"] != "session.subscribed"] == [
        "client.connected",
        "message.published",
        "client.disconnected",
    ]
    assert sensor[0]["protocol"] == "3.1.1"
    assert next(e for e in sensor if e["event"] == "message.published")["payload"] == '{"t": 21.5}'
    assert sensor[-1]["reason"] == "normal" and sensor[-1]["will_published"] is False
    assert not any(e.get("topic") == "other/topic" for e in events)
    with rx.lock:
        headers = [h for _, h, _ in rx.requests]
    assert all(h["Authorization"] == "Bearer hook-secret" for h in headers)
    assert all(h["Content-Type"] == "application/json" for h in headers)


def test_a_500_then_200_is_retried_and_delivered(tmp_path: Path, receivers: Any) -> None:
    rx = receivers(statuses=[500])
    hook = HookConfig(
        name="retry", url=rx.url, events=["client.connected"], retry_initial_ms=10, retries=3
    )
    srv = serve(tmp_path, hook)
    try:
        c = Client(srv.port, client_id="comes-online")
        rx.wait_for(lambda ev: len(ev) == 1, "the retried event")
        wait_counts(srv, "retry", lambda n: n["sent"] == 1)
        counts = hook_counts(srv, "retry")
        c.disconnect()
    finally:
        srv.stop()
    with rx.lock:
        statuses = [s for s, _, _ in rx.requests]
        bodies = [b for _, _, b in rx.requests]
    assert statuses == [500, 200]
    assert bodies[0] == bodies[1]  # the same batch, sent again
    assert bodies[1][0]["event"] == "client.connected"
    assert bodies[1][0]["client_id"] == "comes-online"
    assert counts == {"queued": 1, "sent": 1, "failed": 0, "dropped": 0, "retries": 1, "depth": 0}


def test_a_4xx_is_not_retried_and_counts_as_failed(tmp_path: Path, receivers: Any) -> None:
    rx = receivers(statuses=[400])
    hook = HookConfig(name="refused", url=rx.url, events=["client.connected"], retry_initial_ms=10)
    srv = serve(tmp_path, hook)
    try:
        Client(srv.port).disconnect()
        wait_counts(srv, "refused", lambda n: n["failed"] == 1)
        counts = hook_counts(srv, "refused")
    finally:
        srv.stop()
    assert counts["retries"] == 0 and counts["sent"] == 0
    with rx.lock:
        assert [s for s, _, _ in rx.requests] == [400]


def test_a_hung_receiver_drops_counted_events_and_never_stalls_publishers(
    tmp_path: Path, receivers: Any
) -> None:
    rx = receivers(hang=True)
    hook = HookConfig(
        name="slow",
        url=rx.url,
        events=["message.published"],
        filter="load/#",
        max_queue=5,
        batch_max=1,
        timeout_s=600.0,  # the POST hangs for the whole test
        retries=0,
    )
    srv = serve(tmp_path, hook)
    n = 200
    try:
        sub = Client(srv.port)
        sub.subscribe("load/#", qos=1)
        pub = Client(srv.port)
        for i in range(n):
            pub.publish(f"load/{i % 7}", str(i), qos=1)  # waits for each PUBACK
        got = sub.expect(n)
        # The first POST is held by the receiver; what it could not queue was dropped.
        rx_requests = lambda: len(rx.requests)  # noqa: E731
        deadline = time.monotonic() + WAIT
        while rx_requests() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        counts = hook_counts(srv, "slow")
        rx.release()
        wait_counts(srv, "slow", lambda c: c["depth"] == 0)
        after = hook_counts(srv, "slow")
        pub.disconnect()
        sub.disconnect()
    finally:
        srv.stop()
    assert sorted(int(m.payload) for m in got) == list(range(n))
    assert counts["queued"] + counts["dropped"] == n  # every event: queued or counted
    # At most max_queue waiting plus batch_max in flight were kept.
    assert counts["queued"] <= 5 + 1 and counts["dropped"] >= n - 6
    assert counts["sent"] == 0 and counts["depth"] == counts["queued"]
    assert after["sent"] == counts["queued"] and after["dropped"] == counts["dropped"]


def hook_toml(tmp_path: Path, body: str) -> str:
    p = tmp_path / "hooks.toml"
    p.write_text('[[hooks]]\nname = "h"\nurl = "http://127.0.0.1:9/x"\n' + body)
    return str(p)


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ('events = ["client.connectd"]\n', "hooks[0].events[0]", "unknown event 'client.connectd'"),
        ("events = []\n", "hooks[0].events", "at least one event"),
        ('events = ["message.published"]\n', "hooks[0].filter", "needs the topic filters"),
        (
            'events = ["client.connected"]\nfilter = "a/#"\n',
            "hooks[0].filter",
            "only applies to the message.published",
        ),
        (
            'events = ["message.published"]\nfilter = ["a/#/b"]\n',
            "hooks[0].filter",
            "invalid topic filter 'a/#/b'",
        ),
        ('events = ["client.connected"]\nmax_queue = 0\n', "hooks[0].max_queue", "must be > 0"),
        ('events = ["client.connected"]\ntimeout_s = -1\n', "hooks[0].timeout_s", "must be > 0"),
        (
            'events = ["client.connected"]\nretry_initial_ms = 500\nretry_max_ms = 100\n',
            "hooks[0].retry_max_ms",
            "must be >= retry_initial_ms",
        ),
        (
            'events = ["client.connected"]\nheaders = { "Content-Type" = "text/plain" }\n',
            "hooks[0].headers.Content-Type",
            "set by ingestd itself",
        ),
        (
            'events = ["client.connected"]\nheaders = { "X-A" = "a\\nb" }\n',
            "hooks[0].headers.X-A",
            "CR, LF or NUL",
        ),
    ],
)
def test_bad_hook_config_names_file_key_and_reason(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    path = hook_toml(tmp_path, body)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    text = str(ei.value)
    assert path in text and key in text and reason in text, text


def test_bad_hook_url_and_duplicate_name(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[[hooks]]\nname = "h"\nurl = "ftp://x/y"\nevents = ["client.connected"]\n')
    with pytest.raises(ConfigError, match=r"hooks\[0\]\.url: must be an http:// or https://"):
        load_config(str(p))
    p.write_text(
        '[[hooks]]\nname = "h"\nurl = "http://a/"\nevents = ["client.connected"]\n'
        '[[hooks]]\nname = "h"\nurl = "http://b/"\nevents = ["client.connected"]\n'
    )
    with pytest.raises(ConfigError, match=r"hooks\[1\]\.name: duplicate hook name 'h'"):
        load_config(str(p))


def test_hook_config_round_trips_through_config_show(tmp_path: Path) -> None:
    from ingestd.config import dump_config

    path = hook_toml(
        tmp_path,
        'events = ["message.published", "client.connected"]\nfilter = ["a/+", "b/#"]\n'
        'headers = { Authorization = "Bearer t" }\nmax_queue = 7\n',
    )
    cfg = load_config(path)
    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)).hooks == cfg.hooks
    assert json.loads(json.dumps(cfg.hooks[0].headers)) == {"Authorization": "Bearer t"}


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[mqtt]\nsys_interval = -1\n", "mqtt.sys_interval", "must be >= 0"),
        ("[http]\nmax_body_bytes = 0\n", "http.max_body_bytes", "must be > 0"),
        ("[http]\ningest_wait_s = -0.5\n", "http.ingest_wait_s", "must be >= 0"),
    ],
)
def test_bad_sys_and_webhook_settings_name_file_key_and_reason(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(str(p))
    assert str(p) in str(ei.value) and f"{key}: {reason}" in str(ei.value), str(ei.value)
