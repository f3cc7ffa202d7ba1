// @ts-check
// The rtnode console: sign in, watch the node's stats (pushed in the room sys:stats), drive a room.
import { connect } from "/rtnode.js";

const $ = (/** @type {string} */ id) => /** @type {any} */ (document.getElementById(id));
const STALE_MS = 5000; // a node silent this long leaves the totals
const CHART_POINTS = 60;
const MAX_LOG = 200;

/** @type {import("./rtnode").Client | null} */
let client = null;
let config = { dev: false, node: "", stats_room: "sys:stats" };
/** @type {Map<string, {snap: any, at: number}>} */
const nodes = new Map();
/** @type {{in: number, out: number}[]} */
const series = [];
let currentRoom = "";
/** @type {number | null} */
let oldestHistorySeq = null;

function setStatus(/** @type {string} */ text) {
  $("status").textContent = text;
}

async function loadConfig() {
  try {
    const r = await fetch("/console.json", { cache: "no-store" });
    if (r.ok) config = { ...config, ...(await r.json()) };
  } catch {
    // served elsewhere: no dev token button
  }
  $("devtoken").hidden = !config.dev;
}

async function devToken() {
  const r = await fetch("/dev/token", { method: "POST" });
  if (!r.ok) throw new Error(`development token refused (${r.status})`);
  return (await r.json()).token;
}

/** @param {{token?: string, getToken?: () => Promise<string>}} auth */
function signIn(auth) {
  signOut(false);
  $("signin-error").textContent = "";
  const c = connect({ ...auth, clientName: "rtnode-console" });
  client = c;
  c.on("connecting", (d) => setStatus(d.attempt ? `reconnecting (attempt ${d.attempt})…` : "connecting…"));
  c.on("connected", (info) => {
    setStatus(`connected to ${info.node} as ${info.client_id}`);
    $("signin").hidden = true;
    $("app").hidden = false;
    $("signout").hidden = false;
  });
  c.on("disconnected", (d) => setStatus(`disconnected: ${d.code} ${d.reason}`));
  c.on("recovered", (d) => {
    if (d.room === currentRoom) $("room-status").textContent = `events of ${d.room} were missed: reloaded from history`;
    if (d.room === currentRoom) loadHistory(true);
  });
  c.on("closed", (d) => {
    if (client !== c) return;
    setStatus(`signed out: ${d.code} ${d.reason}`);
    $("signin-error").textContent = d.code === 1000 ? "" : `The node ended the session: ${d.code} ${d.reason}`;
    showSignIn();
  });
  c.join(config.stats_room, { onEvent: onStats }).then(
    () => { $("stats-note").textContent = ""; },
    (e) => { $("stats-note").textContent = `No live stats: this token cannot join ${config.stats_room} (${e.code} ${e.reason}).`; },
  );
  if (auth.token) sessionStorage.setItem("rtnode-console-token", auth.token);
  else sessionStorage.setItem("rtnode-console-token", "dev");
}

function showSignIn() {
  $("signin").hidden = false;
  $("app").hidden = true;
  $("signout").hidden = true;
}

function signOut(forget = true) {
  const c = client;
  client = null;
  if (c) c.close();
  currentRoom = "";
  nodes.clear();
  series.length = 0;
  if (forget) {
    sessionStorage.removeItem("rtnode-console-token");
    showSignIn();
    setStatus("signed out");
  }
}

// -- live stats ---------------------------------------------------------------------------

/** @param {import("./rtnode").RoomEvent} ev */
function onStats(ev) {
  if (ev.event !== "stats" || !ev.data || typeof ev.data !== "object") return;
  const snap = /** @type {any} */ (ev.data);
  nodes.set(String(snap.node), { snap, at: Date.now() });
  renderStats();
}

function totals() {
  const now = Date.now();
  const t = { nodes: 0, connections: 0, rooms: 0, in_per_s: 0, out_per_s: 0, published: 0,
    slow_consumers: 0, rate_limited: 0, js_errors: 0, nats_down: 0,
    /** @type {Record<string, number>} */ by: {}, /** @type {string[]} */ roomNames: [] };
  for (const [name, { snap, at }] of nodes) {
    if (now - at > STALE_MS) {
      nodes.delete(name);
      continue;
    }
    t.nodes += 1;
    t.connections += snap.connections_total ?? 0;
    t.rooms += snap.rooms ?? 0;
    t.in_per_s += snap.in_per_s ?? 0;
    t.out_per_s += snap.out_per_s ?? 0;
    t.published += snap.published ?? 0;
    t.slow_consumers += snap.slow_consumers ?? 0;
    t.rate_limited += snap.rate_limited ?? 0;
    t.js_errors += snap.jetstream?.errors ?? 0;
    if (!snap.nats_connected) t.nats_down += 1;
    for (const [k, v] of Object.entries(snap.connections ?? {})) t.by[k] = (t.by[k] ?? 0) + Number(v);
    for (const r of snap.room_names ?? []) if (!t.roomNames.includes(r)) t.roomNames.push(r);
  }
  return t;
}

function renderStats() {
  const t = totals();
  const set = (/** @type {string} */ k, /** @type {any} */ v) => {
    const el = document.querySelector(`[data-stat="${k}"]`);
    if (el) el.textContent = String(v);
  };
  set("nodes", t.nodes);
  set("connections", t.connections);
  set("rooms", t.rooms);
  set("in_per_s", round(t.in_per_s));
  set("out_per_s", round(t.out_per_s));
  set("published", t.published);
  set("slow_consumers", t.slow_consumers);
  set("rate_limited", t.rate_limited);
  set("jetstream", t.nats_down ? `${t.nats_down} node(s) without NATS` : `ok, ${t.js_errors} errors`);
  $("nodes-label").textContent = `(${t.nodes} node${t.nodes === 1 ? "" : "s"})`;
  replaceList($("by-transport"), Object.entries(t.by).sort(), ([k, v]) => {
    const li = document.createElement("li");
    li.textContent = `${k}: ${v}`;
    li.dataset.transport = k;
    return li;
  });
  replaceList($("node-list"), [...nodes.values()], ({ snap }) => {
    const li = document.createElement("li");
    li.textContent = `${snap.node}: ${snap.connections_total} connections, ${snap.rooms} rooms, ` +
      `${round(snap.in_per_s)} in/s, ${round(snap.out_per_s)} out/s${snap.draining ? " (draining)" : ""}`;
    return li;
  });
  replaceList($("room-list"), t.roomNames.slice(0, 50), (name) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = name;
    b.setAttribute("aria-label", `Open room ${name}`);
    b.addEventListener("click", () => {
      $("room-name").value = name;
      openRoom(name, $("room-presence").checked);
    });
    li.append(b);
    return li;
  });
  series.push({ in: t.in_per_s, out: t.out_per_s });
  if (series.length > CHART_POINTS) series.shift();
  drawChart();
}

/** @param {number} n */
const round = (n) => Math.round(n * 10) / 10;

/**
 * @template T
 * @param {HTMLElement} el @param {T[]} items @param {(item: T) => HTMLElement} make
 */
function replaceList(el, items, make) {
  el.replaceChildren(...items.map(make));
}

function drawChart() {
  const canvas = /** @type {HTMLCanvasElement} */ ($("chart"));
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(100, canvas.clientWidth);
  const h = Math.max(60, canvas.clientHeight);
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const g = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.map((p) => Math.max(p.in, p.out)));
  g.strokeStyle = "#e3e7ec";
  g.fillStyle = "#5b6470";
  g.font = "11px system-ui, sans-serif";
  for (const frac of [0, 0.5, 1]) {
    const y = h - 16 - frac * (h - 28);
    g.beginPath();
    g.moveTo(30, y);
    g.lineTo(w - 4, y);
    g.stroke();
    g.fillText(String(round(max * frac)), 2, y + 4);
  }
  const line = (/** @type {"in" | "out"} */ key, /** @type {string} */ color) => {
    g.strokeStyle = color;
    g.lineWidth = 2;
    g.beginPath();
    series.forEach((p, i) => {
      const x = 30 + (i / (CHART_POINTS - 1)) * (w - 34);
      const y = h - 16 - (p[key] / max) * (h - 28);
      if (i === 0) g.moveTo(x, y);
      else g.lineTo(x, y);
    });
    g.stroke();
  };
  line("in", "#0b7a3e");
  line("out", "#b3261e");
  const last = series[series.length - 1];
  if (last) {
    canvas.setAttribute("aria-label",
      `Events per second over the last ${series.length} seconds: now ${round(last.in)} in, ${round(last.out)} out`);
  }
}

// -- room view ----------------------------------------------------------------------------

/** @param {string} room @param {boolean} presence */
async function openRoom(room, presence) {
  const c = client;
  if (!c) return;
  const previous = currentRoom;
  currentRoom = room;
  if (previous && previous !== room && previous !== config.stats_room) c.leave(previous).catch(() => {});
  $("events").replaceChildren();
  $("state-rows").replaceChildren();
  $("state-view").hidden = true;
  $("history").replaceChildren();
  $("presence").replaceChildren();
  oldestHistorySeq = null;
  $("room-status").textContent = `joining ${room}…`;
  try {
    const joined = await c.join(room, {
      presence,
      onEvent: (ev) => {
        if (ev.room !== currentRoom) return;
        addEvent(ev);
        if (ev.event.startsWith("presence:")) loadPresence();
      },
      onState: (change) => {
        if (change.room === currentRoom) renderState(change);
      },
    });
    if (currentRoom !== room) return;
    $("room-status").textContent = `${room}: joined at seq ${joined.seq} (epoch ${joined.epoch})`;
    $("publish-form").querySelector("button").disabled = false;
    $("history-more").disabled = false;
    await Promise.all([loadHistory(true), presence ? loadPresence() : Promise.resolve()]);
  } catch (e) {
    const err = /** @type {any} */ (e);
    $("room-status").textContent = `cannot join ${room}: ${err.code ?? ""} ${err.reason ?? err.message}`;
  }
}

/** The state view of a state room: one row per key, live. @param {any} change */
function renderState(change) {
  const room = change.room;
  /** @type {Map<string, any>} */
  const values = change.values;
  $("state-view").hidden = false;
  $("state-count").textContent = `(${values.size} key${values.size === 1 ? "" : "s"})`;
  const keys = [...values.keys()].sort();
  replaceList($("state-rows"), keys, (key) => {
    const ev = values.get(key);
    const tr = document.createElement("tr");
    tr.dataset.key = key;
    if (change.key === key) tr.className = "fresh";
    const cell = (/** @type {string | HTMLElement} */ content) => {
      const td = document.createElement("td");
      td.append(content);
      tr.append(td);
      return td;
    };
    const k = document.createElement("code");
    k.textContent = key;
    cell(k);
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(ev.data);
    cell(pre).dataset.value = "";
    const who = ev.from ? `${ev.from.kind ?? "?"} ${ev.from.user ?? "?"}` : "?";
    cell(`${who} · ${ev.event}`);
    cell(`${ev.ts ? new Date(ev.ts).toLocaleTimeString() : ""} · #${ev.seq}`);
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = "Remove";
    b.setAttribute("aria-label", `Remove key ${key}`);
    b.addEventListener("click", () => {
      client?.unset(room, key).catch((e) => {
        $("pub-result").textContent = `not removed: ${e.code ?? ""} ${e.reason ?? e.message}`;
      });
    });
    cell(b);
    return tr;
  });
}

/** @param {any} ev */
function eventItem(ev) {
  const li = document.createElement("li");
  const meta = document.createElement("div");
  meta.className = "meta";
  const who = ev.from ? `${ev.from.kind ?? "?"} ${ev.from.user ?? "?"}` : "";
  const when = ev.ts ? new Date(ev.ts).toLocaleTimeString() : "";
  const key = ev.key != null ? ` · key ${ev.key}${ev.unset ? " (unset)" : ""}` : "";
  meta.textContent = `${ev.seq != null ? `#${ev.seq}` : "volatile"} · ${ev.event}${key} · ${who} · ${when}`;
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(ev.data, null, 2);
  li.append(meta, pre);
  li.dataset.event = ev.event;
  if (ev.seq != null) li.dataset.seq = String(ev.seq);
  return li;
}

/** @param {any} ev */
function addEvent(ev) {
  const list = $("events");
  list.prepend(eventItem(ev));
  while (list.children.length > MAX_LOG) list.lastElementChild.remove();
}

/** @param {boolean} [fromLatest] */
async function loadHistory(fromLatest = false) {
  const c = client;
  const room = currentRoom;
  if (!c || !room) return;
  if (fromLatest) {
    oldestHistorySeq = null;
    $("history").replaceChildren();
  }
  try {
    const opts = /** @type {any} */ ({ limit: 20, reverse: true });
    if (oldestHistorySeq != null) opts.since = oldestHistorySeq;
    const page = await c.history(room, opts);
    if (room !== currentRoom) return;
    for (const ev of page.events) $("history").append(eventItem(ev));
    const last = page.events[page.events.length - 1];
    if (last) oldestHistorySeq = last.seq;
    $("history-more").disabled = page.events.length < 20;
  } catch (e) {
    const err = /** @type {any} */ (e);
    const li = document.createElement("li");
    li.textContent = `history unavailable: ${err.code ?? ""} ${err.reason ?? err.message}`;
    $("history").append(li);
    $("history-more").disabled = true;
  }
}

async function loadPresence() {
  const c = client;
  const room = currentRoom;
  if (!c || !room) return;
  try {
    const p = await c.presence(room);
    if (room !== currentRoom) return;
    replaceList($("presence"), p.members, (m) => {
      const li = document.createElement("li");
      li.textContent = `${m.user} (${m.kind}) on ${m.node} · ${m.client_id}`;
      return li;
    });
  } catch (e) {
    const err = /** @type {any} */ (e);
    const li = document.createElement("li");
    li.textContent = `presence unavailable: ${err.code ?? ""} ${err.reason ?? err.message}`;
    $("presence").replaceChildren(li);
  }
}

/** @param {string} text */
function parseJson(text) {
  return text.trim() === "" ? null : JSON.parse(text);
}

async function onPublish(/** @type {SubmitEvent} */ e) {
  e.preventDefault();
  const out = $("pub-result");
  if (!client || !currentRoom) return;
  try {
    const key = $("pub-key").value.trim();
    const seq = await client.publish(currentRoom, $("pub-event").value.trim(), parseJson($("pub-data").value),
      key ? { key } : {});
    out.textContent = seq == null ? "published (volatile)" : `published: seq ${seq}`;
  } catch (err) {
    const x = /** @type {any} */ (err);
    out.textContent = `not published: ${x.code ?? ""} ${x.reason ?? x.message}`;
  }
}

async function onRpc(/** @type {SubmitEvent} */ e) {
  e.preventDefault();
  const out = $("rpc-result");
  if (!client) return;
  out.textContent = "calling…";
  try {
    const result = await client.rpc($("rpc-to").value.trim(), $("rpc-method").value.trim(),
      parseJson($("rpc-params").value));
    out.dataset.ok = "true";
    out.textContent = JSON.stringify(result, null, 2);
  } catch (err) {
    const x = /** @type {any} */ (err);
    out.dataset.ok = "false";
    out.textContent = `error ${x.code ?? ""}: ${x.reason ?? x.message}`;
  }
}

// -- persistent MQTT sessions (the HTTP API) -------------------------------------------------

/** Headers for the HTTP API: the credential typed in, else a dev service token. */
async function apiHeaders() {
  let cred = $("sessions-cred").value.trim();
  if (!cred && config.dev) {
    const r = await fetch("/dev/token?kind=service", { method: "POST" });
    if (!r.ok) throw new Error(`development token refused (${r.status})`);
    cred = (await r.json()).token;
  }
  if (!cred) throw new Error("a service token or the API key is needed");
  // A JWT has three dot-separated parts; anything else is taken as the node's API key.
  return cred.split(".").length === 3 ? { Authorization: `Bearer ${cred}` } : { "X-API-Key": cred };
}

/** @param {string} path @param {string} [method] */
async function api(path, method = "GET") {
  const r = await fetch(path, { method, headers: await apiHeaders(), cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${body.code ?? r.status} ${body.reason ?? r.statusText}`);
  return body;
}

/** @param {number | undefined} ms */
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "");

async function loadSessions() {
  const status = $("sessions-status");
  status.textContent = "loading…";
  try {
    const { sessions } = await api("/api/sessions");
    const list = Array.isArray(sessions) ? sessions : [];
    status.textContent = `${list.length} session${list.length === 1 ? "" : "s"}`;
    replaceList($("session-rows"), list, sessionRow);
  } catch (e) {
    status.textContent = `sessions unavailable: ${/** @type {any} */ (e).message}`;
  }
}

/** @param {any} s */
function sessionRow(s) {
  const tr = document.createElement("tr");
  tr.dataset.clientId = s.client_id;
  const cell = (/** @type {string | HTMLElement} */ content) => {
    const td = document.createElement("td");
    td.append(content);
    tr.append(td);
  };
  const id = document.createElement("code");
  id.textContent = s.client_id;
  cell(id);
  cell(s.connected ? `online on ${s.node ?? "?"}` : `offline (last on ${s.node ?? "?"})`);
  const subs = Object.entries(s.subs ?? {}).map(([room, qos]) =>
    `${room} (QoS ${qos}, seq ${(s.cursors ?? {})[room] ?? "–"})`);
  cell(subs.join(", ") || "none");
  cell(when(s.updated_ms));
  const actions = document.createElement("div");
  actions.className = "row";
  const inspect = document.createElement("button");
  inspect.type = "button";
  inspect.textContent = "Inspect";
  inspect.setAttribute("aria-label", `Inspect session ${s.client_id}`);
  inspect.addEventListener("click", () => inspectSession(s.client_id));
  const del = document.createElement("button");
  del.type = "button";
  del.textContent = "Delete";
  del.setAttribute("aria-label", `Delete session ${s.client_id}`);
  del.addEventListener("click", () => deleteSession(s.client_id));
  actions.append(inspect, del);
  cell(actions);
  return tr;
}

/** @param {string} clientId */
async function inspectSession(clientId) {
  const out = $("session-detail");
  out.hidden = false;
  try {
    out.textContent = JSON.stringify(await api(`/api/sessions/${encodeURIComponent(clientId)}`), null, 2);
  } catch (e) {
    out.textContent = `cannot read ${clientId}: ${/** @type {any} */ (e).message}`;
  }
}

/** @param {string} clientId */
async function deleteSession(clientId) {
  if (!window.confirm(`Delete the session of ${clientId}? The device starts empty next time.`)) return;
  try {
    await api(`/api/sessions/${encodeURIComponent(clientId)}`, "DELETE");
    $("session-detail").hidden = true;
  } catch (e) {
    $("sessions-status").textContent = `not deleted: ${/** @type {any} */ (e).message}`;
    return;
  }
  await loadSessions();
}

// -- wiring -------------------------------------------------------------------------------

async function main() {
  await loadConfig();
  $("signin-form").addEventListener("submit", (/** @type {Event} */ e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      $("signin-error").textContent = "Paste a token first.";
      return;
    }
    signIn({ token });
  });
  $("devtoken").addEventListener("click", () => signIn({ getToken: devToken }));
  $("signout").addEventListener("click", () => signOut(true));
  $("room-form").addEventListener("submit", (/** @type {Event} */ e) => {
    e.preventDefault();
    const room = $("room-name").value.trim();
    if (room) openRoom(room, $("room-presence").checked);
  });
  $("history-more").addEventListener("click", () => loadHistory(false));
  $("publish-form").addEventListener("submit", onPublish);
  $("rpc-form").addEventListener("submit", onRpc);
  $("sessions-form").addEventListener("submit", (/** @type {Event} */ e) => {
    e.preventDefault();
    loadSessions();
  });
  window.addEventListener("resize", drawChart);
  const saved = sessionStorage.getItem("rtnode-console-token");
  if (saved === "dev" && config.dev) signIn({ getToken: devToken });
  else if (saved && saved !== "dev") signIn({ token: saved });
}

main();
