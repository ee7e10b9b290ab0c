// herald-client against a real Herald process: acks and typed errors,
// reconnect and resubscribe across a restart (rejoined within the backoff
// although Node reports a refused connection without a close), token
// renewal on 4001, a stop on 4003, deduplication and gap reports by seq,
// and dead-path detection by ping.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';

import { CloseCode, HeraldClient, HeraldError } from '../herald-client.js';
import { closingServer, inbox, message, next, proxy, startHerald, token, uuid } from './support.js';

let herald;
before(async () => {
  herald = await startHerald();
});
after(() => herald?.stop());

/** A client with fast timers, closed when the test ends. */
function client(t, url, options) {
  // A short connect timeout: an attempt that lands while the test proxy
  // refuses connections can hang in Node's WebSocket until it fires.
  const c = new HeraldClient(url, { backoffInitial: 50, backoffMax: 500, connectTimeout: 2000, ...options });
  t.after(() => c.close());
  return c;
}

/** A client behind a test proxy, subscribed to a fresh chat: the numbers it saw
 * in order, a queue of its events, and the last refetch it was asked for. */
async function proxiedRoom(t) {
  const p = await proxy(herald.addr);
  t.after(() => p.close());
  const chat = uuid();
  const c = client(t, p.wsUrl, { token: token(uuid(), [chat]) });
  await c.connect();
  const room = { p, chat, c, seen: [], q: inbox(), refetched: null };
  await c.subscribe(chat, (e) => {
    room.seen.push(e.data.n);
    room.q.push(e);
  });
  c.on('refetch', (r) => {
    room.refetched = r;
  });
  return room;
}

test('subscribe resolves on the ack; events arrive in order; unsubscribe stops them', async (t) => {
  const chat = uuid();
  const c = client(t, herald.wsUrl, { token: token(uuid(), [chat]) });
  const states = [];
  c.on('state', (s) => states.push(s));
  await c.connect();
  const q = inbox();
  const ack = await c.subscribe(chat, (e) => q.push(e));
  assert.equal(ack.chatId, chat);
  const base = ack.seq ?? 0;
  for (const n of [1, 2, 3]) await herald.publish(message(chat, n));
  for (const n of [1, 2, 3]) {
    const e = await q.take();
    assert.deepEqual(e, { type: 'message.new', chat_id: chat, seq: base + n, data: { n } });
  }
  await c.unsubscribe(chat);
  // Delivery stopped at once: the event in between reaches neither handler
  // (the server answers in order, so the new ack comes after it).
  await herald.publish(message(chat, 4));
  const again = inbox();
  await c.subscribe(chat, (e) => again.push(e));
  await herald.publish(message(chat, 5));
  assert.equal((await again.take()).data.n, 5);
  assert.equal(q.pending, 0);
  assert.deepEqual(states, ['connecting', 'connected']);
});

test('a refused subscribe rejects with the server error code', async (t) => {
  const mine = uuid();
  const c = client(t, herald.wsUrl, { token: token(uuid(), [mine]) });
  await c.connect();
  const other = uuid();
  await assert.rejects(c.subscribe(other, () => {}), (err) => {
    assert.ok(err instanceof HeraldError);
    assert.equal(err.code, 'forbidden');
    assert.equal(err.chatId, other);
    return true;
  });
  // The connection is still usable.
  assert.equal((await c.subscribe(mine, () => {})).chatId, mine);
});

test('a restart: reconnects with backoff, resubscribes with since, reports the refetch', async (t) => {
  const node = await startHerald();
  t.after(() => node.stop());
  const chat = uuid();
  const c = client(t, node.wsUrl, { token: token(uuid(), [chat]) });
  await c.connect();
  const q = inbox();
  await c.subscribe(chat, (e) => q.push(e));
  await node.publish(message(chat, 1));
  await node.publish(message(chat, 2));
  const last = (await q.take(), await q.take()).seq;

  const dropped = next(c, 'disconnected');
  await node.stop();
  const gone = await dropped;
  assert.equal(gone.code, 1001);
  assert.equal(gone.willReconnect, true);

  // Same port, new process: the in-memory history is gone, so the server
  // cannot replay and the app is told to refetch from its backend.
  const refetch = next(c, 'refetch');
  const reconnected = next(c, 'connected');
  const restarted = await startHerald({ port: node.port });
  t.after(() => restarted.stop());
  await reconnected;
  const r = await refetch;
  assert.equal(r.chatId, chat);
  assert.equal(r.reason, 'not_recovered');
  assert.equal(r.since, last);
  // Live events flow again, even though the new node's seq starts over.
  await restarted.publish(message(chat, 3));
  assert.equal((await q.take()).data.n, 3);
});

test('an expired token (4001) is renewed through getToken()', async (t) => {
  const chat = uuid();
  const user = uuid();
  let calls = 0;
  const c = client(t, herald.wsUrl, {
    getToken: async () => {
      calls += 1;
      return token(user, [chat], calls === 1 ? 1 : 3600);
    },
  });
  await c.connect();
  const q = inbox();
  await c.subscribe(chat, (e) => q.push(e));
  const resubscribed = next(c, 'subscribed');
  const gone = await next(c, 'disconnected', () => true, 5000);
  assert.equal(gone.code, 4001);
  assert.equal(gone.willReconnect, true);
  await resubscribed;
  assert.equal(calls, 2);
  await herald.publish(message(chat, 1));
  assert.equal((await q.take()).data.n, 1);
});

test('a dropped connection resubscribes with since and gets the missed events replayed', async (t) => {
  const room = await proxiedRoom(t);
  const { p, chat, c, seen, q } = room;
  await herald.publish(message(chat, 1));
  await q.take();

  const dropped = next(c, 'disconnected');
  p.cut();
  assert.equal((await dropped).code, 1006);
  // Published while the client is away: the room's history holds them.
  await herald.publish(message(chat, 2));
  await herald.publish(message(chat, 3));
  const resubscribed = next(c, 'subscribed');
  p.reopen();
  const ack = await resubscribed;
  assert.equal(ack.recovered, true);
  await herald.publish(message(chat, 4));
  for (let i = 0; i < 3; i++) await q.take();
  assert.deepEqual(seen, [1, 2, 3, 4], 'replayed in order, then live: no gap, no duplicate');
  assert.equal(room.refetched, null);
});

test('a repeated frame is dropped; a lost one is replayed by resubscribing with since', async (t) => {
  const room = await proxiedRoom(t);
  const { p, chat, c, seen, q } = room;

  const repeated = p.repeat((m) => m.data?.n === 1);
  await herald.publish(message(chat, 1));
  await repeated;
  await q.take();
  const lost = p.drop((m) => m.data?.n === 2);
  await herald.publish(message(chat, 2));
  await lost;
  const recovered = next(c, 'subscribed');
  await herald.publish(message(chat, 3));
  assert.equal((await recovered).recovered, true);
  await q.take();
  await q.take();
  assert.deepEqual(seen, [1, 2, 3], 'the repeat of 1 dropped, 2 replayed, then 3');
  assert.equal(room.refetched, null);
});

test('a lost frame the history no longer holds is reported as a gap to refetch', async (t) => {
  const node = await startHerald({ env: { HERALD_ROOMS__HISTORY_SIZE: '1' } });
  t.after(() => node.stop());
  const p = await proxy(node.addr);
  t.after(() => p.close());
  const chat = uuid();
  const c = client(t, p.wsUrl, { token: token(uuid(), [chat]) });
  await c.connect();
  const q = inbox();
  await c.subscribe(chat, (e) => q.push(e));
  await node.publish(message(chat, 1));
  const first = await q.take();
  const lost = p.drop((m) => m.data?.n === 2);
  await node.publish(message(chat, 2));
  await lost;
  const gap = next(c, 'refetch');
  // 3 reveals the gap; the history (one event) no longer holds 2.
  await node.publish(message(chat, 3));
  assert.deepEqual(await gap, { chatId: chat, reason: 'gap', since: first.seq, seq: first.seq + 2 });
  await node.publish(message(chat, 4));
  assert.equal((await q.take()).data.n, 4, 'live again after the refetch; 3 is in what the app refetches');
});

test('a dead network path is detected by the app-level ping', async (t) => {
  const p = await proxy(herald.addr);
  t.after(() => p.close());
  const c = client(t, p.wsUrl, { token: token(uuid(), []), pingInterval: 100, pingTimeout: 300 });
  await c.connect();
  p.goSilent();
  const gone = await next(c, 'disconnected');
  assert.equal(gone.reason, 'ping timeout');
  assert.equal(gone.willReconnect, true);
});

test('a restarted node is rejoined within the backoff, not the connect timeout', async (t) => {
  // Node's WebSocket reports a refused connection with an error and no close:
  // unless the client treats that error as a failed attempt, the first
  // attempt after the stop hangs until connectTimeout (10 s here).
  const node = await startHerald();
  t.after(() => node.stop());
  const chat = uuid();
  const c = client(t, node.wsUrl, {
    token: token(uuid(), [chat]),
    connectTimeout: 10000,
    backoffInitial: 100,
    backoffMax: 300,
  });
  await c.connect();
  await c.subscribe(chat, () => {});
  const refused = [];
  c.on('disconnected', (d) => refused.push(d));

  await node.stop();
  // Down for a second: several attempts, each refused at once.
  await sleep(1000);
  const resubscribed = next(c, 'subscribed', (s) => s.chatId === chat, 8000);
  const restarted = await startHerald({ port: node.port });
  t.after(() => restarted.stop());
  const back = performance.now();
  await resubscribed;
  const took = performance.now() - back;
  assert.ok(took < 2500, `rejoined ${Math.round(took)} ms after the restart (backoffMax 300, connectTimeout 10000)`);
  assert.equal(refused[0].code, 1001, 'the stop closed with 1001');
  const failed = refused.slice(1);
  assert.ok(failed.length >= 2, `${failed.length} refused attempts while the node was down`);
  for (const d of failed) {
    assert.equal(d.code, 1006);
    assert.equal(d.willReconnect, true);
    assert.ok(d.delay <= 300, `delay ${d.delay} above backoffMax`);
  }
});

test('an error before open is one failed attempt, with or without the close after it', async (t) => {
  // A stand-in WebSocket that never opens, to play both orders: Node's
  // (error only) and the browser's (error, then close).
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      sockets.push(this);
    }
    send() {}
    close() {
      this.readyState = 3;
    }
  }
  const c = client(t, 'ws://herald.invalid/ws', {
    token: 'any',
    WebSocket: FakeSocket,
    connectTimeout: 10000,
    backoffInitial: 50,
    backoffMax: 100,
  });
  const attempts = [];
  const gone = [];
  c.on('connecting', ({ attempt }) => attempts.push(attempt));
  c.on('disconnected', (d) => gone.push(d));
  c.connect();
  await sleep(10);

  // The browser's order: the close that follows the error changes nothing more.
  const first = sockets[0];
  const { onerror, onclose } = first;
  onerror({ type: 'error' });
  onclose({ code: 1006, reason: '' });
  assert.equal(c.state, 'disconnected');
  assert.deepEqual(gone.map((d) => d.code), [1006], 'one failed attempt, not two');

  // Node's order: an error alone fails the attempt at once.
  const second = await waitFor(() => sockets[1], 1000);
  second.onerror({ type: 'error' });
  assert.equal(c.state, 'disconnected');
  assert.deepEqual(gone.map((d) => d.code), [1006, 1006]);
  await waitFor(() => sockets[2], 1000);
  assert.deepEqual(attempts, [0, 1, 2], 'each failure counted once');
  assert.ok(first.readyState === 3 && second.readyState === 3, 'failed sockets are closed');
});

/** Polls `get` until it returns something truthy. */
async function waitFor(get, ms) {
  const end = performance.now() + ms;
  for (;;) {
    const v = get();
    if (v) return v;
    if (performance.now() > end) assert.fail(`nothing within ${ms} ms`);
    await sleep(5);
  }
}

test('4003 (disconnected by the server) stops the client for good', async (t) => {
  const server = await closingServer(CloseCode.DISCONNECTED, 'disconnected by the server');
  t.after(() => server.close());
  let calls = 0;
  // getToken(): a 4001 would be renewed, so only the code can stop it.
  const c = client(t, server.wsUrl, { getToken: () => `token-${++calls}` });
  assert.equal(CloseCode.DISCONNECTED, 4003);
  const chat = uuid();
  const pending = c.subscribe(chat, () => {});
  const errors = [];
  c.on('error', (e) => errors.push(e));
  const gone = next(c, 'disconnected');
  c.connect();
  assert.deepEqual(await gone, { code: 4003, reason: 'disconnected by the server', willReconnect: false });
  await assert.rejects(pending, (e) => e instanceof HeraldError && e.code === 'disconnected' && e.chatId === chat);
  assert.equal(errors.length, 1);
  assert.ok(errors[0] instanceof HeraldError);
  assert.equal(errors[0].code, 'disconnected');
  assert.equal(c.state, 'closed');
  await sleep(600);
  assert.equal(server.upgrades.length, 1, 'no reconnect after 4003');
  assert.equal(c.state, 'closed');
});
