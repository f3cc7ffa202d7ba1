// Types of /rtnode.js, the rtnode browser client (PROTOCOL v1 over WebSocket).

export declare const VERSION: string;

/** A CBOR codec handed to connect(): e.g. cbor-x's Encoder and Decoder (docs/browser.md). */
export interface Codec {
  /** One value to one CBOR item. */
  encode(value: unknown): Uint8Array;
  /** Every CBOR item of a message (an RFC 8742 sequence), in order. */
  decodeMulti?(bytes: Uint8Array): unknown[];
  /** cbor-x's Decoder.decodeMultiple is accepted as is. */
  decodeMultiple?(bytes: Uint8Array): unknown[] | undefined;
}

export interface ConnectOptions {
  /** ws(s)://host:port/ws, or several (each reconnect tries the next); default: the node this
   * module was imported from (`defaultUrl()`), whatever the page's origin. */
  url?: string | string[];
  /** The JWT sent in `connect`. */
  token?: string;
  /** Returns a fresh JWT: used when there is no token, ahead of expiry (refresh at 3/4 of
   * `expires_in_s`), and after the node refused an expired one (4010). */
  getToken?: () => string | Promise<string>;
  /** Speak rtnode.v1.cbor with this codec; JSON (rtnode.v1.json) without it. */
  codec?: Codec;
  /** First reconnect delay cap (doubles at each failed attempt); default 500. */
  minBackoffMs?: number;
  /** Largest reconnect delay cap; default 20000. Delays are uniform below the cap. */
  maxBackoffMs?: number;
  /** How long a request waits for its reply (and for a connection); default 10000. */
  requestTimeoutMs?: number;
  /** How long publish() retries, across reconnects; default 30000. */
  publishTimeoutMs?: number;
  /** How long opening a connection and its `connect` may take; default 10000. */
  openTimeoutMs?: number;
  /** Upgrades refused in a row whose HTTP status says nothing final (unreadable from another
   * origin, 400, 426) after which the client ends; default 3. See `upgradeFailure`. */
  maxUpgradeRefusals?: number;
  /** Sent in `connect` as client.name; default "rtnode-js". */
  clientName?: string;
  /** Where rooms joined with `persist` keep their position; default sessionStorage. */
  storage?: Pick<Storage, "getItem" | "setItem" | "removeItem"> | null;
  /** Prefix of the storage keys (`<storageKey>:<room>`); default "rtnode". */
  storageKey?: string;
}

export interface EventSender {
  user?: string;
  client_id?: string;
  kind?: "user" | "device" | "service";
}

export interface RoomEvent {
  room: string;
  /** null for volatile events (presence, volatile names and namespaces). */
  seq: number | null;
  event: string;
  data: unknown;
  ts: number | null;
  from: EventSender;
  msg_id?: string;
  /** State rooms only: the key the event sets (or removes, with `unset`). */
  key?: string;
  /** State rooms only: the event removed `key`. */
  unset?: true;
}

/** A state room's values changed: after a join (`snapshot`, from the `state` frame), or one
 * key set (`value`) or removed (`value: null`) by a live event. */
export interface StateChange {
  room: string;
  /** The room's current values, key -> latest event (the same live Map as `values(room)`). */
  values: Map<string, RoomEvent>;
  snapshot: boolean;
  key?: string;
  value?: RoomEvent | null;
}

export interface RecoveredFalse {
  room: string;
  recovered: false;
  /** The room's latest seq: the client goes on from here. */
  seq: number;
  epoch: string;
}

export interface JoinOptions {
  onEvent?: (ev: RoomEvent) => void;
  /** Receive presence:join / presence:leave events (needs the presence right). */
  presence?: boolean;
  /** Keep the room's position in storage so that a page reload resumes it. */
  persist?: boolean;
  /** Replay the room's last N stored events (1 to 1000) before the live ones, with no gap
   * (`joined.replayed` of them, oldest first, to `onEvent`). Sent only while the client knows
   * no position for the room: a reconnect or a saved `persist` position resumes instead. */
  rewind?: number;
  /** A state room's values changed (see StateChange); called after each join with all of
   * them, then for each key set or removed. */
  onState?: (change: StateChange) => void;
  /** A resume could not be honoured: events were lost, reload the room (history). */
  onRecovered?: (info: RecoveredFalse) => void;
}

export interface Disconnected {
  code: number;
  reason: string;
  reconnect: boolean;
  /** false when a connection attempt failed before `connected`. */
  wasConnected: boolean;
  /** The HTTP status of a refused WebSocket upgrade (0: the node answered, but a page of
   * another origin may not read it); null when the node could not be reached. */
  status?: number | null;
}

/** An error without a waiting request; a refused upgrade that ends the client has `status`
 * and `url` (then `closed` follows and every request rejects with the same RtnodeError). */
export interface ClientError {
  code: number;
  reason: string;
  id?: unknown;
  room?: string;
  status?: number | null;
  url?: string;
}

export interface ClientEvents {
  connecting: { attempt: number; url: string };
  connected: Record<string, unknown>;
  disconnected: Disconnected;
  recovered: RecoveredFalse;
  event: RoomEvent;
  error: ClientError;
  state: ClientState;
  values: StateChange;
  closed: { code: number; reason: string; status: number | null };
}

export type ClientState = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface RpcInfo {
  method: string;
  from: EventSender;
  id: string | number;
}

export declare class RtnodeError extends Error {
  constructor(code: number, reason: string, retry?: boolean, status?: number | null);
  code: number;
  reason: string;
  retry: boolean;
  /** The HTTP status of a refused WebSocket upgrade (0 when unreadable from another origin),
   * else null. */
  status: number | null;
}

export declare class Client extends EventTarget {
  constructor(options: ConnectOptions);
  state: ClientState;
  /** rtnode.v1.json or rtnode.v1.cbor. */
  readonly protocol: string;
  /** The `connected` frame of the current connection. */
  info: Record<string, unknown> | null;
  clientId: string | null;
  /** Why the client ended, when the node ended it. */
  error: RtnodeError | null;
  reconnects: number;
  readonly connected: boolean;
  readonly rooms: string[];
  open(): this;
  close(code?: number, reason?: string): void;
  on<K extends keyof ClientEvents>(type: K, fn: (detail: ClientEvents[K]) => void): () => void;
  join(room: string, opts?: JoinOptions): Promise<Record<string, unknown>>;
  leave(room: string): Promise<Record<string, unknown>>;
  lastSeq(room: string): number;
  /** A state room's current values, key -> latest event (live: do not modify it). */
  values(room: string): Map<string, RoomEvent>;
  /** Resolves to the seq (null for volatile events) once stored; retried with one msg_id.
   * State rooms: `key` (default: the publisher's id) and `unset` (remove the key, no data). */
  publish(room: string, event: string, data?: unknown,
    opts?: { msgId?: string; timeoutMs?: number; key?: string; unset?: boolean }):
    Promise<number | null>;
  /** Removes `key` (default: the publisher's id) from a state room; resolves to the seq. */
  unset(room: string, key?: string, opts?: { event?: string; timeoutMs?: number }):
    Promise<number | null>;
  rpc(to: string, method: string, params?: unknown, opts?: { timeoutMs?: number }): Promise<unknown>;
  onRpc(method: string, handler: (params: any, info: RpcInfo) => unknown): () => void;
  history(room: string, opts?: { since?: number; limit?: number; reverse?: boolean }):
    Promise<{ room: string; events: RoomEvent[]; seq: number; more?: boolean }>;
  presence(room: string): Promise<{
    room: string;
    members: { client_id: string; user: string; kind: string; node: string; joined_at: number }[];
    unique_users: number;
  }>;
  ping(timeoutMs?: number): Promise<Record<string, unknown>>;
  request(frame: Record<string, unknown>): Promise<Record<string, unknown>>;
  ack(room: string, seq: number): void;
}

export declare function connect(options: ConnectOptions): Client;
export declare function backoffCap(attempt: number, minMs: number, maxMs: number): number;
/** The default URL: `ws` next to the module's URL when it is a node's `/rtnode.js`
 * (`https://n.example/rtnode.js` -> `wss://n.example/ws`), else `ws(s)://<page host>/ws`. */
export declare function defaultUrl(moduleUrl?: string,
  loc?: { protocol: string; host: string }): string;
/** What a refused upgrade of HTTP `status` does: "final" ends the client (401, 403, 404...),
 * "retry" backs off for as long as it lasts (5xx, 408, 425, 429), "refused" ends it after
 * `maxUpgradeRefusals` in a row (0 = unreadable from another origin, 400, 426, 2xx, 3xx). */
export declare function upgradeFailure(status: number): "final" | "retry" | "refused";
