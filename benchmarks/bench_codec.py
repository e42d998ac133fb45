"""Micro-benchmarks of the compiled MQTT codec (pytest-benchmark).

Usage::

    PYTHONPATH=src .venv/bin/python -m pytest benchmarks/bench_codec.py --benchmark-enable -q

Decode and encode of CONNECT, PUBLISH (QoS 0 and 1, 100-byte and 4 KiB
payloads, MQTT 3.1.1 and 5) and SUBSCRIBE, plus the broker's hot loop: 1000
QoS 0 PUBLISH packets fed as one buffer (``ns_per_packet`` in extra_info).
"""

from __future__ import annotations

import pytest
from ingestd._codec import (
    Connect,
    Decoder,
    Subscribe,
    Will,
    encode,
    encode_ack,
    encode_publish,
)

TOPIC = "company/42/machine/1337/telemetry"
PAYLOADS = {"100B": bytes(range(100)), "4KB": bytes(4096)}
BATCH = 1000

CONNECT = Connect(
    protocol_level=5,
    client_id="machine-1337",
    keepalive=30,
    username="device",
    password=b"secret",
    will=Will(topic="company/42/machine/1337/status", payload=b"offline", qos=1, retain=True),
    properties={0x11: 3600, 0x21: 100, 0x27: 1 << 20},
)
SUBSCRIBE = Subscribe(
    packet_id=1,
    subscriptions=[
        ("company/+/machine/+/telemetry", 1, False, False, 0),
        ("company/42/#", 0, True, False, 2),
    ],
    properties={0x0B: [7]},
)


def connected(version: int) -> Decoder:
    d = Decoder(server_side=True)
    d.feed(encode(Connect(protocol_level=version), version))
    return d


def test_decode_connect(benchmark):
    data = encode(CONNECT, 5)
    got = benchmark(lambda: Decoder(server_side=True).feed(data))
    assert got[0] == CONNECT


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", sorted(PAYLOADS))
def test_decode_publish(benchmark, size, qos, version):
    d = connected(version)
    data = encode_publish(TOPIC, PAYLOADS[size], qos, False, False, 1 if qos else 0, None, version)
    got = benchmark(d.feed, data)
    assert got[0].payload == PAYLOADS[size]


@pytest.mark.parametrize("version", [4, 5])
def test_decode_1000_publish_qos0_100B_one_buffer(benchmark, version):
    d = connected(version)
    one = encode_publish(TOPIC, PAYLOADS["100B"], 0, False, False, 0, None, version)
    data = one * BATCH
    got = benchmark(d.feed, data)
    assert len(got) == BATCH
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.mean / BATCH * 1e9, 1)


def test_decode_subscribe(benchmark):
    d = connected(5)
    data = encode(SUBSCRIBE, 5)
    got = benchmark(d.feed, data)
    assert got[0] == SUBSCRIBE


def test_decode_puback(benchmark):
    d = connected(5)
    data = encode_ack(4, 1, 0, 5)
    assert len(benchmark(d.feed, data)) == 1


def test_encode_connect(benchmark):
    benchmark(encode, CONNECT, 5)


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("size", sorted(PAYLOADS))
def test_encode_publish(benchmark, size, qos, version):
    payload = PAYLOADS[size]
    benchmark(encode_publish, TOPIC, payload, qos, False, False, 1 if qos else 0, None, version)


def test_encode_publish_with_properties(benchmark):
    props = {0x01: 1, 0x02: 60, 0x26: [("k", "v")]}
    benchmark(encode_publish, TOPIC, PAYLOADS["100B"], 1, False, False, 1, props, 5)


def test_encode_subscribe(benchmark):
    benchmark(encode, SUBSCRIBE, 5)


def test_encode_ack(benchmark):
    benchmark(encode_ack, 4, 1234, 0, 5)
