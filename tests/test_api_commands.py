"""Device commands and RPC (POST /api/devices/{client_id}/commands/{name}, .../rpc).

Devices are real paho clients (MQTT 5 and 3.1.1) that subscribe to their command
topics and answer RPC requests from their own network thread; the API is called
over TCP with urllib (tests/test_api.py's client). Every wait is bounded; the
short RPC timeouts are inputs, never asserted on.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import pytest

from ingestd.config import (
    Config,
    DeviceSchemeConfig,
    DevicesConfig,
    HttpConfig,
    ServerConfig,
    load_config,
)
from ingestd.errors import ConfigError
from mqtt_clients import WAIT, Client, props
from server_thread import ServerThread
from test_api import Api, error_of

MACHINES = DeviceSchemeConfig(
    name="machines",
    match="company/{company_id}/machine/{machine_id}/#",
    command_topic="company/{company_id}/machine/{machine_id}/command/{name}",
    rpc_request_topic="company/{company_id}/machine/{machine_id}/rpc/request",
    rpc_response_topic="company/{company_id}/machine/{machine_id}/rpc/response",
)
ROUTERS = DeviceSchemeConfig(
    name="routers",
    client_id="router-{id}",
    command_topic="spotfi/router/{id}/cmd/{name}",
    qos=0,
    rpc_request_topic="spotfi/router/{id}/rpc/request",
    rpc_response_topic="spotfi/router/{id}/rpc/response",
    rpc_correlation_field="id",
)
# MQTT 5 headsets whose firmware answers through a JSON field, not the v5 properties.
HEADSETS = DeviceSchemeConfig(
    name="headsets",
    client_id="vr-{n}",
    command_topic="vr/{n}/cmd/{name}",
    rpc_request_topic="vr/{n}/rpc/req",
    rpc_response_topic="vr/{n}/rpc/res",
    rpc_correlation_field="rid",
    rpc_style="json",
)


def schemes_config(tmp_path: Path, **http: Any) -> Config:
    return Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"], http_listen="127.0.0.1:0", data_dir=str(tmp_path)
        ),
        http=HttpConfig(**http),
        devices=DevicesConfig(schemes=[MACHINES, ROUTERS, HEADSETS]),
    )


@pytest.fixture
def srv(tmp_path: Path) -> Any:
    st = ServerThread(schemes_config(tmp_path, rpc_max_pending=2)).start()
    yield st
    st.stop()


def pending(srv: ServerThread) -> int:
    return srv.call(lambda: len(srv.app.http.api.commands.pending))  # type: ignore[union-attr]


# -- commands --------------------------------------------------------------------------


def test_command_goes_to_the_topic_learned_from_what_the_device_published(
    srv: ServerThread,
) -> None:
    api = Api(srv)
    dev = Client(srv.port, version=5)
    dev.subscribe("company/7/machine/42/command/#", qos=1)
    # Before it published anything the broker knows the client but not its variables.
    status, _, data = api.call("POST", f"/api/devices/{dev.client_id}/commands/reboot", {})
    assert "has not published" in error_of(status, data, 409, "variables_unknown")
    dev.publish("company/7/machine/42/telemetry", b'{"t": 1}', qos=1)
    body = {"payload_json": {"delay": 5}, "properties": {"user_properties": {"by": "ops"}}}
    out = api.ok("POST", f"/api/devices/{dev.client_id}/commands/reboot", body)
    assert out == {
        "ok": True,
        "client_id": dev.client_id,
        "command": "reboot",
        "scheme": "machines",
        "topic": "company/7/machine/42/command/reboot",
        "qos": 1,
        "retain": False,
        "delivery": "delivered",
    }
    (m,) = dev.expect()
    assert (m.topic, json.loads(m.payload), m.qos) == (
        "company/7/machine/42/command/reboot",
        {"delay": 5},
        1,
    )
    assert m.properties.UserProperty == [("by", "ops")]
    # The last matching topic wins: the device moved to another machine id.
    dev.publish("company/7/machine/43/status", b"up", qos=1)
    dev.subscribe("company/7/machine/43/command/#", qos=1)
    out = api.ok(
        "POST", f"/api/devices/{dev.client_id}/commands/stop", {"payload": "now", "qos": 0}
    )
    assert (out["topic"], out["qos"]) == ("company/7/machine/43/command/stop", 0)
    (m,) = dev.expect()
    assert (m.topic, m.payload) == ("company/7/machine/43/command/stop", b"now")


def test_command_qos1_to_an_offline_persistent_session_is_queued(srv: ServerThread) -> None:
    api = Api(srv)
    dev = Client(srv.port, version=5, clean_start=False, session_expiry=600)
    dev.subscribe("company/1/machine/9/command/+", qos=1)
    dev.publish("company/1/machine/9/telemetry", b"{}", qos=1)
    dev.disconnect()
    out = api.ok("POST", f"/api/devices/{dev.client_id}/commands/update", {"payload": "v2"})
    assert (out["delivery"], out["qos"]) == ("queued", 1)
    # QoS 0 to the offline session is not kept (as for any MQTT publish).
    out = api.ok("POST", f"/api/devices/{dev.client_id}/commands/ping", {"qos": 0})
    assert out["delivery"] == "dropped"
    dev.connect(clean_start=False)
    (m,) = dev.expect()
    assert (m.topic, m.payload, m.qos) == ("company/1/machine/9/command/update", b"v2", 1)
    dev.expect_nothing()


def test_command_from_client_id_variables_reaches_a_v311_device(srv: ServerThread) -> None:
    api = Api(srv)
    router = Client(srv.port, client_id="router-17", version=4)
    router.subscribe("spotfi/router/17/cmd/#", qos=1)
    out = api.ok("POST", "/api/devices/router-17/commands/reboot", {"payload": "x"})
    assert (out["scheme"], out["topic"], out["qos"], out["delivery"]) == (
        "routers",
        "spotfi/router/17/cmd/reboot",
        0,  # the scheme's default QoS
        "delivered",
    )
    (m,) = router.expect()
    assert (m.topic, m.payload) == ("spotfi/router/17/cmd/reboot", b"x")
    # A device that never connected, but whose topic the client id gives, is still sent to.
    out = api.ok("POST", "/api/devices/router-18/commands/reboot", {})
    assert (out["topic"], out["delivery"]) == ("spotfi/router/18/cmd/reboot", "no_session")
    # Subscribed to something else: the answer says nobody got it.
    other = Client(srv.port, client_id="router-19", version=4)
    other.subscribe("spotfi/router/19/other", qos=1)
    out = api.ok("POST", "/api/devices/router-19/commands/reboot", {})
    assert out["delivery"] == "not_subscribed"


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "needle"),
    [
        ("/api/devices/nobody/commands/x", {}, 404, "device_unknown", "no session for client id"),
        ("/api/devices/router-a+b/commands/x", {}, 422, "invalid_variable", "{id} = 'a+b'"),
        ("/api/devices/router-1/commands/a+b", {}, 400, "bad_request", "command name 'a+b'"),
        (
            "/api/devices/router-1/commands/x",
            {"topic": "a"},
            400,
            "bad_request",
            "unknown field 'topic'",
        ),
        (
            "/api/devices/router-1/commands/x",
            {"qos": 3},
            400,
            "bad_request",
            "qos: expected 0, 1 or 2",
        ),
        ("/api/devices/router-1/commands/x", [], 400, "bad_request", "expected a JSON object"),
    ],
)
def test_command_errors(
    srv: ServerThread, path: str, body: Any, status: int, code: str, needle: str
) -> None:
    st, _, data = Api(srv).call("POST", path, body)
    assert needle in error_of(st, data, status, code)


def test_without_schemes_commands_use_the_default_topic(tmp_path: Path) -> None:
    cfg = Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"], http_listen="127.0.0.1:0", data_dir=str(tmp_path)
        )
    )
    st = ServerThread(cfg).start()
    try:
        api = Api(st)
        dev = Client(st.port, version=5)
        dev.subscribe(f"devices/{dev.client_id}/commands/#", qos=1)
        out = api.ok("POST", f"/api/devices/{dev.client_id}/commands/blink", {"payload_json": [1]})
        assert (out["scheme"], out["qos"], out["delivery"]) == ("default", 1, "delivered")
        (m,) = dev.expect()
        assert (m.topic, m.payload) == (f"devices/{dev.client_id}/commands/blink", b"[1]")
        # A 3.1.1 device cannot be given a response topic, and the default scheme has no
        # request/response pair for it.
        v3 = Client(st.port, version=4)
        status, _, data = api.call("POST", f"/api/devices/{v3.client_id}/rpc", {})
        assert "rpc_response_topic" in error_of(status, data, 422, "rpc_unsupported")
    finally:
        st.stop()


# -- RPC -----------------------------------------------------------------------------


def answer_v5(dev: Client, reply: Any = None, wrong_first: bool = False) -> None:
    """Make the paho v5 ``dev`` answer each request on its Response Topic."""

    def on_message(c: Any, userdata: Any, m: Any) -> None:
        rt = getattr(m.properties, "ResponseTopic", None)
        if not rt:
            dev.messages.put(m)
            return
        if wrong_first:
            c.publish(rt, b'{"wrong": true}', 1, properties=props(CorrelationData=b"other"))
        p = props(CorrelationData=m.properties.CorrelationData, UserProperty=[("status", "ok")])
        answer = reply if reply is not None else {"echo": json.loads(m.payload or b"null")}
        c.publish(rt, json.dumps(answer), 1, properties=p)

    dev.c.on_message = on_message


def test_rpc_v5_device_answers_on_its_response_topic(srv: ServerThread) -> None:
    api = Api(srv)
    dev = Client(srv.port, version=5)
    dev.subscribe("company/3/machine/5/rpc/request", qos=1)
    dev.publish("company/3/machine/5/telemetry", b"{}", qos=1)
    answer_v5(dev)
    out = api.ok(
        "POST",
        f"/api/devices/{dev.client_id}/rpc",
        {"payload_json": {"get": "temp"}, "timeout_ms": 10_000},
    )
    assert out["ok"] is True and out["client_id"] == dev.client_id
    assert out["request_topic"] == "company/3/machine/5/rpc/request"
    assert out["reply_topic"] == f"ingestd/rpc/{dev.client_id}/{out['request_id']}"
    reply = out["reply"]
    assert reply["payload"] == {"echo": {"get": "temp"}}
    assert reply["payload_encoding"] == "json"
    assert reply["topic"] == out["reply_topic"]
    assert reply["properties"]["user_properties"] == [["status", "ok"]]
    assert pending(srv) == 0


def test_rpc_v5_reply_with_another_correlation_is_ignored(srv: ServerThread) -> None:
    api = Api(srv)
    dev = Client(srv.port, version=5)
    dev.subscribe("company/3/machine/6/rpc/request", qos=1)
    dev.publish("company/3/machine/6/telemetry", b"{}", qos=1)
    answer_v5(dev, reply="plain text reply", wrong_first=True)
    out = api.ok("POST", f"/api/devices/{dev.client_id}/rpc", {"payload": "hi"})
    assert (out["reply"]["payload"], out["reply"]["payload_encoding"]) == (
        "plain text reply",
        "json",  # a JSON string is JSON
    )


def test_rpc_v311_device_answers_with_the_correlation_field(srv: ServerThread) -> None:
    api = Api(srv)
    router = Client(srv.port, client_id="router-77", version=4)
    router.subscribe("spotfi/router/77/rpc/request", qos=1)
    requests: queue.Queue[dict[str, Any]] = queue.Queue()

    def on_message(c: Any, userdata: Any, m: Any) -> None:
        req = json.loads(m.payload)
        requests.put(req)
        # First an answer to some other request, then binary junk, then the right one.
        c.publish("spotfi/router/77/rpc/response", json.dumps({"id": "not-yours", "r": 0}), 1)
        c.publish("spotfi/router/77/rpc/response", b"\xff\x00", 1)
        c.publish(
            "spotfi/router/77/rpc/response",
            json.dumps({"id": req["id"], "result": req["x"] * 2}),
            1,
        )

    router.c.on_message = on_message
    out = api.ok("POST", "/api/devices/router-77/rpc", {"payload_json": {"method": "dbl", "x": 21}})
    req = requests.get(timeout=WAIT)
    assert req == {"method": "dbl", "x": 21, "id": out["request_id"]}
    assert out["reply_topic"] == "spotfi/router/77/rpc/response"
    assert out["reply"]["payload"] == {"id": out["request_id"], "result": 42}
    # A 3.1.1 request must be a JSON object: the id goes in it.
    status, _, data = api.call("POST", "/api/devices/router-77/rpc", {"payload": "text"})
    assert "must be a JSON object" in error_of(status, data, 400, "bad_request")
    assert pending(srv) == 0


def test_rpc_style_json_serves_a_v5_device_that_answers_in_the_payload(
    srv: ServerThread,
) -> None:
    api = Api(srv)
    vr = Client(srv.port, client_id="vr-3", version=5)
    vr.subscribe("vr/3/rpc/req", qos=1)

    def on_message(c: Any, userdata: Any, m: Any) -> None:
        req = json.loads(m.payload)
        # No Response Topic was given: the scheme's JSON convention is used.
        assert getattr(m.properties, "ResponseTopic", None) is None
        c.publish("vr/3/rpc/res", json.dumps({"rid": req["rid"], "battery": 81}), 1)

    vr.c.on_message = on_message
    out = api.ok("POST", "/api/devices/vr-3/rpc", {"payload_json": {"get": "battery"}})
    assert out["reply"]["payload"] == {"rid": out["request_id"], "battery": 81}
    assert out["reply_topic"] == "vr/3/rpc/res"


def test_rpc_timeouts_answer_504_and_clean_up(srv: ServerThread) -> None:
    api = Api(srv)
    silent = Client(srv.port, client_id="router-5", version=4)
    silent.subscribe("spotfi/router/5/rpc/request", qos=1)
    status, _, data = api.call("POST", "/api/devices/router-5/rpc", {"timeout_ms": 200})
    msg = error_of(status, data, 504, "rpc_timeout")
    assert "no reply from 'router-5'" in msg
    (req,) = silent.expect()  # the request did go out
    assert json.loads(req.payload)["id"] == data["error"]["request_id"]
    # A v5 device that only ever answers with a wrong correlation.
    wrong = Client(srv.port, version=5)
    wrong.subscribe("company/8/machine/8/rpc/request", qos=1)
    wrong.publish("company/8/machine/8/x", b"", qos=1)

    def on_message(c: Any, userdata: Any, m: Any) -> None:
        c.publish(m.properties.ResponseTopic, b"{}", 1, properties=props(CorrelationData=b"nope"))

    wrong.c.on_message = on_message
    status, _, data = api.call("POST", f"/api/devices/{wrong.client_id}/rpc", {"timeout_ms": 300})
    assert "1 message(s) there carried another correlation" in error_of(
        status, data, 504, "rpc_timeout"
    )
    assert pending(srv) == 0
    # Nothing of the reply waiters is left in the trie: a reply now reaches no one.
    n = srv.call(lambda: len(srv.app.broker.trie.match_all("spotfi/router/5/rpc/response")[0]))  # type: ignore[union-attr]
    assert n == 0


def test_rpc_pending_table_is_bounded(srv: ServerThread) -> None:
    api = Api(srv)
    dev = Client(srv.port, client_id="router-60", version=4)
    dev.subscribe("spotfi/router/60/rpc/request", qos=1)
    results: queue.Queue[tuple[int, Any]] = queue.Queue()

    def call() -> None:
        status, _, data = api.call("POST", "/api/devices/router-60/rpc", {"timeout_ms": 20_000})
        results.put((status, data))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    requests = [json.loads(m.payload) for m in dev.expect(2)]  # both wait now (max 2)
    assert pending(srv) == 2
    status, headers, data = api.call("POST", "/api/devices/router-60/rpc", {})
    assert "rpc_max_pending" in error_of(status, data, 503, "busy")
    assert headers.get("Retry-After") == "1"
    for r in requests:
        dev.publish("spotfi/router/60/rpc/response", json.dumps({"id": r["id"], "ok": 1}), qos=1)
    for t in threads:
        t.join(WAIT)
    got = [results.get(timeout=WAIT) for _ in range(2)]
    assert sorted(d["request_id"] for s, d in got if s == 200) == sorted(r["id"] for r in requests)
    assert pending(srv) == 0


def test_rpc_errors(srv: ServerThread) -> None:
    api = Api(srv)
    status, _, data = api.call("POST", "/api/devices/router-1/rpc", {"timeout_ms": 30_001})
    assert "from 1 to 30000" in error_of(status, data, 400, "bad_request")
    status, _, data = api.call("POST", "/api/devices/router-1/rpc", {"timeout_ms": "5"})
    error_of(status, data, 400, "bad_request")
    status, _, data = api.call("POST", "/api/devices/router-1/rpc", {})
    assert "not connected" in error_of(status, data, 409, "offline")
    body = {"properties": {"response_topic": "x"}}
    status, _, data = api.call("POST", "/api/devices/router-1/rpc", body)
    assert "set by the RPC" in error_of(status, data, 400, "bad_request")


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key", "needle"),
    [
        (
            '[[devices.schemes]]\nname = "m"\nmatch = "a/{x}/#"\ncommand_topic = "c/{y}"\n',
            "devices.schemes[0].command_topic",
            "{y} in 'c/{y}' is not a variable of this scheme",
        ),
        (
            '[[devices.schemes]]\nname = "m"\nmatch = "a/x{x}/#"\n',
            "devices.schemes[0].match",
            "a placeholder must be a whole topic level",
        ),
        (
            '[[devices.schemes]]\nname = "m"\nmatch = "a/b"\n',
            "devices.schemes[0].match",
            "nothing to learn",
        ),
        (
            '[[devices.schemes]]\nname = "m"\nclient_id = "r-{id}"\nrpc_response_topic = "r/{id}/#"\n',
            "devices.schemes[0].rpc_response_topic",
            "does not make a valid topic name",
        ),
        (
            '[[devices.schemes]]\nname = "m"\n[[devices.schemes]]\nname = "m"\n',
            "devices.schemes[1].name",
            "used twice",
        ),
        (
            '[http]\ntokens = [{token = "t", user = "alice"}]\n',
            "http.tokens[0].user",
            "needs mqtt.acl_file",
        ),
        ('[http]\ntokens = ["a", "a"]\n', "http.tokens[1]", "listed twice"),
        (
            '[[devices.schemes]]\nname = "m"\nrpc_style = "json"\n',
            "devices.schemes[0].rpc_style",
            "needs rpc_response_topic",
        ),
        (
            "[http]\nrpc_timeout_default_ms = 9000\nrpc_timeout_max_ms = 1000\n",
            "http.rpc_timeout_default_ms",
            "must be <= http.rpc_timeout_max_ms",
        ),
        ('[http]\nrpc_response_prefix = "$x"\n', "http.rpc_response_prefix", "not start with '$'"),
    ],
)
def test_config_errors_name_file_key_and_reason(
    tmp_path: Path, toml: str, key: str, needle: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert e.value.key == key, str(e.value)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_user_tokens_and_schemes_load_from_toml(tmp_path: Path) -> None:
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic readwrite alice/#\n")
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[mqtt]\nacl_file = "{acl}"\n'
        '[http]\ntokens = ["admin", {token = "t-alice", user = "alice"}]\n'
        '[[devices.schemes]]\nname = "m"\nclient_id = "r-{id}"\n'
        'command_topic = "r/{id}/c/{name}"\n'
    )
    cfg = load_config(str(path))
    assert cfg.http.tokens[0] == "admin"
    assert (cfg.http.tokens[1].token, cfg.http.tokens[1].user) == ("t-alice", "alice")  # type: ignore[union-attr]
    assert cfg.devices.schemes[0].command_topic == "r/{id}/c/{name}"
    # `config show` writes it back as TOML that loads to the same thing.
    from ingestd.config.dump import dump_config

    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_config(str(again)) == cfg


FAST_PATH_ROUTES = """
[server]
http_listen = "127.0.0.1:0"
[presence]
enabled = false

[[routes]]
name = "machine_telemetry"
topic = "company/{company}/machine/{machine}/telemetry"
table = "dev_telemetry"
[routes.columns]
machine = "topic.machine"
t = "payload.t::double precision"

[[devices.schemes]]
name = "machines"
match = "company/{company_id}/machine/{machine_id}/#"
command_topic = "company/{company_id}/machine/{machine_id}/command/{name}"
"""


def test_variables_are_learned_from_publishes_the_fast_path_takes(
    pg_dsn: str, tmp_path: Path
) -> None:
    from pg_fixtures import config_from_toml, wait_rows

    cfg = config_from_toml(FAST_PATH_ROUTES, tmp_path, pg_dsn)
    cfg.server.listen = ["127.0.0.1:0"]
    st = ServerThread(cfg, database=True).start()
    try:
        dev = Client(st.port, version=4)
        dev.subscribe("company/acme/machine/m-1/command/#", qos=1)
        for i in range(3):
            dev.publish("company/acme/machine/m-1/telemetry", json.dumps({"t": i}), qos=1)
        wait_rows(pg_dsn, "SELECT count(*) FROM dev_telemetry", until=lambda r: r[0][0] == 3)
        taken = st.call(lambda: sum(c.inbound.taken for c in st.app.broker.connections))  # type: ignore[union-attr]
        assert taken == 3  # every telemetry PUBLISH took the compiled fast path
        out = Api(st).ok("POST", f"/api/devices/{dev.client_id}/commands/calibrate", {})
        assert (out["topic"], out["delivery"]) == (
            "company/acme/machine/m-1/command/calibrate",
            "delivered",
        )
        (m,) = dev.expect()
        assert m.topic == "company/acme/machine/m-1/command/calibrate"
    finally:
        st.stop()


def test_rpc_reply_under_an_acl_that_grants_devices_their_own_reply_topics(
    tmp_path: Path,
) -> None:
    from ingestd.config import MqttConfig

    acl = tmp_path / "acl"
    acl.write_text(
        "pattern readwrite barrier/%c\n"
        "pattern read devices/%c/commands/#\n"
        "pattern write ingestd/rpc/%c/#\n"
    )
    cfg = Config(
        server=ServerConfig(
            listen=["127.0.0.1:0"], http_listen="127.0.0.1:0", data_dir=str(tmp_path)
        ),
        mqtt=MqttConfig(acl_file=str(acl)),
    )
    st = ServerThread(cfg).start()
    try:
        api = Api(st)
        dev = Client(st.port, version=5)
        dev.subscribe(f"devices/{dev.client_id}/commands/#", qos=1)
        answer_v5(dev, reply={"ok": True})
        out = api.ok("POST", f"/api/devices/{dev.client_id}/rpc", {"payload_json": {}})
        assert out["reply"]["payload"] == {"ok": True}
        # Another client may not answer in its place: its reply is refused by the ACL.
        thief = Client(st.port, version=5)
        seen: queue.Queue[Any] = queue.Queue()
        dev.c.on_message = lambda c, u, m: seen.put(m)
        results: queue.Queue[tuple[int, Any]] = queue.Queue()
        t = threading.Thread(
            target=lambda: results.put(
                api.call("POST", f"/api/devices/{dev.client_id}/rpc", {"timeout_ms": 500})[::2]
            )
        )
        t.start()
        req = seen.get(timeout=WAIT)
        thief.publish(
            req.properties.ResponseTopic,
            b"forged",
            qos=1,
            properties=props(CorrelationData=req.properties.CorrelationData),
        )
        status, data = results.get(timeout=WAIT)
        t.join(WAIT)
        error_of(status, data, 504, "rpc_timeout")
        denied = st.call(lambda: st.app.broker.stats.acl_denied_publish)  # type: ignore[union-attr]
        assert denied >= 1
    finally:
        st.stop()
