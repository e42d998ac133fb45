// MQTT.js over WebSocket against ingestd. Usage: node interop.mjs ws://127.0.0.1:PORT
// Prints one JSON object with what happened; the Python test asserts on it.
import mqtt from "mqtt";

const url = process.argv[2];
const result = {};

async function main() {
  const sub = await mqtt.connectAsync(url, {
    protocolVersion: 5,
    clientId: "js-sub",
    clean: true,
    reconnectPeriod: 0,
  });
  result.connack = { sessionPresent: false };
  const granted = await sub.subscribeAsync("js/+/data", {
    qos: 1,
    properties: { subscriptionIdentifier: 5 },
  });
  result.granted = granted.map((g) => g.qos);
  const received = new Promise((resolve) => {
    const msgs = [];
    sub.on("message", (topic, payload, packet) => {
      if (topic === "js/big/data") return;
      msgs.push({
        topic,
        payload: payload.toString(),
        qos: packet.qos,
        subId: packet.properties?.subscriptionIdentifier,
        userProperties: packet.properties?.userProperties,
      });
      if (msgs.length === 3) resolve(msgs);
    });
  });
  const pub = await mqtt.connectAsync(url, { protocolVersion: 4, clientId: "js-pub-v3", reconnectPeriod: 0 });
  const pub5 = await mqtt.connectAsync(url, { protocolVersion: 5, clientId: "js-pub-v5", reconnectPeriod: 0 });
  await pub.publishAsync("js/a/data", "from-v3-qos0", { qos: 0 });
  await pub.publishAsync("js/b/data", "from-v3-qos2", { qos: 2 });
  await pub5.publishAsync("js/c/data", "from-v5-qos1", {
    qos: 1,
    properties: { userProperties: { site: "north" } },
  });
  result.messages = (await received).slice(0, 3);
  // A big message spanning many WebSocket frames' worth of TCP segments.
  const big = "x".repeat(200000);
  const gotBig = new Promise((resolve) => sub.on("message", (t, p) => t === "js/big/data" && resolve(p.length)));
  await pub5.publishAsync("js/big/data", big, { qos: 1 });
  result.bigLength = await gotBig;
  await Promise.all([sub.endAsync(), pub.endAsync(), pub5.endAsync()]);
}

const timer = setTimeout(() => {
  console.log(JSON.stringify({ error: "timeout", partial: result }));
  process.exit(2);
}, 20000);
main()
  .then(() => {
    clearTimeout(timer);
    console.log(JSON.stringify(result));
  })
  .catch((err) => {
    clearTimeout(timer);
    console.log(JSON.stringify({ error: String(err), partial: result }));
    process.exit(1);
  });
