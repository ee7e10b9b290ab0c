// herald-client against a real Herald process: acks and typed errors,
// reconnect and resubscribe across a restart, token renewal on 4001,
// deduplication and gap reports by seq, and dead-path detection by ping.

import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { HeraldClient, HeraldError } from '../herald-client.js';
import { inbox, message, next, proxy, startHerald, token, uuid } from './support.js';

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
