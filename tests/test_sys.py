"""$SYS/ingestd/... statistics, seen by paho subscribers (MQTT 5 and 3.1.1).

Updates are waited for as conditions (the value a subscriber holds reaches the
expected one), never by sleeping for an interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingestd import __version__
from ingestd.broker.sysinfo import SYS_TOPICS
from mqtt_clients import WAIT, Client
from server_thread import ServerThread


class SysView:
    """The latest value of every $SYS topic one client received."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.values: dict[str, str] = {}
        self.retained: dict[str, bool] = {}

    def pump(self) -> None:
        while not self.client.messages.empty():
            m = self.client.messages.get_nowait()
            self.values[m.topic] = m.payload.decode()
            self.retained[m.topic] = bool(m.retain)

    def wait(self, cond: Callable[[dict[str, str]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            self.pump()
            if cond(self.values):
                return
            time.sleep(0.01)
        raise AssertionError(f"$SYS never showed {what}: {self.values}")


def test_sys_topics_reach_sys_subscribers_only(
    server_factory: Callable[..., ServerThread],
) -> None:
    srv = server_factory(sys_interval=0.05)
    everything = Client(srv.port, version=4)
    everything.subscribe("#", qos=0)
    plus = Client(srv.port)
    plus.subscribe("+/ingestd/#", qos=0)
    dash = Client(srv.port)
    dash.subscribe("$SYS/#", qos=0)
    view = SysView(dash)
    # Retained: a new subscriber gets every value at once, without waiting for a tick.
    view.wait(lambda v: len(v) == len(SYS_TOPICS) - 3, "every broker topic")  # no ingest: -3
    assert view.values["$SYS/ingestd/version"] == __version__
    assert all(view.retained.values())
    assert {t.removeprefix("$SYS/ingestd/") for t in view.values} == set(SYS_TOPICS) - {
        "ingest/rows",
        "ingest/pending_rows",
        "ingest/dead_letters",
    }
    pub = Client(srv.port)
    for i in range(5):
        pub.publish(f"load/{i}", b"x", qos=1)
    # Counters follow: five more PUBLISHes received, four clients connected.
    view.wait(lambda v: int(v["$SYS/ingestd/messages/received"]) >= 5, "the publishes")
    view.wait(lambda v: v["$SYS/ingestd/clients/connected"] == "4", "four clients")
    view.wait(lambda v: int(v["$SYS/ingestd/uptime"]) >= 0, "uptime")
    # (One tick publishes its topics one after another: wait for this one too.)
    view.wait(lambda v: int(v["$SYS/ingestd/subscriptions/count"]) >= 3, "3 subscriptions")
    # A persistent session outlives its connection: counted as disconnected.
    Client(srv.port, client_id="sys-persistent", session_expiry=300).disconnect()
    view.wait(
        lambda v: (
            v["$SYS/ingestd/clients/disconnected"] == "1"
            and v["$SYS/ingestd/clients/total"] == "5"
            and v["$SYS/ingestd/clients/connected"] == "4"
        ),
        "one offline session",
    )
    # Those ticks were routed after `everything` and `plus` subscribed; a barrier on
    # each makes sure any copy of them would have arrived by now.
    everything.barrier()
    plus.barrier()
    got = []
    while not everything.messages.empty():
        got.append(everything.messages.get_nowait().topic)
    assert not [t for t in got if t.startswith("$")]
    assert sorted(t for t in got if not t.startswith("barrier/")) == [f"load/{i}" for i in range(5)]
    assert plus.messages.empty()
    # Not stored in the database-less broker's retained listing for '#' either.
    assert srv.call(lambda: [m.topic for m in srv.app.broker.retained.match("#")]) == []  # type: ignore[union-attr]


def test_acl_decides_who_reads_sys(
    tmp_path: Path, server_factory: Callable[..., ServerThread]
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(
        "pattern readwrite barrier/%c\n"
        "user dash\ntopic read $SYS/ingestd/#\n"
        "user device\ntopic readwrite dev/#\n"
    )
    srv = server_factory(acl_file=str(acl), sys_interval=0.05)
    device = Client(srv.port, username="device")
    device.subscribe("$SYS/#", qos=0)
    device.subscribe("dev/#", qos=0)
    dash = Client(srv.port, username="dash")
    dash.subscribe("$SYS/#", qos=0)
    view = SysView(dash)
    view.wait(lambda v: "$SYS/ingestd/clients/connected" in v, "the retained values")
    view.values.clear()
    # A device's publish changes messages/received: a new tick follows.
    device.publish("dev/a", b"1", qos=1)
    view.wait(lambda v: "$SYS/ingestd/messages/received" in v, "a fresh tick")
    device.barrier()
    got: list[Any] = []
    while not device.messages.empty():
        got.append(device.messages.get_nowait().topic)
    assert got == ["dev/a"]
    # Clients may not write $SYS (acl__check_dollar), whatever their ACL lines.
    stats = srv.call(lambda: srv.app.broker.stats.acl_denied_publish)  # type: ignore[union-attr]
    device.publish("$SYS/ingestd/version", b"fake", qos=1)
    assert srv.call(lambda: srv.app.broker.stats.acl_denied_publish) == stats + 1  # type: ignore[union-attr]
    assert srv.call(lambda: srv.app.broker.retained.get("$SYS/ingestd/version").payload) == (  # type: ignore[union-attr]
        __version__.encode()
    )


def test_sys_interval_zero_publishes_nothing(
    server_factory: Callable[..., ServerThread],
) -> None:
    srv = server_factory(sys_interval=0)
    dash = Client(srv.port)
    dash.subscribe("$SYS/#", qos=0)
    dash.expect_nothing()
    assert srv.call(lambda: list(srv.app.broker.retained.match("$SYS/#"))) == []  # type: ignore[union-attr]


def test_no_client_writes_sys_even_without_an_acl(
    server_factory: Callable[..., ServerThread],
) -> None:
    """As Mosquitto's acl__check_dollar: the statistics cannot be forged by a client."""
    srv = server_factory(sys_interval=0.05)
    dash = Client(srv.port)
    dash.subscribe("$SYS/ingestd/version", qos=0)
    (m,) = dash.expect()
    assert m.payload == __version__.encode()
    v5 = Client(srv.port)
    info = v5.c.publish("$SYS/ingestd/version", b"forged", 1, retain=True)
    info.wait_for_publish(WAIT)
    v3 = Client(srv.port, version=4)
    v3.publish("$SYS/ingestd/version", b"forged too", qos=1, retain=True)  # PUBACKed
    # A will on $SYS is refused at CONNECT (v5: 0x87 Not authorized).
    Client(srv.port, will=("$SYS/ingestd/version", b"will", 0, True), connect=False).connect(
        expect_rc=0x87
    )
    dash.expect_nothing()
    assert srv.call(lambda: srv.app.broker.retained.get("$SYS/ingestd/version").payload) == (  # type: ignore[union-attr]
        __version__.encode()
    )
    assert srv.call(lambda: srv.app.broker.stats.acl_denied_publish) == 3  # type: ignore[union-attr]
