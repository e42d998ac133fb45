// The ingestd console: polls /api and renders with textContent only (device ids,
// topics and payloads come from clients; none of it is ever parsed as HTML).
"use strict";

const STATS_MS = 2000;   // /api/stats: counters only, cheap
const LISTS_MS = 5000;   // devices, dead letters, retained: bounded queries
const TOKEN_KEY = "ingestd.token";
const $ = (id) => document.getElementById(id);

class NeedToken extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (resp.status === 401) {
    // A request sent before the token was entered must not ask again.
    if (sessionStorage.getItem(TOKEN_KEY) === token) $("token-form").hidden = false;
    throw new NeedToken("the API needs a bearer token");
  }
  if (!resp.ok) {
    const err = new Error(body && body.error ? body.error.message : resp.status + " " + resp.statusText);
    err.code = body && body.error ? body.error.code : String(resp.status);
    throw err;
  }
  return body;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tableId, items, render) {
  const body = $(tableId).tBodies[0];
  const rows = items.map((item) => {
    const tr = document.createElement("tr");
    render(tr, item);
    return tr;
  });
  body.replaceChildren(...rows);
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(iso).toLocaleString();
}

function stateSummary(state, clientId) {
  // One line per row; the column holding the client id itself is left out.
  const parts = [];
  for (const [table, rows] of Object.entries(state || {})) {
    for (const r of rows) {
      const fields = Object.entries(r).filter(([, v]) => v !== clientId && v !== null);
      parts.push(table + ": " + fields.map(([k, v]) => k + "=" + (typeof v === "string" ? v : JSON.stringify(v))).join(" "));
    }
  }
  return parts.join("\n");
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// -- rates ---------------------------------------------------------------------

let previous = null;

function rate(now, before, pick) {
  if (!before) return "–";
  const dt = now.time - before.time;
  if (dt <= 0) return "–";
  return (Math.max(0, pick(now) - pick(before)) / dt).toFixed(1);
}

async function refreshStats() {
  const s = await api("/api/stats");
  $("r-conn").textContent = s.broker.connections;
  $("r-in").textContent = rate(s, previous, (x) => x.broker.messages_received);
  $("r-out").textContent = rate(s, previous, (x) => x.broker.messages_delivered);
  $("r-rows").textContent = s.ingest ? rate(s, previous, (x) => x.ingest.rows) : "–";
  $("r-pending").textContent = s.ingest ? s.ingest.pending_rows : "–";
  $("r-dead").textContent = s.ingest ? s.ingest.dead_letters : "–";
  $("r-retained").textContent = s.broker.retained;
  previous = s;
  fill("routes", s.routes, (tr, r) => {
    cell(tr, r.name);
    cell(tr, r.topic);
    cell(tr, r.table);
    cell(tr, r.kind + (r.device_state ? " (device state: " + r.device_state + ")" : ""));
    cell(tr, r.table_rows);
    cell(tr, r.dead_letters, r.dead_letters ? "error" : "");
  });
}

// -- lists ---------------------------------------------------------------------

async function showDevice(clientId) {
  const d = await api("/api/devices/" + encodeURIComponent(clientId));
  const out = $("device-detail");
  out.textContent = JSON.stringify(d, null, 2);
  out.hidden = false;
}

async function refreshDevices() {
  const q = new URLSearchParams({ limit: "200" });
  if ($("f-prefix").value) q.set("client_id_prefix", $("f-prefix").value);
  if ($("f-online").value) q.set("online", $("f-online").value);
  const data = await api("/api/devices?" + q);
  $("devices-more").hidden = data.next === null;
  fill("devices", data.devices, (tr, d) => {
    tr.className = "device";
    tr.dataset.clientId = d.client_id;
    cell(tr, d.client_id);
    cell(tr, d.online ? "online" : "offline" + (d.disconnect_reason ? " (" + d.disconnect_reason + ")" : ""),
      d.online ? "online" : "offline");
    cell(tr, ago(d.last_seen)).title = d.last_seen || "";
    cell(tr, d.username);
    cell(tr, d.peer);
    cell(tr, d.protocol);
    cell(tr, stateSummary(d.state, d.client_id));
    tr.addEventListener("click", () => showDevice(d.client_id).catch(report));
  });
}

async function refreshDeadLetters() {
  try {
    const data = await api("/api/dead-letters?limit=20");
    fill("dead", data.dead_letters, (tr, d) => {
      cell(tr, d.received_at);
      cell(tr, d.route);
      cell(tr, d.topic);
      cell(tr, d.client_id);
      cell(tr, d.error, "error");
    });
  } catch (e) {
    if (e.code !== "no_database") throw e;
    fill("dead", [e.message], (tr, m) => cell(tr, m));
  }
}

async function refreshRetained() {
  const data = await api("/api/retained?limit=50");
  fill("retained", data.messages, (tr, m) => {
    cell(tr, m.topic);
    cell(tr, m.qos);
    cell(tr, m.payload_encoding === "plain" ? m.payload.slice(0, 200) : "(binary, base64) " + m.payload.slice(0, 80));
  });
}

// -- loop ----------------------------------------------------------------------

function report(e) {
  setStatus(e.message, true);
}

async function tick(fn) {
  if (document.hidden) return;
  try {
    await fn();
    setStatus("updated " + new Date().toLocaleTimeString(), false);
  } catch (e) {
    report(e);
  }
}

function refreshLists() {
  return Promise.all([refreshDevices(), refreshDeadLetters(), refreshRetained()]);
}

async function publish(ev) {
  ev.preventDefault();
  const body = {
    topic: $("p-topic").value,
    payload: $("p-payload").value,
    qos: Number($("p-qos").value),
    retain: $("p-retain").checked,
  };
  const result = $("p-result");
  try {
    const r = await api("/api/publish", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    result.textContent = "published " + r.bytes + " bytes to " + r.topic + " (QoS " + r.qos + ")";
    result.className = "";
  } catch (e) {
    result.textContent = e.message;
    result.className = "error";
  }
}

function start() {
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    $("token-form").hidden = true;
    tick(refreshStats);
    tick(refreshLists);
  });
  $("device-filter").addEventListener("input", () => tick(refreshDevices));
  $("device-filter").addEventListener("submit", (ev) => ev.preventDefault());
  $("publish").addEventListener("submit", publish);
  tick(refreshStats);
  tick(refreshLists);
  setInterval(() => tick(refreshStats), STATS_MS);
  setInterval(() => tick(refreshLists), LISTS_MS);
}

start();
