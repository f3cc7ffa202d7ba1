// @ts-check
/**
 * rtnode browser client: an ES module served by every node at `/rtnode.js`, no build step.
 *
 * Speaks PROTOCOL v1 over WebSocket (`/ws`): JSON by default, CBOR when the application
 * hands over a codec (see docs/browser.md; cbor-x is the example). It mirrors the Python
 * client (devices/client.py): reconnect with exponential backoff and full jitter (0.5 s, doubling,
 * at most 20 s), rooms re-joined with `since` {seq, epoch} after each reconnect, publishes
 * retried with the same `msg_id` until `published`, token refresh through `getToken` ahead of
 * expiry, and `recovered: false` surfaced to the application.
 *
 * Its default URL is the node it was imported from (`ws` next to this file), so a page of
 * any origin that imports `https://node.example/rtnode.js` talks to that node. A WebSocket
 * upgrade the node refuses (HTTP 401, 403, 404...) ends the client with an `error` event and
 * rejected requests instead of endless retries; network errors and 5xx are retried.
 *
 *     import { connect } from "/rtnode.js";
 *     const client = connect({ token });
 *     await client.join("chat:lobby", { onEvent: (ev) => console.log(ev.seq, ev.data) });
 *     await client.publish("chat:lobby", "chat:msg", { text: "hi" });
 *
 * Types: `/rtnode.d.ts`.
 */

export const VERSION = "0.1.0";

/** Close codes after which reconnecting cannot help (PROTOCOL.md section 5). */
const NO_RECONNECT = new Set([4000, 4001, 4003, 4013, 4029]);

/**
 * @typedef {{encode(value: any): Uint8Array, decodeMulti?(bytes: Uint8Array): any[],
 *   decodeMultiple?(bytes: Uint8Array): any[] | undefined}} Codec
 * @typedef {{room: string, seq: number | null, event: string, data: any, ts: number | null,
 *   from: Record<string, any>, msg_id?: string, key?: string, unset?: boolean}} RoomEvent
 * @typedef {{room: string, values: Map<string, RoomEvent>, snapshot: boolean, key?: string,
 *   value?: RoomEvent | null}} StateChange
 * @typedef {{onEvent?: (ev: RoomEvent) => void, presence?: boolean, persist?: boolean,
 *   rewind?: number, onState?: (change: StateChange) => void,
 *   onRecovered?: (info: {room: string, recovered: false, seq: number, epoch: string}) => void}}
 *   JoinOptions
 */

/** An `error` or `disconnect` of the node, or a local failure (1006 connection lost...). */
export class RtnodeError extends Error {
  /**
   * @param {number} code PROTOCOL.md section 5 code, or a WebSocket close code.
   * @param {string} reason One line.
   * @param {boolean} [retry] Whether the same request may succeed later.
   * @param {number | null} [status] The HTTP status of a refused WebSocket upgrade (0 when a
   *   page of another origin may not read it), null otherwise.
   */
  constructor(code, reason, retry = false, status = null) {
    super(`${code} ${reason}`);
    this.name = "RtnodeError";
    this.code = code;
    this.reason = reason;
    this.retry = retry;
    this.status = status;
  }
}

/**
 * What a refused WebSocket upgrade of HTTP `status` means (`status` 0: the node answered, but
 * a page of another origin may not read how):
 * - "final": 4xx but the ones below (401, 403, 404, 405, 410...): retrying cannot fix it, the
 *   client ends at once;
 * - "retry": 5xx, 408, 425, 429: the node is busy, restarting or draining: retried with
 *   backoff for as long as it lasts, as network errors are;
 * - "refused": 0 (unreadable), 400 and 426 (the endpoint got no upgrade: a proxy dropped it),
 *   2xx, 3xx: retried, and the client ends after `maxUpgradeRefusals` of them in a row.
 * @param {number} status @returns {"final" | "retry" | "refused"}
 */
export function upgradeFailure(status) {
  if (status >= 500 || status === 408 || status === 425 || status === 429) return "retry";
  if (status > 400 && status < 500 && status !== 426) return "final";
  return "refused";
}

/** The protocol code of a refused upgrade of HTTP `status` (PROTOCOL.md section 5). */
const HTTP_CODES = /** @type {Record<number, number>} */ (
  { 401: 4001, 403: 4003, 404: 4004, 413: 4013, 429: 4009 });

/** @param {any} v */
const int = (v) => (typeof v === "number" && Number.isInteger(v) ? v : null);
/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID().replace(/-/g, "");
  const bytes = new Uint8Array(16);
  if (c && c.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The URL the client connects to without a `url` option: the `ws` endpoint next to this
 * module when it was imported from a node (`https://node.example/rtnode.js` ->
 * `wss://node.example/ws`, `/rt/rtnode.js` behind a proxy -> `/rt/ws`); else (bundled into an
 * app, whose files are not the node's) the page's host, `/ws`.
 * @param {string} [moduleUrl] @param {{protocol: string, host: string}} [loc]
 */
export function defaultUrl(moduleUrl = import.meta.url, loc = globalThis.location) {
  let base = null;
  try {
    base = new URL(moduleUrl);
  } catch {
    // not a URL (a bundler's placeholder): use the page's host
  }
  if (base && (base.protocol === "http:" || base.protocol === "https:")
      && /\/rtnode\.js$/.test(base.pathname)) {
    const ws = new URL("ws", base);
    ws.protocol = base.protocol === "https:" ? "wss:" : "ws:";
    return ws.href;
  }
  if (!loc) throw new TypeError("rtnode: url is needed outside a page");
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

/**
 * Why the node did not upgrade `url` to a WebSocket: the browser hides the HTTP answer of a
 * failed upgrade, so the same URL is fetched once. Resolves to the HTTP status and the node's
 * {code, reason} body when readable; status 0 when the node answered but a page of another
 * origin may not read the answer (no CORS header on it); null on a network error.
 * @param {string} url @param {number} timeoutMs
 * @returns {Promise<{status: number, code?: number, reason?: string} | null>}
 */
async function probeUpgrade(url, timeoutMs) {
  if (typeof globalThis.fetch !== "function") return null;
  const http = url.replace(/^ws/i, "http");
  const ctl = typeof AbortController === "function" ? new AbortController() : null;
  const timer = setTimeout(() => ctl?.abort(), timeoutMs);
  /** @type {RequestInit} */
  const init = { cache: "no-store", credentials: "omit", signal: ctl?.signal };
  try {
    const r = await fetch(http, init);
    /** @type {{status: number, code?: number, reason?: string}} */
    const out = { status: r.status, reason: r.statusText || undefined };
    try {
      const body = await r.json();
      if (typeof body?.code === "number") out.code = body.code;
      if (typeof body?.reason === "string") out.reason = body.reason.split("\n")[0].slice(0, 200);
    } catch {
      // not the node's JSON (aiohttp's plain 404, a proxy's page): the status says enough
    }
    return out;
  } catch {
    // A network error, or an answer this origin may not read: no-cors tells them apart.
    try {
      await fetch(http, { ...init, mode: "no-cors" });
      return { status: 0 };
    } catch {
      return null;
    }
  } finally {
    clearTimeout(timer);
  }
}

/** The `exp` claim of a JWT (seconds), or null. @param {string} token */
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(part + "===".slice((part.length + 3) % 4))).exp;
    return typeof exp === "number" ? exp : null;
  } catch {
    return null;
  }
}

/**
 * The upper bound of the delay before reconnect `attempt` (0 for the first): doubles from
 * `minMs`, saturates at `maxMs`. The delay itself is uniform below it (full jitter).
 * @param {number} attempt @param {number} minMs @param {number} maxMs
 */
export function backoffCap(attempt, minMs, maxMs) {
  return Math.min(maxMs, minMs * 2 ** Math.min(Math.max(attempt, 0), 64));
}

/**
 * Open a client; it connects at once and keeps reconnecting until `close()` or a refusal.
 * @param {import("./rtnode").ConnectOptions} options
 * @returns {Client}
 */
export function connect(options) {
  const client = new Client(options);
  client.open();
  return client;
}

/**
 * One rtnode client: at most one WebSocket at a time, resumed across reconnects.
 *
 * Events (`client.on(name, fn)` or `addEventListener(name, e => e.detail)`):
 * `connecting` {attempt, url}, `connected` (the `connected` frame), `disconnected`
 * {code, reason, reconnect, wasConnected, status}, `recovered` {room, recovered: false, seq,
 * epoch}, `event` (every RoomEvent), `error` {code, reason, status?, url?} (errors without a
 * waiting request, and a refused upgrade that ends the client), `state` (the new state),
 * `values` (a StateChange of a state room: its current values after a join, then each key
 * set or removed), `closed` {code, reason, status} (the client ended).
 */
export class Client extends EventTarget {
  /** @param {import("./rtnode").ConnectOptions} options */
  constructor(options) {
    super();
    if (!options || (!options.token && !options.getToken)) {
      throw new TypeError("rtnode: a token or getToken is needed");
    }
    const url = options.url ?? defaultUrl();
    /** @type {string[]} */
    this._urls = Array.isArray(url) ? [...url] : [url];
    this._urlIndex = 0;
    this._token = options.token ?? null;
    this._getToken = options.getToken ?? null;
    /** @type {Codec | null} */
    this._codec = options.codec ?? null;
    this.protocol = this._codec ? "rtnode.v1.cbor" : "rtnode.v1.json";
    this._minBackoffMs = options.minBackoffMs ?? 500;
    this._maxBackoffMs = options.maxBackoffMs ?? 20000;
    this._requestTimeoutMs = options.requestTimeoutMs ?? 10000;
    this._publishTimeoutMs = options.publishTimeoutMs ?? 30000;
    this._openTimeoutMs = options.openTimeoutMs ?? 10000;
    this._maxUpgradeRefusals = Math.max(1, options.maxUpgradeRefusals ?? 3);
    this._refusals = 0;  // upgrades refused in a row, answer unreadable or 400/426
    this._clientName = options.clientName ?? "rtnode-js";
    this._storage = options.storage === undefined ? safeSessionStorage() : options.storage;
    this._storageKey = options.storageKey ?? "rtnode";
    /** "idle" | "connecting" | "connected" | "reconnecting" | "closed" */
    this.state = "idle";
    /** @type {Record<string, any> | null} the `connected` frame of the current connection */
    this.info = null;
    /** @type {string | null} */
    this.clientId = null;
    /** @type {RtnodeError | null} why the client ended, if the node ended it */
    this.error = null;
    this.reconnects = 0;
    this._nextId = 0;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any, kind: string, room?: string}>} */
    this._pending = new Map();
    /** @type {Map<string, any>} rooms joined (or being joined) by the application */
    this._rooms = new Map();
    /** @type {Map<string, number | null>} personal rooms of the current connection */
    this._auto = new Map();
    /** @type {Map<string, Function>} */
    this._rpcHandlers = new Map();
    /** @type {{resolve: Function, reject: Function, timer: any}[]} */
    this._waiters = [];
    /** @type {any} the connection being opened or served */
    this._conn = null;
    this._connected = false;
    this._attemptNo = 0;
    this._retryTimer = /** @type {any} */ (null);
    this._refreshTimer = /** @type {any} */ (null);
    this._closed = false;
    this._started = false;
    this._needNewToken = false;
    this._everConnected = false;
    /** @type {any[]} frames waiting for the end of this task to go out in one message */
    this._out = [];
    this._flushing = false;
    this._onOnline = () => this._wake("online");
    this._onOffline = () => {
      if (this._conn) this._drop(this._conn, 1006, "browser offline", true);
    };
    this._onVisible = () => {
      if (globalThis.document?.visibilityState === "visible") this._wake("visible");
    };
  }

  /** Whether a connection is up and `connected` was received. */
  get connected() {
    return this._connected;
  }

  /**
   * Listen to a client event; returns a function that stops listening.
   * @param {string} type @param {(detail: any) => void} fn
   */
  on(type, fn) {
    /** @param {Event} e */
    const listener = (e) => fn(/** @type {CustomEvent} */ (e).detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** @param {string} type @param {any} [detail] */
  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  /** @param {string} state */
  _setState(state) {
    if (state !== this.state) {
      this.state = state;
      this._emit("state", state);
    }
  }

  /** Start connecting (`connect()` calls it). */
  open() {
    if (this._started) return this;
    this._started = true;
    const w = globalThis.window;
    if (w && w.addEventListener) {
      w.addEventListener("online", this._onOnline);
      w.addEventListener("offline", this._onOffline);
      globalThis.document?.addEventListener("visibilitychange", this._onVisible);
    }
    this._connectNow();
    return this;
  }

  /** Close the connection and end the client; pending requests fail with code 1000. */
  close(code = 1000, reason = "client closed") {
    this._end(new RtnodeError(code, reason, false), false);
  }

  // -- rooms ------------------------------------------------------------------------------

  /**
   * Join `room`; after each reconnect it is re-joined with `since` {seq, epoch}, so no event
   * is missed or doubled. With `persist`, the position is kept in sessionStorage and a page
   * reload resumes too. With `rewind: N` (1 to 1000), the room's last N stored events come
   * first (to `onEvent`, oldest first, `joined.replayed` of them), then the live ones with no
   * gap; sent only while the client knows no position for the room (a saved `persist`
   * position, or a reconnect, resumes with `since` instead). Returns the `joined` frame.
   * @param {string} room @param {JoinOptions} [opts]
   */
  async join(room, opts = {}) {
    let st = this._rooms.get(room);
    if (!st) {
      st = { presence: false, lastSeq: null, epoch: null, joined: false, resuming: false };
      if (opts.persist) {
        const saved = this._load(room);
        if (saved) Object.assign(st, { lastSeq: saved.seq, epoch: saved.epoch, restored: true });
      }
      this._rooms.set(room, st);
    }
    st.presence = !!opts.presence;
    st.persist = !!opts.persist;
    if (opts.rewind != null) st.rewind = opts.rewind;
    st.onEvent = opts.onEvent ?? st.onEvent;
    st.onState = opts.onState ?? st.onState;
    st.onRecovered = opts.onRecovered ?? st.onRecovered;
    try {
      return await this._retrying(() => this._joinFrame(room), Date.now() + this._requestTimeoutMs);
    } catch (err) {
      const now = this._rooms.get(room);
      if (now && !now.joined) this._rooms.delete(room);
      throw err;
    }
  }

  /** Leave `room` (never re-joined); returns the `left` frame. @param {string} room */
  async leave(room) {
    this._rooms.delete(room);
    this._forget(room);
    if (!this._connected) return { type: "left", room };
    try {
      return await this._attempt(() => ({ type: "leave", room }), Date.now() + this._requestTimeoutMs);
    } catch (err) {
      if (/** @type {RtnodeError} */ (err).code === 1006) return { type: "left", room };
      throw err;
    }
  }

  /** The last seq received in `room` (0 when none). @param {string} room */
  lastSeq(room) {
    return this._rooms.get(room)?.lastSeq ?? 0;
  }

  /**
   * The current values of a state room (`state = true` in its namespace): key -> its latest
   * event, live (do not modify it). Filled by the `state` frame that follows each `joined`,
   * then kept up to date by the room's events: an older seq never replaces a newer one, an
   * `unset` removes its key. Empty for other rooms.
   * @param {string} room @returns {Map<string, RoomEvent>}
   */
  values(room) {
    return this._rooms.get(room)?.values ?? new Map();
  }

  /** The rooms joined by the application. */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /**
   * Publish an event, retried with the same `msg_id` until the node stores it.
   * Resolves to its seq (null for volatile events). In a state room, `key` names the value
   * it sets (default: the publisher's own id) and `unset: true` removes that key instead
   * (no data is sent); elsewhere the node refuses both (4000).
   * @param {string} room @param {string} event @param {any} [data]
   * @param {{msgId?: string, timeoutMs?: number, key?: string, unset?: boolean}} [opts]
   */
  async publish(room, event, data = null, opts = {}) {
    const msgId = opts.msgId ?? randomId();
    const deadline = Date.now() + (opts.timeoutMs ?? this._publishTimeoutMs);
    /** @type {Record<string, any>} */
    const base = { type: "publish", room, event };
    if (opts.unset) base.unset = true;
    else base.data = data;
    if (opts.key != null) base.key = opts.key;
    base.msg_id = msgId;
    const reply = await this._retrying(() => ({ ...base }), deadline);
    return int(reply.seq);
  }

  /**
   * Remove `key` (default: the publisher's own id) from a state room; resolves to the seq.
   * @param {string} room @param {string} [key] @param {{event?: string, timeoutMs?: number}} [opts]
   */
  async unset(room, key, opts = {}) {
    return this.publish(room, opts.event ?? "state:unset", null,
      { key, unset: true, timeoutMs: opts.timeoutMs });
  }

  /**
   * Call `method` on `to` (`server`, `user:<id>`, `device:<id>`, `client:<id>`); resolves to
   * its result, rejects with RtnodeError (4003, 4004, 4504...). Not retried.
   * @param {string} to @param {string} method @param {any} [params]
   * @param {{timeoutMs?: number}} [opts]
   */
  async rpc(to, method, params = null, opts = {}) {
    const timeoutMs = opts.timeoutMs ?? 5000;
    const deadline = Date.now() + Math.max(this._requestTimeoutMs, timeoutMs + 2000);
    const reply = await this._attempt(
      () => ({ type: "rpc", to, method, params, timeout_ms: timeoutMs }), deadline);
    return reply.result;
  }

  /**
   * Answer rpcs addressed to this client (`client:<id>`, or its user): `handler(params,
   * {method, from, id})` returns the result or throws ({code, message}). `"*"` catches every
   * method without a handler of its own. Returns a function that removes the handler.
   * @param {string} method @param {(params: any, info: any) => any} handler
   */
  onRpc(method, handler) {
    this._rpcHandlers.set(method, handler);
    return () => {
      if (this._rpcHandlers.get(method) === handler) this._rpcHandlers.delete(method);
    };
  }

  /**
   * Stored events of `room`: without `since` the latest `limit`; with it those after it (or,
   * with `reverse`, before it, newest first). Resolves to the `history` frame {events, seq}.
   * @param {string} room @param {{since?: number, limit?: number, reverse?: boolean}} [opts]
   */
  async history(room, opts = {}) {
    return this._attempt(() => {
      /** @type {Record<string, any>} */
      const frame = { type: "history", room };
      if (opts.since != null) frame.since = { seq: opts.since };
      if (opts.limit != null) frame.limit = opts.limit;
      if (opts.reverse) frame.reverse = true;
      return frame;
    }, Date.now() + this._requestTimeoutMs);
  }

  /** The members of `room`: the `presence` frame {members, unique_users}. @param {string} room */
  async presence(room) {
    return this._attempt(() => ({ type: "presence", room }), Date.now() + this._requestTimeoutMs);
  }

  /** A `ping` round trip; resolves to `pong`. @param {number} [timeoutMs] */
  async ping(timeoutMs) {
    return this._attempt(() => ({ type: "ping" }), Date.now() + (timeoutMs ?? this._requestTimeoutMs));
  }

  /**
   * Send any request frame (its `id` is set) and resolve to its typed reply.
   * @param {Record<string, any>} frame
   */
  async request(frame) {
    return this._attempt(() => ({ ...frame }), Date.now() + this._requestTimeoutMs);
  }

  /** Tell the node every event of `room` up to `seq` was processed (fire and forget). */
  ack(/** @type {string} */ room, /** @type {number} */ seq) {
    if (this._connected) this._enqueue({ type: "ack", room, seq });
  }

  // -- requests ---------------------------------------------------------------------------

  /** @param {number} deadline */
  _whenConnected(deadline) {
    if (this._closed) return Promise.reject(this.error ?? new RtnodeError(1000, "client closed"));
    if (this._connected) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: /** @type {any} */ (null) };
      waiter.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((w) => w !== waiter);
        reject(new RtnodeError(4504, "not connected in time", true));
      }, Math.max(0, deadline - Date.now()));
      this._waiters.push(waiter);
    });
  }

  /**
   * Once connected, send the request `make()` and resolve to its reply (reject on `error`,
   * a lost connection (1006, retry) or the deadline (4504, retry)).
   * @param {() => Record<string, any>} make @param {number} deadline @param {any} [conn]
   * @returns {Promise<Record<string, any>>}
   */
  async _attempt(make, deadline, conn) {
    await this._whenConnected(deadline);
    if (conn !== undefined && conn !== this._conn) throw new RtnodeError(1006, "connection lost", true);
    const frame = make();
    const id = ++this._nextId;
    frame.id = id;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new RtnodeError(4504, "request timed out", true));
      }, Math.max(0, deadline - Date.now()));
      this._pending.set(id, { resolve, reject, timer, kind: frame.type, room: frame.room });
      this._enqueue(frame);
    });
  }

  /**
   * Attempt until a reply, a refusal (`retry: false`) or the deadline; lost connections and
   * timeouts wait for the next connection, retryable errors back off.
   * @param {() => Record<string, any>} make @param {number} deadline
   */
  async _retrying(make, deadline) {
    for (let attempt = 0; ; ) {
      try {
        return await this._attempt(make, Math.min(deadline, Date.now() + this._requestTimeoutMs));
      } catch (e) {
        const err = /** @type {RtnodeError} */ (e);
        if (this._closed || !err.retry || Date.now() >= deadline) throw err;
        if (err.code !== 1006 && err.code !== 4504) {
          const delay = Math.random() * backoffCap(attempt++, this._minBackoffMs, this._maxBackoffMs);
          await sleep(Math.min(delay, Math.max(0, deadline - Date.now())));
        }
      }
    }
  }

  /** @param {string} room */
  _joinFrame(room) {
    let st = this._rooms.get(room);
    if (!st) {
      st = { presence: false, lastSeq: null, epoch: null, joined: false, resuming: false };
      this._rooms.set(room, st);
    }
    /** @type {Record<string, any>} */
    const frame = { type: "join", room };
    if (st.presence) frame.presence = true;
    st.rewinding = false;
    if ((st.joined || st.restored) && st.lastSeq != null && st.epoch != null) {
      frame.since = { seq: st.lastSeq, epoch: st.epoch };
      st.resuming = true;
    } else if (st.rewind != null) {
      frame.rewind = st.rewind; // no position yet: the last events, then live
      st.rewinding = true;
    }
    return frame;
  }

  /** @param {any} frame */
  _enqueue(frame) {
    this._out.push(frame);
    if (!this._flushing) {
      this._flushing = true;
      queueMicrotask(() => this._flush());
    }
  }

  _flush() {
    this._flushing = false;
    const frames = this._out;
    this._out = [];
    const ws = this._conn?.ws;
    if (!ws || !this._connected || frames.length === 0) return;
    try {
      ws.send(this._encode(frames));
    } catch {
      // The socket is closing: its close event ends the connection and fails the requests.
    }
  }

  /** @param {any[]} frames */
  _encode(frames) {
    if (!this._codec) return frames.map((f) => JSON.stringify(f)).join("\n");
    const parts = frames.map((f) => this._codec.encode(f));
    if (parts.length === 1) return parts[0];
    const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }

  /** @param {any} data @returns {any[]} */
  _decode(data) {
    if (typeof data === "string") {
      return data.split("\n").filter((line) => line.length > 0).map((line) => JSON.parse(line));
    }
    const bytes = new Uint8Array(data);
    const codec = this._codec;
    if (!codec) throw new Error("binary message without a codec");
    const frames = codec.decodeMulti ? codec.decodeMulti(bytes) : codec.decodeMultiple?.(bytes);
    return frames ?? [];
  }

  // -- connections ------------------------------------------------------------------------

  /** @param {boolean} fresh */
  async _tokenFor(fresh) {
    const exp = this._token ? tokenExpiry(this._token) : null;
    const stale = exp != null && exp * 1000 < Date.now() + 5000;
    if ((fresh || stale || !this._token) && this._getToken) this._token = await this._getToken();
    if (!this._token) throw new RtnodeError(4010, "token expired and no getToken", false);
    return this._token;
  }

  _connectNow() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._closed || this._conn) return;
    const url = this._urls[this._urlIndex];
    const conn = { ws: /** @type {WebSocket | null} */ (null), connected: false, opened: false,
      outcome: /** @type {any} */ (null), timer: /** @type {any} */ (null) };
    this._conn = conn;
    this._setState(this.reconnects > 0 || this._attemptNo > 0 ? "reconnecting" : "connecting");
    this._emit("connecting", { attempt: this._attemptNo, url });
    this._tokenFor(this._needNewToken).then((token) => {
      if (this._conn !== conn) return;
      let ws;
      try {
        ws = new WebSocket(url, [this.protocol]);
      } catch (e) {
        // A malformed URL, or ws:// from an https page (mixed content): both are final.
        const reason = `cannot open ${url}: ${/** @type {any} */ (e)?.message ?? e}`;
        this._emit("error", { code: 4000, status: null, reason, url });
        this._lost(conn, { code: 4000, reason, reconnect: false });
        return;
      }
      conn.ws = ws;
      ws.binaryType = "arraybuffer";
      ws.onopen = () => {
        conn.opened = true;
        if (this._codec && ws.protocol !== this.protocol) {
          this._drop(conn, 4000, `the node does not speak ${this.protocol}`, false);
          return;
        }
        const frame = { type: "connect", token, client: { name: this._clientName, version: VERSION } };
        ws.send(this._encode([frame]));
      };
      ws.onmessage = (m) => this._onMessage(conn, m.data);
      ws.onclose = (e) => {
        if (!conn.opened && !conn.outcome) {
          this._upgradeFailed(conn, url);
          return;
        }
        const code = e.code || 1006;
        this._lost(conn, conn.outcome ?? {
          code, reason: e.reason || "connection closed", reconnect: !NO_RECONNECT.has(code),
        });
      };
      ws.onerror = () => {};
      conn.timer = setTimeout(() => {
        if (!conn.connected) this._drop(conn, 1006, "no connected frame in time", true);
      }, this._openTimeoutMs);
    }, (err) => {
      if (this._conn !== conn) return;
      const e = /** @type {any} */ (err);
      // A getToken failure is retried after backoff; "no token at all" ends the client.
      this._lost(conn, { code: e?.code ?? 4001, reason: `getToken failed: ${e?.message ?? e}`,
        reconnect: !(e instanceof RtnodeError) });
    });
  }

  /**
   * The WebSocket of `conn` closed before it opened (the browser says only 1006): ask the
   * node why with one HTTP request, then retry or end (see `upgradeFailure`).
   * @param {any} conn @param {string} url
   */
  async _upgradeFailed(conn, url) {
    clearTimeout(conn.timer);
    const probe = await probeUpgrade(url, Math.min(this._openTimeoutMs, 5000));
    if (this._conn !== conn) return; // closed, or dropped (offline) meanwhile
    if (probe === null) {
      this._refusals = 0;
      this._lost(conn, { code: 1006, reason: `cannot reach ${url}`, reconnect: true, status: null });
      return;
    }
    const status = probe.status;
    const kind = upgradeFailure(status);
    const reason = status === 0
      ? `the node refused the WebSocket upgrade at ${url}; a page of another origin cannot `
        + "read why: check the URL's path and the node's allowed_origins"
      : `HTTP ${status}${probe.reason ? ` ${probe.reason}` : ""}: no WebSocket upgrade at ${url}`;
    const final = kind === "final"
      || (kind === "refused" && ++this._refusals >= this._maxUpgradeRefusals);
    if (!final) {
      this._lost(conn, { code: 1006, reason, reconnect: true, status });
      return;
    }
    const code = probe.code ?? HTTP_CODES[status] ?? 4000;
    this._emit("error", { code, status, reason, url });
    this._lost(conn, { code, reason, reconnect: false, status });
  }

  /** Tear down `conn` now (no close handshake wait). @param {any} conn @param {number} code
   * @param {string} reason @param {boolean} reconnect */
  _drop(conn, code, reason, reconnect) {
    if (this._conn !== conn) return;
    const ws = conn.ws;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        ws.close(1000, reason.slice(0, 100));
      } catch {
        // already closed
      }
    }
    this._lost(conn, conn.outcome ?? { code, reason, reconnect });
  }

  /** @param {any} conn @param {any} data */
  _onMessage(conn, data) {
    if (this._conn !== conn) return;
    let frames;
    try {
      frames = this._decode(data);
    } catch (e) {
      this._drop(conn, 1002, "undecodable message", true);
      return;
    }
    for (const frame of frames) {
      if (this._conn !== conn) return;
      if (!frame || typeof frame !== "object") continue;
      if (!conn.connected) {
        if (frame.type === "connected") this._onConnected(conn, frame);
        else if (frame.type === "disconnect" || frame.type === "error") {
          const code = int(frame.code) ?? 4500;
          const again = frame.type === "disconnect" ? frame.reconnect === true : frame.retry === true;
          conn.outcome = { code, reason: String(frame.reason ?? ""), reconnect: again };
          this._drop(conn, code, conn.outcome.reason, again);
        }
        continue;
      }
      this._onFrame(conn, frame);
    }
  }

  /** @param {any} conn @param {any} frame */
  _onConnected(conn, frame) {
    clearTimeout(conn.timer);
    conn.connected = true;
    this._connected = true;
    this.info = frame;
    this.clientId = frame.client_id ?? null;
    if (this._attemptNo > 0 || this._everConnected) this.reconnects += 1;
    this._everConnected = true;
    this._attemptNo = 0;
    this._refusals = 0;
    this._needNewToken = false;
    this._auto = new Map((Array.isArray(frame.rooms) ? frame.rooms : []).map((r) => [r, null]));
    this._setState("connected");
    this._emit("connected", frame);
    const waiters = this._waiters;
    this._waiters = [];
    for (const w of waiters) {
      clearTimeout(w.timer);
      w.resolve();
    }
    for (const [room, st] of this._rooms) if (st.joined) this._rejoin(room, conn);
    this._scheduleRefresh(conn, frame.expires_in_s);
  }

  /** Re-join `room` on `conn` with `since`; retryable refusals back off on the same connection.
   * @param {string} room @param {any} conn */
  async _rejoin(room, conn) {
    for (let attempt = 0; this._conn === conn && this._rooms.has(room); attempt++) {
      try {
        await this._attempt(() => this._joinFrame(room), Date.now() + this._requestTimeoutMs, conn);
        return;
      } catch (e) {
        const err = /** @type {RtnodeError} */ (e);
        if (this._conn !== conn) return;
        if (!err.retry) {
          this._emit("error", { room, code: err.code, reason: `not resumed: ${err.reason}` });
          return;
        }
        await sleep(Math.random() * backoffCap(attempt, this._minBackoffMs, this._maxBackoffMs));
      }
    }
  }

  /** @param {any} conn @param {any} expiresInS */
  _scheduleRefresh(conn, expiresInS) {
    clearTimeout(this._refreshTimer);
    if (!this._getToken || typeof expiresInS !== "number" || !(expiresInS > 0)) return;
    this._refreshTimer = setTimeout(async () => {
      if (this._conn !== conn) return;
      try {
        const getToken = /** @type {() => Promise<string>} */ (this._getToken);
        this._token = await getToken();
        const reply = await this._attempt(() => ({ type: "refresh", token: this._token }),
          Date.now() + this._requestTimeoutMs, conn);
        this._scheduleRefresh(conn, reply.expires_in_s);
      } catch (e) {
        const err = /** @type {any} */ (e);
        this._emit("error", { code: err?.code ?? 4010, reason: `token refresh failed: ${err?.reason ?? err?.message ?? err}` });
      }
    }, Math.max(100, expiresInS * 750));
  }

  /** @param {any} conn @param {any} f */
  _onFrame(conn, f) {
    switch (f.type) {
      case "event":
        this._onEvent(f);
        return;
      case "state":
        this._onState(f);
        return;
      case "rpc":
        this._answerRpc(conn, f);
        return;
      case "disconnect": {
        const code = int(f.code) ?? 1006;
        conn.outcome = { code, reason: String(f.reason ?? ""), reconnect: f.reconnect === true };
        return; // the node closes the transport right after
      }
      case "error": {
        const p = typeof f.id === "number" ? this._pending.get(f.id) : undefined;
        const err = new RtnodeError(int(f.code) ?? 4500, String(f.reason ?? ""), f.retry === true);
        if (!p) {
          this._emit("error", { code: err.code, reason: err.reason, id: f.id });
          return;
        }
        this._pending.delete(f.id);
        clearTimeout(p.timer);
        if (p.kind === "join" && p.room != null) {
          const st = this._rooms.get(p.room);
          if (st) st.resuming = false;
          if (st && st.joined && !err.retry) this._rooms.delete(p.room);
        }
        p.reject(err);
        return;
      }
      default: {
        const p = typeof f.id === "number" ? this._pending.get(f.id) : undefined;
        if (!p) return;
        this._pending.delete(f.id);
        clearTimeout(p.timer);
        if (f.type === "joined") this._onJoined(f);
        p.resolve(f);
      }
    }
  }

  /** @param {any} f */
  _onJoined(f) {
    const room = String(f.room ?? "");
    const st = this._rooms.get(room);
    if (!st) return;
    const seq = int(f.seq) ?? 0;
    const epoch = String(f.epoch ?? "");
    if (f.recovered !== true) {
      // A failed resume loses events: the application reloads (history). A first join is
      // never recovered and starts at the latest seq by design.
      if (st.resuming) {
        const info = { room, recovered: /** @type {false} */ (false), seq, epoch };
        try {
          st.onRecovered?.(info);
        } catch (e) {
          console.error("rtnode: onRecovered failed", e);
        }
        this._emit("recovered", info);
      }
      // A rewind's events (seqs up to `seq`) follow the `joined`: they set the position.
      st.lastSeq = st.rewinding && (int(f.replayed) ?? 0) > 0 ? null : seq;
    } else if (st.lastSeq == null) {
      st.lastSeq = seq;
    }
    st.rewinding = false;
    st.joinedSeq = seq;
    st.stateSeen = undefined; // the state frames of this join follow
    st.epoch = epoch;
    st.joined = true;
    st.resuming = false;
    st.restored = false;
    this._save(room, st);
  }

  /** @param {any} f */
  _onEvent(f) {
    const room = f.room;
    if (typeof room !== "string") return;
    const seq = int(f.seq);
    const st = this._rooms.get(room);
    if (seq != null) {
      const last = st ? st.lastSeq : this._auto.get(room);
      if (last != null && seq <= last) return; // a duplicate, or older than what was received
      if (st) {
        st.lastSeq = seq;
        this._save(room, st);
      } else if (this._auto.has(room)) {
        this._auto.set(room, seq);
      }
    }
    /** @type {RoomEvent} */
    const ev = { room, seq, event: String(f.event ?? ""), data: f.data, ts: int(f.ts),
      from: f.from && typeof f.from === "object" ? f.from : {} };
    if (typeof f.msg_id === "string") ev.msg_id = f.msg_id;
    if (typeof f.key === "string") ev.key = f.key;
    if (f.unset === true) ev.unset = true;
    if (st?.onEvent) {
      try {
        st.onEvent(ev);
      } catch (e) {
        console.error("rtnode: onEvent failed", e);
      }
    }
    this._emit("event", ev);
    if (st && ev.key != null && applyValue(st, ev)) {
      this._stateChanged(st, { room, values: st.values, snapshot: false, key: ev.key,
        value: ev.unset ? null : ev });
    }
  }

  /** The `state` frame of a state room (right after its `joined`). @param {any} f */
  _onState(f) {
    const room = f.room;
    const st = typeof room === "string" ? this._rooms.get(room) : undefined;
    if (!st || !Array.isArray(f.values)) return;
    // A large state comes in several frames; all but the last have more: true.
    const seen = (st.stateSeen ??= new Set());
    for (const v of f.values) {
      if (!v || typeof v !== "object" || typeof v.key !== "string" || v.unset === true) continue;
      seen.add(v.key);
      applyValue(st, { room, seq: int(v.seq), event: String(v.event ?? ""), data: v.data,
        ts: int(v.ts), from: v.from && typeof v.from === "object" ? v.from : {}, key: v.key });
    }
    if (f.more === true) return;
    st.stateSeen = undefined;
    // Keys held but absent were removed while away (the values are at least as recent as
    // the joined seq): only keys set after it stay.
    const values = /** @type {Map<string, RoomEvent>} */ (st.values ??= new Map());
    const sorted = [...values.entries()]
      .filter(([k]) => seen.has(k) || (st.keySeqs?.get(k) ?? 0) > (st.joinedSeq ?? 0))
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    values.clear(); // the same Map, ordered by key (an application may hold it)
    for (const [k, v] of sorted) values.set(k, v);
    this._stateChanged(st, { room, values, snapshot: true });
  }

  /** @param {any} st @param {StateChange} change */
  _stateChanged(st, change) {
    if (st.onState) {
      try {
        st.onState(change);
      } catch (e) {
        console.error("rtnode: onState failed", e);
      }
    }
    this._emit("values", change);
  }

  /** @param {any} conn @param {any} f */
  async _answerRpc(conn, f) {
    const id = f.id;
    if (typeof id !== "number" && typeof id !== "string") return;
    const handler = this._rpcHandlers.get(f.method) ?? this._rpcHandlers.get("*");
    /** @type {Record<string, any>} */
    let reply;
    if (!handler) {
      reply = { type: "reply", id, error: { code: 4004, reason: `no handler for ${f.method}` } };
    } else {
      try {
        const result = await handler(f.params, { method: f.method, from: f.from ?? {}, id });
        reply = { type: "reply", id, result: result === undefined ? null : result };
        if (!this._codec) JSON.stringify(reply); // fails here, not at send time
      } catch (e) {
        const err = /** @type {any} */ (e);
        const code = int(err?.code) ?? 4500;
        const reason = String(err?.reason ?? err?.message ?? err).split("\n")[0].slice(0, 200);
        reply = { type: "reply", id, error: { code, reason } };
      }
    }
    if (this._conn === conn && this._connected) this._enqueue(reply);
  }

  /** The connection `conn` ended with `outcome`; reconnect or end. @param {any} conn
   * @param {{code: number, reason: string, reconnect: boolean, status?: number | null}} outcome */
  _lost(conn, outcome) {
    if (this._conn !== conn) return;
    clearTimeout(conn.timer);
    clearTimeout(this._refreshTimer);
    const wasConnected = conn.connected;
    this._conn = null;
    this._connected = false;
    this._out = [];
    this.info = null;
    this._auto = new Map();
    const lost = new RtnodeError(1006, outcome.reason || "connection lost", true);
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(lost);
    }
    this._pending.clear();
    for (const st of this._rooms.values()) st.resuming = false;
    this._emit("disconnected", { ...outcome, wasConnected });
    if (this._closed) return;
    const expired = outcome.code === 4010;
    const again = expired ? !!this._getToken : outcome.reconnect;
    if (!again) {
      this._end(new RtnodeError(outcome.code, outcome.reason, false, outcome.status ?? null), true);
      return;
    }
    this._needNewToken = this._needNewToken || expired;
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    this._schedule();
  }

  _schedule() {
    const delay = Math.random() * backoffCap(this._attemptNo, this._minBackoffMs, this._maxBackoffMs);
    this._attemptNo += 1;
    this._setState("reconnecting");
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (globalThis.navigator?.onLine === false) {
        // No network: wait for the `online` event, with a slow attempt in case onLine lies.
        this._retryTimer = setTimeout(() => this._connectNow(), this._maxBackoffMs);
        return;
      }
      this._connectNow();
    }, delay);
  }

  /** The browser came back (online, tab visible): retry now, or check the connection.
   * @param {string} why */
  _wake(why) {
    if (this._closed) return;
    if (this._retryTimer) {
      this._attemptNo = 0;
      this._connectNow();
    } else if (this._connected) {
      const conn = this._conn;
      this.ping(5000).catch(() => this._drop(conn, 1006, `no pong after ${why}`, true));
    }
  }

  /** @param {RtnodeError} err @param {boolean} byNode */
  _end(err, byNode) {
    if (this._closed) return;
    this._closed = true;
    if (byNode) this.error = err;
    clearTimeout(this._retryTimer);
    clearTimeout(this._refreshTimer);
    const w = globalThis.window;
    if (w && w.removeEventListener) {
      w.removeEventListener("online", this._onOnline);
      w.removeEventListener("offline", this._onOffline);
      globalThis.document?.removeEventListener("visibilitychange", this._onVisible);
    }
    const conn = this._conn;
    if (conn) {
      this._conn = null;
      this._connected = false;
      clearTimeout(conn.timer);
      const ws = conn.ws;
      if (ws) {
        ws.onopen = ws.onmessage = ws.onclose = null;
        try {
          ws.close(byNode ? 1000 : err.code === 1000 || (err.code >= 3000 && err.code < 5000) ? err.code : 1000);
        } catch {
          // already closed
        }
      }
    }
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this._pending.clear();
    for (const wtr of this._waiters) {
      clearTimeout(wtr.timer);
      wtr.reject(err);
    }
    this._waiters = [];
    this._setState("closed");
    this._emit("closed", { code: err.code, reason: err.reason, status: err.status });
  }

  // -- persistence ------------------------------------------------------------------------

  /** @param {string} room */
  _key(room) {
    return `${this._storageKey}:${room}`;
  }

  /** @param {string} room @returns {{seq: number, epoch: string} | null} */
  _load(room) {
    try {
      const raw = this._storage?.getItem(this._key(room));
      const v = raw ? JSON.parse(raw) : null;
      return v && int(v.seq) != null && typeof v.epoch === "string" ? v : null;
    } catch {
      return null;
    }
  }

  /** @param {string} room @param {any} st */
  _save(room, st) {
    if (!st.persist || !this._storage || st.lastSeq == null || st.epoch == null) return;
    try {
      this._storage.setItem(this._key(room), JSON.stringify({ seq: st.lastSeq, epoch: st.epoch }));
    } catch {
      // storage full or disabled: the room still resumes within this page
    }
  }

  /** @param {string} room */
  _forget(room) {
    try {
      this._storage?.removeItem(this._key(room));
    } catch {
      // ignore
    }
  }
}

/**
 * Apply a keyed event to a room's values with the seq rule (only a higher seq per key;
 * `unset` removes); returns whether it was applied.
 * @param {any} st @param {RoomEvent} ev
 */
function applyValue(st, ev) {
  if (ev.key == null || ev.seq == null) return false;
  st.values ??= new Map();
  st.keySeqs ??= new Map();
  if (ev.seq <= (st.keySeqs.get(ev.key) ?? 0)) return false;
  st.keySeqs.set(ev.key, ev.seq);
  if (ev.unset) st.values.delete(ev.key);
  else st.values.set(ev.key, ev);
  return true;
}

function safeSessionStorage() {
  try {
    return globalThis.sessionStorage ?? null;
  } catch {
    return null; // a sandboxed frame
  }
}
