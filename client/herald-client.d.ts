/**
 * Type declarations for herald-client.js, the Herald browser client, whose
 * npm package name is `herald-gateway-client`
 * (`import { HeraldClient } from 'herald-gateway-client'`; the npm name
 * `herald-client` belongs to an unrelated package). Herald also serves the
 * same module at `/client.js`.
 *
 * @module herald-gateway-client
 */

/** Close codes the server uses (docs/PROTOCOL.md section 6). */
export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  POLICY: 1008;
  TOO_BIG: 1009;
  TOKEN_EXPIRED: 4001;
  /** Disconnected by the server (its API's disconnect or revoke): the client stops. */
  DISCONNECTED: 4003;
  SLOW_CONSUMER: 4008;
}>;

/** Error codes of the server's `error` replies, plus the client's own. */
export type HeraldErrorCode =
  | 'bad_request'
  | 'unknown_type'
  | 'forbidden'
  | 'too_many_subscriptions'
  | 'rate_limited'
  | 'unavailable'
  | 'not_subscribed'
  /** client closed, or unsubscribed before the server answered */
  | 'closed'
  /** the server removed the user from the chat */
  | 'removed'
  /** the server closed with 4003 (disconnected by the server): the client
   * stopped; pending subscribes reject with it too */
  | 'disconnected'
  | 'token'
  | 'token_expired'
  | 'connect'
  | (string & {});

export declare class HeraldError extends Error {
  readonly code: HeraldErrorCode;
  readonly chatId?: string;
  constructor(code: HeraldErrorCode, message?: string, chatId?: string);
}

/** A room event as the server sends it. */
export interface RoomEvent<Data = unknown> {
  type: 'message.new' | 'chat.updated' | 'task.updated' | (string & {});
  chat_id: string;
  seq: number;
  data: Data;
}

/** A per-user event (no `seq`), e.g. `notification.new`. */
export interface UserEvent<Data = unknown> {
  type: 'notification.new' | 'task.updated' | (string & {});
  chat_id?: string;
  data: Data;
}

export interface HeraldClientOptions {
  /** A fixed JWT. With only a token, a 4001 (token expired) ends the client.
   * A 4003 (disconnected by the server) ends it either way. */
  token?: string;
  /** Called before every connection attempt, including after 4001. A token
   * identical to one the server closed with 4001 is never sent again: that
   * attempt fails (an `error` with code `token`) and the next one, after the
   * backoff, calls getToken() again. */
  getToken?: () => string | Promise<string>;
  /** WebSocket constructor; defaults to `globalThis.WebSocket`. */
  WebSocket?: typeof WebSocket;
  /** First reconnect delay ceiling in ms (default 500); doubles per failed attempt, jittered.
   * After a 4001 the first renewal waits a random 0..backoffInitial ms; a
   * second 4001 before a connection proved healthy is a failed attempt. */
  backoffInitial?: number;
  /** Largest reconnect delay ceiling in ms (default 30000). */
  backoffMax?: number;
  /** Silence (ms) after which the client sends `{"type":"ping"}` (default 25000). */
  pingInterval?: number;
  /** No frame within this many ms after a ping: the path is dead, reconnect (default 10000). */
  pingTimeout?: number;
  /** An attempt that has not opened after this many ms is abandoned (default 10000).
   * A refused or failed attempt (a WebSocket `error` before open) fails at
   * once, with code 1006, and is retried after the backoff. */
  connectTimeout?: number;
  /** A connection counts as healthy, and the backoff starts over from
   * backoffInitial, once it has stayed open this many ms and every room it
   * subscribed is acknowledged (or it has none) (default 5000). One that
   * closes sooner is a failed attempt, so a server that accepts and then
   * closes (1011, 4008, 1008, ...) sees retries grow to backoffMax. Keep it
   * well below the tokens' lifetime. */
  healthyAfter?: number;
}

export type ConnectionState = 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface Subscribed {
  chatId: string;
  /** The room's position when the subscription took effect (absent on older servers). */
  seq: number | null;
  /** On a resubscribe with `since`: whether the missed events were replayed. */
  recovered?: boolean;
}

export interface Disconnected {
  /** The WebSocket close code; 1006 when the connection failed before it
   * opened; 0 when the client gave up on the socket itself (connect or ping
   * timeout). After 4003, and after 4001 without getToken(), willReconnect is false. */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** ms until the next attempt, when willReconnect. */
  delay?: number;
}

/** The app may have missed events of this room: fetch them from your backend. */
export interface Refetch {
  chatId: string;
  /** `not_recovered`: the server could not replay after a reconnect; `gap`: a
   * `seq` jump seen live that the server could not replay either (the client
   * first resubscribes with `since` to have the missed events replayed). */
  reason: 'not_recovered' | 'gap';
  /** Last `seq` the app saw. */
  since: number | null;
  /** Events up to this `seq` may be missing (null when the server sent none). */
  seq: number | null;
}

export interface SubscribeOptions {
  /** Also receive the room's `join` and `leave` events, and its fresh
   * `presence` list after every reconnect (default false). */
  presence?: boolean;
}

/** A user joined or left a room, or is typing in it (no `seq`, not replayed). */
export interface PresenceChange {
  chatId: string;
  userId: string;
}

/** A room's present users after a reconnect (joins and leaves are not replayed). */
export interface PresenceList {
  chatId: string;
  users: string[];
}

export interface HeraldClientEvents {
  state: ConnectionState;
  /** `attempt`: failed attempts since the last healthy connection. */
  connecting: { attempt: number };
  connected: Record<string, never>;
  disconnected: Disconnected;
  /** Every `subscribed` ack, resubscribes after a reconnect included. */
  subscribed: Subscribed;
  refetch: Refetch;
  event: UserEvent;
  unsubscribed: { chatId: string; reason: string };
  /** A user's first connection subscribed to a room this client subscribed with `{presence: true}`. */
  join: PresenceChange;
  /** A user's last subscription to such a room ended (after the server's leave delay). */
  leave: PresenceChange;
  /** Another connection's user is typing in a subscribed room. */
  typing: PresenceChange;
  /** A `{presence: true}` room's users, fetched again after a reconnect. */
  presence: PresenceList;
  error: Error;
}

export declare class HeraldClient {
  constructor(url: string | undefined, options: HeraldClientOptions);
  readonly state: ConnectionState;
  /** Starts connecting; resolves once connected. */
  connect(): Promise<void>;
  /** Closes for good with 1000. After close(), or after the server closed with
   * 4003, connect() starts again and resubscribes the rooms. */
  close(): void;
  /** Resolves on `subscribed`, rejects with a HeraldError on `error`; survives reconnects. */
  subscribe<Data = unknown>(
    chatId: string,
    handler: (event: RoomEvent<Data>) => void,
    options?: SubscribeOptions,
  ): Promise<Subscribed>;
  /** The room's present users on every node, sorted; rejects with a HeraldError
   * (`forbidden`, `unknown_type` when the server has presence off, `closed`). */
  presence(chatId: string): Promise<string[]>;
  /** Tells the room's other subscribers this user is typing (rate-limited by
   * the server); false when not connected or not subscribed. */
  typing(chatId: string): boolean;
  /** Stops delivery at once; resolves on `unsubscribed`. */
  unsubscribe(chatId: string): Promise<void>;
  on<K extends keyof HeraldClientEvents>(name: K, fn: (value: HeraldClientEvents[K]) => void): () => void;
}
