// herald-client.js (npm: herald-gateway-client): a dependency-free browser
// (and Node >= 22, or 20 with --experimental-websocket) client for Herald.
//
// One job: keep an application subscribed to its Herald rooms across
// reconnects, and tell it exactly when it may have missed events. It speaks
// the wire contract in docs/PROTOCOL.md (subscribe with `since`, `seq`
// deduplication, `recovered:false` -> refetch) and owns nothing else.

/** Close codes the server uses (PROTOCOL.md section 6). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  TOKEN_EXPIRED: 4001,
  /** Disconnected by the server (a disconnect or revoke through its API): the client stops. */
  DISCONNECTED: 4003,
  SLOW_CONSUMER: 4008,
});

/** A command the server refused (`{"type":"error",...}`), or a client-side failure. */
export class HeraldError extends Error {
  constructor(code, message, chatId) {
    super(message || code);
    this.name = 'HeraldError';
    /** `bad_request`, `unknown_type`, `forbidden`, `too_many_subscriptions`,
     * `rate_limited`, `unavailable`, `not_subscribed`, or the client's own: `closed`, `removed`,
     * `disconnected` (closed with 4003), `token`, `token_expired`, `connect`. */
    this.code = code;
    this.chatId = chatId;
  }
}

const DEFAULTS = {
  backoffInitial: 500,
  backoffMax: 30000,
  pingInterval: 25000,
  pingTimeout: 10000,
  connectTimeout: 10000,
  healthyAfter: 5000,
};

// Errors that may pass if the same command is sent again later.
const TRANSIENT = new Set(['rate_limited', 'unavailable']);

export class HeraldClient {
  /**
   * @param {string} url `ws(s)://host/ws` (an `http(s)://` URL is converted).
   * @param {object} options see herald-client.d.ts
   */
  constructor(url, options = {}) {
    if (!options.token && typeof options.getToken !== 'function') {
      throw new TypeError('HeraldClient needs a `token` or a `getToken()` callback');
    }
    this._url = toWsUrl(url);
    this._opts = { ...DEFAULTS, ...options };
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    }
    this._listeners = new Map();
    /** chatId -> room state; a room stays here until unsubscribe() or a removal. */
    this._rooms = new Map();
    /** Commands sent on the current socket and not answered yet, in order:
     * the server answers in order, and some errors carry no chat_id. */
    this._inflight = [];
    this._state = 'idle';
    this._ws = null;
    /** Failed attempts since the last healthy connection: the backoff exponent. */
    this._attempt = 0;
    /** Set by a prompt renewal after 4001, cleared by a healthy connection:
     * a second 4001 before then is a failed attempt, not another free retry. */
    this._renewing = false;
    /** The token of the last connection closed with 4001: the server has
     * said it is expired, so it is never sent again. */
    this._expiredToken = null;
    /** Whether the current connection has been open for healthyAfter. */
    this._aged = false;
    this._timers = { reconnect: null, ping: null, pong: null, open: null, healthy: null };
    this._stopped = false;
  }

  /** `idle`, `connecting`, `connected`, `disconnected` (will reconnect) or `closed`. */
  get state() {
    return this._state;
  }

  /** Starts connecting (once); resolves when the first connection opens. */
  connect() {
    this._stopped = false;
    if (this._state === 'idle' || this._state === 'closed') {
      this._open();
    }
    if (this._state === 'connected') return Promise.resolve();
    return new Promise((resolve) => {
      const off = this.on('connected', () => {
        off();
        resolve();
      });
    });
  }

  /** Closes for good (code 1000); pending subscribes reject with `closed`. */
  close() {
    this._stopped = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      detach(ws);
      try {
        ws.close(CloseCode.NORMAL, 'client closed');
      } catch (_) {
        // already closing
      }
    }
    for (const room of this._rooms.values()) settle(room, new HeraldError('closed', 'client closed', room.chatId));
    for (const op of this._inflight) if (op.type === 'presence') op.reject(new HeraldError('closed', 'client closed', op.chatId));
    this._inflight = [];
    const was = this._state;
    this._setState('closed');
    if (was === 'connected') this._emit('disconnected', { code: CloseCode.NORMAL, reason: 'client closed', willReconnect: false });
  }

  /**
   * Subscribes to a room. Resolves with `{chatId, seq, recovered}` on the
   * server's `subscribed`, rejects with a HeraldError on its `error`. The
   * subscription survives reconnects until `unsubscribe`. With
   * `{presence: true}` the connection also receives the room's joins and
   * leaves (`join` and `leave` events), and after every reconnect the room's
   * fresh presence list (a `presence` event) instead of a replay of joins.
   */
  subscribe(chatId, handler, options = {}) {
    if (typeof handler !== 'function') throw new TypeError('subscribe(chatId, handler): handler must be a function');
    const presence = options.presence === true;
    let room = this._rooms.get(chatId);
    if (room) {
      room.handler = handler;
      if (presence && !room.presence) {
        room.presence = true;
        // Asking again with presence turns the events on for the subscription.
        if (room.acked) {
          room.acked = false;
          this._sendSubscribe(room);
        }
      }
      if (room.acked) return Promise.resolve({ chatId, seq: room.lastSeq, recovered: undefined });
    } else {
      room = {
        chatId,
        handler,
        presence,
        lastSeq: null,
        since: null,
        acked: false,
        everAcked: false,
        recovering: false,
        waiters: [],
      };
      this._rooms.set(chatId, room);
      if (this._state === 'connected') this._sendSubscribe(room);
    }
    return new Promise((resolve, reject) => room.waiters.push({ resolve, reject }));
  }

  /** Stops delivery at once; resolves on the server's `unsubscribed` (or at once when offline). */
  unsubscribe(chatId) {
    const room = this._rooms.get(chatId);
    if (!room) return Promise.resolve();
    this._rooms.delete(chatId);
    settle(room, new HeraldError('closed', 'unsubscribed before the server answered', chatId));
    if (this._state !== 'connected') return Promise.resolve();
    return new Promise((resolve, reject) => {
      this._send({ type: 'unsubscribe', chat_id: chatId }, { chatId, resolve, reject });
    });
  }

  /**
   * Who is in the room, on every node: resolves with the user ids (sorted),
   * rejects with a HeraldError (`forbidden`, `unknown_type` when the server
   * has presence off, `closed` when the connection ends first).
   */
  presence(chatId) {
    return new Promise((resolve, reject) => {
      const op = { chatId, resolve: (msg) => resolve(msg.users), reject };
      if (!this._send({ type: 'presence', chat_id: chatId }, op)) {
        reject(new HeraldError('closed', 'not connected', chatId));
      }
    });
  }

  /**
   * Tells the room's other subscribers that this user is typing. Needs a
   * subscription to the room; the server passes on at most one per user per
   * room per interval, so calling it on every keystroke is fine. Returns
   * whether it was sent (false while not connected or not subscribed).
   */
  typing(chatId) {
    const room = this._rooms.get(chatId);
    if (!room || !room.acked) return false;
    return this._send({ type: 'typing', chat_id: chatId }, null);
  }

  /**
   * Listens to `state`, `connecting`, `connected`, `disconnected`,
   * `subscribed` (every ack, resubscribes included), `refetch`, `event`
   * (per-user events), `unsubscribed` (removed by the server), `join`,
   * `leave`, `typing`, `presence` (a room's list after a reconnect) or `error`. Returns a function that removes the listener.
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this._listeners.get(name)?.delete(fn);
  }

  // ---- connection lifecycle ----

  async _open() {
    this._clearTimers();
    this._setState('connecting');
    this._emit('connecting', { attempt: this._attempt });
    let token;
    try {
      token = await this._token();
    } catch (err) {
      if (this._stopped) return;
      this._emit('error', new HeraldError('token', `getToken() failed: ${err && err.message}`));
      this._scheduleReconnect({ code: 0, reason: 'getToken() failed' });
      return;
    }
    if (this._stopped) return;
    if (token != null && token === this._expiredToken) {
      // Most likely a cache handing back what it still believes valid;
      // connecting would only earn another 4001, so this attempt fails and
      // the next one (after the backoff) asks getToken() again.
      this._emit('error', new HeraldError('token', 'getToken() returned the token the server closed with 4001 (expired)'));
      this._scheduleReconnect({ code: 0, reason: 'getToken() returned an expired token' });
      return;
    }
    const sep = this._url.includes('?') ? '&' : '?';
    let ws;
    try {
      ws = new this._WebSocket(`${this._url}${sep}token=${encodeURIComponent(token)}`);
    } catch (err) {
      this._emit('error', new HeraldError('connect', String(err && err.message)));
      this._scheduleReconnect({ code: 0, reason: 'bad url' });
      return;
    }
    this._ws = ws;
    let opened = false;
    this._timers.open = setTimeout(() => this._drop(ws, 0, 'connect timeout'), this._opts.connectTimeout);
    ws.onopen = () => {
      if (ws !== this._ws) return;
      opened = true;
      clearTimeout(this._timers.open);
      // Opening proves little: a sick server (1011 while its bus is down, a
      // 4008 or 1008 loop) accepts and then closes at once. The backoff only
      // starts over once this connection has proved healthy (_checkHealthy).
      this._aged = false;
      this._timers.healthy = setTimeout(() => {
        this._aged = true;
        this._checkHealthy();
      }, this._opts.healthyAfter);
      this._inflight = [];
      this._setState('connected');
      this._emit('connected', {});
      for (const room of this._rooms.values()) this._sendSubscribe(room);
      this._armPing();
    };
    ws.onmessage = (e) => {
      if (ws !== this._ws) return;
      // Any frame proves the path is alive.
      this._armPing();
      let msg;
      try {
        msg = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      this._onMessage(msg);
      this._checkHealthy();
    };
    ws.onclose = (e) => {
      // A socket already given up on (timeout, or an error before open) is
      // not this._ws any more: its late close schedules nothing.
      if (ws !== this._ws) return;
      this._ws = null;
      if (e.code === CloseCode.TOKEN_EXPIRED) this._expiredToken = token;
      this._scheduleReconnect({ code: e.code, reason: e.reason });
    };
    // Browsers follow every error with a close, which decides what happens
    // next. Node's WebSocket (20, 22) reports a refused or failed connection
    // with an error and no close, leaving the socket "connecting" until the
    // connectTimeout: so an error before open is a failed attempt at once
    // (1006, as the browser's close would say). After open, close follows.
    ws.onerror = () => {
      if (ws !== this._ws || opened) return;
      this._drop(ws, 1006, 'connection failed');
    };
  }

  async _token() {
    const { token, getToken } = this._opts;
    if (typeof getToken === 'function') return getToken();
    return token;
  }

  /** Abandons a socket that stopped answering without waiting for its close handshake. */
  _drop(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    detach(ws);
    try {
      ws.close();
    } catch (_) {
      // nothing to close
    }
    this._scheduleReconnect({ code, reason });
  }

  _scheduleReconnect({ code, reason }) {
    this._clearTimers();
    // Unanswered unsubscribes are moot: the next connection will not subscribe those rooms.
    for (const op of this._inflight) if (op.type === 'unsubscribe') op.resolve();
    for (const op of this._inflight) {
      if (op.type === 'presence') op.reject(new HeraldError('closed', 'connection lost', op.chatId));
    }
    this._inflight = [];
    for (const room of this._rooms.values()) {
      room.acked = false;
      room.recovering = false;
    }
    if (this._stopped) return;
    if (code === CloseCode.DISCONNECTED) {
      // The server's API disconnected this user (or revoked the token):
      // reconnecting would defy it. The app decides (e.g. connect() after a new login).
      return this._stop(code, reason, new HeraldError('disconnected', reason || 'disconnected by the server'));
    }
    const expired = code === CloseCode.TOKEN_EXPIRED;
    if (expired && typeof this._opts.getToken !== 'function') {
      return this._stop(code, reason, new HeraldError('token_expired', 'token expired and no getToken() to renew it'));
    }
    // A fresh token fixes an expiry, so the first one comes back soon (still
    // jittered: a fleet's tokens often share an `exp`). A second 4001 before
    // a connection proved healthy means renewing does not help: back off.
    // Anything else waits out a jittered, growing delay so a fleet of
    // clients does not reconnect in step.
    let delay;
    if (expired && !this._renewing) {
      this._renewing = true;
      delay = Math.round(Math.random() * this._opts.backoffInitial);
    } else {
      delay = this._backoff();
    }
    this._setState('disconnected');
    this._emit('disconnected', { code, reason, willReconnect: true, delay });
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  /** Stops after a close that reconnecting cannot fix: state `closed`,
   * pending subscribes reject with `err`, which is also emitted. The rooms
   * stay, so a later connect() resubscribes them. */
  _stop(code, reason, err) {
    this._stopped = true;
    this._setState('closed');
    this._emit('disconnected', { code, reason, willReconnect: false });
    for (const room of this._rooms.values()) settle(room, new HeraldError(err.code, err.message, room.chatId));
    this._emit('error', err);
  }

  _backoff() {
    const { backoffInitial, backoffMax } = this._opts;
    const ceiling = Math.min(backoffMax, backoffInitial * 2 ** this._attempt);
    this._attempt += 1;
    return Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
  }

  /** Starts the backoff over once the current connection has stayed open for
   * healthyAfter and every room it holds is acknowledged (or it has none).
   * Called when that time is up and on every frame after it, since the last
   * ack (or the error that removes the last pending room) may come later. */
  _checkHealthy() {
    if (this._attempt === 0 && !this._renewing) return;
    if (this._state !== 'connected' || !this._aged) return;
    for (const room of this._rooms.values()) if (!room.acked) return;
    this._attempt = 0;
    this._renewing = false;
  }

  /** (Re)arms the app-level ping: silence for pingInterval sends a ping, and
   * no answer within pingTimeout means the network path is dead. */
  _armPing() {
    clearTimeout(this._timers.ping);
    clearTimeout(this._timers.pong);
    const ws = this._ws;
    this._timers.ping = setTimeout(() => {
      if (ws !== this._ws) return;
      this._send({ type: 'ping' }, null);
      this._timers.pong = setTimeout(() => this._drop(ws, 0, 'ping timeout'), this._opts.pingTimeout);
    }, this._opts.pingInterval);
  }

  _clearTimers() {
    for (const key of Object.keys(this._timers)) {
      clearTimeout(this._timers[key]);
      this._timers[key] = null;
    }
  }

  // ---- commands and replies ----

  _send(obj, op) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    if (op) this._inflight.push({ type: obj.type, ...op });
    ws.send(JSON.stringify(obj));
    return true;
  }

  _sendSubscribe(room) {
    const cmd = { type: 'subscribe', chat_id: room.chatId };
    if (room.lastSeq !== null) cmd.since = room.lastSeq;
    if (room.presence) cmd.presence = true;
    room.since = room.lastSeq;
    this._send(cmd, { chatId: room.chatId });
  }

  /** Removes and returns the oldest unanswered command matching a reply. */
  _takeInflight(type, chatId) {
    const i = this._inflight.findIndex(
      (op) => (type === undefined || op.type === type) && (chatId === undefined || op.chatId === chatId),
    );
    return i < 0 ? undefined : this._inflight.splice(i, 1)[0];
  }

  _onMessage(msg) {
    switch (msg.type) {
      case 'pong':
        return;
      case 'subscribed':
        this._takeInflight('subscribe', msg.chat_id);
        return this._onSubscribed(msg);
      case 'unsubscribed':
        if (msg.reason) return this._onRemoved(msg);
        this._takeInflight('unsubscribe', msg.chat_id)?.resolve();
        return;
      case 'error':
        return this._onError(msg);
      case 'presence':
        this._takeInflight('presence', msg.chat_id)?.resolve(msg);
        return;
      case 'presence.join':
        return this._emit('join', { chatId: msg.chat_id, userId: msg.user_id });
      case 'presence.leave':
        return this._emit('leave', { chatId: msg.chat_id, userId: msg.user_id });
      case 'typing':
        return this._emit('typing', { chatId: msg.chat_id, userId: msg.user_id });
      default:
        return this._onEvent(msg);
    }
  }

  _onSubscribed(msg) {
    const room = this._rooms.get(msg.chat_id);
    if (!room || room.acked) return;
    const seq = typeof msg.seq === 'number' ? msg.seq : null;
    const since = room.since;
    const gap = room.recovering;
    room.recovering = false;
    if (room.everAcked && msg.recovered !== true) {
      // A resubscribe the server could not replay (history too short, node
      // restarted, or a server without recovery): the app must refetch.
      this._emit('refetch', { chatId: room.chatId, reason: gap ? 'gap' : 'not_recovered', since, seq });
      room.lastSeq = seq;
    } else if (room.lastSeq === null) {
      room.lastSeq = seq;
    }
    const again = room.everAcked;
    room.acked = true;
    room.everAcked = true;
    const result = { chatId: room.chatId, seq, recovered: msg.recovered };
    for (const w of room.waiters.splice(0)) w.resolve(result);
    this._emit('subscribed', result);
    if (again && room.presence) {
      // Joins and leaves missed while disconnected are not replayed: the
      // room's list as it is now takes their place.
      const chatId = room.chatId;
      this.presence(chatId).then(
        (users) => this._emit('presence', { chatId, users }),
        (err) => this._emit('error', err),
      );
    }
  }

  _onRemoved(msg) {
    const room = this._rooms.get(msg.chat_id);
    if (!room) return;
    this._rooms.delete(msg.chat_id);
    settle(room, new HeraldError('removed', 'removed from the chat', msg.chat_id));
    this._emit('unsubscribed', { chatId: msg.chat_id, reason: msg.reason });
  }

  _onError(msg) {
    if (msg.code === 'not_subscribed') {
      // A typing, which has no reply to wait for.
      return this._emit('error', new HeraldError(msg.code, msg.message, msg.chat_id));
    }
    const op = this._takeInflight(undefined, msg.chat_id) || this._takeInflight();
    const err = new HeraldError(msg.code, msg.message, msg.chat_id || op?.chatId);
    if (op?.type === 'unsubscribe' || op?.type === 'presence') return op.reject(err);
    const room = op?.type === 'subscribe' ? this._rooms.get(op.chatId) : undefined;
    if (!room) return this._emit('error', err);
    if (room.waiters.length === 0 && TRANSIENT.has(msg.code)) {
      // A resubscribe the app is not awaiting: try again a little later.
      this._emit('error', err);
      setTimeout(() => {
        if (this._rooms.get(room.chatId) === room && this._state === 'connected' && !room.acked) {
          this._sendSubscribe(room);
        }
      }, this._backoff());
      return;
    }
    this._rooms.delete(room.chatId);
    if (room.waiters.length === 0) this._emit('error', err);
    settle(room, err);
  }

  _onEvent(msg) {
    const room = typeof msg.chat_id === 'string' ? this._rooms.get(msg.chat_id) : undefined;
    if (typeof msg.seq !== 'number' || !room) {
      // Per-user events carry no seq and are not tied to a subscription.
      if (typeof msg.seq !== 'number') this._emit('event', msg);
      return;
    }
    // While a gap is being recovered, the replay after the new ack carries
    // this event and everything before it.
    if (room.recovering) return;
    if (room.lastSeq !== null) {
      if (msg.seq <= room.lastSeq) return; // already delivered (replay overlap)
      if (msg.seq > room.lastSeq + 1) return this._recoverGap(room, msg.seq);
    }
    room.lastSeq = msg.seq;
    try {
      room.handler(msg);
    } catch (err) {
      this._emit('error', err);
    }
  }

  /** A live `seq` gap: ask the server to replay from the last delivered
   * event (PROTOCOL.md 3.1); only if it cannot does the app refetch. A
   * server without recovery answers without `recovered`: refetch too. */
  _recoverGap(room, seq) {
    room.recovering = true;
    room.acked = false;
    const noop = () => {};
    this._send({ type: 'unsubscribe', chat_id: room.chatId }, { chatId: room.chatId, resolve: noop, reject: noop });
    this._sendSubscribe(room);
  }

  // ---- plumbing ----

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit('state', state);
  }

  _emit(name, value) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(value);
      } catch (err) {
        // A listener's bug must not break the connection logic.
        if (name !== 'error') this._emit('error', err);
      }
    }
  }
}

function settle(room, err) {
  for (const w of room.waiters.splice(0)) w.reject(err);
}

function detach(ws) {
  ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
}

function toWsUrl(url) {
  if (!url && globalThis.location) url = new URL('/ws', globalThis.location.href).href;
  if (typeof url !== 'string') throw new TypeError('HeraldClient needs a URL');
  return url.replace(/^http(s?):/, 'ws$1:');
}
