// MQTT.js over WebSocket publishing telemetry into ingestd's ingest routes.
// Usage: node ingest.mjs ws://127.0.0.1:PORT/mqtt COUNT
// MQTT 5 with automatic topic aliases and a user property on every 10th
// message, QoS 1, many PUBLISHes in flight at once (so the server reads them
// in runs). Prints one JSON object, then stays connected until stdin closes
// (so the test can look at the connection); the Python test checks the rows.
import mqtt from "mqtt";

const url = process.argv[2];
const count = Number(process.argv[3] || 500);

async function main() {
  const c = await mqtt.connectAsync(url, {
    protocolVersion: 5,
    clientId: "js-ingest",
    clean: true,
    reconnectPeriod: 0,
    autoAssignTopicAlias: true,
  });
  const sends = [];
  for (let seq = 0; seq < count; seq++) {
    const dev = `js${seq % 3}`;
    const opts = { qos: 1 };
    if (seq % 10 === 0) opts.properties = { userProperties: { note: `n${seq}` } };
    sends.push(c.publishAsync(`fp/${dev}/t`, JSON.stringify({ seq }), opts));
  }
  await Promise.all(sends);
  console.log(JSON.stringify({ acked: sends.length }));
  await new Promise((resolve) => {
    process.stdin.on("end", resolve);
    process.stdin.resume();
  });
  await c.endAsync();
}

main().catch((e) => {
  console.log(JSON.stringify({ error: String(e && e.stack ? e.stack : e) }));
  process.exit(1);
});
