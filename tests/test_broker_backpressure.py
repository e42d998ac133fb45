"""A subscriber that never reads must not stall publishers or grow memory without bound."""

from __future__ import annotations

from mqtt_clients import Client
from rawmqtt import Raw, connect_v5, packet, s


def test_stalled_subscriber_is_bounded_and_others_keep_flowing(server_factory):
    bound = 64 * 1024
    srv = server_factory(max_outbound_bytes=bound, max_queued_messages=100)
    # A raw subscriber that subscribes (QoS 0 and QoS 1) and then never reads its socket.
    stalled = Raw(srv.port)
    stalled.send(connect_v5("stalled"))
    assert stalled.read_packet()[0] == 0x20
    stalled.send(packet(0x82, b"\x00\x01\x00" + s("flood/q0") + b"\x00" + s("flood/q1") + b"\x01"))
    assert stalled.read_packet()[0] == 0x90
    healthy = Client(srv.port)
    healthy.subscribe("flood/#", 1)
    pub = Client(srv.port)
    payload = b"x" * 1000
    n = 20_000  # ~20 MB, far beyond the kernel's socket buffers
    for _ in range(n):
        pub.c.publish("flood/q0", payload, 0)
    for i in range(300):
        pub.publish("flood/q1", str(i).encode(), 1)
    # The publisher was never blocked (every QoS 1 publish above was acknowledged) and the
    # healthy subscriber got every QoS 1 message.
    q1 = []
    while len(q1) < 300:
        m = healthy.messages.get(timeout=30)
        if m.topic == "flood/q1":
            q1.append(int(m.payload))
    assert q1 == list(range(300))

    def state():
        b = srv.app.broker
        conn = b.sessions["stalled"].connection
        sess = b.sessions["stalled"]
        return (
            conn.port.get_write_buffer_size(),  # not yet flushed + the transport's buffer
            len(sess.queue or ()),
            len(sess.inflight),
            dict(b.stats.dropped),
        )

    buffered, queued, inflight, dropped = srv.call(state)
    # Memory held for the stalled subscriber stays within its bounds.
    assert buffered <= bound + len(payload) + 64  # at most one packet past the bound
    assert queued <= 100
    assert inflight <= 256
    # and what could not be held was dropped and counted, by reason
    assert dropped.get("qos0_queue_full", 0) > 0
    assert dropped.get("session_queue_full", 0) > 0
    stalled.sock.close()
